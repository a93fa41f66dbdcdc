"""Sliding windows over frames: denoise a video longer than the model's frame count window by window, then merge.

ControlNeXt-SVD (arXiv 2408.06070, §4; the v1 and v2 releases) samples long pose videos with overlapping windows of
`window` frames (v2: 24 with overlap 6; v1: 14 with overlap 4), every denoising step (controlnext.md §5 "Long
videos"; dvlab-research/ControlNeXt@ab4b3ac: ControlNeXt-SVD-v2/pipeline/pipeline_stable_video_diffusion_controlnext.py,
the loop over `ind_start_idx`):
  - window starts 0, window - overlap, 2 (window - overlap), ... while below num_frames - overlap; a window that
    would run past the end is moved back to num_frames - window (only the last one can be);
  - v2 replaces each window's first control frame by frame 0 of the sequence, the reference pose (window_control);
  - each window takes one Euler step; window 0 contributes all its frames, every later window all but its first
    (its control was the reference pose); each frame is the mean of its contributions (official_weights).
blend_weights is the smooth alternative: linear ramps across each overlap, weights summing to 1 at every frame.
merge_windows is the weighted mean either way. Merging the windows' Euler steps equals one Euler step from the
merged denoiser outputs (the step is affine in x0_hat with the same x and sigmas, and the weights sum to 1), so a
sampler can merge D(x) per step: apply_windows.
Left out: windows over batch elements of different lengths (every sequence in a batch has num_frames frames).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def window_starts(num_frames: int, window: int, overlap: int) -> list[int]:
    """The official window starts (module docstring). Needs 1 <= window <= num_frames and 0 <= overlap < window."""
    if not 1 <= window <= num_frames or not 0 <= overlap < window:
        raise ValueError(f"sliding windows need 1 <= window <= num_frames and 0 <= overlap < window; got "
                         f"num_frames={num_frames}, window={window}, overlap={overlap}")
    starts = list(range(0, num_frames - overlap, window - overlap))
    return [min(s, num_frames - window) for s in starts]  # the last window ends at num_frames


def window_control(control: Tensor, start: int, window: int) -> Tensor:
    """v2: the control of one window (B, window, ...) with its first frame replaced by frame 0 (the reference pose)."""
    part = control[:, start:start + window].clone()  # (B, window, C, H, W)
    part[:, 0] = control[:, 0]
    return part


def official_weights(starts: Sequence[int], window: int) -> Tensor:
    """(N, window) weights of the official rule: window 0 all ones; later windows 0 at their first frame, else 1."""
    weights = torch.ones(len(starts), window)
    weights[1:, 0] = 0
    return weights


def blend_weights(starts: Sequence[int], window: int, *, drop_first: bool) -> Tensor:
    """(N, window) weights that ramp linearly across every overlap and sum to 1 at each frame.

    drop_first: later windows' first frame carries the reference pose (v2, window_control) and gets weight 0; the
    ramps then run over the rest of the overlap. Two overlapping windows cross-fade exactly, weight (k + 1) / (n + 1)
    on the k-th of n shared frames for the later one; where three windows overlap (a clamped last window can reach
    back that far) the ramps are renormalised per frame.
    """
    n = len(starts)
    first = [1 if drop_first and k > 0 else 0 for k in range(n)]  # first frame each window contributes
    weights = torch.ones(n, window, dtype=torch.float64)
    for k in range(n):
        weights[k, :first[k]] = 0
    frames = torch.arange(window, dtype=torch.float64)
    for k in range(n):
        if k > 0:  # ramp up over the frames the previous window also contributes
            shared = starts[k - 1] + window - (starts[k] + first[k])
            if shared > 0:
                up = (frames - first[k] + 1) / (shared + 1)
                weights[k] *= torch.where((frames >= first[k]) & (frames < first[k] + shared), up, 1.0)
        if k < n - 1:  # ramp down over the frames the next window also contributes
            begin = starts[k + 1] + first[k + 1] - starts[k]  # local index of the next window's first contribution
            shared = window - begin
            if shared > 0:
                down = 1 - (frames - begin + 1) / (shared + 1)
                weights[k] *= torch.where(frames >= begin, down, 1.0)
    total = torch.zeros(starts[-1] + window, dtype=torch.float64)
    for k, s in enumerate(starts):
        total[s:s + window] += weights[k]
    if (total == 0).any():
        raise ValueError(f"frames {torch.nonzero(total == 0).flatten().tolist()} get no window: drop_first needs "
                         f"overlap >= 1")
    for k, s in enumerate(starts):
        weights[k] /= total[s:s + window]  # exact cross-fades stay as they are; triple overlaps sum to 1
    return weights.float()


def merge_windows(outputs: Sequence[Tensor], starts: Sequence[int], weights: Tensor) -> Tensor:
    """Weighted mean of per-window outputs, each (B, window, ...), into (B, starts[-1] + window, ...)."""
    window = weights.shape[1]
    if len(outputs) != len(starts) or weights.shape[0] != len(starts):
        raise ValueError(f"{len(outputs)} outputs, {len(starts)} starts and {weights.shape[0]} weight rows differ")
    if any(o.shape[1] != window or o.shape != outputs[0].shape for o in outputs):
        raise ValueError(f"every output must be (B, {window}, ...) with one shape, got "
                         f"{sorted({tuple(o.shape) for o in outputs})}")
    first = outputs[0]
    num_frames = starts[-1] + window
    total = first.new_zeros((first.shape[0], num_frames) + first.shape[2:])  # (B, F, ...)
    norm = torch.zeros(num_frames, dtype=weights.dtype, device=weights.device)
    view = (1, window) + (1,) * (first.ndim - 2)  # per-frame weights broadcast over batch and features
    for out, s, w in zip(outputs, starts, weights):
        total[:, s:s + window] += w.to(out).view(view) * out
        norm[s:s + window] += w
    if (norm == 0).any():
        raise ValueError(f"frames {torch.nonzero(norm == 0).flatten().tolist()} have zero total weight "
                         f"(the official rule needs overlap >= 1)")
    return total / norm.to(first).view((1, num_frames) + (1,) * (first.ndim - 2))


def apply_windows(fn: Callable[[Tensor, int], Tensor], x: Tensor, starts: Sequence[int], weights: Tensor) -> Tensor:
    """Run fn(x[:, s:s + window], s) per window on x (B, F, ...) and merge the results (e.g. a windowed denoiser)."""
    window = weights.shape[1]
    if starts[-1] + window != x.shape[1]:
        raise ValueError(f"windows cover {starts[-1] + window} frames, x has {x.shape[1]}")
    return merge_windows([fn(x[:, s:s + window], s) for s in starts], starts, weights)
