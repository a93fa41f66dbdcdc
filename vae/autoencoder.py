"""The KL autoencoder of latent diffusion (SD1.x / SD2.x / SDXL), and SVD's conditioning-frame encoder.

Implements the first stage of Rombach et al. 2022 (arXiv 2112.10752, §3 and App. G): a convolutional encoder to a
diagonal Gaussian posterior over 4-channel latents at 1/8 resolution, and a decoder back to pixels. The latent is
multiplied by `latent_scale` before the diffusion model sees it (ControlNeXt arXiv 2408.06070 trains in this space).
SD3 (Esser et al. 2024 §5.2.1) widens the latent to 16 channels, drops the quant convs, and also shifts:
z_model = latent_scale * (z - latent_shift) (diffusers' scaling_factor 1.5305 and shift_factor 0.0609).
Matches CompVis/stable-diffusion@21f890f9:ldm/modules/diffusionmodules/model.py (Encoder, Decoder) and
ldm/modules/distributions/distributions.py, with module names equal to diffusers 0.42.1 `AutoencoderKL`
(../shared/reference/checkpoints.md §4.1), so diffusers-layout weights load by identity.

Tiled encode/decode (our addition, for memory): the full-resolution path (encoder down blocks, decoder up blocks) runs
on overlapping tiles blended with ramps that sum to one (continuous weights, so no seam); the latent-resolution path
(mid block with its global attention, conv in/out, quant convs) runs untiled and stays exact. Not exact: GroupNorm in
the tiled path normalises each tile with its own statistics (as diffusers' tiling does), and convs see zero padding at
tile borders; tests/test_vae.py and experiments/bench_vae.py measure the difference. We tried normalising tiles with
whole-image statistics gathered in an extra run: exact for pointwise layers, but with the full SD depth the border
errors it no longer normalises away grew (relative error 0.17 -> 0.41 at 16-latent tiles), so it is not here.
Left out: the GAN/LPIPS training loss, EMA, and fp16 casts (run the VAE in fp32, checkpoints.md §12.12).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """GN -> SiLU -> conv3x3, twice, plus a 1x1 shortcut when the width changes. No time embedding in the VAE."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # LDM `nin_shortcut`: always 1x1 (checkpoints.md §12.6)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in every released VAE
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions with a residual (LDM AttnBlock); Linear q/k/v/out."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Sequential(nn.Linear(channels, channels), nn.Dropout(0.0))  # `to_out.0` as in diffusers

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, H*W, C); scale C^-1/2 as in LDM
        h = self.to_out(h).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + h


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv without padding (LDM; checkpoints.md §12.7)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class DownBlock(nn.Module):
    """`layers` res blocks, then an optional downsample (every level but the last)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, downsample: bool, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, groups, eps) for j in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for module in [*self.resnets, *self.downsamplers]:
            x = module(x)
        return x


class UpBlock(nn.Module):
    """`layers` res blocks, then an optional upsample (every level but the last)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, upsample: bool, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, groups, eps) for j in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for module in [*self.resnets, *self.upsamplers]:
            x = module(x)
        return x


class MidBlock(nn.Module):
    """res -> attention -> res at the lowest resolution (the attention can be switched off)."""

    def __init__(self, channels: int, attention: bool, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(channels, groups, eps)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image (B, C_in, H, W) -> posterior moments (B, 2*Z, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, in_channels: int, latent_channels: int, widths: tuple[int, ...], layers: int,
                 attention: bool, groups: int, eps: float):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], widths[i], layers, i < len(widths) - 1, groups, eps)
            for i in range(len(widths)))
        self.mid_block = MidBlock(widths[-1], attention, groups, eps)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=eps)
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)  # mean and log-variance

    def down(self, x: Tensor) -> Tensor:
        """The full-resolution part: (B, C_in, H, W) -> (B, C_top, H/f, W/f). Tiled encoding splits only this."""
        x = self.conv_in(x)  # (B, widths[0], H, W)
        for block in self.down_blocks:
            x = block(x)  # halves H, W except at the last level
        return x

    def head(self, h: Tensor) -> Tensor:
        """The latent-resolution part: (B, C_top, h, w) -> (B, 2*Z, h, w)."""
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2*Z, h, w)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.down(x))


class Decoder(nn.Module):
    """Latent (B, Z, h, w) -> image (B, C_out, h*f, w*f); each level has layers+1 res blocks (LDM)."""

    def __init__(self, out_channels: int, latent_channels: int, widths: tuple[int, ...], layers: int,
                 attention: bool, groups: int, eps: float):
        super().__init__()
        top = list(reversed(widths))  # up_blocks.0 works at the lowest resolution (LDM `up.{levels-1}`)
        self.conv_in = nn.Conv2d(latent_channels, top[0], 3, padding=1)
        self.mid_block = MidBlock(top[0], attention, groups, eps)
        self.up_blocks = nn.ModuleList(
            UpBlock(top[max(i - 1, 0)], top[i], layers + 1, i < len(top) - 1, groups, eps) for i in range(len(top)))
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=eps)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def stem(self, z: Tensor) -> Tensor:
        """The latent-resolution part: (B, Z, h, w) -> (B, C_top, h, w)."""
        return self.mid_block(self.conv_in(z))

    def up(self, h: Tensor) -> Tensor:
        """The full-resolution part: (B, C_top, h, w) -> (B, C_out, h*f, w*f). Tiled decoding splits only this."""
        for block in self.up_blocks:
            h = block(h)  # doubles H, W except at the last level
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C_out, H, W)

    def forward(self, z: Tensor) -> Tensor:
        return self.up(self.stem(z))


class DiagonalGaussian:
    """The posterior N(mean, diag(exp(logvar))) from encoder moments (B, 2*Z, h, w) (LDM distributions.py)."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, Z, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # LDM's clamp keeps exp() finite
        self.var = self.logvar.exp()
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * eps (SD encodes training images this way)."""
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The mean (SVD's conditioning frame uses it)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over (Z, h, w): (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------------------------------
# Tiling: apply a resolution-changing function on overlapping tiles and blend them without seams
# ---------------------------------------------------------------------------------------------------------------------


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of evenly spaced tiles covering [0, length), neighbours sharing at least `overlap`."""
    if tile >= length:
        return [(0, length)]
    count = -(-(length - overlap) // (tile - overlap))  # ceil: tiles needed
    return [(s, s + tile) for s in (round(k * (length - tile) / (count - 1)) for k in range(count))]


def blend_ramp(spans: list[tuple[int, int]], k: int, scale: int) -> Tensor:
    """Weights over tile k at `scale` pixels per latent pixel: 1 inside, 0 in the outer quarter of each overlap with a
    neighbour (its conv borders), linear across the middle half. Neighbouring ramps sum to one."""
    start, end = spans[k]
    pos = (torch.arange((end - start) * scale) + 0.5) / scale  # pixel centres in latent pixels from the tile start
    ramp = torch.ones_like(pos)
    if k > 0:  # rise across the overlap with the previous tile
        shared = spans[k - 1][1] - start
        ramp = ramp * ((pos - shared / 4) / (shared / 2)).clamp(0.0, 1.0)
    if k < len(spans) - 1:  # fall across the overlap with the next tile
        shared = end - spans[k + 1][0]
        ramp = ramp * ((end - start - pos - shared / 4) / (shared / 2)).clamp(0.0, 1.0)
    return ramp


def tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, factor_in: int,
          factor_out: int) -> Tensor:
    """fn over overlapping tiles of x, blended: each output pixel is the weighted mean of the tiles covering it, with
    continuous weights, so there is no seam. Tile and overlap count latent pixels: factor_in pixels of x, factor_out
    pixels of fn(x). Only one tile's activations are alive at a time."""
    ys = tile_spans(x.shape[-2] // factor_in, tile, overlap)
    xs = tile_spans(x.shape[-1] // factor_in, tile, overlap)
    out, total = None, None
    for i, (y0, y1) in enumerate(ys):
        for j, (x0, x1) in enumerate(xs):
            piece = fn(x[..., y0 * factor_in:y1 * factor_in, x0 * factor_in:x1 * factor_in])  # (B, C', th, tw)
            weight = (blend_ramp(ys, i, factor_out)[:, None] * blend_ramp(xs, j, factor_out)).to(piece)  # (th, tw)
            if out is None:
                out = piece.new_zeros(*piece.shape[:-2], ys[-1][1] * factor_out, xs[-1][1] * factor_out)
                total = piece.new_zeros(out.shape[-2:])
            rows, cols = slice(y0 * factor_out, y1 * factor_out), slice(x0 * factor_out, x1 * factor_out)
            out[..., rows, cols] += piece * weight
            total[rows, cols] += weight
    return out / total


# ---------------------------------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------------------------------


def check_image(x: Tensor, channels: int, downscale: int) -> None:
    """One clear ValueError for an image batch that is not (B, channels, H, W) with H, W divisible by `downscale`."""
    if x.ndim != 4 or x.shape[1] != channels or x.shape[-2] % downscale or x.shape[-1] % downscale:
        raise ValueError(f"VAE encode expects images (B, {channels}, H, W) with H and W divisible by {downscale}, "
                         f"got shape {tuple(x.shape)}")


def check_latent(z: Tensor, channels: int, layout: str) -> None:
    """One clear ValueError for a latent batch whose rank or channel count (dim -3) is wrong."""
    if z.ndim != len(layout.split(",")) or z.shape[-3] != channels:
        raise ValueError(f"VAE decode expects latents {layout} with {channels} channels, got shape {tuple(z.shape)}")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3  # decoded image channels
    latent_channels: int = 4  # Z; the encoder emits 2*Z moments (mean, logvar)
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level (LDM ch * ch_mult)
    layers_per_block: int = 2  # res blocks per encoder level; the decoder has one more per level (LDM num_res_blocks)
    norm_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-6  # GroupNorm eps everywhere in the VAE (checkpoints.md §12.1)
    mid_attention: bool = True  # single-head attention in both mid blocks (every released SD/SDXL/SVD VAE)
    use_quant_conv: bool = True  # 1x1 conv on the moments (absent in SVD's first_stage_model, §4.3)
    use_post_quant_conv: bool = True  # 1x1 conv on the latent before decoding
    latent_scale: float = 0.18215  # z_unet = latent_scale * (z - latent_shift) (LDM scale_factor; SDXL 0.13025, §4.1)
    latent_shift: float = 0.0  # subtracted before scaling: SD3's shift_factor 0.0609 (diffusers SD3 pipeline)
    tile_size: int = 64  # tiled encode/decode: tile side in latent pixels (64 = 512 image pixels)
    tile_overlap: int = 16  # tiled encode/decode: overlap between neighbouring tiles, in latent pixels

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel: 2**(levels-1)."""
        return 2 ** (len(self.block_out_channels) - 1)


class AutoencoderKL(nn.Module):
    """encode: image (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over (B, Z, H/8, W/8); decode: the reverse."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        widths = c.block_out_channels
        self.encoder = Encoder(c.in_channels, c.latent_channels, widths, c.layers_per_block, c.mid_attention,
                               c.norm_groups, c.norm_eps)
        self.decoder = Decoder(c.out_channels, c.latent_channels, widths, c.layers_per_block, c.mid_attention,
                               c.norm_groups, c.norm_eps)
        Z = c.latent_channels
        self.quant_conv = nn.Conv2d(2 * Z, 2 * Z, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(Z, Z, 1) if c.use_post_quant_conv else None
        self.init_weights()

    def init_weights(self) -> None:
        """Nothing special: LDM trains the VAE from PyTorch's default conv/linear init and GroupNorm (1, 0)."""

    def encode(self, x: Tensor, tiled_encode: bool = False) -> DiagonalGaussian:
        """Image (B, C, H, W) -> posterior over unscaled latents (B, Z, H/f, W/f)."""
        c = self.config
        check_image(x, c.in_channels, c.downscale)
        if tiled_encode:  # tile the full-resolution path only; mid block (global attention) stays untiled
            h = tiled(self.encoder.down, x, c.tile_size, c.tile_overlap, c.downscale, 1)  # (B, C_top, h, w)
        else:
            h = self.encoder.down(x)  # (B, C_top, h, w)
        moments = self.encoder.head(h)  # (B, 2*Z, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor, tiled_decode: bool = False) -> Tensor:
        """Unscaled latent (B, Z, h, w) -> image (B, C, h*f, w*f)."""
        c = self.config
        check_latent(z, c.latent_channels, "(B, Z, h, w)")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.decoder.stem(z)  # (B, C_top, h, w): conv_in + mid block, untiled
        if tiled_decode:
            return tiled(self.decoder.up, h, c.tile_size, c.tile_overlap, 1, c.downscale)  # (B, C, H, W)
        return self.decoder.up(h)  # (B, C, H, W)

    def encode_latent(self, x: Tensor, generator: torch.Generator | None = None, tiled_encode: bool = False) -> Tensor:
        """Image -> scaled latent for the diffusion model: latent_scale * (posterior sample - latent_shift)."""
        c = self.config
        return c.latent_scale * (self.encode(x, tiled_encode).sample(generator) - c.latent_shift)

    def decode_latent(self, latent: Tensor, tiled_decode: bool = False) -> Tensor:
        """Scaled latent from the diffusion model -> image."""
        return self.decode(latent / self.config.latent_scale + self.config.latent_shift, tiled_decode)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction through the posterior mode."""
        return self.decode(self.encode(x).mode())


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

SD = VAEConfig()  # SD1.x / SD2.x VAE (stabilityai/sd-vae-ft-mse and the in-checkpoint first stage)
SDXL = VAEConfig(latent_scale=0.13025)  # same architecture, retrained weights (sdxl-vae); run in fp32 (§12.12)
# SD3 / SD3.5: 16 latent channels, no quant convs, shifted and scaled latents (stable-diffusion-3-medium vae/config.json)
SD3 = VAEConfig(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, latent_scale=1.5305,
                latent_shift=0.0609)
TINY = VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, tile_size=8, tile_overlap=4)  # CPU tests
PRESETS = {"sd": SD, "sdxl": SDXL, "sd3": SD3, "tiny": TINY}
