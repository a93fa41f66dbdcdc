"""CLIP text and vision towers: the frozen encoders that condition SD1.5 / SD2 / SDXL and SVD.

ControlNeXt (arXiv 2408.06070) keeps the base model's encoders frozen; this file gives them without transformers or
open_clip. One pre-LN transformer serves both towers: causal for text (SD1.5 CLIP-L, SD2 OpenCLIP-H, SDXL CLIP-L +
OpenCLIP-bigG), bidirectional with a class token for vision (SVD's OpenCLIP ViT-H/14 image encoder).
Reference: transformers@v5.23 `models/clip/modeling_clip.py` (module names and state-dict keys equal its on-disk
layout, `text_model.*` / `vision_model.*`); mlfoundations/open_clip `transformer.py` (OpenCLIP towers, loaded
through encoders/keymap.py); SVD preprocessing as in Stability-AI/generative-models@0ad7de9
`sgm/modules/encoders/modules.py: FrozenOpenCLIPImageEmbedder.preprocess` (see checkpoints.md §5, §6).
Left out: attention/padding masks for the text tower (SD cross-attends all 77 positions), dropout (all zero in these
models), position-embedding interpolation for other image sizes, the contrastive CLIP head (logit_scale), and
gradient checkpointing (the encoders stay frozen).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# CLIP image normalisation (OpenAI CLIP `_transform`; also SVD's feature_extractor/preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ---------------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
    """Multi-head self-attention, separate q/k/v projections (HF names; OpenCLIP's fused in_proj is split on load)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        """(B, T, C) -> (B, T, C); causal=True lets token t see tokens <= t only (text tower)."""
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, T, C/heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, T, C/heads), scale d_head^-1/2
        return self.out_proj(h.transpose(1, 2).flatten(2))  # (B, T, C)


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2. OpenAI CLIP uses quick_gelu x*sigmoid(1.702x); OpenCLIP uses exact (erf) GELU."""

    def __init__(self, width: int, hidden: int, quick_gelu: bool):
        super().__init__()
        self.quick_gelu = quick_gelu
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)  # (B, T, hidden)
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)  # checkpoints.md §12.10
        return self.fc2(h)  # (B, T, C)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width: int, heads: int, hidden: int, quick_gelu: bool, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, hidden, quick_gelu)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The layer stack. Returns every hidden state: the input, then the output of each layer (HF `hidden_states`)."""

    def __init__(self, layers: int, width: int, heads: int, hidden: int, quick_gelu: bool, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(width, heads, hidden, quick_gelu, eps) for _ in range(layers))

    def forward(self, x: Tensor, causal: bool) -> tuple[Tensor, ...]:
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], causal))
        return tuple(states)  # layers + 1 tensors, each (B, T, C)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding (positions are always arange(T), §12.11)."""

    def __init__(self, vocab_size: int, max_positions: int, width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_positions, width)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, C)


class CLIPVisionEmbeddings(nn.Module):
    """ViT patchify (stride = patch, no bias), a learned class token in front, learned positions."""

    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.patch_embedding = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, width)

    def forward(self, pixels: Tensor) -> Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, C), N = (H/patch)*(W/patch)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([cls, patches], dim=1)  # (B, 1+N, C)
        assert x.shape[1] == self.position_embedding.num_embeddings, f"image gives {x.shape[1]} tokens"
        return x + self.position_embedding.weight  # (B, 1+N, C)


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPConfig:
    vision: bool = False              # False: causal text tower (CLIPTextModel); True: ViT tower (CLIPVisionModel)
    hidden_size: int = 768            # transformer width
    num_hidden_layers: int = 12       # SD2's diffusers text_encoder keeps 23 of OpenCLIP-H's 24 (§5.2)
    num_attention_heads: int = 12     # head dim = hidden_size / heads (64 for the text towers, 80 for ViT-H vision)
    intermediate_size: int = 3072     # MLP hidden width (4 x hidden_size here)
    quick_gelu: bool = True           # OpenAI CLIP-L only; every OpenCLIP tower uses exact GELU (§12.10)
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # text_projection / visual_projection width; None: no projection layer
    vocab_size: int = 49408           # text: BPE vocabulary (tokenizer.py)
    max_position_embeddings: int = 77  # text: context length
    eos_token_id: int = 49407         # text: the pooled output is read at the first position holding this id
    image_size: int = 224             # vision: input resolution (square)
    patch_size: int = 14              # vision: ViT patch side


# ---------------------------------------------------------------------------------------------------------------------
# Towers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPOutput:
    last_hidden_state: Tensor       # (B, T, C): text: final LN of the last layer; vision: last layer, no LN (as HF)
    hidden_states: tuple[Tensor, ...]  # layers + 1 x (B, T, C), no LN: [0] embeddings, [-2] penultimate (clip skip)
    pooled: Tensor                  # (B, C): text: last_hidden_state at the first eos; vision: post-LN class token
    embeds: Tensor | None           # (B, P): projection of `pooled` (text_embeds / image_embeds), None without one


class CLIPTextTransformer(nn.Module):
    """embeddings -> causal pre-LN encoder -> final LayerNorm (HF `text_model`)."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(c.vocab_size, c.max_position_embeddings, c.hidden_size)
        self.encoder = CLIPEncoder(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size,
                                   c.quick_gelu, c.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPVisionTransformer(nn.Module):
    """embeddings -> pre LayerNorm -> encoder; post LayerNorm on the class token only (HF `vision_model`)."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(c.image_size, c.patch_size, c.hidden_size)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # sic: the HF key is spelled so
        self.encoder = CLIPEncoder(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size,
                                   c.quick_gelu, c.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """Text tower. Keys: `text_model.*` (+ `text_projection.weight`), as HF CLIPTextModel(WithProjection) files."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        assert not config.vision, "CLIPTextModel needs a text config (vision=False)"
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = (nn.Linear(config.hidden_size, config.projection_dim, bias=False)
                                if config.projection_dim else None)
        self.init_weights()

    def init_weights(self) -> None:
        """Random init for training from scratch / tests (real use loads weights): N(0, 0.02) embeddings as CLIP."""
        nn.init.normal_(self.text_model.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_model.embeddings.position_embedding.weight, std=0.01)

    def forward(self, input_ids: Tensor) -> CLIPOutput:
        """input_ids (B, T) from tokenizer.py -> CLIPOutput. SD1.5 uses last_hidden_state, SDXL hidden_states[-2]."""
        m = self.text_model
        x = m.embeddings(input_ids)  # (B, T, C)
        states = m.encoder(x, causal=True)  # layers + 1 x (B, T, C)
        last = m.final_layer_norm(states[-1])  # (B, T, C)
        # Pool at the first eos. OpenCLIP and HF's legacy path take argmax(input_ids) instead; that is the same
        # position for every sequence the CLIP tokenizer makes, since eos (49407) is the largest id (§5.3).
        eos_at = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # (B,)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos_at]  # (B, C)
        embeds = self.text_projection(pooled) if self.text_projection is not None else None  # (B, P)
        return CLIPOutput(last, states, pooled, embeds)


class CLIPVisionModel(nn.Module):
    """Vision tower. Keys: `vision_model.*` (+ `visual_projection.weight`), as HF CLIPVisionModelWithProjection."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        assert config.vision, "CLIPVisionModel needs a vision config (vision=True)"
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = (nn.Linear(config.hidden_size, config.projection_dim, bias=False)
                                  if config.projection_dim else None)
        self.init_weights()

    def init_weights(self) -> None:
        """Random init (real use loads weights): class token and positions N(0, width^-1/2) as OpenCLIP's ViT."""
        std = self.config.hidden_size ** -0.5
        nn.init.normal_(self.vision_model.embeddings.class_embedding, std=std)
        nn.init.normal_(self.vision_model.embeddings.position_embedding.weight, std=std)

    def forward(self, pixels: Tensor) -> CLIPOutput:
        """pixels (B, 3, S, S), already normalised (see preprocess_image) -> CLIPOutput; SVD uses `embeds`."""
        m = self.vision_model
        x = m.pre_layrnorm(m.embeddings(pixels))  # (B, 1+N, C)
        states = m.encoder(x, causal=False)  # layers + 1 x (B, 1+N, C)
        pooled = m.post_layernorm(states[-1][:, 0])  # (B, C): the class token
        embeds = self.visual_projection(pooled) if self.visual_projection is not None else None  # (B, P)
        return CLIPOutput(states[-1], states, pooled, embeds)


def build_clip(config: CLIPConfig) -> CLIPTextModel | CLIPVisionModel:
    """The tower a config describes."""
    return CLIPVisionModel(config) if config.vision else CLIPTextModel(config)


# ---------------------------------------------------------------------------------------------------------------------
# SVD image preprocessing
# ---------------------------------------------------------------------------------------------------------------------


def _gaussian_blur(x: Tensor, sigma: float, size: int, dim: int) -> Tensor:
    """Separable Gaussian blur along one spatial dim (-1: width, -2: height), reflect padding; `size` is odd."""
    offsets = torch.arange(size, dtype=x.dtype, device=x.device) - size // 2  # (size,)
    kernel = torch.exp(-offsets.pow(2) / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).view(1, 1, *((1, size) if dim == -1 else (size, 1)))  # (1, 1, kh, kw)
    pad = (size // 2, size // 2, 0, 0) if dim == -1 else (0, 0, size // 2, size // 2)
    C = x.shape[1]
    return F.conv2d(F.pad(x, pad, mode="reflect"), kernel.expand(C, 1, -1, -1), groups=C)  # (B, C, H, W)


def preprocess_image(image: Tensor, size: int = 224) -> Tensor:
    """SVD's CLIP input: (B, 3, H, W) in [-1, 1] -> (B, 3, size, size), squashed to a square (no crop), normalised.

    "Antialiased bicubic" is kornia's `resize(..., antialias=True)` that SGM calls (diffusers
    `_resize_with_antialiasing` repeats it): a Gaussian blur with sigma = (factor - 1) / 2 and kernel ~4 sigma
    (odd, >= 3), then bicubic interpolation with align_corners=True. It is not torch's antialias=True resampling.
    """
    H, W = image.shape[-2:]
    x = image
    for dim, factor in ((-1, W / size), (-2, H / size)):  # width first, then height, as kornia
        sigma = max((factor - 1.0) / 2.0, 0.001)
        kernel = int(max(4.0 * sigma, 3))
        x = _gaussian_blur(x, sigma, kernel + 1 - kernel % 2, dim)  # kernel size made odd
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)  # (B, 3, size, size)
    x = (x + 1.0) / 2.0  # [-1, 1] -> [0, 1]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------------------------------
# Presets (checkpoints.md §5.3, §7.4)
# ---------------------------------------------------------------------------------------------------------------------

# OpenAI CLIP ViT-L/14 text: SD1.5 text_encoder and SDXL text_encoder (123,060,480 params).
CLIP_L = CLIPConfig()
# OpenCLIP ViT-H/14 text as SD2's diffusers text_encoder: 23 of 24 layers, no projection (340,387,840 params).
OPENCLIP_H_TEXT = CLIPConfig(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096,
                             quick_gelu=False)
# OpenCLIP ViT-bigG/14 text with projection: SDXL text_encoder_2 (694,659,840 params).
OPENCLIP_BIGG_TEXT = CLIPConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                                intermediate_size=5120, quick_gelu=False, projection_dim=1280)
# OpenCLIP ViT-H/14 vision with projection: SVD image_encoder (632,076,800 params).
OPENCLIP_H_VISION = CLIPConfig(vision=True, hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                               intermediate_size=5120, quick_gelu=False, projection_dim=1024)
# CPU-sized towers for tests: a 1000-token vocabulary whose last id is eos, a 32x32 image of 8x8 patches.
TINY = CLIPConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, projection_dim=16,
                  vocab_size=1000, max_position_embeddings=77, eos_token_id=999)
TINY_VISION = CLIPConfig(vision=True, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                         quick_gelu=False, projection_dim=16, image_size=32, patch_size=8)

PRESETS = {"clip_l": CLIP_L, "openclip_h_text": OPENCLIP_H_TEXT, "openclip_bigg_text": OPENCLIP_BIGG_TEXT,
           "openclip_h_vision": OPENCLIP_H_VISION, "tiny": TINY, "tiny_vision": TINY_VISION}


def config_from_hf(hf: dict) -> CLIPConfig:
    """CLIPConfig from a transformers config.json (text_encoder/, text_encoder_2/, image_encoder/)."""
    arch = (hf.get("architectures") or [""])[0]
    vision = "Vision" in arch or hf.get("model_type") == "clip_vision_model"
    if hf.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not a CLIP activation (quick_gelu, gelu)")
    vocab_size = hf.get("vocab_size", 49408)
    eos = hf.get("eos_token_id", 49407)
    return CLIPConfig(
        vision=vision,
        hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        quick_gelu=hf.get("hidden_act", "quick_gelu") == "quick_gelu", layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        # transformers builds the projection for the *WithProjection classes only; projection_dim is set regardless
        projection_dim=hf.get("projection_dim") if "WithProjection" in arch else None,
        vocab_size=vocab_size, max_position_embeddings=hf.get("max_position_embeddings", 77),
        # eos_token_id 2 is the legacy placeholder of the released configs; transformers then pools at argmax(ids),
        # i.e. at the largest id, which is eos (vocab_size - 1) for the CLIP vocabulary
        eos_token_id=vocab_size - 1 if eos == 2 else eos,
        image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 14),
    )


def count_parameters(config: CLIPConfig) -> int:
    """Parameters of a full-size tower, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_clip(config)
    return sum(p.numel() for p in model.parameters())

