"""A tiny word-level text encoder for the fill50k toy: the stand-in for CLIP's text tower in pixel-space experiments.

Tokens are whole words from a fixed vocabulary (the fill50k prompt words), a start token and padding, as CLIP's
tower has (Radford et al. 2021, §2.4: [SOS] text [EOS] padded to a fixed length); the encoder is token + position
embeddings, pre-LayerNorm transformer layers with the UNet's own blocks (unet/blocks.py TransformerBlock, used here
without cross-attention context: it attends to itself) and a final LayerNorm, giving `context` (B, L, D) like CLIP's
last hidden state. It is trained together with the toy UNet in the base stage (train.py --stage=base) and frozen after.
Left out: BPE, a pooled output, causal masking (the toy has no use for them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unet.blocks import TransformerBlock

PAD, START, UNKNOWN = "<pad>", "<start>", "<unk>"


@dataclass(frozen=True)
class ToyTextConfig:
    max_length: int = 16  # tokens per prompt including START (fill50k prompts have at most 12 words)
    dim: int = 64  # token width = the UNet's context_dim
    layers: int = 1  # transformer layers
    heads: int = 2  # attention heads


class ToyTextEncoder(nn.Module):
    """prompts (list of B strings) -> context (B, max_length, dim). `vocab`: the known words (controlnext.data.VOCAB)."""

    def __init__(self, config: ToyTextConfig, vocab: Sequence[str]):
        super().__init__()
        self.config = cfg = config
        self.tokens = (PAD, START, UNKNOWN) + tuple(vocab)
        self.index = {word: i for i, word in enumerate(self.tokens)}
        self.token_embedding = nn.Embedding(len(self.tokens), cfg.dim)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.dim)
        # Self-attention only: the block's "cross" attention is pointed at the tokens themselves.
        self.layers = nn.ModuleList(TransformerBlock(cfg.dim, cfg.heads, cfg.dim) for _ in range(cfg.layers))
        self.final_layer_norm = nn.LayerNorm(cfg.dim)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Lower-case words -> ids (B, max_length): START, words (unknown words -> UNKNOWN), PAD to the end."""
        ids = torch.full((len(prompts), self.config.max_length), self.index[PAD], dtype=torch.long)
        for b, prompt in enumerate(prompts):
            words = [self.index.get(w, self.index[UNKNOWN]) for w in prompt.lower().split()]
            if len(words) + 1 > self.config.max_length:
                raise ValueError(f"prompt has {len(words)} words, the toy encoder takes {self.config.max_length - 1}: "
                                 f"{prompt!r}")
            ids[b, : len(words) + 1] = torch.tensor([self.index[START]] + words)
        return ids

    def forward(self, prompts: list[str]) -> Tensor:
        ids = self.tokenize(prompts).to(self.token_embedding.weight.device)  # (B, L)
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.token_embedding(ids) + self.position_embedding(positions)  # (B, L, D)
        for layer in self.layers:
            h = layer(h, h)  # (B, L, D): self-attention, self "context", feed-forward
        return self.final_layer_norm(h)


# One line per preset. TOY: the fill50k toy's encoder; its width is unet.sd_unet.TOY.context_dim.
TOY = ToyTextConfig()
TINY = ToyTextConfig(max_length=16, dim=32, layers=1, heads=2)
PRESETS = {"toy": TOY, "tiny": TINY}
