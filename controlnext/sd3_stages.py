"""What one SD3 training step computes (`--stage=control` with `--pretrained` an SD3 model), the super-resolution
control, and the SD3 controls sample.py loads back from a run.

Paper: Esser et al. 2024 (arXiv 2403.03206) §2 (rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, the network
predicts v = eps - x0) and §3.1 / §5.1 (logit-normal sigma, shifted by 3 as diffusers' SD3 trainers do:
schedulers/flow.py); ControlNeXt (arXiv 2408.06070) §3-4 (the branch trained at control_lr, a regex subset of the
frozen base at lr). Reference: huggingface/diffusers@v0.42.1 examples/controlnet/train_controlnet_sd3.py (VAE latents
shifted and scaled, the three encoders' prompt embeddings, sigma from the shifted table by logit-normal u, target
eps - x0 with precondition_outputs off, weighting "logit_normal" = unweighted MSE), which the loss here follows.
SD3Stage has stages.ControlStage's interface (forward(batch, generator) -> loss, trainable, param_groups, evaluate,
export; `pipe.unet` is the MMDiT), so train.py runs it unchanged; stages.build_stage sends SD3 models here.
Recipe: the `sd3` injection (controlnext.py), `to_out` over the MMDiT (every image-stream attention output, as the
official SD1.5 trainer's selection; 56.7M at SD3-medium), the G2 branch from SD3-medium's width up, else the tiny one.
Super-resolution (issue 19; the authors trained it, unreleased): the condition is the target at 1/sr_factor
resolution brought back to full size: area downsample (each low-res pixel the mean of its block), bicubic upsample,
clamped to [0, 1]; a dense control, trained and sampled at level 1. Its procedural toy is fill50k's targets
(--dataset=fill50k --control_source=super_resolution): blurred disc and colours in, sharp disc out.
Left out: the latent cache (an SD3 context is 333 x 4096 values per prompt), per-pixel loss weights, training the
text encoders or SD3 itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from controlnext import cli
from controlnext.checkpoint import load_into, read_metadata, read_state
from controlnext.config import TrainConfig
from controlnext.control_branch import PRESETS as BRANCHES
from controlnext.controlnext import PRESETS as INJECTIONS, injection_preset
from controlnext.controls import condition_image
from controlnext.data import fill50k_example, load_image
from controlnext.metrics import fill50k_metrics
from controlnext.sd3_controlnext import ControlNetMMDiT, build_sd3_controlled
from controlnext.sd3_pipeline import FLOW_SAMPLERS, StableDiffusion3, load_sd3, text_to_image
from controlnext.selection import select_trainable
from schedulers.flow import flow_training_noise

RECIPE = ("sd3", "to_out")  # (injection preset, MMDiT selection) of the "auto" fields
FULL_WIDTH = 1536  # SD3-medium's MMDiT width, the smallest release: the G2 branch from there up, the tiny one below


def downsample(images: Tensor, factor: int) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, H/f, W/f) in [0, 1]: area (box-filter) downsampling, the low-res input."""
    return F.interpolate((images.float() + 1) / 2, scale_factor=1 / factor, mode="area")


def upsample(low: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, 3, h, w) in [0, 1] -> (B, 3, H, W) in [0, 1]: bicubic, clamped (bicubic overshoots at edges)."""
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def super_resolution_condition(images: Tensor, factor: int) -> Tensor:
    """The super-resolution control of target images (B, 3, H, W) in [-1, 1]: upsample(downsample(.)) in [0, 1]."""
    return upsample(downsample(images, factor), images.shape[-2:])


def psnr(images: Tensor, targets: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images against targets, both (B, 3, H, W) in [-1, 1], measured in [0, 1]."""
    mse = (((images.float().clamp(-1, 1) - targets) / 2) ** 2).mean().item()
    return float(-10 * np.log10(max(mse, 1e-12)))


def check_sd3(config: TrainConfig) -> None:
    """The settings an SD3 run cannot take, before the model is loaded (one ValueError naming the field)."""
    if config.sampler not in FLOW_SAMPLERS:
        raise ValueError(f"--sampler={config.sampler!r}: SD3 samples with the flow samplers "
                         f"{', '.join(FLOW_SAMPLERS)}")
    if config.cache_latents:
        raise ValueError("--cache_latents: not supported for SD3 (a prompt's context is 333 x 4096 values)")
    if config.loss_weight_control != 1.0:
        raise ValueError(f"--loss_weight_control={config.loss_weight_control}: not supported for SD3 (plain MSE)")
    if config.prediction_type:
        raise ValueError(f"--prediction_type={config.prediction_type!r}: SD3 predicts the flow velocity; leave it ''")
    if config.resolution % 16:
        raise ValueError(f"--resolution={config.resolution}: SD3 needs a multiple of 16 (VAE stride 8 x patch 2)")
    if config.control_source == "super_resolution" and (config.sr_factor < 2 or config.resolution % config.sr_factor):
        raise ValueError(f"--sr_factor={config.sr_factor}: must be at least 2 and divide --resolution="
                         f"{config.resolution}")
    if config.injection != "auto" and not INJECTIONS[config.injection].site.startswith("block_"):
        raise ValueError(f"--injection={config.injection!r} is a UNet preset; SD3 takes 'sd3' (or 'auto')")
    if config.control_site and not config.control_site.startswith("block_"):
        raise ValueError(f"--control_site={config.control_site!r} is a UNet site; SD3's are block_<k> (after joint "
                         "block k)")


class SD3Stage(nn.Module):
    """A control method (`--ablation`) on a frozen SD3 pipeline; trains it and the `--trainable` MMDiT tensors."""

    def __init__(self, config: TrainConfig, pipe: StableDiffusion3):
        super().__init__()
        injection, trainable = RECIPE
        branch = "g2" if pipe.config.mmdit.hidden >= FULL_WIDTH else "tiny"
        self.config = config = replace(config, injection=injection if config.injection == "auto" else config.injection,
                                       trainable=trainable if config.trainable == "auto" else config.trainable,
                                       branch=branch if config.branch == "auto" else config.branch)
        self.pipe = pipe.requires_grad_(False)
        self.model = build_sd3_controlled(config.ablation, pipe.mmdit, pipe.vae, BRANCHES[config.branch],
                                          injection_preset(config.injection, config.control_site))
        if isinstance(self.model, ControlNetMMDiT):  # the copy's switch; train.py sets the MMDiT's (pipe.unet)
            self.model.controlnet.gradient_checkpointing = config.gradient_checkpointing
        mmdit = select_trainable(pipe.mmdit, config.trainable)
        self.groups = {"control": self.model.control_parameters(), "mmdit": {f"mmdit.{n}": p for n, p in mmdit.items()}}

    def trainable(self) -> dict[str, nn.Parameter]:
        """Every trained tensor under the controlled model's key names (branch.*, patch_embed.*, controlnet.*,
        mmdit.*)."""
        return {**self.groups["control"], **self.groups["mmdit"]}

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.groups["control"].values()), "lr": self.config.control_lr},
                {"params": list(self.groups["mmdit"].values()), "lr": self.config.lr}]

    def export(self, run: Path, ema) -> Path | None:
        """Nothing beyond the run's checkpoints: they are the trained tensors (sample.py reads them)."""
        return None

    def compile_networks(self) -> None:
        """torch.compile the controlled MMDiT the step runs, in place (train.py --compile; names unchanged)."""
        self.model.compile()

    def condition(self, images: Tensor, controls: Tensor) -> Tensor:
        """The control of a batch (B, 3, H, W) in [0, 1]: the dataset's, or the targets' super-resolution input."""
        if self.config.control_source == "super_resolution":
            return super_resolution_condition(images, self.config.sr_factor)
        return controls

    def forward(self, batch: dict, generator: torch.Generator) -> Tensor:
        pipe = self.pipe
        device = next(pipe.mmdit.parameters()).device
        images = batch["image"].to(device)
        with torch.no_grad():  # the frozen VAE and text encoders; the noise is drawn on the CPU generator
            posterior, vae = pipe.vae.encode(images), pipe.vae.config
            eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
            x0 = vae.latent_scale * (posterior.mean + posterior.std * eps - vae.latent_shift)  # (B, 16, H/8, W/8)
            context, pooled = pipe.encode_prompt(batch["prompt"], self.config.clip_skip)
            control = self.condition(images, batch["control"].to(device))
        x_t, t, target = flow_training_noise(x0.float().cpu(), pipe.config.flow, generator=generator)
        pred = self.model(x_t.to(device), t.to(device), context, control, pooled, scale=self.config.control_scale)
        return (pred.float() - target.to(device)).square().mean()  # flow matching: MSE on v = eps - x0

    @torch.no_grad()
    def evaluate(self, evals: dict, generator: torch.Generator) -> tuple[dict, Tensor, Tensor]:
        """(fill50k metrics [+ PSNR for super-resolution], conditions, samples) on the held-out set."""
        c, r = self.config, self.config.resolution
        device = next(self.pipe.mmdit.parameters()).device
        condition = self.condition(evals["image"].to(device), evals["control"].to(device))
        images = text_to_image(self.pipe, evals["prompt"], [c.empty_prompt] * len(evals["prompt"]), height=r, width=r,
                               sampler=c.sampler, steps=c.sampling_steps, guidance_scale=c.guidance_scale,
                               generator=generator, controls=[(self.model, condition, c.control_scale)],
                               clip_skip=c.clip_skip).float().cpu()  # bf16/fp16 under autocast
        metrics = fill50k_metrics(images, evals["disc"], evals["circle_rgb"], evals["background_rgb"])
        if c.control_source == "super_resolution":  # the samples, and the upsampled input they should beat
            metrics |= {"psnr": psnr(images, evals["image"]), "psnr_input": psnr(condition.cpu() * 2 - 1, evals["image"])}
        return metrics, condition.cpu(), images


def build_sd3_stage(config: TrainConfig) -> SD3Stage:
    """Check the SD3-only settings, then load the pipeline (T5-less with --use_t5=False) and build the stage."""
    check_sd3(config)
    pipe = load_sd3(config.pretrained, config.tokenizer or None, config.t5_tokenizer or None, use_t5=config.use_t5)
    return SD3Stage(config, pipe)


# --- sample.py: the controls of an SD3 run, their conditions, the SD3 mode --------------------------------------------

@dataclass
class SD3Control:
    model: nn.Module          # a controlled model around pipe.mmdit (sd3_controlnext.build_sd3_controlled)
    scale: float              # the scale it was trained at (--control_scale overrides)
    resolution: int           # the run's training resolution
    control_source: str       # "dataset" or "super_resolution"
    sr_factor: int
    source: str


def load_sd3_control(path: str | Path, pipe: StableDiffusion3) -> SD3Control:
    """A train.py checkpoint of an SD3 run: the arm its config names, its trained tensors (branch, MMDiT subset)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"control file not found: {path}")
    meta = read_metadata(path)
    if "config" not in meta:
        raise ValueError(f"{path}: not a train.py checkpoint (no training config in its metadata); SD3 takes the "
                         "controls of SD3 runs only")
    config = cli.from_dict(TrainConfig, json.loads(meta["config"]))
    if config.stage != "control":
        raise ValueError(f"{path}: a {config.stage}-stage checkpoint, not a control")
    model = build_sd3_controlled(config.ablation, pipe.mmdit, pipe.vae, BRANCHES[config.branch],
                                 injection_preset(config.injection, config.control_site))
    select_trainable(pipe.mmdit, config.trainable)  # adds the LoRA modules a lora:R run trained, if any
    pipe.mmdit.requires_grad_(False)
    load_into(model, read_state(path), what=f"trained tensors from {path}", mode="partial")
    return SD3Control(model.eval(), config.control_scale, config.resolution, config.control_source, config.sr_factor,
                      str(path))


def sd3_condition(control: SD3Control, image: str | None, example: dict | None, size: tuple[int, int],
                  canny: bool) -> Tensor:
    """The condition (3, H, W) in [0, 1] for `control`: from an image file (super-resolution: the low-res image,
    resized to size / sr_factor, then upsampled), or from the procedural fill50k example (its ring, or its target
    brought down and up again)."""
    if image is None and example is None:
        raise ValueError("--control_image is needed for a non-square size (the fill50k examples are square)")
    if control.control_source == "super_resolution":
        if canny:
            raise ValueError("--canny: a super-resolution control takes the low-resolution image itself")
        if image is None:
            target = torch.from_numpy(example["target"]).permute(2, 0, 1).float()[None] / 127.5 - 1  # (1, 3, H, W)
            return super_resolution_condition(target, control.sr_factor)[0]
        low = load_image(Path(image), (size[0] // control.sr_factor, size[1] // control.sr_factor))  # (h, w, 3)
        return upsample(torch.from_numpy(low).permute(2, 0, 1).float()[None] / 255, size)[0]
    if image is None:
        return torch.from_numpy(np.ascontiguousarray(example["control"])).permute(2, 0, 1).float() / 255
    return condition_image(image, size, canny)


def sample_sd3(config) -> tuple[str, dict | None, Tensor, Tensor, int]:
    """sample.py's SD3 mode (issue 19; `config` a sample.SampleConfig): the flow pipeline, at most one control (a
    train.py run on an SD3 model: its arm, its condition kind), CFG; no LoRA or release UNet files (none exist for
    ControlNeXt-SD3). Returns what sample.save takes: (prompt, fill50k example or None, shown conditions
    (B, 3, H, W), images (B, 3, H, W), control count)."""
    for field in ("lora", "unet_weights"):
        if getattr(config, field):
            raise ValueError(f"--{field}: not supported for SD3 models")
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
    result = text_to_image(pipe, [prompt] * config.batch, [config.negative_prompt] * config.batch, height=height,
                           width=width, sampler=config.sampler, steps=config.steps,
                           guidance_scale=config.guidance_scale, controls=controls,
                           generator=torch.Generator().manual_seed(config.seed), clip_skip=config.clip_skip,
                           control_window=(config.control_start, config.control_end))
    return prompt, example, shown, result, len(controls)
