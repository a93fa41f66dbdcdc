"""SVD's first stage: the SD image encoder with a video decoder that mixes information across frames.

Implements the `VideoDecoder` of Stable Video Diffusion (Blattmann et al. 2023, arXiv 2311.15127, §4 / App. D: the
decoder is finetuned with temporal layers to remove flicker), which ControlNeXt-SVD (arXiv 2408.06070) decodes with.
Matches Stability-AI/generative-models@0ad7de9:sgm/modules/autoencoding/temporal_ae.py (time_mode "conv-only",
`VideoResBlock`, `AE3DConv`) with module names equal to diffusers 0.42.1 `AutoencoderKLTemporalDecoder`
(../shared/reference/checkpoints.md §4.2, §4.3). Every decoder res block becomes spatial block -> temporal block
(Conv3d (3,1,1), GroupNorm over frames, no time embedding) -> learned mix alpha*temporal + (1-alpha)*spatial, the
reverse of the UNet's AlphaBlender (§12.8); conv_out is followed by a temporal Conv3d (`time_conv_out`).
The encoder, attention, res and upsample blocks are imported from autoencoder.py.

Frame chunking (memory): every per-frame layer (spatial res blocks, attention, upsamplers, conv_out) runs on
`chunk_frames` frames at a time, so its temporaries are chunk-sized; the temporal layers still see the whole clip, so
the result equals the unchunked decode up to float rounding (tests/test_vae.py). Block outputs and the temporal layers
stay clip-sized, so the saving is partial (experiments/bench_vae.py measures it). SGM instead decodes `decoding_t`-frame
chunks independently, which changes the output: the temporal layers couple all frames (GroupNorm statistics over frames,
a receptive field of +-29 frames), so no independent chunking can be exact. Left out: the training-time losses and
tiled encoding here (SVD encodes one conditioning frame; AutoencoderKL has tiling for large images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae.autoencoder import Attention, DiagonalGaussian, Encoder, ResnetBlock2D, Upsample, check_image, check_latent

# ---------------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------------


def per_frames(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None) -> Tensor:
    """A per-frame layer over (B*F, ...) in slices of `chunk` items (all at once if None): same result, less memory."""
    return fn(x) if chunk is None else torch.cat([fn(piece) for piece in x.split(chunk)])


class TemporalResBlock(nn.Module):
    """GN -> SiLU -> Conv3d over time, twice, plus the input (SGM `time_stack`, skip_t_emb). (B, C, F, H, W)."""

    def __init__(self, channels: int, groups: int, eps: float, kernel: int):
        super().__init__()
        pad = (kernel // 2, 0, 0)  # mixes only neighbouring frames at the same pixel
        self.norm1 = nn.GroupNorm(groups, channels, eps=eps)  # statistics over (C/G, F, H, W)
        self.conv1 = nn.Conv3d(channels, channels, (kernel, 1, 1), padding=pad)
        self.norm2 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv2 = nn.Conv3d(channels, channels, (kernel, 1, 1), padding=pad)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class TimeMixer(nn.Module):
    """alpha = sigmoid(mix_factor), a learned scalar; out = alpha*temporal + (1-alpha)*spatial (VAE order, §12.8)."""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.zeros(1))  # value set in TemporalAutoencoder.init_weights

    def forward(self, spatial: Tensor, temporal: Tensor) -> Tensor:
        alpha = torch.sigmoid(self.mix_factor)
        return alpha * temporal + (1.0 - alpha) * spatial


class VideoResBlock(nn.Module):
    """An image res block, a temporal res block on its output, and the learned mix of the two. (B*F, C, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, temporal_eps: float, kernel: int):
        super().__init__()
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, groups, eps)
        self.temporal_res_block = TemporalResBlock(out_channels, groups, temporal_eps, kernel)
        self.time_mixer = TimeMixer()

    def forward(self, x: Tensor, num_frames: int, chunk: int | None) -> Tensor:
        spatial = per_frames(self.spatial_res_block, x, chunk)  # (B*F, C, H, W)
        spatial = spatial.unflatten(0, (-1, num_frames)).transpose(1, 2)  # (B, C, F, H, W)
        mixed = self.time_mixer(spatial, self.temporal_res_block(spatial))  # (B, C, F, H, W)
        return mixed.transpose(1, 2).flatten(0, 1)  # (B*F, C, H, W)


class VideoMidBlock(nn.Module):
    """video res -> (spatial, per-frame) attention -> video res."""

    def __init__(self, channels: int, groups: int, eps: float, temporal_eps: float, kernel: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            VideoResBlock(channels, channels, groups, eps, temporal_eps, kernel) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(channels, groups, eps)])

    def forward(self, x: Tensor, num_frames: int, chunk: int | None) -> Tensor:
        x = self.resnets[0](x, num_frames, chunk)
        x = per_frames(self.attentions[0], x, chunk)  # attention within each frame
        return self.resnets[1](x, num_frames, chunk)


class VideoUpBlock(nn.Module):
    """`layers` video res blocks, then an optional (per-frame) upsample."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, upsample: bool, groups: int, eps: float,
                 temporal_eps: float, kernel: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            VideoResBlock(in_channels if j == 0 else out_channels, out_channels, groups, eps, temporal_eps, kernel)
            for j in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: Tensor, num_frames: int, chunk: int | None) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, num_frames, chunk)
        for upsampler in self.upsamplers:
            x = per_frames(upsampler, x, chunk)  # (B*F, C, 2H, 2W)
        return x


class TemporalDecoder(nn.Module):
    """Latent video (B, F, Z, h, w) -> video (B, F, C_out, h*f, w*f)."""

    def __init__(self, out_channels: int, latent_channels: int, widths: tuple[int, ...], layers: int, groups: int,
                 eps: float, temporal_eps: float, kernel: int):
        super().__init__()
        top = list(reversed(widths))  # up_blocks.0 works at the lowest resolution
        self.conv_in = nn.Conv2d(latent_channels, top[0], 3, padding=1)
        self.mid_block = VideoMidBlock(top[0], groups, eps, temporal_eps, kernel)
        self.up_blocks = nn.ModuleList(
            VideoUpBlock(top[max(i - 1, 0)], top[i], layers + 1, i < len(top) - 1, groups, eps, temporal_eps, kernel)
            for i in range(len(top)))
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=eps)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        # SGM AE3DConv: a temporal conv after the per-frame conv_out
        self.time_conv_out = nn.Conv3d(out_channels, out_channels, (kernel, 1, 1), padding=(kernel // 2, 0, 0))

    def forward(self, z: Tensor, chunk: int | None = None) -> Tensor:
        """chunk: run the per-frame layers on this many (batch x frame) items at a time (None: all at once)."""
        B, num_frames = z.shape[:2]
        h = self.conv_in(z.flatten(0, 1))  # (B*F, C_top, h, w)
        h = self.mid_block(h, num_frames, chunk)
        for block in self.up_blocks:
            h = block(h, num_frames, chunk)  # (B*F, C_i, ...) doubling H, W except at the last level
        h = per_frames(lambda x: self.conv_out(F.silu(self.conv_norm_out(x))), h, chunk)  # (B*F, C_out, H, W)
        h = h.unflatten(0, (B, num_frames)).transpose(1, 2)  # (B, C_out, F, H, W)
        return self.time_conv_out(h).transpose(1, 2)  # (B, F, C_out, H, W)


# ---------------------------------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemporalVAEConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3  # decoded frame channels
    latent_channels: int = 4  # Z; the encoder emits 2*Z moments
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level, as the SD VAE
    layers_per_block: int = 2  # encoder res blocks per level; the decoder has one more
    norm_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-6  # spatial GroupNorm eps (checkpoints.md §12.1)
    temporal_norm_eps: float = 1e-5  # GroupNorm eps of the temporal res blocks (SGM time_stack, §4.2)
    time_kernel: int = 3  # frames seen by each temporal conv (Conv3d kernel (3, 1, 1))
    use_quant_conv: bool = True  # diffusers' SVD vae/ has it; SGM first_stage_model does not (§4.3)
    latent_scale: float = 0.18215  # for the denoised latents; SVD's conditioning-frame latent is NOT scaled (§4.1)
    chunk_frames: int = 4  # chunked decode: frames per slice in the per-frame layers (exact; see the docstring)

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel: 2**(levels-1)."""
        return 2 ** (len(self.block_out_channels) - 1)


class TemporalAutoencoder(nn.Module):
    """encode: frames (N, 3, H, W) -> DiagonalGaussian; decode: latent video (B, F, Z, h, w) -> (B, F, 3, H, W)."""

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        self.config = c = config
        widths = c.block_out_channels
        self.encoder = Encoder(c.in_channels, c.latent_channels, widths, c.layers_per_block, True, c.norm_groups,
                               c.norm_eps)
        Z = c.latent_channels
        self.quant_conv = nn.Conv2d(2 * Z, 2 * Z, 1) if c.use_quant_conv else None
        self.decoder = TemporalDecoder(c.out_channels, Z, widths, c.layers_per_block, c.norm_groups, c.norm_eps,
                                       c.temporal_norm_eps, c.time_kernel)
        self.init_weights()

    def init_weights(self) -> None:
        """PyTorch defaults everywhere, except the mix factors: 0, i.e. alpha = 1/2 (SGM merge_factor 0.0)."""
        for module in self.modules():
            if isinstance(module, TimeMixer):
                nn.init.zeros_(module.mix_factor)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Frames (N, C, H, W) -> posterior over unscaled latents (N, Z, H/f, W/f). SVD conditions on its mode."""
        c = self.config
        check_image(x, c.in_channels, c.downscale)
        moments = self.encoder(x)  # (N, 2*Z, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor, chunked: bool = False) -> Tensor:
        """Unscaled latent video (B, F, Z, h, w) -> video (B, F, C, H, W); chunked: per-frame layers in slices."""
        c = self.config
        check_latent(z, c.latent_channels, "(B, F, Z, h, w)")
        return self.decoder(z, c.chunk_frames if chunked else None)

    def decode_latent(self, latent: Tensor, chunked: bool = False) -> Tensor:
        """Scaled latent video from the diffusion model -> video."""
        return self.decode(latent / self.config.latent_scale, chunked)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        """Reconstruct a clip given as frames (B*F, C, H, W) through the posterior mode: (B, F, C, H, W)."""
        z = self.encode(x).mode()  # (B*F, Z, h, w)
        return self.decode(z.unflatten(0, (-1, num_frames)))


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

SVD = TemporalVAEConfig()  # stabilityai/stable-video-diffusion-img2vid(-xt) vae/ (AutoencoderKLTemporalDecoder)
# tiny keeps 2 layers: diffusers' temporal mid block has layers_per_block res blocks and skips attention with fewer
TINY = TemporalVAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=2, chunk_frames=3)
PRESETS = {"svd": SVD, "tiny": TINY}
