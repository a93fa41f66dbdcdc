"""The ControlNet baseline: a trainable copy of the UNet encoder and mid block, a hint encoder, and zero convs.

Paper: Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models" §3.2 (zero convolutions,
trainable copy) and §3.3 (the 4-layer hint encoder to 64x64). Reference: lllyasviel/ControlNet cldm/cldm.py
ControlNet; module names follow huggingface/diffusers@v0.42.1 ControlNetModel (controlnets/controlnet.py) so its
weights load by identity and the test compares the two. It reuses our UNet's DownBlock/MidBlock (unet/sd_unet.py).
The output feeds `UNet.forward(down_residuals=, mid_residual=)`, one residual per skip and one after the mid block;
`ControlNetUNet` is the `--ablation=controlnet` arm (controlnext/controlnext.py ABLATIONS).
Left out: guess mode, class embeddings, the SD2 `global_pool_conditions` option; SVD (ControlNeXt's Table 1 row is
counted in experiments/table1_params.py from the SVD UNet's encoder instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from controlnext.checkpoint import load_into
from unet.blocks import TimestepMLP, timestep_embedding
from unet.sd_unet import DownBlock, MidBlock, UNet, UNetConfig, encoder_decoder_plan

# The UNet tensors a ControlNet copies (ControlNet tool_add_control.py; diffusers ControlNetModel.from_unet).
ENCODER_PREFIXES = ("time_embedding.", "add_embedding.", "conv_in.", "down_blocks.", "mid_block.")


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig = UNetConfig()                         # the UNet whose encoder is copied
    hint_in_channels: int = 3                               # condition image channels, values in [0, 1]
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)      # hint encoder widths; a stride-2 conv between each pair


class HintEncoder(nn.Module):
    """Condition image (B, 3, H, W) -> (B, C0, H/8, W/8): convs with SiLU, then a zero conv (diffusers names)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))  # (B, C, H/2, W/2)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, hint: Tensor) -> Tensor:
        h = F.silu(self.conv_in(hint))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)  # (B, C0, H/8, W/8)


class ControlNet(nn.Module):
    """(x, t, context, hint[, y]) -> (one residual per UNet skip, in push order; the mid-block residual)."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        cfg = self.config = config
        u = cfg.unet
        self.time_embedding = TimestepMLP(u.channels[0], u.emb_dim)
        self.add_embedding = TimestepMLP(u.adm_channels, u.emb_dim) if u.adm_channels else None
        self.conv_in = nn.Conv2d(u.in_channels, u.channels[0], 3, padding=1)
        self.controlnet_cond_embedding = HintEncoder(cfg.hint_in_channels, cfg.hint_channels, u.channels[0])

        # The encoder copy, and one 1x1 zero conv per skip it pushes: conv_in, each ResBlock, each downsample.
        plan = encoder_decoder_plan(u)
        self.down_blocks = nn.ModuleList(DownBlock(u, level, width) for level, width in enumerate(plan.down))
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(w, w, 1) for w in plan.skips)
        self.mid_block = MidBlock(u)
        self.controlnet_mid_block = nn.Conv2d(u.channels[-1], u.channels[-1], 1)
        self.gradient_checkpointing = False  # recompute each block's activations in backward (the UNet's switch)
        self.init_weights()

    def init_weights(self) -> None:
        """Zero convolutions (ControlNet §3.2): every residual and the hint encoder's output start at exactly 0."""
        for conv in [*self.controlnet_down_blocks, self.controlnet_mid_block, self.controlnet_cond_embedding.conv_out]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @classmethod
    def from_unet(cls, unet: UNet, config: ControlNetConfig | None = None) -> ControlNet:
        """A ControlNet whose encoder copy starts from `unet`'s weights; zero convs and hint encoder fresh."""
        config = config or ControlNetConfig(unet=unet.config)
        assert config.unet == unet.config, "the ControlNet config must describe the UNet it copies"
        model = cls(config)
        if next(unet.parameters()).is_meta:
            return model  # a structure on the meta device (counts, FLOPs): there are no values to copy
        state = {k: v for k, v in unet.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
        return load_into(model, state, what="ControlNet encoder copied from the UNet", mode="partial")

    def _run(self, block: nn.Module, *args):
        # Gradient checkpointing, as UNetBody._run applies it to the UNet's blocks (diffusers' ControlNetModel too).
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, hint: Tensor, y: Tensor | None = None,
                scale: float | Tensor = 1.0) -> tuple[list[Tensor], Tensor]:
        u = self.config.unet
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # (B,)
        emb = self.time_embedding(timestep_embedding(t, u.channels[0]).to(x.dtype))  # (B, 4*C0), as UNet.time_emb
        if self.add_embedding is not None:
            if y is None:
                raise ValueError(f"this ControlNet needs the vector condition y of width {u.adm_channels}")
            emb = emb + self.add_embedding(y.to(x.dtype))
        h = self.conv_in(x) + self.controlnet_cond_embedding(hint.to(x.dtype))  # (B, C0, H, W): hint enters here
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = self._run(block, h, emb, context)  # (B, C_k, H/2^(k+1), W/2^(k+1)) but the last level
            skips += block_skips
        h = self._run(self.mid_block, h, emb, context)  # (B, C_last, h, w)
        down = [scale * zero(s) for zero, s in zip(self.controlnet_down_blocks, skips)]
        return down, scale * self.controlnet_mid_block(h)


class ControlNetUNet(nn.Module):
    """The ControlNet baseline around a UNet: the encoder copy's zero-conv residuals enter the UNet's skips and mid.
    It has the interface of controlnext.ControlNeXtUNet (prepare, features, forward_with_features, forward), but its
    "features" are the control image itself: the encoder copy depends on x, so nothing can be computed ahead."""

    control_uncond = True  # diffusers' ControlNet pipelines control both CFG halves (guess mode aside)

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet
        self.controlnet = ControlNet.from_unet(unet)

    def control_parameters(self) -> dict[str, nn.Parameter]:
        """The ControlNet (encoder copy, hint encoder, zero convs) under `controlnet.`."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("unet.")}

    def prepare(self, control_image: Tensor) -> Tensor:
        return control_image

    def features(self, prepared: Tensor, t: Tensor | float) -> Tensor:
        return prepared

    def forward_with_features(self, x: Tensor, t: Tensor | float, context: Tensor, features: Tensor,
                              y: Tensor | None = None, scale: float | Tensor = 1.0) -> Tensor:
        down, mid = self.controlnet(x, t, context, features, y, scale)  # `features`: the control image (B, 3, H, W)
        return self.unet(x, t, context, y, down_residuals=down, mid_residual=mid)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, control_image: Tensor, y: Tensor | None = None,
                scale: float | Tensor = 1.0) -> Tensor:
        return self.forward_with_features(x, t, context, control_image, y, scale)
