"""Tiny Stable Diffusion pipelines written by diffusers/transformers themselves (the test-only oracles), in the real
diffusers folder layout, with random weights: what tests/test_sd_pipeline.py and the trainer tests load.

SD1-structured (CLIP-L-like tower, 1x1-conv projections, 4 levels) and SDXL-structured (two towers, the second with a
projection, linear projections, 3 levels, size/crop conditioning) at CPU sizes. The tokenizer is a small BPE vocabulary
learned on the fill50k prompt words, in the real vocab.json + merges.txt format, so transformers' CLIPTokenizer reads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)

from controlnext.data import COLOR_WORDS
from encoders.tokenizer import EOS, learn_bpe

CORPUS = [f"{c} circle with {b} background" for c in COLOR_WORDS[:60] for b in COLOR_WORDS[60:63]]
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                 set_alpha_to_one=False)  # SD1.5's DDPM schedule (checkpoints.md §7.5)


def randomize(module: torch.nn.Module, std: float, seed: int) -> None:
    """Random weights instead of the default init (which leaves biases at 0 and norms at 1, hiding layout bugs);
    norm scales around 1 so activations keep their size through the depth."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * std
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)


def text_tower(vocab_size: int, eos: int, hidden: int, projection: int | None, act: str, seed: int):
    config = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                                         hidden_act=act, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos,
                                         projection_dim=projection or hidden)
    model = (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(config).eval()
    randomize(model, 0.05, seed)
    return model


def tiny_vae(seed: int) -> AutoencoderKL:
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4).eval()
    randomize(vae, 0.03, seed)
    return vae


def write_tokenizer(folder: Path, pad: str) -> None:
    tokenizer = learn_bpe(CORPUS, 300, pad_token=pad)
    tokenizer.save(folder)


def tiny_sd15(folder: Path, seed: int = 0) -> Path:
    """A diffusers StableDiffusionPipeline folder with SD1.5's structure at toy widths."""
    write_tokenizer(folder / "tokenizer", EOS)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    eos = len(tokenizer) - 1
    unet = UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8,
                                attention_head_dim=(2, 2, 4, 4), cross_attention_dim=32, sample_size=8,
                                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3).eval()
    randomize(unet, 0.03, seed)
    pipe = StableDiffusionPipeline(vae=tiny_vae(seed + 1), text_encoder=text_tower(len(tokenizer), eos, 32, None,
                                                                                  "quick_gelu", seed + 2),
                                   tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """A diffusers StableDiffusionXLPipeline folder with SDXL's structure at toy widths (towers of width 16 + 32)."""
    write_tokenizer(folder / "tokenizer", EOS)
    write_tokenizer(folder / "tokenizer_2", "!")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    eos = len(tokenizer) - 1
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                                attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2),
                                cross_attention_dim=48, use_linear_projection=True, sample_size=8,
                                down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                                up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
                                addition_embed_type="text_time", addition_time_embed_dim=256,
                                projection_class_embeddings_input_dim=32 + 6 * 256).eval()
    randomize(unet, 0.03, seed)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(seed + 1),
                                     text_encoder=text_tower(len(tokenizer), eos, 16, None, "quick_gelu", seed + 2),
                                     text_encoder_2=text_tower(len(tokenizer_2), eos, 32, 32, "gelu", seed + 3),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=DDIMScheduler(**SCHEDULER), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder)
    return folder
