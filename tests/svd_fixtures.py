"""A tiny Stable Video Diffusion pipeline written by diffusers/transformers themselves (the test-only oracles), in the
real diffusers folder layout (model_index.json, unet/, vae/, image_encoder/, feature_extractor/, scheduler/), with
random weights: what tests/test_svd_pipeline.py and tests/test_video_train.py load, and what diffusers'
StableVideoDiffusionPipeline.from_pretrained loads too.

The UNet and VAE are unet/svd_unet.py TINY and vae/temporal_decoder.py TINY written as diffusers configs; the image
tower takes 224 px (diffusers' pipeline resizes to 224 whatever the tower) in 4 x 4 patches of 56.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import transformers
from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                       UNetSpatioTemporalConditionModel)

from unet.keymap import svd_unet_config_to_diffusers
from unet.svd_unet import TINY as TINY_UNET, SVDUNetConfig
from vae.keymap import vae_config_to_diffusers
from vae.temporal_decoder import TINY as TINY_VAE

# Two levels, one VideoResBlock each: 424 UNet tensors instead of TINY's 1426 (FSDP and DCP cost per tensor).
MICRO_UNET = dataclasses.replace(TINY_UNET, channels=(32, 64), attention=(True, False), heads=(2, 4),
                                 transformer_depth=(1, 1), layers_per_block=1)
# The SVD repos' scheduler_config.json (checkpoints.md §7.5), less the keys EulerDiscreteScheduler ignores.
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
                 num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
                 steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)


def randomize(module: torch.nn.Module, std: float, seed: int) -> None:
    """Random weights instead of the default init (zero biases and unit norms hide layout bugs); norm gains around 1,
    mix factors spread over a few units so every blend differs from one half."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("mix_factor"):
                p.copy_(noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + std * noise)
            else:
                p.copy_(std * noise)


def fields(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def tiny_svd(folder: Path, seed: int = 0, unet_config: SVDUNetConfig = TINY_UNET) -> Path:
    """A diffusers StableVideoDiffusionPipeline folder with SVD's structure at toy widths (`unet_config`: MICRO_UNET
    for the multi-process tests, whose cost is per tensor)."""
    unet = UNetSpatioTemporalConditionModel(**fields(svd_unet_config_to_diffusers(unet_config))).eval()
    randomize(unet, 0.05, seed)
    vae = AutoencoderKLTemporalDecoder(**fields(vae_config_to_diffusers(TINY_VAE))).eval()
    randomize(vae, 0.05, seed + 1)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=224, patch_size=56, hidden_act="gelu",
                                           projection_dim=TINY_UNET.context_dim)
    image_encoder = transformers.CLIPVisionModelWithProjection(vision).eval()
    randomize(image_encoder, 0.05, seed + 2)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet,
                                        scheduler=EulerDiscreteScheduler(**SCHEDULER),
                                        feature_extractor=transformers.CLIPImageProcessorPil())
    pipe.save_pretrained(folder)
    return folder
