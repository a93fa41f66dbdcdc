"""Sampler overhead: the arithmetic of a 50-step loop, ours vs diffusers, in one process (issue 3).

Question: do our stateless samplers (schedulers/samplers.py + a denoiser wrapper) cost more per step than diffusers'
scheduler objects? The model is trivial (eps = 0.1 x) so that only the sampler arithmetic and Python overhead are
timed, on a 1x4x64x64 latent. Only the loop is timed: schedule construction (our sigmas and denoiser; diffusers'
from_config + set_timesteps) happens before the clock starts. Each repeat times ours and diffusers back to back
(order alternating); we report the median time of each and the median of the per-repeat ratios ours / diffusers.

Command:   pip install -e . && python experiments/bench_samplers.py [--steps 50] [--repeats 21] [--threads 1]
Expected:  ratio <= ~1 for every sampler (ours does no more tensor work per step than diffusers).
"""

import argparse
import statistics
import time

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       UniPCMultistepScheduler)

from schedulers import samplers, sigmas as S
from schedulers.denoisers import EpsDenoiser

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--repeats", type=int, default=21)
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(args.threads)

# --- setup: SD1.5's shipped scheduler config, a trivial eps model, one latent -------------------------------------
SD15_JSON = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False)
LINSPACE = S.ScheduleConfig(timestep_spacing="linspace")  # what diffusers' Euler/Heun/DPM/UniPC fill in for SD1.5


def net(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.1 * x_in


z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
abar = S.make_alphas_cumprod(S.SD15)
n = args.steps


def diffusers_loop(cls):
    """Build and set the scheduler (untimed); return the loop to time."""
    sch = cls.from_config(SD15_JSON)
    sch.set_timesteps(n)

    def loop() -> torch.Tensor:
        x = z * sch.init_noise_sigma
        for t in sch.timesteps:
            x = sch.step(net(sch.scale_model_input(x, t), t), t, x).prev_sample
        return x

    return loop


def ours(sampler, sigma_fn):
    """Build sigmas and the denoiser (untimed); return the loop to time."""
    sig, denoiser = sigma_fn(), EpsDenoiser(net, abar)
    x_T = z * (sig[0] ** 2 + 1) ** 0.5
    return lambda: sampler(denoiser, x_T, sig)


CASES = {
    "ddim": (DDIMScheduler, samplers.sample_ddim, lambda: S.ddim_sigmas(S.SD15, n)),
    "euler": (EulerDiscreteScheduler, samplers.sample_euler, lambda: S.sampling_sigmas(LINSPACE, n)),
    "heun": (HeunDiscreteScheduler, samplers.sample_heun, lambda: S.sampling_sigmas(LINSPACE, n)),
    "dpmpp_2m": (DPMSolverMultistepScheduler, samplers.sample_dpmpp_2m,
                 lambda: S.sampling_sigmas(LINSPACE, n, multistep=True)),
    "unipc": (UniPCMultistepScheduler, samplers.sample_unipc, lambda: S.sampling_sigmas(LINSPACE, n, multistep=True)),
}

# --- loop: interleaved repeats ------------------------------------------------------------------------------------
print(f"{n} steps, 1x4x64x64 fp32, {args.threads} thread(s), {args.repeats} interleaved repeats (torch {torch.__version__})")
print(f"{'sampler':10s} {'ours ms':>9s} {'diffusers ms':>13s} {'median ratio':>13s}")
for name, (cls, sampler, sigma_fn) in CASES.items():
    ours(sampler, sigma_fn)(), diffusers_loop(cls)()  # warm-up
    t_ours, t_diff, ratios = [], [], []
    for r in range(args.repeats):
        pair = {}
        for who in (("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")):
            loop = ours(sampler, sigma_fn) if who == "ours" else diffusers_loop(cls)  # fresh state, untimed
            start = time.perf_counter()
            loop()
            pair[who] = time.perf_counter() - start
        t_ours.append(pair["ours"])
        t_diff.append(pair["diffusers"])
        ratios.append(pair["ours"] / pair["diffusers"])
    print(f"{name:10s} {1e3 * statistics.median(t_ours):9.2f} {1e3 * statistics.median(t_diff):13.2f} "
          f"{statistics.median(ratios):13.2f}")
