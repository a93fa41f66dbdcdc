"""FLOPs of a UNet forward and of a control method's training step, counted on the meta device (no weights, no time),
and model FLOPs utilisation (MFU) against a GPU's peak.

Question (issue 17): how much work does a ControlNeXt step do next to ControlNet's, before any kernel runs? The
time ratio of bench_train.py cannot beat the FLOP ratio by much, unless one side does memory-bound work the count
leaves out (AdamW over 361 M parameters, weight-gradient accumulation), so the count says what the ratio goal asks.
Method: torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions and attention, forward and backward; norms,
activations and the optimizer are not counted) over one forward + backward of the full SD1.5 config on the meta
device, with the arm's tensors trainable and the rest frozen as train.py has them, the loss a mean of squares.
Command (CPU, ~10 s):  python experiments/flops.py [--batch=2] [--size=256]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from controlnext.control_branch import branch_for
from controlnext.controlnext import build_controlled_unet, injection_preset, site_width
from controlnext.selection import select_trainable
from unet.sd_unet import PRESETS, UNet, UNetConfig

# dense peak TFLOP/s by GPU name and dtype (vendor data sheets; SXM parts, no sparsity); --peak_tflops overrides
PEAK_TFLOPS = {"H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}, "H100": {"bf16": 989.4, "fp16": 989.4,
               "fp32": 494.7}, "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}}  # fp32 = TF32 tensor cores


def peak_tflops(device: torch.device, dtype: str, override: float = 0.0) -> float | None:
    """The card's dense peak for this dtype, or None where it is not known (CPUs, unlisted cards)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((table[dtype] for key, table in PEAK_TFLOPS.items() if key in name and dtype in table), None)


def mfu(flops: float, seconds: float, peak: float | None) -> str:
    return f"{100 * flops / seconds / (peak * 1e12):.1f}%" if peak else "—"


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_forward_flops(preset: str | UNetConfig = "sd15", batch: int = 2, size: int = 32) -> int:
    """One UNet forward (no gradients) at a latent of size x size; `preset` a unet/sd_unet.py name or a config."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    with torch.device("meta"):
        unet = UNet(cfg).requires_grad_(False)
        x, t = torch.randn(batch, cfg.in_channels, size, size), torch.full((batch,), 500.0)
        context = torch.randn(batch, 77, cfg.context_dim)
        y = torch.randn(batch, cfg.adm_channels) if cfg.adm_channels else None
        with torch.no_grad():
            return count(lambda: unet(x, t, context, y))


def step_flops(ablation: str, trainable: str, site: str = "", preset: str | UNetConfig = "sd15", batch: int = 2,
               size: int = 256) -> int:
    """Forward + backward of one training step: `ablation` on the frozen UNet, `trainable` UNet tensors, the
    sd15_train injection moved to `site` (ControlNeXt arms), images of size x size (latent size / 8). The branch is
    the released one for the site: G2 (320 channels) at down_0, the SD1.5 release's G1 (1280) after the mid block
    (`tiny` for small presets)."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    with torch.device("meta"):
        unet = UNet(cfg).requires_grad_(False)
        injection = injection_preset("sd15_train", site)
        released = cfg.channels[0] == 320  # the SD1.5/SDXL widths the official branches are built for
        branch = ("g1_sd15" if injection.site.startswith("mid") else "g2") if released else "tiny"
        model = build_controlled_unet(ablation, unet, branch_for(branch, site_width(cfg, injection)), injection)
        select_trainable(unet, trainable)  # the selection's tensors train (and a lora:R adds its modules)
        x, t = torch.randn(batch, cfg.in_channels, size // 8, size // 8), torch.full((batch,), 500.0)
        context, image = torch.randn(batch, 77, cfg.context_dim), torch.rand(batch, 3, size, size)
        return count(lambda: model(x, t, context, image).float().square().mean().backward())


ROWS = {"controlnext (down_0, to_out: official SD1.5 training)": ("cross_norm", "to_out", ""),
        "controlnext, attn2_to_out": ("cross_norm", "attn2_to_out", ""),
        "controlnext, branch only (none)": ("cross_norm", "none", ""),
        "controlnext at mid_out (the release's site), to_out": ("cross_norm", "to_out", "mid_out"),
        "controlnext at mid_out, branch only": ("cross_norm", "none", "mid_out"),
        "controlnext, full UNet (all)": ("cross_norm", "all", ""),
        "controlnet (UNet frozen)": ("controlnet", "none", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image pixels (latent = size / 8)")
    args = parser.parse_args()
    forward = unet_forward_flops(batch=args.batch, size=args.size // 8)
    counts = {label: step_flops(*row, batch=args.batch, size=args.size) for label, row in ROWS.items()}
    reference = counts["controlnet (UNet frozen)"]
    print(f"SD1.5, batch {args.batch}, {args.size} px: one UNet forward = {forward / 1e12:.3f} TFLOP")
    print(f"{'training step (forward + backward)':55s} {'TFLOP':>7s} {'UNet fwds':>9s} {'/ controlnet':>12s}")
    for label, flops in counts.items():
        print(f"{label:55s} {flops / 1e12:7.3f} {flops / forward:9.2f} {flops / reference:12.3f}")


if __name__ == "__main__":
    main()
