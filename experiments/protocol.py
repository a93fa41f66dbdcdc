"""The shared protocol of fig3_convergence.py and ablation_selection.py: grids of train.py runs, their curves, the
statistics over seeds, and the figures.

Every run is `train.py --field=value ...` (the one training loop; no second one here), differing from the others only
in the overrides an experiment names (arm, learning rate, seed, ...); base weights, data order (a function of the seed
and step, controlnext/runs.py step_generator), batch and the held-out evaluation are the same for every arm. Runs go
one per sub-folder of `runs_dir`; a run whose last evaluation is logged is not run again, so an interrupted protocol
continues where it stopped. Runs are subprocesses, `parallel` at a time, each with `threads` torch threads (2 cores:
two single-thread runs at once), and each one's process CPU time is recorded.
Statistics: the mean over seeds with a percentile bootstrap 95% interval (Efron & Tibshirani 1993, §13.3: resample
the seeds with replacement, 10,000 times); that interval is about the arm's mean, and it is too narrow for what a
rerun on new seeds sees (the rerun's own mean varies too; with 5 seeds the percentile bootstrap also undercovers).
What a rerun should land in is the 95% prediction interval for the mean of m new seeds, mean +- t(0.975, n-1) s
sqrt(1/n + 1/m) (normal theory over seeds; Hahn & Meeker 1991, §4.4), m = 1 for a single new seed. Steps to a
threshold: the median over seeds with the fraction of seeds that reach it within the budget (the median is given
only when more than half do).
Left out: statistics across machines (the rows say which machine), tests of significance.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
Curve = list[tuple[int, float]]


def run_folder(runs_dir: Path, name: str) -> Path | None:
    """The (single) train.py run folder under runs_dir/name, or None."""
    found = sorted((runs_dir / name).glob("*/metrics.jsonl"))
    return found[-1].parent if found else None


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_curve(run: Path, key: str = "iou") -> Curve:
    """[(step, value)] of the rows of a run's metrics.jsonl that have `key` (evaluations, or logged diagnostics)."""
    return [(row["step"], row[key]) for row in read_rows(run) if key in row]


DIVERGED = "diverged.txt"  # beside a run folder whose training stopped on a non-finite loss (train.py's NaN guard)


def diverged(runs_dir: Path, name: str) -> str | None:
    """train.py's message if this run diverged (a result of its settings, e.g. too high an lr), else None."""
    path = runs_dir / name / DIVERGED
    return path.read_text().strip() if path.is_file() else None


def is_done(runs_dir: Path, name: str, max_steps: int) -> bool:
    run = run_folder(runs_dir, name)
    return run is not None and (diverged(runs_dir, name) is not None
                                or any(step == max_steps for step, _ in read_curve(run)))


def check_finished(run: Path, name: str, overrides: list[str]) -> None:
    """A finished run is reused only if it ran with these overrides (its config.json): a protocol whose choices changed
    (another best lr, say) must not pick up a run made under the old ones. One line naming the run and the field."""
    config = json.loads((run / "config.json").read_text())
    for arg in overrides:
        field, _, value = arg[2:].partition("=")
        if field not in config:
            continue
        have = config[field]
        try:
            same = float(value) == float(have)
        except (TypeError, ValueError):
            same = str(value) == str(have)
        if not same:
            raise ValueError(f"{run}: finished run {name!r} has --{field}={have!r}, this protocol asks --{field}={value}; "
                             "move it away or pass another --runs_dir")


def run_grid(jobs: dict[str, list[str]], runs_dir: Path, parallel: int, threads: int) -> dict[str, Path]:
    """Run `train.py <overrides>` for each job name (skipping finished ones); {name: run folder}. Each job's overrides
    must include --max_steps; its process CPU time goes to runs_dir/name/cpu_seconds.txt."""
    steps = {name: next(int(a.split("=")[1]) for a in args if a.startswith("--max_steps=")) for name, args in jobs.items()}
    todo = {name: args for name, args in jobs.items() if not is_done(runs_dir, name, steps[name])}
    for name in jobs.keys() - todo.keys():
        check_finished(run_folder(runs_dir, name), name, jobs[name])
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done, {len(todo)} to run ({parallel} at a time)", flush=True)

    def launch(name: str) -> None:
        tic, folder = time.time(), runs_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*/metrics.jsonl"):  # an interrupted run restarts (same seed, same result), set aside
            stale.parent.rename(stale.parent.with_name(stale.parent.name + ".incomplete"))
        argv = [*todo[name], f"--out_dir={folder}", f"--experiment={name}", f"--save_every={steps[name]}",
                "--progress=False", f"--num_threads={threads}"]
        command = [sys.executable, "-c", CPU_TIMED, str(ROOT / "train.py"), *argv]
        with open(folder / "stdout.txt", "w") as log:
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if done.returncode:
            stopped = [line for line in (folder / "stdout.txt").read_text().splitlines() if NAN_GUARD in line]
            if not stopped:  # a real failure, not an outcome: stop the protocol with the run's own log
                raise RuntimeError(f"{name}: train.py failed (exit {done.returncode}); see {folder / 'stdout.txt'}")
            (folder / DIVERGED).write_text(stopped[-1] + "\n")
        print(f"  {name}: {time.time() - tic:.0f} s wall, {cpu_seconds(runs_dir, name):.0f} s CPU"
              f"{'; diverged' if done.returncode else ''}", flush=True)

    def in_process(name: str) -> None:  # parallel == 1: no fresh interpreter per run (tests, small grids)
        sys.path.insert(0, str(ROOT))  # train.py sits at the repository root, outside the installed packages
        import train  # noqa: PLC0415 - only this path needs it; the subprocess path must not import torch here
        folder = runs_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        tic = time.process_time()
        config, _ = train.cli.parse_args(train.TrainConfig, [*todo[name], f"--out_dir={folder}", f"--experiment={name}",
                                                             f"--save_every={steps[name]}", "--progress=False"])
        try:
            train.main(config)
        except FloatingPointError as e:  # the NaN guard: an outcome of the settings, recorded like the subprocess path
            (folder / DIVERGED).write_text(f"{e}\n")
        (folder / "cpu_seconds.txt").write_text(f"{time.process_time() - tic:.1f}\n")

    if parallel > 1:
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(launch, todo))
    else:
        for name in todo:
            in_process(name)
    return {name: run_folder(runs_dir, name) for name in jobs}


# Runs train.py as __main__ and writes the process's CPU time (user + system) beside its run folder.
CPU_TIMED = """import resource, runpy, sys
from pathlib import Path
script, argv = sys.argv[1], sys.argv[2:]
sys.argv = [script, *argv]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("--out_dir="))
    Path(out, "cpu_seconds.txt").write_text(f"{usage.ru_utime + usage.ru_stime:.1f}\\n")
"""


NAN_GUARD = "non-finite loss or gradient"  # the start of train.py's NaN-guard message


def cpu_seconds(runs_dir: Path, name: str) -> float:
    path = runs_dir / name / "cpu_seconds.txt"
    return float(path.read_text()) if path.is_file() else 0.0


def value_at(curve: Curve, step: int) -> float | None:
    return dict(curve).get(step)


def bootstrap(values: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean over seeds and its percentile bootstrap 95% interval."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(draws))
    return statistics.fmean(values), means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


# Student t 0.975 quantiles by degrees of freedom (any table; beyond 30 the normal's 1.96 is within 4%).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        25: 2.060, 30: 2.042}


def prediction_interval(values: list[float], m: int = 1) -> tuple[float, float]:
    """95% interval for the mean of m new seeds given the n seeds in `values`: mean +- t s sqrt(1/n + 1/m)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a prediction interval needs at least 2 seeds, got {n}")
    t = T975.get(n - 1) or (T975[max(k for k in T975 if k <= n - 1)] if n - 1 <= 30 else 1.96)
    half = t * statistics.stdev(values) * (1 / n + 1 / m) ** 0.5
    mean = statistics.fmean(values)
    return mean - half, mean + half


def first_step_at(curve: Curve, threshold: float) -> int | None:
    """The first evaluated step whose value reaches the threshold (the convergence step of fill50k.md)."""
    return next((step for step, value in curve if value >= threshold), None)


def steps_to(curves: list[Curve], threshold: float) -> str:
    """"median (reached/total)" over seeds; "—" when half or fewer reach it."""
    hits = [first_step_at(c, threshold) for c in curves]
    reached = [h for h in hits if h is not None]
    median = statistics.median(reached) if 2 * len(reached) > len(curves) else None
    return f"{'—' if median is None else int(median)} ({len(reached)}/{len(curves)})"


def interval(curves: list[Curve], step: int) -> str:
    values = [v for v in (value_at(c, step) for c in curves) if v is not None]
    if not values:
        return "—"
    mean, lo, hi = bootstrap(values)
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def summary_table(curves: dict[str, list[Curve]], at: tuple[int, ...], thresholds=(0.5, 0.7),
                  labels: dict[str, str] | None = None) -> list[str]:
    """Markdown: per arm, steps to each threshold and IoU at the given steps as mean [bootstrap 95% interval]."""
    lines = ["| arm | " + " | ".join(f"steps to IoU >= {t} (median; seeds reaching)" for t in thresholds) + " | "
             + " | ".join(f"IoU at {s}" for s in at) + " |", "|---|" + "---|" * (len(thresholds) + len(at))]
    for arm, seeds in curves.items():
        cells = [steps_to(seeds, t) for t in thresholds] + [interval(seeds, s) for s in at]
        lines.append(f"| {(labels or {}).get(arm, arm)} | " + " | ".join(cells) + " |")
    return lines


def rerun_table(curves: dict[str, list[Curve]], at: tuple[int, ...], m: int) -> list[str]:
    """Markdown: per arm, the 95% prediction interval for the mean IoU of m new seeds at the given steps."""
    lines = ["| arm | " + " | ".join(f"IoU at {s}: a {m}-seed rerun's mean" for s in at) + " |",
             "|---|" + "---|" * len(at)]
    for arm, seeds in curves.items():
        cells = []
        for step in at:
            values = [v for v in (value_at(c, step) for c in seeds) if v is not None]
            cells.append("[{:.3f}, {:.3f}]".format(*prediction_interval(values, m)) if len(values) > 1 else "—")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def rerun_check(reported: list[Curve], rerun: list[Curve], at: tuple[int, ...]) -> list[str]:
    """Markdown bullets: does a rerun on other seeds land where the reported seeds say it should? Per step: its mean
    against the prediction interval for the mean of that many new seeds, and each new seed against the one-seed
    interval; the bootstrap interval of the reported mean alongside, for reference (it is not a rerun's interval)."""
    lines = []
    for step in at:
        old = [v for v in (value_at(c, step) for c in reported) if v is not None]
        new = [v for v in (value_at(c, step) for c in rerun) if v is not None]
        if len(old) < 2 or not new:
            continue
        mean = statistics.fmean(new)
        lo, hi = prediction_interval(old, len(new))
        one_lo, one_hi = prediction_interval(old, 1)
        seeds_in = sum(one_lo <= v <= one_hi for v in new)
        _, b_lo, b_hi = bootstrap(old)
        lines.append(f"- IoU at {step}: rerun mean {mean:.3f} ({', '.join(f'{v:.3f}' for v in new)}) against "
                     f"[{lo:.3f}, {hi:.3f}] for a {len(new)}-seed mean: {'inside' if lo <= mean <= hi else 'OUTSIDE'}; "
                     f"{seeds_in}/{len(new)} seeds inside the one-seed interval [{one_lo:.3f}, {one_hi:.3f}] "
                     f"(bootstrap interval of the reported mean: [{b_lo:.3f}, {b_hi:.3f}])")
    return lines


def mean_band(curves: list[Curve]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per step every seed evaluated: mean, min, max over seeds."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    tables = [dict(c) for c in curves]
    rows = [[t[s] for t in tables] for s in steps]
    return steps, [statistics.fmean(r) for r in rows], [min(r) for r in rows], [max(r) for r in rows]


def plot_curves(path: Path, curves: dict[str, list[Curve]], title: str, ylabel: str = "held-out fill IoU",
                thresholds=(0.5, 0.7), chance: float | None = None) -> None:
    """Value vs step: per arm the mean over seeds as a line, min..max over seeds as a band; thresholds dashed."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for k, (arm, seeds) in enumerate(curves.items()):
        steps, mean, lo, hi = mean_band(seeds)
        ax.plot(steps, mean, color=f"C{k}", lw=2, marker="o", ms=3, label=f"{arm} ({len(seeds)} seeds)")
        ax.fill_between(steps, lo, hi, color=f"C{k}", alpha=0.15, lw=0)
    for t in thresholds:
        ax.axhline(t, color="0.4", ls="--", lw=0.8)
    if chance is not None:
        ax.axhline(chance, color="0.6", ls=":", lw=1, label=f"base alone ({chance:.2f})")
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left" if ylabel.endswith("IoU") else "best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_panels(path: Path, panels: dict[str, dict[str, list[Curve]]], title: str) -> None:
    """One panel per quantity (e.g. the diagnostics), arms as lines (mean over seeds)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items()):
        for k, (arm, seeds) in enumerate(curves.items()):
            seeds = [c for c in seeds if c]
            if seeds:
                steps, mean, lo, hi = mean_band(seeds)
                ax.plot(steps, mean, color=f"C{k}", lw=1.5, label=arm)
                ax.fill_between(steps, lo, hi, color=f"C{k}", alpha=0.15, lw=0)
        ax.set(xlabel="optimizer step", title=name)
        if name.startswith(("grad_norm", "term_ratio")):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    labelled = {}  # every arm once, from whichever panel drew it (ControlNet has no site, so no term panels)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    axes[0, -1].legend(labelled.values(), labelled.keys(), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    """One line naming the machine the numbers came from."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # subprocess runs (this call's)
    peak = children or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # in-process runs
    return f"{cpu}, {os.cpu_count()} cores, load average {load} at the end, largest run {peak:.1f} GiB RSS"
