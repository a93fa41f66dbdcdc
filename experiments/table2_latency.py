"""Table 2: the latency of one denoising step, SD1.5 base vs +ControlNeXt vs +ControlNet.

Question: does ControlNeXt add ~10% per step where ControlNet adds ~42% (paper Table 2; SD1.5 row: base 0.22 s,
ControlNeXt 0.24 s, ControlNet 0.31 s; the +10.4% / +41.9% of the text are the means over SD1.5, SDXL and SVD;
../shared/reference/controlnext.md §7)? Our goal: ControlNeXt <= +3% over the base.
Commands:
    python experiments/table2_latency.py --threads=1 --out=experiments/results/table2_latency_cpu.txt   # CPU
    python experiments/table2_latency.py --device=cuda --dtype=fp16 --sizes="(64,)" --repeats=30         # GPU
    python experiments/table2_latency.py --smoke                                                        # tests
Method: the full SD1.5 UNet (random weights, 77 context tokens), G2 branch + `sd15_train` injection, the diffusers-
layout ControlNet copied from the same UNet. One process; every round times each arm once, in a rotating order, and
each arm's time is divided by the same round's base time (paired ratios cancel the drift of a shared machine); we
report medians over rounds. On the CPU the clock is the process's CPU time (single-threaded runs: the work done, not
the time spent waiting for a core on a shared machine; `--clock=wall` for wall time).
Batch 1 = one image without CFG; batch 2 = one image with CFG (uncond + cond halves).
Arms: `controlnext` is the sampling step as this repo runs it, the denoiser closure of controlnext/sampling.py: the
branch's time-independent stem is prepared once per run (its cost is measured every round and added as 1/`steps` of
it: "amortised"), and under CFG the branch runs once for both halves. `controlnext_official` recomputes the whole
branch every step on the duplicated condition, as the official pipelines do. `controlnet` runs its encoder copy on
the doubled batch (the halves differ in their prompts, so nothing can be shared). Left out: the VAE decode and text encoding (not part of a step).
"""

import argparse
import ast
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from controlnext.control_branch import G2, TINY as BRANCH_TINY
from controlnext.controlnext import SD15_TRAIN, build_controlled_unet
from controlnext.sampling import cfg_denoiser
from schedulers.sigmas import SD15 as SD15_SCHEDULE
from unet.sd_unet import SD15, TINY, UNet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Paper Table 2, SD1.5 column (seconds per step, hardware not stated) and the text's means over the three backbones.
PAPER = {"base": 0.22, "controlnext": 0.24, "controlnet": 0.31}
PAPER_MEAN_OVERHEAD = {"controlnext": 0.104, "controlnet": 0.419}
ARMS = ("base", "controlnext", "controlnext_official", "controlnet")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="(32, 64)", help="latent sizes as a tuple: 32 = 256 px, 64 = 512 px")
    parser.add_argument("--batches", default="(1, 2)", help="UNet batch sizes as a tuple: 2 = one image with CFG")
    parser.add_argument("--repeats", type=int, default=0, help="rounds per setting; 0 = 7 at 256 px, 5 at 512 px")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps the prepared stem is amortised over")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                        help="cpu: the process's CPU time (on a shared CPU it leaves out the time spent waiting for "
                             "a core); auto: cpu on the CPU, wall on a GPU")
    parser.add_argument("--smoke", action="store_true", help="TINY UNet and branch, latent 8, 2 rounds (tests)")
    parser.add_argument("--out", default="", help="also write the report to this file (with the command)")
    args = parser.parse_args(argv)
    args.sizes, args.batches = ast.literal_eval(args.sizes), ast.literal_eval(args.batches)
    args.sizes = (8,) if args.smoke else tuple(args.sizes)
    return args


def build(smoke: bool, device: torch.device, dtype: torch.dtype) -> tuple[UNet, dict]:
    """One UNet shared by the base and the ControlNeXt arms; ControlNet copies its encoder (ControlNet.from_unet)."""
    torch.manual_seed(0)
    unet = UNet(TINY if smoke else SD15)
    models = {"controlnext": build_controlled_unet("cross_norm", unet, BRANCH_TINY if smoke else G2, SD15_TRAIN),
              "controlnet": build_controlled_unet("controlnet", unet, G2, SD15_TRAIN)}
    for model in models.values():
        model.to(device, dtype).eval()
    return unet, models


def timed(fn, device: torch.device, clock) -> float:
    """Seconds `fn()` takes on `clock`; on a GPU, with the queued work finished before and after (also bench_unet.py)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def measure(unet: UNet, models: dict, size: int, batch: int, repeats: int, steps: int, device: torch.device,
            dtype: torch.dtype, clock) -> dict[str, list[float]]:
    """Seconds per call of each arm, `repeats` interleaved rounds (plus one warm-up round), and the prepare cost."""
    cfg = unet.config
    images = 1 if batch == 2 else batch  # batch 2 = CFG over one condition image
    x = torch.randn(batch, cfg.in_channels, size, size, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device)
    context = torch.randn(batch, 77, cfg.context_dim, device=device, dtype=dtype)
    image = torch.rand(images, 3, 8 * size, 8 * size, device=device, dtype=dtype)
    doubled = image.repeat(batch // images, 1, 1, 1)  # what the official pipelines pass: the image per half
    cnx, cn = models["controlnext"], models["controlnet"]
    prepared = {}

    def prepare():  # once per sampling run: the closure computes the branch's stem when it is built
        cfg = batch == 2
        prepared["denoiser"] = cfg_denoiser(unet, SD15_SCHEDULE, context[:images], context[:images] if cfg else None,
                                            7.5 if cfg else 1.0, [(cnx, image, 1.0)])

    calls = {"base": lambda: unet(x, t, context),
             "controlnext": lambda: prepared["denoiser"](x[:images], 1.0),  # one sampler step's model call
             "controlnext_official": lambda: cnx(x, t, context, doubled),
             "controlnet": lambda: cn(x, t, context, doubled)}

    times = {name: [] for name in (*ARMS, "prepare")}
    with torch.inference_mode():
        for r in range(repeats + 1):  # round 0 warms up allocator and kernel choice; it is dropped
            order = ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]  # rotate so no arm always runs first
            round_times = {"prepare": timed(prepare, device, clock)}
            for name in order:
                round_times[name] = timed(calls[name], device, clock)
            if r:
                for name, value in round_times.items():
                    times[name].append(value)
    return times


def report(times: dict[str, list[float]], steps: int) -> list[str]:
    """Median seconds and median paired ratios to the base, one line per arm."""
    base = times["base"]
    per_step = {"base": base, "controlnet": times["controlnet"], "controlnext_official": times["controlnext_official"],
                "controlnext": [s + p / steps for s, p in zip(times["controlnext"], times["prepare"])]}
    lines = []
    for name in ARMS:
        ratios = [a / b for a, b in zip(per_step[name], base)]
        lines.append(f"  {name:21s} {statistics.median(per_step[name]):8.3f} s   x{statistics.median(ratios):.3f} "
                     f"(+{100 * (statistics.median(ratios) - 1):5.1f}%; rounds {min(ratios):.3f}..{max(ratios):.3f})")
    step_only = [a / b for a, b in zip(times["controlnext"], base)]
    lines.append(f"  controlnext step alone {statistics.median(times['controlnext']):7.3f} s   "
                 f"x{statistics.median(step_only):.3f}; prepare (once per run) "
                 f"{statistics.median(times['prepare']):.3f} s, amortised over {steps} steps above")
    return lines


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return names[0] if names else platform.machine()


def main(argv: list[str]) -> list[str]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    unet, models = build(args.smoke, device, dtype)
    use_cpu_clock = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu")
    clock = time.process_time if use_cpu_clock else time.perf_counter
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} threads")
    lines = [f"command: python experiments/table2_latency.py {shlex.join(argv)}",
             f"machine: {machine}; torch {torch.__version__}; {args.dtype}; "
             f"clock: {'process CPU time' if use_cpu_clock else 'wall'}; load average at start "
             f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}",
             f"paper Table 2 (SD1.5, s/step): base {PAPER['base']}, ControlNeXt {PAPER['controlnext']} "
             f"(+{100 * (PAPER['controlnext'] / PAPER['base'] - 1):.1f}%), ControlNet {PAPER['controlnet']} "
             f"(+{100 * (PAPER['controlnet'] / PAPER['base'] - 1):.1f}%); the text's means over SD1.5/SDXL/SVD: "
             f"ControlNeXt +{100 * PAPER_MEAN_OVERHEAD['controlnext']:.1f}%, "
             f"ControlNet +{100 * PAPER_MEAN_OVERHEAD['controlnet']:.1f}%"]
    print("\n".join(lines), flush=True)
    for size in args.sizes:
        for batch in args.batches:
            repeats = 2 if args.smoke else args.repeats or (7 if size <= 32 else 5)
            tic = time.time()
            times = measure(unet, models, size, batch, repeats, args.steps, device, dtype, clock)
            block = [f"{8 * size} px (latent {size}), batch {batch}{' (CFG)' if batch == 2 else ''}, "
                     f"{repeats} rounds, {time.time() - tic:.0f} s wall:"] + report(times, args.steps)
            print("\n".join(block), flush=True)
            lines += block
    lines.append(f"load average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
