"""train.py on an SVD pipeline (controlnext/video_stages.py, controlnext/parallel.py): the ControlNeXt-SVD-v2 step
against a transcription of the official objective, the recipe on the moving-disc toy (full UNet) and on the official
meta_info layout (a selection), exact resume, and a 2-process gloo FSDP run whose sharded checkpoint resumes and whose
losses and weights match one process accumulating the same micro-batches.

Tolerances: the transcription 1e-5 relative (the same float operations, grouped differently). FSDP against one
process: 1e-4 relative on the losses; on the weights a max of 2e-4 and a mean of 1e-7. The gradients are averaged by
a reduce-scatter instead of accumulated in one process (another summation order), and AdamW's early steps move a
weight by about lr * g / |g|: where a gradient is near zero the two orders can move it differently by a fraction of
the branch's lr 1e-3 (measured: 105 of 1.4M values differ by more than 1e-5, at most 1.1e-4); a wrong average or a
lost shard would move every weight. Resume is bitwise: one process, the same sequence of kernels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
import train
from controlnext import cli
from controlnext.checkpoint import read_state
from controlnext.config import TrainConfig
from controlnext.runs import load_checkpoint
from controlnext.svd_pipeline import load_svd
from controlnext.video_data import MovingFill50k
from controlnext.video_stages import VideoStage, video_batch, video_dataset
from encoders.clip import preprocess_image
from schedulers.training import cosine_interpolated_sigma, stratified_uniform
from tests.svd_fixtures import MICRO_UNET, tiny_svd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy-sized ops: a second thread on a busy 2-core machine costs more than it saves
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    """A diffusers SVD folder with a two-level UNet (few tensors: the FSDP and checkpoint costs are per tensor)."""
    return tiny_svd(tmp_path_factory.mktemp("svd") / "micro_svd", unet_config=MICRO_UNET)


def video_smoke(pretrained: Path, out: Path, **overrides) -> TrainConfig:
    small = dict(pretrained=str(pretrained), out_dir=str(out), batch_size=1, max_steps=2, num_frames=4, video_width=32,
                 video_height=32, eval_every=0, eval_count=1, sampling_steps=2, save_every=1000, progress=False,
                 num_threads=1, warmup_steps=1, lr=1e-4, control_lr=1e-3)
    return dataclasses.replace(TrainConfig(), **(small | overrides))


def test_the_step_is_the_official_svd_v2_objective(micro):
    """One VideoStage forward against train_svd.py's step written out (controlnext.md §4.3), same random draws."""
    torch.manual_seed(0)
    config = video_smoke(micro, Path("unused"), conditioning_dropout=0.3, batch_size=4, control_scale=0.7)
    stage = VideoStage(config, load_svd(micro))
    dataset = video_dataset(config)
    _, batch = video_batch(dataset, config, 0, 0)
    batch["loss_weight"][:, 1:, :, 8:20, 4:16] = 4.2  # a "hand" region, so the weight map matters
    loss = stage(batch, torch.Generator().manual_seed(7))

    pipe, model, g = stage.pipe, stage.model, torch.Generator().manual_seed(7)
    B, num_frames = batch["frames"].shape[:2]
    with torch.no_grad():
        posterior = pipe.vae.encode(batch["frames"].flatten(0, 1))
        latents = (0.18215 * (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)))
        latents = latents.unflatten(0, (B, num_frames))  # tensor_to_vae_latent: a posterior sample, scaled
        clip = pipe.image_encoder(preprocess_image(batch["reference"], 224)).embeds[:, None]  # the clean reference
        noisy = batch["reference"] + 0.02 * torch.randn(batch["reference"].shape, generator=g)
        posterior = pipe.vae.encode(noisy)
        conditional = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)  # unscaled
    sigmas = cosine_interpolated_sigma(stratified_uniform(B, generator=g)).float()
    noise = torch.randn(latents.shape, generator=g)
    random_p = torch.rand(B, generator=g)
    assert (random_p < 0.6).any() and ((random_p >= 0.3) & (random_p < 0.9)).any()  # both dropouts occur
    clip = torch.where((random_p < 2 * 0.3).view(B, 1, 1), torch.zeros_like(clip), clip)
    conditional = conditional * (1 - ((random_p >= 0.3) & (random_p < 0.9)).float()).view(B, 1, 1, 1)
    s = sigmas.view(B, 1, 1, 1, 1)
    noisy_latents = latents + noise * s
    inp = torch.cat([noisy_latents / (s**2 + 1) ** 0.5, conditional[:, None].repeat(1, num_frames, 1, 1, 1)], dim=2)
    timesteps = 0.25 * sigmas.log()
    control = model.branch(batch["control"], timesteps)  # (B*F, C, h', w')
    k = 0.7 * 0.2  # --control_scale times the v2 control level

    def official(site, h):  # after down block 0: CN (eps 1e-5 on the std, own stats out, h's in), pool, add
        if site != "down_0":
            return h
        mean_h, std_h = h.mean(dim=(1, 2, 3), keepdim=True), h.std(dim=(1, 2, 3), keepdim=True)
        mean_c, std_c = control.mean(dim=(1, 2, 3), keepdim=True), control.std(dim=(1, 2, 3), keepdim=True)
        c = (control - mean_c) * (std_h / (std_c + 1e-5)) + mean_h
        return h + F.adaptive_avg_pool2d(c, h.shape[-2:]) * k

    ids = torch.tensor([[6.0, 127.0, 0.02]]).repeat(B, 1)
    model_pred = pipe.unet(inp, timesteps, clip, ids, num_frames=num_frames, control=official)
    denoised = model_pred * (-s / (s**2 + 1) ** 0.5) + noisy_latents / (s**2 + 1)
    weighing = (1 + s**2) * s**-2.0
    hands = F.adaptive_avg_pool2d(batch["loss_weight"].flatten(0, 1), denoised.shape[-2:]).unflatten(0, (B, num_frames))
    expected = torch.mean((weighing * (denoised - latents) ** 2 * hands).reshape(B, -1), dim=1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)  # the same operations, grouped differently


def recipe(micro: Path, out: Path, *flags: str) -> TrainConfig:
    """experiments/svd_pose.py with the CPU overrides its docstring gives (toy data, toy sizes, one process)."""
    config, _ = cli.parse_args(TrainConfig, [str(ROOT / "experiments" / "svd_pose.py"), f"--pretrained={micro}",
                                             "--dataset=fill50k", "--fsdp=False", "--mixed_precision=no",
                                             "--branch=auto", "--video_width=32", "--video_height=32",
                                             "--num_frames=4", "--max_steps=3", "--save_every=2", "--eval_count=1",
                                             "--sampling_steps=1", f"--out_dir={out}", "--progress=False",
                                             "--num_threads=1", *flags])
    return config


def test_toy_recipe_trains_the_whole_unet_and_resumes_exactly(micro, tmp_path):
    straight = train.main(recipe(micro, tmp_path))  # activation checkpointing on, as the recipe says
    run = Path(straight["run"])
    config = json.loads((run / "config.json").read_text())
    assert (config["injection"], config["trainable"], config["branch"]) == ("svd_v2", "all", "tiny")  # resolved
    assert config["gradient_checkpointing"] and config["num_frames"] == 4
    trained = read_state(run / "checkpoints" / "step_000003.safetensors")
    unet = {k for k in trained if k.startswith("unet.")}
    assert len(unet) == len(load_svd(micro).unet.state_dict()) and any(k.startswith("branch.") for k in trained)
    assert all(np.isfinite(straight["losses"])) and {"iou", "iou_reference_frame"} <= set(straight["eval"])
    resumed = train.main(recipe(micro, tmp_path, f"--resume={run / 'checkpoints' / 'step_000002.pt'}"))
    assert resumed["losses"] == straight["losses"][2:]  # the same kernels in the same order: bitwise
    again = read_state(run / "checkpoints" / "step_000003.safetensors")
    assert all(torch.equal(trained[k], again[k]) for k in trained)

    # the run's checkpoint is a control for sample.py's video mode (its config names the arm and eps layout)
    clip = MovingFill50k(32, 4, seed=5)[0]
    (tmp_path / "poses").mkdir()
    for i, frame in enumerate(clip["control"]):
        Image.fromarray((frame.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "poses" / f"{i}.png")
    Image.fromarray(((clip["reference"].permute(1, 2, 0) + 1) * 127.5).numpy().astype(np.uint8)).save(
        tmp_path / "reference.png")
    video = sample.main(dataclasses.replace(
        sample.SampleConfig(), pretrained=str(micro), control=(str(run / "checkpoints" / "step_000003.safetensors"),),
        reference=str(tmp_path / "reference.png"), pose=str(tmp_path / "poses"), pose_stride=1, height=32, width=32,
        steps=2, window=0, video_out=str(tmp_path / "video")))
    assert video["frames"].shape == (4, 3, 32, 32) and torch.isfinite(video["frames"]).all()


def write_clip(root: Path, name: str, frames: int, seed: int) -> dict:
    """A clip in the official layout: frame and pose folders, a per-video json with one confident hand per frame."""
    toy = MovingFill50k(48, frames, seed=seed)[0]
    for kind, key, scale in (("frames", "frames", 127.5), ("pose", "control", 255.0)):
        (root / name / kind).mkdir(parents=True)
        for i, frame in enumerate(toy[key]):
            pixels = ((frame + (1 if kind == "frames" else 0)) * scale).clamp(0, 255).permute(1, 2, 0).numpy()
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / kind / f"{i:03d}.png")
    hands = [{"hands_boxes": [[[0.2, 0.2], [0.4, 0.5]]], "hands_score": [[0.9] * 21]} for _ in range(frames)]
    (root / name / "meta.json").write_text(json.dumps(hands))
    return {"video_path": f"{name}/frames", "guide_path": f"{name}/pose", "meta_info": f"{name}/meta.json"}


def test_official_meta_info_layout_trains_a_selection(micro, tmp_path):
    data = tmp_path / "data"
    entries = [write_clip(data, f"clip{k}", 10, seed=k) for k in range(2)]
    (data / "meta_info.json").write_text(json.dumps(entries))
    result = train.main(video_smoke(micro, tmp_path / "runs", dataset=str(data / "meta_info.json"), trainable="to_out",
                                    frame_interval=2))
    trained = read_state(Path(result["run"]) / "checkpoints" / "step_000002.safetensors")
    unet = [k for k in trained if k.startswith("unet.")]
    assert unet and all(".to_out." in k for k in unet) and all(np.isfinite(result["losses"]))


def test_fsdp_two_processes_save_shards_resume_and_match_one_process(micro, tmp_path):
    config = video_smoke(micro, tmp_path / "fsdp", max_steps=3, save_every=2, trainable="all", ema_decay=0.0,
                         sampling_steps=1)
    fsdp = dataclasses.replace(config, fsdp=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    losses = tmp_path / "losses.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "tests" / "fsdp_run.py"), json.dumps(cli.to_dict(fsdp)), str(losses)],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    result = json.loads(losses.read_text())
    run = Path(result["run"])
    state = load_checkpoint(run / "checkpoints" / "step_000002.pt")
    assert state["sharded"] and (run / "checkpoints" / "step_000002.dcp" / ".metadata").is_file()
    single = train.main(dataclasses.replace(config, out_dir=str(tmp_path / "single"), grad_accum=2))  # micro 0, 1
    torch.testing.assert_close(torch.tensor(result["first"] + result["second"]), torch.tensor(single["losses"]),
                               rtol=1e-4, atol=0)
    sharded = read_state(run / "checkpoints" / "step_000003.safetensors")  # gathered from the shards by rank 0
    whole = read_state(Path(single["run"]) / "checkpoints" / "step_000003.safetensors")
    assert sharded.keys() == whole.keys()
    diff = torch.cat([(sharded[k] - whole[k]).abs().flatten() for k in whole])
    assert diff.max() <= 2e-4 and diff.mean() <= 1e-7  # measured 1.1e-4 (105 of 1.4M values > 1e-5) and 1.8e-8


@pytest.mark.parametrize("change, message", [
    ({"ablation": "controlnet"}, "--ablation=controlnet: the ControlNet baseline is built for the SD UNets"),
    ({"fsdp": True}, "--fsdp shards over processes: launch with torchrun"),
    ({"video_width": 48}, "the moving-disc toy is square"),
])
def test_bad_video_settings_fail_before_anything_is_written(micro, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        train.main(video_smoke(micro, tmp_path, **change))
    assert not (tmp_path / "runs").exists() and not any(tmp_path.iterdir())
