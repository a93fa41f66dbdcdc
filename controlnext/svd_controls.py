"""The inputs of one video sampling run: ControlNeXt-SVD controls (official releases or train.py video runs) around
the pipeline's UNet, the pose frames (images, a video, or keypoints through the official alignment) and the reference.

Official releases (../shared/reference/controlnext.md §0, §1.2-1.5, §6; dvlab-research/ControlNeXt@ab4b3ac):
  svd_v1        ControlNeXt-SVD/finetune/controlnet.bin: G1-SVD (learned `scale`), injected before the mid block,
                k = sigmoid(scale) * 1.3, + the full UNet file unet_fp16.bin;
  svd_v2        ControlNeXt-SVD-v2/controlnet.bin: G2 as the official *inference* file builds it, the 2nd and 3rd stem
                convs unpadded (G2_SVD_INFER), after down block 0, k = 0.2, + the full UNet file unet.bin;
  svd_v2_train  the same G2 weights with the training file's stem padding (1, 1, 1); never chosen automatically.
A release kind is read off the branch file where the file can tell: the `scale` key marks G1 (v1); a G2 file cannot
say which stem padding it was meant for (the state dicts are identical), so `auto` picks the padding the official
sampler runs it with (svd_v2) and a named --release that contradicts the file's generation is an error. Both
releases were trained on diffusers' blocks: they need the UNet built with eps_layout="diffusers" (unet/svd_unet.py),
and loading one onto a pipeline in the SGM layout is refused rather than silently run with other norms.
Our train.py video runs carry their TrainConfig (branch, injection, eps layout) in the checkpoint's metadata.
Pose input: a folder of pose images or a video file (frame 0 must be the reference image's pose, as the official v2
control sequence is [reference pose] + driving poses), or a keypoint JSON aligned to the reference's keypoints and
rendered by controlnext/pose.py. DWPose (pose estimation) is not included: its ONNX weights are not available here.
Left out: multi-control weighting schemes beyond summing at the sites (controlnext/sampling.py summed_controls).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from controlnext import cli
from controlnext.checkpoint import KeyMap, load_into, read_metadata, read_state
from controlnext.config import TrainConfig
from controlnext.control_branch import PRESETS as BRANCHES
from controlnext.controlnext import PRESETS as INJECTIONS, ControlNeXtUNet, build_controlled_unet
from controlnext.controls import LoadedControl, branch_config
from controlnext.data import load_image
from controlnext.keymap import CONTROL_BRANCH_ROWS
from controlnext.pose import aligned_pose_frames
from controlnext.releases import detect_control_branch
from controlnext.selection import select_trainable
from controlnext.video_io import read_frames

# release kind -> (the branch generation its file holds, the branch preset it runs with, the injection preset)
RELEASES = {"svd_v1": ("g1_svd", "g1_svd", "svd_v1"),
            "svd_v2": ("g2", "g2_svd_infer", "svd_v2"),
            "svd_v2_train": ("g2", "g2", "svd_v2")}
V2_LEVEL = INJECTIONS["svd_v2"].gain  # 0.2, the hand-tuned "control level" (experiences.md; controlnext.md §2.3)
EPS_LAYOUTS = ("auto", "sgm", "diffusers")  # SampleConfig.eps_layout


def release_kind(state: dict[str, Tensor], release: str, where: str) -> str:
    """The release kind of an official branch file: detected (auto) or named, never contradicting the file."""
    found = detect_control_branch(state)
    if found == "g1_sd15":
        raise ValueError(f"{where}: a ControlNeXt-SD1.5 branch (G1-SD15), not a ControlNeXt-SVD release")
    if release == "auto":
        return "svd_v1" if found == "g1_svd" else "svd_v2"
    if release not in RELEASES:
        raise ValueError(f"--release={release!r}: expected auto or one of {', '.join(RELEASES)}")
    if RELEASES[release][0] != found:
        raise ValueError(f"{where}: --release={release} is a {RELEASES[release][0]} branch, this file holds {found}")
    return release


def with_level(injection_name: str, level: float):
    """The injection preset, with SVD-v2's gain replaced by `level` (only svd_v2 has the 0.2 control level)."""
    injection = INJECTIONS[injection_name]
    if injection_name != "svd_v2":
        if level != V2_LEVEL:
            raise ValueError(f"--control_level is SVD-v2's gain; a {injection_name} control scales by its own "
                             f"k (controlnext.md §2.3): leave it at {V2_LEVEL}")
        return injection
    return replace(injection, gain=level)


def is_run(path: Path) -> bool:
    """A train.py checkpoint (its metadata holds the run's config); official .bin files carry no metadata."""
    return path.suffix == ".safetensors" and "config" in read_metadata(path)


def run_config(path: Path) -> TrainConfig:
    try:
        return cli.from_dict(TrainConfig, json.loads(read_metadata(path)["config"]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the training config in its metadata is not JSON ({e})") from None


def from_release(path: Path, pipe, release: str, level: float) -> LoadedControl:
    """An official ControlNeXt-SVD branch file around pipe.unet (the pipeline must be in the diffusers eps layout)."""
    state, _ = KeyMap(CONTROL_BRANCH_ROWS).apply(read_state(path))
    kind = release_kind(state, release, str(path))
    if pipe.unet.config.eps_layout != "diffusers":
        raise ValueError(f"{path}: the official ControlNeXt-SVD releases were trained on diffusers' UNet blocks: load "
                         f"the pipeline with eps_layout='diffusers' (--eps_layout=auto does), not "
                         f"{pipe.unet.config.eps_layout!r}")
    _, preset, injection = RELEASES[kind]
    model = ControlNeXtUNet(pipe.unet, branch_config(state, preset), with_level(injection, level))
    load_into(model.branch, state, what=f"ControlNeXt-SVD branch ({kind}) from {path}")
    print(f"{path}: {kind} release ({preset} branch, {injection} injection, k = {model.injection.gain})")
    return LoadedControl(model.to(next(pipe.unet.parameters()).dtype).eval(), 1.0, None, str(path))


def from_video_run(path: Path, pipe, level: float) -> LoadedControl:
    """A train.py video checkpoint: its arm, branch and injection, the trained branch and UNet tensors."""
    config = run_config(path)
    if config.eps_layout != pipe.unet.config.eps_layout:
        raise ValueError(f"{path}: trained with eps_layout={config.eps_layout!r}, the pipeline has "
                         f"{pipe.unet.config.eps_layout!r}")
    branch = BRANCHES[config.branch]
    if config.branch == "tiny":
        branch = replace(branch, out_channels=pipe.config.unet.channels[0])  # as video_stages.VideoStage builds it
    model = build_controlled_unet(config.ablation, pipe.unet, branch, with_level(config.injection, level))
    select_trainable(pipe.unet, config.trainable)  # adds the LoRA modules a lora:R run trained, if any
    pipe.unet.requires_grad_(False)
    load_into(model, read_state(path), what=f"trained tensors from {path}", mode="partial")
    return LoadedControl(model.to(next(pipe.unet.parameters()).dtype).eval(), config.control_scale, None, str(path))


def load_video_control(path: str | Path, pipe, release: str, level: float) -> LoadedControl:
    """A control from a train.py video run or an official ControlNeXt-SVD branch file (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"control file not found: {path}")
    return from_video_run(path, pipe, level) if is_run(path) else from_release(path, pipe, release, level)


def control_layout(config) -> str:
    """The UNet eps layout the run's controls need (sample.py SampleConfig: control, eps_layout): "diffusers" for
    official releases, a run's own, "sgm" without controls; --eps_layout other than auto is taken as given."""
    if config.eps_layout != "auto":
        return config.eps_layout
    layouts = {run_config(Path(p)).eps_layout if is_run(Path(p)) else "diffusers" for p in config.control}
    if len(layouts) > 1:
        raise ValueError(f"--control: these controls were trained with different UNet eps layouts {sorted(layouts)}")
    return layouts.pop() if layouts else "sgm"


def pose_frames(config, height: int, width: int) -> Tensor:
    """The control frames (F, 3, height, width) in [0, 1] (sample.py SampleConfig: pose, pose_reference,
    pose_stride, frames): a keypoint JSON aligned and rendered ([reference pose] + every pose_stride-th driving
    frame), or a folder / video of pose images (every pose_stride-th) resized with Lanczos like the official
    VaeImageProcessor. `frames` (0 = all) caps the count, the reference pose included."""
    path = Path(config.pose)
    if path.suffix.lower() == ".json":
        frames = aligned_pose_frames(config.pose_reference, path, width, height, stride=config.pose_stride,
                                     max_frames=config.frames - 1 if config.frames else None)
    else:
        raw = read_frames(path, stride=config.pose_stride, max_frames=config.frames or None)
        frames = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.LANCZOS)) for f in raw])
    if config.frames and len(frames) < config.frames:
        raise ValueError(f"--frames={config.frames}: {path} gives only {len(frames)} pose frames "
                         f"(stride {config.pose_stride})")
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)


def reference_image(path: str | Path, height: int, width: int) -> Tensor:
    """The reference image scaled to cover (height, width) and centre-cropped (official v2 preprocess), (3, H, W) in
    [-1, 1]."""
    image = load_image(Path(path), (height, width))  # (H, W, 3) uint8
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
