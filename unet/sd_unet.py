"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL) with a control hook and ControlNet residual inputs.

Paper: Rombach et al. 2022 (LDM) App. E; SDXL: Podell et al. 2023 §2.1-2.2 (micro-conditioning on sizes/crops).
Reference: CompVis/stable-diffusion@21f890f9:ldm/modules/diffusionmodules/openaimodel.py (UNetModel) and
Stability-AI/generative-models@0ad7de9:sgm/modules/diffusionmodules/openaimodel.py; module names are those of
huggingface/diffusers@v0.42.1 UNet2DConditionModel so diffusers weights load by identity (unet/keymap.py maps the
original single-file names). ControlNeXt (Peng et al. 2024, §3.2) injects through the `control` hook; the
ControlNet baseline (Zhang et al. 2023) adds one residual per skip and one after the mid block. `UNetBody` is the
skeleton (embeddings, conv_in, the skip/hook/residual loop, conv_out) that unet/svd_unet.py reuses with video blocks.
Left out: class-label embeddings other than SDXL's vector `y`, inpainting inputs, attention masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unet.blocks import Downsample, ResBlock, SpatialTransformer, TimestepMLP, Upsample, timestep_embedding

# A control hook gets (site, h) at each named site and returns the h to continue with. Sites: "conv_in" (after
# conv_in, its skip already stored), "down_{k}" (after down block k, its skips already stored), "mid_in", "mid_out".
ControlHook = Callable[[str, Tensor], Tensor]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4                                    # latent channels in (SVD: 8, latent + condition frame)
    out_channels: int = 4                                   # predicted channels (eps or v)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)      # width per level (diffusers block_out_channels)
    layers_per_block: int = 2                               # ResBlocks per encoder level; the decoder has one more
    attention: tuple[bool, ...] = (True, True, True, False)  # spatial transformer after each ResBlock of the level
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)       # transformer blocks per spatial transformer; mid: last
    heads: tuple[int, ...] = (8, 8, 8, 8)                   # attention heads per level (SD1.x 8; SD2/XL C/64)
    context_dim: int = 768                                  # cross-attention token width (CLIP-L 768, OpenCLIP-H 1024)
    linear_proj: bool = False                               # transformer proj_in/out Linear (SD2+) or 1x1 conv (SD1.x)
    adm_channels: int = 0                                   # width of the vector condition y (SDXL 2816); 0: none
    added_id_dim: int = 256                                 # SDXL y: sinusoid width per size/crop id (diffusers addition_time_embed_dim)
    groups: int = 32                                        # GroupNorm groups everywhere

    @property
    def emb_dim(self) -> int:
        return 4 * self.channels[0]  # LDM time_embed_dim = 4 * model_channels


class DownBlock(nn.Module):
    """`layers` ResBlocks (each followed by a transformer if `attention`), then an optional stride-2 conv."""

    def __init__(self, cfg: UNetConfig, level: int, in_channels: int):
        super().__init__()
        out, n = cfg.channels[level], cfg.layers_per_block
        self.resnets = nn.ModuleList(ResBlock(in_channels if j == 0 else out, out, cfg.emb_dim, cfg.groups) for j in range(n))
        self.attentions = nn.ModuleList(
            SpatialTransformer(out, cfg.heads[level], cfg.context_dim, cfg.transformer_depth[level], cfg.linear_proj,
                               cfg.groups) for _ in range(n)) if cfg.attention[level] else None
        self.downsamplers = nn.ModuleList([Downsample(out)]) if level < len(cfg.channels) - 1 else None

    def forward(self, h: Tensor, emb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)  # (B, C, H/2, W/2)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """ResBlock, spatial transformer, ResBlock at the lowest resolution."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c = cfg.channels[-1]
        self.resnets = nn.ModuleList(ResBlock(c, c, cfg.emb_dim, cfg.groups) for _ in range(2))
        # The mid transformer takes the last level's heads and depth, as in the original and diffusers.
        self.attentions = nn.ModuleList([SpatialTransformer(c, cfg.heads[-1], cfg.context_dim, cfg.transformer_depth[-1],
                                                            cfg.linear_proj, cfg.groups)])

    def forward(self, h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        h = self.resnets[0](h, emb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, emb)


class UpBlock(nn.Module):
    """`layers + 1` ResBlocks over [h, skip] concatenations (+ transformers), then an optional x2 upsample."""

    def __init__(self, cfg: UNetConfig, level: int, in_channels: int, skip_channels: Sequence[int]):
        super().__init__()
        out = cfg.channels[level]
        widths = [in_channels] + [out] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList(ResBlock(w + s, out, cfg.emb_dim, cfg.groups) for w, s in zip(widths, skip_channels))
        self.attentions = nn.ModuleList(
            SpatialTransformer(out, cfg.heads[level], cfg.context_dim, cfg.transformer_depth[level], cfg.linear_proj,
                               cfg.groups) for _ in skip_channels) if cfg.attention[level] else None
        self.upsamplers = nn.ModuleList([Upsample(out)]) if level > 0 else None

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, skips: list[Tensor],
                size: tuple[int, int] | None) -> Tensor:
        # `skips` are this block's skips, last pushed first.
        for j, (resnet, skip) in enumerate(zip(self.resnets, skips)):
            h = resnet(torch.cat([h, skip], dim=1), emb)  # (B, C + C_skip, H, W) -> (B, C_out, H, W)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size)  # (B, C, 2H, 2W), or the next skip's size when H or W was odd
        return h


class Plan(NamedTuple):
    """The encoder-decoder wiring of a config: what each block takes in and which skips it pops."""
    down: list[int]                        # input width of each down block
    skips: list[int]                       # width of every skip in push order: conv_in, each ResBlock, each downsample
    up: list[tuple[int, int, list[int]]]   # per up block, decoder order: (level, input width, widths of its skips)


def encoder_decoder_plan(cfg: UNetConfig) -> Plan:
    """The encoder pushes a skip after conv_in, each ResBlock and each downsample; each decoder level pops
    layers_per_block + 1 of them, last pushed first. SVDUNetConfig has the same fields: unet/svd_unet.py uses it too."""
    n_levels = len(cfg.channels)
    skips, width, down = [cfg.channels[0]], cfg.channels[0], []
    for level in range(n_levels):
        down.append(width)
        width = cfg.channels[level]
        skips += [width] * (cfg.layers_per_block + (level < n_levels - 1))
    unpopped, up = list(skips), []
    for level in reversed(range(n_levels)):
        up.append((level, width, [unpopped.pop() for _ in range(cfg.layers_per_block + 1)]))
        width = cfg.channels[level]
    assert not unpopped, f"unconsumed skips {unpopped}"
    return Plan(down, skips, up)


def control_sites(cfg: UNetConfig) -> dict[str, int]:
    """The hook sites of a UNet of this config (SD or SVD) and the width of h at each, in call order."""
    return {"conv_in": cfg.channels[0], **{f"down_{k}": c for k, c in enumerate(cfg.channels)},
            "mid_in": cfg.channels[-1], "mid_out": cfg.channels[-1]}


class UNetBody(nn.Module):
    """The skeleton both UNets share: time (+ vector) embedding, conv_in, down blocks, mid block, up blocks over the
    skips, GN-SiLU-conv_out; the control hook and ControlNet residuals on the way. The SD UNet (below) and the SVD UNet
    (unet/svd_unet.py) bring their own blocks, their own vector condition and (SVD) the frame folding."""

    def __init__(self, cfg: UNetConfig, add_dim: int, down_block: type[nn.Module], mid_block: type[nn.Module],
                 up_block: type[nn.Module]):
        super().__init__()
        self.config = cfg  # a UNetConfig, or an SVDUNetConfig (the same fields)
        assert len(cfg.attention) == len(cfg.transformer_depth) == len(cfg.heads) == len(cfg.channels), \
            f"per-level tuples: {cfg}"
        self.gradient_checkpointing = False  # recompute each block's activations in backward (one switch, STYLE §2)
        self.time_embedding = TimestepMLP(cfg.channels[0], cfg.emb_dim)
        self.add_embedding = TimestepMLP(add_dim, cfg.emb_dim) if add_dim else None  # SDXL `y`, SVD added ids
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)
        plan = encoder_decoder_plan(cfg)
        self.down_blocks = nn.ModuleList(down_block(cfg, level, width) for level, width in enumerate(plan.down))
        self.mid_block = mid_block(cfg)
        self.up_blocks = nn.ModuleList(up_block(cfg, level, width, skips) for level, width, skips in plan.up)

        self.conv_norm_out = nn.GroupNorm(cfg.groups, cfg.channels[0], eps=1e-5)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(cfg.channels[0], cfg.out_channels, 3, padding=1)

    def time_emb(self, t: Tensor | float, x: Tensor) -> Tensor:
        """t (B,) or a scalar, for x (B, ...) -> time embedding (B, 4*C0): the sinusoid in fp32, the MLP in x's dtype."""
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # (B,)
        return self.time_embedding(timestep_embedding(t, self.config.channels[0]).to(x.dtype))

    def _run(self, block: nn.Module, *args):
        # Gradient checkpointing is applied here, once, for every block of the loop.
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def body(self, x: Tensor, emb: Tensor, context: Tensor, extra: tuple, control: ControlHook | None,
             down_residuals: Sequence[Tensor] | None, mid_residual: Tensor | None) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W); `extra` goes to every block after (h, emb, context[, skips, size])."""
        hook = control or (lambda site, h: h)
        h = self.conv_in(x)  # (N, C0, H, W)
        skips = [h]
        h = hook("conv_in", h)
        for k, block in enumerate(self.down_blocks):
            h, block_skips = self._run(block, h, emb, context, *extra)  # (N, C_k, H/2^(k+1), W/2^(k+1)) but the last
            skips += block_skips
            h = hook(f"down_{k}", h)
        if down_residuals is not None:  # ControlNet: one residual per skip, in push order
            if len(down_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down residuals, got {len(down_residuals)}")
            skips = [s + r for s, r in zip(skips, down_residuals)]

        h = hook("mid_in", h)
        h = self._run(self.mid_block, h, emb, context, *extra)  # (N, C_last, H/2^(L-1), W/2^(L-1))
        if mid_residual is not None:
            h = h + mid_residual
        h = hook("mid_out", h)

        for block in self.up_blocks:
            block_skips = [skips.pop() for _ in block.resnets]  # last pushed, first used
            size = tuple(skips[-1].shape[-2:]) if skips else None  # the upsample lands on the next skip's size
            h = self._run(block, h, emb, context, block_skips, size, *extra)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (N, C_out, H, W)


class UNet(UNetBody):
    """eps/v-prediction UNet: (B, C_in, H, W), t (B,), context (B, M, D)[, y (B, adm)] -> (B, C_out, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__(config, config.adm_channels, DownBlock, MidBlock, UpBlock)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, y: Tensor | None = None, *,
                control: ControlHook | None = None, down_residuals: Sequence[Tensor] | None = None,
                mid_residual: Tensor | None = None) -> Tensor:
        """`control(site, h)` may change h at each site of `control_sites`; ControlNet residuals enter the skips."""
        emb = self.time_emb(t, x)  # (B, 4*C0)
        if self.add_embedding is not None:
            if y is None:
                raise ValueError(f"this UNet needs the vector condition y of width {self.config.adm_channels}")
            emb = emb + self.add_embedding(y.to(x.dtype))  # SDXL: pooled text + size/crop embeddings
        return self.body(x, emb, context, (), control, down_residuals, mid_residual)


def sdxl_vector(pooled: Tensor, original_size: Tensor, crop_top_left: Tensor, target_size: Tensor, *,
                id_dim: int) -> Tensor:
    """SDXL's y: [pooled (B, P) | sinusoids of orig h, w, crop top, left, target h, w] -> (B, P + 6 * id_dim).

    Each size/crop id gets its own `id_dim`-wide cos-first sinusoid (UNetConfig.added_id_dim: 256 for SDXL, so
    y is 1280 + 1536 = 2816), as the original ConcatTimestepEmbedderND does.
    Sizes are (B, 2) tensors (height, width) or (2,) broadcast over the batch.
    """
    B = pooled.shape[0]
    ids = torch.cat([torch.as_tensor(v, dtype=torch.float32, device=pooled.device).expand(B, 2)
                     for v in (original_size, crop_top_left, target_size)], dim=1)  # (B, 6)
    emb = timestep_embedding(ids.flatten(), id_dim).unflatten(0, (B, 6)).flatten(1)  # (B, 6 * id_dim)
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=1)  # (B, P + 6 * id_dim)


# --- presets: full configs from ../shared/reference/checkpoints.md §7.2; `tiny` runs on CPU in milliseconds.
SD15 = UNetConfig()
SD21 = UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True)
SDXL = UNetConfig(channels=(320, 640, 1280), attention=(False, True, True), transformer_depth=(1, 2, 10),
                  heads=(5, 10, 20), context_dim=2048, linear_proj=True, adm_channels=2816)
# SD1.5's structure (4 levels, attention at 0-2) at test widths, so the original-layout key table applies to it too.
TINY = UNetConfig(channels=(32, 32, 64, 64), heads=(2, 2, 4, 4), context_dim=32, groups=8)
PRESETS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL, "tiny": TINY}
