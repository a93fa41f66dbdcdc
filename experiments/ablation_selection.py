"""Parameter selection: how much of the UNet must train next to the ControlNeXt branch? On the miniature SD1.5.

Question: the paper (ControlNeXt, arXiv 2408.06070, §3.1, Table 1) trains the branch plus a small part of the base
(all attention `to_out`, <10% of ControlNet's trainable parameters) and its authors report that this beats LoRA.
Protocol: fig3_convergence.py's footing (the miniature SD1.5, fill50k at 64 px, batch, data order per seed, held-out
evaluation, two single-thread runs at a time), with the arm being `--trainable` (controlnext/selection.py: none,
to_out, attn2_to_out, all, lora:4 on to_out) and `--ablation=cross_norm` at the lr fig3_convergence.py chose for it
(results/fig3_convergence/curves.json; --lr overrides).
Outputs in --results: table.md (trainable parameters; steps to IoU 0.5 / 0.7; IoU at a quarter, half and all of the
budget with bootstrap 95% intervals over seeds), curves.png, selection.png (IoU at the end vs trainable parameters),
curves.json.
Commands:
    nohup python experiments/ablation_selection.py > runs/ablation_selection.log 2>&1 &   # CPU, ~15 min on 2 cores
    python experiments/ablation_selection.py --smoke --pretrained=<tiny file>              # tests/test_experiments.py
Expected (paper): to_out beats none at equal steps; all is no better per step for far more parameters; LoRA between.
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `protocol` beside this file, whatever the cwd
import protocol  # noqa: E402

ARMS = ("none", "to_out", "attn2_to_out", "all", "lora:4")


def trainable_count(run: Path) -> int:
    """Trainable parameters of a run, from its log line ("trainable N of M parameters")."""
    line = next(line for line in (run / "log.txt").read_text().splitlines() if line.startswith("trainable "))
    return int(line.split()[1].replace(",", ""))


def main(argv: list[str]) -> dict:
    tic = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=repr(ARMS))
    parser.add_argument("--seeds", default="(0, 1, 2)")
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs_dir", default="")
    parser.add_argument("--results", default="")
    parser.add_argument("--smoke", action="store_true", help="2 arms, 1 seed, 2 steps, in-process (tests)")
    args, train_args = parser.parse_known_args(argv)
    args.arms, args.seeds = ast.literal_eval(args.arms), ast.literal_eval(args.seeds)
    if args.smoke:
        args.arms, args.seeds, args.max_steps, args.eval_every, args.parallel = ("none", "lora:4"), (0,), 2, 1, 1
        train_args = ["--batch_size=2", "--eval_count=2", "--sampling_steps=2", "--warmup_steps=1", *train_args]
    runs_dir = Path(args.runs_dir or protocol.ROOT / "runs" / "ablation_selection")
    results = Path(args.results or protocol.ROOT / "experiments" / "results" / "ablation_selection")
    results.mkdir(parents=True, exist_ok=True)
    chosen = protocol.ROOT / "experiments" / "results" / "fig3_convergence" / "curves.json"
    lr = json.loads(chosen.read_text())["best_lr"]["cross_norm"] if chosen.is_file() and not args.smoke else None
    lr_flags = [f"--lr={lr}", f"--control_lr={10 * lr}"] if lr and not any(a.startswith("--lr=") for a in train_args) \
        else []
    common = ["--ablation=cross_norm", "--batch_size=16", *lr_flags, *train_args, f"--max_steps={args.max_steps}",
              f"--eval_every={args.eval_every}"]
    jobs = {f"{arm.replace(':', '')}_s{seed}": [f"--trainable={arm}", f"--seed={seed}", *common]
            for seed in args.seeds for arm in args.arms}
    runs = protocol.run_grid(jobs, runs_dir, args.parallel, args.threads)
    curves = {arm: [protocol.read_curve(runs[f"{arm.replace(':', '')}_s{seed}"]) for seed in args.seeds]
              for arm in args.arms}
    counts = {arm: trainable_count(runs[f"{arm.replace(':', '')}_s{args.seeds[0]}"]) for arm in args.arms}

    budgets = tuple(sorted({max(args.eval_every, round(args.max_steps * f / args.eval_every) * args.eval_every)
                            for f in (0.25, 0.5, 1.0)}))
    labels = {arm: f"{arm} ({counts[arm]:,} trainable)" for arm in args.arms}
    cpu = sum(protocol.cpu_seconds(runs_dir, name) for name in jobs)
    lines = [f"command: python experiments/{Path(__file__).name} {shlex.join(argv)}",
             f"machine: {protocol.machine()}; wall {(time.time() - tic) / 60:.1f} min this call, "
             f"CPU {cpu / 60:.1f} min over all runs", f"train.py overrides: {shlex.join(common)}", "",
             *protocol.summary_table(curves, budgets, labels=labels)]
    protocol.plot_curves(results / "curves.png", {labels[a]: c for a, c in curves.items()},
                         f"miniature SD1.5, cross_norm: held-out fill IoU by --trainable (seeds {list(args.seeds)})")
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, arm in enumerate(args.arms):
        final = [c[-1][1] for c in curves[arm]]
        mean, lo, hi = protocol.bootstrap(final)
        ax.errorbar([counts[arm]], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", color=f"C{k}", capsize=4,
                    label=arm)
    ax.set(xscale="log", xlabel="trainable parameters (branch + UNet)", ylabel=f"IoU at step {args.max_steps}",
           title="parameter selection (mean, bootstrap 95% interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "selection.png", dpi=110)
    plt.close(fig)
    (results / "table.md").write_text("\n".join(lines) + "\n")
    (results / "curves.json").write_text(json.dumps({"curves": curves, "trainable": counts}, indent=1))
    print("\n".join(lines))
    return {"curves": curves, "table": lines, "results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
