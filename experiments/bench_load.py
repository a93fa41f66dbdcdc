"""Benchmark (issue 17): loading a full-size SD1.5 UNet, ours (controlnext.loaders.load_unet) vs diffusers'
UNet2DConditionModel.from_pretrained, from a diffusers folder (fp16 file and fp32 file) and, ours only, from an
original single file (UNet + VAE + CLIP-L, fp32, the layout of v1-5-pruned-emaonly.safetensors).

Question: how long does loading take and how much memory does it need, next to diffusers and next to the size of
the loaded model? Goals: ≤ 0.33x diffusers' time, peak RSS ≤ 1.1x the model's size.
Command:  python experiments/bench_load.py                 (writes ~9.4 GB of random weights to --dir once;
          python experiments/bench_load.py --rounds=5        about 5 minutes per 3 rounds on 2 CPU cores)
Method: random weights (loading does not depend on the values), written once. Each arm runs in a fresh process
(imports not timed), arms interleaved in a new random order each round, medians over rounds. `load` is the call; `ready` adds
reading one element of every 4 KiB page of every tensor, so that lazily mapped pages are paid for (and counted in
the RSS) as a first forward would pay for them; both implementations map safetensors files. Peak RSS is the OS's
VmHWM (this process's own high-water mark; getrusage's ru_maxrss carries the parent's peak over fork + exec, which
a first run's writing of the weights made 4.2 GiB for every arm); "own" subtracts the process's RSS just before the
load (the interpreter, torch and, for diffusers, its imports).
The files stay in the page cache between arms (warm reads; a cold disk adds the same read time to every arm).
diffusers is imported only in its own arms (a test-only dependency).
"""

import argparse
import gc
import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from controlnext.checkpoint import save_state
from controlnext.loaders import load_unet, original_state, save_unet
from encoders.clip import CLIP_L, build_clip
from unet.sd_unet import SD15, UNet
from vae.autoencoder import SD, AutoencoderKL

# arm -> (implementation, file under --dir, dtype asked for; None = the library's default: ours keeps the stored
# dtype, diffusers builds fp32)
ARMS = {
    "ours_fp16": ("ours", "unet_fp16", None),
    "diffusers_fp16": ("diffusers", "unet_fp16", torch.float16),
    "diffusers_fp16_default": ("diffusers", "unet_fp16", None),
    "ours_fp32": ("ours", "unet_fp32", None),
    "diffusers_fp32": ("diffusers", "unet_fp32", torch.float32),
    "ours_fp16_as_fp32": ("ours", "unet_fp16", torch.float32),
    "diffusers_fp16_as_fp32": ("diffusers", "unet_fp16", torch.float32),
    "ours_single_file_fp32": ("ours", "v1-5-random-emaonly.safetensors", None),
    # No model: map the file and read one byte per 4 KiB page, the reading every loader's `ready` includes; the
    # floor under any loader's ready time on a warm page cache.
    "floor_fp16": ("floor", "unet_fp16", None),
    "floor_fp32": ("floor", "unet_fp32", None),
}
PAIRS = [("ours_fp16", "diffusers_fp16"), ("ours_fp32", "diffusers_fp32"),
         ("ours_fp16_as_fp32", "diffusers_fp16_as_fp32"), ("ours_single_file_fp32", "diffusers_fp32"),
         ("ours_fp16", "diffusers_fp16_default"),  # each library's default call on the fp16 folder
         ("floor_fp16", "diffusers_fp16"), ("floor_fp32", "diffusers_fp32")]  # the best ratio any loader can reach


def rss_bytes(field: str = "VmRSS") -> int:
    """A memory figure of this process from /proc/self/status: VmRSS (now) or VmHWM (its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def prepare(folder: Path) -> None:
    """Random full-size weights in the three layouts (skipped if present)."""
    if (folder / ARMS["ours_single_file_fp32"][1]).is_file():
        return
    print(f"writing random SD1.5 weights to {folder} (once)")
    unet = UNet(SD15).eval()
    save_unet(unet, folder / "unet_fp32")
    single = original_state(unet, "unet") | original_state(AutoencoderKL(SD), "vae")
    single |= original_state(build_clip(CLIP_L), "sd15_text")
    save_state(single, folder / ARMS["ours_single_file_fp32"][1])
    del single
    save_unet(unet.half(), folder / "unet_fp16")


def read_floor(name: str, path: Path) -> dict:
    """Map the file and read one byte of every 4 KiB page: no parsing, no model (the `ready` reading alone)."""
    before = rss_bytes()
    start = time.perf_counter()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as pages:
        data = torch.frombuffer(pages, dtype=torch.uint8)
        checksum = float(data[::4096].double().sum())
        del data  # the buffer must be released before the map closes
    ready = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    return {"arm": name, "load_s": ready, "ready_s": ready, "peak": peak, "own": peak - before,
            "model_bytes": path.stat().st_size, "dtypes": ["bytes"], "checksum": checksum}


def run_arm(name: str, folder: Path) -> dict:
    """One load in this process: seconds to load and to have read every tensor, peak RSS, model bytes."""
    implementation, file, dtype = ARMS[name]
    if implementation == "floor":
        return read_floor(name, folder / file / "diffusion_pytorch_model.safetensors")
    if implementation == "diffusers":
        from diffusers import UNet2DConditionModel  # imported here only: a test-only dependency
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        load = lambda: UNet2DConditionModel.from_pretrained(folder / file, **kwargs)  # noqa: E731
    else:
        load = lambda: load_unet(folder / file, dtype=dtype)  # noqa: E731
    # The full (generation 2) garbage collection the imports left due runs now, not inside the timed call: a load is
    # the first code to allocate after them, and would pay ~0.06 s for it (diffusers' heavier import pays its own).
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    model = load()
    loaded = time.perf_counter()
    with torch.no_grad():  # one element per 4 KiB page: every page of every tensor is read (mapped in, or already)
        checksum = sum(float(t.reshape(-1)[::4096 // t.element_size()].double().sum())
                       for t in model.state_dict().values())
    ready = time.perf_counter()
    peak = rss_bytes("VmHWM")
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    dtypes = sorted({str(t.dtype) for t in model.state_dict().values()})
    return {"arm": name, "load_s": loaded - start, "ready_s": ready - start, "peak": peak, "own": peak - before,
            "model_bytes": size, "dtypes": dtypes, "checksum": checksum}


def time_parts(folder: Path, rounds: int) -> None:
    """Where our load of the fp16 folder goes, part by part, in this process (warm page cache after the first)."""
    from controlnext.checkpoint import check_state
    from controlnext.loaders import _read_unet
    from controlnext.meta import assign, on_meta
    for r in range(rounds):
        model = state = None
        gc.collect()  # the last round's model and maps go first, outside the timed parts
        marks = [time.perf_counter()]
        state, _ = _read_unet(folder / "unet_fp16")
        marks.append(time.perf_counter())
        with torch.device("meta"):
            UNet(SD15)  # the build as it was before on_meta, for comparison (thrown away)
        marks.append(time.perf_counter())
        model = on_meta(lambda: UNet(SD15))
        marks.append(time.perf_counter())
        check_state(model, state, {}, what="UNet")
        marks.append(time.perf_counter())
        assign(model, state)
        marks.append(time.perf_counter())
        sum(float(t.reshape(-1)[::4096 // t.element_size()].double().sum()) for t in model.state_dict().values())
        marks.append(time.perf_counter())
        parts = [b - a for a, b in zip(marks, marks[1:])]
        print(f"round {r + 1}: " + ", ".join(f"{name} {s:.3f} s" for name, s in zip(
            ("read header + map tensors", "build on meta with init", "build with on_meta", "account keys", "assign",
             "read every page"), parts)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_load"), help="where the random weights live")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", action="store_true", help="time our fp16-folder load part by part instead")
    parser.add_argument("--arms", default="", help="comma-separated subset of the arms (default: all)")
    parser.add_argument("--arm", choices=sorted(ARMS), help="(internal) run one arm in this process and print JSON")
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.dir)))
        return
    if args.parts:
        prepare(args.dir)
        time_parts(args.dir, args.rounds)
        return
    arms = args.arms.split(",") if args.arms else list(ARMS)
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown} (expected some of {sorted(ARMS)})")
    prepare(args.dir)
    results, order = {name: [] for name in arms}, random.Random(0)
    for r in range(args.rounds):
        for name in order.sample(arms, len(arms)):  # a new order each round: no arm always follows another
            out = subprocess.run([sys.executable, __file__, "--arm", name, "--dir", str(args.dir)], check=True,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {name:24s} ready {results[name][-1]['ready_s']:6.2f} s", flush=True)
    gib = 2 ** 30
    med = {name: {k: statistics.median(run[k] for run in runs) for k in ("load_s", "ready_s", "peak", "own")}
           for name, runs in results.items()}
    print(f"\nSD1.5 UNet, {args.rounds} rounds, medians; load average {os.getloadavg()}")
    print(f"{'arm':24s} {'load s':>7s} {'ready s':>8s} {'peak GiB':>9s} {'own GiB':>8s} {'model GiB':>10s} "
          f"{'peak/model':>11s} {'own/model':>10s}  dtype")
    for name, runs in results.items():
        m, size = med[name], runs[0]["model_bytes"]
        print(f"{name:24s} {m['load_s']:7.2f} {m['ready_s']:8.2f} {m['peak'] / gib:9.2f} {m['own'] / gib:8.2f} "
              f"{size / gib:10.2f} {m['peak'] / size:11.2f} {m['own'] / size:10.2f}  {','.join(runs[0]['dtypes'])}")
    print("\nratios ours / diffusers (medians of the arms):")
    for ours, theirs in [(a, b) for a, b in PAIRS if a in med and b in med]:
        print(f"  {ours:24s} / {theirs:24s}: ready time {med[ours]['ready_s'] / med[theirs]['ready_s']:.2f}, "
              f"load call {med[ours]['load_s'] / med[theirs]['load_s']:.2f}, "
              f"own RSS {med[ours]['own'] / med[theirs]['own']:.2f}")
    same = {name: runs[0]["checksum"] for name, runs in results.items()}
    print(f"checksums (every arm read the same values per file dtype): {json.dumps(same)}")


if __name__ == "__main__":
    main()
