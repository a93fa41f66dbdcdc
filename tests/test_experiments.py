"""The experiment scripts in smoke mode (tiny models, 2 steps), so they cannot rot: Table 2 latency, the Fig. 3 protocol
(sweep, reported seeds, sensitivity, rerun check) and the parameter-selection ablation run end to end through train.py
and write their figures and tables."""

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from controlnext.data import fill50k_tokenizer
from controlnext.sd_pipeline import PRESETS, StableDiffusion

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A random tiny SD1.5-structured single file, so the smoke runs do not depend on the shipped weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny_sd15.safetensors"
    StableDiffusion.random(PRESETS["tiny_sd15"], fill50k_tokenizer()).save(path)
    return str(path)


def test_table2_latency_smoke(tmp_path):
    out = tmp_path / "table2.txt"
    lines = script("table2_latency").main(["--smoke", "--threads=1", f"--out={out}"])
    text = out.read_text()
    assert text.splitlines() == lines
    for arm in ("base", "controlnext", "controlnext_official", "controlnet"):
        assert text.count(f"  {arm:21s} ") == 2, arm  # batch 1 and batch 2 (CFG)
    assert "paper Table 2" in text and "+9.1%" in text and "+40.9%" in text


def test_fig3_protocol_smoke(tiny, tmp_path):
    argv = ["--smoke", f"--pretrained={tiny}", f"--runs_dir={tmp_path / 'runs'}", f"--results={tmp_path / 'res'}"]
    result = script("fig3_convergence").main(argv)
    assert set(result["curves"]) == {"cross_norm", "zero_conv"} and result["best_lr"] == {"cross_norm": 1e-3,
                                                                                         "zero_conv": 1e-3}
    assert all(len(c) == 1 and [s for s, _ in c[0]] == [0, 1, 2] for c in result["curves"].values())
    table = "\n".join(result["table"])
    for text in ("learning-rate sweep", "steps to IoU >= 0.7", "sensitivity of cross_norm", "rerun check", "CPU"):
        assert text in table, text
    for file in ("table.md", "curves.json", "curves.png", "diagnostics.png", "sensitivity.png", "sites.png"):
        assert (tmp_path / "res" / file).is_file(), file
    assert Image.open(tmp_path / "res" / "curves.png").size == (880, 528)
    again = script("fig3_convergence").main(argv)  # every run found done: only the tables and figures are redrawn
    assert again["curves"] == result["curves"]


def test_selection_smoke(tiny, tmp_path):
    argv = ["--smoke", f"--pretrained={tiny}", f"--runs_dir={tmp_path / 'runs'}", f"--results={tmp_path / 'res'}"]
    result = script("ablation_selection").main(argv)
    assert set(result["curves"]) == {"none", "lora:4"}
    assert sum(line.startswith("| none (") or line.startswith("| lora:4 (") for line in result["table"]) == 2
    for file in ("table.md", "curves.json", "curves.png", "selection.png"):
        assert (tmp_path / "res" / file).is_file(), file


def test_prediction_interval_closed_form_and_the_rerun_check():
    """mean +- t(0.975, n-1) s sqrt(1/n + 1/m): for 1, 2, 3 (mean 2, s 1, t(2) = 4.303) and m = 1 the half width is
    4.303 sqrt(4/3); a rerun is judged against it, not against the (much narrower) bootstrap interval of the mean."""
    protocol = script("protocol")
    lo, hi = protocol.prediction_interval([1.0, 2.0, 3.0], 1)
    assert abs(hi - 2 - 4.303 * (4 / 3) ** 0.5) < 1e-9 and abs((lo + hi) / 2 - 2) < 1e-12
    lo3, hi3 = protocol.prediction_interval([1.0, 2.0, 3.0], 3)
    assert abs(hi3 - 2 - 4.303 * (2 / 3) ** 0.5) < 1e-9  # a 3-seed mean varies less than one seed
    with pytest.raises(ValueError, match="at least 2 seeds"):
        protocol.prediction_interval([0.5], 1)
    reported = [[(0, 0.2), (10, v)] for v in (0.50, 0.52, 0.54, 0.56, 0.58)]
    near, far = [[(0, 0.2), (10, v)] for v in (0.55, 0.57)], [[(0, 0.2), (10, v)] for v in (0.70, 0.72)]
    assert "inside" in protocol.rerun_check(reported, near, (10,))[0]
    line = protocol.rerun_check(reported, far, (10,))[0]
    assert "OUTSIDE" in line and "0/2 seeds inside" in line


def test_a_finished_run_made_under_other_flags_is_not_reused(tmp_path):
    """run_grid skips finished runs only when their config.json has the flags asked for: a protocol whose choice
    changed (another best lr) says so in one line instead of reporting the old run."""
    protocol = script("protocol")
    run = tmp_path / "runs" / "arm_s0" / "arm-20261202"
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"lr": 0.001, "control_lr": 0.01, "ablation": "zero_conv", "max_steps": 2}')
    (run / "metrics.jsonl").write_text('{"step": 0, "iou": 0.2}\n{"step": 2, "iou": 0.3}\n')
    same = ["--ablation=zero_conv", "--lr=0.001", "--control_lr=0.01", "--max_steps=2"]
    assert protocol.run_grid({"arm_s0": same}, tmp_path / "runs", 2, 1) == {"arm_s0": run}  # found, not run again
    with pytest.raises(ValueError, match=r"'arm_s0' has --lr=0.001, this protocol asks --lr=0.003") as e:
        protocol.run_grid({"arm_s0": [*same[:1], "--lr=0.003", *same[2:]]}, tmp_path / "runs", 2, 1)
    assert len(str(e.value).splitlines()) == 1


def test_a_diverged_run_is_an_outcome_not_a_crash(tmp_path, monkeypatch):
    """train.py's NaN guard stops a run (too high an lr, say): the grid records it as diverged and goes on, a
    relaunch does not run it again, and a real failure still stops the grid with the run's log named."""
    protocol = script("protocol")
    fake = tmp_path / "fake_train.py"  # stands in for train.py: a metrics file, then the NaN guard's message
    fake.write_text("import sys, pathlib\n"
                    "out = pathlib.Path(next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--out_dir=')))\n"
                    "(out / 'r').mkdir(parents=True, exist_ok=True)\n"
                    "(out / 'r' / 'metrics.jsonl').write_text('{\"step\": 0, \"iou\": 0.2}\\n')\n"
                    "if '--lr=0.1' in sys.argv:\n"
                    "    print('step 3 | non-finite loss or gradient (nan); stopping: no checkpoint'); sys.exit(1)\n"
                    "sys.exit(2)\n")
    monkeypatch.setattr(protocol, "ROOT", tmp_path)
    (tmp_path / "train.py").write_text(fake.read_text())
    runs = tmp_path / "runs"
    protocol.run_grid({"hot": ["--lr=0.1", "--max_steps=5"]}, runs, 2, 1)
    assert protocol.diverged(runs, "hot").startswith("step 3 | non-finite loss")
    assert protocol.is_done(runs, "hot", 5)
    with pytest.raises(RuntimeError, match=r"'cold'|cold: train.py failed \(exit 2\)"):
        protocol.run_grid({"cold": ["--lr=0.001", "--max_steps=5"]}, runs, 2, 1)
