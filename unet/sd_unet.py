"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL) with a control hook and ControlNet residual inputs.

Paper: Rombach et al. 2022 (LDM) App. E; SDXL: Podell et al. 2023 §2.1-2.2 (micro-conditioning on sizes/crops).
Reference: CompVis/stable-diffusion@21f890f9:ldm/modules/diffusionmodules/openaimodel.py (UNetModel) and
Stability-AI/generative-models@0ad7de9:sgm/modules/diffusionmodules/openaimodel.py; module names are those of
huggingface/diffusers@v0.42.1 UNet2DConditionModel so diffusers weights load by identity (unet/keymap.py maps the
original single-file names). ControlNeXt (Peng et al. 2024, §3.2) injects through the `control` hook; the
ControlNet baseline (Zhang et al. 2023) adds one residual per skip and one after the mid block.
Left out: class-label embeddings other than SDXL's vector `y`, inpainting inputs, attention masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def encoder_decoder_plan(cfg: UNetConfig) -> tuple[list[int], list[tuple[int, int, list[int]]]]:
    """Input width of each down block, and (level, input width, skip widths) of each up block in decoder order.

    The encoder pushes a skip after conv_in, each ResBlock and each downsample; each decoder level pops
    layers_per_block + 1 of them, last pushed first. SVDUNetConfig has the same fields: unet/svd_unet.py uses it too.
    """
    n_levels = len(cfg.channels)
    skip_widths, width, down_widths = [cfg.channels[0]], cfg.channels[0], []
    for level in range(n_levels):
        down_widths.append(width)
        width = cfg.channels[level]
        skip_widths += [width] * (cfg.layers_per_block + (level < n_levels - 1))
    up_plan = []
    for level in reversed(range(n_levels)):
        up_plan.append((level, width, [skip_widths.pop() for _ in range(cfg.layers_per_block + 1)]))
        width = cfg.channels[level]
    assert not skip_widths, f"unconsumed skips {skip_widths}"
    return down_widths, up_plan


class UNet(nn.Module):
    """eps/v-prediction UNet: (B, C_in, H, W), t (B,), context (B, M, D)[, y (B, adm)] -> (B, C_out, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        assert len(cfg.attention) == len(cfg.transformer_depth) == len(cfg.heads) == len(cfg.channels), \
            f"per-level tuples: {cfg}"
        self.gradient_checkpointing = False  # recompute each block's activations in backward (one switch, STYLE §2)
        self.time_embedding = TimestepMLP(cfg.channels[0], cfg.emb_dim)
        self.add_embedding = TimestepMLP(cfg.adm_channels, cfg.emb_dim) if cfg.adm_channels else None
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)
        down_widths, up_plan = encoder_decoder_plan(cfg)
        self.down_blocks = nn.ModuleList(DownBlock(cfg, level, width) for level, width in enumerate(down_widths))
        self.mid_block = MidBlock(cfg)
        self.up_blocks = nn.ModuleList(UpBlock(cfg, level, width, skips) for level, width, skips in up_plan)

        self.conv_norm_out = nn.GroupNorm(cfg.groups, cfg.channels[0], eps=1e-5)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(cfg.channels[0], cfg.out_channels, 3, padding=1)

    def _run(self, block: nn.Module, *args):
        # Gradient checkpointing is applied here, once, for every block of the loop.
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, y: Tensor | None = None, *,
                control: ControlHook | None = None, down_residuals: Sequence[Tensor] | None = None,
                mid_residual: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # (B,)
        emb = self.time_embedding(timestep_embedding(t, self.config.channels[0]).to(x.dtype))  # (B, 4*C0)
        if self.add_embedding is not None:
            if y is None:
                raise ValueError(f"this UNet needs the vector condition y of width {self.config.adm_channels}")
            emb = emb + self.add_embedding(y.to(x.dtype))  # SDXL: pooled text + size/crop embeddings
        hook = control or (lambda site, h: h)

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        h = hook("conv_in", h)
        for k, block in enumerate(self.down_blocks):
            h, block_skips = self._run(block, h, emb, context)  # (B, C_k, H/2^(k+1), W/2^(k+1)) but the last level
            skips += block_skips
            h = hook(f"down_{k}", h)
        if down_residuals is not None:  # ControlNet: one residual per skip, in push order
            if len(down_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down residuals, got {len(down_residuals)}")
            skips = [s + r for s, r in zip(skips, down_residuals)]

        h = hook("mid_in", h)
        h = self._run(self.mid_block, h, emb, context)  # (B, C_last, H/2^(L-1), W/2^(L-1))
        if mid_residual is not None:
            h = h + mid_residual
        h = hook("mid_out", h)

        for block in self.up_blocks:
            block_skips = [skips.pop() for _ in block.resnets]  # last pushed, first used
            size = tuple(skips[-1].shape[-2:]) if skips else None  # the upsample lands on the next skip's size
            h = self._run(block, h, emb, context, block_skips, size)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, C_out, H, W)


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
# SD1.5's structure (4 levels, attention at 0-2) at toy widths, so the original-layout key table applies to it too.
TINY = UNetConfig(channels=(32, 32, 64, 64), heads=(2, 2, 4, 4), context_dim=32, groups=8)
# The fill50k toy (train.py): 64 px RGB, space-to-depth by 8 = 192 channels at 8x8, SD's latent geometry.
TOY = UNetConfig(in_channels=192, out_channels=192, channels=(32, 64, 64), layers_per_block=1,
                 attention=(False, True, True), transformer_depth=(1, 1, 1), heads=(2, 2, 2), context_dim=64, groups=16)
PRESETS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL, "tiny": TINY, "toy": TOY}
