"""The shared protocol of fig3_convergence.py and ablation_selection.py: a grid of train.py runs, their IoU curves.

Every run is `train.py --field=value ...` (the one training loop; no second one here), differing from the others
only in the overrides an experiment names (the arm, the seed); base weights, data order (a function of the seed and
step, controlnext/training.py), batch, steps and the held-out evaluation are the same for every arm. Runs go one per
sub-folder of `runs_dir`; a run whose last evaluation is already logged is not run again, so an interrupted protocol
continues where it stopped. With parallel > 1 the runs are subprocesses (CPU: one thread each), else in-process.
Figures are drawn with PIL (matplotlib is not a dependency). Left out: statistics beyond mean and min..max over seeds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (23, 190, 207)]


def run_folder(runs_dir: Path, name: str) -> Path | None:
    """The (single) train.py run folder under runs_dir/name, or None."""
    found = sorted((runs_dir / name).glob("*/metrics.jsonl"))
    return found[-1].parent if found else None


def read_curve(run: Path, key: str = "iou") -> list[tuple[int, float]]:
    """[(step, value)] of the evaluation rows of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["step"], row[key]) for row in rows if key in row]


def is_done(runs_dir: Path, name: str, max_steps: int) -> bool:
    run = run_folder(runs_dir, name)
    return run is not None and any(step == max_steps for step, _ in read_curve(run))


def run_grid(jobs: dict[str, list[str]], runs_dir: Path, max_steps: int, parallel: int, threads: int) -> dict[str, Path]:
    """Run `train.py <overrides>` for each job name (skipping finished ones); {name: run folder}."""
    todo = {name: args for name, args in jobs.items() if not is_done(runs_dir, name, max_steps)}
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done, {len(todo)} to run ({parallel} at a time)", flush=True)

    def argv(name: str, args: list[str]) -> list[str]:
        return [*args, f"--max_steps={max_steps}", f"--out_dir={runs_dir / name}", f"--experiment={name}",
                f"--save_every={max_steps}", "--progress=False", f"--num_threads={threads}"]

    def set_aside(name: str) -> None:
        # An interrupted run restarts from scratch (same seed, same result); its folder is renamed, not deleted.
        (runs_dir / name).mkdir(parents=True, exist_ok=True)
        for stale in (runs_dir / name).glob("*/metrics.jsonl"):
            stale.parent.rename(stale.parent.with_name(stale.parent.name + ".incomplete"))

    def launch(name: str) -> None:
        tic = time.time()
        set_aside(name)
        with open(runs_dir / name / "stdout.txt", "w") as log:
            subprocess.run([sys.executable, str(ROOT / "train.py"), *argv(name, todo[name])], cwd=ROOT, stdout=log,
                           stderr=subprocess.STDOUT, check=True)
        print(f"  {name}: {time.time() - tic:.0f} s", flush=True)

    if parallel > 1:
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(launch, todo))
    else:
        sys.path.insert(0, str(ROOT))  # train.py sits at the repository root, outside the installed packages
        import train  # in-process: the same config parsing and loop, without a fresh interpreter per run
        for name, args in todo.items():
            tic = time.time()
            set_aside(name)
            config, _ = train.cli.parse_args(train.TrainConfig, argv(name, args))
            train.main(config)
            print(f"  {name}: {time.time() - tic:.0f} s", flush=True)
    return {name: run_folder(runs_dir, name) for name in jobs}


# Fields that differ between runs by design (the arm, the seed, where and how the run was launched).
PER_RUN_FIELDS = {"ablation", "trainable", "seed", "experiment", "out_dir", "resume", "progress", "num_threads",
                  "device", "save_every"}


def config_differences(runs: dict[str, Path], allowed: set[str] = frozenset()) -> list[str]:
    """Fields of the runs' config.json that differ beyond the arm and seed (e.g. train.py's defaults changed while
    a protocol ran): one line per field with its values, empty when the protocol held."""
    configs = {name: json.loads((run / "config.json").read_text()) for name, run in runs.items()}
    fields = sorted({k for c in configs.values() for k in c} - PER_RUN_FIELDS - set(allowed))
    lines = []
    for field in fields:
        values = {json.dumps(c.get(field)) for c in configs.values()}
        if len(values) > 1:
            lines.append(f"WARNING: runs differ in {field}: {sorted(values)}")
    return lines


def first_step_at(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """The first evaluated step whose value reaches the threshold (the convergence step of fill50k.md)."""
    return next((step for step, value in curve if value >= threshold), None)


def summarise(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float, float]]:
    """Per step over seeds: (step, mean, min, max); steps every seed evaluated."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    table = [dict(c) for c in curves]
    return [(s, statistics.mean(t[s] for t in table), min(t[s] for t in table), max(t[s] for t in table)) for s in steps]


def steps_to_table(curves: dict[str, list[list[tuple[int, float]]]], thresholds=(0.5, 0.8)) -> list[str]:
    """Markdown rows: per arm, the median over seeds of the first step at IoU >= threshold (and how many seeds got
    there), the final IoU mean (min..max) and the best IoU of the mean curve."""
    lines = ["| arm | " + " | ".join(f"steps to IoU >= {t} (median; seeds reaching)" for t in thresholds)
             + " | final IoU mean (min..max) | best mean IoU |",
             "|---|" + "---|" * (len(thresholds) + 2)]
    for arm, seeds in curves.items():
        cells = []
        for threshold in thresholds:
            hits = [first_step_at(c, threshold) for c in seeds]
            reached = [h for h in hits if h is not None]
            # Seeds that never reach count as "> budget": the median is defined only if most seeds reached.
            median = statistics.median(reached) if len(reached) * 2 > len(seeds) else None
            cells.append(f"{'—' if median is None else int(median)} ({len(reached)}/{len(seeds)})")
        mean = summarise(seeds)
        final = [c[-1][1] for c in seeds]
        cells.append(f"{statistics.mean(final):.3f} ({min(final):.3f}..{max(final):.3f})")
        cells.append(f"{max(m for _, m, _, _ in mean):.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(path: Path, curves: dict[str, list[list[tuple[int, float]]]], title: str,
                lines_at=(0.5, 0.8), size=(900, 520)) -> None:
    """IoU (0..1) vs step: per arm the mean over seeds as a line and the min..max band, with a legend."""
    W, H = size
    left, top, right, bottom = 60, 40, W - 210, H - 50  # the legend goes in the right margin
    image = Image.new("RGB", size, "white")
    band = Image.new("RGBA", size, (0, 0, 0, 0))
    draw, band_draw = ImageDraw.Draw(image), ImageDraw.Draw(band)
    x_max = max(s for seeds in curves.values() for c in seeds for s, _ in c)
    px = lambda step: left + (right - left) * step / x_max  # noqa: E731
    py = lambda v: bottom - (bottom - top) * min(max(v, 0.0), 1.0)  # noqa: E731
    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        draw.line([(left, py(v)), (right, py(v))], fill=(230, 230, 230))
        draw.text((left - 30, py(v) - 6), f"{v:.1f}", fill="black")
    for v in lines_at:  # the convergence thresholds
        draw.line([(left, py(v)), (right, py(v))], fill=(120, 120, 120))
        draw.text((right + 4, py(v) - 6), f"IoU {v}", fill=(120, 120, 120))
    for k in range(6):
        step = round(x_max * k / 5)
        draw.text((px(step) - 10, bottom + 6), str(step), fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 12), title, fill="black")
    draw.text(((left + right) // 2 - 40, H - 22), "optimizer step", fill="black")
    for k, (arm, seeds) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        rows = summarise(seeds)
        upper = [(px(s), py(hi)) for s, _, _, hi in rows]
        lower = [(px(s), py(lo)) for s, _, lo, _ in rows][::-1]
        if len(rows) > 1:
            band_draw.polygon(upper + lower, fill=(*colour, 50))
    image.paste(band, (0, 0), band)
    draw = ImageDraw.Draw(image)
    for k, (arm, seeds) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        pts = [(px(s), py(m)) for s, m, _, _ in summarise(seeds)]
        draw.line(pts, fill=colour, width=3) if len(pts) > 1 else None
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.rectangle([right + 60, top + 10 + 18 * k, right + 78, top + 22 + 18 * k], fill=colour)
        draw.text((right + 84, top + 10 + 18 * k), f"{arm} ({len(seeds)} seeds)", fill="black")
    image.save(path)


def sample_strip(path: Path, runs: dict[str, Path], steps: list[int], pairs: int = 4) -> None:
    """Rows = arms, columns = steps: the first `pairs` (condition | output) pairs of each run's samples/ grid."""
    cells = {}
    for arm, run in runs.items():
        for step in steps:
            grid = run / "samples" / f"step_{step:06d}.png"
            if grid.is_file():  # training.save_grid: 4 columns of (r+2) x (2r+2) cells, so r = width / 8 - 1
                image = Image.open(grid)
                r = image.width // 8 - 1
                cells[arm, step] = image.crop((0, 0, min(pairs, 4) * (2 * r + 2), r + 2))
    if not cells:
        return
    cw, ch = max(c.width for c in cells.values()), max(c.height for c in cells.values())
    label_w, label_h = 110, 18
    sheet = Image.new("RGB", (label_w + len(steps) * (cw + 6), label_h + len(runs) * (ch + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, step in enumerate(steps):
        draw.text((label_w + j * (cw + 6), 3), f"step {step}", fill="black")
    for i, arm in enumerate(runs):
        draw.text((4, label_h + i * (ch + 6) + ch // 2 - 6), arm, fill="black")
        for j, step in enumerate(steps):
            if (arm, step) in cells:
                sheet.paste(cells[arm, step], (label_w + j * (cw + 6), label_h + i * (ch + 6)))
    sheet.save(path)
