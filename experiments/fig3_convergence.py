"""Fig. 3 done rigorously: does cross normalization converge faster than zero-conv? On the miniature SD1.5.

Question: the paper (ControlNeXt, arXiv 2408.06070, §3.2 and Fig. 3) claims that cross normalization fits within a
few hundred steps with no "sudden convergence", where zero-initialised connections (ControlNet) wait thousands.
Protocol (issue 18), on the frozen miniature SD1.5 (experiments/weights/mini_sd15.safetensors: VAE latents, epsilon
prediction on SD1.5's schedule, a CLIP-style text tower) and procedural fill50k at 64 px:
1. learning-rate sweep: every arm (cross_norm, zero_conv, no_norm, paper_norm, controlnet) at each --lr in LRS, the
   branch at the official 10x (--control_lr), on tuning seeds that are not reported, 400 steps (ControlNet 1000: it
   sits at chance for 200-500 steps, so at 400 every lr ties); the best lr per arm is the one with the highest mean
   IoU over its last two evaluations;
2. the reported runs: every arm at its own best lr on 5 seeds (init and data order; identical data order per seed
   across arms), IoU on 32 fixed held-out conditions every --eval_every steps; diagnostics every log_every steps
   (|k CN(h, c)| / |h| and cos(k CN(h, c), h) at the site, the branch's gradient norm: controlnext/stages.py);
3. sensitivity of cross_norm: control scale 0.1, 0.3, 0.5 and 3 (1.0 is the reported arm; the other arms' learned
   terms grow to 2-3.6 |h|, so k = 3 asks whether a larger fixed k is all cross_norm lacks); the site (--control_site):
   conv_in (8x8 at 64 px, SDXL's site), down_0 (4x4, the reported arm), down_1 (2x2) and mid_out (1x1, the release's);
   the official SD1.5 *release* form (learned scale) as released (after the mid block) and moved to down_0, which
   separates the learned scale from the site;
4. a rerun of cross_norm on 3 other seeds, checked against the 95% prediction interval for a 3-seed mean (and each
   seed against the one-seed interval): protocol.py says why the bootstrap interval of the mean is not that check;
5. the same-lr check: cross_norm on the reported seeds at each lr another ControlNeXt arm chose, so that a
   difference between arms can be told apart from a difference between their learning rates.
The UNet selection is each method's own: `to_out` for the ControlNeXt arms (official SD1.5), none for ControlNet
(its encoder copy trains on a locked UNet, Zhang et al. 2023 §3.2). Two single-thread runs at a time on 2 cores.
Outputs in --results: table.md (steps to IoU 0.5 / 0.7, IoU at 250 / 500 / 1000 with bootstrap 95% intervals and
prediction intervals for a rerun, the sweep, the sensitivity rows, the rerun check, CPU time), curves.png,
diagnostics.png, sensitivity.png (scale), sites.png (site and form), curves.json.
Commands:
    nohup python experiments/fig3_convergence.py > runs/fig3.log 2>&1 &        # CPU: 197 min of CPU, ~100 min on 2 cores
    python experiments/fig3_convergence.py --parallel=1 --device=cuda --batch_size=24 --resolution=512 \\
        --pretrained=v1-5-pruned-emaonly.safetensors --tokenizer=tokenizer/ --dataset=data/fill50k \\
        --branch=g2 --max_steps=3000 --eval_every=250 --lrs="(1e-5, 3e-5, 1e-4)"    # the paper-scale version (GPU)
    python experiments/fig3_convergence.py --smoke --pretrained=<tiny file>              # tests/test_experiments.py
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `protocol` beside this file, whatever the cwd
import protocol  # noqa: E402

ARMS = ("cross_norm", "zero_conv", "no_norm", "paper_norm", "controlnet")
ARM_OVERRIDES = {"controlnet": ["--trainable=none"]}
# label: (run-folder index, train.py flags); an index stays with its row, so finished runs are found again
SENSITIVITY = {"cross_norm, k=0.1": (0, ["--control_scale=0.1"]), "cross_norm, k=0.3": (1, ["--control_scale=0.3"]),
               "cross_norm, k=0.5": (7, ["--control_scale=0.5"]), "cross_norm, k=3": (8, ["--control_scale=3.0"]),
               "cross_norm at conv_in (8x8)": (2, ["--control_site=conv_in"]),
               "cross_norm at down_1 (2x2)": (3, ["--control_site=down_1"]),
               "cross_norm at mid_out (1x1)": (4, ["--control_site=mid_out"]),
               "release form (learned scale) at down_0": (5, ["--injection=sd15_release", "--branch=tiny_g1",
                                                              "--control_site=down_0"]),
               "release form as released (mid_out, 1x1)": (6, ["--injection=sd15_release", "--branch=tiny_g1"])}
DIAGNOSTICS = ("term_ratio", "term_cosine", "grad_norm_control")


def parse_args(argv: list[str]):
    """Protocol flags; every other `--field=value` goes to train.py unchanged (resolution, device, dataset, ...)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=repr(ARMS), help="tuple of arm names")
    parser.add_argument("--lrs", default="(1e-4, 3e-4, 1e-3, 3e-3, 1e-2)", help="--lr values of the sweep (branch at 10x)")
    parser.add_argument("--tune_seeds", default="(100,)", help="seeds of the sweep (not reported)")
    parser.add_argument("--seeds", default="(0, 1, 2, 3, 4)", help="reported seeds")
    parser.add_argument("--check_seeds", default="(10, 11, 12)", help="cross_norm rerun on other seeds; () = none")
    parser.add_argument("--sensitivity_seeds", default="(0, 1)", help="seeds of the sensitivity runs; () = none")
    parser.add_argument("--max_steps", type=int, default=1000)
    parser.add_argument("--tune_steps", type=int, default=400)
    parser.add_argument("--controlnet_tune_steps", type=int, default=1000,
                        help="the ControlNet sweep's length: it sits at chance for 200-500 steps before converging, so "
                             "scored at 400 steps every lr ties and the choice is noise")
    parser.add_argument("--sensitivity_steps", type=int, default=500)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--at", default="(250, 500, 1000)", help="steps whose IoU the table reports")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (subprocesses); 1 = in-process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--runs_dir", default="", help="train.py run folders; default runs/fig3_convergence")
    parser.add_argument("--results", default="", help="figures and tables; default experiments/results/fig3_convergence")
    parser.add_argument("--smoke", action="store_true", help="2 arms, 1 lr, 1 seed, 2 steps, in-process (tests)")
    args, train_args = parser.parse_known_args(argv)
    for name in ("arms", "lrs", "tune_seeds", "seeds", "check_seeds", "sensitivity_seeds", "at"):
        setattr(args, name, ast.literal_eval(getattr(args, name)))
    if args.smoke:
        args.arms, args.lrs, args.tune_seeds, args.seeds = ("cross_norm", "zero_conv"), (1e-3,), (100,), (0,)
        args.check_seeds, args.sensitivity_seeds, args.parallel, args.at = (1,), (0,), 1, (2,)
        args.max_steps = args.tune_steps = args.sensitivity_steps = args.controlnet_tune_steps = 2
        args.eval_every = 1
        train_args = ["--batch_size=2", "--eval_count=2", "--sampling_steps=2", "--warmup_steps=1", "--log_every=1",
                      *train_args]
    bad = [a for a in train_args if not a.startswith("--")]
    if bad:
        raise ValueError(f"unexpected arguments {bad}: train.py fields are passed as --field=value")
    defaults = ["--batch_size=16", "--log_every=25"]  # the budget: 2 x 1 thread, ~70 min; a flag overrides them
    given = {a.split("=")[0] for a in train_args}
    return args, [*(d for d in defaults if d.split("=")[0] not in given), *train_args]


def main(argv: list[str]) -> dict:
    tic = time.time()
    args, train_args = parse_args(argv)
    runs_dir = Path(args.runs_dir or protocol.ROOT / "runs" / "fig3_convergence")
    results = Path(args.results or protocol.ROOT / "experiments" / "results" / "fig3_convergence")
    results.mkdir(parents=True, exist_ok=True)
    common = lambda steps, every: [*train_args, f"--max_steps={steps}", f"--eval_every={every}"]  # noqa: E731
    lr_flags = lambda lr: [f"--lr={lr}", f"--control_lr={10 * lr}"]  # noqa: E731 - the official 10x ratio

    # 1. the learning-rate sweep, on seeds that are not reported
    tune_steps = {arm: args.controlnet_tune_steps if arm == "controlnet" else args.tune_steps for arm in args.arms}
    tune = {f"tune_{arm}_lr{lr:g}_s{seed}": [f"--ablation={arm}", f"--seed={seed}", *lr_flags(lr),
                                               *ARM_OVERRIDES.get(arm, []),
                                               *common(tune_steps[arm], max(1, tune_steps[arm] // 5))]
            for seed in args.tune_seeds for arm in args.arms for lr in args.lrs}
    tuned = protocol.run_grid(tune, runs_dir, args.parallel, args.threads)

    def score(arm: str, lr: float) -> float:  # mean IoU over the last two evaluations, over the tuning seeds
        names = [f"tune_{arm}_lr{lr:g}_s{s}" for s in args.tune_seeds]
        if any(protocol.diverged(runs_dir, name) for name in names):
            return float("-inf")  # a diverged lr is never chosen
        curves = [protocol.read_curve(tuned[name]) for name in names]
        return sum(v for c in curves for _, v in c[-2:]) / sum(len(c[-2:]) for c in curves)

    best = {arm: max(args.lrs, key=lambda lr: score(arm, lr)) for arm in args.arms}

    # 2. the reported runs; 3. sensitivity; 4. the rerun check
    report = {f"{arm}_s{seed}": [f"--ablation={arm}", f"--seed={seed}", *lr_flags(best[arm]), *ARM_OVERRIDES.get(arm, []),
                                 *common(args.max_steps, args.eval_every)] for seed in args.seeds for arm in args.arms}
    lr = best.get("cross_norm", args.lrs[0])
    sensitivity = {f"sens{i}_s{seed}": ["--ablation=cross_norm", f"--seed={seed}", *lr_flags(lr), *flags,
                                        *common(args.sensitivity_steps, args.eval_every)]
                   for i, flags in SENSITIVITY.values() for seed in args.sensitivity_seeds}
    check = {f"check_cross_norm_s{seed}": ["--ablation=cross_norm", f"--seed={seed}", *lr_flags(lr),
                                           *common(args.max_steps, args.eval_every)] for seed in args.check_seeds}
    # 5. the same-lr check: cross_norm at each lr another ControlNeXt arm chose (is a difference the form's or the lr's?)
    same_lrs = sorted({best[a] for a in args.arms if a not in ("controlnet", "cross_norm")} - {lr}) \
        if "cross_norm" in args.arms else []
    same = {f"cross_norm_lr{v:g}_s{seed}": ["--ablation=cross_norm", f"--seed={seed}", *lr_flags(v),
                                            *common(args.max_steps, args.eval_every)]
            for v in same_lrs for seed in args.seeds}
    runs = protocol.run_grid({**report, **sensitivity, **check, **same}, runs_dir, args.parallel, args.threads)

    curves = {arm: [protocol.read_curve(runs[f"{arm}_s{s}"]) for s in args.seeds] for arm in args.arms}
    chance = sum(c[0][1] for seeds in curves.values() for c in seeds) / sum(len(s) for s in curves.values())
    protocol.plot_curves(results / "curves.png", curves, f"miniature SD1.5 + fill50k: held-out fill IoU\n"
                         f"(mean, min..max over seeds {list(args.seeds)}; each arm at its best lr)")
    panels = {key: {arm: [protocol.read_curve(runs[f"{arm}_s{s}"], key) for s in args.seeds] for arm in args.arms}
              for key in DIAGNOSTICS}
    protocol.plot_panels(results / "diagnostics.png", panels, "what the control does at the site (training batches)")
    sens_curves = {"cross_norm (reported, k=1)": curves.get("cross_norm", [])[:len(args.sensitivity_seeds)]} | {
        label: [protocol.read_curve(runs[f"sens{i}_s{s}"]) for s in args.sensitivity_seeds]
        for label, (i, _) in SENSITIVITY.items()} if args.sensitivity_seeds else {}
    if sens_curves:
        reported = next(iter(sens_curves))  # the k = 1, down_0 arm, drawn in both panels as the reference
        scale = {k: v for k, v in sens_curves.items() if v and (k == reported or ", k=" in k)}
        protocol.plot_curves(results / "sensitivity.png", scale, "cross normalization: the control scale k")
        protocol.plot_curves(results / "sites.png", {k: v for k, v in sens_curves.items() if v and k not in scale
                                                      or k == reported},
                             "cross normalization: the site (h's size at 64 px) and the release form")

    cpu = sum(protocol.cpu_seconds(runs_dir, name) for name in [*tune, *report, *sensitivity, *check, *same])
    lines = [f"command: python experiments/{Path(__file__).name} {shlex.join(argv)}",
             f"machine: {protocol.machine()}; wall {(time.time() - tic) / 60:.1f} min this call, "
             f"CPU {cpu / 60:.1f} min over all runs", f"train.py overrides: {shlex.join(train_args)}", "",
             "learning-rate sweep (mean IoU over the last two evaluations, tuning seeds "
             f"{list(args.tune_seeds)}, {args.tune_steps} steps, ControlNet {args.controlnet_tune_steps}; branch lr = "
             "10 x lr):", "",
             "| arm | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " | chosen |", "|---|" + "---|" * (len(args.lrs) + 1),
             *[f"| {arm} | " + " | ".join("diverged" if score(arm, lr) == float("-inf") else f"{score(arm, lr):.3f}"
                                       for lr in args.lrs) + f" | {best[arm]:g} |"
               for arm in args.arms], "",
             f"reported runs (seeds {list(args.seeds)}, {args.max_steps} steps; base alone at step 0: {chance:.3f}):", "",
             *protocol.summary_table(curves, args.at), "",
             f"where a rerun of an arm on {max(len(args.check_seeds), 1)} new seeds should land (95% prediction "
             "intervals over the reported seeds):", "",
             *(protocol.rerun_table(curves, args.at, max(len(args.check_seeds), 1)) if len(args.seeds) > 1 else [])]
    collapsed = lambda seeds: sum(c[-1][1] < chance + 0.03 for c in seeds if c)  # noqa: E731 - back at chance
    lines += ["", "seeds back at chance at the end (last IoU < base + 0.03): " + ", ".join(
        f"{arm} {collapsed(seeds)}/{len(seeds)}" for arm, seeds in curves.items())]
    for v in same_lrs:
        rows = {f"cross_norm at lr {v:g}": [protocol.read_curve(runs[f"cross_norm_lr{v:g}_s{s}"]) for s in args.seeds]}
        rows |= {f"{arm} (its best lr)": curves[arm] for arm in args.arms if best[arm] == v and arm != "controlnet"}
        lines += ["", f"the same-lr check at lr {v:g} (seeds {list(args.seeds)}); back at chance: " + ", ".join(
            f"{name} {collapsed(seeds)}/{len(seeds)}" for name, seeds in rows.items()), "",
            *protocol.summary_table(rows, args.at)]
    if sens_curves:
        lines += ["", f"sensitivity of cross_norm (seeds {list(args.sensitivity_seeds)}, {args.sensitivity_steps} steps, "
                  f"lr {lr:g}):", "", *protocol.summary_table(sens_curves, tuple(s for s in args.at
                                                                               if s <= args.sensitivity_steps))]
    if args.check_seeds:
        check_curves = [protocol.read_curve(runs[f"check_cross_norm_s{s}"]) for s in args.check_seeds]
        lines += ["", f"rerun check: cross_norm on seeds {list(args.check_seeds)} against the reported seeds:", "",
                  *protocol.rerun_check(curves.get("cross_norm", []), check_curves, args.at)]
    (results / "table.md").write_text("\n".join(lines) + "\n")
    (results / "curves.json").write_text(json.dumps({"report": curves, "sensitivity": sens_curves, "best_lr": best},
                                                    indent=1))
    print("\n".join(lines))
    return {"curves": curves, "best_lr": best, "table": lines, "results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
