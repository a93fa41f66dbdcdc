"""What one training step computes, per `--stage`: the model, its trainable tensors, the loss, and the evaluation.

Each stage is an nn.Module whose forward(batch, generator) returns the loss, so train.py runs every stage with the
same loop and torch's DistributedDataParallel wraps it as is (only the tensors with requires_grad are registered).
- ControlStage: ControlNeXt, or another `--ablation` arm, on a frozen Stable Diffusion (SD1.x/SD2.x/SDXL): the
  official SD1.5/SDXL step (../shared/reference/controlnext.md §4.1-4.2): VAE latents (posterior sample x scale),
  CLIP text conditioning (+ SDXL's pooled text and size/crop vector), DDPM noise with uniform t, MSE on eps or v.
- BaseStage: the UNet and text encoder of a small SD pipeline from scratch on a trained VAE (prompt only): how the
  miniature SD1.5 that the main job runs on was made.
- VAEStage: the autoencoder from scratch: L1 reconstruction + kl_weight * KL (Rombach et al. 2022 §3.1, App. G; the
  LDM configs' perceptual LPIPS and patch-GAN terms are left out: they need a downloaded VGG, and fill50k's flat colours
  and one edge reconstruct without them).
Evaluation (rank 0): the fixed held-out fill50k set sampled through the whole pipeline and decoded by the VAE,
scored with controlnext/metrics.py. `--cache_latents`: folder datasets are encoded once (VAE posterior moments and
text embeddings, on disk in the run folder); the posterior is still sampled at every step, so the loss is unchanged.
SD3 models train through controlnext/sd3_stages.py, SVD ones through controlnext/video_stages.py's VideoStage
(ControlNeXt-SVD-v2): build_stage dispatches.
Left out: aspect-ratio buckets (images are centre-cropped to a square).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from controlnext.checkpoint import read_state, save_state
from controlnext.config import TrainConfig
from controlnext.control_branch import branch_for
from controlnext.data import Fill50k, fill50k_example, fill50k_tokenizer
from controlnext.controlnet import ControlNetUNet
from controlnext.controlnext import (ControlNeXtUNet, align, build_controlled_unet, injection_preset, run_unet,
                                     site_width)
from controlnext.metrics import fill50k_metrics
from controlnext.sd3_pipeline import is_sd3  # SD3 dispatch (issue 19)
from controlnext.sd3_stages import build_sd3_stage  # SD3 dispatch (issue 19)
from controlnext.sd_pipeline import PRESETS as MODELS, StableDiffusion, load_sd, text_to_image
from controlnext.selection import select_trainable
from controlnext.svd_pipeline import is_svd, load_svd
from controlnext.video_stages import VideoStage
from schedulers.sigmas import make_alphas_cumprod
from schedulers.training import min_snr_weight, sd_training_noise

# The official recipe of each family: (injection preset, UNet selection) (controlnext.md §3, §4.1-4.2).
RECIPES = {"sd1": ("sd15_train", "to_out"), "sd2": ("sd15_train", "to_out"), "sdxl": ("sdxl", "attn2_to_out")}
RELEASED_WIDTH = 320  # channels[0] of every released SD UNet: the official G2 branch fits it


def eval_set(config: TrainConfig) -> dict:
    """The fixed held-out fill50k examples (seed eval_seed, never trained on) as tensors and metric inputs."""
    examples = [fill50k_example(i, config.resolution, config.eval_seed) for i in range(config.eval_count)]
    to = lambda key, scale, shift: torch.stack([torch.from_numpy(e[key]).permute(2, 0, 1).float() for e in examples]) \
        / scale - shift  # noqa: E731
    return {"prompt": [e["prompt"] for e in examples], "control": to("control", 255.0, 0.0),
            "image": to("target", 127.5, 1.0), "disc": torch.from_numpy(np.stack([e["disc"] for e in examples])),
            "circle_rgb": [e["circle_rgb"] for e in examples], "background_rgb": [e["background_rgb"] for e in examples]}


def sample_latents(pipe: StableDiffusion, images: Tensor, generator: torch.Generator) -> Tensor:
    """VAE posterior sample x scale (the trainers' latents), in fp32 whatever the VAE's dtype (it runs in bf16/fp16
    under mixed precision); the noise is drawn on the CPU generator."""
    posterior = pipe.vae.encode(images)
    mean, std = posterior.mean.float(), posterior.std.float()
    eps = torch.randn(mean.shape, generator=generator).to(mean)
    return pipe.vae.config.latent_scale * (mean + std * eps)  # (B, 4, H/8, W/8)


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Mixed precision: every frozen floating-point parameter stored in the compute dtype, the trainable ones kept in
    fp32 (the optimizer's master weights). Autocast casts each weight at every use otherwise, and the frozen UNet, VAE
    and text towers take half the memory. Everything that runs them afterwards must run under autocast."""
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def loss_weight_map(control: Tensor, weight: float, factor: int) -> Tensor | None:
    """w = 1 + (weight - 1) * [control lit], average-pooled to the latent grid, as the official SVD trainer weights
    its hand boxes (controlnext.md §4.3: 1 + 4 * 0.8 = 4.2 on hands). (B, 3, H, W) -> (B, 1, H/f, W/f) or None."""
    if weight == 1.0:
        return None
    mask = (control.amax(dim=1, keepdim=True) > 0.5).float()  # (B, 1, H, W)
    return F.avg_pool2d(1 + (weight - 1) * mask, factor)  # (B, 1, H/f, W/f)


def weighted_mean(err: Tensor, t: Tensor, alphas_cumprod: Tensor, config: TrainConfig, prediction_type: str) -> Tensor:
    """The batch loss: the mean squared error, per sample weighted by Min-SNR-gamma when --snr_gamma is set."""
    if not config.snr_gamma:
        return err.mean()
    w = min_snr_weight(t.cpu(), alphas_cumprod.cpu(), config.snr_gamma, prediction_type).to(err.device)  # (B,)
    return (err.flatten(1).mean(1) * w).mean()


class LatentCache:
    """VAE posterior moments and text embeddings of every item of a dataset, computed once and kept on disk."""

    def __init__(self, path: Path, tensors: dict[str, Tensor]):
        self.path, self.tensors = path, tensors

    @classmethod
    @torch.no_grad()
    def build(cls, pipe: StableDiffusion, dataset, path: Path, empty_prompt: str, clip_skip: int,
              batch_size: int = 16) -> LatentCache:
        if path.is_file():
            return cls(path, read_state(path))
        device = next(pipe.parameters()).device
        means, stds, contexts, pooled = [], [], [], []
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            posterior = pipe.vae.encode(torch.stack([it["image"] for it in items]).to(device))
            context, pool = pipe.encode_prompt([it["prompt"] for it in items], clip_skip)
            means.append(posterior.mean.cpu()), stds.append(posterior.std.cpu()), contexts.append(context.cpu())
            pooled.append(pool.cpu() if pool is not None else torch.zeros(len(items), 0))
        empty, empty_pooled = pipe.encode_prompt([empty_prompt], clip_skip)
        tensors = {"mean": torch.cat(means), "std": torch.cat(stds), "context": torch.cat(contexts),
                   "pooled": torch.cat(pooled), "empty_context": empty.cpu(),
                   "empty_pooled": empty_pooled.cpu() if empty_pooled is not None else torch.zeros(1, 0)}
        save_state(tensors, path)
        return cls(path, tensors)


class ControlStage(nn.Module):
    """A control method (`--ablation`) on a frozen SD pipeline; trains the branch and the `--trainable` UNet tensors."""

    def __init__(self, config: TrainConfig, pipe: StableDiffusion):
        super().__init__()
        family = pipe.config.family
        injection, trainable = RECIPES[family]
        width = pipe.config.unet.channels[0]
        branch = "g2" if width == RELEASED_WIDTH else "tiny"
        self.config = config = replace(config, injection=injection if config.injection == "auto" else config.injection,
                                       trainable=trainable if config.trainable == "auto" else config.trainable,
                                       branch=branch if config.branch == "auto" else config.branch)
        self.pipe = pipe.requires_grad_(False)
        injection = injection_preset(config.injection, config.control_site)
        branch_config = branch_for(config.branch, site_width(pipe.config.unet, injection))
        self.model = build_controlled_unet(config.ablation, pipe.unet, branch_config, injection)
        if isinstance(self.model, ControlNetUNet):  # the encoder copy recomputes its blocks too, as diffusers' does
            self.model.controlnet.gradient_checkpointing = config.gradient_checkpointing
        unet = select_trainable(pipe.unet, config.trainable)
        self.groups = {"control": self.model.control_parameters(), "unet": {f"unet.{n}": p for n, p in unet.items()}}
        self.alphas_cumprod = make_alphas_cumprod(pipe.config.schedule)
        self.cache: LatentCache | None = None

    def trainable(self) -> dict[str, nn.Parameter]:
        """Every trained tensor under the controlled model's key names (branch.*, zero_conv.*, unet.*)."""
        return {**self.groups["control"], **self.groups["unet"]}

    def export(self, run: Path, ema) -> Path | None:
        """Nothing beyond the run's checkpoints: they are the trained tensors (sample.py and export read them)."""
        return None

    def compile_networks(self) -> None:
        """torch.compile the controlled UNet the step runs (branch + UNet + injection as one graph), in place: the
        parameter names, and so the checkpoints, are unchanged. Evaluation samples through the eager modules."""
        self.model.compile()

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.groups["control"].values()), "lr": self.config.control_lr},
                {"params": list(self.groups["unet"].values()), "lr": self.config.lr}]

    def conditions(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x0 latents, context, y) of a batch: from the latent cache, or through the frozen VAE and text encoder."""
        pipe, device, r = self.pipe, self.alphas_cumprod.device, self.config.resolution
        with torch.no_grad():
            if self.cache is None:
                x0 = sample_latents(pipe, batch["image"].to(next(pipe.vae.parameters()).device), generator)
                context, pooled = pipe.encode_prompt(batch["prompt"], self.config.clip_skip)
            else:
                c, idx, empty = self.cache.tensors, batch["index"], batch["dropped"]
                eps = torch.randn(c["mean"][idx].shape, generator=generator)
                x0 = pipe.vae.config.latent_scale * (c["mean"][idx] + c["std"][idx] * eps)
                context = torch.where(empty[:, None, None], c["empty_context"], c["context"][idx])
                pooled = torch.where(empty[:, None], c["empty_pooled"], c["pooled"][idx])
                pooled = pooled if pooled.shape[1] else None
        return x0.to(device), context.to(device), pipe.vector(pooled, (r, r))

    def forward(self, batch: dict, generator: torch.Generator) -> Tensor:
        x0, context, y = self.conditions(batch, generator)
        x_t, t, target = sd_training_noise(x0.cpu(), self.alphas_cumprod.cpu(), self.pipe.config.schedule.prediction_type,
                                           generator=generator, noise_offset=self.config.noise_offset)
        device = x0.device
        pred = self.model(x_t.to(device), t.to(device), context, batch["control"].to(device),
                          y=None if y is None else y.to(device), scale=self.config.control_scale)
        err = (pred.float() - target.to(device)).square()  # (B, 4, h, w)
        weight = loss_weight_map(batch["control"], self.config.loss_weight_control, 8)
        return weighted_mean(err if weight is None else err * weight.to(device), t, self.alphas_cumprod, self.config,
                             self.pipe.config.schedule.prediction_type)

    @torch.no_grad()
    def diagnostics(self, batch: dict, generator: torch.Generator) -> dict[str, float]:
        """What the control does at the site, on a training batch (issue 18): the size of the added term relative to h,
        ||k CN(h, c)|| / ||h||, and its direction, cos(k CN(h, c), h), per-sample means. h is taken from an uncontrolled
        pass (equal to the controlled one up to the site). {} for the ControlNet arm (no single site)."""
        if not isinstance(self.model, ControlNeXtUNet):
            return {}
        x0, context, y = self.conditions(batch, generator)
        x_t, t, _ = sd_training_noise(x0.cpu(), self.alphas_cumprod.cpu(), self.pipe.config.schedule.prediction_type,
                                      generator=generator)
        x_t, t, site, seen = x_t.to(x0.device), t.to(x0.device), self.model.injection.site, {}
        run_unet(self.pipe.unet, x_t, t, context, y, lambda s, h: seen.setdefault(s, h))  # observe only
        h = seen[site].flatten(1)  # (B, C*h*w)
        c = self.model.features(self.model.prepare(batch["control"].to(x0.device)), t)
        term = (self.model.strength(self.config.control_scale) * align(seen[site], c, self.model.injection)).flatten(1)
        return {"term_ratio": (term.norm(dim=1) / h.norm(dim=1)).mean().item(),
                "term_cosine": F.cosine_similarity(term, h, dim=1).mean().item()}

    @torch.no_grad()
    def evaluate(self, evals: dict, generator: torch.Generator) -> tuple[dict, Tensor, Tensor]:
        """(fill50k metrics, conditions, samples) on the held-out set, at the training control scale."""
        c, r = self.config, self.config.resolution
        images = text_to_image(self.pipe, evals["prompt"], [c.empty_prompt] * len(evals["prompt"]), height=r, width=r,
                               sampler=c.sampler, steps=c.sampling_steps, guidance_scale=c.guidance_scale,
                               generator=generator, controls=[(self.model, evals["control"], c.control_scale)],
                               clip_skip=c.clip_skip).float().cpu()
        metrics = fill50k_metrics(images, evals["disc"], evals["circle_rgb"], evals["background_rgb"])
        return metrics, evals["control"], images


def export_pipeline(stage: nn.Module, run: Path, ema) -> Path:
    """The trained pipeline (EMA weights when kept) as one original-layout single file, fp16 as SD files ship."""
    if ema is not None:
        with torch.no_grad():
            for name, p in stage.trainable().items():
                p.copy_(ema.shadow[name])
    path = run / "model.safetensors"
    stage.pipe.save(path, layout="original", dtype=torch.float16)
    return path


class BaseStage(nn.Module):
    """The UNet and text encoder(s) of a small SD pipeline from scratch, on a trained (frozen) VAE, prompt only."""

    def __init__(self, config: TrainConfig, pipe: StableDiffusion):
        super().__init__()
        self.config, self.pipe = config, pipe
        pipe.vae.requires_grad_(False)
        self.groups = {"all": {n: p for n, p in pipe.named_parameters() if not n.startswith("vae.")}}
        self.alphas_cumprod = make_alphas_cumprod(pipe.config.schedule)

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.groups["all"]

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.groups["all"].values()), "lr": self.config.lr}]

    def export(self, run: Path, ema) -> Path:
        return export_pipeline(self, run, ema)

    def compile_networks(self) -> None:
        """torch.compile the UNet and the text tower(s) in place (evaluation samples through them too)."""
        self.pipe.unet.compile()
        for tower in self.pipe.text_encoders:
            tower.compile()

    def diagnostics(self, batch: dict, generator: torch.Generator) -> dict[str, float]:
        return {}

    def forward(self, batch: dict, generator: torch.Generator) -> Tensor:
        pipe, device = self.pipe, self.alphas_cumprod.device
        with torch.no_grad():
            x0 = sample_latents(pipe, batch["image"].to(device), generator)
        context, _ = pipe.encode_prompt(batch["prompt"], self.config.clip_skip)  # with gradients: the tower trains
        x_t, t, target = sd_training_noise(x0.cpu(), self.alphas_cumprod.cpu(), pipe.config.schedule.prediction_type,
                                           generator=generator, noise_offset=self.config.noise_offset)
        pred = pipe.unet(x_t.to(device), t.to(device), context)
        return weighted_mean((pred.float() - target.to(device)).square(), t, self.alphas_cumprod, self.config,
                             pipe.config.schedule.prediction_type)

    @torch.no_grad()
    def evaluate(self, evals: dict, generator: torch.Generator) -> tuple[dict, Tensor, Tensor]:
        """Prompt-only samples: colours should be right, circle placement at chance (IoU against the held-out disc)."""
        c, r = self.config, self.config.resolution
        images = text_to_image(self.pipe, evals["prompt"], [c.empty_prompt] * len(evals["prompt"]), height=r, width=r,
                               sampler=c.sampler, steps=c.sampling_steps, guidance_scale=c.guidance_scale,
                               generator=generator).float().cpu()
        metrics = fill50k_metrics(images, evals["disc"], evals["circle_rgb"], evals["background_rgb"])
        return metrics, evals["control"], images


class VAEStage(nn.Module):
    """The autoencoder from scratch: L1 reconstruction of the posterior sample + kl_weight * KL per pixel."""

    def __init__(self, config: TrainConfig, pipe: StableDiffusion):
        super().__init__()
        self.config, self.pipe = config, pipe
        self.groups = {"all": {f"vae.{n}": p for n, p in pipe.vae.named_parameters()}}

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.groups["all"]

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.groups["all"].values()), "lr": self.config.lr}]

    def compile_networks(self) -> None:
        """torch.compile the encoder's and decoder's blocks in place (encode / decode call their parts, not their
        forward), where a VAE step spends its time."""
        vae = self.pipe.vae
        for block in [*vae.encoder.down_blocks, vae.encoder.mid_block, vae.decoder.mid_block, *vae.decoder.up_blocks]:
            block.compile()

    def diagnostics(self, batch: dict, generator: torch.Generator) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def export(self, run: Path, ema) -> Path:
        """Sets the latent scale to 1 / std of the training latents first (LDM's scale_by_std: the UNet then sees unit
        variance; SD's 0.18215 was computed so), on 256 examples of the training stream."""
        if ema is not None:
            for name, p in self.trainable().items():
                p.copy_(ema.shadow[name])
        dataset = Fill50k(self.config.resolution, seed=self.config.dataset_seed)
        images = torch.stack([dataset[i]["image"] for i in range(256)]).to(next(self.pipe.vae.parameters()).device)
        posterior = self.pipe.vae.encode(images)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
        vae_config = replace(self.pipe.config.vae, latent_scale=round(1.0 / z.std().item(), 5))
        self.pipe.vae.config, self.pipe.config = vae_config, replace(self.pipe.config, vae=vae_config)
        return export_pipeline(self, run, None)

    def forward(self, batch: dict, generator: torch.Generator) -> Tensor:
        images = batch["image"].to(next(self.pipe.vae.parameters()).device)
        posterior = self.pipe.vae.encode(images)
        eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        recon = self.pipe.vae.decode(posterior.mean + posterior.std * eps)
        kl = posterior.kl().mean() / images[0].numel()  # per pixel, as the L1 term
        return (recon.float() - images).abs().mean() + self.config.kl_weight * kl

    @torch.no_grad()
    def evaluate(self, evals: dict, generator: torch.Generator) -> tuple[dict, Tensor, Tensor]:
        """Reconstruction of the held-out images through the posterior mode: MSE and PSNR in [0, 1], palette error."""
        images = evals["image"].to(next(self.pipe.vae.parameters()).device)
        recon = self.pipe.vae(images).float().cpu()
        mse = (((recon.clamp(-1, 1) - evals["image"]) / 2) ** 2).mean().item()
        metrics = {"recon_mse": mse, "psnr": -10 * np.log10(max(mse, 1e-12)),
                   **fill50k_metrics(recon, evals["disc"], evals["circle_rgb"], evals["background_rgb"])}
        return metrics, (evals["image"] + 1) / 2, recon


STAGE_CLASSES = {"control": ControlStage, "base": BaseStage, "vae": VAEStage}


def build_stage(config: TrainConfig) -> nn.Module:
    """The stage's module with its pipeline: loaded (control), or built from the `model` preset (base, vae)."""
    if config.stage == "control" and is_sd3(config.pretrained):  # SD3 models: their own stage (issue 19)
        return build_sd3_stage(config)
    if config.control_source != "dataset":  # SD3 dispatch (issue 19): the other stages read the dataset's controls
        raise ValueError(f"--control_source={config.control_source!r}: implemented for SD3 models only")
    if config.stage == "control" and is_svd(config.pretrained):  # video (SVD): ControlNeXt-SVD-v2, video_stages.py
        return VideoStage(config, load_svd(config.pretrained, eps_layout=config.eps_layout))
    if config.stage == "control":
        pipe = load_sd(config.pretrained, config.tokenizer or None, prediction_type=config.prediction_type)
    else:
        preset = MODELS[config.model]
        if config.stage == "base":  # on the trained VAE of a vae-stage run (its calibrated latent scale included)
            vae = load_sd(config.pretrained).vae
            preset = replace(preset, vae=vae.config)
        pipe = StableDiffusion.random(preset, fill50k_tokenizer())
        if config.stage == "base":
            pipe.vae = vae
    return STAGE_CLASSES[config.stage](config, pipe)
