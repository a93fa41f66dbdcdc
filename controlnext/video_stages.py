"""The ControlNeXt-SVD-v2 training step (train.py's stage when --pretrained is an SVD model), its data and evaluation.

Paper: Peng et al. 2024, ControlNeXt (arXiv 2408.06070) §3-4: SVD driven by a pose video, the reference frame as
SVD's conditioning image, the control branch and the whole UNet trained. The step is the official trainer's,
dvlab-research/ControlNeXt@ab4b3ac ControlNeXt-SVD-v2-Training/train_svd.py (../shared/reference/controlnext.md §4.3):
  - x0 = VAE posterior sample of every frame x 0.18215; the reference frame gives the CLIP embedding of the clean
    frame and the VAE sample latents of frame + noise_aug * randn, unscaled, repeated over the frames and
    concatenated on channels (controlnext/svd_pipeline.py encode_reference);
  - one sigma per clip from k-diffusion's rand_cosine_interpolated on stratified u (schedulers/training.py),
    x = x0 + sigma eps; the UNet sees c_in x and c_noise = ln(sigma) / 4, and so does the branch;
  - D = c_skip x + c_out v (EDM with sigma_data = 1); loss = mean_B(lambda(sigma) mean_{F,C,h,w}(w (D - x0)^2)),
    lambda = (1 + sigma^2) / sigma^2, w the hand-region weight of the data (4.2 on confident hands, 1 elsewhere)
    average-pooled to the latent grid;
  - conditioning dropout, r ~ U(0, 1) per clip: r < 2p zeroes the image embedding, p <= r < 3p the reference
    latents; the control is never dropped;
  - added ids [fps_id 6, motion bucket 127, noise_aug 0.02]; injection svd_v2 (after down block 0, CN eps 1e-5,
    CN then pool, k = 0.2 x --control_scale); trainable: the branch and the whole UNet (official) or a selection.
Data (controlnext/video_data.py): VideoClips (the official meta_info layout, or clip folders) or MovingFill50k (the
toy); --video_buckets trains clips of mixed sizes at the bucket nearest each one's aspect ratio, one bucket a step. Evaluation: held-out toy clips sampled by svd_pipeline.image_to_video, scored by the disc IoU of the generated
frames 1..F-1 (frame 0 is the reference). Added on top by train.py: warmup, clipping, EMA, fp32 master weights,
DDP or FSDP. The UNet is called with the control hook directly (not through ControlNeXtUNet.forward) so that
--frame_chunk reaches it; the hook is controlnext/sampling.py summed_controls, the method's one-branch form.
Left out: the official EMA (stepped with the wrong parameters,
controlnext.md §8 item 11), the ControlNet baseline arm on SVD (controlnext/controlnet.py is built for the SD UNets).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from controlnext.config import TrainConfig
from controlnext.control_branch import PRESETS as BRANCHES
from controlnext.controlnext import build_controlled_unet, injection_preset
from controlnext.runs import step_generator
from controlnext.sampling import summed_controls
from controlnext.selection import select_trainable
from controlnext.svd_pipeline import StableVideoDiffusion, image_to_video
from controlnext.video_data import MovingFill50k, VideoClips, step_bucket, video_iou
from schedulers.training import svd_training_noise
from unet.svd_unet import svd_added_time_ids

RECIPE = ("svd_v2", "all")  # the official SVD-v2 trainer: (injection preset, UNet selection) (controlnext.md §3)
RELEASED_WIDTH = 320  # channels[0] of the released SVD UNets: the official G2 branch fits it
CLIP_KEYS = ("frames", "reference", "control", "loss_weight")  # what a training batch holds, stacked over clips


class VideoStage(nn.Module):
    """A ControlNeXt arm on an SVD pipeline; trains the branch and the `--trainable` UNet tensors (default: all)."""

    def __init__(self, config: TrainConfig, pipe: StableVideoDiffusion):
        super().__init__()
        if config.ablation == "controlnet":
            raise ValueError("--ablation=controlnet: the ControlNet baseline is built for the SD UNets; an SVD model "
                             "trains the ControlNeXt arms (cross_norm, zero_conv, no_norm, paper_norm)")
        width = pipe.config.unet.channels[0]
        injection, trainable = RECIPE
        self.config = config = replace(config, injection=injection if config.injection == "auto" else config.injection,
                                       trainable=trainable if config.trainable == "auto" else config.trainable,
                                       branch=("g2" if width == RELEASED_WIDTH else "tiny") if config.branch == "auto"
                                       else config.branch)
        self.pipe = pipe.requires_grad_(False)
        branch = BRANCHES[config.branch]
        if config.branch == "tiny":
            branch = replace(branch, out_channels=width)  # a small branch follows a small UNet's width
        self.model = build_controlled_unet(config.ablation, pipe.unet, branch,
                                           injection_preset(config.injection, config.control_site))
        select_trainable(pipe.unet, config.trainable)

    def trainable(self) -> dict[str, nn.Parameter]:
        """Every trained tensor under the controlled model's names (branch.*, unet.*), read afresh: FSDP replaces
        the parameters by their shards."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def compile_networks(self) -> None:
        """torch.compile the controlled video UNet the step runs, in place (train.py --compile; names unchanged)."""
        self.model.compile()

    def param_groups(self) -> list[dict]:
        params = self.trainable()
        return [{"params": [p for n, p in params.items() if not n.startswith("unet.")], "lr": self.config.control_lr},
                {"params": [p for n, p in params.items() if n.startswith("unet.")], "lr": self.config.lr}]

    def export(self, run: Path, ema) -> Path | None:
        """Nothing beyond the run's checkpoints: they are the trained tensors (sample.py reads them)."""
        return None

    def conditions(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(x0 (B, F, Z, h, w) scaled latents, image embedding (B, 1, D), reference latents (B, Z, h, w)) of a batch,
        through the frozen VAE and image tower; every draw on the CPU generator."""
        pipe = self.pipe
        device = next(pipe.unet.parameters()).device
        frames = batch["frames"].to(device)  # (B, F, 3, H, W) in [-1, 1]
        with torch.no_grad():
            posterior = pipe.vae.encode(frames.flatten(0, 1))
            eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
            x0 = pipe.vae.config.latent_scale * (posterior.mean + posterior.std * eps)  # (B*F, Z, h, w)
            embedding, reference = pipe.encode_reference(batch["reference"].to(device), self.config.noise_aug,
                                                         generator, sample=True)
        return x0.unflatten(0, frames.shape[:2]), embedding, reference

    def forward(self, batch: dict, generator: torch.Generator) -> Tensor:
        c = self.config
        x0, embedding, reference = self.conditions(batch, generator)
        B, num_frames, device = x0.shape[0], x0.shape[1], x0.device
        x, sigma, weight = (t.to(device) for t in svd_training_noise(x0.float().cpu(), generator=generator))
        r = torch.rand(B, generator=generator).to(device)  # conditioning dropout, one draw per clip
        p = c.conditioning_dropout
        embedding = torch.where((r < 2 * p).view(B, 1, 1), 0.0, embedding)
        reference = torch.where(((r >= p) & (r < 3 * p)).view(B, 1, 1, 1), 0.0, reference)
        s = sigma.view(B, 1, 1, 1, 1)
        x_in = torch.cat([x / (s**2 + 1).sqrt(), reference[:, None].expand(-1, num_frames, -1, -1, -1)], dim=2)
        c_noise = 0.25 * sigma.log()  # (B,): the UNet's and the branch's time input
        ids = svd_added_time_ids(c.fps_id, c.motion_bucket_id, c.noise_aug, B).to(device)
        features = self.model.features(self.model.prepare(batch["control"].to(device)), c_noise)  # (B*F, C, h', w')
        hook = summed_controls([(self.model, features, c.control_scale)], num_frames)
        v = self.pipe.unet(x_in.to(x0.dtype), c_noise, embedding, ids, num_frames=num_frames, control=hook,
                           frame_chunk=c.frame_chunk or None)  # (B, F, Z, h, w)
        denoised = x / (s**2 + 1) - s / (s**2 + 1).sqrt() * v.float()  # c_skip x + c_out v
        hands = F.adaptive_avg_pool2d(batch["loss_weight"].flatten(0, 1).to(device), x0.shape[-2:])  # (B*F, 1, h, w)
        err = (denoised - x0.float()).square() * hands.unflatten(0, (B, num_frames))  # (B, F, Z, h, w)
        return (weight * err.flatten(1).mean(dim=1)).mean()

    @torch.no_grad()
    def evaluate(self, evals: dict, generator: torch.Generator) -> tuple[dict, Tensor, Tensor]:
        """(toy metrics, pose frames, generated frames) on the held-out clips, at the training control scale; the
        grid shows the frames of the first two clips."""
        c = self.config
        videos = image_to_video(self.pipe, evals["reference"], num_frames=evals["control"].shape[1],
                                steps=c.sampling_steps, guidance=(c.guidance_scale, c.guidance_scale),
                                fps_id=c.fps_id, motion_bucket_id=c.motion_bucket_id, noise_aug=c.noise_aug,
                                generator=generator, controls=[(self.model, evals["control"], c.control_scale)],
                                frame_chunk=c.frame_chunk or None).cpu()  # (N, F, 3, H, W)
        ious = torch.stack([video_iou(v, discs, inner, outer) for v, discs, inner, outer in
                            zip(videos, evals["discs"], evals["circle_rgb"], evals["background_rgb"])])  # (N, F)
        metrics = {"iou": ious[:, 1:].mean().item(), "iou_reference_frame": ious[:, 0].mean().item()}
        return metrics, evals["control"][:2].flatten(0, 1)[:16], videos[:2].flatten(0, 1)[:16]


# --- data -------------------------------------------------------------------------------------------------------------

def video_dataset(config: TrainConfig) -> MovingFill50k | VideoClips:
    """--dataset=fill50k: the moving-disc toy (square clips); else a meta_info .json or a folder of clip folders."""
    if config.dataset == "fill50k":
        if config.video_width != config.video_height:
            raise ValueError(f"--dataset=fill50k: the moving-disc toy is square, got --video_width="
                             f"{config.video_width} and --video_height={config.video_height}")
        return MovingFill50k(config.video_width, config.num_frames, seed=config.dataset_seed)
    return VideoClips.from_path(config.dataset, width=config.video_width, height=config.video_height,
                                num_frames=config.num_frames, interval=config.frame_interval,
                                buckets=config.video_buckets)


def video_eval_set(config: TrainConfig) -> dict:
    """The fixed held-out toy clips (seed eval_seed), at the training clip's shorter side."""
    toy = MovingFill50k(min(config.video_width, config.video_height), config.num_frames, seed=config.eval_seed)
    clips = [toy[i] for i in range(config.eval_count)]
    return {"reference": torch.stack([clip["reference"] for clip in clips]),
            "control": torch.stack([clip["control"] for clip in clips]),
            "discs": torch.stack([clip["discs"] for clip in clips]),
            "circle_rgb": [clip["circle_rgb"] for clip in clips],
            "background_rgb": [clip["background_rgb"] for clip in clips]}


def video_batch(dataset, config: TrainConfig, step: int, micro: int) -> tuple[torch.Generator, dict]:
    """Micro-batch `micro` of `step`: clips drawn and sampled from (seed, step, micro) only (exact resume, DDP).
    With --video_buckets every micro-batch of the step, on every rank, draws from the one bucket step_bucket picks
    from (seed, step), uniformly with replacement (a bucket smaller than the batch repeats clips)."""
    g = step_generator(config.seed, step, micro)
    if config.video_buckets:
        members = dataset.members()
        bucket = members[step_bucket([len(m) for m in members], config.seed, step)]  # clip indices
        index = [bucket[i] for i in torch.randint(len(bucket), (config.batch_size,), generator=g).tolist()]
    else:
        index = torch.randint(len(dataset), (config.batch_size,), generator=g).tolist()
    clips = [dataset.sample(i, g) for i in index]
    return g, {key: torch.stack([clip[key] for clip in clips]) for key in CLIP_KEYS}


def video_data(config: TrainConfig) -> tuple[object, dict, object]:
    """(dataset, held-out set, batch function) of the video stage: what train.py's data section needs. With
    --video_buckets the clips are assigned to buckets now, so that an unreadable clip stops the run before it writes."""
    dataset = video_dataset(config)
    if config.video_buckets:
        dataset.members()
    return dataset, video_eval_set(config), video_batch
