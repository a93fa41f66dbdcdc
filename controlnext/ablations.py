"""The values of `--ablation`: one controlled UNet per arm, all with the same interface.

Paper: Peng et al. 2024, ControlNeXt (arXiv 2408.06070) §3.2 (cross normalization vs zero convolution) and §4
(comparison with ControlNet). Interface used by train.py / sample.py / pipeline.py:

    model = build_controlled_unet(ablation, unet, branch, injection=SD15_TRAIN)   # ablation in ABLATIONS
    eps_or_v = model(x, t, context, control_image, y=None, scale=1.0)            # same output as unet(...)
    params = model.control_parameters()                                         # {name: Parameter}, names in model
    unet_params = select_trainable(model.unet, "to_out")                         # controlnext/selection.py

`scale` is a float, a 0-d tensor or a per-sample (B, 1, 1, 1) tensor (0 on a CFG uncond half; `window_scale` in
inject.py limits it to part of the trajectory). Arms: `cross_norm` the method (an official injection preset);
`zero_conv` the same branch through a zero-initialised 1x1 conv, added without normalization (ControlNet's
progressive start on ControlNeXt's branch); `no_norm` a plain scaled add; `paper_norm` Eq. 10 with a learnable γ;
`controlnet` the baseline (controlnext/controlnet.py), which ignores the branch config and injection preset.
Left out: multi-condition training (inject.inject takes several controls at sampling time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from controlnext.control_branch import ControlNeXt, ControlNeXtConfig
from controlnext.controlnet import ControlNet
from controlnext.inject import SD15_TRAIN, Injection, branch_gain, control_hook
from unet.sd_unet import UNet


class ControlNeXtUNet(nn.Module):
    """A UNet (SD: UNet; video: SVDUNet, with y = added_time_ids) plus a ControlNeXt branch injected as `injection` says."""

    def __init__(self, unet: nn.Module, branch: ControlNeXtConfig, injection: Injection):
        super().__init__()
        self.unet = unet
        self.branch = ControlNeXt(branch)
        self.injection = injection
        width = branch.out_channels
        self.zero_conv = nn.Conv2d(width, width, 1) if injection.zero_conv else None  # zero_conv ablation
        self.gamma = nn.Parameter(torch.ones(())) if injection.paper_form else None  # Eq. 10's learnable γ
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

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, control_image: Tensor, y: Tensor | None = None,
                scale: float | Tensor = 1.0) -> Tensor:
        c = self.branch(control_image, t)  # (B, C, H/8, W/8)
        if self.zero_conv is not None:
            c = self.zero_conv(c)
        k = scale * branch_gain(self.injection, self.branch.scale)
        if self.gamma is not None:
            k = k * self.gamma
        if control_image.ndim == 5:  # video (B, F, 3, H, W) for SVDUNet, which folds frames into the batch
            frames = control_image.shape[1]
            k = k.repeat_interleave(frames, dim=0) if isinstance(k, Tensor) and k.ndim == 4 else k  # (B*F, 1, 1, 1)
            return self.unet(x, t, context, y, num_frames=frames, control=control_hook([c], [k], self.injection))
        return self.unet(x, t, context, y, control=control_hook([c], [k], self.injection))


class ControlNetUNet(nn.Module):
    """The ControlNet baseline: a trainable encoder copy whose zero-conv residuals enter the UNet's skips and mid."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet
        self.controlnet = ControlNet.from_unet(unet)

    def control_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if not name.startswith("unet.")}

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, control_image: Tensor, y: Tensor | None = None,
                scale: float | Tensor = 1.0) -> Tensor:
        down, mid = self.controlnet(x, t, context, control_image, y, scale)
        return self.unet(x, t, context, y, down_residuals=down, mid_residual=mid)


ControlledUNet = ControlNeXtUNet | ControlNetUNet

# name -> builder(unet, branch config, injection preset). The ControlNeXt arms differ only in Injection fields.
ABLATIONS: dict[str, Callable[[UNet, ControlNeXtConfig, Injection], ControlledUNet]] = {
    "cross_norm": lambda unet, branch, inj: ControlNeXtUNet(unet, branch, inj),
    "zero_conv": lambda unet, branch, inj: ControlNeXtUNet(unet, branch, replace(inj, normalize=False, zero_conv=True)),
    "no_norm": lambda unet, branch, inj: ControlNeXtUNet(unet, branch, replace(inj, normalize=False)),
    "paper_norm": lambda unet, branch, inj: ControlNeXtUNet(unet, branch, replace(inj, paper_form=True, eps=1e-5)),  # ε in
    # the square root of a variance: GroupNorm's 1e-5, since the paper gives no value
    "controlnet": lambda unet, branch, inj: ControlNetUNet(unet),
}


def build_controlled_unet(ablation: str, unet: UNet, branch: ControlNeXtConfig,
                          injection: Injection = SD15_TRAIN) -> ControlledUNet:
    """The model for one `--ablation` value; `unet` is wrapped, not copied."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; expected one of {sorted(ABLATIONS)}")
    return ABLATIONS[ablation](unet, branch, injection)
