"""The ControlNet baseline in its SD3 form: a trainable copy of the first N joint blocks feeding zero-initialised
linear layers whose outputs are added to the frozen MMDiT's image tokens.

Paper: Zhang et al. 2023 ("Adding Conditional Control", §3.2: trainable copy, zero-initialised connections), applied
to the MMDiT as InstantX's SD3 ControlNet and huggingface/diffusers@v0.42.1:src/diffusers/models/controlnets/
controlnet_sd3.py SD3ControlNetModel do: the noisy latent is patch-embedded (with the position table) by a copy of
the MMDiT's embedder; the control latent (the VAE latent of the condition image) is patch-embedded by a
zero-initialised conv `pos_embed_input` and added to those tokens; N copied joint blocks (all with a full context
stream) run on them; after block j a zero-initialised Linear `controlnet_blocks.{j}` gives residual j. The frozen
MMDiT adds residual floor(k / (depth / N)) to its image tokens after each block k but the last (pre-only) one
(diffusers transformer_sd3.py forward, `interval_control`), here through its control hook. Module names are
diffusers', so SD3ControlNetModel weights load by identity; at init the whole thing is an exact no-op.
Left out: the SD3.5 ControlNets without position table or context stream (SD3SingleTransformerBlock), multi-ControlNet
sums, and the pipelines' `force_zeros_for_pooled_projection` (a sampling-time choice of y, not a weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from controlnext.checkpoint import load_into
from mmdit.mmdit import TINY, JointBlock, MMDiT, MMDiTConfig, PatchEmbed, TimeTextEmbed, check_inputs
from unet.sd_unet import ControlHook

# The MMDiT tensors a ControlNet copies (diffusers SD3ControlNetModel.from_transformer): embedders and blocks < N.
COPIED_PREFIXES = ("pos_embed.", "time_text_embed.", "context_embedder.")


@dataclass(frozen=True)
class SD3ControlNetConfig:
    mmdit: MMDiTConfig = MMDiTConfig()  # the MMDiT whose embedders and first blocks are copied
    num_layers: int = 12  # N copied joint blocks, one residual each (InstantX SD3 ControlNets: 6 to 12)
    extra_conditioning_channels: int = 0  # control latent channels beyond the MMDiT's in_channels (inpainting: 1)


class SD3ControlNet(nn.Module):
    """(x, t, context, y, control latent) -> N residuals (B, N_tokens, C) for residual_hook()."""

    def __init__(self, config: SD3ControlNetConfig):
        super().__init__()
        cfg = self.config = config
        m, C = cfg.mmdit, cfg.mmdit.hidden
        if cfg.num_layers < 1:
            raise ValueError(f"SD3 ControlNet num_layers must be at least 1, got {cfg.num_layers}")
        self.gradient_checkpointing = False  # recompute each block's activations in backward (one switch, STYLE §2)
        self.pos_embed = PatchEmbed(m.in_channels, C, m.patch_size, m.pos_embed_max_size, m.sample_size // m.patch_size)
        self.time_text_embed = TimeTextEmbed(C, m.pooled_dim)
        self.context_embedder = nn.Linear(m.context_dim, C)
        self.transformer_blocks = nn.ModuleList(
            JointBlock(C, m.heads, m.qk_norm, context_pre_only=False, dual_attention=i in m.dual_attention_layers)
            for i in range(cfg.num_layers))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(C, C) for _ in range(cfg.num_layers))
        self.pos_embed_input = PatchEmbed(m.in_channels + cfg.extra_conditioning_channels, C, m.patch_size)
        self.init_weights()

    def init_weights(self) -> None:
        """Zero connections (ControlNet §3.2): the control's patch embedding and every output Linear start at 0."""
        for layer in [*self.controlnet_blocks, self.pos_embed_input.proj]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_mmdit(cls, mmdit: MMDiT, num_layers: int, extra_conditioning_channels: int = 0) -> SD3ControlNet:
        """A ControlNet whose embedders and blocks start from `mmdit`'s first `num_layers` blocks; zero layers fresh."""
        if not 1 <= num_layers < mmdit.config.depth:
            raise ValueError(f"num_layers must be in 1..{mmdit.config.depth - 1} (the MMDiT's last block is "
                             f"context-pre-only and has no full copy), got {num_layers}")
        model = cls(SD3ControlNetConfig(mmdit.config, num_layers, extra_conditioning_channels))
        blocks = tuple(f"transformer_blocks.{i}." for i in range(num_layers))
        state = {k: v for k, v in mmdit.state_dict().items() if k.startswith(COPIED_PREFIXES + blocks)}
        return load_into(model, state, what="SD3 ControlNet copied from the MMDiT", mode="partial")

    def _run(self, block: nn.Module, *args):
        # Gradient checkpointing is applied here, once, for every block of the loop.
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, y: Tensor, control: Tensor,
                scale: float = 1.0) -> list[Tensor]:
        m = self.config.mmdit
        check_inputs(m, x, context, y)
        c_in = m.in_channels + self.config.extra_conditioning_channels
        if control.ndim != 4 or control.shape[0] != x.shape[0] or control.shape[1] != c_in \
                or control.shape[2:] != x.shape[2:]:
            raise ValueError(f"SD3 ControlNet control latent must be (B={x.shape[0]}, {c_in}, {x.shape[2]}, "
                             f"{x.shape[3]}), got {tuple(control.shape)}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # (B,)
        h = self.pos_embed(x) + self.pos_embed_input(control.to(x.dtype))  # (B, N, C): the control enters here
        emb = self.time_text_embed(t, y)  # (B, C)
        context = self.context_embedder(context)  # (B, M, C)
        residuals = []
        for block, zero in zip(self.transformer_blocks, self.controlnet_blocks):
            h, context = self._run(block, h, context, emb)
            residuals.append(scale * zero(h))  # (B, N, C)
        return residuals


def residual_hook(residuals: list[Tensor], depth: int) -> ControlHook:
    """The MMDiT control hook that adds ControlNet residual floor(k / (depth / N)) after joint block k, for every
    block but the last (pre-only) one, as diffusers SD3Transformer2DModel(block_controlnet_hidden_states=...)."""
    if not residuals:
        raise ValueError("residual_hook needs at least one ControlNet residual")
    interval = depth / len(residuals)  # the same float division as diffusers, so the block -> residual map agrees

    def hook(site: str, h: Tensor) -> Tensor:
        k = int(site.removeprefix("block_"))
        return h if k == depth - 1 else h + residuals[int(k / interval)]

    return hook


# --- presets: `tiny` copies two of the tiny MMDiT's four blocks: residual 0 goes after blocks 0 and 1, residual 1
# after block 2 (block 3 is pre-only).
TINY_CONTROLNET = SD3ControlNetConfig(mmdit=TINY, num_layers=2)
