"""Issue 17's GPU rows as one prepared run: the benchmarks' GPU commands in priority order, each in its own process
with its own time limit, all inside one time budget, every output saved as it is written.

Question: on a lent GPU (an H200 here), how do ours and diffusers compare on the SD1.5 UNet forward and training step
at 512 px in fp16 / bf16, eager and compiled, at what MFU; and do the ControlNeXt / ControlNet step ratios measured on
CPU hold there? A device call is short (at most 10 minutes a command, 15 minutes a session including the machine's
start), so the parts run most-wanted first and a part that would not fit is skipped and named, never half-counted.
Command (on the lent machine; how to bring diffusers there: experiments/README.md, "GPU rows"):
    python3 experiments/gpu_rows.py --out=$OUT --budget=500          # every part that fits, in order
    python3 experiments/gpu_rows.py --out=$OUT --parts=unet_bf16_compiled,train_bf16_compiled_controlnext
Smoke (CPU, tiny presets, the same commands otherwise; the tests run two parts of it):
    python experiments/gpu_rows.py --smoke --out=/tmp/gpu_rows
Output: OUT/NAME.txt for each part (stdout and stderr as they come), OUT/summary.txt (each part's exit status, wall
time and its result lines: ratios, medians, MFU), also printed at the end.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = re.compile(r"ratio|median|MFU|/ .*: time|checkpointing costs|first call|Error|error:|Killed|unknown"
                    r"|^\w+ +\d+ +(True|False) |^torch |NVIDIA H|Driver Version")  # + bench_train's table, env
ARMS4 = ("controlnext", "controlnext_attn2", "controlnet", "diffusers_controlnet")


@dataclass(frozen=True)
class Part:
    name: str
    argv: tuple[str, ...]  # a command; "python" is this interpreter
    limit_s: float  # its own time limit (cut to what is left of the budget)
    why: str = ""


def parts(smoke: bool = False, reference: bool = True) -> list[Part]:
    """Every GPU row of issue 17, most wanted first (the order they run in). Without the reference (diffusers cannot
    be imported) the rows time ours alone and the diffusers arms are left out."""

    def unet(dtype: str, *extra: str) -> tuple[str, ...]:
        setting = ("--device=cpu", "--preset=tiny", "--size=8", "--repeats=1", "--threads=1") if smoke else \
            ("--device=cuda", "--size=64", "--repeats=20", "--threads=16")
        return ("python", str(HERE / "bench_unet.py"), f"--dtype={dtype}", "--batch=2", *setting, *extra,
                *(() if reference else ("--no_reference",)))

    def train(dtype: str, arms: tuple[str, ...], *extra: str) -> tuple[str, ...]:
        setting = ("--device=cpu", "--model=tiny_sd15", "--size=64", "--rounds=1", "--threads=1") if smoke else \
            ("--device=cuda", "--size=512", "--rounds=5", "--threads=0")
        arms = tuple(a for a in arms if reference or a != "diffusers_controlnet")
        return ("python", str(HERE / "bench_train.py"), f"--dtype={dtype}", f"--arms={arms!r}", *setting, *extra)

    one = ("--batches=(2,)", "--checkpointing=(False,)")  # one setting: a compiled arm is one process each
    env = ("python", "-c", "import torch, subprocess; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
           "'available', torch.cuda.is_available()); torch.cuda.is_available() and print(torch.cuda.get_device_name(), "
           "torch.cuda.get_device_capability()); print(subprocess.run(['nvidia-smi'], capture_output=True, text=True)"
           ".stdout if torch.cuda.is_available() else 'no nvidia-smi run')")
    rows = [
        Part("env", env, 60, "what the rows ran on"),
        Part("unet_fp16", unet("fp16"), 180, "UNet forward, eager, ours vs diffusers, MFU"),
        Part("unet_bf16", unet("bf16"), 180, "the same in bf16"),
        Part("train_bf16", train("bf16", ARMS4), 360,
             "training step: ControlNeXt vs ControlNet, ours vs diffusers, checkpointing on/off, batch 1 and 2"),
        Part("train_full_bf16", train("bf16", ("controlnext", "full"), "--batches=(1,)", "--checkpointing=(False,)"),
             240, "the full fine-tune beside ControlNeXt"),
        Part("unet_bf16_compiled", unet("bf16", "--compile"), 360, "UNet forward, both compiled"),
        Part("train_bf16_compiled_controlnext", train("bf16", ("controlnext",), "--compile", *one), 360,
             "compiled training step, ControlNeXt"),
        Part("train_bf16_compiled_controlnet", train("bf16", ("controlnet",), "--compile", *one), 360,
             "compiled training step, our ControlNet"),
        Part("train_bf16_compiled_diffusers", train("bf16", ("diffusers_controlnet",), "--compile", *one), 360,
             "compiled training step, diffusers' ControlNet"),
        Part("train_fp16", train("fp16", ("controlnext", "controlnet", "diffusers_controlnet"), *one), 240,
             "training step under fp16 autocast"),
        Part("unet_bf16_channels_last", unet("bf16", "--channels_last"), 180, "NHWC UNet forward"),
        Part("unet_fp16_compiled", unet("fp16", "--compile"), 360, "compiled UNet forward in fp16"),
    ]
    return [r for r in rows if reference or r.name != "train_bf16_compiled_diffusers"]


def run_parts(todo: list[Part], out: Path, budget_s: float, min_s: float = 20.0) -> list[dict]:
    """Run each part in order in its own process, output to OUT/NAME.txt; a part gets min(its limit, what is left of
    the budget) and is skipped when under `min_s` would be left. Returns one record per part (also for the skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    start, records = time.monotonic(), []
    for part in todo:
        left = budget_s - (time.monotonic() - start)
        if left < min_s:
            records.append({"part": part, "status": f"skipped: {left:.0f} s of the budget left", "wall": 0.0,
                            "lines": []})
            continue
        limit = min(part.limit_s, left)
        argv = [sys.executable if a == "python" else a for a in part.argv]
        path = out / f"{part.name}.txt"
        tic = time.monotonic()
        with path.open("w") as log:
            log.write(f"$ {' '.join(part.argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                    start_new_session=True)
            try:
                status = f"rc {proc.wait(timeout=limit)}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the whole group: compile workers too
                proc.wait()
                status = f"timed out after {limit:.0f} s"
        wall = time.monotonic() - tic
        lines = [line for line in path.read_text().splitlines()[1:] if RESULT.search(line)]
        records.append({"part": part, "status": status, "wall": wall, "lines": lines})
        print(f"[{time.monotonic() - start:5.0f} s] {part.name}: {status} in {wall:.0f} s", flush=True)
    return records


def summary(records: list[dict]) -> str:
    text = []
    for r in records:
        text.append(f"== {r['part'].name} ({r['part'].why}): {r['status']}, {r['wall']:.0f} s")
        text += [f"   {line}" for line in r["lines"]]
    return "\n".join(text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a folder for the outputs ($OUT on the device machine)")
    parser.add_argument("--budget", type=float, default=500.0, help="seconds for all parts together")
    parser.add_argument("--parts", default="", help="a comma-separated subset, run in the given order")
    parser.add_argument("--smoke", action="store_true", help="CPU and tiny presets: check that the commands still run")
    args = parser.parse_args()
    every = [p.name for p in parts(args.smoke)]
    names = [n for n in args.parts.split(",") if n] or every
    if unknown := [n for n in names if n not in every]:
        raise SystemExit(f"--parts: unknown {unknown}; expected some of {every}")
    probe = subprocess.run([sys.executable, "-c", "import diffusers; from diffusers import ControlNetModel; "
                            "print(diffusers.__version__)"], capture_output=True, text=True)
    reference = probe.returncode == 0
    head = f"reference: diffusers {probe.stdout.strip()}" if reference else \
        "reference: none, ours runs alone (diffusers cannot be imported: " \
        f"{(probe.stderr.strip().splitlines() or ['?'])[-1]})"
    print(head, flush=True)
    known = {p.name: p for p in parts(args.smoke, reference)}
    records = run_parts([known[n] for n in names if n in known], Path(args.out), args.budget)
    text = head + "\n" + summary(records)
    (Path(args.out) / "summary.txt").write_text(text)
    print(text, end="")
    if any(not r["status"].startswith(("rc 0", "skipped")) for r in records):
        sys.exit(1)


if __name__ == "__main__":
    main()
