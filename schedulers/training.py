"""Training-time noise: which t or sigma to draw, how to noise x0, the regression target and the loss weight.

SD1.5 / SDXL (DDPM, Ho et al. 2020 Alg. 1): t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps or
v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, Sec. 4); unweighted MSE. Matches DDPMScheduler.add_noise and
get_velocity of huggingface/diffusers@v0.42.1:src/diffusers/schedulers/scheduling_ddpm.py and the ControlNeXt SD1.5/SDXL
trainers (../shared/reference/controlnext.md §4.1-4.2).

SVD (EDM, Karras et al. 2022): x = x0 + sigma eps with one sigma per video, the network wrapped by
denoisers.EDMVDenoiser, loss lambda(sigma) ||D(x; sigma) - x0||^2. The official ControlNeXt-SVD trainer
(ControlNeXt-SVD-v2/train_svd.py; controlnext.md §4.3) draws sigma from k-diffusion's rand_cosine_interpolated
(crowsonkb/k-diffusion k_diffusion/utils.py; the "simple diffusion" shifted-cosine log-SNR of Hoogeboom et al. 2023,
Sec. 3) with stratified u, and weights by lambda = (1 + sigma^2) / sigma^2 (EDM's lambda with sigma_data = 1). The
standard EDM option (ln sigma ~ N(-1.2, 1.2^2), lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, Table 1) is
here too.

Two common SD training options, off by default (the official trainers use neither): offset noise (Guttenberg 2023,
"Diffusion with Offset Noise": eps + s * n with one n ~ N(0, 1) per sample and channel, so the low-frequency content
of x_t no longer leaks the image's mean colour to the network) and Min-SNR-gamma loss weighting (Hang et al. 2023,
"Efficient Diffusion Training via Min-SNR Weighting Strategy", Eq. 8-9: w = min(SNR, gamma) / SNR for eps targets,
min(SNR, gamma) / (SNR + 1) for v). The miniature SD1.5's base stage uses both (experiments/mini_sd15_base.py).
Left out: input perturbation and per-frame sigmas.
"""

import math

import torch


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast over x (B, C, H, W) or (B, F, C, H, W)."""
    return c.reshape(-1, *([1] * (x.ndim - 1)))


# --- DDPM (SD1.5, SD2, SDXL) -----------------------------------------------------------------------------------------

def sample_timesteps(batch_size: int, num_train_timesteps: int = 1000, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ U{0, ..., T-1}, one per sample (Ho et al. 2020 Alg. 1 line 3). -> (B,) int64"""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020 Eq. 4). x0, noise: (B, ...); t: (B,) int."""
    abar = _bcast(alphas_cumprod.to(x0)[t], x0)  # gather in x0's dtype, as diffusers does
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, Sec. 4)."""
    abar = _bcast(alphas_cumprod.to(x0)[t], x0)
    return abar**0.5 * noise - (1 - abar) ** 0.5 * x0


def target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
           alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The regression target for an "epsilon" or "v_prediction" network."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, t, alphas_cumprod)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def sd_training_noise(x0: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", *,
                      generator: torch.Generator | None = None, noise_offset: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SD1.5/SDXL step (controlnext.md §4.1): uniform t, DDPM noising. -> (x_t, t, target); loss = MSE(net(x_t, t), target)
    `noise_offset` > 0 adds offset noise (module docstring); 0 draws exactly what the official trainers draw."""
    t = sample_timesteps(x0.shape[0], len(alphas_cumprod), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    if noise_offset:
        offset = torch.randn((*x0.shape[:2], *[1] * (x0.ndim - 2)), generator=generator, dtype=x0.dtype, device=x0.device)
        noise = noise + noise_offset * offset  # (B, C, 1, 1): one shift per sample and channel
    return add_noise(x0, noise, t, alphas_cumprod), t, target(prediction_type, x0, noise, t, alphas_cumprod)


def min_snr_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weight per sample (Hang et al. 2023, Eq. 8-9), SNR = abar / (1 - abar). (B,) -> (B,)"""
    abar = alphas_cumprod.to(torch.float64)[t]
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    return (clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)).float()


# --- EDM (SVD) --------------------------------------------------------------------------------------------------------

def stratified_uniform(batch_size: int, *, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """u_i = (i + U(0,1)) / B: one draw in each of B equal bins, which lowers the variance of the batch loss. -> (B,)"""
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    return (torch.arange(batch_size, device=device, dtype=torch.float64) + u) / batch_size


def cosine_interpolated_sigma(u: torch.Tensor, *, image_d: float = 64.0, noise_d_low: float = 32.0,
                              noise_d_high: float = 64.0, sigma_data: float = 0.5, sigma_min: float = 0.002,
                              sigma_max: float = 700.0) -> torch.Tensor:
    """sigma(u) of the shifted-cosine log-SNR schedule, interpolated from resolution noise_d_low to noise_d_high.

    u = 0 gives sigma_max, u = 1 sigma_min. Defaults: the ControlNeXt-SVD-v2 trainer's constants (controlnext.md §4.3).
    """
    # log-SNR limits in units of sigma_data
    logsnr_hi = -2 * math.log(sigma_min / sigma_data)
    logsnr_lo = -2 * math.log(sigma_max / sigma_data)

    def cosine_logsnr(shift: float) -> torch.Tensor:
        # Hoogeboom et al. 2023 Eq. 5: logSNR(u) = -2 ln tan(pi u / 2), with u rescaled so that u = 0 hits logsnr_lo
        # and u = 1 logsnr_hi, and shifted by 2 ln(noise_d / image_d) (Sec. 3.1: noise seen at another resolution)
        a = math.atan(math.exp(-0.5 * (logsnr_lo - shift)))
        b = math.atan(math.exp(-0.5 * (logsnr_hi - shift)))
        return -2 * torch.log(torch.tan(a + u * (b - a))) + shift

    low = cosine_logsnr(2 * math.log(noise_d_low / image_d))
    high = cosine_logsnr(2 * math.log(noise_d_high / image_d))
    logsnr = torch.lerp(low, high, u)  # (1 - u) low + u high: low-res schedule at high noise, high-res at low noise
    return sigma_data * torch.exp(-logsnr / 2)  # logSNR = -2 ln(sigma / sigma_data)


def svd_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) = (1 + sigma^2) / sigma^2: EDM's 1 / c_out^2 with sigma_data = 1, as the ControlNeXt-SVD trainer."""
    return (1 + sigma**2) / sigma**2


def svd_training_noise(x0: torch.Tensor, *, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ControlNeXt-SVD-v2 step (controlnext.md §4.3): stratified u -> cosine-interpolated sigma, one per video.

    x0: (B, F, C, H, W) latents -> (x0 + sigma eps, sigma (B,), lambda(sigma) (B,)). The loss is
    mean_B(lambda * mean_{F,C,H,W}(w_hand (D(x; sigma) - x0)^2)) with D = denoisers.EDMVDenoiser.
    """
    u = stratified_uniform(x0.shape[0], generator=generator, device=x0.device)
    sigma = cosine_interpolated_sigma(u).to(x0.dtype)  # (B,)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return x0 + _bcast(sigma, x0) * noise, sigma, svd_loss_weight(sigma)


def sample_sigma_lognormal(batch_size: int, *, p_mean: float = -1.2, p_std: float = 1.2,
                           generator: torch.Generator | None = None, device: torch.device | str = "cpu"
                           ) -> torch.Tensor:
    """EDM training distribution: ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022 Table 1, Sec. 5). -> (B,)"""
    return (p_mean + p_std * torch.randn(batch_size, generator=generator, device=device)).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022 Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
