"""schedulers/: trajectories against diffusers' scheduler loops, training noise against diffusers, a Gaussian closed
form for every ODE sampler, and the schedules against their closed forms.

diffusers is the numerical oracle (requirements-dev.txt); these tests run, never skip. The model driving both loops is
an analytic function of (x_in, t) shaped like a trained network: close to the Gaussian-optimal prediction (so x0_hat
stays O(1) at every noise level) plus a bounded nonlinear, time-dependent term.
"""

import dataclasses
import math

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_zero_snr
from diffusers.training_utils import compute_snr

from schedulers import guidance, samplers, sigmas as S, training
from schedulers.denoisers import EDMVDenoiser, EpsDenoiser, VDenoiser, make_denoiser

# The scheduler_config.json files as shipped (checkpoints.md §7.5). SD1.5's has no timestep_spacing, so each diffusers
# class fills in its own default: "leading" for DDIM, "linspace" for Euler/Heun/DPM-Solver/UniPC.
SD15_JSON = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False, trained_betas=None)
SVD_JSON = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                interpolation_type="linear", num_train_timesteps=1000, prediction_type="v_prediction",
                set_alpha_to_one=False, sigma_max=700.0, sigma_min=0.002, skip_prk_steps=True, steps_offset=1,
                timestep_spacing="leading", timestep_type="continuous", trained_betas=None, use_karras_sigmas=True)
SD15_LINSPACE = dataclasses.replace(S.SD15, timestep_spacing="linspace")  # what diffusers' Euler/DPM/UniPC build
STEPS = (10, 20, 50)
TOL = 1e-5  # max abs difference on O(1) latents, fp32
SHAPE = (2, 4, 8, 8)

_W = torch.linspace(-1, 1, 16).reshape(4, 4).sin() * 0.7  # fixed channel-mixing weights


def _mix(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Bounded nonlinear term: tanh(W x + sin(c)), W mixing the channel dim (dim -3)."""
    c = c.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(torch.einsum("ij,...jhw->...ihw", _W, x) + torch.sin(c))


def _abar_smooth(t: torch.Tensor) -> torch.Tensor:
    """exp(-int_0^{t+1} beta): the scaled-linear abar in continuous t (smooth, unlike table interpolation)."""
    k = (0.012**0.5 - 0.00085**0.5) / 999
    u0, u1 = 0.00085**0.5, 0.00085**0.5 + k * (t + 1)
    return torch.exp(-(u1**3 - u0**3) / (3 * k))


def eps_net(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps ~ sqrt(1 - abar) x_in (optimal for unit-variance data) + sqrt(abar) * bounded term; t float or tensor."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    abar = _abar_smooth(t).reshape(-1, *([1] * (x_in.ndim - 1)))
    return (1 - abar).sqrt() * x_in + abar.sqrt() * _mix(x_in, t / 150)


def v_net(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
    """v ~ 0 (optimal for unit-variance data) + a bounded term; c_noise = 0.25 ln sigma."""
    return 0.5 * _mix(x_in, 2 * torch.as_tensor(c_noise, dtype=torch.float32).reshape(-1))


def _z(seed: int = 0, shape: tuple = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _noises(n: int, seed: int = 1, shape: tuple = SHAPE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _run_diffusers(sch, x: torch.Tensor, model, *, step_kwargs=lambda i: {}, vp: bool = False) -> list[torch.Tensor]:
    """The standard diffusers pipeline loop; returns x after every step() call.

    vp=True (for the sigma-space schedulers, Euler and Heun) divides by sqrt(sigma_next^2 + 1), so that every
    trajectory is compared on the O(1) scale the network sees, not on x ~ sigma * z (up to ~40 at sigma = 14.6).
    """
    out = []
    for i, t in enumerate(sch.timesteps):
        x = sch.step(model(sch.scale_model_input(x, t), t), t, x, **step_kwargs(i)).prev_sample
        out.append(x / (sch.sigmas[i + 1] ** 2 + 1) ** 0.5 if vp else x)
    return out


def _run_ours(sampler, denoiser, x, sigmas, *, vp: bool = False, **kwargs) -> list[torch.Tensor]:
    """Our sampler's x after every step; vp=True divides by sqrt(sigma_next^2 + 1): the DDPM-space x_t."""
    out = []

    def callback(i, x, x0_hat):
        out.append(x / (sigmas[i + 1] ** 2 + 1) ** 0.5 if vp else x)

    sampler(denoiser, x, sigmas.to(torch.float64), callback=callback, **kwargs)
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b), f"{len(a)} vs {len(b)} steps"
    return max((p - q).abs().max().item() for p, q in zip(a, b))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tensors here are tiny: a second intra-op thread only adds synchronisation, which on a busy 2-core machine made
    # this file ~20x slower (measured). Runs after conftest's set_num_threads(2).
    torch.set_num_threads(1)
    yield


ABAR = S.make_alphas_cumprod(S.SD15)
EPS_D = EpsDenoiser(eps_net, ABAR)
EPS_D_LINEAR_T = EpsDenoiser(eps_net, ABAR, linear_t=True)  # t exactly as diffusers' Euler/Heun feed it


# --- (1) trajectories equal diffusers' ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])  # 0.5: at 0 and 1, eta**2 == eta would pass as eta
def test_ddim_matches_diffusers(n, eta):
    sch = DDIMScheduler.from_config(SD15_JSON)
    sch.set_timesteps(n)
    assert sch.config.timestep_spacing == "leading"
    noise = _noises(n)
    ref = _run_diffusers(sch, _z(), eps_net, step_kwargs=lambda i: dict(eta=eta, variance_noise=noise[i] if eta else None))
    sig = S.ddim_sigmas(S.SD15, n)
    assert torch.equal(S.spaced_timesteps(n, "leading", steps_offset=1).long(), sch.timesteps)
    ours = _run_ours(samplers.sample_ddim, EPS_D, _z() * (sig[0] ** 2 + 1) ** 0.5, sig, vp=True, eta=eta, noise=noise)
    assert _max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("n", STEPS)
def test_euler_matches_diffusers(n):
    sch = EulerDiscreteScheduler.from_config(SD15_JSON)
    sch.set_timesteps(n)
    x_T = _z() * sch.init_noise_sigma  # diffusers starts "linspace" at sigma_max, not sqrt(sigma_max^2 + 1)
    ref = _run_diffusers(sch, x_T, eps_net, vp=True)
    sig = S.sampling_sigmas(SD15_LINSPACE, n)
    assert torch.allclose(sig.float(), sch.sigmas, rtol=1e-6, atol=0)
    assert _max_diff(_run_ours(samplers.sample_euler, EPS_D_LINEAR_T, x_T, sig, vp=True), ref) <= TOL


@pytest.mark.parametrize("n", STEPS)
def test_euler_ancestral_matches_diffusers(n):
    sch = EulerAncestralDiscreteScheduler.from_config(SD15_JSON)
    sch.set_timesteps(n)
    x_T = _z() * sch.init_noise_sigma
    g = torch.Generator().manual_seed(7)
    ref = _run_diffusers(sch, x_T, eps_net, step_kwargs=lambda i: dict(generator=g), vp=True)
    sig = S.sampling_sigmas(SD15_LINSPACE, n)
    ours = _run_ours(samplers.sample_euler_ancestral, EPS_D_LINEAR_T, x_T, sig, vp=True,
                     generator=torch.Generator().manual_seed(7))
    assert _max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("n", STEPS)
def test_heun_matches_diffusers(n):
    sch = HeunDiscreteScheduler.from_config(SD15_JSON)
    sch.set_timesteps(n)
    x_T = _z() * sch.init_noise_sigma
    ref = _run_diffusers(sch, x_T, eps_net, vp=True)
    ref = ref[1::2] + ref[-1:]  # diffusers calls step() twice per Heun step; the final Euler step once
    sig = S.sampling_sigmas(SD15_LINSPACE, n)
    assert _max_diff(_run_ours(samplers.sample_heun, EPS_D_LINEAR_T, x_T, sig, vp=True), ref) <= TOL


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_diffusers(n, karras):
    sch = DPMSolverMultistepScheduler.from_config(SD15_JSON, use_karras_sigmas=karras)
    sch.set_timesteps(n)
    ref = _run_diffusers(sch, _z(), eps_net)
    sig = S.sampling_sigmas(dataclasses.replace(SD15_LINSPACE, use_karras_sigmas=karras), n, multistep=True)
    assert torch.allclose(sig.float(), sch.sigmas, rtol=1e-6, atol=0)
    denoiser = EpsDenoiser(eps_net, ABAR, quantize=karras)  # diffusers rounds t for Karras sigmas
    ours = _run_ours(samplers.sample_dpmpp_2m, denoiser, _z() * (sig[0] ** 2 + 1) ** 0.5, sig, vp=True)
    assert _max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("n", STEPS)
def test_dpmpp_2m_sde_matches_diffusers(n):
    sch = DPMSolverMultistepScheduler.from_config(SD15_JSON, algorithm_type="sde-dpmsolver++")
    sch.set_timesteps(n)
    noise = _noises(n)
    ref = _run_diffusers(sch, _z(), eps_net, step_kwargs=lambda i: dict(variance_noise=noise[i]))
    sig = S.sampling_sigmas(SD15_LINSPACE, n, multistep=True)
    ours = _run_ours(samplers.sample_dpmpp_2m_sde, EPS_D, _z() * (sig[0] ** 2 + 1) ** 0.5, sig, vp=True, noise=noise)
    assert _max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("n", STEPS)
def test_unipc_matches_diffusers(n):
    sch = UniPCMultistepScheduler.from_config(SD15_JSON)  # the official ControlNeXt SD1.5/SDXL sampler
    sch.set_timesteps(n)
    assert sch.config.solver_type == "bh2" and sch.config.solver_order == 2
    ref = _run_diffusers(sch, _z(), eps_net)
    sig = S.sampling_sigmas(SD15_LINSPACE, n, multistep=True)
    ours = _run_ours(samplers.sample_unipc, EPS_D, _z() * (sig[0] ** 2 + 1) ** 0.5, sig, vp=True)
    assert _max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("n", (10, 25, 50))
def test_svd_euler_matches_diffusers(n):
    sch = EulerDiscreteScheduler.from_config(SVD_JSON)
    sch.set_timesteps(n)
    shape = (1, 3, 4, 8, 8)  # (B, F, C, H, W): SVD's video layout
    x_T = _z(shape=shape) * sch.init_noise_sigma  # sqrt(700^2 + 1) for "leading" (checkpoints.md §8)
    ref = _run_diffusers(sch, x_T, v_net, vp=True)
    sig = S.sampling_sigmas(S.SVD, n)
    assert torch.allclose(sig.float(), sch.sigmas, rtol=1e-6, atol=0)
    assert sig[0].item() == pytest.approx(700.0, rel=1e-12) and sig[-2].item() == pytest.approx(0.002, rel=1e-12)
    assert _max_diff(_run_ours(samplers.sample_euler, EDMVDenoiser(v_net), x_T, sig, vp=True), ref) <= TOL


def test_v_denoiser_matches_diffusers_sd21():
    """SD2-768 discrete v-prediction: x0_hat equals diffusers' Euler pred_original_sample."""
    sch = EulerDiscreteScheduler.from_config(SD15_JSON, prediction_type="v_prediction")
    sch.set_timesteps(20)
    x = _z() * sch.init_noise_sigma
    denoiser = VDenoiser(v_net, ABAR, linear_t=True)
    for t, sigma in zip(sch.timesteps[:5], sch.sigmas[:5]):
        ref = sch.step(v_net(sch.scale_model_input(x, t), t), t, x).pred_original_sample
        assert (denoiser(x, sigma.double()) - ref).abs().max() <= TOL


@pytest.mark.parametrize("make", [lambda: EpsDenoiser(eps_net, ABAR), lambda: EpsDenoiser(eps_net, ABAR, quantize=True),
                                  lambda: VDenoiser(v_net, ABAR, linear_t=True), lambda: EDMVDenoiser(v_net)])
def test_per_sample_sigma_equals_scalar_path(make):
    """A (B,) sigma tensor (tensor interpolation) gives what one float per sample gives (bisect fast path)."""
    denoiser, x = make(), _z(3) * 5
    sigma = torch.tensor([7.31, 0.0517], dtype=torch.float64)
    per_sample = denoiser(x, sigma)
    one_by_one = torch.cat([denoiser(x[i : i + 1], sigma[i].item()) for i in range(2)])
    assert torch.allclose(per_sample, one_by_one, rtol=0, atol=1e-6)


# --- (2) training noise and preconditioning equal diffusers' ----------------------------------------------------

def test_add_noise_and_velocity_match_ddpm():
    sch = DDPMScheduler.from_config(SD15_JSON)
    x0, noise = _z(1), _z(2)
    t = torch.tensor([0, 999])
    # Two implementations of one elementwise formula (fp32, O(1) values): equal up to rounding, ~1 ulp; a wrong
    # coefficient (abar for sqrt(abar), a swapped sign) is off by > 1e-2.
    close = dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(training.add_noise(x0, noise, t, ABAR), sch.add_noise(x0, noise, t), **close)
    torch.testing.assert_close(training.velocity(x0, noise, t, ABAR), sch.get_velocity(x0, noise, t), **close)
    torch.testing.assert_close(training.target("v_prediction", x0, noise, t, ABAR), sch.get_velocity(x0, noise, t),
                               **close)
    assert training.target("epsilon", x0, noise, t, ABAR) is noise  # the target is the drawn noise itself


def test_svd_preconditioning_matches_diffusers():
    """c_in x equals scale_model_input, c_noise equals the timesteps, x0_hat equals pred_original_sample."""
    sch = EulerDiscreteScheduler.from_config(SVD_JSON)
    sch.set_timesteps(25)
    x = _z(shape=(1, 3, 4, 8, 8)) * 30
    seen = {}

    def spy(x_in, c_noise):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return v_net(x_in, c_noise)

    for t, sigma in zip(sch.timesteps[::6], sch.sigmas[::6]):
        sch._step_index = None  # let diffusers look the step up from t
        scaled = sch.scale_model_input(x, t)
        x0_hat = EDMVDenoiser(spy)(x, sigma.double())
        assert (seen["x_in"] - scaled).abs().max() <= 1e-6 * x.abs().max()
        assert abs(seen["c_noise"].item() - t.item()) <= 1e-6
        ref = sch.step(v_net(scaled, t), t, x).pred_original_sample
        assert (x0_hat - ref).abs().max() <= TOL


def test_sd_training_noise_consistent():
    x0 = _z(3)
    g = torch.Generator().manual_seed(0)
    x_t, t, v = training.sd_training_noise(x0, ABAR, "v_prediction", generator=g)
    assert t.shape == (SHAPE[0],) and t.dtype == torch.int64 and 0 <= t.min() and t.max() < 1000
    abar = ABAR[t].reshape(-1, 1, 1, 1)
    # v-parameterisation identity: x0 = sqrt(abar) x_t - sqrt(1 - abar) v (checkpoints.md §8)
    assert torch.allclose(abar.sqrt() * x_t - (1 - abar).sqrt() * v, x0, atol=1e-5)
    # t ~ U{0, ..., 999}, the official trainers' torch.randint(0, T, (bsz,)): 50k draws reach both ends (a range that
    # starts at 1 or stops at 998 passes the bounds check above)
    t = training.sample_timesteps(50_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, torch.randint(0, 1000, (50_000,), generator=torch.Generator().manual_seed(0)))
    assert t.min().item() == 0 and t.max().item() == 999


def test_svd_training_noise():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    sigma = training.cosine_interpolated_sigma(u)
    assert abs(sigma[0].item() - 700) < 1e-9 and abs(sigma[-1].item() - 0.002) < 1e-12
    # the formula of controlnext.md §4.3, written out independently
    s_d, lo, hi = 0.5, -2 * math.log(700 / 0.5), -2 * math.log(0.002 / 0.5)

    def shifted(d):
        s = 2 * math.log(d / 64)
        a, b = math.atan(math.exp(-(lo - s) / 2)), math.atan(math.exp(-(hi - s) / 2))
        return [-2 * math.log(math.tan(a + ui * (b - a))) + s for ui in u.tolist()]

    logsnr = [(1 - ui) * p + ui * q for ui, p, q in zip(u.tolist(), shifted(32), shifted(64))]
    assert torch.allclose(sigma, torch.tensor([s_d * math.exp(-l / 2) for l in logsnr], dtype=torch.float64))
    # stratified: one u in each of the B bins
    strat = training.stratified_uniform(8, generator=torch.Generator().manual_seed(0))
    assert torch.equal((strat * 8).floor(), torch.arange(8, dtype=torch.float64))
    x, sig, w = training.svd_training_noise(torch.zeros(8, 2, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    assert sig.shape == w.shape == (8,) and torch.all(sig[:-1] > sig[1:])  # stratified u -> decreasing sigma
    assert torch.allclose(w, (1 + sig**2) / sig**2)
    assert torch.allclose(x.flatten(1).std(1), sig, rtol=0.2)
    assert torch.allclose(training.edm_loss_weight(torch.tensor([0.5])), torch.tensor([8.0]))
    ln_sigma = training.sample_sigma_lognormal(20000, generator=torch.Generator().manual_seed(0)).log()
    assert abs(ln_sigma.mean().item() + 1.2) < 0.05 and abs(ln_sigma.std().item() - 1.2) < 0.05


def test_guidance_helpers():
    cond, uncond = _z(1), _z(2)
    guided = guidance.cfg_combine(uncond, cond, 7.5)
    assert torch.allclose(guided, uncond + 7.5 * (cond - uncond))
    assert torch.allclose(guidance.rescale_guidance(guided, cond, 0.7), rescale_noise_cfg(guided, cond, 0.7))
    ramp = guidance.svd_frame_guidance(1.0, 3.0, 14, batch_size=2)
    assert ramp.shape == (2, 14, 1, 1, 1) and ramp[0, 0].item() == 1.0 and ramp[1, -1].item() == 3.0
    with pytest.raises(ValueError):
        guidance.rescale_guidance(guided, cond, 1.5)


# --- (3) closed form: Gaussian data and its exact denoiser --------------------------------------------------------

MU, S_DATA = 0.5, 0.5  # data ~ N(mu, s^2), per element


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + sigma eps = x] for x0 ~ N(mu, s^2)."""
    return MU + S_DATA**2 / (S_DATA**2 + sigma**2) * (x - MU)


# Stated tolerances on the output std at 50 Karras steps (sigma 80 -> 0.002, rho 7), and the convergence order each
# method must show from 50 to 100 steps: first order (Euler, DDIM = Euler in this variable) halves its error,
# second order (Heun, DPM-Solver++(2M)) quarters it, UniPC-2 with its corrector is third order.
ODE_SAMPLERS = {"euler": (samplers.sample_euler, 0.07, 1), "ddim": (samplers.sample_ddim, 0.07, 1),
                "heun": (samplers.sample_heun, 0.01, 2), "dpmpp_2m": (samplers.sample_dpmpp_2m, 0.01, 2),
                "unipc": (samplers.sample_unipc, 0.003, 3)}


def _gaussian_std_error(sampler, n: int) -> float:
    """Relative error of the output std. The probability-flow ODE maps N(mu, s^2 + sigma_max^2) onto N(mu, s^2); every
    sampler here is affine in x for this denoiser, so running it on mu -/+ sd_T gives the exact output mean and std."""
    sig = S.append_zero(S.karras_sigmas(n, 0.002, 80.0))
    sd_T = math.sqrt(S_DATA**2 + sig[0].item() ** 2)
    out = sampler(gaussian_denoiser, torch.tensor([MU - sd_T, MU + sd_T], dtype=torch.float64), sig)
    assert abs(out.mean().item() - MU) <= 1e-9  # the mean is a fixed point of D and of every update
    return (out[1] - out[0]).item() / 2 / S_DATA - 1


@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_ode_samplers_gaussian_closed_form(name):
    sampler, rel_tol, order = ODE_SAMPLERS[name]
    err50, err100 = _gaussian_std_error(sampler, 50), _gaussian_std_error(sampler, 100)
    assert abs(err50) <= rel_tol, f"{name}: std off by {err50:.2%} at 50 steps"
    assert abs(err50 / err100) >= 0.85 * 2**order, f"{name}: error ratio {err50 / err100:.2f} for order {order}"


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "ddim_eta1"])
def test_stochastic_samplers_gaussian(name):
    """Monte Carlo on 20k draws at 50 Karras steps: mean within 5 standard errors; std within a stated tolerance.
    With the exact posterior-mean denoiser the ancestral samplers are O(h)-biased low (std -11% at 50 steps, -3% at
    200); the SDE solver is second order (+1.4%)."""
    sampler, rel_tol = {"euler_ancestral": (samplers.sample_euler_ancestral, 0.15),
                        "dpmpp_2m_sde": (samplers.sample_dpmpp_2m_sde, 0.04),
                        "ddim_eta1": (lambda *a, **k: samplers.sample_ddim(*a, eta=1.0, **k), 0.15)}[name]
    sig = S.append_zero(S.karras_sigmas(50, 0.002, 80.0))
    g = torch.Generator().manual_seed(0)
    x_T = MU + math.sqrt(S_DATA**2 + sig[0].item() ** 2) * torch.randn(20000, generator=g, dtype=torch.float64)
    out = sampler(gaussian_denoiser, x_T, sig, generator=g)
    assert abs(out.mean().item() - MU) <= 5 * S_DATA / math.sqrt(len(out))
    assert abs(out.std().item() / S_DATA - 1) <= rel_tol


# --- (4) schedules against closed forms ----------------------------------------------------------------------------

def test_betas_closed_forms():
    T = 1000
    i = torch.arange(T, dtype=torch.float64)
    scaled = (0.00085**0.5 + i / (T - 1) * (0.012**0.5 - 0.00085**0.5)) ** 2
    assert torch.allclose(S.make_betas(S.SD15).double(), scaled, rtol=1e-5)
    linear = S.make_betas(dataclasses.replace(S.SD15, beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    assert torch.allclose(linear.double(), 1e-4 + i / (T - 1) * (0.02 - 1e-4), rtol=1e-5)
    # cosine: abar_t = f(t+1)/f(0), f(t) = cos^2((t/T + 0.008)/1.008 pi/2), away from the beta clip at the end
    abar = S.make_alphas_cumprod(dataclasses.replace(S.SD15, beta_schedule="squaredcos_cap_v2")).double()
    f = torch.cos(((i + 1) / T + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert torch.allclose(abar[:900], f[:900], rtol=1e-4)
    # SD sigma range (checkpoints.md §8)
    table = S.sigmas_from_alphas_cumprod(ABAR)
    assert abs(table[0].item() - 0.0292) < 1e-4 and abs(table[-1].item() - 14.61) < 1e-2


def test_zero_terminal_snr():
    cfg = dataclasses.replace(S.SD15, rescale_zero_snr=True)
    betas = S.make_betas(cfg)
    # betas = 1 - abar_i / abar_{i-1} in float32 carry ~1 ulp of 1.0 each, whatever the order of operations
    assert torch.allclose(betas, diffusers_zero_snr(S.make_betas(S.SD15)), rtol=0, atol=5e-7)
    abar = torch.cumprod(1 - betas.double(), 0)
    assert abar[-1].item() == 0.0 and abs(abar[0].item() - ABAR[0].item()) < 1e-6


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", (7, 20, 50))
def test_timestep_spacings_match_diffusers(spacing, n):
    cfg = dict(SD15_JSON, timestep_spacing=spacing)
    for cls, multistep in ((DDIMScheduler, False), (DPMSolverMultistepScheduler, True),
                           (UniPCMultistepScheduler, True), (EulerDiscreteScheduler, False)):
        sch = cls.from_config(cfg)
        sch.set_timesteps(n)
        ours = S.spaced_timesteps(n, spacing, steps_offset=1, multistep=multistep)
        ours = ours.round() if cls is DDIMScheduler else ours
        assert torch.allclose(ours, sch.timesteps.double(), atol=1e-4), cls.__name__
    assert S.spaced_timesteps(50, "leading", steps_offset=1)[[0, 1, -1]].tolist() == [981, 961, 1]


def test_karras_and_exponential_spacing():
    sig = S.karras_sigmas(25, 0.002, 700.0)
    assert sig[0].item() == pytest.approx(700.0, rel=1e-12) and sig[-1].item() == pytest.approx(0.002, rel=1e-12)
    steps = sig ** (1 / 7)  # Karras Eq. 5: sigma^(1/rho) is linear in i
    assert torch.allclose(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(24), rtol=1e-9)
    exp = S.exponential_sigmas(10, 0.1, 10.0)
    assert torch.allclose(exp.log()[1:] - exp.log()[:-1], torch.full((9,), -math.log(100) / 9, dtype=torch.float64))


def test_sigma_t_roundtrip():
    table = S.sigmas_from_alphas_cumprod(ABAR)
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(S.t_from_sigma(table, table), t, atol=1e-9)
    assert torch.allclose(S.sigma_at(t, table), table)
    mid = (table[:-1] * table[1:]).sqrt()  # geometric midpoint = halfway in log sigma
    assert torch.allclose(S.t_from_sigma(mid, table), t[:-1] + 0.5, atol=1e-9)
    frac = torch.linspace(0, 999, 77, dtype=torch.float64)  # log=False inverts sigma_at exactly
    assert torch.allclose(S.t_from_sigma(S.sigma_at(frac, table), table, log=False), frac, atol=1e-9)
    # outside the table: clamped to the ends, as diffusers' _sigma_to_t
    assert S.t_from_sigma(torch.tensor([1e-5, 1e5]), table).tolist() == [0.0, 999.0]


def test_make_denoiser_follows_presets():
    assert isinstance(make_denoiser(S.SVD, v_net), EDMVDenoiser)
    assert type(make_denoiser(S.SD21_V, v_net)) is VDenoiser and type(make_denoiser(S.SD15, eps_net)) is EpsDenoiser
    assert S.PRESETS == {"sd15": S.SD15, "sd21_v": S.SD21_V, "sdxl": S.SDXL, "svd": S.SVD}
    with pytest.raises(ValueError, match="continuous c_noise is implemented for v_prediction only"):
        make_denoiser(dataclasses.replace(S.SVD, prediction_type="epsilon"), eps_net)
    with pytest.raises(ValueError, match="ScheduleConfig.prediction_type must be one of"):
        dataclasses.replace(S.SD15, prediction_type="x0")


def test_bad_input_raises():
    with pytest.raises(ValueError):
        S.make_betas(dataclasses.replace(S.SD15, beta_schedule="cosine"))
    with pytest.raises(ValueError):
        S.spaced_timesteps(10, "uniform")
    with pytest.raises(ValueError):
        S.spaced_timesteps(0, "leading")
    with pytest.raises(ValueError):
        samplers.sample_euler(gaussian_denoiser, torch.zeros(3), torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError):
        training.target("x0", _z(), _z(), torch.tensor([0, 1]), ABAR)


def test_min_snr_weight_against_diffusers_compute_snr():
    # Hang et al. 2023 Eq. 8-9 as diffusers' train_text_to_image.py writes it on compute_snr (an independent oracle):
    # w = min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v. t covers SNR above and below gamma.
    sch = DDPMScheduler(**{k: v for k, v in SD15_JSON.items() if k not in ("skip_prk_steps", "set_alpha_to_one")})
    t = torch.tensor([0, 10, 150, 300, 500, 999])
    snr = compute_snr(sch, t)
    assert snr.min() < 5 < snr.max()
    clipped = torch.stack([snr, torch.full_like(snr, 5.0)]).min(dim=0)[0]
    torch.testing.assert_close(training.min_snr_weight(t, ABAR, 5.0, "epsilon"), clipped / snr, rtol=1e-5, atol=0)
    torch.testing.assert_close(training.min_snr_weight(t, ABAR, 5.0, "v_prediction"), clipped / (snr + 1),
                               rtol=1e-5, atol=0)  # float32 SNR there, float64 here: measured 2.2e-7 relative


def test_offset_noise_is_one_draw_per_sample_and_channel():
    # Guttenberg 2023: eps + s n, n ~ N(0, 1) of shape (B, C, 1, 1), drawn after t and eps from the same generator
    x0, s = _z(4), 0.3
    x_t, t, target = training.sd_training_noise(x0, ABAR, generator=torch.Generator().manual_seed(1), noise_offset=s)
    g = torch.Generator().manual_seed(1)
    t_ref = torch.randint(0, 1000, (SHAPE[0],), generator=g)
    eps = torch.randn(SHAPE, generator=g) + s * torch.randn(SHAPE[:2], generator=g)[..., None, None]
    assert torch.equal(t, t_ref)
    torch.testing.assert_close(target, eps, rtol=0, atol=1e-6)  # the same draws, float32 arithmetic
    abar = ABAR[t_ref].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, rtol=0, atol=1e-6)
    # the v target carries the offset noise too (Salimans & Ho's v of the noise actually added)
    _, _, v = training.sd_training_noise(x0, ABAR, "v_prediction", generator=torch.Generator().manual_seed(1),
                                         noise_offset=s)
    torch.testing.assert_close(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0, rtol=0, atol=1e-6)
