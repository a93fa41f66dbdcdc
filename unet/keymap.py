"""Checkpoint formats of the UNets: key tables from the original single-file layout (LDM/SGM
`model.diffusion_model.*`) to ours, and the translation between diffusers' config.json and our configs.

Our module names equal diffusers', so the diffusers layout needs no rows. These rows are data for
controlnext/checkpoint.py's engine: `(original_prefix, our_prefix)`, longest prefix wins, and `KeyMap.inverse()`
gives the export direction. Block indices are written out literally per structure, as the original code numbers
them (../shared/reference/checkpoints.md §3.2-3.4); spatial transformers have identical inner names in both layouts.
Checked in tests/test_keymaps.py against the full key lists of the original LDM/SGM models and of diffusers
(tests/fixtures/), and in tests/test_unet_reference.py against diffusers' own converter (convert_ldm_unet_checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from unet.sd_unet import UNetConfig
from unet.svd_unet import SVDUNetConfig


def nest(source: str, ours: str, inner: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Rows for one block: its prefix joined with each inner rename."""
    return [(source + a, ours + b) for a, b in inner]


# Inside an LDM ResBlock (indices 1 of in/emb layers and 1-2 of out layers are SiLU/Dropout, no weights).
RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
          ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]

TOP = [
    ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),  # SDXL / SVD
    ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
    ("middle_block.1.", "mid_block.attentions.0."),
    *nest("middle_block.0.", "mid_block.resnets.0.", RESNET), *nest("middle_block.2.", "mid_block.resnets.1.", RESNET),
]

# SD1.x / SD2.x (and SVD's spatial layout): 4 levels, attention at levels 0-2, 2 ResBlocks per level.
SD_ROWS = TOP + [
    *nest("input_blocks.1.0.", "down_blocks.0.resnets.0.", RESNET), ("input_blocks.1.1.", "down_blocks.0.attentions.0."),
    *nest("input_blocks.2.0.", "down_blocks.0.resnets.1.", RESNET), ("input_blocks.2.1.", "down_blocks.0.attentions.1."),
    ("input_blocks.3.0.op.", "down_blocks.0.downsamplers.0.conv."),
    *nest("input_blocks.4.0.", "down_blocks.1.resnets.0.", RESNET), ("input_blocks.4.1.", "down_blocks.1.attentions.0."),
    *nest("input_blocks.5.0.", "down_blocks.1.resnets.1.", RESNET), ("input_blocks.5.1.", "down_blocks.1.attentions.1."),
    ("input_blocks.6.0.op.", "down_blocks.1.downsamplers.0.conv."),
    *nest("input_blocks.7.0.", "down_blocks.2.resnets.0.", RESNET), ("input_blocks.7.1.", "down_blocks.2.attentions.0."),
    *nest("input_blocks.8.0.", "down_blocks.2.resnets.1.", RESNET), ("input_blocks.8.1.", "down_blocks.2.attentions.1."),
    ("input_blocks.9.0.op.", "down_blocks.2.downsamplers.0.conv."),
    *nest("input_blocks.10.0.", "down_blocks.3.resnets.0.", RESNET),
    *nest("input_blocks.11.0.", "down_blocks.3.resnets.1.", RESNET),
    *nest("output_blocks.0.0.", "up_blocks.0.resnets.0.", RESNET),
    *nest("output_blocks.1.0.", "up_blocks.0.resnets.1.", RESNET),
    *nest("output_blocks.2.0.", "up_blocks.0.resnets.2.", RESNET),
    ("output_blocks.2.1.conv.", "up_blocks.0.upsamplers.0.conv."),  # sub-index 1: no attention at this level
    *nest("output_blocks.3.0.", "up_blocks.1.resnets.0.", RESNET), ("output_blocks.3.1.", "up_blocks.1.attentions.0."),
    *nest("output_blocks.4.0.", "up_blocks.1.resnets.1.", RESNET), ("output_blocks.4.1.", "up_blocks.1.attentions.1."),
    *nest("output_blocks.5.0.", "up_blocks.1.resnets.2.", RESNET), ("output_blocks.5.1.", "up_blocks.1.attentions.2."),
    ("output_blocks.5.2.conv.", "up_blocks.1.upsamplers.0.conv."),
    *nest("output_blocks.6.0.", "up_blocks.2.resnets.0.", RESNET), ("output_blocks.6.1.", "up_blocks.2.attentions.0."),
    *nest("output_blocks.7.0.", "up_blocks.2.resnets.1.", RESNET), ("output_blocks.7.1.", "up_blocks.2.attentions.1."),
    *nest("output_blocks.8.0.", "up_blocks.2.resnets.2.", RESNET), ("output_blocks.8.1.", "up_blocks.2.attentions.2."),
    ("output_blocks.8.2.conv.", "up_blocks.2.upsamplers.0.conv."),
    *nest("output_blocks.9.0.", "up_blocks.3.resnets.0.", RESNET), ("output_blocks.9.1.", "up_blocks.3.attentions.0."),
    *nest("output_blocks.10.0.", "up_blocks.3.resnets.1.", RESNET), ("output_blocks.10.1.", "up_blocks.3.attentions.1."),
    *nest("output_blocks.11.0.", "up_blocks.3.resnets.2.", RESNET), ("output_blocks.11.1.", "up_blocks.3.attentions.2."),
]

# SDXL: 3 levels, no attention at level 0, no downsample after level 2 (9 input / 9 output blocks).
SDXL_ROWS = TOP + [
    *nest("input_blocks.1.0.", "down_blocks.0.resnets.0.", RESNET),
    *nest("input_blocks.2.0.", "down_blocks.0.resnets.1.", RESNET),
    ("input_blocks.3.0.op.", "down_blocks.0.downsamplers.0.conv."),
    *nest("input_blocks.4.0.", "down_blocks.1.resnets.0.", RESNET), ("input_blocks.4.1.", "down_blocks.1.attentions.0."),
    *nest("input_blocks.5.0.", "down_blocks.1.resnets.1.", RESNET), ("input_blocks.5.1.", "down_blocks.1.attentions.1."),
    ("input_blocks.6.0.op.", "down_blocks.1.downsamplers.0.conv."),
    *nest("input_blocks.7.0.", "down_blocks.2.resnets.0.", RESNET), ("input_blocks.7.1.", "down_blocks.2.attentions.0."),
    *nest("input_blocks.8.0.", "down_blocks.2.resnets.1.", RESNET), ("input_blocks.8.1.", "down_blocks.2.attentions.1."),
    *nest("output_blocks.0.0.", "up_blocks.0.resnets.0.", RESNET), ("output_blocks.0.1.", "up_blocks.0.attentions.0."),
    *nest("output_blocks.1.0.", "up_blocks.0.resnets.1.", RESNET), ("output_blocks.1.1.", "up_blocks.0.attentions.1."),
    *nest("output_blocks.2.0.", "up_blocks.0.resnets.2.", RESNET), ("output_blocks.2.1.", "up_blocks.0.attentions.2."),
    ("output_blocks.2.2.conv.", "up_blocks.0.upsamplers.0.conv."),
    *nest("output_blocks.3.0.", "up_blocks.1.resnets.0.", RESNET), ("output_blocks.3.1.", "up_blocks.1.attentions.0."),
    *nest("output_blocks.4.0.", "up_blocks.1.resnets.1.", RESNET), ("output_blocks.4.1.", "up_blocks.1.attentions.1."),
    *nest("output_blocks.5.0.", "up_blocks.1.resnets.2.", RESNET), ("output_blocks.5.1.", "up_blocks.1.attentions.2."),
    ("output_blocks.5.2.conv.", "up_blocks.1.upsamplers.0.conv."),
    *nest("output_blocks.6.0.", "up_blocks.2.resnets.0.", RESNET),
    *nest("output_blocks.7.0.", "up_blocks.2.resnets.1.", RESNET),
    *nest("output_blocks.8.0.", "up_blocks.2.resnets.2.", RESNET),
]

# Which table a UNet structure uses: (levels, attention per level, ResBlocks per level) -> rows.
ORIGINAL_ROWS = {
    (4, (True, True, True, False), 2): SD_ROWS,
    (3, (False, True, True), 2): SDXL_ROWS,
}


# ---------------------------------------------------------------------------------------------------------------------
# --- SVD VideoUNet (issue 8): SGM `VideoUNet` (model.diffusion_model. of svd*.safetensors) -> our SVDUNet
# Same block indices as SD_ROWS (checkpoints.md §3.5); only the names inside the blocks differ.
# ---------------------------------------------------------------------------------------------------------------------

# Inside an SGM VideoResBlock: the spatial ResBlock's own names, its temporal twin under `time_stack.` (Conv3d, no
# skip), and the blend factor.
VIDEO_RESNET = [
    ("in_layers.0.", "spatial_res_block.norm1."), ("in_layers.2.", "spatial_res_block.conv1."),
    ("emb_layers.1.", "spatial_res_block.time_emb_proj."), ("out_layers.0.", "spatial_res_block.norm2."),
    ("out_layers.3.", "spatial_res_block.conv2."), ("skip_connection.", "spatial_res_block.conv_shortcut."),
    ("time_stack.in_layers.0.", "temporal_res_block.norm1."), ("time_stack.in_layers.2.", "temporal_res_block.conv1."),
    ("time_stack.emb_layers.1.", "temporal_res_block.time_emb_proj."),
    ("time_stack.out_layers.0.", "temporal_res_block.norm2."), ("time_stack.out_layers.3.", "temporal_res_block.conv2."),
    ("time_mixer.", "time_mixer."),
]

# Inside an SGM SpatialVideoTransformer: norm/proj_in/proj_out/transformer_blocks/time_mixer keep their names (the
# empty row); the temporal blocks and the frame-position MLP are renamed.
VIDEO_TRANSFORMER = [
    ("", ""), ("time_stack.", "temporal_transformer_blocks."),
    ("time_pos_embed.0.", "time_pos_embed.linear_1."), ("time_pos_embed.2.", "time_pos_embed.linear_2."),
]

SVD_ROWS = [
    ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
    *nest("input_blocks.1.0.", "down_blocks.0.resnets.0.", VIDEO_RESNET),
    *nest("input_blocks.1.1.", "down_blocks.0.attentions.0.", VIDEO_TRANSFORMER),
    *nest("input_blocks.2.0.", "down_blocks.0.resnets.1.", VIDEO_RESNET),
    *nest("input_blocks.2.1.", "down_blocks.0.attentions.1.", VIDEO_TRANSFORMER),
    ("input_blocks.3.0.op.", "down_blocks.0.downsamplers.0.conv."),
    *nest("input_blocks.4.0.", "down_blocks.1.resnets.0.", VIDEO_RESNET),
    *nest("input_blocks.4.1.", "down_blocks.1.attentions.0.", VIDEO_TRANSFORMER),
    *nest("input_blocks.5.0.", "down_blocks.1.resnets.1.", VIDEO_RESNET),
    *nest("input_blocks.5.1.", "down_blocks.1.attentions.1.", VIDEO_TRANSFORMER),
    ("input_blocks.6.0.op.", "down_blocks.1.downsamplers.0.conv."),
    *nest("input_blocks.7.0.", "down_blocks.2.resnets.0.", VIDEO_RESNET),
    *nest("input_blocks.7.1.", "down_blocks.2.attentions.0.", VIDEO_TRANSFORMER),
    *nest("input_blocks.8.0.", "down_blocks.2.resnets.1.", VIDEO_RESNET),
    *nest("input_blocks.8.1.", "down_blocks.2.attentions.1.", VIDEO_TRANSFORMER),
    ("input_blocks.9.0.op.", "down_blocks.2.downsamplers.0.conv."),
    *nest("input_blocks.10.0.", "down_blocks.3.resnets.0.", VIDEO_RESNET),
    *nest("input_blocks.11.0.", "down_blocks.3.resnets.1.", VIDEO_RESNET),
    *nest("middle_block.0.", "mid_block.resnets.0.", VIDEO_RESNET),
    *nest("middle_block.1.", "mid_block.attentions.0.", VIDEO_TRANSFORMER),
    *nest("middle_block.2.", "mid_block.resnets.1.", VIDEO_RESNET),
    *nest("output_blocks.0.0.", "up_blocks.0.resnets.0.", VIDEO_RESNET),
    *nest("output_blocks.1.0.", "up_blocks.0.resnets.1.", VIDEO_RESNET),
    *nest("output_blocks.2.0.", "up_blocks.0.resnets.2.", VIDEO_RESNET),
    ("output_blocks.2.1.conv.", "up_blocks.0.upsamplers.0.conv."),  # sub-index 1: no attention at this level
    *nest("output_blocks.3.0.", "up_blocks.1.resnets.0.", VIDEO_RESNET),
    *nest("output_blocks.3.1.", "up_blocks.1.attentions.0.", VIDEO_TRANSFORMER),
    *nest("output_blocks.4.0.", "up_blocks.1.resnets.1.", VIDEO_RESNET),
    *nest("output_blocks.4.1.", "up_blocks.1.attentions.1.", VIDEO_TRANSFORMER),
    *nest("output_blocks.5.0.", "up_blocks.1.resnets.2.", VIDEO_RESNET),
    *nest("output_blocks.5.1.", "up_blocks.1.attentions.2.", VIDEO_TRANSFORMER),
    ("output_blocks.5.2.conv.", "up_blocks.1.upsamplers.0.conv."),
    *nest("output_blocks.6.0.", "up_blocks.2.resnets.0.", VIDEO_RESNET),
    *nest("output_blocks.6.1.", "up_blocks.2.attentions.0.", VIDEO_TRANSFORMER),
    *nest("output_blocks.7.0.", "up_blocks.2.resnets.1.", VIDEO_RESNET),
    *nest("output_blocks.7.1.", "up_blocks.2.attentions.1.", VIDEO_TRANSFORMER),
    *nest("output_blocks.8.0.", "up_blocks.2.resnets.2.", VIDEO_RESNET),
    *nest("output_blocks.8.1.", "up_blocks.2.attentions.2.", VIDEO_TRANSFORMER),
    ("output_blocks.8.2.conv.", "up_blocks.2.upsamplers.0.conv."),
    *nest("output_blocks.9.0.", "up_blocks.3.resnets.0.", VIDEO_RESNET),
    *nest("output_blocks.9.1.", "up_blocks.3.attentions.0.", VIDEO_TRANSFORMER),
    *nest("output_blocks.10.0.", "up_blocks.3.resnets.1.", VIDEO_RESNET),
    *nest("output_blocks.10.1.", "up_blocks.3.attentions.1.", VIDEO_TRANSFORMER),
    *nest("output_blocks.11.0.", "up_blocks.3.resnets.2.", VIDEO_RESNET),
    *nest("output_blocks.11.1.", "up_blocks.3.attentions.2.", VIDEO_TRANSFORMER),
]

# Which table an SVD UNet structure uses: (levels, attention per level, ResBlocks per level) -> rows.
SVD_ORIGINAL_ROWS = {
    (4, (True, True, True, False), 2): SVD_ROWS,
}


# --- diffusers config.json <-> our configs: the other half of each format (what the weights' shapes mean)

# diffusers UNet2DConditionModel fields we do not model: a config.json must leave them at these defaults.
UNSUPPORTED_UNET_FIELDS = {"class_embed_type": None, "num_class_embeds": None, "time_embedding_type": "positional",
                           "resnet_time_scale_shift": "default", "dual_cross_attention": False,
                           "only_cross_attention": False, "encoder_hid_dim": None, "center_input_sample": False,
                           "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn",
                           "act_fn": "silu", "conv_in_kernel": 3, "conv_out_kernel": 3, "downsample_padding": 1,
                           "mid_block_scale_factor": 1, "norm_eps": 1e-5}


def unet_config_from_diffusers(d: Mapping) -> UNetConfig:
    """UNetConfig from the fields of a diffusers UNet2DConditionModel config.json."""
    for field, default in UNSUPPORTED_UNET_FIELDS.items():
        if d.get(field, default) != default:
            raise ValueError(f"UNet config.json: {field}={d[field]!r} is not supported (expected {default!r})")
    channels = tuple(d.get("block_out_channels", (320, 640, 1280, 1280)))
    per_level = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * len(channels)  # noqa: E731
    # diffusers reads `attention_head_dim` as the number of heads when `num_attention_heads` is null (§7.2).
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    adm, id_dim = 0, d.get("addition_time_embed_dim") or 256
    if d.get("addition_embed_type") is not None:
        if d["addition_embed_type"] != "text_time":
            raise ValueError(f"UNet config.json: addition_embed_type={d['addition_embed_type']!r} is not supported "
                             "(only 'text_time', SDXL's pooled text + size/crop ids)")
        adm = d.get("projection_class_embeddings_input_dim") or 0
        if adm <= 6 * id_dim:  # y = pooled text | 6 size/crop sinusoids of id_dim each (checkpoints.md §6)
            raise ValueError(f"UNet config.json: projection_class_embeddings_input_dim={adm} leaves no room for the "
                             f"pooled text beside 6 ids of addition_time_embed_dim={id_dim}")
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), channels=channels,
        layers_per_block=d.get("layers_per_block", 2),
        attention=tuple(t.startswith("CrossAttn") for t in d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])),
        transformer_depth=per_level(d.get("transformer_layers_per_block", 1)), heads=per_level(heads),
        context_dim=d.get("cross_attention_dim", 1280), linear_proj=bool(d.get("use_linear_projection", False)),
        adm_channels=adm, added_id_dim=id_dim, groups=d.get("norm_num_groups", 32))


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """The diffusers config.json fields describing `cfg` (for export and for building the reference in tests)."""
    d = {"_class_name": "UNet2DConditionModel", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
         "block_out_channels": list(cfg.channels), "layers_per_block": cfg.layers_per_block,
         "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention],
         "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)],
         "attention_head_dim": list(cfg.heads), "transformer_layers_per_block": list(cfg.transformer_depth),
         "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.linear_proj,
         "norm_num_groups": cfg.groups, "flip_sin_to_cos": True, "freq_shift": 0}
    if cfg.adm_channels:
        d.update(addition_embed_type="text_time", addition_time_embed_dim=cfg.added_id_dim,
                 projection_class_embeddings_input_dim=cfg.adm_channels)
    return d


def unet_original_rows(cfg: UNetConfig) -> list[tuple]:
    structure = (len(cfg.channels), cfg.attention, cfg.layers_per_block)
    if structure not in ORIGINAL_ROWS:
        raise ValueError(f"no original-layout key table for a UNet with (levels, attention, layers) = {structure}")
    return ORIGINAL_ROWS[structure]


def detect_unet_preset(state: Mapping[str, Tensor]) -> str:
    """sd15 / sd21 / sdxl from the weights (checkpoints.md §1 detection), in either layout."""
    for key in ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"):
        if key in state:
            return {768: "sd15", 1024: "sd21", 2048: "sdxl"}.get(state[key].shape[-1], "unknown")
    return "unknown"


SVD_DOWN_TYPES = {True: "CrossAttnDownBlockSpatioTemporal", False: "DownBlockSpatioTemporal"}
SVD_UP_TYPES = {True: "CrossAttnUpBlockSpatioTemporal", False: "UpBlockSpatioTemporal"}


def svd_unet_config_from_diffusers(d: Mapping) -> SVDUNetConfig:
    """SVDUNetConfig from the fields of a diffusers UNetSpatioTemporalConditionModel config.json (§7.2)."""
    channels = tuple(d.get("block_out_channels", (320, 640, 1280, 1280)))
    per_level = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * len(channels)  # noqa: E731
    for field in ("layers_per_block", "cross_attention_dim"):
        if isinstance(d.get(field), (list, tuple)):
            raise ValueError(f"SVD UNet config.json: per-level {field}={d[field]!r} is not supported")
    down = d.get("down_block_types", [SVD_DOWN_TYPES[a] for a in (True, True, True, False)])
    if any(t not in SVD_DOWN_TYPES.values() for t in down):
        raise ValueError(f"SVD UNet config.json: unsupported down_block_types {down}")
    attention = tuple(t == SVD_DOWN_TYPES[True] for t in down)
    up = d.get("up_block_types", [SVD_UP_TYPES[a] for a in reversed(attention)])
    if list(up) != [SVD_UP_TYPES[a] for a in reversed(attention)]:
        raise ValueError(f"SVD UNet config.json: up_block_types {up} do not mirror down_block_types {down}")
    id_dim = d.get("addition_time_embed_dim", 256)
    adm = d.get("projection_class_embeddings_input_dim", 768)
    if adm % id_dim:
        raise ValueError(f"SVD UNet config.json: projection_class_embeddings_input_dim {adm} is not a multiple of "
                         f"addition_time_embed_dim {id_dim}")
    return SVDUNetConfig(
        in_channels=d.get("in_channels", 8), out_channels=d.get("out_channels", 4), channels=channels,
        layers_per_block=d.get("layers_per_block", 2), attention=attention,
        transformer_depth=per_level(d.get("transformer_layers_per_block", 1)),
        heads=per_level(d.get("num_attention_heads", (5, 10, 20, 20))), context_dim=d.get("cross_attention_dim", 1024),
        added_ids=adm // id_dim, added_id_dim=id_dim, num_frames=d.get("num_frames", 25))


def svd_unet_config_to_diffusers(cfg: SVDUNetConfig) -> dict:
    """The diffusers config.json fields describing `cfg` (export, and the reference model in tests).

    diffusers has no fields for groups, resnet eps, temporal kernel or merge factor: they must be SVD's."""
    return {"_class_name": "UNetSpatioTemporalConditionModel", "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "block_out_channels": list(cfg.channels),
            "layers_per_block": cfg.layers_per_block,
            "down_block_types": [SVD_DOWN_TYPES[a] for a in cfg.attention],
            "up_block_types": [SVD_UP_TYPES[a] for a in reversed(cfg.attention)],
            "num_attention_heads": list(cfg.heads), "transformer_layers_per_block": list(cfg.transformer_depth),
            "cross_attention_dim": cfg.context_dim, "addition_time_embed_dim": cfg.added_id_dim,
            "projection_class_embeddings_input_dim": cfg.added_ids * cfg.added_id_dim, "num_frames": cfg.num_frames}


def svd_unet_original_rows(cfg: SVDUNetConfig) -> list[tuple]:
    structure = (len(cfg.channels), cfg.attention, cfg.layers_per_block)
    if structure not in SVD_ORIGINAL_ROWS:
        raise ValueError(f"no original-layout key table for an SVD UNet with (levels, attention, layers) = {structure}")
    return SVD_ORIGINAL_ROWS[structure]
