"""The SD3 backbone: the multimodal diffusion transformer (MMDiT), with a control hook between joint blocks.

Paper: Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (arXiv 2403.03206),
§4 and Fig. 2: the latent is cut into p x p patches (a conv) plus a 2-D sin-cos position table; the timestep
sinusoid and the pooled text vector each go through an MLP and are summed into c; text tokens are projected to the
model width; each joint block modulates both streams from c (adaLN: shift, scale, gate), runs ONE attention over the
concatenated [context; image] tokens with separate q/k/v and output weights per stream, then a per-stream GELU-tanh
MLP; the last block's context stream is "pre-only" (it feeds the last attention and is then dropped); a final adaLN +
linear maps each token back to a patch. SD3.5 adds RMS-norm of q and k per head (`qk_norm`; mmditx.py qk_norm="rms")
and, in SD3.5-medium's first 13 blocks ("MMDiT-X"), a second image-only self-attention (`dual_attention_layers`;
mmditx.py x_block_self_attn_layers).

Reference: Stability-AI/sd3.5@8df03ab3:mmditx.py (MMDiTX, JointBlock, DismantledBlock, FinalLayer). Module names are
those of huggingface/diffusers@v0.42.1 SD3Transformer2DModel (transformer_sd3.py, attention.py JointTransformerBlock,
attention_processor.py JointAttnProcessor2_0), so diffusers `transformer/` weights load by identity; mmdit/keymap.py
maps the original single file (`model.diffusion_model.joint_blocks.*`, fused qkv). Where the two layouts order the
adaLN chunks differently (the last context block and the final layer: original (shift, scale), diffusers (scale,
shift)), the code follows diffusers and the key map swaps the halves.

Control hook: `control(site, h)` runs after each joint block k with site "block_{k}" (k = 0 .. depth-1) and h the
image tokens (B, N, C), N = (H/p) * (W/p) in row-major patch order: `h.unflatten(1, (H // p, W // p))` is the
(B, H/p, W/p, C) grid. The ControlNet baseline (controlnext/sd3_controlnet.py) adds its residuals through it.
Left out: the original's register tokens and layer drops (unused by SD3/3.5), skip-layer guidance, IP-adapters,
DiT's from-scratch init (see init_weights), dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unet.blocks import TimestepMLP, timestep_embedding
from unet.sd_unet import ControlHook

TIME_CHANNELS = 256  # width of the timestep sinusoid (mmditx.py TimestepEmbedder frequency_embedding_size)
NORM_EPS = 1e-6  # every LayerNorm and RMSNorm of the MMDiT (mmditx.py)


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm over channels without affine weights: the adaLN modulation supplies scale and shift."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, N, C) * (1 + scale) + shift, with (B, C) vectors broadcast over the tokens (mmditx.py modulate)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_table(dim: int, grid: int, base: int) -> Tensor:
    """The 2-D sin-cos position table of a grid x grid patch layout, (grid^2, dim), row-major tokens.

    Positions are patch indices scaled by base / grid (diffusers computes base = sample_size / patch_size); the first
    dim/2 channels encode the column, the last dim/2 the row, each as [sin | cos] at frequencies 10000^(-k / (dim/4))
    (diffusers embeddings.py get_2d_sincos_pos_embed; MAE/DiT's table). Positions in fp32 and angles in fp64, as there.
    """
    pos = torch.arange(grid, dtype=torch.float32) / (grid / base)  # (grid,)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    angles = pos.double()[:, None] * omega[None]  # (grid, dim/4)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (grid, dim/2): one axis, [sin | cos]
    column = axis.repeat(grid, 1)  # (grid^2, dim/2): token n = row * grid + column
    row = axis.repeat_interleave(grid, dim=0)  # (grid^2, dim/2)
    return torch.cat([column, row], dim=1)  # (grid^2, dim)


class PatchEmbed(nn.Module):
    """Latent (B, C_in, H, W) -> tokens (B, N, C): a p x p stride-p conv, plus the centre crop of the position table.

    `max_size` 0 builds the conv only (the ControlNet's zero-initialised `pos_embed_input`)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, max_size: int = 0, base: int = 1):
        super().__init__()
        self.max_size = max_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        if max_size:
            # a persistent buffer: the checkpoints store the table (56.6M entries at SD3-medium), it is not trained
            self.register_buffer("pos_embed", sincos_table(dim, max_size, base)[None])  # (1, max^2, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)  # (B, C, H/p, W/p)
        rows, cols = h.shape[-2:]
        h = h.flatten(2).transpose(1, 2)  # (B, N, C), N = rows * cols, row-major
        if not self.max_size:
            return h
        # the centre rows x cols window of the max x max table (mmditx.py cropped_pos_embed)
        top, left = (self.max_size - rows) // 2, (self.max_size - cols) // 2
        table = self.pos_embed.unflatten(1, (self.max_size, self.max_size))  # (1, max, max, C)
        return h + table[:, top:top + rows, left:left + cols].flatten(1, 2)  # (B, N, C)


class TimeTextEmbed(nn.Module):
    """c = MLP(sinusoid_256(t)) + MLP(pooled text): (B,), (B, D_pooled) -> (B, C) (Fig. 2a; diffusers names)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepMLP(TIME_CHANNELS, dim)
        self.text_embedder = TimestepMLP(pooled_dim, dim)  # Linear-SiLU-Linear, as the original y_embedder

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        emb = self.timestep_embedder(timestep_embedding(t, TIME_CHANNELS).to(y.dtype))  # cos first, as mmditx.py
        return emb + self.text_embedder(y)  # (B, C)


class Modulation(nn.Module):
    """adaLN: SiLU(c) -> Linear -> `chunks` vectors of width C (shift / scale / gate of each sub-layer)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, emb: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(emb)).chunk(self.chunks, dim=1)  # chunks x (B, C)


class SelfAttention(nn.Module):
    """Multi-head attention of one token stream: q, k, v (RMS-normed q, k with qk_norm), SDPA, output projection.
    Alone it is SD3.5's image-only `attn2`; JointAttention adds the context stream's weights."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q = nn.RMSNorm(dim // heads, eps=NORM_EPS) if qk_norm else None  # per head (SD3.5)
        self.norm_k = nn.RMSNorm(dim // heads, eps=NORM_EPS) if qk_norm else None
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))  # keys `to_out.0.*` as released

    def project(self, x: Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear, norm_q: nn.Module | None,
                norm_k: nn.Module | None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, C) -> q, k, v as (B, heads, N, C/heads), q and k RMS-normed per head if the norms exist."""
        q, k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=self.heads) for proj in (q, k, v))
        return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.project(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d), scale d^-1/2
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, C)


class JointAttention(SelfAttention):
    """MMDiT attention: each stream projects its own q, k, v; one SDPA over [context; image]; per-stream outputs.
    (B, N, C), (B, M, C) -> (B, N, C), (B, M, C) or None for a pre-only context stream."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, context_pre_only: bool):
        super().__init__(dim, heads, qk_norm)  # the image stream's weights
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_added_q = nn.RMSNorm(dim // heads, eps=NORM_EPS) if qk_norm else None
        self.norm_added_k = nn.RMSNorm(dim // heads, eps=NORM_EPS) if qk_norm else None
        self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor | None]:
        M = context.shape[1]
        qc, kc, vc = self.project(context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                                  self.norm_added_k)
        qx, kx, vx = self.project(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        # one attention over both streams, context tokens first (mmditx.py block_mixing)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qc, qx), (kc, kx), (vc, vx)))  # (B, heads, M + N, d)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")  # (B, M + N, C)
        context_out = None if self.to_add_out is None else self.to_add_out(out[:, :M])  # (B, M, C)
        return self.to_out(out[:, M:]), context_out  # (B, N, C)


class TanhGELU(nn.Module):
    """Linear, then GELU with the tanh approximation (diffusers' GELU(approximate="tanh"): keys `proj.*`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """C -> 4C, GELU-tanh, 4C -> C (mmditx.py Mlp; diffusers FeedForward "gelu-approximate": keys net.0 / net.2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(TanhGELU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class JointBlock(nn.Module):
    """One MMDiT block (Fig. 2b): (image (B, N, C), context (B, M, C), c (B, C)) -> (image, context or None)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, context_pre_only: bool, dual_attention: bool):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = Modulation(dim, 9 if dual_attention else 6)  # image: attn, mlp (+ attn2) x (shift, scale, gate)
        self.norm1_context = Modulation(dim, 2 if context_pre_only else 6)  # pre-only: its attention input only
        self.attn = JointAttention(dim, heads, qk_norm, context_pre_only)
        self.attn2 = SelfAttention(dim, heads, qk_norm) if dual_attention else None
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, emb: Tensor) -> tuple[Tensor, Tensor | None]:
        mods = self.norm1(emb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x_norm = layer_norm(x)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(emb)  # scale first: diffusers' AdaLayerNormContinuous order
            context_in = modulate(layer_norm(context), c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(emb)
            context_in = modulate(layer_norm(context), c_shift_msa, c_scale_msa)
        attn_x, attn_context = self.attn(modulate(x_norm, shift_msa, scale_msa), context_in)
        x = x + gate_msa[:, None] * attn_x  # gated residual (adaLN-Zero)
        if self.attn2 is not None:  # SD3.5 MMDiT-X: image-only attention on the same normed input, own modulation
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = x + gate_msa2[:, None] * self.attn2(modulate(x_norm, shift_msa2, scale_msa2))
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa[:, None] * attn_context
        context = context + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
        return x, context


@dataclass(frozen=True)
class MMDiTConfig:
    in_channels: int = 16                       # latent channels in (the SD3 VAE's 16)
    out_channels: int = 16                      # predicted channels (the velocity v of the same latent)
    patch_size: int = 2                         # p: one token per p x p latent patch
    depth: int = 24                             # joint blocks (SD3 ties the width to it: 64 * depth)
    heads: int = 24                             # attention heads
    head_dim: int = 64                          # width per head; hidden = heads * head_dim
    context_dim: int = 4096                     # text token width in (T5-XXL 4096; CLIP-L/G features zero-padded)
    pooled_dim: int = 2048                      # pooled text vector y (CLIP-L 768 + CLIP-G 1280)
    pos_embed_max_size: int = 192               # side of the stored position table, in patches (max latent 384)
    sample_size: int = 128                      # latent side the table's positions are scaled to (diffusers)
    qk_norm: bool = False                       # RMS-norm q and k per head (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # blocks with an extra image-only self-attention (SD3.5-medium)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


def check_inputs(cfg: MMDiTConfig, x: Tensor, context: Tensor, y: Tensor) -> None:
    """One ValueError naming the MMDiT input whose shape does not fit `cfg` (the ControlNet checks the same)."""
    p = cfg.patch_size
    if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
        raise ValueError(f"MMDiT latent must be (B, {cfg.in_channels}, H, W) with H, W divisible by {p}, "
                         f"got {tuple(x.shape)}")
    if max(x.shape[2], x.shape[3]) // p > cfg.pos_embed_max_size:
        raise ValueError(f"MMDiT latent {tuple(x.shape[2:])} exceeds the position table "
                         f"({cfg.pos_embed_max_size} patches of {p} per side)")
    if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
        raise ValueError(f"MMDiT context must be (B={x.shape[0]}, M, {cfg.context_dim}), got {tuple(context.shape)}")
    if y.shape != (x.shape[0], cfg.pooled_dim):
        raise ValueError(f"MMDiT pooled text y must be (B={x.shape[0]}, {cfg.pooled_dim}), got {tuple(y.shape)}")


class MMDiT(nn.Module):
    """v-prediction MMDiT: latent (B, C_in, H, W), t (B,) in [0, 1000], context (B, M, D), y (B, D_pooled)
    -> (B, C_out, H, W). t = 1000 sigma of rectified flow (schedulers/flow.py)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        cfg = self.config = config
        assert all(0 <= i < cfg.depth - 1 for i in cfg.dual_attention_layers), \
            f"dual attention needs a full (not pre-only) block: {cfg.dual_attention_layers}"
        C = cfg.hidden
        self.gradient_checkpointing = False  # recompute each block's activations in backward (one switch, STYLE §2)
        self.pos_embed = PatchEmbed(cfg.in_channels, C, cfg.patch_size, cfg.pos_embed_max_size,
                                    cfg.sample_size // cfg.patch_size)
        self.time_text_embed = TimeTextEmbed(C, cfg.pooled_dim)
        self.context_embedder = nn.Linear(cfg.context_dim, C)
        self.transformer_blocks = nn.ModuleList(
            JointBlock(C, cfg.heads, cfg.qk_norm, context_pre_only=i == cfg.depth - 1,
                       dual_attention=i in cfg.dual_attention_layers) for i in range(cfg.depth))
        self.norm_out = Modulation(C, 2)  # final adaLN, (scale, shift) in diffusers' order
        self.proj_out = nn.Linear(C, cfg.patch_size ** 2 * cfg.out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """Nothing special: weights come from the released checkpoints, and a fresh model keeps PyTorch's default
        init, as diffusers' SD3Transformer2DModel does, so a tiny random model is not degenerate. DiT's
        from-scratch init (zero adaLN and final layer, Peebles & Xie 2023 §3.2) is not used by any path here."""

    def _run(self, block: nn.Module, *args):
        # Gradient checkpointing is applied here, once, for every block of the loop.
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, y: Tensor, *,
                control: ControlHook | None = None) -> Tensor:
        check_inputs(self.config, x, context, y)
        p, H = self.config.patch_size, x.shape[-2]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # (B,)
        hook = control or (lambda site, h: h)

        h = self.pos_embed(x)  # (B, N, C), N = (H/p)(W/p)
        emb = self.time_text_embed(t, y)  # (B, C): c of Fig. 2
        context = self.context_embedder(context)  # (B, M, C)
        for k, block in enumerate(self.transformer_blocks):
            h, context = self._run(block, h, context, emb)  # the last block returns context None
            h = hook(f"block_{k}", h)

        scale, shift = self.norm_out(emb)
        h = self.proj_out(modulate(layer_norm(h), shift, scale))  # (B, N, p*p*C_out)
        # unpatchify: each token's (p, q, c) channels back to its p x p patch (mmditx.py unpatchify)
        return rearrange(h, "b (h w) (p q c) -> b c (h p) (w q)", h=H // p, p=p, q=p)  # (B, C_out, H, W); w = N/h


# --- presets: full configs of the released transformers (their config.json); `tiny` runs on CPU in milliseconds.
SD3_MEDIUM = MMDiTConfig()
SD35_MEDIUM = MMDiTConfig(pos_embed_max_size=384, qk_norm=True, dual_attention_layers=tuple(range(13)))
SD35_LARGE = MMDiTConfig(depth=38, heads=38, qk_norm=True)
# SD3's structure at toy widths: 4 blocks (the last pre-only), heads = depth as the releases (hidden 32), a 16 x 16
# patch table.
TINY = MMDiTConfig(depth=4, heads=4, head_dim=8, context_dim=24, pooled_dim=20, pos_embed_max_size=16)
PRESETS = {"sd3_medium": SD3_MEDIUM, "sd35_medium": SD35_MEDIUM, "sd35_large": SD35_LARGE, "tiny": TINY}
