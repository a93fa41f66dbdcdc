"""Guidance helpers: classifier-free guidance, guidance rescale, SVD's per-frame guidance ramp.

CFG is Ho & Salimans 2022 ("Classifier-Free Diffusion Guidance", Eq. 6): pred = uncond + w (cond - uncond). It is
affine, so it gives the same sampler step whether it is applied to eps, v or x0_hat (all are affine in one another at
fixed sigma); controlnext/sampling.py applies it inside the denoiser closure. Guidance rescale is Lin et al. 2023
("Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4 and Alg. 2); it is not affine, and like
diffusers we apply it to the network output (eps or v). The SVD ramp is the linspace(min, max, F) of
huggingface/diffusers@v0.42.1:src/diffusers/pipelines/stable_video_diffusion/pipeline_stable_video_diffusion.py and of
Stability-AI/generative-models sgm/modules/diffusionmodules/guiders.py (LinearPredictionGuider).

Left out: negative-prompt weighting schemes, guidance intervals, and control: control enters the denoiser closure.
"""

import torch


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """uncond + scale (cond - uncond); scale may be a tensor that broadcasts (e.g. SVD's (B, F, 1, 1, 1) ramp)."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 Alg. 2: scale `guided` to the per-sample std of `cond`, then mix by phi (0 = off). (B, ...)"""
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"guidance rescale phi must be in [0, 1], got {phi}")
    dims = list(range(1, cond.ndim))  # per sample: all but the batch dim (unbiased std, as diffusers)
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided  # phi = 0.7 in the paper


def svd_frame_guidance(min_scale: float, max_scale: float, num_frames: int, batch_size: int = 1) -> torch.Tensor:
    """SVD's per-frame scale, linear from min_scale (frame 0, the conditioning image) to max_scale. -> (B, F, 1, 1, 1)"""
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    ramp = torch.linspace(min_scale, max_scale, num_frames)  # (F,)
    return ramp.expand(batch_size, num_frames).reshape(batch_size, num_frames, 1, 1, 1)  # (B, F, 1, 1, 1)
