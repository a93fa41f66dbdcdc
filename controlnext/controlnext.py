"""ControlNeXt, the method in one file: cross normalization, the injection presets, the controlled UNet, the arms.

Paper: Peng et al. 2024, ControlNeXt (arXiv 2408.06070) §3.1 (a light branch whose output is added to one UNet
hidden state) and §3.2 (cross normalization, Eq. 8-10, instead of zero convolution). Reference:
dvlab-research/ControlNeXt@ab4b3ac, the five UNet forwards cited at each preset below (../shared/reference/
controlnext.md §2 compares them). The whole method is `ControlNeXtUNet.forward_with_features`: at one site of the
UNet, h <- h + k * CN(h, c), c the branch output. `cross_normalize` is the only implementation of CN. The official
copies differ in site, eps, pool order and gain; each is a named `Injection` preset. The paper's form (normalise by
the main branch's biased statistics, learnable γ) is the same function with `paper_form=True`; the code's form
re-colours the control with the main branch's std and mean (unbiased torch.std, eps on the std), and the released
models need it. The `--ablation` arms (ABLATIONS) differ only in `Injection.form`, except the ControlNet baseline.
Interface (train.py, sample.py, controlnext/sampling.py):

    model = build_controlled_unet(ablation, unet, branch_config, injection)   # ablation in ABLATIONS
    out = model(x, t, context, control_image, y=None, scale=1.0)          # = the UNet's output (eps or v)
    out = model.forward_with_features(x, t, context, model.features(model.prepare(control_image), t), y, scale)
    params = model.control_parameters()                                   # {name: Parameter}, names in model

x is (B, C, H, W) for the SD UNet, (B, F, C, H, W) for SVDUNet (y = added_time_ids, control video (B, F, 3, H, W)).
`scale` is a float, a 0-d tensor or per sample (B, 1, 1, 1) (0 on a CFG uncond half). What sampling reuses (the
stem once per run, one control for both CFG halves) is done in controlnext/sampling.py, not here.
Left out: multi-condition training (sampling.py sums several branches at inference), the official dict outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from controlnext.control_branch import ControlNeXt, ControlNeXtConfig
from controlnext.controlnet import ControlNetUNet
from unet.sd_unet import ControlHook, control_sites


def cross_normalize(h: Tensor, c: Tensor, *, eps: float, pool_first: bool, paper_form: bool) -> Tensor:
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


FORMS = ("official", "paper", "plain", "zero_conv")  # Injection.form
SCALES = ("none", "raw", "sigmoid")  # Injection.scale


@dataclass(frozen=True)
class Injection:
    site: str = "down_0"          # hook site: UNet "conv_in", "down_{k}", "mid_in", "mid_out" (unet/sd_unet.py);
                                  # MMDiT "block_{k}", after joint block k (mmdit/mmdit.py; sd3_controlnext.py)
    form: str = "official"        # how c meets h: "official" CN (the code's), "paper" CN (Eq. 8-10, learnable γ),
                                  # "plain" (pooled, added as is), "zero_conv" (zero-init 1x1 conv, then as plain)
    eps: float = 1e-12            # added to the control's std (official); to the variance in the paper form
    pool_first: bool = True       # pool the control to h's size before (SD1.5) or after (SDXL, SVD) normalising
    gain: float = 1.0             # constant multiplier on the added term (SVD-v2: 0.2; SVD v1: 1.3 on sigmoid(scale))
    scale: str = "none"           # the branch's learned scalar in k (G1): "none", "raw" (SD1.5), "sigmoid" (SVD v1)
    control_uncond: bool = True   # official pipelines: does the CFG uncond half get the control too?

    def __post_init__(self):
        if not re.fullmatch(r"conv_in|down_\d+|mid_in|mid_out|block_\d+", self.site):
            raise ValueError(f"Injection.site must be conv_in, down_<k>, mid_in, mid_out or block_<k>, "
                             f"got {self.site!r}")
        if self.form not in FORMS:
            raise ValueError(f"Injection.form must be one of {FORMS}, got {self.form!r}")
        if self.scale not in SCALES:
            raise ValueError(f"Injection.scale must be one of {SCALES}, got {self.scale!r}")
        if not self.eps > 0:
            raise ValueError(f"Injection.eps must be > 0, got {self.eps}")


def align(h: Tensor, c: Tensor, injection: Injection) -> Tensor:
    """The control c (N, C, h', w') brought to h (N, C, h, w) as `injection.form` says, before the factor k."""
    if injection.form in ("official", "paper"):
        return cross_normalize(h, c, eps=injection.eps, pool_first=injection.pool_first,
                               paper_form=injection.form == "paper")
    return F.adaptive_avg_pool2d(c.to(h.dtype), h.shape[-2:])  # plain, zero_conv: no normalization


def run_unet(unet: nn.Module, x: Tensor, t: Tensor | float, context: Tensor, y: Tensor | None,
             control: ControlHook | None) -> Tensor:
    """The SD UNet on x (B, C, H, W), or SVDUNet on video latents (B, F, C, H, W) with y = added_time_ids."""
    if x.ndim == 5:
        return unet(x, t, context, y, num_frames=x.shape[1], control=control)
    return unet(x, t, context, y, control=control)


class ControlNeXtUNet(nn.Module):
    """A UNet (SD: UNet; video: SVDUNet) plus a ControlNeXt branch injected as `injection` says."""

    def __init__(self, unet: nn.Module, branch: ControlNeXtConfig, injection: Injection):
        super().__init__()
        sites = control_sites(unet.config)
        if injection.site not in sites:
            raise ValueError(f"Injection.site {injection.site!r} is not a site of this UNet: {list(sites)}")
        if sites[injection.site] != branch.out_channels:
            raise ValueError(f"the branch's out_channels={branch.out_channels} differ from the UNet's width "
                             f"{sites[injection.site]} at site {injection.site!r}")
        if injection.scale != "none" and not branch.learnable_scale:
            raise ValueError(f"Injection.scale={injection.scale!r} needs a branch with a learnable scale (G1 presets)")
        self.unet = unet
        self.branch = ControlNeXt(branch)
        self.injection = injection
        width = branch.out_channels
        self.zero_conv = nn.Conv2d(width, width, 1) if injection.form == "zero_conv" else None
        self.gamma = nn.Parameter(torch.ones(())) if injection.form == "paper" else None  # Eq. 10's learnable γ
        self.init_weights()

    def init_weights(self) -> None:
        """The zero conv starts at exactly 0 (so the UNet is untouched at step 0); γ starts at 1."""
        if self.zero_conv is not None:
            nn.init.zeros_(self.zero_conv.weight)
            nn.init.zeros_(self.zero_conv.bias)
        if self.gamma is not None:
            nn.init.ones_(self.gamma)

    def control_parameters(self) -> dict[str, nn.Parameter]:
        """Everything outside the UNet: the branch (official key names after `branch.`), zero conv, γ."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("unet.")}

    @property
    def control_uncond(self) -> bool:
        return self.injection.control_uncond

    def prepare(self, control_image: Tensor) -> Tensor:
        """Control image (B, 3, H, W) or video (B, F, 3, H, W) -> the branch's t-independent stem output."""
        return self.branch.stem(control_image)

    def features(self, prepared: Tensor, t: Tensor | float) -> Tensor:
        """`prepare`'s output, t (B,) -> c, the branch output (B[*F], C, h', w'); through the zero conv in that arm."""
        c = self.branch.from_stem(prepared, t)
        return c if self.zero_conv is None else self.zero_conv(c)

    def strength(self, scale: float | Tensor, frames: int = 1) -> float | Tensor:
        """k = scale * gain [* the branch's learned scale, raw or sigmoid] [* γ]; a per-sample scale (B, 1, 1, 1) is
        repeated to (B*F, 1, 1, 1) for `frames` > 1, as SVDUNet folds the frames into the batch."""
        kind, learned = self.injection.scale, self.branch.scale
        gain = self.injection.gain if kind == "none" else \
            self.injection.gain * (learned if kind == "raw" else torch.sigmoid(learned))
        k = scale * gain if self.gamma is None else scale * gain * self.gamma
        return k.repeat_interleave(frames, dim=0) if isinstance(k, Tensor) and k.ndim == 4 else k

    def forward_with_features(self, x: Tensor, t: Tensor | float, context: Tensor, features: Tensor,
                              y: Tensor | None = None, scale: float | Tensor = 1.0) -> Tensor:
        """The UNet, with h <- h + k * CN(h, c) at the injection site; c = `features`, one per row of x (per frame)."""
        k = self.strength(scale, x.shape[1] if x.ndim == 5 else 1)

        def control(site: str, h: Tensor) -> Tensor:  # the UNet calls it at every site; the method acts at one
            return h + k * align(h, features, self.injection) if site == self.injection.site else h

        return run_unet(self.unet, x, t, context, y, control)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, control_image: Tensor, y: Tensor | None = None,
                scale: float | Tensor = 1.0) -> Tensor:
        return self.forward_with_features(x, t, context, self.features(self.prepare(control_image), t), y, scale)


# --- presets: one per official variant (dvlab-research/ControlNeXt@ab4b3ac; reference controlnext.md §0, §2.3)
# ControlNeXt-SD1.5-Training/models/unet.py:1237-1244 — after down_blocks[0] (skips stored), pool, CN eps 1e-12, float scale.
SD15_TRAIN = Injection(site="down_0", eps=1e-12, pool_first=True)
# ControlNeXt-SD1.5/models/unet.py:1271-1278 — after the mid block, pool, CN eps 1e-12, k = learned `scale` (raw).
SD15_RELEASE = Injection(site="mid_out", eps=1e-12, pool_first=True, scale="raw")
# ControlNeXt-SDXL/models/unet.py:1206-1212 (= SDXL-Training unet.py:1206-1212) — after conv_in, CN eps 1e-12, then pool.
SDXL = Injection(site="conv_in", eps=1e-12, pool_first=False)
# ControlNeXt-SVD/models/unet_spatio_temporal_condition_controlnext.py:466-472 — before the mid block, CN eps 1e-5,
# pool, k = sigmoid(scale)*1.3. Its pipeline meant to leave the uncond half uncontrolled (zeroes the raw scale: 0.65).
SVD_V1 = Injection(site="mid_in", eps=1e-5, pool_first=False, gain=1.3, scale="sigmoid", control_uncond=False)
# ControlNeXt-SVD-v2/models/unet_spatio_temporal_condition_controlnext.py:457-464 — after down_blocks[0], CN eps 1e-5,
# pool, k = scale * 0.2 (the hand-tuned "control level"); the pipeline zeroes k on the CFG uncond half.
SVD_V2 = Injection(site="down_0", eps=1e-5, pool_first=False, gain=0.2, control_uncond=False)
# Not an official variant: the training form at the release's site (after the mid block), for the site ablation of
# experiments/fig3_convergence.py (issue 18).
SD15_TRAIN_MID = replace(SD15_TRAIN, site="mid_out")
# Ours (issue 19; the SD3 model was never released): after joint block 0 of the MMDiT, the official CN form on the
# image tokens (per-sample statistics over tokens x channels), eps 1e-5 as the SVD copies (1e-12 is below fp16's
# smallest subnormal, and SD3 trains in half precision), k = scale: control level 1, which the authors give for dense
# controls such as super-resolution and depth. controlnext/sd3_controlnext.py explains the choices.
SD3 = Injection(site="block_0", eps=1e-5, pool_first=True)
PRESETS = {"sd15_train": SD15_TRAIN, "sd15_release": SD15_RELEASE, "sdxl": SDXL, "svd_v1": SVD_V1, "svd_v2": SVD_V2,
           "sd15_train_mid": SD15_TRAIN_MID, "sd3": SD3}


def injection_preset(name: str, site: str = "") -> Injection:
    """The preset `name`, moved to `site` when one is given (train.py --control_site: the site ablation of issue 18)."""
    return replace(PRESETS[name], site=site) if site else PRESETS[name]


def site_width(unet_config, injection: Injection) -> int:
    """The width of h at the injection's site of a UNet of this config (the branch's out_channels), or one clear line."""
    sites = control_sites(unet_config)
    if injection.site not in sites:
        raise ValueError(f"injection site {injection.site!r} (--injection / --control_site) is not a site of this UNet: "
                         f"{list(sites)}")
    return sites[injection.site]


# --- the `--ablation` arms: what each changes in the injection preset; None = the ControlNet baseline
# (controlnext/controlnet.py), which ignores the branch config and the preset. All arms have the interface above.
ABLATIONS: dict[str, dict | None] = {
    "cross_norm": {},                              # the method, as the preset says
    "zero_conv": {"form": "zero_conv"},            # ControlNet's progressive start on ControlNeXt's branch (§3.2)
    "no_norm": {"form": "plain"},                  # a plain scaled add of the pooled control
    "paper_norm": {"form": "paper", "eps": 1e-5},  # Eq. 10, learnable γ; ε under a square root: GroupNorm's 1e-5,
                                                   # since the paper gives no value
    "controlnet": None,
}


def build_controlled_unet(ablation: str, unet: nn.Module, branch: ControlNeXtConfig,
                          injection: Injection = SD15_TRAIN) -> ControlNeXtUNet | ControlNetUNet:
    """The `--ablation` arm around `unet` (an SD UNet; the ControlNeXt arms also take an SVDUNet)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; expected one of {sorted(ABLATIONS)}")
    if ABLATIONS[ablation] is None:
        return ControlNetUNet(unet)
    return ControlNeXtUNet(unet, branch, replace(injection, **ABLATIONS[ablation]))
