"""Building blocks of the Stable Diffusion UNets: timestep embedding, ResBlock, attention, GEGLU feed-forward,
transformer block, spatial transformer, down/upsample.

Paper: Rombach et al. 2022 (LDM), §3.3 and App. E; the blocks follow the original `ldm.modules` code
(CompVis/stable-diffusion@21f890f9: openaimodel.py, attention.py). Module names equal diffusers'
(huggingface/diffusers@v0.42.1: resnet.py ResnetBlock2D, attention_processor.py Attention, attention.py
BasicTransformerBlock/FeedForward/GEGLU, transformer_2d.py) so released diffusers weights load by identity.
Numerics as the originals (../shared/reference/checkpoints.md §12): ResBlock GroupNorm eps 1e-5, transformer
GroupNorm eps 1e-6, LayerNorm eps 1e-5, GEGLU with exact GELU, attention scale d_head^-1/2, sinusoid cos first.
Left out: scale-shift norm, attention masks, dropout > 0 (all unused by SD1.x/2.x/XL and SVD).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), [cos | sin] with frequencies exp(-ln(max_period) k / (dim/2)).

    Computed in fp32 whatever the model dtype: timesteps up to 1000 lose precision in half types.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim): cos first (flip_sin_to_cos)


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear (LDM `time_embed` / `label_emb`; diffusers TimestepEmbedding).

    `out_dim` defaults to `dim`; SVD's frame-position embedding maps C -> 4C -> C (`time_pos_embed`).
    """

    def __init__(self, in_dim: int, dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """GN-SiLU-conv, + projected time embedding, GN-SiLU-conv, + (1x1) shortcut. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # The shortcut is a 1x1 conv only where the width changes (LDM `skip_connection`).
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention, self (context=None) or cross. (B, N, C), (B, M, D) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))  # keys `to_out.0.*` as released

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N|M, C)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))  # (B, heads, N|M, d)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, C)


class GEGLU(nn.Module):
    """Linear to 2*inner, value * GELU(gate) (Shazeer 2020). The first half of the projection is the value."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU(4C) -> Linear; `net.0.proj`, `net.2` as released (net.1 is dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to `context`, feed-forward; each a residual. (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GN, proj_in, `depth` transformer blocks over the H*W tokens, proj_out, + input. (B, C, H, W) -> same.

    SD1.x projects with 1x1 convs, SD2/SDXL/SVD with Linear layers (`linear_proj`); both store [C, C(,1,1)].
    """

    def __init__(self, dim: int, heads: int, context_dim: int, depth: int = 1, linear_proj: bool = True,
                 groups: int = 32):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if linear_proj else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(dim, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim) if linear_proj else nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_proj:
            h = self.proj_in(h)  # 1x1 conv before flattening (SD1.x)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.linear_proj:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h)
        h = h.transpose(1, 2).unflatten(2, (H, W))  # (B, C, H, W)
        if not self.linear_proj:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    """3x3 conv, stride 2, padding 1. (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 (or to `size`, for odd skip shapes), then a 3x3 conv. (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
