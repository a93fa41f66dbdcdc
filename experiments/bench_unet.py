"""Benchmark: our SD1.5 UNet against diffusers' UNet2DConditionModel, same weights, one process, interleaved.

Question: is our UNet at least as fast as diffusers'? (Issue 2 asks for a ratio <= 1.0, goal 1.15x faster.)
Command (CPU, the recorded row):   python experiments/bench_unet.py
GPU rows:                          python experiments/bench_unet.py --device=cuda --dtype=fp16 --size=64 --batch=2
Method: full SD1.5 config with random weights (diffusers' init, copied into ours), one denoising step at a latent of
`size`x`size`, `batch` samples, 77 context tokens; runs alternate ours/diffusers and each pair gives a ratio
(ours / diffusers), so slow drift of the machine cancels; we report medians. On the CPU the default clock is the
process's CPU time (all threads), which leaves out the time spent waiting for a core on a shared machine; `--clock=wall`
for an idle one. diffusers is a benchmark-only import.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from tqdm import tqdm

from controlnext.checkpoint import load_into
from unet.keymap import unet_config_to_diffusers
from unet.sd_unet import PRESETS, UNet

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `table2_latency` beside this file, whatever the cwd
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
    args = parser.parse_args()
    clock = time.process_time if (args.clock or ("wall" if args.device != "cpu" else "process")) == "process" \
        else time.perf_counter
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    cfg = PRESETS[args.preset]
    config = {k: v for k, v in unet_config_to_diffusers(cfg).items() if k != "_class_name"}
    reference = UNet2DConditionModel(**config).eval()
    ours = UNet(cfg).eval()
    load_into(ours, reference.state_dict(), what="benchmark UNet")
    reference.to(device, dtype)
    ours.to(device, dtype)

    x = torch.randn(args.batch, cfg.in_channels, args.size, args.size, device=device, dtype=dtype)
    t = torch.full((args.batch,), 500, device=device)
    context = torch.randn(args.batch, 77, cfg.context_dim, device=device, dtype=dtype)
    y = torch.randn(args.batch, cfg.adm_channels, device=device, dtype=dtype) if cfg.adm_channels else None
    extra = {"added_cond_kwargs": {"text_embeds": y[:, :-1536], "time_ids": torch.zeros(args.batch, 6, device=device)}} \
        if cfg.adm_channels else {}

    timed = lambda fn: table2_latency.timed(fn, device, clock)  # noqa: E731

    run_ours = lambda: ours(x, t, context, y)  # noqa: E731
    run_reference = lambda: reference(x, t, context, **extra)  # noqa: E731
    with torch.inference_mode():
        timed(run_ours), timed(run_reference)  # warm-up: allocator, oneDNN/cuDNN kernel choice
        ours_times, reference_times = [], []
        for i in tqdm(range(args.repeats), desc="interleaved pairs"):
            # Alternate which one goes first so neither always runs on a warmer cache.
            if i % 2 == 0:
                ours_times.append(timed(run_ours))
                reference_times.append(timed(run_reference))
            else:
                reference_times.append(timed(run_reference))
                ours_times.append(timed(run_ours))
    ratios = [o / r for o, r in zip(ours_times, reference_times)]
    print(f"{args.preset} latent {args.size}x{args.size} batch {args.batch} {args.dtype} {device} "
          f"threads {args.threads} repeats {args.repeats} clock {clock.__name__}; load average {os.getloadavg()}")
    print(f"ours      median {statistics.median(ours_times) * 1e3:9.1f} ms")
    print(f"diffusers median {statistics.median(reference_times) * 1e3:9.1f} ms")
    print(f"ratio ours/diffusers: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
          f" -> ours is {1 / statistics.median(ratios):.2f}x the speed of diffusers")


if __name__ == "__main__":
    main()
