"""train.py and sample.py on tiny SD3 checkpoints in the real layouts (issue 19): a T5-less original single file
written by our exporter and a diffusers folder with a tiny T5 written by diffusers. Every `--ablation` arm (the four
ControlNeXt-SD3 arms and the SD3 ControlNet) trains with the SD3 recipe, the super-resolution toy trains and samples,
sample.py is deterministic for a seed, bad SD3 settings fail before anything is written."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import sample
import train
from controlnext.checkpoint import read_state
from controlnext.controlnext import ABLATIONS
from controlnext.data import fill50k_example, fill50k_tokenizer
from controlnext.sd3_pipeline import TINY_SD3, StableDiffusion3
from controlnext.sd3_stages import downsample, psnr, super_resolution_condition, upsample
from controlnext.sd_pipeline import PRESETS as SD_PRESETS, StableDiffusion
from tests.sd3_fixtures import tiny_sd3
from tests.test_train import smoke as sd_smoke


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> str:
    """A random tiny T5-less SD3 as one original-layout single file (+ tokenizer/ beside it)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sd3") / "tiny_sd3.safetensors"
    StableDiffusion3.random(TINY_SD3, fill50k_tokenizer()).save(path)
    return str(path)


def smoke(pretrained: str, out: Path, **overrides):
    return sd_smoke(pretrained, out, **({"sampler": "euler"} | overrides))  # SD3 samples with a flow sampler


@pytest.fixture(scope="module")
def sr_run(tiny_file, tmp_path_factory) -> dict:
    """The super-resolution toy: fill50k targets, the condition their 4x-downsampled copy upsampled back."""
    return train.main(smoke(tiny_file, tmp_path_factory.mktemp("runs"), ablation="cross_norm",
                            control_source="super_resolution", sr_factor=4))


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_each_arm_trains_on_the_single_file(tiny_file, tmp_path, ablation):
    result = train.main(smoke(tiny_file, tmp_path, ablation=ablation))
    run = Path(result["run"])
    assert len(result["losses"]) == 2 and all(math.isfinite(x) and x > 0 for x in result["losses"])
    assert {"iou", "color_error_in"} <= set(result["eval"]) and (run / "samples" / "step_000002.png").is_file()
    config = json.loads((run / "config.json").read_text())
    assert (config["injection"], config["trainable"], config["branch"]) == ("sd3", "to_out", "tiny")  # resolved
    trained = read_state(run / "checkpoints" / "step_000002.safetensors")
    mmdit_keys = [k for k in trained if k.startswith("mmdit.")]
    assert mmdit_keys and all(".attn.to_out." in k for k in mmdit_keys)
    control_keys = set(trained) - set(mmdit_keys)
    expected = ("controlnet.",) if ablation == "controlnet" else ("branch.", "patch_embed.", "gamma")
    assert control_keys and all(k.startswith(expected) for k in control_keys)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    """A diffusers StableDiffusion3Pipeline folder with a tiny T5, written by diffusers."""
    folder = tmp_path_factory.mktemp("sd3") / "pipe"
    tiny_sd3(folder, t5=True)
    return str(folder)


@pytest.mark.parametrize("ablation", ["cross_norm", "controlnet"])
def test_diffusers_folder_trains_with_its_t5(tiny_folder, tmp_path, ablation):
    result = train.main(smoke(tiny_folder, tmp_path, ablation=ablation, trainable="joint_to_out"))
    assert all(math.isfinite(x) for x in result["losses"])
    keys = [k for k in read_state(Path(result["run"]) / "checkpoints" / "step_000002.safetensors") if k[:6] == "mmdit."]
    assert all(re.search(r"\.attn\.to(_add)?_out\.", k) for k in keys)  # both streams' attention outputs
    assert any(".to_add_out." in k for k in keys) and any(".to_out." in k for k in keys)


def test_super_resolution_condition_closed_form():
    blocks = torch.rand(2, 3, 4, 4) * 2 - 1  # a target made of 4 x 4 constant blocks of 4 x 4 pixels
    images = blocks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # (2, 3, 16, 16)
    assert_close = torch.testing.assert_close
    assert_close(downsample(images, 4), (blocks + 1) / 2, atol=1e-6, rtol=0)  # area: the mean of each block
    flat = torch.full((1, 3, 4, 4), 0.3)
    assert_close(upsample(flat, (16, 16)), torch.full((1, 3, 16, 16), 0.3), atol=1e-6, rtol=0)  # constants stay
    condition = super_resolution_condition(images, 4)
    assert condition.shape == images.shape and 0 <= condition.min() and condition.max() <= 1
    assert psnr(images.clamp(-0.8, 0.8) + 0.2, images.clamp(-0.8, 0.8)) == pytest.approx(20.0, abs=1e-4)  # 0.1 in [0, 1]


def test_super_resolution_toy_trains_and_samples(sr_run, tiny_file, tmp_path):
    run = Path(sr_run["run"])
    assert all(math.isfinite(x) for x in sr_run["losses"])
    assert math.isfinite(sr_run["eval"]["psnr"]) and sr_run["eval"]["psnr_input"] > 20  # 4x bicubic: 25.8 dB
    assert json.loads((run / "config.json").read_text())["control_source"] == "super_resolution"
    checkpoint = str(run / "checkpoints" / "step_000002_ema.safetensors")
    toy = sample.main(config(tiny_file, tmp_path, control=(checkpoint,), fill_index=2))  # fill50k target, degraded
    low = tmp_path / "low.png"  # a 16 x 16 low-res image, upsampled to the run's 64 px
    Image.fromarray(fill50k_example(2, 16, 1)["target"]).save(low)
    from_file = sample.main(config(tiny_file, tmp_path, control=(checkpoint,), control_image=(str(low),)))
    assert toy["images"].shape == from_file["images"].shape == (2, 3, 64, 64)
    assert torch.isfinite(toy["images"]).all() and torch.isfinite(from_file["images"]).all()


def config(pretrained: str, out: Path, **fields) -> sample.SampleConfig:
    base = dict(pretrained=pretrained, batch=2, steps=3, out=str(out / "grid.png"), guidance_scale=2.0,
                sampler="euler")
    return dataclasses.replace(sample.SampleConfig(), **(base | fields))


def test_sample_is_deterministic_and_the_control_acts(tiny_file, sr_run, tmp_path):
    a = sample.main(config(tiny_file, tmp_path, prompt="red circle with blue background", sampler="heun"))
    b = sample.main(config(tiny_file, tmp_path, prompt="red circle with blue background", sampler="heun"))
    assert a["images"].shape == (2, 3, 64, 64) and torch.isfinite(a["images"]).all()
    assert torch.equal(a["images"], b["images"])  # same seed, same kernels, same process
    checkpoint = str(Path(sr_run["run"]) / "checkpoints" / "step_000002.safetensors")
    plain = sample.main(config(tiny_file, tmp_path, fill_index=3))
    controlled = sample.main(config(tiny_file, tmp_path, fill_index=3, control=(checkpoint,)))
    assert {"iou", "palette_error"} <= set(controlled["metrics"])
    assert (controlled["images"] - plain["images"]).abs().max() > 1e-3  # cross_norm is not a no-op
    # an empty window is the run's MMDiT (its trained to_out tensors) without the control, as scale 0 is
    off = sample.main(config(tiny_file, tmp_path, fill_index=3, control=(checkpoint,), control_start=1.0))
    unscaled = sample.main(config(tiny_file, tmp_path, fill_index=3, control=(checkpoint,), control_scale=(0.0,)))
    torch.testing.assert_close(off["images"], unscaled["images"], atol=1e-6, rtol=0)  # k = 0 adds an exact 0


BAD = [("sampler", "dpmpp_2m", "--sampler='dpmpp_2m': SD3 samples"), ("cache_latents", True, "--cache_latents"),
       ("resolution", 72, "--resolution=72: SD3 needs a multiple of 16"), ("injection", "sdxl", "--injection='sdxl'"),
       ("sr_factor", 3, "--sr_factor=3")]


@pytest.mark.parametrize("field,value,message", BAD, ids=[b[0] for b in BAD])
def test_bad_sd3_settings_fail_before_anything_is_written(tiny_file, tmp_path, field, value, message):
    extra = {"control_source": "super_resolution"} if field == "sr_factor" else {}
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as e:
        train.main(smoke(tiny_file, tmp_path / "runs", **{field: value}, **extra))
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / "runs").exists()
    if field == "sampler":
        with pytest.raises(ValueError, match="SD3 samples with one of euler, heun"):
            sample.main(config(tiny_file, tmp_path, sampler="dpmpp_2m"))
        assert not (tmp_path / "grid.png").exists()


def test_super_resolution_is_sd3_only(tmp_path):
    path = tmp_path / "tiny_sd15.safetensors"
    StableDiffusion.random(SD_PRESETS["tiny_sd15"], fill50k_tokenizer()).save(path)
    with pytest.raises(ValueError, match="--control_source='super_resolution': implemented for SD3 models only"):
        train.main(smoke(str(path), tmp_path / "runs", control_source="super_resolution"))
    assert not (tmp_path / "runs").exists()
