"""The values of `--ablation`: one controlled UNet per arm, all with the same interface.

Paper: Peng et al. 2024, ControlNeXt (arXiv 2408.06070) §3.2 (cross normalization vs zero convolution) and §4
(comparison with ControlNet). Interface used by train.py / sample.py / pipeline.py:

    model = build_controlled_unet(ablation, unet, branch, injection=SD15_TRAIN)   # ablation in ABLATIONS
    eps_or_v = model(x, t, context, control_image, y=None, scale=1.0)            # same output as unet(...)
    prepared = model.prepare_control(control_image)   # sampling: once per run; pass it as control_image each step
    params = model.control_parameters()                                         # {name: Parameter}, names in model
    unet_params = select_trainable(model.unet, "to_out")                         # controlnext/selection.py

`scale` is a float, a 0-d tensor or a per-sample (B, 1, 1, 1) tensor (0 on a CFG uncond half; `window_scale` in
inject.py limits it to part of the trajectory). Arms: `cross_norm` the method (an official injection preset);
`zero_conv` the same branch through a zero-initialised 1x1 conv, added without normalization (ControlNet's
progressive start on ControlNeXt's branch); `no_norm` a plain scaled add; `paper_norm` Eq. 10 with a learnable γ;
`controlnet` the baseline (controlnext/controlnet.py), which ignores the branch config and injection preset.
Sampling reuse (ControlNeXt arms): `prepare_control` runs the branch's time-independent part once per run, and a
control batch of B for an x batch of n*B (CFG: uncond and cond halves, `torch.cat` order) runs the branch once on
the B conditions and tiles the features n times; t must then be equal across the n copies. Outputs are unchanged.
Left out: multi-condition training (inject.inject takes several controls at sampling time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from controlnext.control_branch import ControlNeXt, ControlNeXtConfig, PreparedControl
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

    def prepare_control(self, control_image: Tensor) -> PreparedControl:
        """The branch's time-independent tensors, to pass as `control_image` at every step of one sampling run."""
        return self.branch.prepare(control_image)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, control_image: Tensor | PreparedControl,
                y: Tensor | None = None, scale: float | Tensor = 1.0) -> Tensor:
        pre = control_image if isinstance(control_image, PreparedControl) else self.branch.prepare(control_image)
        copies = x.shape[0] // pre.batch  # CFG: one control for the n = 2 halves of the doubled batch
        assert copies * pre.batch == x.shape[0], f"x batch {x.shape[0]} is not a multiple of the control's {pre.batch}"
        t_control = torch.as_tensor(t, device=x.device)
        if copies > 1 and t_control.ndim == 1:
            assert (t_control.view(copies, pre.batch) == t_control[:pre.batch]).all(), \
                "a control shared by the copies of the batch needs the same t in each copy"
            t_control = t_control[:pre.batch]  # (B,)
        c = self.branch(pre, t_control)  # (B[*F], C, H/8, W/8), once for all copies
        if self.zero_conv is not None:
            c = self.zero_conv(c)
        if copies > 1:
            c = c.repeat(copies, 1, 1, 1)  # (n*B[*F], C, H/8, W/8), the batch order of torch.cat([image] * n)
        k = scale * branch_gain(self.injection, self.branch.scale)
        if self.gamma is not None:
            k = k * self.gamma
        if pre.video:  # (B, F, 3, H, W) for SVDUNet, which folds frames into the batch
            k = k.repeat_interleave(pre.frames, dim=0) if isinstance(k, Tensor) and k.ndim == 4 else k  # (B*F, 1, 1, 1)
            return self.unet(x, t, context, y, num_frames=pre.frames, control=control_hook([c], [k], self.injection))
        return self.unet(x, t, context, y, control=control_hook([c], [k], self.injection))


class ControlNetUNet(nn.Module):
    """The ControlNet baseline: a trainable encoder copy whose zero-conv residuals enter the UNet's skips and mid."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet
        self.controlnet = ControlNet.from_unet(unet)

    def control_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if not name.startswith("unet.")}

    def prepare_control(self, control_image: Tensor) -> Tensor:
        """The interface of ControlNeXtUNet's; ControlNet's hint encoder is recomputed per step, as in diffusers."""
        return control_image

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, control_image: Tensor, y: Tensor | None = None,
                scale: float | Tensor = 1.0) -> Tensor:
        if control_image.shape[0] != x.shape[0]:  # passed once for a CFG batch: the encoder copy sees each half's
            control_image = control_image.repeat(x.shape[0] // control_image.shape[0], 1, 1, 1)  # prompt, no sharing
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
