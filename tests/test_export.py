"""controlnext/export.py round trips: the official pair (absolute and ΔW) reads back through sample.py's release loader
to the run's own output; the merged single file reads back to identical tensors; diffusers loads the diffusers folder
and its UNet equals ours."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

import sample
import train
from controlnext.checkpoint import read_state
from controlnext.export import ExportConfig, export
from controlnext.sd_pipeline import load_sd
from tests.test_sample import config as sample_config, tiny  # noqa: F401 - the tiny checkpoint fixture
from tests.test_train import smoke


@pytest.fixture(scope="module")
def run_checkpoint(tiny, tmp_path_factory) -> Path:  # noqa: F811
    run = Path(train.main(smoke(str(tiny), tmp_path_factory.mktemp("runs"), max_steps=2, lr=1e-2))["run"])
    return run / "checkpoints" / "step_000002_ema.safetensors"


@pytest.mark.parametrize("increments", [False, True], ids=["absolute", "increments"])
def test_official_pair_samples_like_the_run(tiny, run_checkpoint, tmp_path, increments):  # noqa: F811
    out = export(ExportConfig(checkpoint=str(run_checkpoint), format="official", increments=increments,
                              out=str(tmp_path / "official")))
    unet_file = out / ("unet_weight_increments.safetensors" if increments else "unet.safetensors")
    assert {p.name for p in out.iterdir()} == {"controlnet.safetensors", unet_file.name}
    assert not any(k.startswith("branch.") for k in read_state(out / "controlnet.safetensors"))  # official names
    fields = dict(fill_index=2, control_scale=(1.0,))
    run = sample.main(sample_config(tiny, tmp_path, control=(str(run_checkpoint),), **fields))
    release = sample.main(sample_config(tiny, tmp_path, control=(str(out / "controlnet.safetensors"),),
                                        unet_weights=(str(unet_file),), **fields))
    # The same branch, injection (sd15_train = the SD1.5 release of the G2 branch) and UNet weights; ΔW adds in fp32.
    torch.testing.assert_close(release["images"], run["images"], atol=1e-5, rtol=0)


def test_single_file_reads_back_identical_and_diffusers_loads_the_folder(tiny, run_checkpoint, tmp_path):  # noqa: F811
    single = export(ExportConfig(checkpoint=str(run_checkpoint), format="single_file",
                                 out=str(tmp_path / "merged.safetensors")))
    assert single.with_suffix(".controlnext.safetensors").is_file()
    merged = load_sd(single)
    trained = {k.removeprefix("unet."): v for k, v in read_state(run_checkpoint).items() if k.startswith("unet.")}
    ours = merged.unet.state_dict()
    assert trained and all(torch.equal(ours[k], v) for k, v in trained.items())  # fp32 written, fp32 read back
    folder = export(ExportConfig(checkpoint=str(run_checkpoint), format="diffusers", out=str(tmp_path / "pipeline")))
    assert (folder / "controlnext" / "config.json").is_file()
    reference = StableDiffusionPipeline.from_pretrained(folder)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference.unet(x, t, context).sample, merged.unet(x, t, context), atol=1e-5, rtol=0)
    assert load_sd(folder).config == dataclasses.replace(merged.config)


def test_arms_without_an_official_layout_are_refused(tiny, tmp_path):  # noqa: F811
    run = Path(train.main(smoke(str(tiny), tmp_path, ablation="zero_conv", max_steps=1))["run"])
    with pytest.raises(ValueError, match="no official ControlNeXt layout"):
        export(ExportConfig(checkpoint=str(run / "checkpoints" / "step_000001.safetensors"), format="official",
                            out=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="--format='bogus'"):
        export(ExportConfig(checkpoint="x", format="bogus"))
