"""Control-fidelity metrics for fill50k: fill IoU and colour error (../shared/reference/fill50k.md, last section).

No project ships one, so this is ours, defined in fill50k.md: label each generated pixel by whichever of the prompt's
two colours it is nearer to (Euclidean RGB), take the circle-colour pixels as the predicted disc and compute its IoU
with the condition's filled disc; add the mean colour error inside and outside the disc (mean absolute difference per
RGB channel, images in [0, 1], against the circle and background colour respectively). `palette_error` (ours) scores
a prompt-only model, which places its circle freely: the mean distance of each pixel to the nearer prompt colour.
Convergence = the first step where the held-out IoU reaches a threshold (0.5, 0.8).
Left out: perceptual metrics (FID/CLIP score), which need downloaded networks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rgb(colors: Tensor | list, like: Tensor) -> Tensor:
    """(B, 3) colours in 0..255 -> (B, 3, 1, 1) in [0, 1]."""
    return (torch.as_tensor(colors, dtype=torch.float32, device=like.device) / 255).reshape(-1, 3, 1, 1)


def predicted_disc(images: Tensor, circle_rgb: Tensor | list, background_rgb: Tensor | list) -> Tensor:
    """Pixels nearer the circle colour than the background colour. images (B, 3, H, W) in [0, 1] -> (B, H, W) bool."""
    to_circle = (images - _rgb(circle_rgb, images)).square().sum(1)  # (B, H, W) squared RGB distance
    to_background = (images - _rgb(background_rgb, images)).square().sum(1)
    return to_circle < to_background


def fill_iou(images: Tensor, discs: Tensor, circle_rgb: Tensor | list, background_rgb: Tensor | list) -> Tensor:
    """IoU of the predicted disc with the condition's disc (B, H, W) bool. -> (B,); 1.0 where both are empty."""
    pred = predicted_disc(images, circle_rgb, background_rgb)
    inter = (pred & discs).flatten(1).sum(1).float()
    union = (pred | discs).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def color_error(images: Tensor, discs: Tensor, circle_rgb: Tensor | list, background_rgb: Tensor | list
                ) -> tuple[Tensor, Tensor]:
    """Mean |image - colour| per channel inside the disc (vs the circle colour) and outside (vs the background). -> 2x (B,)"""
    inside, outside = discs[:, None].float(), (~discs)[:, None].float()  # (B, 1, H, W)
    err_in = (images - _rgb(circle_rgb, images)).abs() * inside
    err_out = (images - _rgb(background_rgb, images)).abs() * outside
    n_in = (inside.flatten(1).sum(1) * 3).clamp(min=1)
    n_out = (outside.flatten(1).sum(1) * 3).clamp(min=1)
    return err_in.flatten(1).sum(1) / n_in, err_out.flatten(1).sum(1) / n_out


def palette_error(images: Tensor, circle_rgb: Tensor | list, background_rgb: Tensor | list) -> Tensor:
    """Mean over pixels of the RMS-per-channel distance to the nearer prompt colour (0 = only prompt colours). -> (B,)"""
    to_circle = (images - _rgb(circle_rgb, images)).square().mean(1)  # (B, H, W)
    to_background = (images - _rgb(background_rgb, images)).square().mean(1)
    return torch.minimum(to_circle, to_background).sqrt().flatten(1).mean(1)


def fill50k_metrics(images: Tensor, discs: Tensor, circle_rgb: Tensor | list, background_rgb: Tensor | list
                    ) -> dict[str, float]:
    """Batch means of every metric. images (B, 3, H, W) in [-1, 1] (the model's range); discs (B, H, W) bool."""
    images = ((images.float() + 1) / 2).clamp(0, 1)
    err_in, err_out = color_error(images, discs, circle_rgb, background_rgb)
    pred = predicted_disc(images, circle_rgb, background_rgb)
    return {"iou": fill_iou(images, discs, circle_rgb, background_rgb).mean().item(),
            "color_error_in": err_in.mean().item(), "color_error_out": err_out.mean().item(),
            "palette_error": palette_error(images, circle_rgb, background_rgb).mean().item(),
            "circle_fraction": pred.float().mean().item()}
