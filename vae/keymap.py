"""Key-map rows and config.json translation for VAE checkpoints (data; the engine is controlnext/checkpoint.py).

Our module names equal diffusers' (AutoencoderKL, AutoencoderKLTemporalDecoder), so the diffusers layout needs no
rows. The rows below rename the original single-file layouts (CompVis LDM `first_stage_model.`, SGM `VideoDecoder`),
read with the `first_stage_model.` prefix already stripped, and the legacy diffusers attention names. Every table also
holds identity catch-alls (`encoder.` -> `encoder.`) so that re-rooting it under a prefix keeps every key in scope.
Reference: ../shared/reference/checkpoints.md §4.1 (SD VAE), §4.2 (SVD VideoDecoder), §4.3 (where svd*.safetensors
keeps its encoder), §1 (keys to ignore). Rows are (source_prefix, our_prefix[, transform]); the longest match wins.
Checked in tests/test_keymaps.py against the full key lists of the LDM/SGM autoencoders and of diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping

from vae.autoencoder import VAEConfig
from vae.temporal_decoder import TemporalVAEConfig


def under(source_root: str, target_root: str, rows: list[tuple]) -> list[tuple]:
    """The same rows with a prefix put in front of every source (and target) prefix; None targets stay drops."""
    return [(source_root + source, None if target is None else target_root + target, *rest)
            for source, target, *rest in rows]


# The original decoder counts levels from full resolution up (`up.0` is the last one run); diffusers counts in
# execution order. The four released levels, written out (no index arithmetic, STYLE.md §4.2).
LDM_UP_LEVELS = (("0", "3"), ("1", "2"), ("2", "1"), ("3", "0"))

# Mid-block attention: 1x1 convs in the original, Linear in diffusers (checkpoints.md §12.5).
MID_ATTENTION_ROWS = [
    row
    for part in ("encoder", "decoder")
    for row in (
        (f"{part}.mid.attn_1.norm.", f"{part}.mid_block.attentions.0.group_norm."),
        (f"{part}.mid.attn_1.q.", f"{part}.mid_block.attentions.0.to_q.", "squeeze_1x1"),
        (f"{part}.mid.attn_1.k.", f"{part}.mid_block.attentions.0.to_k.", "squeeze_1x1"),
        (f"{part}.mid.attn_1.v.", f"{part}.mid_block.attentions.0.to_v.", "squeeze_1x1"),
        (f"{part}.mid.attn_1.proj_out.", f"{part}.mid_block.attentions.0.to_out.0.", "squeeze_1x1"),
    )
]

ENCODER_ROWS = [
    ("encoder.", "encoder."),  # conv_in, conv_out keep their names
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.block.{j}.nin_shortcut.", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("encoder.mid.block_1.", "encoder.mid_block.resnets.0."),
    ("encoder.mid.block_2.", "encoder.mid_block.resnets.1."),
    ("encoder.norm_out.", "encoder.conv_norm_out."),
    *MID_ATTENTION_ROWS[:5],
]

# The SD / SDXL image decoder (LDM `Decoder`).
IMAGE_DECODER_ROWS = [
    ("decoder.", "decoder."),  # conv_in, conv_out keep their names
    ("decoder.mid.block_1.", "decoder.mid_block.resnets.0."),
    ("decoder.mid.block_2.", "decoder.mid_block.resnets.1."),
    ("decoder.norm_out.", "decoder.conv_norm_out."),
    *MID_ATTENTION_ROWS[5:],
    *[row for ldm, ours in LDM_UP_LEVELS for row in (
        (f"decoder.up.{ldm}.block.{{j}}.", f"decoder.up_blocks.{ours}.resnets.{{j}}."),
        (f"decoder.up.{ldm}.block.{{j}}.nin_shortcut.", f"decoder.up_blocks.{ours}.resnets.{{j}}.conv_shortcut."),
        (f"decoder.up.{ldm}.upsample.", f"decoder.up_blocks.{ours}.upsamplers.0."),
    )],
]


def video_res_block_rows(ldm: str, ours: str) -> list[tuple]:
    """One SGM VideoResBlock -> diffusers SpatioTemporalResBlock (§4.2): the image part, time_stack, mix_factor."""
    return [
        (ldm, ours + "spatial_res_block."),
        (ldm + "nin_shortcut.", ours + "spatial_res_block.conv_shortcut."),
        (ldm + "time_stack.in_layers.0.", ours + "temporal_res_block.norm1."),
        (ldm + "time_stack.in_layers.2.", ours + "temporal_res_block.conv1."),
        (ldm + "time_stack.out_layers.0.", ours + "temporal_res_block.norm2."),
        (ldm + "time_stack.out_layers.3.", ours + "temporal_res_block.conv2."),
        (ldm + "mix_factor", ours + "time_mixer.mix_factor"),
    ]


# The SVD VideoDecoder (SGM temporal_ae.py, time_mode "conv-only").
VIDEO_DECODER_ROWS = [
    ("decoder.", "decoder."),  # conv_in, conv_out keep their names
    ("decoder.norm_out.", "decoder.conv_norm_out."),
    ("decoder.conv_out.time_mix_conv.", "decoder.time_conv_out."),  # AE3DConv's temporal conv after conv_out
    *MID_ATTENTION_ROWS[5:],
    *video_res_block_rows("decoder.mid.block_1.", "decoder.mid_block.resnets.0."),
    *video_res_block_rows("decoder.mid.block_2.", "decoder.mid_block.resnets.1."),
    *[row for ldm, ours in LDM_UP_LEVELS for row in (
        *video_res_block_rows(f"decoder.up.{ldm}.block.{{j}}.", f"decoder.up_blocks.{ours}.resnets.{{j}}."),
        (f"decoder.up.{ldm}.upsample.", f"decoder.up_blocks.{ours}.upsamplers.0."),
    )],
]

QUANT_ROWS = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]

# Diffusers VAE files saved by diffusers <= ~0.13 name the mid attention query/key/value/proj_attn (§4.1). Load only.
LEGACY_DIFFUSERS_ROWS = [
    row
    for part in ("encoder", "decoder")
    for row in (
        (f"{part}.mid_block.attentions.0.query.", f"{part}.mid_block.attentions.0.to_q."),
        (f"{part}.mid_block.attentions.0.key.", f"{part}.mid_block.attentions.0.to_k."),
        (f"{part}.mid_block.attentions.0.value.", f"{part}.mid_block.attentions.0.to_v."),
        (f"{part}.mid_block.attentions.0.proj_attn.", f"{part}.mid_block.attentions.0.to_out.0."),
    )
]

# SD1.x / SD2.x / SDXL `first_stage_model.` (prefix stripped) or a standalone LDM VAE file; diffusers names pass.
SD_VAE_ROWS = ENCODER_ROWS + IMAGE_DECODER_ROWS + QUANT_ROWS

# SGM `first_stage_model.` of SVD (prefix stripped): SD encoder + VideoDecoder, no quant convs (§2.1).
SVD_FIRST_STAGE_ROWS = ENCODER_ROWS + VIDEO_DECODER_ROWS + QUANT_ROWS[:1]

# A whole svd*.safetensors file (§4.3): encoder and quant_conv from the conditioning-frame autoencoder
# `conditioner.embedders.3.encoder.` (what SGM runs at sampling time), decoder from `first_stage_model.decoder.`;
# drop the first stage's own encoder, the embedder's image decoder, and every other component of the file.
SVD_RELEASE_ROWS = [
    *under("conditioner.embedders.3.encoder.", "", ENCODER_ROWS),
    ("conditioner.embedders.3.encoder.quant_conv.", "quant_conv."),
    *under("first_stage_model.", "", VIDEO_DECODER_ROWS),
    ("first_stage_model.encoder.", None),
    ("conditioner.embedders.3.encoder.decoder.", None),
    ("conditioner.embedders.3.encoder.post_quant_conv.", None),
    ("model.", None),  # the UNet
    ("conditioner.", None),  # the CLIP image tower and parameter-free embedders
    ("denoiser.", None),  # SGM discrete-denoiser sigmas, if present (§1)
]


# --- diffusers config.json <-> VAEConfig / TemporalVAEConfig (checkpoints.md §7.3)

# diffusers config.json fields that do not change the weights or the maths, and diffusers-only features we do not
# model, which must then stay at these values (checkpoints.md §7.3).
IGNORED_VAE_FIELDS = ("_class_name", "_diffusers_version", "_name_or_path", "sample_size", "force_upcast")
FIXED_VAE_FIELDS = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
                    "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}


def vae_config_from_diffusers(d: Mapping, temporal: bool):
    """VAEConfig (AutoencoderKL) or TemporalVAEConfig (AutoencoderKLTemporalDecoder) from config.json fields."""
    fields = {"in_channels": "in_channels", "out_channels": "out_channels", "latent_channels": "latent_channels",
              "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
              "scaling_factor": "latent_scale"}
    if not temporal:
        fields.update(norm_num_groups="norm_groups", use_quant_conv="use_quant_conv",
                      use_post_quant_conv="use_post_quant_conv", mid_block_add_attention="mid_attention")
        if d.get("shift_factor") is not None:  # SD3's latent shift (the image VAE has the field; null means none)
            fields.update(shift_factor="latent_shift")
    unknown = sorted(set(d) - set(fields) - set(IGNORED_VAE_FIELDS) - set(FIXED_VAE_FIELDS))
    if unknown:
        raise ValueError(f"VAE config.json: unknown fields {unknown}")
    for field, value in FIXED_VAE_FIELDS.items():
        given = value if field in fields else d.get(field, value)
        if (set(given) != set(value)) if isinstance(value, list) else given != value:
            raise ValueError(f"VAE config.json: {field}={given!r} is not supported (expected {value!r})")
    values = {ours: tuple(d[theirs]) if isinstance(d[theirs], list) else d[theirs]
              for theirs, ours in fields.items() if theirs in d}
    return TemporalVAEConfig(**values) if temporal else VAEConfig(**values)


def vae_config_to_diffusers(cfg) -> dict:
    """The config.json of the diffusers class equal to `cfg` (for export and for building references in tests)."""
    levels = len(cfg.block_out_channels)
    d = {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
         "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
         "down_block_types": ["DownEncoderBlock2D"] * levels, "scaling_factor": cfg.latent_scale}
    if isinstance(cfg, TemporalVAEConfig):
        return {"_class_name": "AutoencoderKLTemporalDecoder", **d}
    return {"_class_name": "AutoencoderKL", **d, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "norm_num_groups": cfg.norm_groups, "use_quant_conv": cfg.use_quant_conv,
            "use_post_quant_conv": cfg.use_post_quant_conv, "mid_block_add_attention": cfg.mid_attention,
            "shift_factor": cfg.latent_shift or None}
