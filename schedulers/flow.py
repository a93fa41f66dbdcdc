"""Rectified flow (SD3): the shifted sigma schedule, the denoiser D(x, sigma) of a velocity network, training noise.

Rectified flow (Liu et al. 2022, "Flow Straight and Fast"; Esser et al. 2024, "Scaling Rectified Flow Transformers",
§2 and §3.1): x_sigma = (1 - sigma) x0 + sigma eps on a straight path from data (sigma = 0) to noise (sigma = 1), and the
network predicts the velocity v = dx/dsigma = eps - x0 at timestep t = 1000 sigma. Since x = x0 + sigma v,
    x0_hat = x - sigma v_hat,
which is the denoiser interface every sampler here takes (schedulers/samplers.py, STYLE.md §5). With it the
existing first-order and Heun samplers ARE the flow samplers, with no change: samplers.sample_euler's step
x0_hat + (sigma'/sigma)(x - x0_hat) equals x + (sigma' - sigma) v_hat, the flow Euler step (diffusers'
FlowMatchEulerDiscreteScheduler.step), and samplers.sample_heun's slope (x - x0_hat)/sigma is v_hat, so it is
Heun on dx/dsigma = v (FlowMatchHeunDiscreteScheduler, 2n - 1 calls, plain Euler into sigma = 0). Sampling starts
from pure noise: x = eps at sigmas[0] = 1 (no sqrt(sigma^2 + 1) factor, unlike the VE samplers' DDPM models).
The VE multistep solvers (DPM-Solver++, UniPC) assume x = x0 + sigma eps and do not apply to this path. CFG is a
closure over D as for every model (guidance.cfg_combine): it is affine, so guiding x0_hat equals guiding v.

Schedule (Esser et al. 2024 §5.3.2, resolution-dependent shifting): sigma' = shift sigma / (1 + (shift - 1) sigma), shift 3.0 for SD3 at
1024 px. The n sampling levels are, as in Stability-AI/sd3.5@8df03ab3:sd3_impls.py (ModelSamplingDiscreteFlow,
sd3_infer.py get_sigmas) and huggingface/diffusers@v0.42.1:src/diffusers/schedulers/
scheduling_flow_match_euler_discrete.py (set_timesteps): timesteps linear from 1000 sigma_max to 1000 sigma_min,
where sigma_max/min are the ends of the shifted 1000-entry training table (1 and shift(1/1000)), each then mapped
through the shift -- so the last level before 0 is shift(shift(1/1000)) (0.0089 at shift 3), a quirk both keep.

Training (§3.1, logit-normal sampling; §5.1 picks it): sigma = shift(u) with u logit-normal (mean 0, std 1: "rf/lognorm(0.00, 1.00)", the
paper's best), target v = eps - x0, unweighted MSE (SD3's default weighting "none"). The shift in training is what
diffusers' SD3 trainers do (u indexes the shift-3 scheduler table); shift = 1 is the paper's plain logit-normal.
Left out: resolution-dependent dynamic shifting (SD3.5/Flux `mu`), stochastic flow sampling, Karras/beta sigmas for
flow, and diffusers' `precondition_outputs` trainer option (an x0 loss, i.e. weight sigma^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlowConfig:
    num_train_timesteps: int = 1000  # timestep t = num_train_timesteps * sigma (the network's time input)
    shift: float = 3.0  # Esser et al. 2024 §5.3.2 shift alpha; SD3/SD3.5 scheduler_config.json "shift": 3.0


SD3 = FlowConfig()
PRESETS = {"sd3": SD3}


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """sigma' = shift sigma / (1 + (shift - 1) sigma): more time at high noise for shift > 1 (§5.3.2).
    Equivalently logit(sigma') = logit(sigma) + ln(shift)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_sigmas(cfg: FlowConfig, steps: int) -> torch.Tensor:
    """n + 1 descending sampling levels, the last 0 (float64), as sd3_impls.py and diffusers set_timesteps build them."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    T = cfg.num_train_timesteps
    # the ends of the shifted training table sigma(i / T), i = 1..T, in float32 as diffusers builds it
    sigma_min = float(shift_sigma(torch.tensor(1 / T, dtype=torch.float32), cfg.shift))
    sigma_max = float(shift_sigma(torch.tensor(1.0, dtype=torch.float32), cfg.shift))
    t = torch.linspace(T * sigma_max, T * sigma_min, steps, dtype=torch.float64)  # timesteps, linear
    sigmas = shift_sigma(t / T, cfg.shift)  # each mapped through the shift again (module docstring)
    return torch.cat([sigmas.float().double(), sigmas.new_zeros(1)])  # float32 levels as diffusers, then 0


class FlowDenoiser:
    """Wrap a velocity network F(x, t, **cond) -> v as D(x, sigma, **cond) = x - sigma F(x, T sigma, **cond)."""

    def __init__(self, net, cfg: FlowConfig = SD3):
        self.net = net  # callable (x, t, **cond) -> v; t = T sigma, (B,) float32
        self.num_train_timesteps = cfg.num_train_timesteps

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        """x (B, ...) on the flow path at sigma (float, or (B,) tensor) -> x0_hat, same shape."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma  # (B,)
        t = (self.num_train_timesteps * sigma).float()  # (B,): the network's timestep
        v = self.net(x, t, **cond)
        return x - sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * v  # x0_hat = x - sigma v


def sample_sigma_logit_normal(batch_size: int, cfg: FlowConfig = SD3, *, mean: float = 0.0, std: float = 1.0,
                              generator: torch.Generator | None = None,
                              device: torch.device | str = "cpu") -> torch.Tensor:
    """sigma = shift(sigmoid(n)), n ~ N(mean, std^2) (Esser et al. 2024 §3.1, then the §5.3.2 shift). -> (B,) in (0, 1)"""
    if std <= 0:
        raise ValueError(f"logit-normal std must be positive, got {std}")
    u = torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator, device=device))
    return shift_sigma(u, cfg.shift)


def flow_training_noise(x0: torch.Tensor, cfg: FlowConfig = SD3, *, mean: float = 0.0, std: float = 1.0,
                        generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SD3 training step noise: -> (x_sigma, t = T sigma (B,), target v = eps - x0); loss = MSE(net(x_sigma, t), v).

    One sigma per sample, logit-normal then shifted; x0: (B, ...) latents (the VAE's shifted and scaled latent).
    """
    sigma = sample_sigma_logit_normal(x0.shape[0], cfg, mean=mean, std=std, generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    s = sigma.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)
    x_sigma = (1 - s) * x0 + s * eps  # the straight path from data to noise
    return x_sigma, cfg.num_train_timesteps * sigma, eps - x0
