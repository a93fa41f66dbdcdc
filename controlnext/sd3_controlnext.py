"""ControlNeXt on Stable Diffusion 3, designed here (the authors' SD3 model was never released), and the ControlNet
baseline in its SD3 form, both with the interface of controlnext/controlnext.py's models.

Paper: Peng et al. 2024, ControlNeXt (arXiv 2408.06070) §3.1 (a lightweight branch added to one hidden state of the
frozen backbone) and §3.2 (cross normalization), carried to the MMDiT of Esser et al. 2024 (arXiv 2403.03206, Fig. 2).
Reference: the method as dvlab-research/ControlNeXt@ab4b3ac implements it for the UNets (controlnext.py cites each
copy); the official ControlNeXt-SD3 folder holds a README only ("trained with protected and private data and code").

Design (ours). Where the UNet branches add to a feature map, the MMDiT has a sequence of image tokens: token n of an
(H/16) x (W/16) grid (VAE stride 8 x patch 2) in row-major order, 1536 channels at SD3-medium. So:
1. The branch is controlnext/control_branch.py's conv network, unchanged (G2 at full size: 3.5M parameters). It maps
   the condition image (B, 3, H, W) in [0, 1] to (B, C_b, H/s, W/s) with s = 8, the latent grid.
2. Patchify to the token grid with a p x p, stride-p convolution from C_b to the MMDiT width (`patch_embed`,
   p = 16 / s = 2: 2.0M parameters at SD3-medium). A p x p stride-p conv IS pixel-unshuffle by p followed by one
   linear layer on the C_b p^2 channels of each token (the same weights, reshaped): we take the conv because it is
   exactly how the MMDiT makes its own image tokens (mmdit.py PatchEmbed, and the SD3 ControlNet's
   `pos_embed_input`), so a control token covers the same 16 x 16 pixels as the image token it is added to. It gets
   no position table: it is added to a stream that already carries one.
3. After joint block k (Injection.site "block_{k}"; the `sd3` preset: block 0, the earliest site the hook offers, as
   SDXL's conv_in and SD1.5's down_0 are early), the tokens are viewed as the grid (B, C, H/16, W/16) and
   h <- h + k * CN(h, c) with controlnext.align, the very function the UNet models use: official CN form, per-sample
   statistics over tokens x channels (= over (C, H, W) of the grid), unbiased std, eps 1e-5; k = scale * gain with
   gain 1 (control level 1, the authors' advice for dense controls such as super-resolution and depth).
The `--ablation` arms are ABLATIONS' changes of the injection form: cross_norm (the method), no_norm (plain add),
paper_norm (Eq. 10, learnable γ) and zero_conv. In the zero_conv arm the patch embedding itself starts at zero: it is
the last linear map into the stream, as the SD3 ControlNet's zero-initialised `pos_embed_input` is, so the arm adds
no layer and every arm has the same parameter count (the UNet arm adds a 1x1 zero conv behind its branch instead).
The ControlNet arm is controlnext/sd3_controlnet.py (a trainable copy of the first depth/2 joint blocks, zero-init
linear outputs) fed the VAE latent of the condition image, as diffusers' SD3 ControlNet pipeline feeds it.
Left out: multi-control sums and injection at several blocks.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from controlnext.control_branch import ControlNeXt, ControlNeXtConfig
from controlnext.controlnext import ABLATIONS, SD3 as SD3_INJECTION, ControlNeXtUNet, Injection, align
from controlnext.sd3_controlnet import SD3ControlNet, residual_hook
from mmdit.mmdit import MMDiT
from vae.autoencoder import AutoencoderKL


def mmdit_sites(mmdit: MMDiT) -> list[str]:
    """The MMDiT's hook sites (after each joint block), in call order."""
    return [f"block_{k}" for k in range(mmdit.config.depth)]


class ControlNeXtMMDiT(nn.Module):
    """An MMDiT plus a ControlNeXt branch whose patchified output is cross-normalized into the image tokens."""

    def __init__(self, mmdit: MMDiT, branch: ControlNeXtConfig, injection: Injection, latent_stride: int = 8):
        super().__init__()
        if injection.site not in mmdit_sites(mmdit):
            raise ValueError(f"Injection.site {injection.site!r} is not a site of this MMDiT: block_0 .. "
                             f"block_{mmdit.config.depth - 1}")
        if injection.scale != "none" and not branch.learnable_scale:
            raise ValueError(f"Injection.scale={injection.scale!r} needs a branch with a learnable scale (G1 presets)")
        pixels_per_token = latent_stride * mmdit.config.patch_size  # 16 for SD3
        if pixels_per_token % branch.stride:
            raise ValueError(f"the branch's stride {branch.stride} does not divide the {pixels_per_token} pixels of an "
                             "image token")
        self.mmdit = mmdit
        self.branch = ControlNeXt(branch)
        self.injection = injection
        patch = pixels_per_token // branch.stride
        self.patch_embed = nn.Conv2d(branch.out_channels, mmdit.config.hidden, patch, stride=patch)
        self.gamma = nn.Parameter(torch.ones(())) if injection.form == "paper" else None  # Eq. 10's learnable γ
        self.init_weights()

    def init_weights(self) -> None:
        """zero_conv arm: the patch embedding starts at exactly 0 (so the MMDiT is untouched at step 0); γ at 1.
        Otherwise PyTorch's default init, as the official branches (cross normalization rescales the output)."""
        if self.injection.form == "zero_conv":
            nn.init.zeros_(self.patch_embed.weight)
            nn.init.zeros_(self.patch_embed.bias)
        if self.gamma is not None:
            nn.init.ones_(self.gamma)

    def control_parameters(self) -> dict[str, nn.Parameter]:
        """Everything outside the MMDiT: the branch (official key names after `branch.`), patch_embed, γ."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("mmdit.")}

    @property
    def control_uncond(self) -> bool:
        return self.injection.control_uncond

    # k = scale * gain [* the branch's learned scale] [* γ]: the UNet model's formula, one implementation for both
    strength = ControlNeXtUNet.strength

    def prepare(self, control_image: Tensor) -> Tensor:
        """Condition image (B, 3, H, W) in [0, 1] -> the branch's t-independent stem output (once per sampling run)."""
        return self.branch.stem(control_image)

    def features(self, prepared: Tensor, t: Tensor | float) -> Tensor:
        """`prepare`'s output, t (B,) -> c on the token grid (B, C, H/16, W/16), C the MMDiT width."""
        return self.patch_embed(self.branch.from_stem(prepared, t))  # (B, C_b, H/8, W/8) -> (B, C, H/16, W/16)

    def forward_with_features(self, x: Tensor, t: Tensor | float, context: Tensor, features: Tensor, y: Tensor,
                              scale: float | Tensor = 1.0) -> Tensor:
        """The MMDiT, with h <- h + k * CN(h, c) on the image tokens after the injection block; c = `features`."""
        k = self.strength(scale)  # float, 0-d, or per sample (B, 1, 1, 1)
        p = self.mmdit.config.patch_size
        rows, cols = x.shape[-2] // p, x.shape[-1] // p

        def control(site: str, h: Tensor) -> Tensor:  # the MMDiT calls it after every block; the method acts at one
            if site != self.injection.site:
                return h
            grid = h.transpose(1, 2).unflatten(2, (rows, cols))  # (B, C, H/16, W/16): tokens are row-major patches
            grid = grid + k * align(grid, features, self.injection)  # h + k CN(h, c), statistics over tokens x C
            return grid.flatten(2).transpose(1, 2)  # (B, N, C)

        return self.mmdit(x, t, context, y, control=control)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, control_image: Tensor, y: Tensor,
                scale: float | Tensor = 1.0) -> Tensor:
        return self.forward_with_features(x, t, context, self.features(self.prepare(control_image), t), y, scale)


class ControlNetMMDiT(nn.Module):
    """The ControlNet baseline around an MMDiT: a copy of its first N joint blocks, fed the VAE latent of the condition
    image, adds zero-initialised residuals to the image tokens (controlnext/sd3_controlnet.py)."""

    control_uncond = True  # diffusers' SD3 ControlNet pipeline controls both CFG halves

    def __init__(self, mmdit: MMDiT, vae: AutoencoderKL, num_layers: int):
        super().__init__()
        self.mmdit, self.vae = mmdit, vae  # the frozen VAE encodes the condition (prepare)
        self.controlnet = SD3ControlNet.from_mmdit(mmdit, num_layers)

    def control_parameters(self) -> dict[str, nn.Parameter]:
        """The ControlNet (embedder copies, block copies, zero layers) under `controlnet.`."""
        return {name: p for name, p in self.named_parameters() if name.startswith("controlnet.")}

    @torch.no_grad()
    def prepare(self, control_image: Tensor) -> Tensor:
        """Condition (B, 3, H, W) in [0, 1] -> its latent (B, 16, H/8, W/8): latent_scale (mean - latent_shift) of the
        posterior (diffusers' pipeline samples it; the mean keeps a condition one tensor, and the VAE is frozen)."""
        c = self.vae.config
        return c.latent_scale * (self.vae.encode(control_image * 2 - 1).mean - c.latent_shift)

    def features(self, prepared: Tensor, t: Tensor | float) -> Tensor:
        return prepared  # the block copies depend on x: nothing more can be computed ahead

    def forward_with_features(self, x: Tensor, t: Tensor | float, context: Tensor, features: Tensor, y: Tensor,
                              scale: float | Tensor = 1.0) -> Tensor:
        scale = scale.flatten()[:, None, None] if isinstance(scale, Tensor) and scale.ndim else scale  # (B, 1, 1)
        residuals = self.controlnet(x, t, context, y, features, scale)  # N x (B, N_tokens, C)
        return self.mmdit(x, t, context, y, control=residual_hook(residuals, self.mmdit.config.depth))

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, control_image: Tensor, y: Tensor,
                scale: float | Tensor = 1.0) -> Tensor:
        return self.forward_with_features(x, t, context, self.prepare(control_image), y, scale)


def build_sd3_controlled(ablation: str, mmdit: MMDiT, vae: AutoencoderKL, branch: ControlNeXtConfig,
                         injection: Injection = SD3_INJECTION) -> ControlNeXtMMDiT | ControlNetMMDiT:
    """The `--ablation` arm around `mmdit` (ABLATIONS of controlnext.py; "controlnet" copies depth/2 blocks)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; expected one of {sorted(ABLATIONS)}")
    if ABLATIONS[ablation] is None:
        return ControlNetMMDiT(mmdit, vae, max(1, mmdit.config.depth // 2))
    return ControlNeXtMMDiT(mmdit, branch, replace(injection, **ABLATIONS[ablation]), vae.config.downscale)
