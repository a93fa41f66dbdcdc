"""train.py end to end on the fill50k toy (experiments/tiny_smoke.py at test sizes): every ablation trains, resume is
exact, 2-process gloo equals single-process gradient averaging, the NaN guard trips, bad inputs fail clearly."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from controlnext.controlnext import ABLATIONS
from controlnext.checkpoint import read_state, save_state
from controlnext.data import VOCAB
from controlnext.training import load_checkpoint
from encoders.toy_text import TOY as TOY_TEXT, ToyTextEncoder
from unet.sd_unet import TOY, UNet

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A random toy base (UNet + text encoder) so the tests do not depend on the shipped weights."""
    torch.manual_seed(0)
    state = {f"unet.{k}": v for k, v in UNet(TOY).state_dict().items()}
    state |= {f"text_encoder.{k}": v for k, v in ToyTextEncoder(TOY_TEXT, VOCAB).state_dict().items()}
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_state(state, path)
    return str(path)


def smoke(base: str, out: Path, **overrides) -> train.TrainConfig:
    config = train.cli.load_experiment(ROOT / "experiments" / "tiny_smoke.py", train.TrainConfig)
    small = dict(base_weights=base, out_dir=str(out), batch_size=2, max_steps=2, eval_every=0, eval_count=2,
                 sampling_steps=2, save_every=1000, progress=False, num_threads=1)
    return dataclasses.replace(config, **(small | overrides))


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_each_ablation_trains(base, tmp_path, ablation):
    result = train.main(smoke(base, tmp_path, ablation=ablation))
    run = Path(result["run"])
    assert len(result["losses"]) == 2 and all(map(lambda x: x == x, result["losses"]))  # finite (not NaN)
    assert {"iou", "color_error_in"} <= set(result["eval"])
    for name in ("config.json", "log.txt", "metrics.jsonl", "plot.png", "samples/step_000002.png",
                 "checkpoints/step_000002.safetensors", "checkpoints/step_000002_ema.safetensors",
                 "checkpoints/step_000002.pt"):
        assert (run / name).is_file(), name
    trained = read_state(run / "checkpoints" / "step_000002.safetensors")
    unet_keys = [k for k in trained if k.startswith("unet.")]
    assert len(trained) > len(unet_keys) and all(".to_out." in k for k in unet_keys)  # branch + --trainable=to_out


def test_base_stage_and_unet_selection(tmp_path, base):
    run = Path(train.main(smoke("", tmp_path, stage="base", max_steps=1))["run"])
    weights = read_state(run / "base_weights.safetensors")
    assert any(k.startswith("unet.") for k in weights) and any(k.startswith("text_encoder.") for k in weights)
    run = Path(train.main(smoke(base, tmp_path, trainable="none", max_steps=1))["run"])
    assert not any(k.startswith("unet.") for k in read_state(run / "checkpoints" / "step_000001.safetensors"))


def test_resume_is_exact(base, tmp_path):
    straight = train.main(smoke(base, tmp_path / "a", max_steps=4))
    half = train.main(smoke(base, tmp_path / "b", max_steps=2))
    ckpt = Path(half["run"]) / "checkpoints" / "step_000002.pt"
    rest = train.main(smoke(base, tmp_path / "b", max_steps=4, resume=str(ckpt)))
    assert half["losses"] + rest["losses"] == straight["losses"]  # bit-identical loss values
    assert Path(rest["run"]) == Path(half["run"])  # the resumed run continues in its own folder
    a = load_checkpoint(Path(straight["run"]) / "checkpoints" / "step_000004.pt")
    b = load_checkpoint(Path(rest["run"]) / "checkpoints" / "step_000004.pt")
    for key in ("params", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values()))
    assert [r["loss"] for r in metrics_rows(Path(rest["run"])) if "loss" in r] == straight["losses"]
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        train.main(smoke(base, tmp_path / "b", max_steps=4, lr=1.0, resume=str(ckpt)))


def test_two_process_gloo_equals_gradient_accumulation(base, tmp_path):
    """torchrun 2 ranks x 1 micro-batch == 1 process x 2 micro-batches (rank r draws micro-batch r)."""
    args = ["train.py", "experiments/tiny_smoke.py", f"--base_weights={base}", "--batch_size=2", "--max_steps=2",
            "--eval_every=0", "--eval_count=1", "--sampling_steps=1", "--progress=False", "--num_threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", *args,
                    f"--out_dir={tmp_path / 'ddp'}"], cwd=ROOT, env=env, check=True, capture_output=True)
    single = train.main(smoke(base, tmp_path / "one", grad_accum=2, eval_count=1, sampling_steps=1))
    ddp_run = next((tmp_path / "ddp").iterdir())
    a = read_state(ddp_run / "checkpoints" / "step_000002.safetensors")
    b = read_state(Path(single["run"]) / "checkpoints" / "step_000002.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    losses = [r["loss"] for r in metrics_rows(ddp_run) if "loss" in r]
    assert losses == pytest.approx(single["losses"], rel=1e-5)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(base, tmp_path):
    with pytest.raises(FloatingPointError, match="step_000002.pt"):
        train.main(smoke(base, tmp_path, max_steps=4, save_every=1, inject_nan_at=2))
    run = next(tmp_path.iterdir())
    assert (run / "checkpoints" / "step_000002.pt").is_file()
    assert not (run / "checkpoints" / "step_000003.pt").exists()
    assert "non-finite" in (run / "log.txt").read_text()


def test_bad_inputs_fail_clearly(base, tmp_path):
    with pytest.raises(ValueError, match="dataset folder not found"):
        train.main(smoke(base, tmp_path, dataset=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="unknown ablation"):
        train.main(smoke(base, tmp_path, ablation="nope"))
    with pytest.raises(ValueError, match="unknown schedule 'sd16'"):
        train.main(smoke(base, tmp_path, schedule="sd16"))
    with pytest.raises(ValueError, match="needs base_weights"):
        train.main(smoke("", tmp_path))


def test_dry_run_and_unknown_flag():
    out = subprocess.run([sys.executable, "train.py", "experiments/sd15_fill50k.py", "--lr=2e-5", "--dry_run"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["lr"] == 2e-5 and json.loads(out)["branch"] == "g2"
    bad = subprocess.run([sys.executable, "train.py", "--bogus=1"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown option --bogus" in bad.stderr


def test_sample_py_from_a_checkpoint(base, tmp_path):
    import sample
    run = Path(train.main(smoke(base, tmp_path, max_steps=1))["run"])
    out = tmp_path / "grid.png"
    sample.main(sample.SampleConfig(checkpoint=str(run / "checkpoints" / "step_000001_ema.safetensors"),
                                    fill_index=2, batch=2, sampling_steps=2, sampler="euler_ancestral", out=str(out)))
    assert out.is_file()
    sample.main(sample.SampleConfig(base_weights=base, fill_index=2, batch=1, sampling_steps=2, out=str(out)))
