"""experiments/gpu_rows.py, the one prepared script for a lent GPU: its budget and time-limit bookkeeping on sleeping
parts, and its smoke mode, which runs the very benchmark commands of the GPU rows on the CPU with tiny presets, so
that the script a device session will spend its few minutes on does not rot between sessions."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu_rows.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_rows", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parts_run_in_order_each_cut_at_its_limit_and_the_rest_skipped_when_the_budget_is_gone(tmp_path):
    g = load()
    py = lambda code: ("python", "-c", code)  # noqa: E731
    todo = [g.Part("ok", py("print('ratio ours/diffusers: median 0.9')"), 10),
            g.Part("fails", py("import sys; print('error: bad'); sys.exit(3)"), 10),
            g.Part("slow", py("import time; print('median 1 ms', flush=True); time.sleep(60)"), 2.0),
            g.Part("late", py("print('never')"), 10)]
    records = g.run_parts(todo, tmp_path, budget_s=4.0, min_s=2.0)
    status = {r["part"].name: r["status"] for r in records}
    assert status["ok"] == "rc 0" and status["fails"] == "rc 3"
    assert status["slow"] == "timed out after 2 s"
    assert status["late"].startswith("skipped")  # ~2.2 s used of 4: under min_s (2 s) left
    lines = {r["part"].name: r["lines"] for r in records}
    assert lines == {"ok": ["ratio ours/diffusers: median 0.9"], "fails": ["error: bad"], "slow": ["median 1 ms"],
                     "late": []}  # what a killed part printed before its limit is kept
    assert (tmp_path / "slow.txt").read_text().startswith("$ python -c")
    assert not (tmp_path / "late.txt").exists()
    text = g.summary(records)
    assert "== slow" in text and "timed out" in text and "   median 1 ms" in text


def test_every_gpu_part_targets_cuda_and_every_smoke_part_the_cpu():
    g = load()
    gpu, smoke = g.parts(), g.parts(smoke=True)
    assert [p.name for p in gpu] == [p.name for p in smoke] and len({p.name for p in gpu}) == len(gpu)
    assert all("--device=cuda" in p.argv for p in gpu[1:]) and all("--device=cpu" in p.argv for p in smoke[1:])
    assert all("--size=512" in p.argv or "--size=64" in p.argv for p in gpu[1:])  # 512 px images / 64x64 latents
    scripts = {Path(a).name for p in gpu for a in p.argv if a.endswith(".py")}
    assert scripts == {"bench_unet.py", "bench_train.py"}
    alone = g.parts(reference=False)  # diffusers missing on the device: ours alone, nothing asks for diffusers
    assert {p.name for p in gpu} - {p.name for p in alone} == {"train_bf16_compiled_diffusers"}
    assert not any("diffusers" in a for p in alone for a in p.argv)
    assert all("--no_reference" in p.argv for p in alone if "bench_unet.py" in p.argv[1])


def test_bench_unet_times_ours_alone_without_the_reference():
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_unet.py"), "--preset=tiny", "--size=8",
                          "--repeats=2", "--threads=1", "--no_reference"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ours      median" in run.stdout and "ours: 0.1 GFLOP per call" in run.stdout
    assert "diffusers" not in run.stdout and "ratio" not in run.stdout


def test_smoke_runs_the_unet_and_training_rows_on_the_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--parts=unet_fp16,train_bf16", f"--out={tmp_path}"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = (tmp_path / "summary.txt").read_text()
    assert "== unet_fp16" in text and "ratio ours/diffusers: median" in text and "MFU" in text
    for pair in ("controlnext / controlnet", "controlnext_attn2 / controlnet", "controlnet / diffusers_controlnet"):
        for batch in (1, 2):
            assert f"{pair}, batch {batch}, ckpt True: time" in text
    assert "checkpointing costs" in text
    assert "diffusers_controlnet       2  True " in text  # the step table's rows come along
    assert "Error" not in text
