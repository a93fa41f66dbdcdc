"""The spatio-temporal UNet of Stable Video Diffusion (SVD, SVD-XT), with a control hook and ControlNet residuals.

Paper: Blattmann et al. 2023, "Stable Video Diffusion" §3-4 (the video LDM of Blattmann et al. 2023, "Align your
Latents" §3.1: temporal layers interleaved with the frozen image layers and mixed in by learned factors alpha).
Reference: Stability-AI/generative-models@0ad7de9:sgm/modules/diffusionmodules/video_model.py (VideoUNet,
VideoResBlock) and sgm/modules/video_attention.py (SpatialVideoTransformer, VideoTransformerBlock). Module names
equal huggingface/diffusers@v0.42.1 UNetSpatioTemporalConditionModel, so diffusers weights load by identity;
unet/keymap.py maps the original single file. Numerics follow the ORIGINAL by default: every ResBlock GroupNorm,
spatial and temporal, uses eps 1e-5, where diffusers uses 1e-6 in the cross-attention down blocks and all up blocks
(../shared/reference/checkpoints.md §3.5, §12.1); `eps_layout="diffusers"` builds diffusers' layout, on which the
official ControlNeXt-SVD releases were trained. The spatial blocks are imported from unet/blocks.py, the skeleton
(embeddings, skip/hook/residual loop) is unet/sd_unet.py's UNetBody.
Frames are folded into the batch, (B*F, C, H, W), between the layers; (B, F, C, H, W) at the model boundary.
ControlNeXt-SVD (Peng et al. 2024 §3.2) injects through the `control` hook: v2 at "down_0", v1 at "mid_in".
Left out: the image-only training mode's data path (the indicator is honoured, not produced), the "fixed" merge
strategy and temporal up/downsampling (unused by SVD), zero-initialisation (SVD is always loaded from weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unet.blocks import (Downsample, FeedForward, ResBlock, SpatialTransformer, TimestepMLP, TransformerBlock, Upsample,
                         timestep_embedding)
from unet.sd_unet import ControlHook, UNetBody


def chunked(fn: Callable[..., Tensor], chunks: int, *tensors: Tensor) -> Tensor:
    """fn over `chunks` slices of the tensors along dim 0, concatenated. Exact wherever rows are independent."""
    if chunks <= 1:
        return fn(*tensors)
    return torch.cat([fn(*parts) for parts in zip(*(t.chunk(chunks) for t in tensors))])


class AlphaBlender(nn.Module):
    """out = alpha * spatial + (1 - alpha) * temporal, alpha = sigmoid(mix_factor) ("learned_with_images").

    Frames flagged in `image_only` (B, F) get alpha = 1: the temporal path is switched off for them.
    """

    def __init__(self, merge_factor: float):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.full((1,), merge_factor))  # SGM merge_factor 0.5 before training

    def forward(self, x_spatial: Tensor, x_temporal: Tensor, image_only: Tensor) -> Tensor:
        alpha = torch.where(image_only.bool(), 1.0, torch.sigmoid(self.mix_factor))  # (B, F)
        alpha = alpha.flatten().to(x_spatial.dtype).view(-1, *[1] * (x_spatial.ndim - 1))  # (B*F, 1, ...) per row
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class TemporalResBlock(nn.Module):
    """ResBlock over time: GN over (C/g, F, H, W), Conv3d with kernel (k, 1, 1), no shortcut. (B, C, F, H, W) -> same."""

    def __init__(self, channels: int, emb_dim: int, kernel: int, groups: int, eps: float):
        super().__init__()
        conv = lambda: nn.Conv3d(channels, channels, (kernel, 1, 1), padding=(kernel // 2, 0, 0))  # noqa: E731
        self.norm1 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv1 = conv()
        self.time_emb_proj = nn.Linear(emb_dim, channels)
        self.norm2 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv2 = conv()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # the norm statistics span all frames of a video
        h = h + self.time_emb_proj(F.silu(emb)).transpose(1, 2)[..., None, None]  # emb (B, F, E) -> (B, C, F, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class VideoResBlock(nn.Module):
    """Spatial ResBlock per frame, then a TemporalResBlock across frames, blended.

    (B*F, C_in, H, W) -> (B*F, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, eps: float, kernel: int,
                 merge_factor: float):
        super().__init__()
        self.spatial_res_block = ResBlock(in_channels, out_channels, emb_dim, groups, eps)
        self.temporal_res_block = TemporalResBlock(out_channels, emb_dim, kernel, groups, eps)
        self.time_mixer = AlphaBlender(merge_factor)

    def forward(self, x: Tensor, emb: Tensor, num_frames: int, image_only: Tensor, chunks: int) -> Tensor:
        x = chunked(self.spatial_res_block, chunks, x, emb)  # (B*F, C_out, H, W): frames are independent here
        video = x.unflatten(0, (-1, num_frames)).transpose(1, 2)  # (B, C_out, F, H, W)
        video = self.temporal_res_block(video, emb.unflatten(0, (-1, num_frames)))  # emb (B, F, E)
        return self.time_mixer(x, video.transpose(1, 2).flatten(0, 1), image_only)  # (B*F, C_out, H, W)


class TemporalTransformerBlock(TransformerBlock):
    """SD's transformer block over frames with a feed-forward in front: ff_in, self-attention over frames,
    cross-attention to the image embedding, feed-forward; each pre-LN and residual.
    (B*H*W, F, C), context (B*H*W, M, D) -> (B*H*W, F, C).
    """

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__(dim, heads, context_dim)
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.ff_in(self.norm_in(x))
        return super().forward(x, context)


class VideoTransformer(SpatialTransformer):
    """The spatial transformer (Linear proj) with a temporal block after each spatial block, blended by alpha.

    (B*F, C, H, W), context (B*F, M, D) -> (B*F, C, H, W). Frame positions enter as a sinusoid of the frame index
    through `time_pos_embed`, added to the temporal branch's input only.
    """

    def __init__(self, dim: int, heads: int, context_dim: int, depth: int, groups: int, merge_factor: float):
        super().__init__(dim, heads, context_dim, depth, linear_proj=True, groups=groups)
        self.temporal_transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(dim, heads, context_dim) for _ in range(depth))
        self.time_pos_embed = TimestepMLP(dim, 4 * dim, out_dim=dim)
        self.time_mixer = AlphaBlender(merge_factor)

    def forward(self, x: Tensor, context: Tensor, num_frames: int, image_only: Tensor, chunks: int) -> Tensor:
        BF, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B*F, H*W, C)
        frames = torch.arange(num_frames, device=x.device).repeat(BF // num_frames)  # (B*F,): 0..F-1 per video
        position = self.time_pos_embed(timestep_embedding(frames, C).to(h.dtype))[:, None]  # (B*F, 1, C)
        # The temporal cross-attention sees the first frame's tokens of each video, at every position (SGM
        # use_spatial_context). All frames carry the same image embedding in SVD.
        time_context = context.unflatten(0, (-1, num_frames))[:, 0].repeat_interleave(H * W, dim=0)  # (B*H*W, M, D)
        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            h = chunked(block, chunks, h, context)  # (B*F, H*W, C)
            t = (h + position).unflatten(0, (-1, num_frames)).transpose(1, 2).flatten(0, 1)  # (B*H*W, F, C)
            t = chunked(temporal_block, chunks, t, time_context)  # (B*H*W, F, C): positions are independent
            t = t.unflatten(0, (-1, H * W)).transpose(1, 2).flatten(0, 1)  # (B*F, H*W, C)
            h = self.time_mixer(h, t, image_only)
        h = self.proj_out(h).transpose(1, 2).unflatten(2, (H, W))  # (B*F, C, H, W)
        return h + x


EPS_LAYOUTS = ("sgm", "diffusers")  # SVDUNetConfig.eps_layout: the original's GroupNorm eps, or diffusers'


@dataclass(frozen=True)
class SVDUNetConfig:
    in_channels: int = 8                                     # noisy latent (4) + unscaled conditioning-frame latent (4)
    out_channels: int = 4                                    # predicted channels (v, with the EDM preconditioning)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)       # width per level (diffusers block_out_channels)
    layers_per_block: int = 2                                # VideoResBlocks per encoder level; the decoder has one more
    attention: tuple[bool, ...] = (True, True, True, False)  # video transformer after each ResBlock of the level
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)        # spatial (and as many temporal) blocks; mid: last
    heads: tuple[int, ...] = (5, 10, 20, 20)                 # attention heads per level (head dim 64)
    context_dim: int = 1024                                  # image-embedding width (OpenCLIP ViT-H/14 projection)
    added_ids: int = 3                                       # micro-conditioning ids: fps_id, motion_bucket_id, cond_aug
    added_id_dim: int = 256                                  # sinusoid width per id (label_emb input = 3 * 256 = 768)
    groups: int = 32                                         # GroupNorm groups everywhere
    eps_layout: str = "sgm"                                  # ResBlock GroupNorm eps (spatial and temporal): "sgm" =
                                                             # 1e-5 everywhere (the original); "diffusers" = 1e-6 in the
                                                             # cross-attention down blocks and every up block, as
                                                             # UNetSpatioTemporalConditionModel builds them (ckpt.md
                                                             # §12.1): official ControlNeXt-SVD releases trained so
    temporal_kernel: int = 3                                 # frames seen by the temporal convs (SGM video_kernel_size)
    merge_factor: float = 0.5                                # initial mix_factor of every AlphaBlender (SGM config)
    num_frames: int = 25                                     # frames the weights were trained for (svd 14, svd_xt 25):
                                                             # the samplers' default; forward takes num_frames itself

    def __post_init__(self):
        if self.eps_layout not in EPS_LAYOUTS:
            raise ValueError(f"SVDUNetConfig.eps_layout must be one of {EPS_LAYOUTS}, got {self.eps_layout!r}")

    @property
    def emb_dim(self) -> int:
        return 4 * self.channels[0]  # time_embed_dim = 4 * model_channels

    def block_eps(self, level: int, up: bool) -> float:
        """GroupNorm eps of the VideoResBlocks of the down (or up) block at `level`; the mid block is 1e-5 in both."""
        loose = self.eps_layout == "diffusers" and (up or self.attention[level])
        return 1e-6 if loose else 1e-5


class DownBlock(nn.Module):
    """`layers` VideoResBlocks (each followed by a VideoTransformer if `attention`), then an optional stride-2 conv."""

    def __init__(self, cfg: SVDUNetConfig, level: int, in_channels: int):
        super().__init__()
        out, n = cfg.channels[level], cfg.layers_per_block
        self.resnets = nn.ModuleList(VideoResBlock(in_channels if j == 0 else out, out, cfg.emb_dim, cfg.groups,
                                                   cfg.block_eps(level, up=False), cfg.temporal_kernel,
                                                   cfg.merge_factor) for j in range(n))
        self.attentions = nn.ModuleList(
            VideoTransformer(out, cfg.heads[level], cfg.context_dim, cfg.transformer_depth[level], cfg.groups,
                             cfg.merge_factor) for _ in range(n)) if cfg.attention[level] else None
        self.downsamplers = nn.ModuleList([Downsample(out)]) if level < len(cfg.channels) - 1 else None

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, num_frames: int, image_only: Tensor,
                chunks: int) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, emb, num_frames, image_only, chunks)
            if self.attentions is not None:
                h = self.attentions[j](h, context, num_frames, image_only, chunks)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)  # (B*F, C, H/2, W/2)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """VideoResBlock, VideoTransformer, VideoResBlock at the lowest resolution."""

    def __init__(self, cfg: SVDUNetConfig):
        super().__init__()
        c = cfg.channels[-1]
        self.resnets = nn.ModuleList(VideoResBlock(c, c, cfg.emb_dim, cfg.groups, 1e-5, cfg.temporal_kernel,
                                                   cfg.merge_factor) for _ in range(2))  # 1e-5 in both layouts
        self.attentions = nn.ModuleList([VideoTransformer(c, cfg.heads[-1], cfg.context_dim, cfg.transformer_depth[-1],
                                                          cfg.groups, cfg.merge_factor)])

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, num_frames: int, image_only: Tensor,
                chunks: int) -> Tensor:
        h = self.resnets[0](h, emb, num_frames, image_only, chunks)
        h = self.attentions[0](h, context, num_frames, image_only, chunks)
        return self.resnets[1](h, emb, num_frames, image_only, chunks)


class UpBlock(nn.Module):
    """`layers + 1` VideoResBlocks over [h, skip] concatenations (+ VideoTransformers), then an optional x2 upsample."""

    def __init__(self, cfg: SVDUNetConfig, level: int, in_channels: int, skip_channels: Sequence[int]):
        super().__init__()
        out = cfg.channels[level]
        widths = [in_channels] + [out] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList(VideoResBlock(w + s, out, cfg.emb_dim, cfg.groups, cfg.block_eps(level, up=True),
                                                   cfg.temporal_kernel, cfg.merge_factor)
                                     for w, s in zip(widths, skip_channels))
        self.attentions = nn.ModuleList(
            VideoTransformer(out, cfg.heads[level], cfg.context_dim, cfg.transformer_depth[level], cfg.groups,
                             cfg.merge_factor) for _ in skip_channels) if cfg.attention[level] else None
        self.upsamplers = nn.ModuleList([Upsample(out)]) if level > 0 else None

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, skips: list[Tensor], size: tuple[int, int] | None,
                num_frames: int, image_only: Tensor, chunks: int) -> Tensor:
        # `skips` are this block's skips, last pushed first.
        for j, (resnet, skip) in enumerate(zip(self.resnets, skips)):
            h = resnet(torch.cat([h, skip], dim=1), emb, num_frames, image_only, chunks)  # (B*F, C_out, H, W)
            if self.attentions is not None:
                h = self.attentions[j](h, context, num_frames, image_only, chunks)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size)  # (B*F, C, 2H, 2W), or the next skip's size when H or W was odd
        return h


class SVDUNet(UNetBody):
    """v-prediction video UNet: (B, F, C_in, H, W), t (B,), image embedding (B, M, D), added ids (B, 3)
    -> (B, F, C_out, H, W). The SD UNet's skeleton (unet/sd_unet.py UNetBody) with the video blocks above."""

    def __init__(self, config: SVDUNetConfig):
        super().__init__(config, config.added_ids * config.added_id_dim, DownBlock, MidBlock, UpBlock)  # orig label_emb

    def _check_inputs(self, x: Tensor, context: Tensor, added_time_ids: Tensor, num_frames: int,
                      image_only_indicator: Tensor | None, frame_chunk: int | None) -> None:
        cfg = self.config
        problem = None
        if x.ndim != 5:
            problem = f"x must be video latents (B, F, C, H, W), got shape {tuple(x.shape)}"
        elif x.shape[1] != num_frames:
            problem = f"num_frames={num_frames} but x holds {x.shape[1]} frames (x is (B, F, C, H, W))"
        elif x.shape[2] != cfg.in_channels:
            problem = (f"x has {x.shape[2]} channels, this UNet takes {cfg.in_channels} "
                       f"(noisy latents concatenated with the conditioning-frame latents on dim 2)")
        elif context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
            problem = f"context must be (B={x.shape[0]}, M, {cfg.context_dim}), got {tuple(context.shape)}"
        elif tuple(added_time_ids.shape) != (x.shape[0], cfg.added_ids):
            problem = (f"added_time_ids must be (B={x.shape[0]}, {cfg.added_ids}) = [fps_id, motion_bucket_id, "
                       f"cond_aug], got {tuple(added_time_ids.shape)}")
        elif image_only_indicator is not None and tuple(image_only_indicator.shape) != tuple(x.shape[:2]):
            problem = (f"image_only_indicator must be (B, F) = {tuple(x.shape[:2])}, "
                       f"got {tuple(image_only_indicator.shape)}")
        elif frame_chunk is not None and frame_chunk < 1:
            problem = f"frame_chunk must be a positive number of frames or None, got {frame_chunk}"
        if problem:
            raise ValueError(f"SVDUNet: {problem}")

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, added_time_ids: Tensor, *, num_frames: int,
                image_only_indicator: Tensor | None = None, control: ControlHook | None = None,
                down_residuals: Sequence[Tensor] | None = None, mid_residual: Tensor | None = None,
                frame_chunk: int | None = None) -> Tensor:
        """`control(site, h)` sees h as (B*F, C, H, W); residuals are folded the same way. `frame_chunk` frames at a
        time go through the per-frame layers (and as many slices through the temporal attention): exact, less memory."""
        self._check_inputs(x, context, added_time_ids, num_frames, image_only_indicator, frame_chunk)
        B, cfg = x.shape[0], self.config
        emb = self.time_emb(t, x)  # (B, 4*C0)
        ids = timestep_embedding(added_time_ids.flatten(), cfg.added_id_dim).unflatten(0, (B, -1)).flatten(1)  # (B, 768)
        emb = emb + self.add_embedding(ids.to(x.dtype))
        emb = emb.repeat_interleave(num_frames, dim=0)  # (B*F, 4*C0): one embedding per frame
        context = context.repeat_interleave(num_frames, dim=0)  # (B*F, M, D)
        image_only = torch.zeros(x.shape[:2], device=x.device) if image_only_indicator is None else image_only_indicator
        chunks = 1 if frame_chunk is None else math.ceil(B * num_frames / frame_chunk)
        h = self.body(x.flatten(0, 1), emb, context, (num_frames, image_only, chunks), control, down_residuals,
                      mid_residual)  # (B*F, C_out, H, W)
        return h.unflatten(0, (B, num_frames))  # (B, F, C_out, H, W)


def svd_added_time_ids(fps_id: float, motion_bucket_id: float, cond_aug: float, batch: int = 1) -> Tensor:
    """[fps_id, motion_bucket_id, cond_aug] as (batch, 3). fps_id = fps - 1 (diffusers' fps=7 is SGM's 6)."""
    return torch.tensor([[fps_id, motion_bucket_id, cond_aug]], dtype=torch.float32).expand(batch, 3)


# --- presets: full configs from ../shared/reference/checkpoints.md §3.5, §7.2; `tiny` runs on CPU in milliseconds.
SVD = SVDUNetConfig(num_frames=14)
SVD_XT = SVDUNetConfig(num_frames=25)  # also svd_xt_1_1: same keys and shapes
# SVD's structure (4 levels, attention at 0-2) at toy widths, so the original-layout key table applies to it too.
# GroupNorm keeps 32 groups: diffusers hard-codes 32 in these blocks, and the parity test needs the same.
TINY = SVDUNetConfig(channels=(32, 32, 64, 64), heads=(2, 2, 4, 4), context_dim=32, added_id_dim=32, num_frames=3)
PRESETS = {"svd": SVD, "svd_xt": SVD_XT, "tiny": TINY}
