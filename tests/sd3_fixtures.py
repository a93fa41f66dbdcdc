"""Tiny SD3 pipelines written by diffusers/transformers themselves (the test-only oracles), in the real diffusers folder
layout, with random weights: what tests/test_sd3_pipeline.py and tests/test_sd3_train.py load.

The shapes are those of controlnext/sd3_pipeline.py TINY_SD3(_T5): CLIP-L 16 wide (with a projection, as diffusers
holds it), CLIP-G 32 wide with a 32-wide projection, a T5 v1.1 of width 64 (or none: T5-less), the 4-block MMDiT of
width 32 attending 64-wide tokens, a 4-level 16-channel VAE with SD3's shift and scale. Tokenizers: the CLIP BPE
vocabulary of tests/sd_fixtures.py (pads eos and "!"), and a small unigram SentencePiece model laid out like T5's
(<pad> 0, </s> 1, <unk> 2, no bos), written before diffusers saves the pipeline so the folders also hold
vocab.json / merges.txt / spiece.model as the released folders do.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece
import torch
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from encoders.tokenizer import EOS, learn_bpe
from tests.sd_fixtures import CORPUS, randomize, text_tower


def fan_in_randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, matrices at std fan_in^-1/2 and vectors at 0.3, so the MMDiT's activations stay O(1)
    (its default init zeroes nothing, but leaves adaLN and biases too small to exercise the layout)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.3 if p.ndim == 1 else p[0].numel() ** -0.5))


def write_spiece(folder: Path) -> Path:
    """tokenizer_3/spiece.model: a ~90-piece unigram model with T5's special ids."""
    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 5), model_prefix=str(folder / "spiece"), model_type="unigram", vocab_size=100,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (folder / "spiece.vocab").unlink()
    return folder / "spiece.model"


def tiny_sd3(folder: Path, t5: bool = True, seed: int = 0) -> StableDiffusion3Pipeline:
    """Write a diffusers StableDiffusion3Pipeline folder with SD3's structure at toy widths; return the pipeline.
    T5-less (t5=False): model_index.json holds null for text_encoder_3 / tokenizer_3, as diffusers writes it."""
    learn_bpe(CORPUS, 300, pad_token=EOS).save(folder / "tokenizer")
    learn_bpe(CORPUS, 300, pad_token="!").save(folder / "tokenizer_2")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    eos = len(tokenizer) - 1
    text_encoder_3 = tokenizer_3 = None
    if t5:
        write_spiece(folder / "tokenizer_3")
        tokenizer_3 = transformers.T5TokenizerFast.from_pretrained(folder / "tokenizer_3")
        config = transformers.T5Config(vocab_size=len(tokenizer_3), d_model=64, d_kv=8, d_ff=64, num_layers=2,
                                       num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0)
        text_encoder_3 = transformers.T5EncoderModel(config).eval()
        randomize(text_encoder_3, 0.1, seed + 4)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=48, pos_embed_max_size=16)
    fan_in_randomize(transformer, seed)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                        shift_factor=0.0609).eval()
    randomize(vae, 0.03, seed + 1)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_tower(len(tokenizer), eos, 16, 16, "quick_gelu", seed + 2), tokenizer=tokenizer,
        text_encoder_2=text_tower(len(tokenizer_2), eos, 32, 32, "gelu", seed + 3), tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe
