"""Benchmark: our SD1.5 UNet against diffusers' UNet2DConditionModel, same weights, one process, interleaved.

Question: is our UNet at least as fast as diffusers'? (Issue 2 asks for a ratio <= 1.0, issue 17 for 1.15x faster at
each one's best setting: eager or torch.compile'd, fp32 or bf16.)
Command (CPU):    python experiments/bench_unet.py [--dtype=bf16] [--compile] [--threads=1]
GPU rows:         python experiments/bench_unet.py --device=cuda --dtype=fp16 --size=64 --batch=2 [--compile]
Method: full SD1.5 config with random weights (diffusers' init, copied into ours), one denoising step at a latent of
`size`x`size`, `batch` samples, 77 context tokens; runs alternate ours/diffusers and each pair gives a ratio
(ours / diffusers), so slow drift of the machine cancels; we report medians. On the CPU the default clock is the
process's CPU time (all threads), which leaves out the time spent waiting for a core on a shared machine; `--clock=wall`
for an idle one. `--dtype` casts both models and inputs (pure bf16/fp16 inference). `--compile`: torch.compile
(inductor, default mode) on both modules; the first call compiles and is reported apart (wall clock: inductor compiles
C++ in worker processes, outside this process's CPU time). `--freezing`: inductor's inference-only constant folding
(weights prepacked for oneDNN; torch._inductor.config.freezing), the CPU inference setting. `--profile=PATH`: the top
operators of one call of each.
diffusers is a benchmark-only import; `--no_reference` times ours alone (its own init) where diffusers is not installed.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from tqdm import tqdm

from controlnext.checkpoint import load_into
from unet.keymap import unet_config_to_diffusers
from unet.sd_unet import PRESETS, UNet

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `table2_latency` beside this file, whatever the cwd
import flops  # noqa: E402
import table2_latency  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15", choices=sorted(PRESETS))
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--clock", default="", choices=["", "process", "wall"], help="default: process on CPU, wall on GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models first")
    parser.add_argument("--freezing", action="store_true", help="with --compile: inductor freezing (inference)")
    parser.add_argument("--channels_last", action="store_true", help="both models' weights and the input in NHWC")
    parser.add_argument("--profile", default="", help="write a torch.profiler table of one call of each here")
    parser.add_argument("--no_reference", action="store_true", help="ours alone (where diffusers is not installed)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="the device's peak for MFU (default: known GPUs)")
    args = parser.parse_args()
    clock = time.process_time if (args.clock or ("wall" if args.device != "cpu" else "process")) == "process" \
        else time.perf_counter
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    cfg = PRESETS[args.preset]
    config = {k: v for k, v in unet_config_to_diffusers(cfg).items() if k != "_class_name"}
    ours = UNet(cfg).eval()
    models = [ours]
    if not args.no_reference:
        from diffusers import UNet2DConditionModel
        reference = UNet2DConditionModel(**config).eval()
        load_into(ours, reference.state_dict(), what="benchmark UNet")
        models.append(reference)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for model in models:
        model.to(device, dtype, memory_format=memory_format)

    x = torch.randn(args.batch, cfg.in_channels, args.size, args.size, device=device, dtype=dtype) \
        .contiguous(memory_format=memory_format)
    t = torch.full((args.batch,), 500, device=device)
    context = torch.randn(args.batch, 77, cfg.context_dim, device=device, dtype=dtype)
    y = torch.randn(args.batch, cfg.adm_channels, device=device, dtype=dtype) if cfg.adm_channels else None
    extra = {"added_cond_kwargs": {"text_embeds": y[:, :-1536], "time_ids": torch.zeros(args.batch, 6, device=device)}} \
        if cfg.adm_channels else {}

    timed = lambda fn: table2_latency.timed(fn, device, clock)  # noqa: E731

    run_ours = lambda: ours(x, t, context, y)  # noqa: E731
    run_reference = lambda: reference(x, t, context, **extra)  # noqa: E731
    arms = (("ours", run_ours),) + (() if args.no_reference else (("diffusers", run_reference),))
    compile_s = {}
    if args.compile:
        inductor_config.freezing = args.freezing
        for model in models:
            model.compile()
    with torch.inference_mode():
        for name, fn in arms:  # warm-up: kernel choice, (compilation)
            compile_s[name] = table2_latency.timed(fn, device, time.perf_counter)
        ours_times, reference_times = [], []
        for i in tqdm(range(args.repeats), desc="interleaved pairs"):
            # Alternate which one goes first so neither always runs on a warmer cache.
            if args.no_reference:
                ours_times.append(timed(run_ours))
            elif i % 2 == 0:
                ours_times.append(timed(run_ours))
                reference_times.append(timed(run_reference))
            else:
                reference_times.append(timed(run_reference))
                ours_times.append(timed(run_ours))
        if args.profile:
            tables = []
            for name, fn in arms:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    fn()
                tables += [f"== {name}", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)]
            Path(args.profile).write_text("\n".join(tables))
    print(f"{args.preset} latent {args.size}x{args.size} batch {args.batch} {args.dtype} {device} "
          f"threads {args.threads} repeats {args.repeats} clock {clock.__name__}{' compiled' if args.compile else ''}"
          f"{' + freezing' if args.freezing else ''}{' channels_last' if args.channels_last else ''}; "
          f"load average {os.getloadavg()}")
    times = {"ours": ours_times, "diffusers": reference_times}
    print(f"first call (wall, {'compile + ' if args.compile else ''}warm-up): "
          + ", ".join(f"{name} {compile_s[name]:.1f} s" for name, _ in arms))
    for name, _ in arms:
        print(f"{name:9s} median {statistics.median(times[name]) * 1e3:9.1f} ms")
    if not args.no_reference:
        ratios = [o / r for o, r in zip(ours_times, reference_times)]
        print(f"ratio ours/diffusers: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
              f"max {max(ratios):.3f}) -> ours is {1 / statistics.median(ratios):.2f}x the speed of diffusers")
    work, peak = flops.unet_forward_flops(args.preset, args.batch, args.size), flops.peak_tflops(device, args.dtype,
                                                                                              args.peak_tflops)
    for name, _ in arms:
        seconds = statistics.median(times[name])
        print(f"{name}: {work / 1e9:.1f} GFLOP per call, {work / seconds / 1e12:.3f} TFLOP/s, "
              f"MFU {flops.mfu(work, seconds, peak)}")


if __name__ == "__main__":
    main()
