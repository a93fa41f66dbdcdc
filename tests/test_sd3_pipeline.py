"""The SD3 pipeline object (controlnext/sd3_pipeline.py) against diffusers' StableDiffusion3Pipeline, its export in both
layouts, and ControlNeXt-SD3 (controlnext/sd3_controlnext.py) on tiny random weights (issue 19).

Tiny SD3 folders are written by diffusers itself (tests/sd3_fixtures.py), with a tiny T5 and T5-less; both sides
encode the same prompts and sample from the same latents with FlowMatchEuler (and FlowMatchHeun) schedulers.
Tolerances and why: prompt embeddings 1e-5 (fp32, the same math in another operation order; measured <= 1e-6);
final latents 1e-4 absolute at magnitude ~7 (5 steps of CFG 5 on a random MMDiT: fp32 rounding, the Euler step
computed as a lerp here and x + dt v there; measured <= 4.6e-5), decoded images 1e-4 (measured <= 3.2e-5); the
cross normalization on tokens against its closed form 1e-5 (another reduction order). Layout round trips, a zero
scale, an empty control window and the zero_conv / ControlNet arms at init are exact: tensors are copied, or an exact
zero is added on the same kernels.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import FlowMatchHeunDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_sd3_t5_checkpoint_to_diffusers,
                                                 is_clip_sd3_model, is_open_clip_sd3_model, is_t5_in_single_file)
from torch.testing import assert_close

from controlnext.checkpoint import read_state, save_state
from controlnext.control_branch import G1_SVD, TINY as TINY_BRANCH
from controlnext.controlnext import ABLATIONS, SD3 as SD3_INJECTION, Injection
from controlnext.data import fill50k_tokenizer
from controlnext.sd3_controlnext import ControlNeXtMMDiT, build_sd3_controlled
from controlnext.sd3_pipeline import TINY_SD3, TINY_SD3_T5, StableDiffusion3, is_sd3, load_sd3, text_to_image
from encoders.t5_tokenizer import T5Tokenizer
from tests.sd3_fixtures import tiny_sd3, write_spiece

PROMPTS = ["red circle with blue background", "aqua circle with white background"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> (folder written by diffusers, the diffusers pipeline itself)."""
    root = tmp_path_factory.mktemp("sd3")
    return {name: (root / name, tiny_sd3(root / name, t5=name == "t5")) for name in ("t5", "t5less")}


@pytest.fixture(scope="module")
def ours_random(tmp_path_factory) -> StableDiffusion3:
    """Our own random tiny SD3 with a tiny T5 (CLIP-L without projection, as the original layout has it)."""
    torch.manual_seed(0)
    t5_tokenizer = T5Tokenizer(write_spiece(tmp_path_factory.mktemp("spiece")))
    return StableDiffusion3.random(TINY_SD3_T5, fill50k_tokenizer(), t5_tokenizer).eval()


def sample(pipe, noise: torch.Tensor, sampler: str = "euler", **kw) -> torch.Tensor:
    return text_to_image(pipe, PROMPTS, height=64, width=96, sampler=sampler, steps=5, guidance_scale=5.0,
                         generator=torch.Generator(), noise=noise, decode=False, **kw)


def reference_latents(ref, noise: torch.Tensor) -> torch.Tensor:
    return ref(PROMPTS, latents=noise.clone(), height=64, width=96, num_inference_steps=5, guidance_scale=5.0,
               output_type="latent").images


@pytest.mark.parametrize("name,sampler", [("t5", "euler"), ("t5", "heun"), ("t5less", "euler")])
def test_text_to_image_matches_diffusers(references, name, sampler):
    folder, ref = references[name]
    ours = load_sd3(folder)
    assert (ours.config.t5 is None) == (name == "t5less") and ours.config.flow.shift == 3.0
    scheduler = ref.scheduler
    if sampler == "heun":
        ref.scheduler = FlowMatchHeunDiscreteScheduler.from_config(scheduler.config)
    noise = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    expected = reference_latents(ref, noise)
    ref.scheduler = scheduler
    latents = sample(ours, noise, sampler)
    assert expected.abs().max() > 3.0  # the model moved the latents: a real trajectory
    assert_close(latents, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        image = ref.vae.decode(expected / ref.vae.config.scaling_factor + ref.vae.config.shift_factor).sample
    assert_close(ours.decode_latents(latents), image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["t5", "t5less"])
def test_prompt_encoding_matches_diffusers(references, name):
    folder, ref = references[name]
    ours = load_sd3(folder)
    context, negative, pooled, negative_pooled = ref.encode_prompt(PROMPTS, None, None, device="cpu")
    for (got, got_pooled), want, want_pooled in ((ours.encode_prompt(PROMPTS), context, pooled),
                                                 (ours.encode_prompt(["", ""]), negative, negative_pooled)):
        assert got.shape == (2, 77 + 256, 64) and got_pooled.shape == (2, 16 + 32)
        assert_close(got, want, atol=1e-5, rtol=0)
        assert_close(got_pooled, want_pooled, atol=1e-5, rtol=0)
    assert not context[:, :77, 48:].any()  # CLIP features zero-padded from 16 + 32 to the T5 width 64
    assert context[:, 77:].any() == (name == "t5")  # T5 tokens, or zeros T5-less


def test_diffusers_export_is_what_diffusers_loads(references, tmp_path):
    folder, _ = references["t5"]
    ours = load_sd3(folder)
    ours.save(tmp_path / "out", layout="diffusers")
    again = StableDiffusion3Pipeline.from_pretrained(tmp_path / "out")
    again.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    assert_close(sample(ours, noise), reference_latents(again, noise), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="no CLIP-L projection"):  # diffusers' random CLIP-L projection
        ours.save(tmp_path / "single.safetensors")
    assert not (tmp_path / "single.safetensors").exists()


def test_original_layout_round_trips_and_is_what_diffusers_reads(ours_random, tmp_path):
    path = tmp_path / "sd3.safetensors"
    ours_random.save(path)
    state = read_state(path)
    assert is_sd3(path) and is_clip_sd3_model(state) and is_open_clip_sd3_model(state) and is_t5_in_single_file(state)
    # diffusers' single-file converters read our text encoders: the same tensors under its names
    clip_g = convert_ldm_clip_checkpoint(dict(state), "text_encoders.clip_g.transformer.")
    assert all(torch.equal(clip_g[k], v) for k, v in ours_random.text_encoders[1].state_dict().items())
    t5 = convert_sd3_t5_checkpoint_to_diffusers(dict(state))
    assert all(torch.equal(t5[k], v) for k, v in ours_random.t5.state_dict().items())
    loaded = load_sd3(path)  # tokenizer/ and tokenizer_3/ beside the file
    assert loaded.config == ours_random.config
    mine = ours_random.state_dict()
    assert loaded.state_dict().keys() == mine.keys()
    assert all(torch.equal(v, mine[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(loaded.t5_tokenizer(PROMPTS)[0], ours_random.t5_tokenizer(PROMPTS)[0])
    loaded.save(tmp_path / "folder", layout="diffusers")  # CLIP-L gets diffusers' identity projection
    noise = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(2))
    assert_close(sample(load_sd3(tmp_path / "folder"), noise), sample(ours_random, noise), atol=1e-6, rtol=0)
    t5less = load_sd3(path, use_t5=False)
    assert t5less.t5 is None and t5less.config == dataclasses.replace(ours_random.config, t5=None)


def test_bad_sources_and_inputs(ours_random, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_sd3(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="model_index.json"):
        load_sd3(tmp_path)
    (tmp_path / "sd15").mkdir()
    (tmp_path / "sd15" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert not is_sd3(tmp_path / "sd15")
    with pytest.raises(ValueError, match="is not StableDiffusion3Pipeline"):
        load_sd3(tmp_path / "sd15")
    ours_random.save(tmp_path / "whole.safetensors")
    state = {k: v for k, v in read_state(tmp_path / "whole.safetensors").items()
             if not k.startswith("text_encoders.clip_l.")}
    save_state(state, tmp_path / "no_clip.safetensors")
    with pytest.raises(ValueError, match="no text_encoders.clip_l.transformer. weights"):
        load_sd3(tmp_path / "no_clip.safetensors")
    with pytest.raises(ValueError, match="multiples of 16"):
        text_to_image(ours_random, PROMPTS, height=72, width=64, sampler="euler", steps=2, guidance_scale=2.0,
                      generator=torch.Generator())
    with pytest.raises(ValueError, match="flow samplers euler, heun"):
        text_to_image(ours_random, PROMPTS, height=64, width=64, sampler="dpmpp_2m", steps=2, guidance_scale=2.0,
                      generator=torch.Generator())


# --- ControlNeXt-SD3 -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_t5less() -> StableDiffusion3:
    torch.manual_seed(0)
    return StableDiffusion3.random(TINY_SD3, fill50k_tokenizer()).eval()


def inputs(pipe: StableDiffusion3):
    g = torch.Generator().manual_seed(3)
    context, pooled = pipe.encode_prompt(PROMPTS)
    return (torch.randn(2, 16, 8, 12, generator=g), torch.tensor([900.0, 250.0]), context, pooled,
            torch.rand(2, 3, 64, 96, generator=g))


@torch.no_grad()
def test_zero_conv_and_controlnet_leave_the_output_unchanged_at_init_cross_norm_does_not(tiny_t5less):
    x, t, context, pooled, image = inputs(tiny_t5less)
    base = tiny_t5less.mmdit(x, t, context, pooled)
    for ablation in ABLATIONS:
        model = build_sd3_controlled(ablation, tiny_t5less.mmdit, tiny_t5less.vae, TINY_BRANCH).eval()
        out = model(x, t, context, image, pooled)
        if ablation in ("zero_conv", "controlnet"):
            assert_close(out, base, atol=0, rtol=0)  # an exact zero added (zero patch embedding / zero layers)
        else:
            assert (out - base).abs().max() > 1e-2, ablation
    arms = [build_sd3_controlled(a, tiny_t5less.mmdit, tiny_t5less.vae, TINY_BRANCH) for a in ABLATIONS if ABLATIONS[a]
            is not None]
    counts = {sum(p.numel() for p in m.control_parameters().values()) - (m.gamma is not None) for m in arms}
    assert len(counts) == 1  # every ControlNeXt arm trains the same tensors (paper_norm adds γ)


@torch.no_grad()
def test_cross_normalization_acts_on_the_image_tokens_as_the_closed_form(tiny_t5less):
    """h <- h + k CN(h, c) after block 0, CN with per-sample statistics over tokens x channels (unbiased std)."""
    x, t, context, pooled, image = inputs(tiny_t5less)
    model = ControlNeXtMMDiT(tiny_t5less.mmdit, TINY_BRANCH, SD3_INJECTION).eval()
    seen = {}
    tiny_t5less.mmdit(x, t, context, pooled, control=lambda site, h: seen.setdefault(site, h))
    h = seen["block_0"]  # (B, N, C), N = 4 x 6 tokens
    c = model.features(model.prepare(image), t).flatten(2).transpose(1, 2)  # (B, N, C), the same row-major order
    mean = lambda v: v.mean(dim=(1, 2), keepdim=True)  # noqa: E731
    std = lambda v: v.std(dim=(1, 2), keepdim=True)  # noqa: E731
    expected = h + 0.7 * ((c - mean(c)) * std(h) / (std(c) + SD3_INJECTION.eps) + mean(h))
    reference = tiny_t5less.mmdit(x, t, context, pooled, control=lambda site, v: expected if site == "block_0" else v)
    assert_close(model(x, t, context, image, pooled, scale=0.7), reference, atol=1e-5, rtol=0)


def test_control_scale_window_and_bad_controls(tiny_t5less):
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(4))
    model = ControlNeXtMMDiT(tiny_t5less.mmdit, TINY_BRANCH, SD3_INJECTION).eval()
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    run = lambda **kw: text_to_image(tiny_t5less, PROMPTS, height=64, width=64, sampler="euler", steps=3,  # noqa: E731
                                     guidance_scale=3.0, generator=torch.Generator(), noise=noise, decode=False, **kw)
    plain, full = run(), run(controls=[(model, image, 1.0)])
    assert_close(run(controls=[(model, image, 0.0)]), plain, atol=0, rtol=0)  # k = 0 adds an exact 0
    assert_close(run(controls=[(model, image, 1.0)], control_window=(1.0, 1.0)), plain, atol=0, rtol=0)
    half = run(controls=[(model, image, 1.0)], control_window=(0.0, 0.5))
    assert (full - plain).abs().max() > 1e-3 and (half - full).abs().max() > 1e-4 and (half - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="at most one control"):
        run(controls=[(model, image, 1.0)] * 2)
    with pytest.raises(ValueError, match="not a site of this MMDiT"):
        ControlNeXtMMDiT(tiny_t5less.mmdit, TINY_BRANCH, Injection(site="down_0"))
    with pytest.raises(ValueError, match="not a site of this MMDiT"):
        ControlNeXtMMDiT(tiny_t5less.mmdit, TINY_BRANCH, Injection(site="block_4"))
    with pytest.raises(ValueError, match="stride 32 does not divide the 16 pixels"):
        ControlNeXtMMDiT(tiny_t5less.mmdit, G1_SVD, SD3_INJECTION)
