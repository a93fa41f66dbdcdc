"""Loaders and savers of the base models: the SD UNets, the SVD UNet, the VAEs and the CLIP towers, in the
diffusers / transformers folder layouts and the original single-file layouts, plus `original_state` for merging
several components into one original-layout file.

Every loader takes a file, a model folder, a whole diffusers pipeline folder (it picks unet/, vae/, text_encoder/,
text_encoder_2/ or image_encoder/) or an in-memory state dict; it builds the model on the meta device and assigns
the file's tensors through the key tables beside each model (unet/keymap.py, vae/keymap.py, encoders/keymap.py)
with the strict accounting of controlnext/checkpoint.py. `dtype=None` keeps the stored dtype (no copy of a
memory-mapped file); a dtype casts each tensor once. Formats: ../shared/reference/checkpoints.md §1-§7.
Left out: downloads, tokenizers (encoders/tokenizer.py reads those), schedulers, LoRA files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from controlnext.checkpoint import (KeyMap, Row, StateDict, load_into, read_state, save_json, save_state,
                                    strip_prefix, write_folder)
from controlnext.meta import on_meta
from encoders import keymap as clip_keymap
from encoders.clip import PRESETS as CLIP_PRESETS, CLIPConfig, CLIPTextModel, CLIPVisionModel, build_clip, config_from_hf
from unet.keymap import (detect_unet_preset, svd_unet_config_from_diffusers, svd_unet_config_to_diffusers,
                         svd_unet_original_rows, unet_config_from_diffusers, unet_config_to_diffusers,
                         unet_original_rows)
from unet.sd_unet import PRESETS as UNET_PRESETS, UNet, UNetConfig
from unet.svd_unet import PRESETS as SVD_PRESETS, SVD_XT, SVDUNet
from vae.autoencoder import PRESETS as VAE_PRESETS, AutoencoderKL, VAEConfig
from vae.keymap import (ENCODER_ROWS, LEGACY_DIFFUSERS_ROWS, SD_VAE_ROWS, SVD_FIRST_STAGE_ROWS, SVD_RELEASE_ROWS,
                        vae_config_from_diffusers, vae_config_to_diffusers)
from vae.temporal_decoder import PRESETS as VIDEO_VAE_PRESETS, TemporalAutoencoder, TemporalVAEConfig

Source = str | Path | Mapping[str, Tensor]

# Where each component sits in an original single file (checkpoints.md §2.1); the keys of `original_state`.
ORIGINAL_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "sd15_text": "cond_stage_model.transformer.",  # CLIP-L, transformers names
    "sd2_text": "cond_stage_model.model.",  # OpenCLIP ViT-H text
    "sdxl_text_l": "conditioner.embedders.0.transformer.",  # CLIP-L, transformers names
    "sdxl_text_g": "conditioner.embedders.1.model.",  # OpenCLIP bigG text with projection
    "svd_image": "conditioner.embedders.0.open_clip.model.",  # OpenCLIP ViT-H image tower
}
SVD_EMBEDDER_PREFIX = "conditioner.embedders.3.encoder."  # svd*.safetensors: the conditioning-frame autoencoder (§4.3)
# Keys that only an SVD temporal VAE has, in the original and the diffusers layouts (checkpoints.md §4.2).
TEMPORAL_VAE_MARKS = (".time_stack.", ".time_mix_conv.", ".temporal_res_block.", "decoder.time_conv_out.")


# --- shared: sources, configs, writers ---------------------------------------------------------------------------


def where(source: Source) -> str:
    return "state dict" if isinstance(source, Mapping) else str(source)


def component(source: Source, name: str) -> Source:
    """The `name` folder (unet, vae) of a diffusers pipeline folder, else `source` itself."""
    if isinstance(source, Mapping) or not Path(source).is_dir():
        return source
    if (Path(source) / name).is_dir():
        return Path(source) / name
    if (Path(source) / "model_index.json").is_file():
        raise ValueError(f"{source}: a pipeline folder without {name}/")
    return source


def folder_config(source: Source) -> dict | None:
    """The fields of a model folder's config.json, or None."""
    if isinstance(source, Mapping) or not (Path(source) / "config.json").is_file():
        return None
    try:
        return json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except ValueError:
        raise ValueError(f"{Path(source) / 'config.json'}: not valid JSON") from None


def save_diffusers_folder(state: Mapping[str, Tensor], config_json: dict, folder: str | Path,
                          weights: str = "diffusion_pytorch_model.safetensors") -> None:
    """A diffusers / transformers model folder (config.json + weights), written as one unit (checkpoint.write_folder)."""
    write_folder(folder, {weights: lambda path: save_state(state, path),
                          "config.json": lambda path: save_json(config_json, path)})


def _map_and_load(model: nn.Module, state: StateDict, rows: list[Row], dtype: torch.dtype | None, what: str,
                  prefix: str = "") -> nn.Module:
    """Rename `state` with `rows` and load it strictly. `state` is emptied: with no other reference to its tensors
    left, load_into frees each mapped source as soon as its cast copy exists (peak: the model plus one tensor)."""
    renamed, origin = KeyMap(rows).apply(state)
    state.clear()
    return load_into(model, renamed, {k: prefix + v for k, v in origin.items()}, what=what, dtype=dtype)


# --- UNets: SD1.x / SD2.x / SDXL, and SVD ------------------------------------------------------------------------


def _read_unet(source: Source) -> tuple[StateDict, str]:
    """(the UNet tensors of `source` in either layout, the prefix stripped); a single file's other parts are dropped."""
    state = read_state(source)
    prefix = ORIGINAL_PREFIXES["unet"] if any(k.startswith(ORIGINAL_PREFIXES["unet"]) for k in state) else ""
    state = strip_prefix(state, prefix)
    if not any(k.startswith(("conv_in.", "input_blocks.0.0.")) for k in state):
        raise ValueError(f"{where(source)}: not a UNet checkpoint (no conv_in / input_blocks.0.0 weights; "
                         f"first keys: {sorted(state)[:3]})")
    return state, prefix


def load_unet(source: Source, config=None, *, dtype: torch.dtype | None = None) -> UNet:
    """Our UNet from a diffusers or original single file, a diffusers `unet/` or pipeline folder, or a state dict.
    `config`: a preset name, a UNetConfig or diffusers config.json fields; by default the folder's config.json,
    else detected from the weights (sd15 / sd21 / sdxl). Every key is accounted for; nothing is half-loaded."""
    source = component(source, "unet")
    config = config if config is not None else folder_config(source)
    state, prefix = _read_unet(source)
    if not isinstance(config, (Mapping, UNetConfig)):
        name = config if config is not None else detect_unet_preset(state)
        if name not in UNET_PRESETS:
            raise ValueError(f"{where(source)}: cannot tell which UNet this is (got config {name!r}); "
                             f"pass config= one of {sorted(UNET_PRESETS)}, a UNetConfig or a diffusers config dict")
        config = UNET_PRESETS[name]
    config = unet_config_from_diffusers(config) if isinstance(config, Mapping) else config
    rows = unet_original_rows(config) if any(k.startswith("input_blocks.") for k in state) else []
    model = on_meta(lambda: UNet(config))
    return _map_and_load(model, state, rows, dtype, f"UNet from {where(source)}", prefix)


def load_svd_unet(source: Source, config=None, *, dtype: torch.dtype | None = None) -> SVDUNet:
    """Our SVDUNet from svd*.safetensors (`model.diffusion_model.`), a diffusers `unet/` or pipeline folder or file,
    or a state dict. `config`: a preset name, an SVDUNetConfig or diffusers config.json fields; by default the
    folder's config.json, else svd_xt for full-size weights. Every key is accounted for; nothing is half-loaded."""
    source = component(source, "unet")
    config = config if config is not None else folder_config(source)
    state, prefix = _read_unet(source)
    if not any(".time_stack." in k or ".temporal_res_block." in k for k in state):
        raise ValueError(f"{where(source)}: an image UNet (no temporal layers); load it with load_unet")
    if config is None:
        # svd, svd_xt and svd_xt_1_1 have the same keys and shapes (§1 detection): full-size weights get svd_xt,
        # whose only difference from svd is the default frame count.
        conv_in = state.get("conv_in.weight", state.get("input_blocks.0.0.weight"))
        if tuple(conv_in.shape) != (SVD_XT.channels[0], SVD_XT.in_channels, 3, 3):
            raise ValueError(f"{where(source)}: cannot tell which SVD UNet this is (not full size); pass config= "
                             f"one of {sorted(SVD_PRESETS)}, an SVDUNetConfig or a diffusers config dict")
        config = SVD_XT
    elif isinstance(config, str):
        if config not in SVD_PRESETS:
            raise ValueError(f"{where(source)}: unknown SVD UNet preset {config!r} "
                             f"(expected one of {sorted(SVD_PRESETS)})")
        config = SVD_PRESETS[config]
    config = svd_unet_config_from_diffusers(config) if isinstance(config, Mapping) else config
    rows = svd_unet_original_rows(config) if any(k.startswith("input_blocks.") for k in state) else []
    model = on_meta(lambda: SVDUNet(config))
    return _map_and_load(model, state, rows, dtype, f"SVD UNet from {where(source)}", prefix)


def save_unet(model: UNet | SVDUNet, path: str | Path, layout: str = "diffusers") -> None:
    """Write a UNet (SD or SVD): "diffusers" -> a folder (config.json + diffusion_pytorch_model.safetensors) written
    as one unit; "original" -> one .safetensors with `model.diffusion_model.` keys (LDM/SGM names)."""
    if layout == "diffusers":
        to_json = svd_unet_config_to_diffusers if isinstance(model, SVDUNet) else unet_config_to_diffusers
        save_diffusers_folder(model.state_dict(), to_json(model.config), path)
    elif layout == "original":
        save_state(original_state(model, "unet"), path)
    else:
        raise ValueError(f"unknown layout {layout!r} (expected 'diffusers' or 'original')")


def save_svd_unet(model: SVDUNet, path: str | Path, layout: str = "diffusers") -> None:
    """save_unet for the SVD UNet (same layouts)."""
    save_unet(model, path, layout)


# --- VAEs: AutoencoderKL (SD / SDXL) and SVD's temporal autoencoder ----------------------------------------------


def _vae_source(source: Source, config, temporal: bool) -> tuple[Source, StateDict, VAEConfig | TemporalVAEConfig]:
    """(source, state, config) for a file, a vae/ or pipeline folder, or a state dict; `config` a preset name
    (default "sd" / "svd"), a config, or config.json fields (a folder's config.json is read)."""
    source = component(source, "vae")
    config = config if config is not None else folder_config(source)
    presets, kind = (VIDEO_VAE_PRESETS, TemporalVAEConfig) if temporal else (VAE_PRESETS, VAEConfig)
    state = read_state(source)
    decoder = [k for k in state if k.startswith(("decoder.", ORIGINAL_PREFIXES["vae"] + "decoder."))]
    if decoder and any(mark in k for k in decoder for mark in TEMPORAL_VAE_MARKS) != temporal:
        raise ValueError(f"{where(source)}: " + ("an image VAE (no temporal decoder layers); load it with load_vae"
                         if temporal else "SVD's temporal VAE (temporal decoder layers found); load it with "
                         "load_temporal_vae"))
    if isinstance(config, Mapping):
        config = vae_config_from_diffusers(config, temporal)
    elif config is None or isinstance(config, str):
        name = config or ("svd" if temporal else "sd")
        if name not in presets:
            raise ValueError(f"{where(source)}: unknown VAE preset {name!r} (expected one of {sorted(presets)})")
        config = presets[name]
    if not isinstance(config, kind):
        raise ValueError(f"{where(source)}: config must be a preset name, a {kind.__name__} or config.json fields")
    return source, state, config


def _vae_check(state: Mapping[str, Tensor], source: Source) -> None:
    """One clear error for a file that holds no VAE at all (a UNet, a text encoder, ...)."""
    if not any(k.startswith(("encoder.", "decoder.")) for k in state):
        raise ValueError(f"{where(source)}: not a VAE checkpoint (no encoder./decoder. or first_stage_model. weights; "
                         f"first keys: {sorted(state)[:3]})")


def load_vae(source: Source, config=None, *, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """Our AutoencoderKL from a diffusers file/folder (or a pipeline folder), an original single file
    (`first_stage_model.`; the other components are ignored), a standalone LDM VAE file, or a state dict.
    An SVD file or folder is refused with the name of the loader to use (load_temporal_vae)."""
    source, state, cfg = _vae_source(source, config, temporal=False)
    prefix = ORIGINAL_PREFIXES["vae"] if any(k.startswith(ORIGINAL_PREFIXES["vae"]) for k in state) else ""
    state = strip_prefix(state, prefix)
    _vae_check(state, source)
    model = on_meta(lambda: AutoencoderKL(cfg))
    # the original rows, plus the legacy diffusers attention names; diffusers names pass through unchanged
    return _map_and_load(model, state, SD_VAE_ROWS + LEGACY_DIFFUSERS_ROWS, dtype, f"VAE from {where(source)}", prefix)


def load_temporal_vae(source: Source, config=None, *, dtype: torch.dtype | None = None) -> TemporalAutoencoder:
    """Our TemporalAutoencoder (SVD) from the diffusers vae/ (file, folder, pipeline folder or state dict), a whole
    svd*.safetensors (encoder + quant_conv from the conditioning embedder, decoder from first_stage_model, §4.3), or
    a file holding only `first_stage_model.` (no quant_conv there: the model is then built without one)."""
    source, state, cfg = _vae_source(source, config, temporal=True)
    prefix = ""
    if SVD_EMBEDDER_PREFIX + "encoder.conv_in.weight" in state:
        rows = SVD_RELEASE_ROWS
    else:
        prefix = ORIGINAL_PREFIXES["vae"] if any(k.startswith(ORIGINAL_PREFIXES["vae"]) for k in state) else ""
        state = strip_prefix(state, prefix)
        _vae_check(state, source)
        rows = SVD_FIRST_STAGE_ROWS + LEGACY_DIFFUSERS_ROWS
    if "quant_conv.weight" not in state and SVD_EMBEDDER_PREFIX + "quant_conv.weight" not in state:
        cfg = replace(cfg, use_quant_conv=False)  # SGM's first stage has no quant_conv (§2.1)
    model = on_meta(lambda: TemporalAutoencoder(cfg))
    return _map_and_load(model, state, rows, dtype, f"temporal VAE from {where(source)}", prefix)


def save_vae(model: AutoencoderKL | TemporalAutoencoder, path: str | Path, layout: str = "diffusers") -> None:
    """Write an AutoencoderKL or TemporalAutoencoder. "diffusers": a folder (config.json +
    diffusion_pytorch_model.safetensors) written as one unit. "original": one .safetensors in the single-file
    layout (`first_stage_model.`; for SVD also `conditioner.embedders.3.encoder.`, as the release keeps it)."""
    if layout == "diffusers":
        save_diffusers_folder(model.state_dict(), vae_config_to_diffusers(model.config), path)
    elif layout == "original":
        save_state(original_state(model, "vae"), path)
    else:
        raise ValueError(f"unknown layout {layout!r} (expected 'diffusers' or 'original')")


# --- CLIP towers: SD1.5 / SD2 / SDXL text, SVD image ---------------------------------------------------------------


def _clip_tower(state: StateDict, config: CLIPConfig | None, prefix: str | None) -> tuple[str, list[Row]]:
    """(prefix, rows) of the CLIP tower in `state`: a single-file prefix (§2.1), else bare OpenCLIP or HF names."""
    present = [p for p in clip_keymap.SINGLE_FILE if any(k.startswith(p) for k in state)]
    if prefix is not None:
        if not any(k.startswith(prefix) for k in state):
            raise ValueError(f"no keys start with prefix {prefix!r}")
        present = [prefix]
    if len(present) > 1:  # SDXL holds two text towers: keep the one the config fits
        fits = [p for p in present if config is not None and _clip_fits(state, p, clip_keymap.SINGLE_FILE[p], config)]
        if len(fits) != 1:
            raise ValueError(f"the weights hold several CLIP towers ({', '.join(present)}) and "
                             f"{'no config was given' if config is None else f'{len(fits)} fit the config'}: "
                             "pass a config that fits one of them, or prefix=")
        present = fits
    if present and present[0] in clip_keymap.SINGLE_FILE:
        return present[0], clip_keymap.SINGLE_FILE[present[0]]
    start = present[0] if present else ""
    keys = [k[len(start):] for k in state if k.startswith(start)]
    if any(k.startswith(("transformer.resblocks.", "visual.", "token_embedding.")) for k in keys):  # OpenCLIP names
        vision = config.vision if config is not None else not any(k.startswith("token_embedding.") for k in keys)
        return start, clip_keymap.OPENCLIP_VISION if vision else clip_keymap.OPENCLIP_TEXT
    return start, clip_keymap.HF_TEXT + clip_keymap.HF_VISION


def _clip_fits(state: StateDict, prefix: str, rows: list[Row], config: CLIPConfig) -> bool:
    """Whether the tower under `prefix` has exactly the keys and shapes of `config`'s model."""
    renamed, _ = KeyMap(rows).apply(strip_prefix(state, prefix))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_clip(config).state_dict().items()}
    return expected == {k: tuple(v.shape) for k, v in renamed.items()}


def _clip_folder(source: Source, config: CLIPConfig | None) -> Source:
    """The tower folder of a pipeline folder: the only one it has, or the one whose config.json is `config`."""
    if isinstance(source, Mapping) or not Path(source).is_dir():
        return source
    towers = {n: folder_config(Path(source) / n) for n in ("text_encoder", "text_encoder_2", "image_encoder")
              if (Path(source) / n).is_dir()}
    if len(towers) > 1 and config is not None:
        towers = {n: hf for n, hf in towers.items() if hf is not None and config_from_hf(hf) == config}
    if len(towers) > 1 or (not towers and (Path(source) / "model_index.json").is_file()):
        raise ValueError(f"{source}: a pipeline folder with {len(towers) or 'no'} matching CLIP towers: pass the "
                         "folder of one (text_encoder/, text_encoder_2/, image_encoder/) or its config")
    return Path(source) / next(iter(towers)) if towers else source


def load_clip(source: Source, config: CLIPConfig | None = None, *, prefix: str | None = None,
              dtype: torch.dtype | None = None) -> CLIPTextModel | CLIPVisionModel:
    """A CLIP tower from an HF folder (text_encoder/, text_encoder_2/, image_encoder/, or a pipeline folder holding
    one, or several and a config that picks one), a file or a state dict.

    The layout is detected: an original single file (SD1.5, SD2, SDXL: pass the config or prefix= to choose one of
    its two text towers, SVD), OpenCLIP names, or HF names. The config comes from the folder's config.json, else
    from `config`, else from the one preset in encoders.clip.PRESETS whose shapes fit. Strict accounting throughout.
    """
    source = _clip_folder(source, config)
    hf = folder_config(source)
    if hf is not None:
        folder_cfg = config_from_hf(hf)
        if config is not None and config != folder_cfg:
            diff = [f"{f}: config.json {getattr(folder_cfg, f)!r} vs given {getattr(config, f)!r}"
                    for f in CLIPConfig.__dataclass_fields__ if getattr(folder_cfg, f) != getattr(config, f)]
            raise ValueError(f"{source}: the given CLIP config does not match config.json ({'; '.join(diff)})")
        config = folder_cfg
    state = read_state(source)
    start, rows = _clip_tower(state, config, prefix)
    if not any(k.startswith(("text_model.", "vision_model.")) for k in KeyMap(rows).apply(strip_prefix(state, start))[0]):
        raise ValueError(f"{where(source)}: no CLIP text or vision tower found (looked for the prefixes "
                         f"{', '.join(clip_keymap.SINGLE_FILE)}, and for HF or OpenCLIP names)")
    if config is None:
        fits = [c for c in CLIP_PRESETS.values() if _clip_fits(state, start, rows, c)]
        if len(fits) != 1:
            raise ValueError(f"{where(source)}: {'no' if not fits else 'more than one'} preset of "
                             "encoders.clip.PRESETS fits these CLIP weights: pass config=")
        config = fits[0]
    model = on_meta(lambda: build_clip(config))
    what = f"CLIP {'vision' if config.vision else 'text'} tower ({where(source)}, prefix {start or 'none'!r})"
    state = strip_prefix(state, start)  # the only reference left to the tower's tensors (see _map_and_load)
    return _map_and_load(model, state, rows, dtype, what, start).eval()


def save_clip(model: CLIPTextModel | CLIPVisionModel, path: str | Path, layout: str = "transformers") -> None:
    """Write a CLIP tower as a transformers folder (config.json + model.safetensors, written as one unit) that
    CLIPTextModel(WithProjection) / CLIPVisionModel(WithProjection).from_pretrained load. For the original
    single-file layouts, merge `original_state(model, component)` into the file instead."""
    if layout != "transformers":
        raise ValueError(f"unknown layout {layout!r} (expected 'transformers'; original layouts: original_state)")
    save_diffusers_folder(model.state_dict(), clip_keymap.clip_config_to_hf(model.config), path, "model.safetensors")


# --- original single-file exports ----------------------------------------------------------------------------------


def original_state(model: nn.Module, component: str) -> StateDict:
    """`model`'s tensors under the names and prefix of an original single file (component: a key of
    ORIGINAL_PREFIXES), ready to merge with other components into one file that LDM/SGM-based tools read."""
    if component not in ORIGINAL_PREFIXES:
        raise ValueError(f"unknown component {component!r} (expected one of {', '.join(ORIGINAL_PREFIXES)})")
    prefix, state = ORIGINAL_PREFIXES[component], model.state_dict()
    kinds = {"unet": (UNet, SVDUNet), "vae": (AutoencoderKL, TemporalAutoencoder), "svd_image": (CLIPVisionModel,)}
    if not isinstance(model, kinds.get(component, (CLIPTextModel,))):
        raise ValueError(f"original_state: a {type(model).__name__} cannot be exported as {component!r}")
    if isinstance(model, TemporalAutoencoder):  # SVD: decoder in the first stage, encoder + quant_conv in embedder 3
        out, _ = KeyMap(SVD_RELEASE_ROWS).inverse().apply(state)
        encoder, _ = KeyMap(ENCODER_ROWS).inverse().apply({k: v for k, v in state.items() if k.startswith("encoder.")})
        # SGM's first stage keeps its own copy of the encoder (cloned: a file cannot hold two views of one tensor)
        return out | {prefix + k: v.clone() for k, v in encoder.items()}
    if component == "unet":
        rows = svd_unet_original_rows(model.config) if isinstance(model, SVDUNet) else unet_original_rows(model.config)
    else:
        rows = SD_VAE_ROWS if component == "vae" else clip_keymap.EXPORT[prefix]
    renamed, _ = KeyMap(rows).inverse().apply(state)
    if component in ("sd15_text", "sdxl_text_l"):  # the released files carry transformers' position_ids buffer
        renamed["text_model.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
    return {prefix + k: v for k, v in renamed.items()}

