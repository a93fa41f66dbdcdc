"""Sample a Stable Diffusion checkpoint with ControlNeXt controls: prompt + condition image(s) -> PNG grid.

    python sample.py --control=runs/<run>/checkpoints/step_000400_ema.safetensors --fill_index=3   # the main job's run
    python sample.py --pretrained=sd_xl_base_1.0.safetensors --tokenizer=tokenizer/ \\
        --control=controlnet.safetensors --unet_weights=unet.safetensors --control_image=photo.png --canny \\
        --prompt="a city at night" --width=1024 --height=1024 --steps=20 --sampler=unipc --guidance_scale=5
    python sample.py --prompt="red circle with blue background"                  # the base alone (no control)
    python sample.py --dtype=bf16 --compile        # bf16 weights under autocast (~1.9x on AVX512-BF16 CPUs), inductor

Loads the pipeline (controlnext/sd_pipeline.py), LoRA files (controlnext/lora.py), the controls (controlnext/
controls.py: train.py checkpoints, official ControlNeXt releases, several at once, each with its own image and scale)
and the release UNet weights (absolute or ΔW, read off the file), then conditions -> CFG + control closure -> sampler
-> VAE decode -> a grid of (condition | output). Paper: ControlNeXt §3 (inference: the control scale; the official
SD1.5 example samples at 0.35, SDXL at 1.0). On procedural fill50k conditions it also prints the fill metrics.
SD3 models (a diffusers StableDiffusion3Pipeline folder or single file) sample through main_sd3: --sampler=euler or
heun, at most one control (a train.py SD3 run; a super-resolution run takes the low-res --control_image).
Left out: the SVD video mode (sample.py's video twin is a later issue), img2img, inpainting.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from controlnext import cli
from controlnext.controls import apply_unet_weights, condition_image, load_control
from controlnext.data import fill50k_example
from controlnext.lora import apply_lora, load_lora
from controlnext.metrics import fill50k_metrics
from controlnext.runs import save_grid
from controlnext.sampling import SAMPLERS
from controlnext.sd3_pipeline import FLOW_SAMPLERS, is_sd3, load_sd3, text_to_image as sd3_text_to_image  # SD3
from controlnext.sd3_stages import load_sd3_control, sd3_condition  # SD3 (issue 19)
from controlnext.sd_pipeline import load_sd, text_to_image

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SampleConfig:
    pretrained: str = "experiments/weights/mini_sd15.safetensors"  # SD single file or diffusers folder
    tokenizer: str = ""                # single files: vocab folder or BPE .txt.gz; "" = tokenizer/ beside the file
    prediction_type: str = ""          # override the checkpoint's ("epsilon" | "v_prediction"; SD2 single files)
    control: tuple[str, ...] = ()      # train.py checkpoints and/or official ControlNeXt branch files, one per control
    unet_weights: tuple[str, ...] = ()  # official release UNet files (absolute or ΔW: detected), applied in order
    control_image: tuple[str, ...] = ()  # one condition image per control; () = the procedural fill50k example
    canny: bool = False                # run the official canny extractor on each condition image first
    control_scale: tuple[float, ...] = ()  # one per control; () = each run's training scale (1.0 for a release)
    control_start: float = 0.0         # control acts on this fraction of the trajectory only: start ...
    control_end: float = 1.0           # ... to end (0 = first step, 1 = last)
    lora: tuple[str, ...] = ()         # LoRA files (kohya or diffusers/PEFT), applied in order
    lora_scale: tuple[float, ...] = ()  # one multiplier per LoRA; () = 1.0 each
    lora_mode: str = "merge"           # "merge" into the weights, or "adapter" (kept separate, switchable)
    prompt: str = ""                   # "" = the procedural example's prompt
    negative_prompt: str = ""          # CFG's uncond prompt (SDXL: empty = zeros, as diffusers)
    width: int = 0                     # pixels, multiple of 8; 0 = the run's training size, else the model's native
    height: int = 0
    steps: int = 20
    sampler: str = "dpmpp_2m"          # controlnext/sampling.py SAMPLERS
    guidance_scale: float = 2.0        # classifier-free guidance; 1 = off
    clip_skip: int = 0
    seed: int = 0                      # noise seed
    batch: int = 4                     # images per prompt, each from its own noise
    fill_index: int = 0                # held-out procedural example (seed fill_seed) when no condition image is given
    fill_seed: int = 1                 # the training runs' eval_seed: held out from the training stream (seed 0)
    out: str = "samples.png"           # output PNG grid
    dtype: str = "fp32"                # weights: "fp32", "bf16" or "fp16" (run under autocast; samplers stay fp32)
    compile: bool = False              # torch.compile the UNet (SD models; the first step compiles: minutes on a CPU)
    use_t5: bool = True                # SD3: load the T5 encoder (False: T5-less, zeros in its place)
    t5_tokenizer: str = ""             # SD3 single files: a folder with spiece.model; "" = tokenizer_3/ beside the file


def check(config: SampleConfig) -> None:
    """The settings that can be checked before loading anything (one ValueError naming the field)."""
    if config.sampler not in SAMPLERS:
        raise ValueError(f"--sampler={config.sampler!r}: expected one of {', '.join(sorted(SAMPLERS))}")
    for field in ("batch", "steps"):
        if getattr(config, field) < 1:
            raise ValueError(f"--{field}={getattr(config, field)}: must be at least 1")
    for field in ("width", "height"):
        if getattr(config, field) < 0 or getattr(config, field) % 8:
            raise ValueError(f"--{field}={getattr(config, field)}: must be a positive multiple of 8 (or 0)")
    if config.control_image and len(config.control_image) != len(config.control):
        raise ValueError(f"--control_image: {len(config.control_image)} images for {len(config.control)} controls")
    if config.control_scale and len(config.control_scale) != len(config.control):
        raise ValueError(f"--control_scale: {len(config.control_scale)} scales for {len(config.control)} controls")
    if config.lora_scale and len(config.lora_scale) != len(config.lora):
        raise ValueError(f"--lora_scale: {len(config.lora_scale)} multipliers for {len(config.lora)} LoRA files")
    if config.dtype not in DTYPES:
        raise ValueError(f"--dtype={config.dtype!r}: expected one of {', '.join(DTYPES)}")
    if config.lora_mode not in ("merge", "adapter"):
        raise ValueError(f"--lora_mode={config.lora_mode!r}: expected 'merge' or 'adapter'")
    if not 0 <= config.control_start <= config.control_end <= 1:
        raise ValueError(f"--control_start={config.control_start} / --control_end={config.control_end}: need "
                         "0 <= start <= end <= 1")


def main(config: SampleConfig) -> dict:
    """Returns {"images": (B, 3, H, W) in [-1, 1], "metrics": fill metrics or {}}."""
    # --- load: the pipeline, LoRA files, controls and the UNet weights that come with them --------------------------
    check(config)
    if is_sd3(config.pretrained):  # SD3 models sample through controlnext/sd3_pipeline.py (issue 19)
        return main_sd3(config)
    dtype = DTYPES[config.dtype]
    pipe = load_sd(config.pretrained, config.tokenizer or None, dtype=dtype, prediction_type=config.prediction_type)
    for i, path in enumerate(config.lora):
        towers = {f"text_encoder{'_2' if j else ''}": t for j, t in enumerate(pipe.text_encoders)}
        apply_lora(pipe.unet, towers, load_lora(path), config.lora_scale[i] if config.lora_scale else 1.0,
                   mode=config.lora_mode)
    controls = [load_control(path, pipe) for path in config.control]
    for path in config.unet_weights:
        kind = "increments" if apply_unet_weights(pipe, path) else "absolute weights"
        print(f"{path}: {kind} (read off the file against the base)")
    trained_at = next((c.resolution for c in controls if c.resolution), None)
    height = config.height or trained_at or pipe.config.resolution
    width = config.width or trained_at or pipe.config.resolution

    # --- conditions: prompt, condition image per control (a file, or the procedural fill50k example) -------------------
    example = fill50k_example(config.fill_index, height, config.fill_seed) if height == width else None
    prompt = config.prompt or (example["prompt"] if example else "")
    images = []
    for i, _ in enumerate(controls):
        if config.control_image:
            images.append(condition_image(config.control_image[i], (height, width), config.canny))
        elif example is not None:
            images.append(torch.from_numpy(np.ascontiguousarray(example["control"])).permute(2, 0, 1).float() / 255)
        else:
            raise ValueError("--control_image is needed for a non-square size (the fill50k examples are square)")
    scales = config.control_scale or tuple(c.scale for c in controls)
    batch = [(c.model, image.expand(config.batch, -1, -1, -1), scale) for c, image, scale in zip(controls, images, scales)]

    # --- sample and decode (half-precision weights run under autocast: the sampler's arithmetic stays fp32) -----------
    if config.compile:
        pipe.unet.compile()  # in place; the control hook is traced into the UNet's graph
    generator = torch.Generator().manual_seed(config.seed)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        result = text_to_image(pipe, [prompt] * config.batch, [config.negative_prompt] * config.batch, height=height,
                               width=width, sampler=config.sampler, steps=config.steps,
                               guidance_scale=config.guidance_scale, generator=generator, controls=batch,
                               control_window=(config.control_start, config.control_end),
                               clip_skip=config.clip_skip).float()

    # --- save --------------------------------------------------------------------------------------------------------------
    shown = images[0].expand(config.batch, -1, -1, -1) if images else torch.zeros(config.batch, 3, height, width)
    return save(config, prompt, example, shown, result, len(controls))


def save(config: SampleConfig, prompt: str, example: dict | None, shown, result, count: int) -> dict:
    """The (condition | output) grid, and the fill metrics on a procedural example sampled with its own prompt."""
    save_grid(config.out, shown, result)
    size = f"{result.shape[-1]}x{result.shape[-2]}"
    print(f"{prompt!r}: wrote {config.out} ({config.batch} x {size}, {count} control(s))")
    metrics = {}
    if example is not None and not config.control_image and not config.prompt:
        n = config.batch
        metrics = fill50k_metrics(result, torch.from_numpy(example["disc"]).expand(n, -1, -1),
                                  [example["circle_rgb"]] * n, [example["background_rgb"]] * n)
        print(" | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return {"images": result, "metrics": metrics}


def main_sd3(config: SampleConfig) -> dict:
    """SD3 (issue 19): the flow pipeline, at most one control (a train.py run on an SD3 model: its arm, its condition
    kind), CFG; no LoRA or release UNet files (none exist for ControlNeXt-SD3)."""
    for field in ("lora", "unet_weights", "compile"):
        if getattr(config, field):
            raise ValueError(f"--{field}: not supported for SD3 models")
    if config.dtype != "fp32":  # the SD3 path runs its MMDiT in the stored dtype, without autocast
        raise ValueError(f"--dtype={config.dtype!r}: SD3 models sample in fp32 here")
    if config.sampler not in FLOW_SAMPLERS or len(config.control) > 1:
        raise ValueError(f"--sampler={config.sampler!r} / {len(config.control)} controls: SD3 samples with one of "
                         f"{', '.join(FLOW_SAMPLERS)} and at most one control")
    pipe = load_sd3(config.pretrained, config.tokenizer or None, config.t5_tokenizer or None, use_t5=config.use_t5)
    control = load_sd3_control(config.control[0], pipe) if config.control else None
    height = config.height or (control.resolution if control else pipe.config.resolution)
    width = config.width or (control.resolution if control else pipe.config.resolution)
    example = fill50k_example(config.fill_index, height, config.fill_seed) if height == width else None
    prompt = config.prompt or (example["prompt"] if example else "")
    shown, controls = torch.zeros(config.batch, 3, height, width), []
    if control is not None:
        image = config.control_image[0] if config.control_image else None
        shown = sd3_condition(control, image, example, (height, width), config.canny).expand(config.batch, -1, -1, -1)
        controls = [(control.model, shown, config.control_scale[0] if config.control_scale else control.scale)]
    result = sd3_text_to_image(pipe, [prompt] * config.batch, [config.negative_prompt] * config.batch, height=height,
                               width=width, sampler=config.sampler, steps=config.steps,
                               guidance_scale=config.guidance_scale, controls=controls,
                               generator=torch.Generator().manual_seed(config.seed), clip_skip=config.clip_skip,
                               control_window=(config.control_start, config.control_end))
    return save(config, prompt, example, shown, result, len(controls))


if __name__ == "__main__":
    try:
        config, dry_run = cli.parse_args(SampleConfig, sys.argv[1:])
        if dry_run:
            check(config)
            print(cli.dumps(config))
            sys.exit(0)
        main(config)
    except ValueError as e:  # bad input: one clear line, no traceback
        sys.exit(f"sample.py: {e}")
