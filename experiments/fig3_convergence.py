"""Fig. 3: how fast does each way of injecting the control converge on the fill50k toy?

Question: the paper (ControlNeXt, arXiv 2408.06070, §3.2 and Fig. 3) claims that cross normalization fits within a
few hundred steps with no "sudden convergence", where zero-initialised connections (ControlNet) wait thousands.
Protocol: on the frozen toy base (experiments/weights/toy_base.safetensors), train each arm of `--ablation`
(cross_norm, zero_conv, no_norm, paper_norm, controlnet) with 3 seeds; within a seed every arm has the same
initialisation seed, data order, batch, steps and learning rates (train.py defaults otherwise; the UNet selection is
each method's own: `to_out` for the ControlNeXt arms, none for ControlNet); fill IoU on the fixed held-out set
every `eval_every` steps (train.py's evaluation). Outputs in `--results`: curves.png (mean and min..max band over
seeds), samples.png (seed 0, condition | output at matching steps), table.md (steps to IoU >= 0.5 and >= 0.8),
curves.json (every evaluation).
Commands:
    nohup python experiments/fig3_convergence.py > runs/fig3.log 2>&1 &         # CPU, 2 runs at a time, ~1 h
    python experiments/fig3_convergence.py --parallel=1 --device=cuda --max_steps=3000 --batch_size=64 \
        --resolution=128 --base_weights=<a base trained at 128 px>              # GPU: any train.py field as a flag
    python experiments/fig3_convergence.py --smoke --base_weights=<file> ...     # tests/test_experiments.py
Expected (paper): cross_norm reaches the thresholds first; zero_conv and controlnet later and abruptly.
"""

import argparse
import ast
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `protocol` beside this file, whatever the cwd
import protocol  # noqa: E402

ARMS = ("cross_norm", "zero_conv", "no_norm", "paper_norm", "controlnet")
# Each method's own recipe where it has one: ControlNet trains its encoder copy on a locked UNet (Zhang et al. 2023
# §3.2), while the ControlNeXt arms train the branch plus train.py's default UNet selection (`to_out`, the official
# SD1.5 recipe). A --trainable flag given on the command line overrides this for every arm.
ARM_OVERRIDES = {"controlnet": ["--trainable=none"]}


def parse_args(argv: list[str], description: str, arms: tuple, max_steps: int, eval_every: int):
    """Protocol flags; every other `--field=value` is handed to train.py unchanged (resolution, device, lr, ...)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--arms", default=repr(arms), help="tuple of arm names")
    parser.add_argument("--seeds", default="(0, 1, 2)", help="tuple of seeds (init and data order)")
    parser.add_argument("--max_steps", type=int, default=max_steps)
    parser.add_argument("--eval_every", type=int, default=eval_every)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (subprocesses); 1 = in-process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--runs_dir", default="", help="train.py run folders; default runs/<script>")
    parser.add_argument("--results", default="", help="figures and tables; default experiments/results/<script>")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 steps, tiny evaluation, in-process (tests)")
    args, train_args = parser.parse_known_args(argv)
    args.arms, args.seeds = ast.literal_eval(args.arms), ast.literal_eval(args.seeds)
    if args.smoke:
        args.seeds, args.max_steps, args.eval_every, args.parallel = (0,), 2, 1, 1
        train_args = ["--batch_size=2", "--eval_count=2", "--sampling_steps=2", "--warmup_steps=1", *train_args]
    bad = [a for a in train_args if not a.startswith("--")]
    if bad:
        raise ValueError(f"unexpected arguments {bad}: train.py fields are passed as --field=value")
    return args, [*train_args, f"--eval_every={args.eval_every}"]


def header(script: str, argv: list[str], train_args: list[str], wall: float) -> list[str]:
    """Command, wall time and machine load, and which base weights (by content hash) every arm started from."""
    base = next((a.split("=", 1)[1] for a in train_args if a.startswith("--base_weights=")),
                "experiments/weights/toy_base.safetensors")  # train.TrainConfig's default
    path = Path(base) if Path(base).is_absolute() else protocol.ROOT / base
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
    return [f"command: python experiments/{script} {shlex.join(argv)}",
            f"wall time {wall / 60:.1f} min on {os.cpu_count()} CPU cores (load average at the end "
            f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}); base weights {base} (sha256 {digest}...)"]


def main(argv: list[str]) -> dict:
    tic = time.time()
    args, train_args = parse_args(argv, __doc__.splitlines()[0], ARMS, max_steps=500, eval_every=50)
    runs_dir = Path(args.runs_dir or protocol.ROOT / "runs" / "fig3_convergence")
    results = Path(args.results or protocol.ROOT / "experiments" / "results" / "fig3_convergence")
    results.mkdir(parents=True, exist_ok=True)
    jobs = {f"{arm}_s{seed}": [f"--ablation={arm}", f"--seed={seed}", *ARM_OVERRIDES.get(arm, []), *train_args]
            for seed in args.seeds for arm in args.arms}  # seed-major: every arm of seed 0 finishes first
    runs = protocol.run_grid(jobs, runs_dir, args.max_steps, args.parallel, args.threads)
    curves = {arm: [protocol.read_curve(runs[f"{arm}_s{seed}"]) for seed in args.seeds] for arm in args.arms}

    steps = sorted({s for c in curves[args.arms[0]] for s, _ in c})
    shown = [steps[round(i * (len(steps) - 1) / 4)] for i in range(5)] if len(steps) > 5 else steps
    protocol.plot_curves(results / "curves.png", curves, f"fill50k toy: held-out fill IoU vs step "
                         f"(mean, min..max over seeds {list(args.seeds)})")
    protocol.sample_strip(results / "samples.png", {a: runs[f"{a}_s{args.seeds[0]}"] for a in args.arms}, shown)
    lines = header(Path(__file__).name, argv, train_args, time.time() - tic) + [
        f"train.py overrides: {shlex.join(train_args)} --max_steps={args.max_steps}; per arm: {ARM_OVERRIDES}",
        *protocol.config_differences(runs), "", *protocol.steps_to_table(curves)]
    (results / "table.md").write_text("\n".join(lines) + "\n")
    (results / "curves.json").write_text(json.dumps(curves, indent=1))
    print("\n".join(lines))
    return {"curves": curves, "table": lines, "results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
