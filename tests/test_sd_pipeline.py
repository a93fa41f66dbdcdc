"""The Stable Diffusion pipeline object (controlnext/sd_pipeline.py) against diffusers' StableDiffusion(XL)Pipeline.

Tiny pipelines written by diffusers itself (tests/sd_fixtures.py) are loaded by our loader; both sides then encode the
same prompts and sample from the same initial latents with the same scheduler. Tolerances: latents 1e-4 absolute at a
magnitude of ~30 (random VAE-free latents; float32 rounding over 6 steps of 2 UNet calls), decoded images 1e-4 in
[0, 1]. Measured: latents <= 3.2e-5, images <= 7e-6.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UniPCMultistepScheduler)

from controlnext.sd_pipeline import detect_family, load_sd, read_tokenizer, text_to_image
from tests.sd_fixtures import tiny_sd15, tiny_sdxl

PROMPTS = ["red circle with blue background", "aqua circle with white background"]
SCHEDULERS = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
BUILDERS = {"sd15": (tiny_sd15, StableDiffusionPipeline), "sdxl": (tiny_sdxl, StableDiffusionXLPipeline)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {name: build(root / name) for name, (build, _) in BUILDERS.items()}


@pytest.fixture(scope="module")
def references(folders):
    refs = {}
    for name, (_, cls) in BUILDERS.items():
        refs[name] = cls.from_pretrained(folders[name])
        refs[name].set_progress_bar_config(disable=True)
    return refs


@pytest.mark.parametrize("name,sampler", [("sd15", "ddim"), ("sd15", "unipc"), ("sdxl", "ddim"), ("sdxl", "dpmpp_2m")])
def test_text_to_image_matches_diffusers(folders, references, name, sampler):
    ours, ref = load_sd(folders[name]), references[name]
    ref.scheduler = SCHEDULERS[sampler].from_config(ref.scheduler.config)
    noise = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    common = dict(height=64, width=96, num_inference_steps=6, guidance_scale=5.0)
    expected = ref(PROMPTS, latents=noise.clone(), output_type="latent", **common).images
    latents = text_to_image(ours, PROMPTS, height=64, width=96, sampler=sampler, steps=6, guidance_scale=5.0,
                            generator=torch.Generator(), noise=noise, decode=False)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        expected_image = ref.vae.decode(expected / ref.vae.config.scaling_factor).sample
    torch.testing.assert_close(ours.decode_latents(latents), expected_image, atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_prompt_encoding_matches_diffusers(folders, references, name):
    ours, ref = load_sd(folders[name]), references[name]
    for clip_skip in (0, 1):
        if name == "sd15":
            # diffusers' own clip_skip path reads `text_encoder.text_model`, which transformers 5 flattened away: the
            # reference is what that path computes, hidden_states[-(skip + 1)] through the final LayerNorm
            ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
            with torch.no_grad():
                out = ref.text_encoder(ids, output_hidden_states=True)
                expected = ref.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
            context, pooled = ours.encode_prompt(PROMPTS, clip_skip)
            assert pooled is None
        else:
            expected, _, expected_pooled, _ = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False,
                                                                clip_skip=clip_skip or None)
            context, pooled = ours.encode_prompt(PROMPTS, clip_skip)
            torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=0)
        torch.testing.assert_close(context, expected, atol=1e-5, rtol=0)  # fp32, O(1) values, same kernels mostly
    if name == "sdxl":  # force_zeros_for_empty_prompt: the empty negative is zeros, context and pooled
        _, negative, _, negative_pooled = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
        context, pooled = ours.encode_prompt(["", ""], zero_empty=ours.config.zero_empty_negative)
        assert negative.abs().max() == 0 and context.abs().max() == 0 and pooled.abs().max() == 0
        assert ours.vector(pooled, (64, 96)).shape == (2, 32 + 6 * 256)



@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_single_file_tokenizers_pad_as_each_tower_was_trained(folders, references, name):
    """A single file carries no tokenizer: read_tokenizer builds one per tower from one vocabulary, each with its
    family's pad (SDXL: eos for CLIP-L, "!" = id 0 in open_clip for bigG). The folder loader above reads the pads from
    each tokenizer_*/ json instead, so only these ids, against transformers on the same folders, see that table."""
    ref = references[name]
    expected = [ref.tokenizer] + ([ref.tokenizer_2] if name == "sdxl" else [])
    ours = read_tokenizer(folders[name] / "tokenizer", "sdxl" if name == "sdxl" else "sd1")
    assert len(ours) == len(expected)
    for tokenizer, oracle in zip(ours, expected):
        ids = oracle(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(tokenizer(PROMPTS), ids)

def test_family_detection_and_bad_sources(tmp_path):
    assert detect_family({"cond_stage_model.transformer.text_model.x": torch.zeros(1)}) == "sd1"
    assert detect_family({"cond_stage_model.model.token_embedding.weight": torch.zeros(1)}) == "sd2"
    assert detect_family({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}) == "sdxl"
    with pytest.raises(ValueError, match="Stable Video Diffusion"):
        detect_family({"conditioner.embedders.0.open_clip.model.visual.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a Stable Diffusion single file"):
        detect_family({"conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not found"):
        load_sd(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="model_index.json"):
        load_sd(tmp_path)
