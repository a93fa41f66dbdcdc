"""SD3 weights in and out: the MMDiT (original single file or diffusers folder), the SD3 VAE, SD3 ControlNets.

Formats (Stability-AI/sd3.5@8df03ab3 single files; huggingface/diffusers@v0.42.1 pipeline folders):
- original single file (sd3_medium.safetensors, sd3.5_*.safetensors): the MMDiT under `model.diffusion_model.`
  (rows in mmdit/keymap.py), the VAE under `first_stage_model.` (LDM names, rows in vae/keymap.py), the text encoders
  under `text_encoders.{clip_l,clip_g,t5xxl}.` (not read here). A loader takes its own component and ignores the rest.
- diffusers: a pipeline folder with `transformer/`, `vae/` (and `controlnet/` for a ControlNet pipeline), each holding
  config.json and diffusion_pytorch_model.safetensors (or shards with an index); our module names equal these.
Every load goes through the engine of controlnext/checkpoint.py: each key accounted for, one error listing what does
not fit under the file's own names, the model built on the meta device and filled by assignment (no half-loaded
model, no second copy). Writers are atomic (a temporary sibling, then os.replace).
Left out: the text encoders (encoders/), the SD3.5 ControlNets without position table (see sd3_controlnet.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from controlnext.checkpoint import KeyMap, load_into, read_state, save_state, strip_prefix
from controlnext.meta import on_meta
from controlnext.sd3_controlnet import SD3ControlNet, SD3ControlNetConfig
from mmdit.keymap import config_from_diffusers, config_to_diffusers, detect_config, export_rows, original_depth, \
    original_rows
from mmdit.mmdit import PRESETS, MMDiT, MMDiTConfig
from vae.autoencoder import PRESETS as VAE_PRESETS
from vae.autoencoder import AutoencoderKL, VAEConfig
from vae.keymap import LEGACY_DIFFUSERS_ROWS, SD_VAE_ROWS, vae_config_from_diffusers

ORIGINAL_MMDIT_PREFIX = "model.diffusion_model."
ORIGINAL_VAE_PREFIX = "first_stage_model."
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

Source = str | Path | Mapping[str, Tensor]


def _where(source: Source) -> str:
    return "state dict" if isinstance(source, Mapping) else str(source)


def _component(source: Source, subfolder: str) -> tuple[Source, dict | None]:
    """A pipeline folder's component subfolder (or the folder itself) and its config.json fields, if any."""
    if isinstance(source, Mapping):
        return source, None
    path = Path(source)
    if (path / subfolder).is_dir():
        path = path / subfolder  # a whole diffusers pipeline folder
    config_file = path / "config.json"
    return path, (json.loads(config_file.read_text()) if path.is_dir() and config_file.is_file() else None)


def _write_folder(folder: str | Path, config_json: dict, state: Mapping[str, Tensor]) -> None:
    """A diffusers model folder (config.json + weights), written into a temporary sibling and moved into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_state(state, tmp / WEIGHTS_FILE)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2))
        if not folder.exists():
            os.replace(tmp, folder)  # the whole folder appears at once
        else:
            for name in (WEIGHTS_FILE, "config.json"):
                os.replace(tmp / name, folder / name)  # each file replaced atomically
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- MMDiT -----------------------------------------------------------------------------------------------------------


def _mmdit_config(config, folder_json: dict | None, renamed: Mapping[str, Tensor], where: str) -> MMDiTConfig:
    """The config to build: given (preset name, MMDiTConfig or config.json fields), else config.json, else detected."""
    config = folder_json if config is None else config
    if config is None:
        return detect_config(renamed)
    if isinstance(config, Mapping):
        return config_from_diffusers(config)
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"{where}: unknown MMDiT preset {config!r} (expected one of {sorted(PRESETS)})")
        return PRESETS[config]
    if not isinstance(config, MMDiTConfig):
        raise ValueError(f"{where}: config must be a preset name, an MMDiTConfig or config.json fields")
    return config


def load_mmdit(source: Source, config=None, *, dtype: torch.dtype = torch.float32) -> MMDiT:
    """Our MMDiT with the weights of `source`: an original single file (`model.diffusion_model.`; its VAE and text
    encoders are ignored), a diffusers `transformer/` folder or pipeline folder, a file or a state dict in either
    layout. `config`: a preset name, an MMDiTConfig or config.json fields; by default the folder's config.json,
    else detected from the weights. Every key is accounted for; nothing is half-loaded."""
    where = _where(source)
    source, folder_json = _component(source, "transformer")
    state = read_state(source)
    prefix = ORIGINAL_MMDIT_PREFIX if any(k.startswith(ORIGINAL_MMDIT_PREFIX) for k in state) else ""
    state = strip_prefix(state, prefix)
    if any(k.startswith("joint_blocks.") for k in state):
        rows = original_rows(original_depth(state))  # the original layout (fused qkv, mmditx.py names)
    elif any(k.startswith("transformer_blocks.") for k in state):
        rows = []  # diffusers names are ours
    else:
        raise ValueError(f"{where}: not an SD3 MMDiT checkpoint (no joint_blocks / transformer_blocks weights; "
                         f"first keys: {sorted(state)[:3]})")
    renamed, origin = KeyMap(rows).apply(state)
    cfg = _mmdit_config(config, folder_json, renamed, where)
    model = on_meta(lambda: MMDiT(cfg).to(dtype))
    load_into(model, renamed, {k: prefix + v for k, v in origin.items()}, what=f"MMDiT from {where}")
    return model.eval()


def fuse_qkv(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our separate q, k, v projections -> one [3C, ...] tensor per stream (`to_qkv.`, `add_qkv_proj.`), the
    original layout's fused `qkv` Linear; the inverse of the engine's split_qkv (mmdit/keymap.py docstring)."""
    out = dict(state)
    for key in state:
        m = re.fullmatch(r"(.*\.)(to_q|add_q_proj)\.(weight|bias)", key)
        if m:
            stem, name, leaf = m.groups()
            names = ("to_q", "to_k", "to_v") if name == "to_q" else ("add_q_proj", "add_k_proj", "add_v_proj")
            fused = "to_qkv" if name == "to_q" else "add_qkv_proj"
            out[f"{stem}{fused}.{leaf}"] = torch.cat([out.pop(f"{stem}{n}.{leaf}") for n in names])  # (3C, ...)
    return out


def original_mmdit_state(model: MMDiT) -> dict[str, Tensor]:
    """The MMDiT's tensors as an original single file holds them: `model.diffusion_model.` keys in the mmditx.py
    layout (fused qkv, (shift, scale) adaLN order), ready to merge with the other components of one file."""
    renamed, _ = KeyMap(export_rows(model.config.depth)).inverse().apply(fuse_qkv(model.state_dict()))
    return {ORIGINAL_MMDIT_PREFIX + k: v for k, v in renamed.items()}


def save_mmdit(model: MMDiT, path: str | Path, layout: str = "diffusers") -> None:
    """Write the MMDiT for other tools: "diffusers" -> a transformer/ folder (config.json + weights, loadable by
    diffusers' SD3Transformer2DModel.from_pretrained); "original" -> one .safetensors (original_mmdit_state)."""
    if layout == "diffusers":
        _write_folder(path, config_to_diffusers(model.config), model.state_dict())
    elif layout == "original":
        save_state(original_mmdit_state(model), path)
    else:
        raise ValueError(f"unknown layout {layout!r} (expected 'diffusers' or 'original')")


# --- VAE -------------------------------------------------------------------------------------------------------------


def load_sd3_vae(source: Source, config=None) -> AutoencoderKL:
    """The SD3 VAE (16 channels, no quant convs, shifted latents) from an original single file (`first_stage_model.`;
    the rest ignored), a diffusers vae/ or pipeline folder (its config.json read), a file or a state dict.
    `config`: a preset name ("sd3" by default), a VAEConfig or config.json fields. Every key is accounted for."""
    where = _where(source)
    source, folder_json = _component(source, "vae")
    config = folder_json if config is None else config
    if config is None or isinstance(config, str):
        if (config or "sd3") not in VAE_PRESETS:
            raise ValueError(f"{where}: unknown VAE preset {config!r} (expected one of {sorted(VAE_PRESETS)})")
        config = VAE_PRESETS[config or "sd3"]
    elif isinstance(config, Mapping):
        config = vae_config_from_diffusers(config, temporal=False)
    if not isinstance(config, VAEConfig):
        raise ValueError(f"{where}: config must be a preset name, a VAEConfig or config.json fields")
    state = read_state(source)
    prefix = ORIGINAL_VAE_PREFIX if any(k.startswith(ORIGINAL_VAE_PREFIX) for k in state) else ""
    state = strip_prefix(state, prefix)
    if not any(k.startswith(("encoder.", "decoder.")) for k in state):
        raise ValueError(f"{where}: not a VAE checkpoint (no encoder./decoder. or first_stage_model. weights)")
    renamed, origin = KeyMap(SD_VAE_ROWS + LEGACY_DIFFUSERS_ROWS).apply(state)  # LDM names renamed, diffusers pass
    model = on_meta(lambda: AutoencoderKL(config))
    load_into(model, renamed, {k: prefix + v for k, v in origin.items()}, what=f"SD3 VAE from {where}")
    return model.eval()


# --- ControlNet (diffusers SD3ControlNetModel folders, e.g. InstantX's) ------------------------------------------------

# Fields of an SD3ControlNetModel config.json that must describe the MMDiT it is attached to, or the features we build.
CONTROLNET_FIXED = {"pos_embed_type": "sincos", "use_pos_embed": True}
CONTROLNET_OWN = ("num_layers", "extra_conditioning_channels", "force_zeros_for_pooled_projection")


def load_sd3_controlnet(source: Source, mmdit: MMDiTConfig, config: SD3ControlNetConfig | None = None
                        ) -> SD3ControlNet:
    """An SD3 ControlNet for the MMDiT `mmdit` from a diffusers controlnet/ folder (its config.json must agree with
    `mmdit` on every shared field), a file or a state dict (then pass `config`). Loaded strictly, by identity."""
    where = _where(source)
    source, folder_json = _component(source, "controlnet")
    if config is None:
        if folder_json is None:
            raise ValueError(f"{where}: no config.json: pass config=SD3ControlNetConfig(...)")
        for field, value in CONTROLNET_FIXED.items():
            if folder_json.get(field, value) != value:
                raise ValueError(f"{where}: {field}={folder_json[field]!r} is not supported (expected {value!r})")
        # every other field is one of the MMDiT's (diffusers copies the transformer's config into the ControlNet's)
        theirs = {k: v for k, v in folder_json.items()
                  if not k.startswith("_") and k not in (*CONTROLNET_OWN, *CONTROLNET_FIXED)}
        ours = {k: v for k, v in config_to_diffusers(mmdit).items() if not k.startswith("_") and k != "num_layers"}
        differ = sorted(k for k, v in theirs.items() if k not in ours or ours[k] != v)
        if differ:
            raise ValueError(f"{where}: config.json does not describe the given MMDiT: "
                             + ", ".join(f"{k}={theirs[k]!r} (MMDiT {ours.get(k, 'no such field')!r})" for k in differ))
        config = SD3ControlNetConfig(mmdit, folder_json["num_layers"], folder_json.get("extra_conditioning_channels", 0))
    model = on_meta(lambda: SD3ControlNet(config))
    return load_into(model, read_state(source), what=f"SD3 ControlNet from {where}").eval()
