"""sample.py end to end on tiny checkpoints: the base alone, a train.py run's control, an official-format ControlNeXt
release (branch + UNet file, absolute or increments read off the file), several controls at once, a control window,
LoRA and canny; deterministic for a seed; bad input is one clear error before any work."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from controlnext.checkpoint import read_state, save_state
from controlnext.control_branch import G1_SD15, ControlNeXt
from controlnext.controlnext import PRESETS as INJECTIONS, ControlNeXtUNet
from controlnext.canny import canny_control
from controlnext.controls import detect_increments, load_control
from controlnext.data import fill50k_example, fill50k_tokenizer, load_image
from controlnext.sd_pipeline import PRESETS, StableDiffusion, load_sd, text_to_image
from tests.test_train import smoke


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny_sd15.safetensors"
    StableDiffusion.random(PRESETS["tiny_sd15"], fill50k_tokenizer()).save(path)
    return path


@pytest.fixture(scope="module")
def run_checkpoint(tiny, tmp_path_factory) -> Path:
    run = Path(train.main(smoke(str(tiny), tmp_path_factory.mktemp("runs"), max_steps=2))["run"])
    return run / "checkpoints" / "step_000002_ema.safetensors"


def config(tiny: Path, out: Path, **fields) -> sample.SampleConfig:
    base = dict(pretrained=str(tiny), batch=2, steps=3, out=str(out / "grid.png"), guidance_scale=2.0)
    return dataclasses.replace(sample.SampleConfig(), **(base | fields))


def test_base_alone_is_deterministic_and_follows_its_settings(tiny, tmp_path):
    # Every setting away from its default, so that one sample.py drops is seen: the result must be text_to_image
    # called by hand with them (the same kernels, batch and order: fp32 rounding only).
    settings = dict(prompt="red circle with blue background", negative_prompt="green circle with white background",
                    seed=3, clip_skip=1, guidance_scale=3.0, sampler="euler", steps=3)
    a = sample.main(config(tiny, tmp_path, **settings))
    b = sample.main(config(tiny, tmp_path, **settings))
    assert torch.equal(a["images"], b["images"])  # same seed, same kernels, same process
    assert Image.open(tmp_path / "grid.png").size == (2 * (2 * 64 + 2), 64 + 2)
    expected = text_to_image(load_sd(tiny), [settings["prompt"]] * 2, [settings["negative_prompt"]] * 2, height=64,
                             width=64, sampler="euler", steps=3, guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(3), clip_skip=1)
    torch.testing.assert_close(a["images"], expected, atol=1e-5, rtol=0)


def test_run_control_changes_the_output_and_reports_fill_metrics(tiny, run_checkpoint, tmp_path):
    plain = sample.main(config(tiny, tmp_path, fill_index=3))
    controlled = sample.main(config(tiny, tmp_path, fill_index=3, control=(str(run_checkpoint),)))
    assert {"iou", "palette_error"} <= set(controlled["metrics"])
    assert (controlled["images"] - plain["images"]).abs().max() > 1e-3  # cross_norm is not a no-op


TINY_G1 = dataclasses.replace(G1_SD15, out_channels=32, time_channels=16, emb_dim=32, res_channels=(16, 32, 32))


def official_release(tmp_path: Path, pipe: StableDiffusion) -> tuple[Path, Path, dict]:
    """A tiny SD1.5-release-format pair: a G1-SD15 branch (learned `scale`, official keys; widths read off the file
    by the loader, group counts the preset's) and a partial UNet file of absolute to_out tensors."""
    torch.manual_seed(1)
    assert pipe.config.unet.channels[-1] == TINY_G1.out_channels  # the release injects after the mid block
    branch = ControlNeXt(TINY_G1)
    with torch.no_grad():
        branch.scale.fill_(0.7)
    branch_path = tmp_path / "controlnet.safetensors"
    save_state(branch.state_dict(), branch_path)
    base = pipe.unet.state_dict()
    trained = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items() if ".to_out." in k}
    unet_path = tmp_path / "unet.safetensors"
    save_state(trained, unet_path)
    return branch_path, unet_path, trained


def test_official_release_loads_and_injects_as_the_release_does(tiny, tmp_path):
    pipe = load_sd(tiny)
    branch_path, unet_path, trained = official_release(tmp_path, pipe)
    image = tmp_path / "ring.png"
    Image.fromarray(fill50k_example(0, 64, 1)["control"]).save(image)
    got = sample.main(config(tiny, tmp_path, control=(str(branch_path),), unet_weights=(str(unet_path),),
                             control_image=(str(image),), prompt="red circle with blue background"))
    # The same thing built by hand: the release's injection (after the mid block, k = learned scale), absolute UNet.
    pipe.unet.load_state_dict({**pipe.unet.state_dict(), **trained})
    model = ControlNeXtUNet(pipe.unet, TINY_G1, INJECTIONS["sd15_release"])
    model.branch.load_state_dict(read_state(branch_path))
    control = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1).float()[None] / 255
    expected = text_to_image(pipe, ["red circle with blue background"] * 2, [""] * 2, height=64, width=64,
                             sampler="dpmpp_2m", steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                             controls=[(model, control.expand(2, -1, -1, -1), 1.0)])
    torch.testing.assert_close(got["images"], expected, atol=1e-5, rtol=0)  # same kernels, batch and order


def test_absolute_and_increment_files_are_told_apart(tiny):
    base = load_sd(tiny).unet.state_dict()
    keys = [k for k in base if ".to_out." in k]
    trained = {k: base[k] + 0.02 * torch.randn_like(base[k]) for k in keys}
    assert not detect_increments(trained, base)
    assert detect_increments({k: trained[k] - base[k] for k in keys}, base)


def test_control_window(tiny, run_checkpoint, tmp_path):
    """A window that holds no step is the run's UNet without its control (scale 0); a half window differs from both."""
    run = dict(fill_index=3, control=(str(run_checkpoint),))
    unscaled = sample.main(config(tiny, tmp_path, control_scale=(0.0,), **run))  # the run's trained UNet tensors
    off = sample.main(config(tiny, tmp_path, control_start=1.0, control_end=1.0, **run))
    half = sample.main(config(tiny, tmp_path, control_start=0.0, control_end=0.5, **run))
    full = sample.main(config(tiny, tmp_path, **run))
    torch.testing.assert_close(off["images"], unscaled["images"], atol=1e-6, rtol=0)  # k = 0 adds an exact 0
    assert (half["images"] - off["images"]).abs().max() > 1e-4 and (half["images"] - full["images"]).abs().max() > 1e-4


def test_two_controls_at_once_and_canny(tiny, run_checkpoint, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(fill50k_example(5, 64, 1)["target"]).save(photo)
    out = sample.main(config(tiny, tmp_path, control=(str(run_checkpoint), str(run_checkpoint)),
                             control_image=(str(photo), str(photo)), canny=True, control_scale=(0.5, 0.5),
                             prompt="aqua circle with white background"))
    # by hand: both controls from the run, each on the official canny extractor's edges of the photo, summed
    pipe = load_sd(tiny)
    edges = canny_control(load_image(photo, (64, 64)))
    assert 0 < edges.mean() < 0.5  # a photo of a disc has a ring of edges, not nothing and not everything
    controls = [(load_control(run_checkpoint, pipe).model, edges.expand(2, -1, -1, -1), 0.5) for _ in range(2)]
    expected = text_to_image(pipe, ["aqua circle with white background"] * 2, [""] * 2, height=64, width=64,
                             sampler="dpmpp_2m", steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                             controls=controls)
    torch.testing.assert_close(out["images"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("field,value,message", [("batch", 0, "--batch=0"), ("sampler", "bogus", "--sampler"),
                                                 ("width", 60, "--width=60"), ("lora_mode", "x", "--lora_mode"),
                                                 ("control_image", ("a.png",), "1 images for 0 controls")])
def test_bad_settings_fail_before_loading(tiny, tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        sample.main(config(tiny, tmp_path, **{field: value}))
    assert not (tmp_path / "grid.png").exists()


def test_unreadable_control_files_name_the_file(tiny, tmp_path):
    bad = tmp_path / "step_000001.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=str(bad)):
        sample.main(config(tiny, tmp_path, control=(str(bad),)))
    pt = tmp_path / "control.pt"
    pt.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        sample.main(config(tiny, tmp_path, control=(str(pt),)))
