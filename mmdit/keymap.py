"""Checkpoint formats of the MMDiT: rows from the original single file to ours, config.json translation, detection.

Our module names equal diffusers' SD3Transformer2DModel, so a diffusers `transformer/` folder loads with no rows.
The rows below rename the original layout of Stability-AI/sd3.5@8df03ab3:mmditx.py, as the released single files
hold it under `model.diffusion_model.` (prefix stripped before these rows apply). Two named transforms of the engine
(controlnext/checkpoint.py) do the non-renaming work, each checked against diffusers' own converter
(huggingface/diffusers@v0.42.1:src/diffusers/loaders/single_file_utils.py convert_sd3_transformer_checkpoint_to_diffusers,
tests/test_mmdit.py):
- `split_qkv`: the original fuses each stream's q, k, v into one `attn.qkv` Linear [3C, C]; diffusers keeps three.
- `swap_halves`: the final layer's adaLN and the last block's pre-only context adaLN emit (shift, scale) in the
  original and (scale, shift) in diffusers' AdaLayerNormContinuous (the converter's swap_scale_shift).
Export (ours -> original) cannot split a row into three sources, so the writer fuses q, k, v first and uses
`export_rows`, whose qkv rows name the fused tensors (`to_qkv.`, `add_qkv_proj.`); everything else is shared.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from mmdit.mmdit import MMDiTConfig

# Per joint block i: (original suffix, our suffix[, transform]) under joint_blocks.{i}. / transformer_blocks.{i}.
BLOCK_ROWS = [
    ("x_block.attn.ln_q.", "attn.norm_q."),
    ("x_block.attn.ln_k.", "attn.norm_k."),
    ("x_block.attn.proj.", "attn.to_out.0."),
    ("context_block.attn.ln_q.", "attn.norm_added_q."),
    ("context_block.attn.ln_k.", "attn.norm_added_k."),
    ("context_block.attn.proj.", "attn.to_add_out."),
    ("x_block.attn2.ln_q.", "attn2.norm_q."),  # SD3.5-medium's image-only attention (MMDiT-X)
    ("x_block.attn2.ln_k.", "attn2.norm_k."),
    ("x_block.attn2.proj.", "attn2.to_out.0."),
    ("x_block.adaLN_modulation.1.", "norm1.linear."),  # index 0 of the Sequential is the SiLU
    ("context_block.adaLN_modulation.1.", "norm1_context.linear."),
    ("x_block.mlp.fc1.", "ff.net.0.proj."),
    ("x_block.mlp.fc2.", "ff.net.2."),
    ("context_block.mlp.fc1.", "ff_context.net.0.proj."),
    ("context_block.mlp.fc2.", "ff_context.net.2."),
]
# The fused projections: loading splits them; export reads the tensors the writer fused (to_qkv., add_qkv_proj.).
QKV_ROWS = [("x_block.attn.qkv.", "attn.to_{qkv}.", "attn.to_qkv."),
            ("context_block.attn.qkv.", "attn.add_{qkv}_proj.", "attn.add_qkv_proj."),
            ("x_block.attn2.qkv.", "attn2.to_{qkv}.", "attn2.to_qkv.")]

EMBEDDING_ROWS = [
    ("x_embedder.proj.", "pos_embed.proj."),
    ("pos_embed", "pos_embed.pos_embed"),  # the stored position table (a buffer in both layouts)
    ("t_embedder.mlp.0.", "time_text_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_text_embed.timestep_embedder.linear_2."),
    ("y_embedder.mlp.0.", "time_text_embed.text_embedder.linear_1."),
    ("y_embedder.mlp.2.", "time_text_embed.text_embedder.linear_2."),
    ("context_embedder.", "context_embedder."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear.", "swap_halves"),
]


def _rows(depth: int, export: bool) -> list[tuple]:
    rows = [*EMBEDDING_ROWS, *[(f"joint_blocks.{{i}}.{a}", f"transformer_blocks.{{i}}.{b}") for a, b in BLOCK_ROWS]]
    for source, split, fused in QKV_ROWS:
        rows.append((f"joint_blocks.{{i}}.{source}", f"transformer_blocks.{{i}}.{fused}") if export else
                    (f"joint_blocks.{{i}}.{source}", f"transformer_blocks.{{i}}.{split}", "split_qkv"))
    # The last block's context stream is pre-only: its adaLN is the (shift, scale) pair of a continuous adaLN. A
    # literal row for that one block outranks the {i} row (the engine's longest-match rule).
    last = depth - 1
    rows.append((f"joint_blocks.{last}.context_block.adaLN_modulation.1.",
                 f"transformer_blocks.{last}.norm1_context.linear.", "swap_halves"))
    return rows


def original_rows(depth: int) -> list[tuple]:
    """Load rows: original (`model.diffusion_model.` stripped) -> ours, for a model of `depth` joint blocks."""
    return _rows(depth, export=False)


def export_rows(depth: int) -> list[tuple]:
    """Rows whose inverse writes the original layout from our names with q, k, v already fused (see module doc)."""
    return _rows(depth, export=True)


def original_depth(state: Mapping[str, Tensor]) -> int:
    """The number of joint blocks of an original-layout state dict (0 if it has none)."""
    blocks = {int(m[1]) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    return max(blocks) + 1 if blocks else 0


# --- config: from the weights' shapes, and diffusers config.json <-> MMDiTConfig

DETECT_KEYS = ("pos_embed.proj.weight", "pos_embed.pos_embed", "context_embedder.weight", "proj_out.weight",
               "time_text_embed.text_embedder.linear_1.weight")


def detect_config(state: Mapping[str, Tensor]) -> MMDiTConfig:
    """MMDiTConfig from a state dict in our (diffusers) names. Not in the weights: sample_size (128 in every
    release) and, without qk_norm weights, the head count: mmditx.py's rule heads = depth (hidden = 64 * depth)."""
    missing = [k for k in DETECT_KEYS if k not in state]
    if missing:
        raise ValueError(f"cannot detect the MMDiT config: no {', '.join(missing)} in the weights; pass config=")
    proj = state["pos_embed.proj.weight"]  # (C, C_in, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = 1 + max(int(m[1]) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    norm_q = state.get("transformer_blocks.0.attn.norm_q.weight")
    head_dim = norm_q.shape[0] if norm_q is not None else hidden // depth
    return MMDiTConfig(
        in_channels=in_channels, out_channels=state["proj_out.weight"].shape[0] // patch ** 2, patch_size=patch,
        depth=depth, heads=hidden // head_dim, head_dim=head_dim,
        context_dim=state["context_embedder.weight"].shape[1],
        pooled_dim=state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        pos_embed_max_size=round(state["pos_embed.pos_embed"].shape[1] ** 0.5), qk_norm=norm_q is not None,
        dual_attention_layers=tuple(sorted({int(m[1]) for k in state
                                            if (m := re.match(r"transformer_blocks\.(\d+)\.attn2\.", k))})))


# diffusers SD3Transformer2DModel fields -> ours; caption_projection_dim must equal the hidden width (the attention
# takes both streams at one width), qk_norm is None or "rms_norm".
DIFFUSERS_FIELDS = {"in_channels": "in_channels", "out_channels": "out_channels", "patch_size": "patch_size",
                    "num_layers": "depth", "num_attention_heads": "heads", "attention_head_dim": "head_dim",
                    "joint_attention_dim": "context_dim", "pooled_projection_dim": "pooled_dim",
                    "pos_embed_max_size": "pos_embed_max_size", "sample_size": "sample_size"}
IGNORED_FIELDS = ("_class_name", "_diffusers_version", "_name_or_path")


def config_from_diffusers(d: Mapping) -> MMDiTConfig:
    """MMDiTConfig from the fields of a diffusers SD3Transformer2DModel config.json."""
    unknown = sorted(set(d) - set(DIFFUSERS_FIELDS) - set(IGNORED_FIELDS)
                     - {"caption_projection_dim", "qk_norm", "dual_attention_layers"})
    if unknown:
        raise ValueError(f"MMDiT config.json: unknown fields {unknown}")
    if d.get("qk_norm") not in (None, "rms_norm"):
        raise ValueError(f"MMDiT config.json: qk_norm={d['qk_norm']!r} is not supported (expected null or 'rms_norm')")
    cfg = MMDiTConfig(**{ours: d[theirs] for theirs, ours in DIFFUSERS_FIELDS.items() if theirs in d},
                      qk_norm=d.get("qk_norm") == "rms_norm",
                      dual_attention_layers=tuple(d.get("dual_attention_layers", ())))
    if not all(0 <= i < cfg.depth - 1 for i in cfg.dual_attention_layers):
        raise ValueError(f"MMDiT config.json: dual_attention_layers={list(cfg.dual_attention_layers)} must lie in "
                         f"0..{cfg.depth - 2} (the last block's context stream is pre-only)")
    if d.get("caption_projection_dim", cfg.hidden) != cfg.hidden:
        raise ValueError(f"MMDiT config.json: caption_projection_dim={d['caption_projection_dim']} must equal "
                         f"num_attention_heads * attention_head_dim = {cfg.hidden}")
    return cfg


def config_to_diffusers(cfg: MMDiTConfig) -> dict:
    """The config.json of the diffusers SD3Transformer2DModel equal to `cfg` (export; references in tests)."""
    return {"_class_name": "SD3Transformer2DModel",
            **{theirs: getattr(cfg, ours) for theirs, ours in DIFFUSERS_FIELDS.items()},
            "caption_projection_dim": cfg.hidden, "qk_norm": "rms_norm" if cfg.qk_norm else None,
            "dual_attention_layers": list(cfg.dual_attention_layers)}
