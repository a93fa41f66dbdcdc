"""Noise schedules: DDPM betas -> alphas_cumprod -> sigmas, timestep spacings, sigma <-> t, Karras/exponential spacing.

Everything is in the k-diffusion / EDM view: x = x0 + sigma * eps, with sigma = sqrt((1 - abar) / abar) for a DDPM
schedule (Karras et al. 2022, "Elucidating the Design Space", Sec. 2 and Table 1). A DDPM sample x_t = sqrt(abar) x0 +
sqrt(1 - abar) eps is the same point scaled by sqrt(abar) = 1 / sqrt(sigma^2 + 1).

Matches, number for number, the schedule code of
huggingface/diffusers@v0.42.1:src/diffusers/schedulers/scheduling_{ddim,euler_discrete,dpmsolver_multistep}.py
(betas in float32 as diffusers builds them, then sigmas and interpolation in float64 as its numpy code does).
Karras spacing is Eq. 5 of Karras et al. 2022; zero-terminal-SNR is Algorithm 1 of Lin et al. 2023
("Common Diffusion Noise Schedules and Sample Steps are Flawed").

Left out: trained_betas, the "laplace"/"exp" alpha_bar transforms, beta-distributed and flow-matching sigmas, and the
fractional (unrounded) "linspace" timesteps of diffusers' Euler/Heun classes.
"""

import math
from dataclasses import dataclass

import torch


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000  # DDPM T (LDM/SGM configs)
    beta_start: float = 0.00085  # LDM "linear" schedule = diffusers "scaled_linear" (checkpoints.md §8)
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "linear" | "scaled_linear" | "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # what the network outputs: "epsilon" | "v_prediction"
    timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace" (diffusers' names)
    steps_offset: int = 1  # added to "leading" timesteps; SD1.5 ships 1 (checkpoints.md §7.5)
    rescale_zero_snr: bool = False  # Lin et al. 2023 Alg. 1; none of the presets uses it
    sigma_min: float | None = None  # EDM range for Karras sigmas; None = ends of the DDPM table
    sigma_max: float | None = None
    use_karras_sigmas: bool = False  # sample on Karras et al. Eq. 5 instead of DDPM timesteps
    continuous_c_noise: bool = False  # network time input 0.25 ln(sigma) instead of t (SVD, EDM Table 1)

    def __post_init__(self):
        for field, value, allowed in (("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
                                      ("prediction_type", self.prediction_type, PREDICTION_TYPES),
                                      ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)):
            if value not in allowed:
                raise ValueError(f"ScheduleConfig.{field} must be one of {allowed}, got {value!r}")


# One line per preset (checkpoints.md §7.5 scheduler configs); train.py / sample.py name one by `schedule`. SD1.5's
# shipped JSON has no timestep_spacing: DDIM and PNDM fill in "leading" (kept here), but diffusers' Euler/Heun/
# DPM-Solver/UniPC fill in their own default "linspace", so the official ControlNeXt SD1.5 pipeline
# (UniPC.from_config) samples on linspace: replace(SD15, timestep_spacing="linspace").
SD15 = ScheduleConfig()
SD21_V = ScheduleConfig(prediction_type="v_prediction")
SDXL = ScheduleConfig()
SVD = ScheduleConfig(prediction_type="v_prediction", sigma_min=0.002, sigma_max=700.0, use_karras_sigmas=True,
                     continuous_c_noise=True)
PRESETS = {"sd15": SD15, "sd21_v": SD21_V, "sdxl": SDXL, "svd": SVD}


# --- betas and alphas_cumprod ---------------------------------------------------------------------------------------

def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 Eq. 17: beta_t = 1 - abar(t+1)/abar(t) with abar(t) = cos^2((t/T + s)/(1 + s) pi/2)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # s = 0.008

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]  # clip, as the paper
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 Alg. 1: shift and scale sqrt(abar) so that abar_T = 0 while abar_0 is unchanged. (T,) -> (T,)"""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])  # undo the cumprod
    return 1.0 - alphas


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """DDPM betas in float32 (the dtype diffusers and therefore every shipped sampler uses). -> (T,)"""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)  # Ho et al. 2020
    elif cfg.beta_schedule == "scaled_linear":
        # linear in sqrt(beta): the LDM/SGM "linear" schedule (checkpoints.md §8)
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(T)
    else:
        raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}")
    if cfg.rescale_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def make_alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), float32. -> (T,)"""
    abar = torch.cumprod(1.0 - make_betas(cfg), dim=0)
    if cfg.rescale_zero_snr:
        abar[-1] = 2**-24  # keep sigma_T finite, as diffusers' Euler and DPM-Solver do
    return abar


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The training sigma table sigma_t = sqrt((1 - abar_t) / abar_t), in float64, ascending in t. (T,) -> (T,)"""
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


# --- timesteps and sigma <-> t ---------------------------------------------------------------------------------------

def spaced_timesteps(n: int, spacing: str, *, num_train_timesteps: int = 1000, steps_offset: int = 0,
                     multistep: bool = False) -> torch.Tensor:
    """The n sampling timesteps (descending, float64) as diffusers' set_timesteps lays them out.

    "leading": multiples of T // n, plus steps_offset (SD1.5: 981, 961, ..., 1 for n = 50); "trailing": from T - 1
    down by T / n (Lin et al. 2023 Table 2); "linspace": n evenly spaced points from T - 1 to 0, fractional as in
    diffusers' Euler/Heun classes. multistep=True is the DPMSolverMultistep/UniPC layout: "leading" and "linspace"
    lay n + 1 points, round them, and drop t = 0.
    """
    T = num_train_timesteps
    if not 0 < n <= T:
        raise ValueError(f"need 0 < n <= {T} steps, got {n}")
    if spacing == "trailing":
        return torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1  # already descending; nothing to drop
    m = n + 1 if multistep else n
    if spacing == "leading":
        t = torch.arange(m, dtype=torch.float64) * (T // m) + steps_offset
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, m, dtype=torch.float64)
        # multistep rounds to whole steps; Euler/Heun keep fractions, stored in float32 as diffusers stores them
        t = t.round() if multistep else t.float().double()
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}")
    t = t.flip(0)  # descending: high noise first
    return t[:-1] if multistep else t  # multistep: drop the t = 0 end point


def sigma_at(t: torch.Tensor, sigma_table: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear sigma(t) between table entries (diffusers' np.interp, "linear" interpolation_type)."""
    t = t.double().clamp(0, len(sigma_table) - 1)
    lo = t.floor().long().clamp(max=len(sigma_table) - 2)
    w = t - lo
    return (1 - w) * sigma_table[lo] + w * sigma_table[lo + 1]


def t_from_sigma(sigma: torch.Tensor, sigma_table: torch.Tensor, *, log: bool = True) -> torch.Tensor:
    """Continuous t by linear interpolation in log sigma (k-diffusion DiscreteSchedule.sigma_to_t, diffusers'
    _sigma_to_t), float64. log=False interpolates in sigma instead: the exact inverse of sigma_at."""
    table = sigma_table.double()
    key, value = (table.log(), sigma.double().clamp(min=1e-10).log()) if log else (table, sigma.double())
    # index of the last table entry <= value, kept inside [0, T-2] so that lo + 1 exists
    lo = (torch.searchsorted(key, value.reshape(-1).contiguous(), right=True) - 1).clamp(0, len(key) - 2).reshape(value.shape)
    low, high = key[lo], key[lo + 1]
    w = ((value - low) / (high - low)).clamp(0, 1)  # clamp: sigmas outside the table map to t = 0 or T-1
    return lo + w


# --- sampling sigma sequences ----------------------------------------------------------------------------------------

def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    Returns n sigmas, descending, float64, without the final 0.
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma (k-diffusion get_sigmas_exponential). n sigmas, descending, float64, no final 0."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Samplers take n+1 sigmas; the last one is where sampling stops (0 = clean data)."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sampling_sigmas(cfg: ScheduleConfig, n: int, *, multistep: bool = False) -> torch.Tensor:
    """n+1 descending sigmas (float64, last = 0) for n steps, as diffusers' Euler (multistep=False) or
    DPMSolverMultistep/UniPC (multistep=True) would set them from `cfg`.
    """
    table = sigmas_from_alphas_cumprod(make_alphas_cumprod(cfg))
    if not cfg.use_karras_sigmas:
        t = spaced_timesteps(n, cfg.timestep_spacing, num_train_timesteps=cfg.num_train_timesteps,
                             steps_offset=cfg.steps_offset, multistep=multistep)
        return append_zero(sigma_at(t, table))
    if multistep:
        # DPM-Solver/UniPC span the whole training table unless the config says otherwise
        lo, hi = table[0].item(), table[-1].item()
    else:
        # diffusers' Euler takes the ends of the *spaced* sigmas (e.g. t = 1 and 981), unless the config sets them
        t = spaced_timesteps(n, cfg.timestep_spacing, num_train_timesteps=cfg.num_train_timesteps,
                             steps_offset=cfg.steps_offset)
        spaced = sigma_at(t, table)
        lo, hi = spaced[-1].item(), spaced[0].item()
    lo = cfg.sigma_min if cfg.sigma_min is not None else lo
    hi = cfg.sigma_max if cfg.sigma_max is not None else hi
    return append_zero(karras_sigmas(n, lo, hi))


def ddim_sigmas(cfg: ScheduleConfig, n: int, *, set_alpha_to_one: bool = False) -> torch.Tensor:
    """n+1 sigmas for DDIM: the spaced timesteps, then abar_prev of the last step (Song et al. 2021 Eq. 12).

    set_alpha_to_one=False (every SD config) stops at sigma(t=0), not at 0 (checkpoints.md §8). diffusers steps from
    t to t - T//n; that is the next timestep for "leading" (all SD configs). For other spacings we step to the next
    timestep, which keeps the chain consistent where diffusers' does not.
    """
    table = sigmas_from_alphas_cumprod(make_alphas_cumprod(cfg))
    t = spaced_timesteps(n, cfg.timestep_spacing, num_train_timesteps=cfg.num_train_timesteps,
                         steps_offset=cfg.steps_offset)
    last = table.new_zeros(1) if set_alpha_to_one else table[:1]
    return torch.cat([table[t.round().long()], last])  # DDIM rounds "linspace" to whole steps
