"""Peak memory of the low-memory SVD recipe, measured on the full-size SVD-XT UNet and temporal VAE (random weights).

Question: what does each knob of the low-memory recipe (experiments/README.md "Low-memory SVD") save? Every arm runs in
a fresh process and reports its peak RSS (getrusage) above the RSS once the model is built, i.e. the activations and
temporaries of the step itself; the weights are counted apart (bf16 UNet 3.05 GB, fp32 VAE 0.39 GB).
  train_*   one training step of the ControlNeXt-SVD-v2 stage's UNet call (video_stages.VideoStage.forward's UNet and
            control hook: forward + backward, the G2 branch and every attention to_out trainable), bf16 weights;
            plain / gradient checkpointing / checkpointing + frame chunking (--frame_chunk=1);
  infer_*   one CFG denoising step (batch 2, no grad), bf16 weights: all frames at once / frame chunking; and
            with fp32 weights (infer_fp32), the bf16 arm's baseline;
  decode_*  the temporal VAE decoding the clip: all frames as one clip / chunks of 2 frames (--decode_chunk=2).
Size: reduced for the CPU (a full-size step at 1024 x 576 x 14 frames would take hours on 2 cores): --frames frames
of --height x --width pixels. The numbers are the shape of the saving, not the GPU figure at full size.
Command: python experiments/bench_svd_memory.py --frames=4 --height=256 --width=256   (all arms, ~12 min)
and at the official clip length: ... --arm=train_plain --frames=14 (and --arm=train_checkpointing --frames=14).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the checkout's packages first

from controlnext.control_branch import G2  # noqa: E402
from controlnext.controlnext import SVD_V2, ControlNeXtUNet  # noqa: E402
from controlnext.sampling import summed_controls  # noqa: E402
from controlnext.selection import select_trainable  # noqa: E402
from unet.svd_unet import SVD_XT, SVDUNet, svd_added_time_ids  # noqa: E402
from vae.temporal_decoder import SVD as SVD_VAE, TemporalAutoencoder  # noqa: E402

ARMS = ("train_plain", "train_checkpointing", "train_checkpointing_frame_chunk", "infer_all_frames",
        "infer_frame_chunk", "infer_fp32", "decode_all_frames", "decode_chunk_2")


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def random_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Materialise a meta-device model in `dtype` with small random weights (only finiteness matters here); cast on
    the meta device first, so that no fp32 copy is ever allocated."""
    model = model.to(dtype).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def run_arm(arm: str, frames: int, height: int, width: int) -> dict:
    torch.manual_seed(0)
    h, w = height // 8, width // 8
    if arm.startswith("decode"):
        with torch.device("meta"):
            vae = TemporalAutoencoder(SVD_VAE)
        vae = random_(vae, torch.float32).eval()
        base, tic = rss_gib(), time.time()
        latents = torch.randn(1, frames, 4, h, w)
        step = 2 if arm == "decode_chunk_2" else frames
        with torch.no_grad():
            video = torch.cat([vae.decode_latent(latents[:, i:i + step], chunked=True)
                               for i in range(0, frames, step)], dim=1)
        assert torch.isfinite(video).all()
    else:
        with torch.device("meta"):
            unet = SVDUNet(SVD_XT)
            branch_model = ControlNeXtUNet(unet, G2, SVD_V2)
        dtype = torch.float32 if arm.endswith("fp32") else torch.bfloat16
        branch_model = random_(branch_model, dtype)
        unet = branch_model.unet
        training = arm.startswith("train")
        unet.requires_grad_(False)
        if training:
            select_trainable(unet, "to_out")
            branch_model.branch.requires_grad_(True)
            unet.gradient_checkpointing = "checkpointing" in arm  # both, as train.py's --gradient_checkpointing
            branch_model.branch.gradient_checkpointing = "checkpointing" in arm
        chunk = 1 if arm.endswith("frame_chunk") else None
        batch = 1 if training else 2
        x = torch.randn(batch, frames, 8, h, w, dtype=dtype)
        pose = torch.rand(batch, frames, 3, height, width, dtype=dtype)
        context = torch.randn(batch, 1, 1024, dtype=dtype)
        ids = svd_added_time_ids(6, 127, 0.02, batch)
        t = torch.full((batch,), 0.25, dtype=torch.float32)
        base, tic = rss_gib(), time.time()
        with torch.set_grad_enabled(training):
            features = branch_model.features(branch_model.prepare(pose), t)
            hook = summed_controls([(branch_model, features, 1.0)], frames)
            out = unet(x, t, context, ids, num_frames=frames, control=hook, frame_chunk=chunk)
            if training:
                out.float().square().mean().backward()
        assert torch.isfinite(out.float()).all()
    return {"arm": arm, "frames": frames, "height": height, "width": width, "model_rss_gib": round(base, 2),
            "step_peak_above_model_gib": round(rss_gib() - base, 2), "seconds": round(time.time() - tic, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", choices=ARMS, help="one arm in this process (default: every arm, one process each)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.frames, args.height, args.width)))
        return
    for arm in ARMS:
        flags = [f"--arm={arm}", f"--frames={args.frames}", f"--height={args.height}", f"--width={args.width}",
                 f"--threads={args.threads}"]
        result = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, check=True)
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
