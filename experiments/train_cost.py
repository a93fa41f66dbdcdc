"""What one training step costs on Stable Diffusion checkpoints in the real layouts, measured on this machine.

Purpose: the "Train on real weights" section of the README states the time per step and the peak memory of
train.py's SD paths. No real SD1.5 / SDXL file can be downloaded here, so the rows are (a) tiny random checkpoints in
diffusers' pipeline-folder layout (written by diffusers itself, tests/sd_fixtures.py; test-only dependency, imported
only here) for SD1.5 and SDXL, and (b) the shipped miniature SD1.5 single file, with and without --cache_latents on a
fill50k folder dataset (the latent cache's speed-up: the VAE encode and text encoding are done once). At full size
see experiments/bench_train.py.
Method: each arm runs train.py's main in a fresh process twice, for `--short` and `--long` optimizer steps (no
evaluation but the final one, which both runs share); time per step = (t_long - t_short) / (long - short), so start-up,
loading, the cache build and the final evaluation cancel. Peak memory is the process's max RSS (OS), with both runs.
Command:  python experiments/train_cost.py                 # ~5 min on 2 cores
Expected: tiny checkpoints are dominated by per-step overheads (tens of ms); the cache saves the VAE encode.
"""

from __future__ import annotations

import argparse
import os
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the checkout's packages first

ARM = r"""
import dataclasses, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import train
from controlnext.config import TrainConfig
fields, steps = json.loads(sys.argv[2]), json.loads(sys.argv[3])
out_dir = fields.pop("out_dir")
torch.set_num_threads(1)
times = []
for n, out in zip(steps, ("short", "long")):
    config = dataclasses.replace(TrainConfig(), **fields, max_steps=n, out_dir=f"{out_dir}/{out}")
    tic = time.perf_counter()
    train.main(config)
    times.append(time.perf_counter() - tic)
print(json.dumps({"seconds": times, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_arm(fields: dict, short: int, long: int) -> dict:
    """Time per step and peak RSS of train.main with `fields`, in a fresh single-threaded process."""
    result = subprocess.run([sys.executable, "-c", ARM, str(ROOT), json.dumps(fields), json.dumps([short, long])],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise RuntimeError(f"{fields}: train.py failed:\n{result.stderr[-2000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    t_short, t_long = measured["seconds"]
    return {"ms_per_step": 1000 * (t_long - t_short) / (long - short), "peak_rss_mib": measured["peak_rss_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=25)
    args = parser.parse_args()
    from tests.sd_fixtures import tiny_sd15, tiny_sdxl  # noqa: PLC0415 - diffusers (test-only) only for these rows
    from controlnext.data import write_fill50k  # noqa: PLC0415 - after the checkout is on the path

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "fill50k"
        write_fill50k(data, count=256, size=64)
        common = dict(dataset=str(data), resolution=64, eval_every=0, eval_count=2, sampling_steps=2,
                      save_every=10_000, progress=False, num_threads=1, warmup_steps=1)
        arms = {
            "tiny SD1.5 folder, batch 2": dict(pretrained=str(tiny_sd15(tmp / "sd15")), batch_size=2),
            "tiny SDXL folder, batch 2": dict(pretrained=str(tiny_sdxl(tmp / "sdxl")), batch_size=2),
            "mini SD1.5 file, batch 32": dict(batch_size=32),
            "mini SD1.5 file, batch 32, --cache_latents": dict(batch_size=32, cache_latents=True),
        }
        rows = []
        for name, fields in arms.items():
            row = {"arm": name, **run_arm(common | fields | {"out_dir": str(tmp / f"arm{len(rows)}")},
                                          args.short, args.long)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| arm | ms / step | peak RSS (MiB) |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['arm']} | {row['ms_per_step']:.0f} | {row['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
