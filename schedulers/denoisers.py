"""Denoisers: wrap a network F(x_in, t, **cond) as D(x, sigma, **cond) -> x0_hat (STYLE.md §5).

D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), the preconditioning of Karras et al. 2022
("Elucidating the Design Space", Sec. 5 and Table 1), with x = x0 + sigma eps. The coefficients per backbone are the
table in ../shared/reference/checkpoints.md §8:

    model                      c_skip          c_out                c_in               c_noise
    SD1.5 / SDXL (epsilon)     1               -sigma               1/sqrt(sigma^2+1)  t (DDPM index)
    SD2-768 (v-prediction)     1/(sigma^2+1)   -sigma/sqrt(s^2+1)   1/sqrt(sigma^2+1)  t
    SVD (EDM v, sigma_data 1)  1/(sigma^2+1)   -sigma/sqrt(s^2+1)   1/sqrt(sigma^2+1)  0.25 ln sigma

c_in x is exactly the DDPM sample sqrt(abar) x0 + sqrt(1-abar) eps, so the wrapped UNet sees what it was trained on.
Matches crowsonkb/k-diffusion k_diffusion/external.py (DiscreteEpsDDPMDenoiser, DiscreteVDDPMDenoiser) and the
x0 formulas of huggingface/diffusers@v0.42.1:src/diffusers/schedulers/scheduling_euler_discrete.py (step) and SGM's
VScalingWithEDMcNoise (Stability-AI/generative-models sgm/modules/diffusionmodules/denoiser_scaling.py).

`make_denoiser(schedule, net)` is the one factory: the schedule preset (schedulers/sigmas.py) says which wrapper.
Left out: learned-variance outputs, and SGM's EDM scaling with sigma_data != 1.
"""

import abc
import bisect
import math

import torch

from schedulers.sigmas import ScheduleConfig, make_alphas_cumprod, t_from_sigma


def _bcast(c: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """(B,) float64 coefficient -> (B, 1, ..., 1) in x's dtype, to broadcast over (B, C, H, W) or (B, F, C, H, W)."""
    return c if isinstance(c, float) else c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _scalar(sigma: torch.Tensor | float) -> float | None:
    """sigma as a Python float when one level serves the whole batch (what every sampler here passes), else None.
    The scalar path computes c_skip, c_out, c_in, c_noise in plain float64 arithmetic: the ~20 tiny tensor ops it
    saves cost more than the sampler step itself on a 64x64 latent (experiments/bench_samplers.py)."""
    if isinstance(sigma, (float, int)):
        return float(sigma)
    return sigma.item() if sigma.numel() == 1 else None


class DiscreteDenoiser(abc.ABC):
    """A network trained on a 1000-step DDPM schedule, called at continuous sigma via t(sigma) (log-sigma interp).
    Subclasses say what the network predicts by their `scalings` (eps, v, or x0)."""

    def __init__(self, net, alphas_cumprod: torch.Tensor, *, quantize: bool = False, linear_t: bool = False):
        self.net = net  # callable (x_in, t, **cond) -> epsilon or v
        abar = alphas_cumprod.double()
        self.sigma_table = ((1 - abar) / abar).sqrt()  # ascending in t, float64 so that t(sigma_i) == i exactly
        # quantize: round t to the nearest training step, as diffusers' DPM-Solver/UniPC do for Karras sigmas
        # (and as SGM's DiscreteDenoiser, which snaps to the nearest of the 1000 sigmas, nearly does)
        self.quantize = quantize
        # linear_t: invert sigma(t) by interpolating in sigma, not log sigma. diffusers' Euler/Heun build fractional
        # "linspace" sigmas that way and feed the raw t; the two inverses differ by < 0.003 steps at SD's schedule
        self.linear_t = linear_t
        # the same interpolation key as a Python list, for the scalar path (bisect instead of searchsorted)
        self._key = (self.sigma_table if linear_t else self.sigma_table.log()).tolist()

    @abc.abstractmethod
    def scalings(self, sigma: torch.Tensor | float) -> tuple:
        """(c_skip, c_out, c_in) for a float sigma or a (B,) float64 tensor."""

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's time input: the fractional DDPM index t(sigma). (B,) float64 -> (B,) float32"""
        t = t_from_sigma(sigma, self.sigma_table, log=not self.linear_t)
        return (t.round() if self.quantize else t).float()

    def _c_noise_scalar(self, sigma: float) -> float:
        """c_noise for one float sigma: sigmas.t_from_sigma's interpolation, done with bisect on the cached key."""
        key, value = self._key, (sigma if self.linear_t else math.log(max(sigma, 1e-10)))
        lo = min(max(bisect.bisect_right(key, value) - 1, 0), len(key) - 2)
        w = min(max((value - key[lo]) / (key[lo + 1] - key[lo]), 0.0), 1.0)
        return float(round(lo + w)) if self.quantize else lo + w

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        """x: (B, ...) noisy sample at noise level sigma (float, or (B,) tensor) -> x0_hat, same shape."""
        s = _scalar(sigma)
        if s is not None:
            c_skip, c_out, c_in = self.scalings(s)
            t = torch.full((x.shape[0],), self._c_noise_scalar(s), dtype=torch.float32, device=x.device)  # (B,)
        else:
            sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)  # (B,)
            assert sigma.shape == x.shape[:1], f"sigma {tuple(sigma.shape)} for a batch of {x.shape[0]}"
            c_skip, c_out, c_in = (_bcast(c, x) for c in self.scalings(sigma))
            t = self.c_noise(sigma)  # (B,)
        return c_skip * x + c_out * self.net(x * c_in, t, **cond)  # net output: epsilon or v


class EpsDenoiser(DiscreteDenoiser):
    """Epsilon prediction (SD1.5, SD2-base, SDXL): x0_hat = x - sigma * eps_hat."""

    def scalings(self, sigma):
        return 1.0, -sigma, 1 / (sigma**2 + 1) ** 0.5


class VDenoiser(DiscreteDenoiser):
    """Discrete v-prediction (SD2-768): x0_hat = abar^1/2 x_t - (1-abar)^1/2 v, rewritten with sigma (Salimans & Ho 2022)."""

    def scalings(self, sigma):
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in


class EDMVDenoiser:
    """SVD: EDM preconditioning with v-targets and sigma_data = 1 (SGM VScalingWithEDMcNoise), continuous sigma."""

    def __init__(self, net):
        self.net = net  # callable (x_in, c_noise, **cond) -> v

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        """x: (B, ...) noisy sample (SVD: (B, F, C, H, W)) at sigma (float, or (B,) tensor) -> x0_hat, same shape."""
        s = _scalar(sigma)
        sigma = s if s is not None else torch.as_tensor(sigma, dtype=torch.float64, device=x.device)  # float or (B,)
        # EDM Table 1 with sigma_data = 1: c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1) (sign: v, not F), c_in
        c_skip = _bcast(1 / (sigma**2 + 1), x)
        c_out = _bcast(-sigma / (sigma**2 + 1) ** 0.5, x)
        c_in = _bcast(1 / (sigma**2 + 1) ** 0.5, x)
        # c_noise = ln(sigma) / 4, fed to the sinusoid as a float, (B,)
        log_sigma = math.log(s) if s is not None else sigma.log()
        c_noise = torch.as_tensor(0.25 * log_sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        return c_skip * x + c_out * self.net(x * c_in, c_noise, **cond)


def make_denoiser(cfg: ScheduleConfig, net) -> DiscreteDenoiser | EDMVDenoiser:
    """The denoiser a schedule preset implies: EDM-v for continuous c_noise (SVD), else discrete eps or v.

    Karras sigmas on a discrete model round t, as diffusers' DPM-Solver/UniPC do (its Euler does not: pass
    EpsDenoiser(..., quantize=False) to match that one).
    """
    if cfg.continuous_c_noise:
        if cfg.prediction_type != "v_prediction":
            raise ValueError(f"continuous c_noise is implemented for v_prediction only, got {cfg.prediction_type!r}")
        return EDMVDenoiser(net)
    discrete = {"epsilon": EpsDenoiser, "v_prediction": VDenoiser}[cfg.prediction_type]
    return discrete(net, make_alphas_cumprod(cfg), quantize=cfg.use_karras_sigmas)
