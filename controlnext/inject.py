"""Cross normalization and injection of control features into the UNet (ControlNeXt's ~9 core lines).

Paper: Peng et al. 2024, ControlNeXt (arXiv 2408.06070) §3.2, Eq. 8-10. Reference: dvlab-research/ControlNeXt@ab4b3ac,
the five UNet forwards cited at each preset below; ../shared/reference/controlnext.md §2 compares them.
`cross_normalize` is the only implementation. The official copies differ in site, eps, pool order and gain; each
is a named `Injection` preset. The paper's form (normalise by the main branch's biased statistics, learnable γ)
is the same function with `paper_form=True`; the code's form re-colours the control with the main branch's
std and mean (unbiased torch.std, eps on the std), and the released models need it.
Left out: classifier-free-guidance batching (pipeline.py decides per sample; `Injection.control_uncond` says what
the official pipeline did) and the learnable parameters (γ, zero conv), which live in controlnext/ablations.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from unet.sd_unet import ControlHook


def cross_normalize(h: Tensor, c: Tensor, *, eps: float, pool_first: bool, paper_form: bool = False) -> Tensor:
    """Control c (N, C, h', w') aligned to the main branch h (N, C, h, w): returns (N, C, h, w), to be added as h + k*c.

    Official form: c~ = (c - mean_c) * std_h / (std_c + eps) + mean_h, per-sample stats over (C, H, W), unbiased std.
    Paper form (Eq. 8-10, without γ): c~ = (c - mean_h) / sqrt(var_h + eps), var_h biased.
    `pool_first`: adaptive-average-pool c to h's size before taking its statistics, else after normalising.
    """
    c = c.to(h.dtype)  # the SD1.5 / SDXL copies cast; SVD relies on autocast
    if pool_first:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])  # (N, C, h, w)
    dims = (1, 2, 3)
    mean_h = h.mean(dim=dims, keepdim=True)  # (N, 1, 1, 1)
    if paper_form:
        var_h = h.var(dim=dims, unbiased=False, keepdim=True)  # Eq. 8: 1/n variance of the main branch
        c = (c - mean_h) / torch.sqrt(var_h + eps)  # Eq. 9-10, γ applied by the caller
    else:
        std_h = h.std(dim=dims, keepdim=True)  # torch.std default: unbiased (n-1)
        mean_c, std_c = c.mean(dim=dims, keepdim=True), c.std(dim=dims, keepdim=True)
        c = (c - mean_c) * (std_h / (std_c + eps)) + mean_h  # own stats out, main-branch stats in
    if not pool_first:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])  # (N, C, h, w); an identity when the sizes already agree
    return c


@dataclass(frozen=True)
class Injection:
    site: str = "down_0"          # UNet hook site: "conv_in", "down_{k}", "mid_in" or "mid_out" (unet/sd_unet.py)
    eps: float = 1e-12            # added to the control's std (official); to the variance in the paper form
    pool_first: bool = True       # pool the control to h's size before (SD1.5) or after (SDXL, SVD) normalising
    gain: float = 1.0             # constant multiplier on the added term (SVD-v2: 0.2; SVD v1: 1.3 on sigmoid(scale))
    learned_scale: bool = False   # multiply by the branch's `scale` parameter (G1 releases)
    sigmoid_scale: bool = False   # ... as sigmoid(scale) (SVD v1) instead of raw (SD1.5 release)
    normalize: bool = True        # cross normalization; False: plain scaled add of the pooled control (ablations)
    paper_form: bool = False      # Eq. 8-10 (main-branch biased stats, learnable γ) instead of the code's form
    zero_conv: bool = False       # zero-initialised 1x1 conv on the control, no normalization (zero_conv ablation)
    control_uncond: bool = True   # official pipelines: does the CFG uncond half get the control too?


def branch_gain(injection: Injection, scale_param: Tensor | None) -> Tensor | float:
    """The constant part of k: gain, times the branch's learned `scale` (raw or sigmoid) where the variant uses it."""
    if not injection.learned_scale:
        return injection.gain
    assert scale_param is not None, "this injection preset needs a control branch with a learnable `scale` (G1)"
    return injection.gain * (torch.sigmoid(scale_param) if injection.sigmoid_scale else scale_param)


def window_scale(scale: float | Tensor, progress: float, start: float = 0.0, end: float = 1.0) -> float | Tensor:
    """The control scale at `progress` (fraction of the sampling trajectory done, 0 -> 1); 0 outside [start, end]."""
    return scale if start <= progress <= end else 0.0


def inject(h: Tensor, controls: Sequence[Tensor], scales: Sequence[float | Tensor], injection: Injection) -> Tensor:
    """h + sum_i k_i * CN(h, c_i): several branches (multi-condition), each normalised and scaled on its own.

    k_i is a float, a 0-d tensor, or (N, 1, 1, 1) per sample (e.g. 0 on the CFG uncond half).
    """
    assert len(controls) == len(scales), f"one scale per control: {len(controls)} vs {len(scales)}"
    out = h  # every control is normalised against the same, uncontrolled h
    for c, k in zip(controls, scales):
        if isinstance(k, float) and k == 0.0:
            continue  # outside the window, or switched off: exactly the uncontrolled UNet
        if injection.normalize:
            c = cross_normalize(h, c, eps=injection.eps, pool_first=injection.pool_first,
                                paper_form=injection.paper_form)  # (N, C, h, w)
        else:
            c = F.adaptive_avg_pool2d(c.to(h.dtype), h.shape[-2:])  # (N, C, h, w)
        out = out + k * c
    return out


def control_hook(controls: Sequence[Tensor], scales: Sequence[float | Tensor], injection: Injection) -> ControlHook:
    """The UNet `control` hook: inject at `injection.site`, pass every other site through."""
    return lambda site, h: inject(h, controls, scales, injection) if site == injection.site else h


# --- presets: one per official variant (dvlab-research/ControlNeXt@ab4b3ac; reference controlnext.md §0, §2.3)
# ControlNeXt-SD1.5-Training/models/unet.py:1237-1244 — after down_blocks[0] (skips stored), pool, CN eps 1e-12, float scale.
SD15_TRAIN = Injection(site="down_0", eps=1e-12, pool_first=True)
# ControlNeXt-SD1.5/models/unet.py:1271-1278 — after the mid block, pool, CN eps 1e-12, k = learned `scale` (raw).
SD15_RELEASE = Injection(site="mid_out", eps=1e-12, pool_first=True, learned_scale=True)
# ControlNeXt-SDXL/models/unet.py:1206-1212 (= SDXL-Training unet.py:1206-1212) — after conv_in, CN eps 1e-12, then pool.
SDXL = Injection(site="conv_in", eps=1e-12, pool_first=False)
# ControlNeXt-SVD/models/unet_spatio_temporal_condition_controlnext.py:466-472 — before the mid block, CN eps 1e-5,
# pool, k = sigmoid(scale)*1.3. Its pipeline meant to leave the uncond half uncontrolled (zeroes the raw scale: 0.65).
SVD_V1 = Injection(site="mid_in", eps=1e-5, pool_first=False, gain=1.3, learned_scale=True, sigmoid_scale=True,
                   control_uncond=False)
# ControlNeXt-SVD-v2/models/unet_spatio_temporal_condition_controlnext.py:457-464 — after down_blocks[0], CN eps 1e-5,
# pool, k = scale * 0.2 (the hand-tuned "control level"); the pipeline zeroes k on the CFG uncond half.
SVD_V2 = Injection(site="down_0", eps=1e-5, pool_first=False, gain=0.2, control_uncond=False)
PRESETS = {"sd15_train": SD15_TRAIN, "sd15_release": SD15_RELEASE, "sdxl": SDXL, "svd_v1": SVD_V1, "svd_v2": SVD_V2}
