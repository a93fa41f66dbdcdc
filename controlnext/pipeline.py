"""Glue from conditions to images: denoiser closure (CFG + control) -> sampler -> decode (STYLE.md §5).

CFG (Ho & Salimans 2022, Eq. 6) and control are a closure around the network, built here, so the samplers in
schedulers/samplers.py stay stateless and condition-free. The cond and uncond halves run as one doubled batch; the
control enters both halves unless the injection preset says the official pipeline left the uncond half uncontrolled
(controlnext.md §2.4). `net` is a bare UNet (`control_image` None: base model) or a controlled UNet from
controlnext/ablations.py. Nothing that is the same at every step is recomputed: the control branch's time-independent
part runs once per sampling run (`net.prepare_control`), and under CFG the control is passed once for both halves. The toy's latent codec is a fixed space-to-depth (pixel unshuffle) of the RGB image.
Left out: the SD VAE decode path and CLIP prompt encoding (issue for the SD1.5/SDXL recipes), guidance rescale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from schedulers import samplers
from schedulers.denoisers import make_denoiser
from schedulers.guidance import cfg_combine
from schedulers.sigmas import ScheduleConfig, ddim_sigmas, sampling_sigmas

# name -> (sampler function, multistep sigma layout, takes a generator)
SAMPLERS = {
    "euler": (samplers.sample_euler, False, False),
    "euler_ancestral": (samplers.sample_euler_ancestral, False, True),
    "heun": (samplers.sample_heun, False, False),
    "ddim": (samplers.sample_ddim, False, True),
    "dpmpp_2m": (samplers.sample_dpmpp_2m, True, False),
    "dpmpp_2m_sde": (samplers.sample_dpmpp_2m_sde, True, True),
    "unipc": (samplers.sample_unipc, True, False),
}


def encode_pixels(images: Tensor, factor: int) -> Tensor:
    """The toy's identity codec: space-to-depth. (B, 3, H, W) -> (B, 3 f^2, H/f, W/f)."""
    return F.pixel_unshuffle(images, factor)


def decode_pixels(latents: Tensor, factor: int) -> Tensor:
    """Depth-to-space, the inverse of encode_pixels. (B, 3 f^2, h, w) -> (B, 3, h f, w f)."""
    return F.pixel_shuffle(latents, factor)


def cfg_denoiser(net: nn.Module, schedule: ScheduleConfig, context: Tensor, uncond_context: Tensor | None,
                 guidance_scale: float, control_image: Tensor | None = None, control_scale: float = 1.0,
                 control_uncond: bool = True):
    """D(x, sigma) -> x0_hat for a DDPM-trained net, with CFG over (uncond, cond) and the control closed over."""
    guided = uncond_context is not None and guidance_scale != 1.0
    B = context.shape[0]
    # Once per sampling run: the branch's stem (and whatever else does not depend on t).
    control = None if control_image is None else net.prepare_control(control_image)

    def net_out(x_in: Tensor, t: Tensor) -> Tensor:
        if not guided:
            if control is None:
                return net(x_in, t, context)
            return net(x_in, t, context, control, scale=control_scale)
        x2, t2 = torch.cat([x_in, x_in]), torch.cat([t, t])  # (2B, ...): uncond half first
        ctx2 = torch.cat([uncond_context, context])  # (2B, L, D)
        if control is None:
            out = net(x2, t2, ctx2)
        else:
            k = torch.full((2 * B, 1, 1, 1), control_scale, device=x_in.device, dtype=x_in.dtype)
            if not control_uncond:
                k[:B] = 0.0  # the official SVD pipelines leave the uncond half uncontrolled
            out = net(x2, t2, ctx2, control, scale=k)  # one control for both halves (computed at batch B)
        uncond, cond = out.chunk(2)
        return cfg_combine(uncond, cond, guidance_scale)

    return make_denoiser(schedule, net_out)


@torch.no_grad()
def generate(denoiser, shape: tuple[int, ...], schedule: ScheduleConfig, sampler: str, steps: int,
             generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """Sample latents of `shape` from pure noise with a named sampler; the noise comes from `generator` (CPU)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    fn, multistep, stochastic = SAMPLERS[sampler]
    sigmas = ddim_sigmas(schedule, steps) if sampler == "ddim" else sampling_sigmas(schedule, steps, multistep=multistep)
    sigmas = sigmas.float().to(device)
    x = torch.randn(shape, generator=generator).to(device) * (sigmas[0] ** 2 + 1) ** 0.5  # x enters at sigmas[0]
    if stochastic:
        noise = [torch.randn(shape, generator=generator).to(device) for _ in range(len(sigmas) - 1)]
        return fn(denoiser, x, sigmas, noise=noise)
    return fn(denoiser, x, sigmas)
