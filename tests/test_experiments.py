"""The issue-6 experiment scripts in smoke mode (tiny presets, 2 steps), so they cannot rot: Table 2 latency,
Fig. 3 convergence and the parameter-selection ablation run end to end and write their figures and tables."""

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from controlnext.checkpoint import save_state
from controlnext.data import VOCAB
from encoders.toy_text import TOY as TOY_TEXT, ToyTextEncoder
from unet.sd_unet import TOY, UNet

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A random toy base, so the smoke runs do not depend on the shipped weights."""
    torch.manual_seed(0)
    state = {f"unet.{k}": v for k, v in UNet(TOY).state_dict().items()}
    state |= {f"text_encoder.{k}": v for k, v in ToyTextEncoder(TOY_TEXT, VOCAB).state_dict().items()}
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_state(state, path)
    return str(path)


def test_table2_latency_smoke(tmp_path):
    out = tmp_path / "table2.txt"
    lines = script("table2_latency").main(["--smoke", "--threads=1", f"--out={out}"])
    text = out.read_text()
    assert text.splitlines() == lines
    for arm in ("base", "controlnext", "controlnext_official", "controlnet"):
        assert text.count(f"  {arm:21s} ") == 2, arm  # batch 1 and batch 2 (CFG)
    assert "paper Table 2" in text and "+9.1%" in text and "+40.9%" in text


@pytest.mark.parametrize("name, arms", [("fig3_convergence", 5), ("ablation_selection", 4)])
def test_training_protocols_smoke(base, tmp_path, name, arms):
    argv = ["--smoke", f"--base_weights={base}", f"--runs_dir={tmp_path / 'runs'}", f"--results={tmp_path / 'res'}"]
    result = script(name).main(argv)
    assert len(result["curves"]) == arms and all(len(c) == 1 and [s for s, _ in c[0]][-2:] == [1, 2]
                                                 for c in result["curves"].values())
    assert sum(line.startswith("| ") for line in result["table"]) >= arms + 1
    for file in ("table.md", "curves.json", "curves.png"):
        assert (tmp_path / "res" / file).is_file(), file
    assert Image.open(tmp_path / "res" / "curves.png").size == (900, 520)
    # A second call finds every run done and only redraws (an interrupted protocol resumes).
    again = script(name).main(argv)
    assert again["curves"] == result["curves"]
