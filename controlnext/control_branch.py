"""The ControlNeXt control branch: a small conv network from the condition image to one feature map.

Paper: Peng et al. 2024, ControlNeXt (arXiv 2408.06070) §3.1 "lightweight convolutional network". Reference:
dvlab-research/ControlNeXt@ab4b3ac, the two generations of the module (../shared/reference/controlnext.md §1):
  G2      ControlNeXt-SD1.5-Training/models/controlnext.py ControlNeXtModel (= SDXL controlnet.py, SVD-v2
          controlnext_vid_svd.py): stem 3->64->64->128, 2 ResBlocks + downsamples, residual mid, 1x1 to 320.
  G1-SD15 ControlNeXt-SD1.5/models/controlnet.py: no stem, 3 ResBlocks + downsamples, plain mid, 1x1 to 1280,
          learnable `scale`.
  G1-SVD  ControlNeXt-SVD/models/controlnext_vid_svd.py: G2's stem (unpadded 2nd/3rd conv) + max-pool, 3 ResBlocks,
          residual mid, 1x1 to 1280, learnable `scale`.
State-dict keys equal the official releases' (`embedding.*`, `down_res.*`, `down_sample.*`, `mid_convs.*`, `scale`),
so their files load by identity. How the output enters the UNet (site, gain, normalisation) is controlnext.py's job.
Sampling reuse: the stem does not depend on t, so `forward` is `from_stem(stem(cond), t)` and the sampling code
(controlnext/sampling.py) computes `stem(cond)` once per run (the official pipelines recompute everything every step;
the outputs are identical, tests/test_controlnext.py checks it). Caching more, the first ResBlock's t-independent
half (shortcut and GN-SiLU-conv1), would save 0.8-0.9% of an SD1.5 step at batch 1 and 0.5% under CFG (measured at
256 and 512 px, experiments/README.md Table 2): not worth splitting ResBlock.
Left out: the official modules' unused constructor arguments and classes (BasicBlock, ControlProject); no zero-init
(the official branch has none: the output is re-scaled by cross normalization instead).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unet.blocks import Downsample, ResBlock, TimestepMLP, timestep_embedding


@dataclass(frozen=True)
class ControlNeXtConfig:
    in_channels: int = 3                              # condition image channels, values in [0, 1]
    time_channels: int = 128                          # sinusoid width (diffusers Timesteps(128), cos first)
    emb_dim: int = 256                                # time-MLP width fed to every ResBlock
    stem_channels: tuple[int, ...] = (64, 64, 128)    # 3x3 conv -> GN -> ReLU stem; the first conv has stride 2; () none
    stem_padding: tuple[int, ...] = (1, 1, 1)         # per stem conv; G1-SVD and the SVD-v2 inference file use (1, 0, 0)
    stem_groups: int = 2                              # GroupNorm groups in the stem (eps 1e-5, plain nn.GroupNorm)
    stem_maxpool: bool = False                        # G1-SVD: MaxPool2d(2) after the stem (total stride 32)
    res_channels: tuple[int, ...] = (128, 256)        # one ResBlock + one stride-2 conv per entry
    res_groups: tuple[int, ...] = (4, 8)              # GroupNorm groups per ResBlock (G1-SD15 starts with 1: 3 input ch)
    res_eps: float = 1e-6                             # ResBlock GroupNorm eps (diffusers ResnetBlock2D default)
    mid_residual: bool = True                         # G2/G1-SVD: x + [conv-ReLU-GN-conv-GN](x); G1-SD15: conv-ReLU-conv
    mid_groups: int = 8                               # GroupNorm groups of the residual mid (eps 1e-5)
    out_channels: int = 320                           # 1x1 output conv: UNet width at the injection site
    learnable_scale: bool = False                     # G1: a scalar `scale` parameter (init 1) in the state dict

    @property
    def stride(self) -> int:
        """Downsampling factor from the condition image to the output map."""
        return (2 if self.stem_channels else 1) * (2 if self.stem_maxpool else 1) * 2 ** len(self.res_channels)


class ControlNeXt(nn.Module):
    """Condition image (B, 3, H, W) or video (B, F, 3, H, W), t (B,) -> control features (B[*F], C_out, H/s, W/s)."""

    def __init__(self, config: ControlNeXtConfig):
        super().__init__()
        cfg = self.config = config
        assert len(cfg.stem_padding) == len(cfg.stem_channels), f"one padding per stem conv: {cfg}"
        assert len(cfg.res_groups) == len(cfg.res_channels), f"one group count per ResBlock: {cfg}"
        self.time_embedding = TimestepMLP(cfg.time_channels, cfg.emb_dim)

        # Stem: (conv, GN, ReLU) triplets, so the official keys are embedding.{0,1,3,4,6,7}.
        stem, width = [], cfg.in_channels
        for i, (out, pad) in enumerate(zip(cfg.stem_channels, cfg.stem_padding)):
            stem += [nn.Conv2d(width, out, 3, stride=2 if i == 0 else 1, padding=pad),
                     nn.GroupNorm(cfg.stem_groups, out), nn.ReLU()]
            width = out
        if cfg.stem_maxpool:
            stem.append(nn.MaxPool2d(2))
        self.embedding = nn.Sequential(*stem) if stem else None

        self.down_res = nn.ModuleList()
        self.down_sample = nn.ModuleList()
        for out, groups in zip(cfg.res_channels, cfg.res_groups):
            self.down_res.append(ResBlock(width, out, cfg.emb_dim, groups, eps=cfg.res_eps))
            self.down_sample.append(Downsample(out))
            width = out

        if cfg.mid_residual:  # keys mid_convs.0.{0,2,3,4}: the ReLU comes before the first GroupNorm
            mid = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.GroupNorm(cfg.mid_groups, width),
                                nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(cfg.mid_groups, width))
        else:  # keys mid_convs.0.{0,2}
            mid = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
        self.mid_convs = nn.ModuleList([mid, nn.Conv2d(width, cfg.out_channels, 1)])
        self.scale = nn.Parameter(torch.ones(())) if cfg.learnable_scale else None
        self.gradient_checkpointing = False  # recompute each stage's activations in backward (train.py's switch)
        self.init_weights()

    def init_weights(self) -> None:
        """PyTorch's default init everywhere, as the official modules (no zero-init); G1's `scale` starts at 1."""
        if self.scale is not None:
            nn.init.ones_(self.scale)

    def stem(self, cond: Tensor) -> Tensor:
        """Condition image (B, 3, H, W) or video (B, F, 3, H, W) -> stem output (B[*F], C, H/2, W/2), which no
        timestep changes (sampling computes it once per run); without a stem (G1-SD15) the image itself."""
        cond = cond.flatten(0, 1) if cond.ndim == 5 else cond  # (N, 3, H, W), N = B*F: features per frame
        return cond if self.embedding is None else self._run(self.embedding, cond)  # (N, 128, H/2, W/2) with a stem

    def from_stem(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Stem output (N, C, H', W') and t (B,) or a scalar -> control features (N, C_out, H/s, W/s). For video
        N = B*F: each video's t serves its F frames (the official modules repeat_interleave the embedding)."""
        t = torch.as_tensor(t, device=x.device)
        assert t.ndim == 0 or x.shape[0] % t.shape[0] == 0, f"t {tuple(t.shape)} for {x.shape[0]} stem outputs"
        t = t.expand(x.shape[0]) if t.ndim == 0 else t.repeat_interleave(x.shape[0] // t.shape[0])  # (N,)
        # The sinusoid is taken in fp32, then cast to the input dtype (as diffusers Timesteps + .to(sample.dtype)).
        emb = self.time_embedding(timestep_embedding(t, self.config.time_channels).to(x.dtype))  # (N, 256)
        for res, down in zip(self.down_res, self.down_sample):
            x = self._run(lambda x, emb, res=res, down=down: down(res(x, emb)), x, emb)  # (N, C_i, H_i/2, W_i/2)
        x = self._run(self.mid_convs[0], x) + x if self.config.mid_residual else self._run(self.mid_convs[0], x)
        return self.mid_convs[1](x)  # (N, C_out, H/s, W/s)

    def _run(self, stage, *args: Tensor) -> Tensor:
        """One stage (the stem, a ResBlock + downsample, the mid convs); under gradient checkpointing only its inputs
        are kept for backward. The branch works at the control image's resolution, where activations are largest:
        at 512 px its stages keep ~216 MiB per image for backward (experiments/README.md, "512 px")."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, *args, use_reentrant=False)
        return stage(*args)

    def forward(self, cond: Tensor, t: Tensor | float) -> Tensor:
        """Condition image (B, 3, H, W) or video (B, F, 3, H, W), t (B,) or scalar -> (B[*F], C_out, H/s, W/s)."""
        return self.from_stem(self.stem(cond), t)


# --- presets (../shared/reference/controlnext.md §1; parameter counts checked in tests/test_controlnext.py)
G2 = ControlNeXtConfig()                                                                  # 3,526,400
G1_SD15 = ControlNeXtConfig(stem_channels=(), stem_padding=(), res_channels=(128, 256, 256), res_groups=(1, 8, 8),
                            mid_residual=False, out_channels=1280, learnable_scale=True)   # 5,352,327
G1_SVD = ControlNeXtConfig(stem_padding=(1, 0, 0), stem_maxpool=True, res_channels=(128, 256, 256),
                           res_groups=(4, 8, 8), out_channels=1280, learnable_scale=True)  # 5,610,177
G2_SVD_INFER = ControlNeXtConfig(stem_padding=(1, 0, 0))  # ControlNeXt-SVD-v2/models/controlnext_vid_svd.py stem
TINY = ControlNeXtConfig(time_channels=16, emb_dim=32, stem_channels=(8, 8, 16), res_channels=(16, 32),
                         res_groups=(4, 8), out_channels=32)  # matches unet TINY's width 32 at down_0 / conv_in
# G1-SD15's structure (no stem, 3 ResBlocks, plain mid, learnable scale) at TINY's widths: the SD1.5 release form on
# small UNets (the miniature SD1.5 in experiments/fig3_convergence.py).
TINY_G1 = ControlNeXtConfig(time_channels=16, emb_dim=32, stem_channels=(), stem_padding=(), res_channels=(16, 32, 32),
                            res_groups=(1, 8, 8), mid_residual=False, out_channels=64, learnable_scale=True)
PRESETS = {"g2": G2, "g1_sd15": G1_SD15, "g1_svd": G1_SVD, "g2_svd_infer": G2_SVD_INFER, "tiny": TINY,
           "tiny_g1": TINY_G1}
SMALL = ("tiny", "tiny_g1")  # presets for small UNets: their output width follows the UNet's width at the site


def branch_for(name: str, site_width: int) -> ControlNeXtConfig:
    """Preset `name` for a UNet whose h has `site_width` channels at the injection site: the released presets as they
    are (a width mismatch is the model's error to report), the small ones with out_channels = site_width."""
    if name not in PRESETS:
        raise ValueError(f"unknown branch {name!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], out_channels=site_width) if name in SMALL else PRESETS[name]
