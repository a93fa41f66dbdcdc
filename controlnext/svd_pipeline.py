"""Stable Video Diffusion as one object (UNet + temporal VAE + CLIP image tower + EDM schedule), image-to-video
sampling with ControlNeXt controls and sliding windows, and sample.py's video mode.

Paper: Blattmann et al. 2023, "Stable Video Diffusion" §4 and App. D (image-to-video: the CLIP image embedding of the
conditioning frame as cross-attention context, its noise-augmented VAE latents concatenated on channels, fps /
motion-bucket / augmentation micro-conditioning, EDM preconditioning, a per-frame linear guidance ramp); Karras et al.
2022 Alg. 1 (Euler on Karras sigmas, 700 -> 0.002); Peng et al. 2024, ControlNeXt §3-4 (pose-driven SVD).
References: huggingface/diffusers@v0.42.1 StableVideoDiffusionPipeline, which `image_to_video` equals to 1e-4 without
control on the same weights once the UNet's GroupNorm eps agree (eps_layout="diffusers": diffusers is run as it
ships; tests/test_svd_pipeline.py); dvlab-research/ControlNeXt@ab4b3ac ControlNeXt-SVD-v2/pipeline/
pipeline_stable_video_diffusion_controlnext.py and run_controlnext.py (../shared/reference/controlnext.md §2.4, §5):
  - reference: CLIP embedding of the clean image; VAE *mode* latents of image + noise_aug * randn, unscaled, the same
    for every frame; the uncond half of CFG gets zeros for both, the same added ids [fps_id, motion, noise_aug];
  - guidance: linspace(min, max) over the frames of a window (the official v2 run: min = max = 3);
  - control: each branch's stem once per run, the branch output at every step on the conditional half only (the
    injection preset's `control_uncond`), k = scale x 0.2 for v2 (controlnext.md §2.3);
  - sliding windows (controlnext/windows.py): every step, each window of `window` frames is denoised with its own
    ramp and its first control frame replaced by the reference pose (v2); the outputs are merged per frame;
  - decode: `decode_chunk` frames at a time, each chunk decoded as its own clip (as the official and diffusers
    pipelines do; the temporal decoder couples the frames of a chunk, so the chunk size changes the result).
Loading: a diffusers pipeline folder (model_index.json: StableVideoDiffusionPipeline) or an original svd*.safetensors.
Left out: several videos per reference, fp16 upcasting tricks (use dtype=), model CPU offload.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from controlnext import svd_controls
from controlnext.checkpoint import read_header, read_state, replace_folder
from controlnext.controlnext import ControlNeXtUNet
from controlnext.controls import apply_unet_weights
from controlnext.loaders import ORIGINAL_PREFIXES, folder_config, load_clip, load_svd_unet, load_temporal_vae
from controlnext.sampling import sigmas_for, summed_controls
from controlnext.video_io import to_uint8, write_gif, write_mp4, write_png_folder
from controlnext.windows import apply_windows, blend_weights, official_weights, window_starts
from encoders.clip import OPENCLIP_H_VISION, TINY_VISION, CLIPConfig, CLIPVisionModel, build_clip, preprocess_image
from schedulers.denoisers import EDMVDenoiser
from schedulers.guidance import cfg_combine, svd_frame_guidance
from schedulers.samplers import sample_euler
from schedulers.sigmas import SVD as SVD_SCHEDULE, ScheduleConfig
from unet.keymap import svd_unet_config_from_diffusers
from unet.svd_unet import SVD as SVD_UNET, SVD_XT as SVD_XT_UNET, TINY as TINY_UNET, SVDUNet, SVDUNetConfig
from unet.svd_unet import svd_added_time_ids
from vae.temporal_decoder import SVD as SVD_VAE, TINY as TINY_VAE, TemporalAutoencoder, TemporalVAEConfig

PIPELINE_CLASS = "StableVideoDiffusionPipeline"  # model_index.json _class_name of a diffusers SVD folder
BLENDS = ("official", "linear")  # how overlapping windows merge: windows.official_weights or windows.blend_weights
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # sample.py --dtype


@dataclass(frozen=True)
class SVDConfig:
    unet: SVDUNetConfig
    vae: TemporalVAEConfig
    image: CLIPConfig                              # the image tower (OpenCLIP ViT-H/14 vision with projection)
    schedule: ScheduleConfig = SVD_SCHEDULE        # EDM v-prediction, Karras sigmas 700 -> 0.002, c_noise = ln(s)/4
    height: int = 576                              # native sampling size in pixels (SVD 576 x 1024)
    width: int = 1024

    def __post_init__(self):
        if not self.image.vision or self.image.projection_dim != self.unet.context_dim:
            raise ValueError(f"SVDConfig: the image tower must be a vision tower projecting to the UNet's context "
                             f"width {self.unet.context_dim}, got vision={self.image.vision}, "
                             f"projection_dim={self.image.projection_dim}")
        if self.unet.in_channels != 2 * self.vae.latent_channels or self.unet.out_channels != self.vae.latent_channels:
            raise ValueError(f"SVDConfig: the UNet takes {self.unet.in_channels} -> {self.unet.out_channels} channels, "
                             f"the VAE has {self.vae.latent_channels} latent channels (noisy + reference latents in)")


# The released configs (checkpoints.md §7.2-7.4), and a CPU-sized one with the same structure (tests, the toy recipe).
SVD_CONFIG = SVDConfig(SVD_UNET, SVD_VAE, OPENCLIP_H_VISION)
SVD_XT_CONFIG = SVDConfig(SVD_XT_UNET, SVD_VAE, OPENCLIP_H_VISION)
TINY_CONFIG = SVDConfig(TINY_UNET, TINY_VAE, dataclasses.replace(TINY_VISION, projection_dim=TINY_UNET.context_dim),
                        height=64, width=64)
PRESETS = {"svd": SVD_CONFIG, "svd_xt": SVD_XT_CONFIG, "tiny": TINY_CONFIG}


class StableVideoDiffusion(nn.Module):
    """The components of one SVD checkpoint and the ways SVD uses them; no forward (the UNet is `self.unet`)."""

    def __init__(self, config: SVDConfig, unet: SVDUNet, vae: TemporalAutoencoder, image_encoder: CLIPVisionModel):
        super().__init__()
        self.config = config
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder

    @classmethod
    def random(cls, config: SVDConfig) -> StableVideoDiffusion:
        """Randomly initialised components (tiny test checkpoints)."""
        return cls(config, SVDUNet(config.unet), TemporalAutoencoder(config.vae), build_clip(config.image))

    def encode_reference(self, image: Tensor, noise_aug: float, generator: torch.Generator,
                         sample: bool = False) -> tuple[Tensor, Tensor]:
        """Reference (B, 3, H, W) in [-1, 1] -> (CLIP embedding (B, 1, D) of the clean image, unscaled VAE latents
        (B, Z, H/8, W/8) of image + noise_aug * randn): the posterior mode (inference) or a sample (the trainer).
        The noise is drawn on the CPU generator first, as diffusers' pipeline draws it."""
        pixels = preprocess_image(image, self.config.image.image_size)  # antialiased squash to 224, CLIP-normalised
        embedding = self.image_encoder(pixels).embeds[:, None]  # (B, 1, D)
        noisy = image + noise_aug * torch.randn(image.shape, generator=generator).to(image)
        posterior = self.vae.encode(noisy)
        if not sample:
            return embedding, posterior.mode()
        eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        return embedding, posterior.mean + posterior.std * eps

    def decode(self, latents: Tensor, chunk: int = 0) -> Tensor:
        """Scaled latents (B, F, Z, h, w) -> frames (B, F, 3, H, W) in [-1, 1]: `chunk` frames at a time (0 = all),
        each chunk as its own clip. Inside a chunk the per-frame layers run in slices (exact; vae.chunk_frames)."""
        step = chunk or latents.shape[1]
        dtype = next(self.vae.parameters()).dtype
        return torch.cat([self.vae.decode_latent(latents[:, i:i + step].to(dtype), chunked=True).float()
                          for i in range(0, latents.shape[1], step)], dim=1)  # (B, F, 3, H, W)


# --- loading ----------------------------------------------------------------------------------------------------------

def is_svd(source: str | Path) -> bool:
    """Whether `source` is an SVD checkpoint: a diffusers folder of PIPELINE_CLASS, or a .safetensors single file
    with SGM's OpenCLIP image embedder (checkpoints.md §1 detection; only the header is read)."""
    source = Path(source)
    if source.is_dir():
        index = source / "model_index.json"
        return index.is_file() and json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
    if not source.is_file() or source.suffix != ".safetensors":  # SVD ships as safetensors: no pickle to open
        return False
    return any(k.startswith(ORIGINAL_PREFIXES["svd_image"]) for k in read_header(source)[0])


def schedule_from_diffusers(d: dict) -> ScheduleConfig:
    """The EDM schedule of an SVD scheduler_config.json (EulerDiscreteScheduler, continuous v-prediction, Karras)."""
    wanted = {"prediction_type": "v_prediction", "timestep_type": "continuous", "use_karras_sigmas": True}
    wrong = {k: d.get(k) for k, v in wanted.items() if d.get(k) != v}
    if wrong:
        raise ValueError(f"scheduler_config.json: an SVD schedule has {wanted}; this one has {wrong}")
    return dataclasses.replace(SVD_SCHEDULE, sigma_min=d.get("sigma_min", 0.002), sigma_max=d.get("sigma_max", 700.0))


def load_svd(source: str | Path, config: SVDConfig | None = None, *, eps_layout: str = "sgm",
             dtype: torch.dtype | None = None) -> StableVideoDiffusion:
    """An SVD pipeline from a diffusers folder (its configs are read) or an original svd*.safetensors (`config`, by
    default SVD-XT's). `eps_layout`: the UNet's GroupNorm eps (unet/svd_unet.py): "sgm" as SVD was trained, or
    "diffusers" for weights trained on diffusers' blocks (the official ControlNeXt-SVD releases)."""
    source = Path(source)
    if not is_svd(source):
        raise ValueError(f"{source}: not an SVD checkpoint (a diffusers {PIPELINE_CLASS} folder or an svd*.safetensors "
                         f"with {ORIGINAL_PREFIXES['svd_image']}* keys)")
    if source.is_dir():
        unet_config = dataclasses.replace(svd_unet_config_from_diffusers(folder_config(source / "unet")),
                                          eps_layout=eps_layout)
        unet = load_svd_unet(source / "unet", unet_config, dtype=dtype)
        vae = load_temporal_vae(source / "vae", dtype=dtype)
        image = load_clip(source / "image_encoder", dtype=dtype)
        schedule = schedule_from_diffusers(json.loads((source / "scheduler" / "scheduler_config.json").read_text()))
        config = SVDConfig(unet.config, vae.config, image.config, schedule)
    else:
        config = config or SVD_XT_CONFIG
        config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, eps_layout=eps_layout))
        state = read_state(source)
        unet = load_svd_unet(state, config.unet, dtype=dtype)
        vae = load_temporal_vae(state, config.vae, dtype=dtype)
        image = load_clip(state, config.image, prefix=ORIGINAL_PREFIXES["svd_image"], dtype=dtype)
        config = dataclasses.replace(config, vae=vae.config)  # without quant_conv when the file has none
    return StableVideoDiffusion(config, unet, vae, image).eval()


# --- the denoiser: CFG over (zeros, reference), controls, sliding windows ------------------------------------------

# (a controlled UNet around the pipeline's UNet, its pose video (B, F, 3, H, W) in [0, 1], its scale)
VideoControl = tuple[ControlNeXtUNet, Tensor, float]


def video_denoiser(unet: SVDUNet, embedding: Tensor, latents: Tensor, added_ids: Tensor, guidance: tuple[float, float],
                   controls: Sequence[VideoControl] = (), *, num_frames: int, window: int, overlap: int = 0,
                   blend: str = "official", reference_pose_first: bool = True, frame_chunk: int | None = None):
    """D(x, sigma) -> x0_hat for video latents x (B, F, Z, h, w), windows merged (module docstring).

    embedding (B, 1, D) and latents (B, Z, h, w) of the reference; added_ids (B, 3); guidance (min, max) of the ramp
    over each window's frames (CFG is skipped when both are 1).
    """
    B, dtype = embedding.shape[0], next(unet.parameters()).dtype
    guided = tuple(guidance) != (1.0, 1.0)
    halves = (lambda t: torch.cat([torch.zeros_like(t), t])) if guided else (lambda t: t)  # uncond (zeros) first
    context, concat = halves(embedding.to(dtype)), halves(latents.to(dtype))[:, None]  # (2B, 1, D), (2B, 1, Z, h, w)
    ids = torch.cat([added_ids, added_ids]) if guided else added_ids  # the same micro-conditioning for both halves
    starts = window_starts(num_frames, window, overlap)
    if blend == "official" and len(starts) > 1 and not overlap:
        raise ValueError("the official window rule drops every later window's first frame: it needs overlap >= 1 "
                         "(or blend='linear')")
    weights = official_weights(starts, window) if blend == "official" else \
        blend_weights(starts, window, drop_first=reference_pose_first and bool(controls))
    ramp = svd_frame_guidance(*guidance, window, B).to(latents)  # (B, window, 1, 1, 1)
    # Once per run: each branch's stem (t-independent, per frame), kept as (B, F, C, H', W') to slice windows from.
    stems = [(model, model.prepare(video.to(dtype)).unflatten(0, (B, num_frames)), scale)
             for model, video, scale in controls]

    def window_net(start: int):
        def net(x_in: Tensor, c_noise: Tensor) -> Tensor:  # x_in (B, window, Z, h, w) = c_in * x
            x = torch.cat([x_in, x_in]) if guided else x_in
            x = torch.cat([x.to(dtype), concat.expand(-1, window, -1, -1, -1)], dim=2)  # (2B, window, 2Z, h, w)
            t = torch.cat([c_noise, c_noise]) if guided else c_noise
            active = []
            for model, stem, scale in stems:
                part = stem[:, start:start + window].clone()  # (B, window, C, H', W')
                if reference_pose_first:
                    part[:, 0] = stem[:, 0]  # v2: every window starts from the reference pose
                c = model.features(part.flatten(0, 1), c_noise)  # (B*window, C_out, h', w'): once for both halves
                if guided:
                    c = torch.cat([c, c])  # (2B*window, ...), in torch.cat order like x
                    if not model.control_uncond:  # the official SVD pipelines leave the uncond half uncontrolled
                        scale = torch.tensor([0.0] * B + [scale] * B, dtype=dtype, device=x.device).view(-1, 1, 1, 1)
                active.append((model, c, scale))
            hook = summed_controls(active, window) if active else None
            out = unet(x, t, context, ids, num_frames=window, control=hook, frame_chunk=frame_chunk).float()
            return cfg_combine(*out.chunk(2), ramp) if guided else out  # uncond, cond: (B, window, Z, h, w)
        return EDMVDenoiser(net)

    denoisers = {s: window_net(s) for s in sorted(set(starts))}
    return lambda x, sigma: apply_windows(lambda part, s: denoisers[s](part, sigma), x, starts, weights)


@torch.no_grad()
def image_to_video(pipe: StableVideoDiffusion, reference: Tensor, *, num_frames: int, steps: int = 25,
                   guidance: tuple[float, float] = (3.0, 3.0), fps_id: int = 6, motion_bucket_id: int = 128,
                   noise_aug: float = 0.02, generator: torch.Generator, noise: Tensor | None = None,
                   controls: Sequence[VideoControl] = (), window: int = 0, overlap: int = 0, blend: str = "official",
                   reference_pose_first: bool = True, decode_chunk: int = 0, frame_chunk: int | None = None,
                   decode: bool = True, progress: bool = False) -> Tensor:
    """Reference (B, 3, H, W) in [-1, 1] (+ controls) -> frames (B, F, 3, H, W) in [-1, 1], or the latents.

    Defaults: the official ControlNeXt-SVD-v2 run (25 steps, guidance 3 constant, fps_id 6, motion 128, noise_aug
    0.02). `window` frames per window (0 = all frames, one window); `noise` (B, F, Z, h, w) fixes the initial latents;
    the generator draws the reference's noise first, then the initial latents (diffusers' order).
    """
    B, H, W = reference.shape[0], *reference.shape[-2:]
    f = pipe.config.vae.downscale
    if H % f or W % f:
        raise ValueError(f"height and width must be multiples of {f} (the VAE stride), got {H}x{W}")
    window = min(window or num_frames, num_frames)
    overlap = 0 if window == num_frames else overlap  # one window: nothing overlaps (the official min(fpb, F))
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    for i, (_, video, _) in enumerate(controls):
        if tuple(video.shape) != (B, num_frames, 3, H, W):
            raise ValueError(f"controls[{i}]: the pose video must be (B, F, 3, H, W) = {(B, num_frames, 3, H, W)}, "
                             f"got {tuple(video.shape)}")
    device, dtype = next(pipe.unet.parameters()).device, next(pipe.vae.parameters()).dtype
    embedding, latents = pipe.encode_reference(reference.to(device, dtype), noise_aug, generator)
    ids = svd_added_time_ids(fps_id, motion_bucket_id, noise_aug, B).to(device)
    controls = [(model, video.to(device), scale) for model, video, scale in controls]
    denoiser = video_denoiser(pipe.unet, embedding, latents, ids, guidance, controls, num_frames=num_frames,
                              window=window, overlap=overlap, blend=blend, reference_pose_first=reference_pose_first,
                              frame_chunk=frame_chunk)
    sigmas = sigmas_for(pipe.config.schedule, "euler", steps).float().to(device)  # Karras 700 -> 0.002, then 0
    shape = (B, num_frames, pipe.config.vae.latent_channels, H // f, W // f)
    noise = torch.randn(shape, generator=generator) if noise is None else noise
    x = noise.to(device) * (sigmas[0].item() ** 2 + 1) ** 0.5  # x enters at sigma_max (diffusers' init_noise_sigma)
    with tqdm(total=steps, desc="denoising", disable=not progress, leave=False) as bar:
        x = sample_euler(denoiser, x, sigmas, callback=lambda i, x, x0_hat: bar.update())
    return pipe.decode(x, decode_chunk) if decode else x


# --- sample.py's video mode -------------------------------------------------------------------------------------------

VIDEO_FILES = {"frames", "video.gif", "video.mp4", "pose_and_video.gif"}  # what write_video writes


def check_output(folder: str | Path) -> None:
    """The output folder may be new or an earlier output of write_video (which it replaces), nothing else."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or not {p.name for p in folder.iterdir()} <= VIDEO_FILES):
        raise ValueError(f"--video_out={folder}: exists and is not an earlier video output (it may hold only "
                         f"{', '.join(sorted(VIDEO_FILES))})")


def write_video(folder: str | Path, frames: Tensor, poses: Tensor | None, fps: float) -> list[str]:
    """frames (F, 3, H, W) in [-1, 1] -> folder/frames/*.png, video.gif, video.mp4 (when imageio-ffmpeg is installed)
    and, with poses (F, 3, H, W) in [0, 1], pose_and_video.gif side by side. The folder is written under a temporary
    name and renamed into place (an earlier output is moved aside first, restored if that fails). Returns the names."""
    folder = Path(folder)
    check_output(folder)
    video = to_uint8(frames, (-1.0, 1.0))  # (F, H, W, 3)
    files = {"frames": lambda path: write_png_folder(video, path), "video.gif": lambda path: write_gif(video, path, fps)}
    if find_spec("imageio_ffmpeg") is not None and video.shape[1] % 2 == 0 and video.shape[2] % 2 == 0:
        files["video.mp4"] = lambda path: write_mp4(video, path, fps)
    if poses is not None:
        side_by_side = np.concatenate([to_uint8(poses), video], axis=2)  # (F, H, 2W, 3)
        files["pose_and_video.gif"] = lambda path: write_gif(side_by_side, path, fps)
    replace_folder(folder, files)
    return sorted(files)


def check_video(config) -> None:
    """sample.py's video fields, checked before anything loads or is written (one ValueError naming the field)."""
    unused = [name for name in ("control_image", "canny", "lora", "prompt", "negative_prompt") if getattr(config, name)]
    if unused or (config.control_start, config.control_end) != (0.0, 1.0):
        name = unused[0] if unused else "control_start"
        raise ValueError(f"--{name}: not used by the video mode (SVD conditions on the reference image)")
    if not Path(config.reference).is_file():
        raise ValueError(f"--reference={config.reference!r}: the reference image (frame 0 of the video) is needed")
    if config.control and not config.pose:
        raise ValueError("--pose: the controls need pose frames (a folder of images, a video file or a keypoint JSON)")
    if config.pose and not Path(config.pose).exists():
        raise ValueError(f"--pose={config.pose}: no such file or folder")
    if config.pose.lower().endswith(".json") and not Path(config.pose_reference).is_file():
        raise ValueError(f"--pose_reference={config.pose_reference!r}: a keypoint --pose is aligned to the reference "
                         "image's keypoint JSON (controlnext/pose.py), which is needed")
    for name in ("frames", "window", "overlap", "decode_chunk", "frame_chunk", "noise_aug"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name}={getattr(config, name)}: must not be negative")
    if config.pose_stride < 1 or config.fps < 1:
        raise ValueError(f"--pose_stride={config.pose_stride} / --fps={config.fps}: must be at least 1")
    if config.window and config.overlap >= config.window:
        raise ValueError(f"--overlap={config.overlap}: must be below --window={config.window}")
    if config.window and not config.overlap and config.window_blend == "official":
        raise ValueError("--overlap=0: the official window rule drops every later window's first frame; give an "
                         "overlap >= 1 or --window_blend=linear")
    if config.window_blend not in BLENDS:
        raise ValueError(f"--window_blend={config.window_blend!r}: expected one of {', '.join(BLENDS)}")
    if config.release not in ("auto", *svd_controls.RELEASES):
        raise ValueError(f"--release={config.release!r}: expected auto or one of {', '.join(svd_controls.RELEASES)}")
    if config.eps_layout not in svd_controls.EPS_LAYOUTS:
        raise ValueError(f"--eps_layout={config.eps_layout!r}: expected one of {', '.join(svd_controls.EPS_LAYOUTS)}")
    if config.dtype not in DTYPES:
        raise ValueError(f"--dtype={config.dtype!r}: expected one of {', '.join(DTYPES)}")
    if len(config.guidance_ramp) not in (0, 2):
        raise ValueError(f"--guidance_ramp={config.guidance_ramp}: (min, max) over each window's frames, or ()")
    check_output(config.video_out)


def sample_video(config) -> dict:
    """sample.py's video mode; `config` is sample.py's SampleConfig (its video fields). Reference image + pose frames
    (+ official releases or train.py video runs) -> frames, GIF, MP4. Returns {"frames": (F, 3, H, W), "out": path}."""
    check_video(config)
    layout = svd_controls.control_layout(config)
    pipe = load_svd(config.pretrained, eps_layout=layout, dtype=DTYPES[config.dtype])
    controls = [svd_controls.load_video_control(path, pipe, config.release, config.control_level)
                for path in config.control]
    for path in config.unet_weights:
        kind = "increments" if apply_unet_weights(pipe, path) else "absolute weights"
        print(f"{path}: {kind} (read off the file against the base)")
    height, width = config.height or pipe.config.height, config.width or pipe.config.width
    poses = svd_controls.pose_frames(config, height, width) if config.pose else None  # (F, 3, H, W) in [0, 1]
    num_frames = len(poses) if poses is not None else (config.frames or pipe.config.unet.num_frames)
    reference = svd_controls.reference_image(config.reference, height, width)  # (3, H, W) in [-1, 1]
    scales = config.control_scale or tuple(c.scale for c in controls)
    guidance = tuple(config.guidance_ramp) or (config.guidance_scale or 3.0,) * 2
    frames = image_to_video(
        pipe, reference[None], num_frames=num_frames, steps=config.steps or 25, guidance=guidance,
        fps_id=config.fps - 1, motion_bucket_id=config.motion_bucket_id, noise_aug=config.noise_aug,
        generator=torch.Generator().manual_seed(config.seed),
        controls=[(c.model, poses[None], s) for c, s in zip(controls, scales)], window=config.window,
        overlap=config.overlap, blend=config.window_blend, decode_chunk=config.decode_chunk,
        frame_chunk=config.frame_chunk or None, progress=True)[0]
    names = write_video(config.video_out, frames, poses, config.fps)
    print(f"wrote {config.video_out}/ ({', '.join(names)}): {num_frames} frames {width}x{height}, "
          f"{len(controls)} control(s), eps layout {layout}")
    return {"frames": frames, "out": Path(config.video_out)}
