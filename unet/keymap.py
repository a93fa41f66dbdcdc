"""Key tables from the original single-file UNet layout (LDM/SGM `model.diffusion_model.*`) to ours.

Our module names equal diffusers', so the diffusers layout needs no rows. These rows are data for
controlnext/checkpoint.py's engine: `(original_prefix, our_prefix)`, longest prefix wins, and `KeyMap.inverse()`
gives the export direction. Block indices are written out literally per structure, as the original code numbers
them (../shared/reference/checkpoints.md §3.2-3.4); spatial transformers have identical inner names in both layouts.
Checked in tests/test_unet_loading.py against diffusers' own converter (convert_ldm_unet_checkpoint).
"""

from __future__ import annotations


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
