"""Helpers for train.py and sample.py (STYLE.md §6): run folder and logs, per-step seeds, EMA, training checkpoints,
sample grids and the loss/IoU plot.

Checkpoints (STYLE.md §6): `checkpoints/step_NNNNNN.safetensors` holds the trainable tensors under the controlled
model's key names, `step_NNNNNN_ema.safetensors` their EMA, `step_NNNNNN.pt` the optimizer state, GradScaler state,
step, RNG states and the resolved config (checkpoint.read_torch reads it, running no pickled code). Every file is written atomically
(controlnext/checkpoint.py), the .pt last, so a .pt on disk always has its tensors beside it.
Data order is a pure function of (seed, step, micro-batch), so a resumed run draws the batches the straight run drew.
Left out: wandb (optional in STYLE, not needed here), checkpoint rotation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from controlnext.checkpoint import read_state, read_torch, save_state, save_torch


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
    """One-line logs to stdout and log.txt, metric rows to metrics.jsonl (rank 0 only: pass run=None elsewhere)."""

    def __init__(self, run: Path | None, write=print):
        self.run, self.write = run, write

    def line(self, text: str) -> None:
        if self.run is None:
            return
        self.write(text)
        with open(self.run / "log.txt", "a") as f:
            f.write(text + "\n")

    def row(self, **values) -> None:
        if self.run is not None:
            with open(self.run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(values) + "\n")

    def read_rows(self) -> list[dict]:
        path = self.run / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def rewrite_rows(self, rows: list[dict]) -> None:
        (self.run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


class EMA:
    """Exponential moving average of the trainable tensors: ema <- decay * ema + (1 - decay) * param (fp32)."""

    def __init__(self, params: dict[str, Tensor], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, Tensor]) -> None:
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)


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
    """The .pt state plus the tensors and EMA written beside it: {step, optimizer, scaler, torch_rng, config, params, ema}."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".pt":
        raise ValueError(f"--resume wants a checkpoint .pt file (runs/<run>/checkpoints/step_NNNNNN.pt), got {path}")
    state = read_torch(path)
    tensors_path, ema_path, _ = checkpoint_paths(path.parent.parent, state["step"])
    state["params"] = read_state(tensors_path)
    state["ema"] = read_state(ema_path) if ema_path.is_file() else None
    state["config"] = json.loads(state["config"])
    return state


def loss_weight_map(control: Tensor, weight: float, factor: int) -> Tensor | None:
    """Per-pixel loss weight w = 1 + (weight - 1) * [control lit], average-pooled to the latent grid, as the official
    SVD trainer does with its hand boxes (controlnext.md §4.3: 1 + 4 * 0.8 = 4.2 on hands). (B, 3, H, W) -> (B, 1, h, w)"""
    if weight == 1.0:
        return None
    mask = (control.amax(dim=1, keepdim=True) > 0.5).float()  # (B, 1, H, W)
    return torch.nn.functional.avg_pool2d(1 + (weight - 1) * mask, factor)  # (B, 1, H/f, W/f)


def save_grid(path: Path, controls: Tensor, images: Tensor, columns: int = 4) -> None:
    """PNG grid of (condition | output) pairs. controls (B, 3, H, W) in [0, 1]; images (B, 3, H, W) in [-1, 1]."""
    pairs = torch.cat([controls.float().clamp(0, 1), ((images.float() + 1) / 2).clamp(0, 1)], dim=3)  # (B, 3, H, 2W)
    B, _, H, W2 = pairs.shape
    rows = -(-B // columns)
    grid = torch.ones(3, rows * (H + 2), columns * (W2 + 2))
    for i in range(B):
        r, c = divmod(i, columns)
        grid[:, r * (H + 2):r * (H + 2) + H, c * (W2 + 2):c * (W2 + 2) + W2] = pairs[i]
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def save_plot(path: Path, curves: dict[str, list[tuple[int, float]]], size: tuple[int, int] = (640, 240)) -> None:
    """A PNG with one panel per curve (x: step; y: value, min..max), drawn with PIL (no matplotlib dependency)."""
    names = [n for n, pts in curves.items() if pts]
    W, H = size
    image = Image.new("RGB", (W, H * max(1, len(names))), "white")
    draw = ImageDraw.Draw(image)
    for k, name in enumerate(names):
        xs, ys = zip(*curves[name])
        x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(ys), max(max(ys), min(ys) + 1e-8)
        top, left, w, h = k * H + 20, 50, W - 70, H - 45
        draw.rectangle([left, top, left + w, top + h], outline="black")
        pts = [(left + w * (x - x0) / (x1 - x0), top + h * (1 - (y - y0) / (y1 - y0))) for x, y in zip(xs, ys)]
        draw.line(pts, fill="blue", width=2) if len(pts) > 1 else draw.ellipse([pts[0][0] - 2, pts[0][1] - 2,
                                                                                pts[0][0] + 2, pts[0][1] + 2], fill="blue")
        draw.text((left, top - 15), f"{name}: last {ys[-1]:.4g} (min {y0:.4g}, max {y1:.4g})", fill="black")
        draw.text((left, top + h + 3), f"step {x0} .. {x1}", fill="black")
    image.save(path)
