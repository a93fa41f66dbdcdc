"""Run bookkeeping for train.py: the run folder and its logs, per-step seeds, EMA, training checkpoints and resume,
sample grids and the loss/IoU plot (STYLE.md §6).

Run folder: runs/<experiment>-<YYYYmmdd-HHMMSS>/ with config.json, log.txt, metrics.jsonl, checkpoints/, samples/,
plot.png. It is created only after every setting has been checked and the model has loaded.
Checkpoints: `checkpoints/step_NNNNNN.safetensors` holds the trainable tensors under the stage's key names,
`step_NNNNNN_ema.safetensors` their EMA, `step_NNNNNN.pt` the optimizer state, GradScaler state, step, RNG state and the
resolved config (read back with torch.load(weights_only=True) through the engine's safe reader). Every file is written
atomically (controlnext/checkpoint.py), the .pt last, so a .pt on disk always has its tensors beside it; temp files a
killed write left behind are removed when the run resumes. FSDP runs add the shards (controlnext/parallel.py).
Data order is a pure function of (seed, step, micro-batch), so a resumed run draws the batches the straight run drew.
Left out: wandb (optional in STYLE, not needed here), checkpoint rotation.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training box
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402

from controlnext.checkpoint import read_state, read_torch, save_state, save_torch  # noqa: E402


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The CPU generator of one micro-batch: data indices, timesteps, noise, prompt dropout. micro = rank * accum + k."""
    state = np.random.SeedSequence([seed, step, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def make_run_dir(out_dir: str | Path, name: str) -> Path:
    """runs/<name>-<YYYYmmdd-HHMMSS>/ with checkpoints/ and samples/ (a -2, -3 ... suffix if it already exists)."""
    base = Path(out_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run, n = base, 1
    while run.exists():
        n += 1
        run = base.with_name(f"{base.name}-{n}")
    (run / "checkpoints").mkdir(parents=True)
    (run / "samples").mkdir()
    return run


class RunLog:
    """One-line logs to stdout and log.txt, metric rows to metrics.jsonl, the curves of plot.png and the sample grids
    (rank 0 only: pass run=None elsewhere, and every method does nothing)."""

    CURVES = ("loss", "iou", "palette_error", "psnr")  # what plot.png shows, when a row has it

    def __init__(self, run: Path | None, write=print):
        self.run, self.write = run, write
        self.curves: dict[str, list[tuple[int, float]]] = {name: [] for name in self.CURVES}

    def line(self, text: str) -> None:
        if self.run is None:
            return
        self.write(text)
        with open(self.run / "log.txt", "a") as f:
            f.write(text + "\n")

    def row(self, **values) -> None:
        if self.run is None:
            return
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(values) + "\n")
        self._follow(values)

    def _follow(self, row: dict) -> None:
        for name in self.CURVES:
            if name in row:
                self.curves[name].append((row["step"], row[name]))

    def eval(self, step: int, metrics: dict[str, float], controls: Tensor, images: Tensor) -> None:
        """An evaluation: its row and line, the sample grid samples/step_N.png, and plot.png redrawn."""
        if self.run is None:
            return
        self.row(step=step, **metrics)
        self.line(f"step {step} | eval | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        save_grid(self.run / "samples" / f"step_{step:06d}.png", controls[:16], images[:16])
        save_plot(self.run / "plot.png", self.curves, title=self.run.name)

    def resume_at(self, step: int) -> None:
        """Keep metrics.jsonl's rows up to `step` (and their curves): rows a stopped run logged after its last
        checkpoint go, and so does a last line torn by a kill (it cannot be parsed; every earlier line must be)."""
        if self.run is None:
            return
        path = self.run / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        rows = []
        for n, line in enumerate(lines, start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if n < len(lines):
                    raise ValueError(f"{path}:{n}: not a JSON row; the run's metrics file is damaged") from None
        rows = [r for r in rows if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for row in rows:
            self._follow(row)


class EMA:
    """Exponential moving average of the trainable tensors, ema <- d_n * ema + (1 - d_n) * param (fp32), with the
    warmed-up decay d_n = min(decay, (1 + n) / (10 + n)) at the n-th update (n = 0, 1, ...): a run of N steps never
    keeps a large share of its initialisation (0.999^1500 = 22% with a constant decay). The warmup is the one of
    diffusers' EMAModel(use_ema_warmup=False) ("(1 + step) / (10 + step)"), as in its training examples."""

    def __init__(self, params: dict[str, Tensor], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, params: dict[str, Tensor], n: int) -> None:
        """The n-th update (n = the number of optimizer steps taken before this one)."""
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay_at(n))


def checkpoint_paths(run: Path, step: int) -> tuple[Path, Path, Path]:
    stem = run / "checkpoints" / f"step_{step:06d}"
    return stem.with_suffix(".safetensors"), stem.with_name(stem.name + "_ema.safetensors"), stem.with_suffix(".pt")


def save_checkpoint(run: Path, step: int, params: dict[str, Tensor], ema: EMA | None, optimizer, scaler,
                    config: dict) -> Path:
    """Write one training checkpoint (see the module docstring); returns the .pt path, the thing --resume takes."""
    tensors_path, ema_path, state_path = checkpoint_paths(run, step)
    meta = {"step": str(step), "config": json.dumps(config)}
    save_state({k: v.detach().float().contiguous() for k, v in params.items()}, tensors_path, metadata=meta)
    if ema is not None:
        save_state(ema.shadow, ema_path, metadata=meta)
    save_torch({"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "torch_rng": torch.get_rng_state(), "config": json.dumps(config)}, state_path)
    return state_path


def load_checkpoint(path: str | Path) -> dict:
    """The .pt state plus the tensors and EMA beside it: {step, optimizer, scaler, torch_rng, config, params, ema}."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".pt":
        raise ValueError(f"--resume wants a checkpoint .pt file (runs/<run>/checkpoints/step_NNNNNN.pt), got {path}")
    state = read_torch(path)
    if not isinstance(state, dict) or not {"step", "optimizer", "config", "torch_rng"} <= set(state):
        raise ValueError(f"cannot read checkpoint {path}: not a train.py checkpoint (no step/optimizer/config)")
    tensors_path, ema_path, _ = checkpoint_paths(path.parent.parent, state["step"])
    state["config"] = json.loads(state["config"])
    if state.get("sharded"):  # FSDP: tensors, optimizer and EMA are shards in step_N.dcp/ (controlnext/parallel.py)
        state["shards"], state["params"], state["ema"] = path.with_suffix(".dcp"), None, None
        return state
    state["params"] = read_state(tensors_path)
    state["ema"] = read_state(ema_path) if ema_path.is_file() else None
    return state


def remove_stale_temp_files(run: Path) -> list[Path]:
    """Temp files of checkpoint writes a kill interrupted: ours (.<name>.<random>.tmp), safetensors' (.tmpXXXXXX) and
    the staging folders of sharded checkpoints (.step_N.dcp.tmp/)."""
    stale = [p for p in (run / "checkpoints").glob(".*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


def save_grid(path: Path, controls: Tensor, images: Tensor, columns: int = 4) -> None:
    """PNG grid of (condition | output) pairs. controls (B, 3, H, W) in [0, 1]; images (B, 3, H, W) in [-1, 1]."""
    pairs = torch.cat([controls.float().clamp(0, 1), ((images.float() + 1) / 2).clamp(0, 1)], dim=3)  # (B, 3, H, 2W)
    B, _, H, W2 = pairs.shape
    rows = -(-B // columns)
    grid = torch.ones(3, rows * (H + 2), min(B, columns) * (W2 + 2))
    for i in range(B):
        r, c = divmod(i, columns)
        grid[:, r * (H + 2):r * (H + 2) + H, c * (W2 + 2):c * (W2 + 2) + W2] = pairs[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (shorter at the start), for a readable loss curve."""
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.concatenate([[0.0], v]))
    lo = np.maximum(np.arange(1, len(v) + 1) - window, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(v) + 1) - lo)


def save_plot(path: Path, curves: dict[str, list[tuple[int, float]]], title: str = "") -> None:
    """plot.png: the training loss (raw and a moving average) and each evaluation metric against the step."""
    names = [n for n, pts in curves.items() if pts]
    fig, axes = plt.subplots(len(names) or 1, 1, figsize=(7, 2.6 * max(1, len(names))), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        steps, values = zip(*curves[name])
        if name == "loss":
            ax.plot(steps, values, color="0.75", lw=0.8, label="per step")
            window = max(1, len(values) // 20)
            ax.plot(steps, moving_average(list(values), window), color="C0", lw=1.6, label=f"mean of {window}")
            ax.set_yscale("log")
            ax.legend(loc="upper right", fontsize=8)
        else:
            ax.plot(steps, values, color="C1", marker="o", ms=4, lw=1.4)  # markers: the evaluation steps
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    if title:
        axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
