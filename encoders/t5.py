"""T5 v1.1 encoder: SD3's third text encoder (T5-XXL), the 4096-wide token stream the MMDiT attends to.

T5 is Raffel et al. 2020 (JMLR 21, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer") §2.1: a pre-norm transformer whose layer norm only rescales (RMS, no mean, no bias), whose attention has
no 1/sqrt(d) scaling (folded into the initialisation of q, see init_weights) and no absolute positions: a learned
scalar per head and per relative-distance bucket is added to the attention logits. The buckets are computed once, in
the first layer, and that layer's table is shared by all layers. Version 1.1 (google-research/text-to-text-transfer-
transformer, released_checkpoints.md "T5.1.1") changes the feed-forward to gated GELU (tanh approximation), drops
dropout in pre-training and unties the input embedding from the (decoder) LM head. SD3 uses the encoder half of
google/t5-v1_1-xxl, frozen, and reads the last hidden state after the final norm.
Reference: transformers@v5.23 `models/t5/modeling_t5.py` (T5EncoderModel): module names and state-dict keys equal its
on-disk layout (`shared.weight`, `encoder.block.{i}.layer.0.SelfAttention.q.weight`, ...), so a diffusers SD3
`text_encoder_3/` folder loads by identity (controlnext/t5_weights.py). The embedding: transformers' T5EncoderModel
holds one embedding under two names (`shared` and the tied `encoder.embed_tokens`); its files store `shared.weight`
only. We keep the one module `shared` and no duplicate: the state dict is the on-disk layout, and the parameter count
counts the embedding once, as transformers' own count does (4,762,310,656 for T5-XXL).
fp16: T5's feed-forward outputs overflow fp16 (max 65504). transformers keeps every `wo` (the FF output projection)
in fp32 when it loads a T5 in fp16 (`_keep_in_fp32_modules = ["wo"]`; not for bf16), and casts its input up to it;
the fp32 FF output then turns the residual stream fp32 from the first block on. `T5Encoder.cast` does the same, and
the loader uses it. transformers' extra clamp of fp16 hidden states to +-65504 (which only acts on values that are
already inf) is left out: from the first FF on, the stream is fp32.
T5-less SD3 (diffusers `text_encoder_3=None`) puts zeros where the T5 tokens would be: (B, SD3_MAX_LENGTH, d_model),
with SD3_MAX_LENGTH = 256 in encoders/t5_tokenizer.py and d_model = T5_XXL.d_model = 4096 (the MMDiT's
joint_attention_dim); building them is the pipeline's job.
Left out: the decoder, the LM head, dropout (0 at inference and in v1.1 pre-training), the original T5's ReLU
feed-forward (v1.0; config_from_hf rejects it), incremental decoding caches and gradient checkpointing (the encoder
stays frozen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets (Raffel et al. §2.1, Mesh TensorFlow `_relative_position_bucket`), int64 in [0, nb).

    relative_position = key position - query position. Half the buckets are for keys after the query. In each half,
    distances below a quarter of the buckets get one bucket each; larger ones share logarithmically wider buckets up
    to max_distance, and everything beyond lands in the last bucket.
    """
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half  # the second half holds keys that come after the query
    distance = relative_position.abs()
    exact = half // 2  # distances 0 .. exact-1 are exact
    # the float ops of the reference, in this order, so the integer buckets agree at the boundaries; the clamp only
    # keeps log() finite on the short distances, whose value torch.where discards
    log_ratio = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    wide = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, wide)


class T5LayerNorm(nn.Module):
    """RMS norm: x / sqrt(mean(x^2) + eps) * weight; no mean subtraction, no bias, the mean of squares in fp32."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # (B, T, 1), fp32 even for fp16 input
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)  # (B, T, C)


class T5Attention(nn.Module):
    """Multi-head self-attention without 1/sqrt(d) scaling, with an additive bias (relative positions + padding)."""

    def __init__(self, width: int, heads: int, head_width: int, num_buckets: int, max_distance: int,
                 has_relative_bias: bool):
        super().__init__()
        self.heads, self.num_buckets, self.max_distance = heads, num_buckets, max_distance
        inner = heads * head_width  # equals width for the released models; T5 allows it to differ
        self.q = nn.Linear(width, inner, bias=False)
        self.k = nn.Linear(width, inner, bias=False)
        self.v = nn.Linear(width, inner, bias=False)
        self.o = nn.Linear(inner, width, bias=False)
        # only the first layer owns the table; the others receive its bias (T5Stack.forward)
        self.relative_attention_bias = nn.Embedding(num_buckets, heads) if has_relative_bias else None

    def position_bias(self, length: int) -> Tensor:
        """The learned bias b[h, i, j] of query i attending to key j: (1, heads, T, T)."""
        positions = torch.arange(length, device=self.relative_attention_bias.weight.device)  # (T,)
        relative = positions[None, :] - positions[:, None]  # (T, T): key position - query position
        buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance)  # (T, T)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, heads, T, T)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """(B, T, C) and an additive bias broadcastable to (B, heads, T, T) -> (B, T, C)."""
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, T, head_width)
                   for proj in (self.q, self.k, self.v))
        # scale=1: T5 has no 1/sqrt(d) in the logits, its q initialisation carries it (init_weights)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, heads, T, head_width)
        return self.o(h.transpose(1, 2).flatten(2))  # (B, T, C)


class T5GatedFeedForward(nn.Module):
    """T5 v1.1 feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x), no biases (transformers `T5DenseGatedActDense`)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.wi_0 = nn.Linear(width, hidden, bias=False)
        self.wi_1 = nn.Linear(width, hidden, bias=False)
        self.wo = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, T, hidden); "gelu_new" in transformers
        # In fp16 `wo` is kept in fp32 (T5Encoder.cast), so the product is cast up to it and the output is fp32
        return self.wo(h.to(self.wo.weight.dtype))  # (B, T, C)


class T5LayerSelfAttention(nn.Module):
    """Pre-norm residual sublayer: x + attention(norm(x))."""

    def __init__(self, attention: T5Attention, width: int, eps: float):
        super().__init__()
        self.SelfAttention = attention
        self.layer_norm = T5LayerNorm(width, eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5LayerFF(nn.Module):
    """Pre-norm residual sublayer: x + ff(norm(x)). In fp16 the fp32 FF output makes the sum (the stream) fp32."""

    def __init__(self, width: int, hidden: int, eps: float):
        super().__init__()
        self.DenseReluDense = T5GatedFeedForward(width, hidden)  # the name of v1.0's ReLU FF, kept by the files
        self.layer_norm = T5LayerNorm(width, eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """Self-attention sublayer, then feed-forward sublayer; held in a list so the keys read `layer.0` / `layer.1`."""

    def __init__(self, c: T5Config, has_relative_bias: bool):
        super().__init__()
        attention = T5Attention(c.d_model, c.num_heads, c.d_kv, c.relative_attention_num_buckets,
                                c.relative_attention_max_distance, has_relative_bias)
        self.layer = nn.ModuleList([T5LayerSelfAttention(attention, c.d_model, c.layer_norm_epsilon),
                                    T5LayerFF(c.d_model, c.d_ff, c.layer_norm_epsilon)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    """The encoder layers and the final RMS norm (transformers `T5Stack`, minus its alias of the embedding)."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(c, has_relative_bias=i == 0) for i in range(c.num_layers))
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, T, C) embeddings, optional (B, T) key mask (1 attend, 0 padding) -> (B, T, C) after the final norm."""
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])  # (1, heads, T, T), for every layer
        if attention_mask is not None:
            # padded keys get the most negative logit, as transformers' SDPA path: where(mask, bias, finfo.min)
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
            bias = torch.where(keep, bias, torch.finfo(bias.dtype).min)  # (B, heads, T, T)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128           # embedding rows: 32000 SentencePiece pieces + 100 sentinels, padded to 128s
    d_model: int = 4096               # residual stream width (SD3's joint_attention_dim)
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64                    # per-head width; num_heads * d_kv is the attention's inner width
    d_ff: int = 10240                 # gated feed-forward hidden width
    relative_attention_num_buckets: int = 32  # both directions together (16 each)
    relative_attention_max_distance: int = 128  # distances beyond share the last bucket
    layer_norm_epsilon: float = 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


class T5Encoder(nn.Module):
    """Token embedding `shared` -> T5Stack `encoder`. Keys equal transformers' T5EncoderModel files."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)
        self.init_weights()

    def init_weights(self) -> None:
        """Random init for tests (real use loads weights): Mesh TensorFlow's T5 init, as transformers' _init_weights.

        The attention logits are not divided by sqrt(d_kv): q's std carries that factor instead, (d_model*d_kv)^-1/2.
        """
        c = self.config
        nn.init.normal_(self.shared.weight, std=1.0)
        for block in self.encoder.block:
            attention, ff = block.layer[0].SelfAttention, block.layer[1].DenseReluDense
            nn.init.normal_(attention.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
            nn.init.normal_(attention.k.weight, std=c.d_model ** -0.5)
            nn.init.normal_(attention.v.weight, std=c.d_model ** -0.5)
            nn.init.normal_(attention.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
            if attention.relative_attention_bias is not None:
                nn.init.normal_(attention.relative_attention_bias.weight, std=c.d_model ** -0.5)
            nn.init.normal_(ff.wi_0.weight, std=c.d_model ** -0.5)
            nn.init.normal_(ff.wi_1.weight, std=c.d_model ** -0.5)
            nn.init.normal_(ff.wo.weight, std=c.d_ff ** -0.5)

    def cast(self, dtype: torch.dtype) -> T5Encoder:
        """self.to(dtype), except that in fp16 the FF output projections `wo` stay fp32 (transformers'
        `_keep_in_fp32_modules = ["wo"]`, applied for fp16 only; see the module docstring)."""
        keep = {id(p) for block in self.encoder.block for p in block.layer[1].DenseReluDense.wo.parameters()
                } if dtype == torch.float16 else set()
        with torch.no_grad():
            for p in self.parameters():  # in place, so a `wo` loaded in fp32 never passes through fp16
                p.data = p.data.to(torch.float32 if id(p) in keep else dtype)
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, T), optional attention_mask (B, T) with 0 at padding -> last hidden state (B, T, d_model).

        SD3 passes no mask: it pads to 256 tokens and attends to all of them, padding included.
        """
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}: pass a (B, T) mask with 1 for tokens and 0 for padding")
        x = self.shared(input_ids)  # (B, T, C)
        return self.encoder(x, attention_mask)  # (B, T, C)


# ---------------------------------------------------------------------------------------------------------------------
# Presets, transformers config.json, parameter count
# ---------------------------------------------------------------------------------------------------------------------

# google/t5-v1_1-xxl encoder: SD3's text_encoder_3 (4,762,310,656 parameters).
T5_XXL = T5Config()
# google/t5-v1_1-base encoder (109,628,544 parameters): a smaller real T5 v1.1 to try the pipeline with.
T5_BASE = T5Config(d_model=768, num_layers=12, num_heads=12, d_kv=64, d_ff=2048)
# CPU-sized encoder for tests; the released bucket settings, so sequences over 128 tokens reach every bucket.
TINY = T5Config(vocab_size=200, d_model=32, num_layers=3, num_heads=4, d_kv=8, d_ff=48)

PRESETS = {"t5_xxl": T5_XXL, "t5_base": T5_BASE, "tiny": TINY}


def config_from_hf(hf: dict) -> T5Config:
    """T5Config from a transformers config.json (text_encoder_3/ of a diffusers SD3 folder, google/t5-v1_1-*)."""
    missing = [f for f in ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff") if f not in hf]
    if missing:
        raise ValueError(f"config.json: not a T5 config (no {', '.join(missing)})")
    proj = hf.get("feed_forward_proj", "relu")  # transformers' default when the field is absent is v1.0's ReLU
    if proj != "gated-gelu":
        raise ValueError(f"config.json: feed_forward_proj {proj!r} is not T5 v1.1 ('gated-gelu'); "
                         "this encoder implements T5 v1.1 only")
    return T5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_layers=hf["num_layers"], num_heads=hf["num_heads"],
        d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
    )


def count_parameters(config: T5Config) -> int:
    """Parameters of a full-size encoder, counted on the meta device (no memory); the embedding counts once."""
    with torch.device("meta"):
        model = T5Encoder(config)
    return sum(p.numel() for p in model.parameters())
