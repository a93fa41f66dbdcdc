"""Parameter selection: how much of the UNet must train next to the ControlNeXt branch?

Question: the paper (ControlNeXt, arXiv 2408.06070, §3.1, Table 1) trains the branch plus a small part of the base
(all attention `to_out`, <10% of ControlNet's trainable parameters) and its authors report that this beats LoRA.
Protocol: fig3_convergence.py's (same base, seeds, data order, batch, steps and held-out evaluation), with the arm
being `--trainable` (controlnext/selection.py: none, to_out, all, lora:R) and `--ablation=cross_norm` for all.
Outputs in `--results`: table.md (trainable parameters and held-out IoU at fixed budgets: a quarter, half and all of
`max_steps`, mean and min..max over seeds), curves.png, curves.json.
Commands:
    nohup python experiments/ablation_selection.py > runs/ablation_selection.log 2>&1 &   # CPU, 2 runs at a time
    python experiments/ablation_selection.py --parallel=1 --device=cuda --max_steps=3000   # GPU: train.py fields
    python experiments/ablation_selection.py --smoke --base_weights=<file> ...              # tests
Expected (paper): to_out beats none at equal steps; all is no better per step for far more parameters; LoRA between.
"""

import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `protocol` and `fig3_convergence` beside this file
import protocol  # noqa: E402
from fig3_convergence import header, parse_args  # noqa: E402

from controlnext.control_branch import PRESETS as BRANCHES  # noqa: E402
from controlnext.controlnext import PRESETS as INJECTIONS, build_controlled_unet  # noqa: E402
from controlnext.selection import count_selected  # noqa: E402
from unet.sd_unet import PRESETS as UNETS, UNet  # noqa: E402

ARMS = ("none", "to_out", "all", "lora:4")


def trainable_count(selection: str, train_args: list[str]) -> int:
    """Branch + selected UNet parameters of the resolved train.py config (built on the meta device)."""
    sys.path.insert(0, str(protocol.ROOT))
    import train
    config, _ = train.cli.parse_args(train.TrainConfig, train_args)
    with torch.device("meta"):
        unet = UNet(UNETS[config.unet])
        model = build_controlled_unet("cross_norm", unet, BRANCHES[config.branch], INJECTIONS[config.injection])
    return sum(p.numel() for p in model.control_parameters().values()) + count_selected(unet, selection)


def main(argv: list[str]) -> dict:
    tic = time.time()
    args, train_args = parse_args(argv, __doc__.splitlines()[0], ARMS, max_steps=500, eval_every=50)
    runs_dir = Path(args.runs_dir or protocol.ROOT / "runs" / "ablation_selection")
    results = Path(args.results or protocol.ROOT / "experiments" / "results" / "ablation_selection")
    results.mkdir(parents=True, exist_ok=True)
    train_args = ["--ablation=cross_norm", *train_args]
    jobs = {f"{arm.replace(':', '')}_s{seed}": [f"--trainable={arm}", f"--seed={seed}", *train_args]
            for seed in args.seeds for arm in args.arms}
    runs = protocol.run_grid(jobs, runs_dir, args.max_steps, args.parallel, args.threads)
    curves = {arm: [protocol.read_curve(runs[f"{arm.replace(':', '')}_s{seed}"]) for seed in args.seeds]
              for arm in args.arms}

    budgets = sorted({max(args.eval_every, round(args.max_steps * f / args.eval_every) * args.eval_every)
                      for f in (0.25, 0.5, 1.0)})
    lines = header(Path(__file__).name, argv, train_args, time.time() - tic) + [
        f"train.py overrides: {shlex.join(train_args)} --max_steps={args.max_steps}",
        *protocol.config_differences(runs), "",
        "| --trainable | trainable parameters (branch + UNet) | "
        + " | ".join(f"IoU at step {b} mean (min..max)" for b in budgets) + " |",
        "|---|---:|" + "---|" * len(budgets)]
    for arm, seeds in curves.items():
        cells = []
        for budget in budgets:
            values = [dict(c).get(budget) for c in seeds]
            values = [v for v in values if v is not None]
            cells.append(f"{statistics.mean(values):.3f} ({min(values):.3f}..{max(values):.3f})" if values else "—")
        lines.append(f"| {arm} | {trainable_count(arm, train_args):,} | " + " | ".join(cells) + " |")
    lines += ["", *protocol.steps_to_table(curves)]
    protocol.plot_curves(results / "curves.png", curves, f"fill50k toy, cross_norm: held-out fill IoU vs step by "
                         f"--trainable (mean, min..max over seeds {list(args.seeds)})")
    (results / "table.md").write_text("\n".join(lines) + "\n")
    (results / "curves.json").write_text(json.dumps(curves, indent=1))
    print("\n".join(lines))
    return {"curves": curves, "table": lines, "results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
