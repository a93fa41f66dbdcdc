"""Sampling glue: conditions -> denoiser closure (CFG + control) -> sampler (STYLE.md §5).

CFG (Ho & Salimans 2022, Eq. 6) and control are a closure around the network, built here, so the samplers in
schedulers/samplers.py stay stateless and condition-free. The uncond and cond halves run as one doubled batch, uncond
first (torch.cat order); `y` (SDXL's vector, SVD's added_time_ids) goes to each half as given. Nothing that is the
same at every step is recomputed: each branch's stem runs once per sampling run (`model.prepare`), and under CFG the
branch runs once at batch B and its features are tiled over both halves (the official pipelines duplicate the
condition image and run the whole branch at 2B every step; the outputs agree, tests/test_controlnext.py). The control
enters both halves unless the preset says the official pipeline left the uncond half uncontrolled (`control_uncond`,
../shared/reference/controlnext.md §2.4). Several ControlNeXt controls on one UNet are summed at their sites, each
normalised against the same uncontrolled h (no official release does this; diffusers' MultiControlNet likewise sums
its residuals).
Left out: the SD VAE decode path and CLIP prompt encoding (issue for the SD1.5/SDXL recipes), guidance rescale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from controlnext.controlnext import ControlNeXtUNet, align, run_unet
from schedulers import samplers
from schedulers.denoisers import DiscreteDenoiser, EDMVDenoiser, make_denoiser
from schedulers.guidance import cfg_combine
from schedulers.sigmas import ScheduleConfig, ddim_sigmas, sampling_sigmas
from unet.sd_unet import ControlHook

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

# (a controlled model around the sampled UNet, its control image (B, 3, H, W) or video (B, F, 3, H, W), its scale)
Control = tuple[nn.Module, Tensor, float]


def summed_controls(controls: Sequence[tuple[ControlNeXtUNet, Tensor, float | Tensor]], frames: int) -> ControlHook:
    """The UNet hook for several ControlNeXt branches: at each site h + sum_i k_i * CN_i(h, c_i), every term taken
    against the same uncontrolled h (the one-branch case is ControlNeXtUNet.forward_with_features)."""
    terms = [(model.injection, c, model.strength(scale, frames)) for model, c, scale in controls]

    def hook(site: str, h: Tensor) -> Tensor:
        out = h
        for injection, c, k in terms:
            if injection.site == site:
                out = out + k * align(h, c, injection)
        return out

    return hook


def cfg_denoiser(unet: nn.Module, schedule: ScheduleConfig, context: Tensor, uncond_context: Tensor | None,
                 guidance_scale: float | Tensor, controls: Sequence[Control] = (), *, y: Tensor | None = None,
                 uncond_y: Tensor | None = None) -> DiscreteDenoiser | EDMVDenoiser:
    """D(x, sigma) -> x0_hat for `unet` (SD UNet or SVDUNet) with CFG over (uncond, cond) and the controls closed over.

    `controls`: (model, image, scale) per control, each model a controlled UNet around this `unet`
    (controlnext.build_controlled_unet); several at once must be ControlNeXt models. `uncond_y`: the vector condition
    of the uncond half (SDXL's negative pooled embedding); None = `y` for both halves (SVD's added_time_ids).
    """
    for i, (model, _, _) in enumerate(controls):
        if model.unet is not unet:
            raise ValueError(f"controls[{i}] is a controlled model around another UNet than the one sampled")
    if len(controls) > 1 and not all(isinstance(model, ControlNeXtUNet) for model, _, _ in controls):
        raise ValueError("several controls at once are summed at their sites: ControlNeXt models only")
    guided = uncond_context is not None and (isinstance(guidance_scale, Tensor) or guidance_scale != 1.0)
    B = context.shape[0]
    ctx = torch.cat([uncond_context, context]) if guided else context  # (2B, L, D): uncond half first
    vec = y if y is None or not guided else torch.cat([y if uncond_y is None else uncond_y, y])  # (2B, adm)
    # Once per sampling run: each branch's stem (everything that does not depend on t).
    prepared = [(model, model.prepare(image), scale) for model, image, scale in controls]

    def net_out(x_in: Tensor, t: Tensor) -> Tensor:
        x, t2 = (torch.cat([x_in, x_in]), torch.cat([t, t])) if guided else (x_in, t)  # (2B, ...) under CFG
        active = []
        for model, stem, scale in prepared:
            c = model.features(stem, t)  # (B[*F], C, h, w): once for both halves, whose t is the same
            if guided:
                c = torch.cat([c, c])  # (2B[*F], C, h, w): tiled in torch.cat order, as x and the context
                if not model.control_uncond:  # the official SVD pipelines leave the uncond half uncontrolled
                    scale = torch.tensor([0.0] * B + [scale] * B, dtype=x.dtype, device=x.device).view(2 * B, 1, 1, 1)
            active.append((model, c, scale))
        if not active:
            out = run_unet(unet, x, t2, ctx, vec, None)
        elif len(active) == 1:
            model, c, scale = active[0]
            out = model.forward_with_features(x, t2, ctx, c, vec, scale)
        else:
            out = run_unet(unet, x, t2, ctx, vec, summed_controls(active, x.shape[1] if x.ndim == 5 else 1))
        return cfg_combine(*out.chunk(2), guidance_scale) if guided else out  # uncond, cond

    return make_denoiser(schedule, net_out)


def sigmas_for(schedule: ScheduleConfig, sampler: str, steps: int) -> Tensor:
    """The n+1 noise levels a named sampler walks (float64, descending; DDIM stops at sigma(t=0))."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    multistep = SAMPLERS[sampler][1]
    return ddim_sigmas(schedule, steps) if sampler == "ddim" else sampling_sigmas(schedule, steps, multistep=multistep)


def windowed(controlled, plain, sigmas: Tensor, start: float, end: float):
    """D with the controls on only over the fraction [start, end] of the trajectory (step i of n sits at i/n, at
    sigma_i): `controlled` where sigma_hi >= sigma >= sigma_lo, else the plain (uncontrolled) denoiser."""
    n, levels = len(sigmas) - 1, sigmas.float()  # float32, the levels generate() hands the samplers
    hi, lo = levels[math.ceil(start * n)].item(), levels[math.floor(end * n)].item()
    return lambda x, sigma: (controlled if lo <= float(sigma) <= hi else plain)(x, sigma)


@torch.no_grad()
def generate(denoiser, shape: tuple[int, ...], schedule: ScheduleConfig, sampler: str, steps: int,
             generator: torch.Generator, device: torch.device | str = "cpu", noise: Tensor | None = None) -> Tensor:
    """Sample latents of `shape` from pure noise with a named sampler; the noise comes from `generator` (CPU), or is
    `noise` (unit variance: the `latents` a diffusers pipeline takes, before its init_noise_sigma). Returns the DDPM
    variable x / sqrt(sigma^2 + 1) at the last level, which is what the VAE decodes (x itself when that level is 0;
    DDIM stops at sigma(t=0), as SD ships it, and diffusers decodes that x_t)."""
    fn, _, stochastic = SAMPLERS[sampler] if sampler in SAMPLERS else (None, None, None)
    sigmas = sigmas_for(schedule, sampler, steps).float().to(device)
    noise = torch.randn(shape, generator=generator) if noise is None else noise
    x = noise.to(device) * (sigmas[0] ** 2 + 1) ** 0.5  # x enters at sigmas[0]
    if stochastic:
        step_noise = [torch.randn(shape, generator=generator).to(device) for _ in range(len(sigmas) - 1)]
        x = fn(denoiser, x, sigmas, noise=step_noise)
    else:
        x = fn(denoiser, x, sigmas)
    return x / (sigmas[-1].item() ** 2 + 1) ** 0.5
