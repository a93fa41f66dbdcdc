"""The controls of one sampling run: a control model around the pipeline's UNet, built from a train.py checkpoint or
an official ControlNeXt release, the UNet weights that come with it, and its condition image.

Sources (../shared/reference/controlnext.md §3, §6):
- a train.py checkpoint (`step_N[_ema].safetensors`): its metadata holds the run's resolved TrainConfig, which names
  the arm, branch and injection; its `unet.*` tensors are the trained UNet tensors (absolute values);
- an official branch file (SD1.5 `controlnet.safetensors` = G1-SD15 with a learned scale: the release injection after
  the mid block; SD1.5-Training `controlnext.bin` and SDXL `controlnet.safetensors` = G2: the family's training site);
- the release's UNet file: absolute tensors (SD1.5) or increments ΔW (SDXL `--load_weight_increasement`). Which one is
  read off the file against the loaded base (`detect_increments`), not asked of the user: an absolute file is close to
  the base (|W - W_base| << |W|), an increments file is close to zero (|ΔW| << |W_base|).
Left out: ControlNet checkpoints of other projects (diffusers ControlNetModel folders), T2I adapters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from controlnext import cli
from controlnext.canny import canny_control
from controlnext.checkpoint import KeyMap, load_into, read_metadata, read_state
from controlnext.config import TrainConfig
from controlnext.control_branch import PRESETS as BRANCHES, ControlNeXtConfig, branch_for
from controlnext.controlnext import (PRESETS as INJECTIONS, ControlNeXtUNet, build_controlled_unet, injection_preset,
                                     site_width)
from controlnext.data import load_image
from controlnext.keymap import CONTROL_BRANCH_ROWS, UNET_ROWS
from controlnext.releases import detect_control_branch, load_unet_weights
from controlnext.sd_pipeline import StableDiffusion
from controlnext.selection import select_trainable
from unet.keymap import unet_original_rows

# The official release injection of each branch generation, per family (controlnext.md §0).
RELEASE_INJECTION = {("g1_sd15", "sd1"): "sd15_release", ("g2", "sd1"): "sd15_train", ("g2", "sd2"): "sd15_train",
                     ("g2", "sdxl"): "sdxl"}


@dataclass
class LoadedControl:
    model: nn.Module          # a controlled UNet around pipe.unet (controlnext.build_controlled_unet)
    scale: float              # the scale it was trained at (a run) or 1.0 (a release): --control_scale overrides
    resolution: int | None    # the run's training resolution, None for a release
    source: str


def from_run(path: Path, pipe: StableDiffusion) -> LoadedControl:
    """A train.py checkpoint: the arm its config names, the branch and zero conv / γ, and the trained UNet tensors."""
    meta = read_metadata(path)
    try:
        config = cli.from_dict(TrainConfig, json.loads(meta["config"]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the training config in its metadata is not JSON ({e})") from None
    if config.stage != "control":
        raise ValueError(f"{path}: a {config.stage}-stage checkpoint holds a base model, not a control: "
                         "pass its run's model.safetensors as --pretrained")
    injection = injection_preset(config.injection, config.control_site)
    branch = branch_for(config.branch, site_width(pipe.config.unet, injection))  # as stages.ControlStage
    model = build_controlled_unet(config.ablation, pipe.unet, branch, injection)
    select_trainable(pipe.unet, config.trainable)  # adds the LoRA modules a lora:R run trained, if any
    pipe.unet.requires_grad_(False)
    load_into(model, read_state(path), what=f"trained tensors from {path}", mode="partial")
    return LoadedControl(model.eval(), config.control_scale, config.resolution, str(path))


def branch_config(state: dict[str, Tensor], kind: str) -> ControlNeXtConfig:
    """The branch a file holds: the official preset of its generation, with the widths read off the tensors (they are
    the preset's for a release; smaller for test files). Group counts cannot be read off weights: the preset's."""
    preset = BRANCHES[kind]
    stem = tuple(state[f"embedding.{3 * i}.weight"].shape[0] for i in range(len(preset.stem_channels)))
    res = tuple(state[f"down_res.{i}.conv1.weight"].shape[0] for i in range(len(preset.res_channels)))
    return replace(preset, time_channels=state["time_embedding.linear_1.weight"].shape[1],
                   emb_dim=state["time_embedding.linear_1.weight"].shape[0], stem_channels=stem, res_channels=res,
                   out_channels=state["mid_convs.1.weight"].shape[0])


def from_release(path: Path, pipe: StableDiffusion) -> LoadedControl:
    """An official ControlNeXt branch file; its injection is the release's for this branch and family."""
    state, _ = KeyMap(CONTROL_BRANCH_ROWS).apply(read_state(path))
    kind = detect_control_branch(state)
    injection = RELEASE_INJECTION.get((kind, pipe.config.family))
    if injection is None:
        raise ValueError(f"{path}: a {kind} branch has no official release for {pipe.config.family} "
                         f"(known: {sorted(RELEASE_INJECTION)})")
    model = ControlNeXtUNet(pipe.unet, branch_config(state, kind), INJECTIONS[injection])
    load_into(model.branch, state, what=f"ControlNeXt branch from {path}")
    return LoadedControl(model.eval(), 1.0, None, str(path))


def load_control(path: str | Path, pipe: StableDiffusion) -> LoadedControl:
    """A control from a train.py checkpoint (it carries its config) or an official branch file (it does not)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"control file not found: {path}")
    ours = path.suffix == ".safetensors" and "config" in read_metadata(path)  # official .bin files carry no metadata
    return from_run(path, pipe) if ours else from_release(path, pipe)


def detect_increments(state: dict[str, Tensor], base: dict[str, Tensor]) -> bool:
    """True if the UNet file holds ΔW (close to 0) rather than absolute weights (close to the base): compares
    sum |W_file - W_base| with sum |W_file| over the shared tensors."""
    to_base = sum((state[k].float() - base[k].float()).abs().sum().item() for k in state)
    to_zero = sum(state[k].float().abs().sum().item() for k in state)
    return to_zero < to_base


def apply_unet_weights(pipe: StableDiffusion, path: str | Path) -> bool:
    """An official release's UNet file over the pipeline's UNet; returns whether it held increments."""
    state, _ = KeyMap(UNET_ROWS).apply(read_state(path))
    if any(k.startswith("input_blocks.") for k in state):
        state, _ = KeyMap(unet_original_rows(pipe.config.unet)).apply(state)
    base = pipe.unet.state_dict()
    unknown = sorted(k for k in state if k not in base)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} tensors are not in this UNet, e.g. {unknown[:3]}")
    increments = detect_increments(state, base)
    load_unet_weights(pipe.unet, path, increments=increments, what=f"UNet weights from {path}")
    return increments


def condition_image(path: str, size: tuple[int, int], canny: bool) -> Tensor:
    """A condition image file -> (3, H, W) in [0, 1] at (height, width), optionally through the official canny."""
    image = load_image(Path(path), size)  # resized to cover (height, width), centre-cropped
    if canny:
        return canny_control(image)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
