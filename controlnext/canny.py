"""Canny edges (Canny 1986) for the canny control images of ControlNet/ControlNeXt, without OpenCV.

Paper: J. Canny, "A Computational Approach to Edge Detection", IEEE TPAMI 8(6), 1986: Gaussian smoothing, gradient,
non-maximum suppression (NMS) along the gradient direction, double threshold, hysteresis.
Reference: dvlab-research/ControlNeXt@ab4b3ac:ControlNeXt-SDXL/utils/preprocess.py `canny_extractor` (RGB ->
cv2 gray, thresholds from the median, `cv2.Canny(gray, low, high)`; ../shared/reference/controlnext.md §5), which
runs opencv/opencv@00367cf:modules/imgproc/src/canny.cpp. `canny()` with its defaults equals that call pixel for
pixel, and `canny_control()` equals the whole official extractor (tests/test_canny.py checks both against cv2 5.0.0).
The interpolated NMS option follows scikit-image/scikit-image@3e0a06b:skimage/feature/_canny_cy.pyx.

Conventions (and where they equal OpenCV's):
- intensities: thresholds always refer to the 0..255 scale: uint8 images as they are, float images in [0, 1] times 255.
  RGB -> gray is OpenCV's 8-bit fixed point Y = (9798 R + 19235 G + 3735 B + 2^14) >> 15 (cv2.COLOR_RGB2GRAY);
  float RGB uses 0.299/0.587/0.114 without rounding.
- blur: `sigma` > 0 smooths with a Gaussian truncated at radius int(4 sigma + 0.5) (scipy/scikit-image), the kernel
  renormalised over the pixels inside the image at the border. sigma = 0 (the default) does not blur: cv2.Canny does
  not either, and every canny annotator of the ControlNet family calls it on the raw gray image.
- gradient: the unnormalised 3x3 Sobel pair with replicated border pixels (OpenCV's BORDER_REPLICATE; for a 3x3
  kernel this equals scipy's "reflect"); magnitude |gx| + |gy| (OpenCV's default, L2gradient=False) or, with
  `l2_gradient`, sqrt(gx^2 + gy^2) (OpenCV's L2gradient=True, scikit-image).
- NMS: 4-direction quantised by default, with OpenCV's fixed-point sector bounds tan(22.5 deg) ~ 13573/2^15 and
  tan(67.5 deg) ~ 79109/2^15 and its tie rule (a pixel beats its neighbour behind, the left/upper one, strictly and
  the one ahead or equal; diagonal sectors strictly on both sides), so that a step edge gives a one-pixel line and
  the official control images are reproduced exactly. `interpolate=True` instead compares with the magnitude
  linearly interpolated where the gradient line leaves the 3x3 neighbourhood (scikit-image's scheme): no bias towards
  the four directions on curved edges, at the cost of not matching cv2. Magnitudes outside the image count as 0, so
  border pixels can be edges (OpenCV; scikit-image never marks the one-pixel frame).
- thresholds: an NMS survivor is a candidate when its magnitude > low and strong when > high (OpenCV's strict
  comparisons); the edges are the 8-connected components of candidates that contain a strong pixel.
Left out: OpenCV's Sobel apertures 5 and 7, masks, colour (per-channel maximum) gradients.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

GRAY_WEIGHTS_FIXED = (9798, 19235, 3735)  # OpenCV 4.x/5.x 8-bit RGB2GRAY: RY15, GY15, BY15 (sum 2^15), shift 15
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, the same weights unrounded (float images)
TAN22_FIXED, TAN67_FIXED = 13573, 79109  # OpenCV canny.cpp: round(tan(22.5 deg) 2^15), that + 2^16
MEDIAN_SIGMA = 0.33  # official SDXL extractor: thresholds (1 -/+ 0.33) * median of the gray image


def to_gray(image: np.ndarray | Tensor) -> Tensor:
    """(H, W) or (H, W, 3) RGB, uint8 or float in [0, 1] -> (H, W) float64 gray on the 0..255 scale."""
    x = image if isinstance(image, Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[-1] == 3)) or min(x.shape[:2]) < 1:
        raise ValueError(f"canny: image must be (H, W) or (H, W, 3) RGB, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.ndim == 2:
            return x.double()
        weights = torch.tensor(GRAY_WEIGHTS_FIXED, dtype=torch.int32, device=x.device)
        return ((x.int() * weights).sum(-1) + (1 << 14) >> 15).double()  # (H, W), rounded as cv2 does
    if not x.is_floating_point():
        raise ValueError(f"canny: image dtype must be uint8 or floating point in [0, 1], got {x.dtype}")
    x = x.double()
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"canny: a float image must lie in [0, 1], got [{x.min().item():.3g}, {x.max().item():.3g}]")
    if x.ndim == 3:
        x = x @ torch.tensor(GRAY_WEIGHTS, dtype=torch.float64, device=x.device)  # (H, W)
    return 255.0 * x


def gaussian_blur(gray: Tensor, sigma: float) -> Tensor:
    """(H, W) -> (H, W): separable Gaussian, radius int(4 sigma + 0.5), renormalised inside the image."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=gray.dtype, device=gray.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()  # (2r+1,)

    def inside(n: int) -> Tensor:
        """Kernel mass inside the image at each of n positions: the blur of an all-ones line."""
        return F.conv1d(gray.new_ones(1, 1, n), kernel.view(1, 1, -1), padding=radius)[0, 0]  # (n,)

    x = gray[None, None]  # (1, 1, H, W)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius))  # along W, zeros outside
    x = F.conv2d(x, kernel.view(1, 1, -1, 1), padding=(radius, 0))[0, 0]  # along H -> (H, W)
    # The blur of an all-ones image is separable too: dividing by it renormalises the kernel at the border.
    return x / (inside(gray.shape[0])[:, None] * inside(gray.shape[1])[None, :])


def sobel(gray: Tensor) -> tuple[Tensor, Tensor]:
    """(H, W) -> gx, gy (H, W): 3x3 Sobel, x to the right and y down, border pixels replicated."""
    p = F.pad(gray[None], (1, 1, 1, 1), mode="replicate")[0]  # (H+2, W+2)
    smooth_rows = p[:-2] + 2 * p[1:-1] + p[2:]  # (H, W+2): [1 2 1] down the rows
    smooth_cols = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # (H+2, W): [1 2 1] along the columns
    return smooth_rows[:, 2:] - smooth_rows[:, :-2], smooth_cols[2:] - smooth_cols[:-2]


def suppress_non_maxima(magnitude: Tensor, gx: Tensor, gy: Tensor, low: float, interpolate: bool) -> Tensor:
    """(H, W) bool: pixels with magnitude > low that are a maximum along the gradient (NMS; ties as documented).

    NMS is evaluated at the pixels above `low` only, on flat indices into the zero-padded magnitude.
    """
    H, W = magnitude.shape
    padded = F.pad(magnitude, (1, 1, 1, 1)).flatten()  # ((H+2)(W+2),): zero magnitude outside the image
    pixels = (magnitude > low).flatten().nonzero()[:, 0]  # (N,) flat indices into the image
    centre = (pixels // W + 1) * (W + 2) + pixels % W + 1  # (N,) the same pixels in the padded image
    m, x, y = padded.take(centre), gx.take(pixels), gy.take(pixels)  # (N,) each

    def at(dy: Tensor, dx: Tensor) -> Tensor:
        """Magnitude of the neighbour at the per-pixel offset (dy, dx), each in {-1, 0, 1}."""
        return padded.take(centre + dy * (W + 2) + dx)  # (N,)

    ax, ay = x.abs(), y.abs()
    if interpolate:
        # Step one pixel along the dominant axis, oriented so that step is +1; the gradient line leaves the 3x3
        # neighbourhood between the axis neighbour and the diagonal one, at fraction w = minor / major.
        x_major = ax >= ay
        flip = torch.where(x_major, x < 0, y < 0)
        x, y = torch.where(flip, -x, x), torch.where(flip, -y, y)
        w = torch.where(x_major, ay / ax, ax / ay)  # finite: m > low >= 0 means the major component is nonzero
        axis_dy, axis_dx = (~x_major).long(), x_major.long()
        diag_dy = torch.where(x_major, y.sign().long(), 1)
        diag_dx = torch.where(x_major, 1, x.sign().long())
        ahead = (1 - w) * at(axis_dy, axis_dx) + w * at(diag_dy, diag_dx)
        behind = (1 - w) * at(-axis_dy, -axis_dx) + w * at(-diag_dy, -diag_dx)
        keep = (m > behind) & (m >= ahead)
    else:
        # OpenCV's sectors: |gy|/|gx| < tan 22.5 -> compare left/right, > tan 67.5 -> up/down, else a diagonal.
        horizontal = ay * 32768 < ax * TAN22_FIXED
        vertical = ~horizontal & (ay * 32768 > ax * TAN67_FIXED)
        diagonal = ~horizontal & ~vertical
        step_dy = (~horizontal).long()  # ahead is right (horizontal), down (vertical), down-left or down-right
        step_dx = torch.where(horizontal, 1, torch.where(vertical, 0, torch.where((x < 0) != (y < 0), -1, 1)))
        ahead, behind = at(step_dy, step_dx), at(-step_dy, -step_dx)
        keep = (m > behind) & torch.where(diagonal, m > ahead, m >= ahead)
    out = torch.zeros(H * W, dtype=torch.bool, device=magnitude.device)
    out[pixels[keep]] = True
    return out.view(H, W)


def hysteresis(candidates: Tensor, strong: Tensor) -> Tensor:
    """(H, W) bool: the 8-connected components of `candidates` that contain a pixel of `strong`.

    Components by minimum-label propagation over neighbouring candidates, with pointer jumping (label <-
    label[label]) after each step: a few dozen passes over the candidates, not one per pixel of chain length.
    """
    H, W = candidates.shape
    device = candidates.device
    pixels = candidates.flatten().nonzero()[:, 0]  # (N,) flat indices of the candidates
    number = torch.arange(len(pixels), device=device)
    index = torch.full((H * W,), -1, dtype=torch.long, device=device)
    index[pixels] = number  # pixel -> candidate number, -1 elsewhere
    row, col = pixels // W, pixels % W
    neighbours = []
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        inside = (row + dy >= 0) & (row + dy < H) & (col + dx >= 0) & (col + dx < W)
        other = torch.where(inside, index.take((pixels + dy * W + dx).clamp(0, H * W - 1)), -1)
        neighbours.append(torch.where(other >= 0, other, number))  # no candidate there: the pixel itself
    label = number
    while True:
        new = label
        for other in neighbours:  # smallest label among the 3x3 candidates (take: a fast flat gather)
            new = torch.minimum(new, label.take(other))
        new = new.take(new)  # jump: adopt the label of the candidate whose label was adopted
        if torch.equal(new, label):
            break
        label = new
    seeded = torch.zeros(len(pixels), dtype=torch.bool, device=device)
    seeded[label[strong.flatten().take(pixels)]] = True  # the components (by root label) holding a strong pixel
    out = torch.zeros(H * W, dtype=torch.bool, device=device)
    out[pixels[seeded[label]]] = True
    return out.view(H, W)


def canny(image: np.ndarray | Tensor, low: float, high: float, *, sigma: float = 0.0, l2_gradient: bool = False,
          interpolate: bool = False) -> Tensor:
    """Canny edges of an (H, W) or (H, W, 3) uint8 / [0, 1] float image -> (H, W) bool (conventions above).

    The defaults are cv2.Canny(gray, low, high) for low <= high (cv2 would swap them; here that is an error): no
    blur, L1 magnitude, OpenCV's quantised NMS and ties.
    """
    if not 0 <= low <= high:
        raise ValueError(f"canny: thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    if sigma < 0:
        raise ValueError(f"canny: sigma must be >= 0, got {sigma}")
    return _canny_gray(to_gray(image), low, high, sigma, l2_gradient, interpolate)


def _canny_gray(gray: Tensor, low: float, high: float, sigma: float, l2_gradient: bool, interpolate: bool) -> Tensor:
    """The five steps on a (H, W) float64 gray image on the 0..255 scale -> (H, W) bool."""
    if sigma > 0:
        gray = gaussian_blur(gray, sigma)
    gx, gy = sobel(gray)
    magnitude = torch.sqrt(gx * gx + gy * gy) if l2_gradient else gx.abs() + gy.abs()
    return hysteresis(suppress_non_maxima(magnitude, gx, gy, low, interpolate), magnitude > high)


def auto_thresholds(gray: np.ndarray | Tensor) -> tuple[int, int]:
    """The official SDXL extractor's thresholds: (int(max(0, 0.67 m)), int(min(255, 1.33 m))), m = median(gray).

    The median is numpy's (the mean of the two middle values for an even count) and the products are spelled as
    the official code does, (1.0 -/+ 0.33) * m, so the integer truncation lands on the same values.
    """
    values = gray.detach().cpu().double().numpy() if isinstance(gray, Tensor) else np.asarray(gray, dtype=np.float64)
    if values.size == 0:
        raise ValueError("auto_thresholds: empty image")
    median = float(np.median(values))
    return int(max(0, (1.0 - MEDIAN_SIGMA) * median)), int(min(255, (1.0 + MEDIAN_SIGMA) * median))


def edges_to_control(edges: Tensor) -> Tensor:
    """(H, W) bool edges -> (3, H, W) float32 control image in [0, 1]: white edges on black, in all three channels
    (the official `Image.fromarray(edges).convert("RGB")`, then the pipelines' [0, 1] scaling)."""
    if edges.ndim != 2:
        raise ValueError(f"edges_to_control: edges must be (H, W), got shape {tuple(edges.shape)}")
    return edges.float()[None].expand(3, -1, -1).contiguous()  # (3, H, W)


def canny_control(image: np.ndarray | Tensor, low: float | None = None, high: float | None = None) -> Tensor:
    """RGB or gray image -> (3, H, W) canny control in [0, 1]. Without thresholds this is the official ControlNeXt
    SDXL extractor: gray (cv2's rounding), `auto_thresholds`, cv2.Canny's defaults."""
    if (low is None) != (high is None):
        raise ValueError("canny_control: give both thresholds (low, high) or neither (the official median rule)")
    gray = to_gray(image)
    if low is None:
        low, high = auto_thresholds(gray)
    elif not 0 <= low <= high:
        raise ValueError(f"canny_control: thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    return edges_to_control(_canny_gray(gray, low, high, 0.0, False, False))
