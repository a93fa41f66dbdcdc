"""The official ControlNeXt release formats (dvlab-research/ControlNeXt@ab4b3ac): control-branch files, UNet
weight files (absolute or increments ΔW), and ΔW = W_trained - W_base for export.

Formats (../shared/reference/controlnext.md §1.5, §3, §6): the branch files use the official module names, which
are ours (controlnext/control_branch.py); the UNet files hold diffusers names (= ours), original `input_blocks.*`
names (SDXL files from kohya/SGM tools, mapped by unet/keymap.py), or the `unet.` / `controlnext.` prefixes of a
DeepSpeed zero_to_fp32 export (rows in controlnext/keymap.py). Loads go through controlnext/checkpoint.py's engine
with strict accounting; partial UNet files are an explicit partial load that prints a summary.
Left out: telling absolute files from increments by their values (the caller says which).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from controlnext.checkpoint import KeyMap, StateDict, check_state, load_into, read_state
from controlnext.meta import on_meta
from controlnext.control_branch import PRESETS, ControlNeXt, ControlNeXtConfig
from controlnext.keymap import CONTROL_BRANCH_ROWS, UNET_ROWS
from unet.keymap import unet_original_rows


def detect_control_branch(state: Mapping[str, Tensor]) -> str:
    """g2 / g1_sd15 / g1_svd from an official control-branch state dict (reference controlnext.md §1.5)."""
    if "scale" not in state:
        return "g2"
    return "g1_svd" if any(k.startswith("embedding.") for k in state) else "g1_sd15"


def load_control_branch(source: str | Path | Mapping[str, Tensor], config=None) -> nn.Module:
    """A ControlNeXt branch from an official or our file, loaded strictly (every key, every shape).
    `config`: a ControlNeXtConfig or a preset name; by default detected from the keys."""
    renamed, origin = KeyMap(CONTROL_BRANCH_ROWS).apply(read_state(source))
    config = config if config is not None else detect_control_branch(renamed)
    cfg = config if isinstance(config, ControlNeXtConfig) else PRESETS[config]
    model = on_meta(lambda: ControlNeXt(cfg))
    where = source if not isinstance(source, Mapping) else "state dict"
    return load_into(model, renamed, origin, what=f"ControlNeXt branch from {where}", dtype=torch.float32)


def weight_increments(trained: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> StateDict:
    """ΔW = W_trained - W_base for every tensor of `trained` (official `weight_increasements`, our key names)."""
    missing = sorted(k for k in trained if k not in base)
    if missing:
        raise ValueError(f"weight increments: {len(missing)} trained tensors have no base tensor, e.g. {missing[:3]}")
    return {k: trained[k].detach().float() - base[k].detach().float() for k in trained}


def load_unet_weights(unet: nn.Module, source: str | Path | Mapping[str, Tensor], *, increments: bool,
                      what: str = "UNet weights") -> nn.Module:
    """Load a partial UNet file over `unet`: absolute tensors (W = file) or increments (W = W_current + ΔW).
    Accepts our / diffusers names, original `input_blocks.*` names (SDXL kohya-style files) and the
    `unet.`-prefixed DeepSpeed export; every key must land on a UNet tensor of the same shape."""
    state, origin0 = KeyMap(UNET_ROWS).apply(read_state(source))
    rows = unet_original_rows(unet.config) if any(k.startswith("input_blocks.") for k in state) else []
    renamed, origin = KeyMap(rows).apply(state)
    origin = {k: origin0.get(v, v) for k, v in origin.items()}
    if not increments:
        return load_into(unet, renamed, origin, what=what, mode="partial")
    check_state(unet, renamed, origin, what=what, partial=True)
    targets = unet.state_dict()
    with torch.no_grad():
        for key, delta in renamed.items():
            targets[key].add_(delta.to(device=targets[key].device, dtype=torch.float32).to(targets[key].dtype))
    print(f"{what}: added increments to {len(renamed)} of {len(targets)} tensors "
          f"({sum(v.numel() for v in renamed.values()):,} parameters)")
    return unet
