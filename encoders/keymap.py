"""Key maps (data) for the CLIP towers of encoders/clip.py, applied by controlnext/checkpoint.py's engine.

Our module names equal the transformers on-disk layout (`text_model.*`, `text_projection.weight`, `vision_model.*`,
`visual_projection.weight`), so HF folders (text_encoder/, text_encoder_2/, image_encoder/) need only drop rows.
The OpenCLIP naming (SD2 and SDXL-bigG text towers, SVD's ViT-H image tower) is renamed here: the fused attention
`in_proj` is split into q/k/v and the `x @ W` projections are transposed (named transforms of the engine).
Reference: checkpoints.md §1 (keys to ignore), §2.1 (prefixes), §5.1-§5.2 (the mapping, checked there against
open_clip 3.3 and transformers 5.23 on small random towers). Rows are matched after the single-file prefix is
stripped (SINGLE_FILE below says which rows follow which prefix). EXPORT gives the rows whose inverse writes each
original layout (fused in_proj by the engine's join), and clip_config_to_hf the transformers config.json.
Checked in tests/test_keymaps.py against the full key lists of open_clip's and transformers' towers.
"""

from __future__ import annotations

from encoders.clip import CLIPConfig

# --- transformers layout (identity). Stored position_ids are dropped: some merges hold corrupted values (§1, §12.11).
HF_TEXT = [
    ("text_model.embeddings.position_ids", None),
    ("embeddings.position_ids", None),
    # SD1 fine-tunes that omit the `text_model.` level (and transformers >= 5.6 in-memory names, §5.1): put it back.
    ("embeddings.", "text_model.embeddings."),
    ("encoder.", "text_model.encoder."),
    ("final_layer_norm.", "text_model.final_layer_norm."),
]
HF_VISION = [
    ("vision_model.embeddings.position_ids", None),
]

# --- OpenCLIP text tower (open_clip `CLIP` minus `.visual`; SD2 `cond_stage_model.model.`, SDXL embedder 1).
OPENCLIP_TEXT_LAYERS = [
    ("token_embedding.", "text_model.embeddings.token_embedding."),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("transformer.resblocks.{i}.ln_1.", "text_model.encoder.layers.{i}.layer_norm1."),
    ("transformer.resblocks.{i}.ln_2.", "text_model.encoder.layers.{i}.layer_norm2."),
    ("transformer.resblocks.{i}.attn.in_proj_", "text_model.encoder.layers.{i}.self_attn.{qkv}_proj.", "split_qkv"),
    ("transformer.resblocks.{i}.attn.out_proj.", "text_model.encoder.layers.{i}.self_attn.out_proj."),
    ("transformer.resblocks.{i}.mlp.c_fc.", "text_model.encoder.layers.{i}.mlp.fc1."),
    ("transformer.resblocks.{i}.mlp.c_proj.", "text_model.encoder.layers.{i}.mlp.fc2."),
    ("ln_final.", "text_model.final_layer_norm."),
    ("logit_scale", None),  # contrastive temperature, not part of a tower
    ("attn_mask", None),  # the causal mask buffer of older open_clip versions
    ("visual.", None),  # the unused image tower when a whole open_clip model is given
]
OPENCLIP_TEXT = OPENCLIP_TEXT_LAYERS + [
    ("text_projection", "text_projection.weight", "transpose"),  # [D, P] used as x @ W -> Linear weight [P, D]
]

# --- OpenCLIP image tower (open_clip `CLIP.visual`; SVD `conditioner.embedders.0.open_clip.model.`).
OPENCLIP_VISION = [
    ("visual.conv1.", "vision_model.embeddings.patch_embedding."),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.", "vision_model.pre_layrnorm."),
    ("visual.transformer.resblocks.{i}.ln_1.", "vision_model.encoder.layers.{i}.layer_norm1."),
    ("visual.transformer.resblocks.{i}.ln_2.", "vision_model.encoder.layers.{i}.layer_norm2."),
    ("visual.transformer.resblocks.{i}.attn.in_proj_", "vision_model.encoder.layers.{i}.self_attn.{qkv}_proj.",
     "split_qkv"),
    ("visual.transformer.resblocks.{i}.attn.out_proj.", "vision_model.encoder.layers.{i}.self_attn.out_proj."),
    ("visual.transformer.resblocks.{i}.mlp.c_fc.", "vision_model.encoder.layers.{i}.mlp.fc1."),
    ("visual.transformer.resblocks.{i}.mlp.c_proj.", "vision_model.encoder.layers.{i}.mlp.fc2."),
    ("visual.ln_post.", "vision_model.post_layernorm."),
    ("visual.proj", "visual_projection.weight", "transpose"),  # [D, P] used as x @ W -> Linear weight [P, D]
    # the unused text tower: SVD deleted `.transformer` but kept these leftovers (§1, §2.1: 51,723,265 params)
    ("token_embedding.", None),
    ("positional_embedding", None),
    ("ln_final.", None),
    ("text_projection", None),
    ("logit_scale", None),
    ("transformer.", None),
    ("attn_mask", None),
]

# --- SD2 into the diffusers 23-layer text_encoder: drop resblock 23 and the projection (§5.2). Each drop row is the
# literal twin of a rename row above, so it is the longer match and wins for index 23 only.
SD2_TEXT = OPENCLIP_TEXT_LAYERS + [
    ("transformer.resblocks.23.ln_1.", None),
    ("transformer.resblocks.23.ln_2.", None),
    ("transformer.resblocks.23.attn.in_proj_", None),
    ("transformer.resblocks.23.attn.out_proj.", None),
    ("transformer.resblocks.23.mlp.c_fc.", None),
    ("transformer.resblocks.23.mlp.c_proj.", None),
    ("text_projection", None),
]

# --- Original single files (§2.1): the prefix of each CLIP tower and the rows for what follows it.
SINGLE_FILE = {
    "cond_stage_model.transformer.": HF_TEXT,  # SD1.x: HF CLIPTextModel (CLIP-L)
    "cond_stage_model.model.": SD2_TEXT,  # SD2.x: OpenCLIP ViT-H text, 24 resblocks -> 23
    "conditioner.embedders.0.transformer.": HF_TEXT,  # SDXL embedder 0: HF CLIPTextModel (CLIP-L)
    "conditioner.embedders.1.model.": OPENCLIP_TEXT,  # SDXL embedder 1: OpenCLIP bigG text with projection
    "conditioner.embedders.0.open_clip.model.": OPENCLIP_VISION,  # SVD: OpenCLIP ViT-H image tower + text leftovers
}

# --- Export to the original single files: the rows whose inverse writes each prefix's naming (HF-named towers need
# none). SD2's file has 24 resblocks and a projection; a 23-layer tower exports its 23, which is what SD2 runs
# (penultimate layer), and LDM/SGM load single files non-strictly.
EXPORT = {
    "cond_stage_model.transformer.": [],
    "cond_stage_model.model.": OPENCLIP_TEXT,
    "conditioner.embedders.0.transformer.": [],
    "conditioner.embedders.1.model.": OPENCLIP_TEXT,
    "conditioner.embedders.0.open_clip.model.": OPENCLIP_VISION,
}


def clip_config_to_hf(cfg: CLIPConfig) -> dict:
    """The transformers config.json of the tower `cfg` describes (the inverse of encoders.clip.config_from_hf)."""
    arch = ("CLIPVisionModel" if cfg.vision else "CLIPTextModel") + ("WithProjection" if cfg.projection_dim else "")
    d = {"architectures": [arch], "model_type": "clip_vision_model" if cfg.vision else "clip_text_model",
         "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
         "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
         "hidden_act": "quick_gelu" if cfg.quick_gelu else "gelu", "layer_norm_eps": cfg.layer_norm_eps,
         "attention_dropout": 0.0, "dropout": 0.0}
    if cfg.projection_dim:
        d["projection_dim"] = cfg.projection_dim
    if cfg.vision:
        return d | {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": 3}
    # eos_token_id is the real id (not the legacy placeholder 2), so transformers pools at the first eos, as ours
    return d | {"vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
                "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.eos_token_id - 1, "pad_token_id": 1}


# ======================================================================================================================
# T5 v1.1 encoder (encoders/t5.py, SD3's text_encoder_3; issue 19): an appended block of rows for t5_weights.py.
# Our module names equal transformers' T5EncoderModel files, so a text_encoder_3/ folder loads by identity; these rows
# cover the other names the released files use.
# ======================================================================================================================

# SD3's original single file keeps the T5 under this prefix (diffusers@0.42 `loaders/single_file_utils.py:
# convert_sd3_t5_checkpoint_to_diffusers` strips exactly it); the loader keeps those keys only, without the prefix.
T5_SINGLE_FILE_PREFIX = "text_encoders.t5xxl.transformer."
T5_ROWS = [
    # The stack's alias of the one, tied embedding (transformers' in-memory state dicts hold both names; a file may
    # hold either or both). When both are present the loader checks that they are the same bits and drops this one.
    ("encoder.embed_tokens.", "shared."),
    # A whole T5ForConditionalGeneration (google/t5-v1_1-xxl as released): its decoder and LM head are not the encoder.
    ("decoder.", None),
    ("lm_head.", None),
]
