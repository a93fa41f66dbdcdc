"""Sample the fill50k toy: condition image (or procedural fill index) + prompt -> PNG grid of (condition | output).

    python sample.py --checkpoint=runs/toy_cross_norm-<time>/checkpoints/step_000500_ema.safetensors --fill_index=3
    python sample.py --checkpoint=... --condition=ring.png --prompt="red circle with blue background" --batch=4
    python sample.py --checkpoint= --fill_index=3                 # the base alone (no control)

Loads the base (experiments/weights/), rebuilds the controlled UNet from the config stored in the checkpoint's
metadata, loads the trained tensors (strict accounting), then conditions -> CFG + control closure -> sampler -> decode
(controlnext/sampling.py). Paper: ControlNeXt §3 (inference: control scale, official SD1.5 default 0.35 at test time).
Left out: SD1.5/SDXL weights (a later issue), multi-condition sampling from the command line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open

from controlnext import cli
from controlnext.checkpoint import load_into, read_state, strip_prefix
from controlnext.control_branch import PRESETS as BRANCHES
from controlnext.data import VOCAB, fill50k_example, load_image
from controlnext.controlnext import PRESETS as INJECTIONS, build_controlled_unet
from controlnext.metrics import fill50k_metrics
from controlnext.sampling import cfg_denoiser, decode_pixels, generate
from controlnext.selection import select_trainable
from controlnext.training import save_grid
from encoders.toy_text import PRESETS as TEXT_ENCODERS, ToyTextEncoder
from schedulers.sigmas import PRESETS as SCHEDULES
from unet.sd_unet import PRESETS as UNETS, UNet


@dataclass(frozen=True)
class SampleConfig:
    checkpoint: str = ""               # trained tensors (step_N[_ema].safetensors from train.py); "" = the base alone
    base_weights: str = ""             # "" = the one named in the checkpoint's config (or the TrainConfig default)
    condition: str = ""                # a condition image file; "" = procedural fill50k example `fill_index`
    fill_index: int = 0                # held-out procedural example (seed fill_seed) when no condition file is given
    fill_seed: int = 1                 # the training runs' eval_seed: held out from the training stream (seed 0)
    prompt: str = ""                   # "" = the procedural example's prompt
    batch: int = 4                     # images per condition, each from its own noise
    seed: int = 0                      # noise seed
    sampler: str = "dpmpp_2m"          # controlnext/sampling.py SAMPLERS
    sampling_steps: int = 20
    guidance_scale: float = 2.0        # classifier-free guidance; 1 = off
    control_scale: float = 1.0         # k on the control term (official SD1.5 example: 0.35 for its own model)
    out: str = "samples.png"           # output PNG grid


def main(config: SampleConfig) -> None:
    # --- load: training config from the checkpoint metadata, base, controlled UNet, trained tensors -------------
    import train  # TrainConfig: the run's settings (models, codec, noise schedule)
    train_config = train.TrainConfig()
    if config.checkpoint:
        with safe_open(config.checkpoint, framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{config.checkpoint}: no training config in its metadata; is it a train.py checkpoint?")
        train_config = cli.from_dict(train.TrainConfig, json.loads(meta["config"]))
    tc = train_config
    base_path = config.base_weights or tc.base_weights
    if not base_path:
        raise ValueError("no base weights: pass --base_weights=... (a base run's base_weights.safetensors)")
    unet = UNet(UNETS[tc.unet])
    text_encoder = ToyTextEncoder(TEXT_ENCODERS[tc.text_encoder], VOCAB)
    base = read_state(base_path)
    load_into(unet, strip_prefix(base, "unet."), what=f"UNet from {base_path}")
    load_into(text_encoder, strip_prefix(base, "text_encoder."), what=f"text encoder from {base_path}")
    model, injection = unet, INJECTIONS[tc.injection]
    if config.checkpoint and tc.stage == "control":
        model = build_controlled_unet(tc.ablation, unet, BRANCHES[tc.branch], injection)
        select_trainable(unet, tc.trainable)  # adds the LoRA modules a lora:R run trained, if any
        load_into(model, read_state(config.checkpoint), what=f"trained tensors from {config.checkpoint}", mode="partial")
    elif config.checkpoint:  # a base-stage checkpoint: full UNet + text encoder
        state = read_state(config.checkpoint)
        load_into(unet, strip_prefix(state, "unet."), what="UNet")
        load_into(text_encoder, strip_prefix(state, "text_encoder."), what="text encoder")
    model.eval()

    # --- encode conditions --------------------------------------------------------------------------------------
    r, f = tc.resolution, tc.latent_factor
    example = fill50k_example(config.fill_index, r, config.fill_seed)
    control_np = load_image(config.condition, r) if config.condition else example["control"]
    prompt = config.prompt or example["prompt"]
    control = torch.from_numpy(np.ascontiguousarray(control_np)).permute(2, 0, 1).float().div(255)  # (3, H, W)
    controls = control.expand(config.batch, -1, -1, -1)  # (B, 3, H, W)
    with torch.no_grad():
        context = text_encoder([prompt] * config.batch)  # (B, L, D)
        uncond = text_encoder([tc.empty_prompt] * config.batch)

    # --- sample and decode --------------------------------------------------------------------------------------
    schedule = SCHEDULES[tc.schedule]
    denoiser = cfg_denoiser(unet, schedule, context, uncond, config.guidance_scale,
                            [(model, controls, config.control_scale)] if model is not unet else ())
    latents = generate(denoiser, (config.batch, 3 * f * f, r // f, r // f), schedule, config.sampler,
                       config.sampling_steps, torch.Generator().manual_seed(config.seed))
    images = decode_pixels(latents, f)  # (B, 3, H, W) in [-1, 1]

    # --- save ---------------------------------------------------------------------------------------------------
    save_grid(config.out, controls, images)
    print(f"{prompt!r}: wrote {config.out}")
    if not config.condition and not config.prompt:  # procedural example: we know the disc and colours
        n = config.batch
        metrics = fill50k_metrics(images, torch.from_numpy(example["disc"]).expand(n, -1, -1),
                                  [example["circle_rgb"]] * n, [example["background_rgb"]] * n)
        print(" | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    config, dry_run = cli.parse_args(SampleConfig, sys.argv[1:])
    if dry_run:
        print(cli.dumps(config))
        sys.exit(0)
    main(config)
