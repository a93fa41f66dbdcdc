"""Stateless samplers with one signature: sample_xxx(denoiser, x, sigmas, *, callback=None, ...) -> x.

All samplers work in the k-diffusion / EDM variable x = x0 + sigma * eps (Karras et al. 2022, Sec. 2). `denoiser` is
any D(x, sigma) -> x0_hat (schedulers/denoisers.py; conditioning, CFG and control live in its closure). `sigmas` holds
n+1 descending noise levels; the last one is where sampling stops (0, or sigma(t=0) for DDIM as SD ships it).
x enters at sigmas[0] (e.g. randn * sqrt(sigma_max^2 + 1) for a DDPM-trained model started from pure noise).
`callback(i, x, x0_hat)` runs after step i with the new x.

Samplers whose reference works on the DDPM variable x_t = x / sqrt(sigma^2 + 1) (DDIM, DPM-Solver++, UniPC) give the
same trajectory divided by sqrt(sigma^2 + 1): their updates are written with ratios of sigmas and lambda = -ln sigma,
which do not change under that rescaling (Lu et al. 2022, DPM-Solver++ Sec. 3).
Each sampler equals the stated diffusers scheduler loop to fp32 rounding (tests/test_schedulers.py):
huggingface/diffusers@v0.42.1:src/diffusers/schedulers/scheduling_{ddim,euler_discrete,euler_ancestral_discrete,
heun_discrete,dpmsolver_multistep,unipc_multistep}.py; the VE forms follow crowsonkb/k-diffusion k_diffusion/sampling.py.

Stochastic samplers take `noise` ((n, *x.shape), or a list of n tensors: the N(0, I) draw of each step) or a
`generator`; they draw once per step, the last step included, in the order diffusers does.

Left out: Euler "churn" (s_churn > 0), DPM-Solver++ orders other than 2, UniPC orders other than 2 and bh1,
thresholding / clipping of x0_hat, and PNDM/PLMS (SD1.5's shipped default, superseded by the samplers here).
"""

import math
from typing import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]  # D(x, sigma) -> x0_hat
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None
Noise = torch.Tensor | Sequence[torch.Tensor] | None


def _levels(sigmas: torch.Tensor) -> list[float]:
    """Validate the n+1 noise levels and return them as Python floats (float64): the per-step scalar arithmetic
    then launches no tensor kernels, and the denoiser sees sigma to full precision."""
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries (n steps need n+1), got {tuple(sigmas.shape)}")
    if bool((sigmas[1:] > sigmas[:-1]).any()):
        raise ValueError("sigmas must be non-increasing")
    return sigmas.tolist()


def _draw(i: int, x: torch.Tensor, noise: Noise, generator: torch.Generator | None) -> torch.Tensor:
    """The step-i Gaussian draw: the injected one if given, else from `generator` (as diffusers' randn_tensor)."""
    if noise is not None:
        assert noise[i].shape == x.shape, f"noise[{i}] is {tuple(noise[i].shape)}, x is {tuple(x.shape)}"
        return noise[i].to(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split the step sigma -> sigma_next into a deterministic part down to sigma_down and fresh noise sigma_up,
    with sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion get_ancestral_step; DDIM Eq. 16 in VE form)."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


# --- first-order -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None
                 ) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022 Alg. 1, first
    order only; Alg. 2 with S_churn = 0). Equals diffusers' EulerDiscreteScheduler; SVD samples with it (25 Karras steps)."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        x0_hat = denoiser(x, sigma)
        # Alg. 1 lines 4-5: d = (x - x0_hat) / sigma, x <- x + d (sigma_next - sigma), which is
        # x0_hat + (sigma_next / sigma)(x - x0_hat): one lerp kernel instead of four elementwise passes
        x = torch.lerp(x0_hat, x, sigma_next / sigma)
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                           eta: float = 1.0, noise: Noise = None, generator: torch.Generator | None = None
                           ) -> torch.Tensor:
    """Ancestral Euler (k-diffusion sample_euler_ancestral): an Euler step down to sigma_down, then fresh noise
    sigma_up, so each step samples p(x_{sigma_next} | x0_hat). Equals diffusers' EulerAncestralDiscreteScheduler at eta=1."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        x0_hat = denoiser(x, sigma)
        sigma_down, sigma_up = _ancestral_split(sigma, sigma_next, eta)
        x = torch.lerp(x0_hat, x, sigma_down / sigma)  # deterministic part: Euler to sigma_down (as sample_euler)
        x = x + _draw(i, x, noise, generator) * sigma_up  # stochastic part; drawn on the last step too (sigma_up = 0)
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                eta: float = 0.0, noise: Noise = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) in VE form: x_next = x0_hat + sigma_down eps_hat + sigma_up z, where
    sigma_t of Eq. 16 (eta-scaled) becomes sigma_up. eta = 0 is deterministic DDIM; eta = 1 is DDPM-like.
    Equals diffusers' DDIMScheduler with sigmas from sigmas.ddim_sigmas (x here = x_t * sqrt(sigma^2 + 1))."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        x0_hat = denoiser(x, sigma)
        # Eq. 16 variance: sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 in VE units
        sigma_down, sigma_up = _ancestral_split(sigma, sigma_next, eta)
        # Eq. 12: "predicted x0" + "direction pointing to x_t" = x0_hat + sigma_down eps_hat with
        # eps_hat = (x - x0_hat) / sigma ("predicted epsilon"); as one lerp kernel
        x = torch.lerp(x0_hat, x, sigma_down / sigma)
        if eta > 0:
            x = x + sigma_up * _draw(i, x, noise, generator)  # Eq. 12: random noise, drawn every step as diffusers
        if callback is not None:
            callback(i, x, x0_hat)
    return x


# --- second-order ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None
                ) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022 Alg. 1): Euler predictor, trapezoidal corrector, plain Euler on
    the last step to sigma = 0. Equals diffusers' HeunDiscreteScheduler (2n - 1 model calls for n steps)."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        x0_hat = denoiser(x, sigma)
        d = (x - x0_hat) / sigma  # Alg. 1 line 4
        x_euler = x + d * (sigma_next - sigma)  # line 5
        if sigma_next == 0:
            x = x_euler  # line 6: no correction at sigma = 0 (the slope is undefined there)
        else:
            d_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next  # line 7
            x = x + (d + d_next) / 2 * (sigma_next - sigma)  # line 8: trapezoidal rule
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None
                    ) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2; midpoint form), multistep in lambda = -ln sigma.
    First step and the step to sigma = 0 are first order. Equals diffusers' DPMSolverMultistepScheduler
    (dpmsolver++, order 2, midpoint); use sigmas.karras_sigmas for "DPM++ 2M Karras"."""
    s = _levels(sigmas)
    x0_prev, h_prev = None, None
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        x0_hat = denoiser(x, sigma)
        if sigma_next == 0:
            x = x0_hat  # lambda_next = inf: the exponential integrator lands on the data prediction
        else:
            h = math.log(sigma / sigma_next)  # h = lambda_next - lambda
            x0_eff = x0_hat
            if x0_prev is not None:
                # Alg. 2: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i (linear extrapolation in lambda)
                r = h_prev / h
                x0_eff = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * x0_prev
            # x_next = (sigma_next / sigma) x - (e^{-h} - 1) D  (Alg. 2 last line, divided by alpha_next)
            x = (sigma_next / sigma) * x - math.expm1(-h) * x0_eff
            h_prev = h
        x0_prev = x0_hat
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                        eta: float = 1.0, noise: Noise = None, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++" Sec. 5 / Appendix, midpoint form): the data-prediction
    SDE solved exactly in its linear part with fresh noise each step. eta = 1 is diffusers' "sde-dpmsolver++"
    (k-diffusion sample_dpmpp_2m_sde with per-step Gaussian noise instead of a Brownian tree)."""
    s = _levels(sigmas)
    x0_prev, h_prev = None, None
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        x0_hat = denoiser(x, sigma)
        z = _draw(i, x, noise, generator)  # drawn on the last step too, as diffusers does
        if sigma_next == 0:
            x = x0_hat
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            # linear part: x_next = (sigma_next/sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) x0_hat
            x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * x0_hat
            if x0_prev is not None:
                # second-order midpoint term: 0.5 (1 - e^{-(1+eta) h}) (x0_i - x0_{i-1}) / r
                r = h_prev / h
                x = x - 0.5 * math.expm1(-h - eta_h) * (x0_hat - x0_prev) / r
            # noise term: sigma_next sqrt(1 - e^{-2 eta h}) z
            x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * z
            h_prev = h
        x0_prev = x0_hat
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None
                 ) -> torch.Tensor:
    """UniPC-2 with B(h) = e^h - 1 ("bh2"), data prediction (Zhao et al. 2023, "UniPC", Alg. 2 UniP-2 and Alg. 1
    UniC, with the corrector reusing the next step's model call). The official ControlNeXt default (20 steps).
    First and last predictor steps are first order (warm-up, lower_order_final). Equals diffusers'
    UniPCMultistepScheduler (solver_order=2, bh2, predict_x0, no disabled correctors)."""
    s = _levels(sigmas)
    n = len(s) - 1
    lam = [-math.log(v) if v > 0 else math.inf for v in s]  # lambda = -ln sigma (= log SNR / 2)
    x_last = x0_last = x0_last2 = None  # corrected x and x0_hat at step i-1, x0_hat at step i-2
    order_last = 0
    for i in range(n):
        sigma, sigma_next = s[i], s[i + 1]
        x0_hat = denoiser(x, sigma)
        if i > 0:
            # UniC (Alg. 1): redo step i-1 -> i with the model output at i as an extra interpolation point
            h = lam[i] - lam[i - 1]
            phi1 = math.expm1(-h)  # h phi_1(h) with hh = -h, data prediction
            B = phi1  # bh2: B(h) = e^{hh} - 1
            x = (sigma / s[i - 1]) * x_last - phi1 * x0_last  # the first-order (DDIM) part
            D1_t = x0_hat - x0_last
            if order_last == 1:
                x = x - B * 0.5 * D1_t  # rho = 1/2 for UniC-1 (paper Sec. 3.1)
            else:
                # UniC-2: rho solves R rho = b, R = [[1, 1], [r1, 1]], b_k = k! hh phi_{k+1}(hh) / B(h) (paper Eq. 8)
                r1 = (lam[i - 2] - lam[i - 1]) / h  # r1 < 0: the older point lies behind
                hh = -h
                h_phi_2 = phi1 / hh - 1  # hh phi_2(hh), from phi_{k+1}(z) = (phi_k(z) - 1/k!) / z
                h_phi_3 = h_phi_2 / hh - 0.5  # hh phi_3(hh)
                b1, b2 = h_phi_2 / B, 2 * h_phi_3 / B
                # 2x2 solve in closed form: rho0 + rho1 = b1, r1 rho0 + rho1 = b2
                rho0 = (b2 - b1) / (r1 - 1)
                rho1 = b1 - rho0
                D1 = (x0_last2 - x0_last) / r1
                x = x - B * (rho0 * D1 + rho1 * D1_t)
        # UniP (Alg. 2): predict step i -> i+1 from x0_hat at i (and at i-1 for order 2)
        order = 1 if i == 0 or i == n - 1 else 2  # warm-up, then lower_order_final on the last step
        x_last, x0_last2, x0_last, order_last = x, x0_last, x0_hat, order
        if sigma_next == 0:
            x = x0_hat  # lambda_next = inf
        else:
            h = lam[i + 1] - lam[i]
            phi1 = math.expm1(-h)
            x = (sigma_next / sigma) * x - phi1 * x0_hat  # first-order part (= DPM-Solver++(1) = DDIM)
            if order == 2:
                r1 = (lam[i - 1] - lam[i]) / h
                D1 = (x0_last2 - x0_hat) / r1
                x = x - phi1 * 0.5 * D1  # B(h) rho D1 with rho = 1/2 for UniP-2
        if callback is not None:
            callback(i, x, x0_hat)
    return x
