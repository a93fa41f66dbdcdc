"""Sample a Stable Diffusion checkpoint with ControlNeXt controls: prompt + condition image(s) -> PNG grid.

    python sample.py --control=runs/<run>/checkpoints/step_000400_ema.safetensors --fill_index=3   # the main job's run
    python sample.py --pretrained=sd_xl_base_1.0.safetensors --tokenizer=tokenizer/ \\
        --control=controlnet.safetensors --unet_weights=unet.safetensors --control_image=photo.png --canny \\
        --prompt="a city at night" --width=1024 --height=1024 --steps=20 --sampler=unipc --guidance_scale=5
    python sample.py --prompt="red circle with blue background"                  # the base alone (no control)
    python sample.py --dtype=bf16 --compile        # bf16 weights under autocast (~2.2x on AVX512-BF16 CPUs), inductor
    python sample.py --pretrained=stable-video-diffusion-img2vid-xt-1-1 --control=controlnet.bin \
        --unet_weights=unet.bin --reference=ref.png --pose=poses/ --height=1024 --width=576    # ControlNeXt-SVD-v2

Loads the pipeline (controlnext/sd_pipeline.py), LoRA files (controlnext/lora.py), the controls (controlnext/
controls.py: train.py checkpoints, official ControlNeXt releases, several at once, each with its own image and scale)
and the release UNet weights (absolute or ΔW, read off the file), then conditions -> CFG + control closure -> sampler
-> VAE decode -> a grid of (condition | output). Paper: ControlNeXt §3 (inference: the control scale; the official
SD1.5 example samples at 0.35, SDXL at 1.0). On procedural fill50k conditions it also prints the fill metrics.
SD3 models (a diffusers StableDiffusion3Pipeline folder or single file) sample through controlnext/sd3_stages.py sample_sd3: --sampler=euler or
heun, at most one control (a train.py SD3 run; a super-resolution run takes the low-res --control_image).
Video: an SVD --pretrained switches to controlnext/svd_pipeline.py sample_video (reference image + pose frames ->
PNG frames, GIF, MP4; the official ControlNeXt-SVD releases or train.py video runs as controls; defaults are the
official v2 run, controlnext.md §5). Left out: img2img, inpainting.
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
from controlnext.sd3_pipeline import is_sd3  # SD3 (issue 19)
from controlnext.sd3_stages import sample_sd3  # SD3 (issue 19)
from controlnext.sd_pipeline import load_sd, text_to_image
from controlnext.svd_pipeline import is_svd, sample_video

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
    steps: int = 0                     # 0 = 20 (SD) or 25 (SVD, the official ControlNeXt-SVD-v2 run)
    sampler: str = "dpmpp_2m"          # controlnext/sampling.py SAMPLERS (SVD: always EDM Euler on Karras sigmas)
    guidance_scale: float = 0.0        # classifier-free guidance, 1 = off; 0 = 2.0 (SD) or 3.0 (SVD-v2, every frame)
    clip_skip: int = 0
    seed: int = 0                      # noise seed
    batch: int = 4                     # images per prompt, each from its own noise (video: one video per run)
    fill_index: int = 0                # held-out procedural example (seed fill_seed) when no condition image is given
    fill_seed: int = 1                 # the training runs' eval_seed: held out from the training stream (seed 0)
    out: str = "samples.png"           # output PNG grid
    dtype: str = "fp32"                # weights and compute: fp32, bf16 or fp16 (SD images: under autocast, the sampler
                                       # in fp32; video: half the memory); SD3 samples in fp32
    compile: bool = False              # torch.compile the UNet (SD images; the first step compiles: minutes on a CPU)
    channels_last: bool = False        # UNet and control weights in NHWC (SD images): bf16 on AMX CPUs 1.27x per UNet
                                       # call, fp32 1.19x slower (experiments/README.md, "UNet forward")
    use_t5: bool = True                # SD3: load the T5 encoder (False: T5-less, zeros in its place)
    t5_tokenizer: str = ""             # SD3 single files: a folder with spiece.model; "" = tokenizer_3/ beside the file
    # video: a --pretrained SVD pipeline folder or svd*.safetensors samples a video (controlnext/svd_pipeline.py)
    reference: str = ""                # the reference image: SVD's conditioning frame, frame 0 of the video
    pose: str = ""                     # pose frames: a folder of images or a video file (frame 0 = the reference's
                                       # pose), or a keypoint JSON aligned to pose_reference (controlnext/pose.py)
    pose_reference: str = ""           # the reference image's keypoint JSON (for a keypoint --pose)
    pose_stride: int = 2               # every n-th driving frame (official v2 sample_stride 2)
    frames: int = 0                    # frames to generate; 0 = every pose frame (no pose: the UNet's frame count)
    fps: int = 7                       # the UNet's fps condition (fps_id = fps - 1) and the GIF/MP4 frame rate
    motion_bucket_id: int = 128        # official v2 inference (it trained at 127)
    noise_aug: float = 0.02            # noise on the reference before its VAE latents (and the third added id)
    guidance_ramp: tuple[float, ...] = ()  # (min, max): SVD's linear per-frame ramp instead of a constant guidance
    window: int = 24                   # frames per sliding window (official v2 24; 0 = all frames at once)
    overlap: int = 6                   # frames shared by neighbouring windows (official v2 6)
    window_blend: str = "official"     # overlap merge: "official" (equal mean, later windows skip their first
                                       # frame) or "linear" (cross-fade ramps; controlnext/windows.py)
    decode_chunk: int = 2              # frames decoded as one clip (official v2 2; 0 = all)
    frame_chunk: int = 0               # UNet per-frame layers on this many frames at a time (exact; 0 = all)
    control_level: float = 0.2         # SVD-v2's gain k on the control term (controlnext.md §2.3; dense controls: 1)
    release: str = "auto"              # official branch files: auto (G1 -> svd_v1, G2 -> svd_v2), svd_v1, svd_v2,
                                       # svd_v2_train (controlnext/svd_controls.py)
    eps_layout: str = "auto"           # UNet GroupNorm eps: auto (releases: diffusers; runs: theirs; else sgm)
    video_out: str = "samples_video"   # folder: frames/ (PNG), video.gif, video.mp4 (with imageio-ffmpeg),
                                       # pose_and_video.gif


def check(config: SampleConfig) -> None:
    """The settings that can be checked before loading anything (one ValueError naming the field)."""
    if config.sampler not in SAMPLERS:
        raise ValueError(f"--sampler={config.sampler!r}: expected one of {', '.join(sorted(SAMPLERS))}")
    if config.batch < 1 or config.steps < 0 or config.guidance_scale < 0:
        raise ValueError(f"--batch={config.batch} / --steps={config.steps} / --guidance_scale={config.guidance_scale}"
                         ": batch at least 1, steps and guidance not negative")
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
    """Returns {"images": (B, 3, H, W) in [-1, 1], "metrics": fill metrics or {}}; video: svd_pipeline.sample_video."""
    # --- load: the pipeline, LoRA files, controls and the UNet weights that come with them --------------------------
    check(config)
    if config.compile and (is_svd(config.pretrained) or is_sd3(config.pretrained)):
        raise ValueError("--compile: implemented for SD image models only (video and SD3 run eager)")
    if config.channels_last and (is_svd(config.pretrained) or is_sd3(config.pretrained)):
        raise ValueError("--channels_last: implemented for SD image models only (video and SD3 run NCHW)")
    if is_svd(config.pretrained):  # video (SVD): reference image + poses -> frames, GIF, MP4
        return sample_video(config)
    if is_sd3(config.pretrained):  # SD3 models sample through controlnext/sd3_pipeline.py (issue 19)
        if config.dtype != "fp32":  # the SD3 path runs its MMDiT in the stored dtype, without autocast
            raise ValueError(f"--dtype={config.dtype!r}: SD3 models sample in fp32 here")
        return save(config, *sample_sd3(config))
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
    if config.channels_last:  # the convolutions follow their weights' layout; activations stay NHWC from conv_in on
        for module in [pipe.unet] + [c.model for c in controls]:
            module.to(memory_format=torch.channels_last)
    if config.compile:
        pipe.unet.compile()  # in place; the control hook is traced into the UNet's graph
    generator = torch.Generator().manual_seed(config.seed)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        result = text_to_image(pipe, [prompt] * config.batch, [config.negative_prompt] * config.batch, height=height,
                               width=width, sampler=config.sampler, steps=config.steps or 20,
                               guidance_scale=config.guidance_scale or 2.0, generator=generator, controls=batch,
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
