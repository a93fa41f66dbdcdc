"""SD3 (issue 19): the MMDiT, the SD3 VAE preset and the SD3 ControlNet baseline against diffusers on tiny configs,
both MMDiT checkpoint layouts (through diffusers' own single-file converter), full-size parameter counts on the meta
device, and one clear error per kind of bad input. diffusers is a test-only oracle (requirements-dev.txt).

Tolerances and why:
- ours vs diffusers, fp32: 1e-5 max abs (PARITY) on outputs of size ~1-6 from random weights. Same maths; the
  differences are float rounding from operation order (joint attention concatenates [context; image] as the original
  code, diffusers [image; context]; einops vs view/transpose); measured <= 3e-6.
- checkpointing vs not: 1e-6 (the same kernels are recomputed; only the backward accumulation order may differ).
- layout round trips and the no-op at init: exact (pure copies of tensors; adding an exact zero).
"""

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import SD3ControlNetModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_sd3_transformer_checkpoint_to_diffusers
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from torch.testing import assert_close

from controlnext.checkpoint import KeyMap, read_state, save_state
from controlnext.sd3_controlnet import TINY_CONTROLNET, SD3ControlNet, residual_hook
from controlnext.sd3_weights import load_mmdit, load_sd3_controlnet, load_sd3_vae, save_mmdit
from mmdit.keymap import config_from_diffusers, config_to_diffusers
from mmdit.mmdit import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, TINY, MMDiT, sincos_table
from vae.autoencoder import SD3, AutoencoderKL
from vae.keymap import SD_VAE_ROWS, vae_config_to_diffusers

PARITY = 1e-5
TINY_35 = dataclasses.replace(TINY, qk_norm=True, dual_attention_layers=(0, 2))  # SD3.5's additions, tiny
VARIANTS = {"sd3": TINY, "sd35": TINY_35}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (zero-initialised ones and norm weights too), scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else p[0].numel() ** -0.5))
    return model.eval()


def diffusers_twin(cfg) -> SD3Transformer2DModel:
    return randomize(SD3Transformer2DModel(**{k: v for k, v in config_to_diffusers(cfg).items() if k[0] != "_"}))


def inputs(cfg, B: int = 2, H: int = 12, W: int = 20, M: int = 7):
    """Non-square latent (6 x 10 patches of a 16 x 16 table), two timesteps, M text tokens."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, cfg.in_channels, H, W, generator=g), torch.tensor([999.0, 250.5]),
            torch.randn(B, M, cfg.context_dim, generator=g), torch.randn(B, cfg.pooled_dim, generator=g))


# --- the MMDiT ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_mmdit_matches_diffusers(variant):
    cfg = VARIANTS[variant]
    reference = diffusers_twin(cfg)
    ours = load_mmdit(reference.state_dict(), cfg)  # by identity, strict
    x, t, context, y = inputs(cfg)
    with torch.no_grad():
        expected = reference(x, context, y, t).sample
        assert expected.abs().max() > 1.0  # a real signal, not a degenerate model
        assert_close(ours(x, t, context, y), expected, atol=PARITY, rtol=0)


def test_position_table_equals_diffusers():
    # fresh models build the same table; and SD3's own geometry (192 x 192 patches scaled to 64) at a small width
    assert_close(MMDiT(TINY).pos_embed.pos_embed, diffusers_twin(TINY).pos_embed.pos_embed, atol=1e-7, rtol=0)
    expected = get_2d_sincos_pos_embed(64, 192, base_size=128 // 2, output_type="pt").float()
    assert_close(sincos_table(64, 192, 128 // 2), expected, atol=1e-6, rtol=0)


def test_control_hook_sites_tokens_and_identity():
    model = randomize(MMDiT(TINY))
    x, t, context, y = inputs(TINY)
    seen = []

    def record(site, h):
        seen.append((site, tuple(h.shape)))
        return h

    with torch.no_grad():
        plain = model(x, t, context, y)
        assert_close(model(x, t, context, y, control=record), plain, atol=0, rtol=0)  # same kernels, identity hook
        ramp = torch.linspace(-1, 1, TINY.hidden)  # not a constant: LayerNorm would remove a uniform offset
        bumped = model(x, t, context, y, control=lambda site, h: h + (site == "block_1") * ramp)
    N = (12 // 2) * (20 // 2)
    assert seen == [(f"block_{k}", (2, N, TINY.hidden)) for k in range(TINY.depth)]
    assert (bumped - plain).abs().max() > 1e-3  # the hook's h is what the next block sees


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(MMDiT(TINY_35)).train()
    x, t, context, y = inputs(TINY_35)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        model(x, t, context, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0)


def test_parameter_counts_and_keys_at_full_size():
    # measured with diffusers 0.42.1 on the meta device; the position table is a persistent buffer in both
    counts = {SD3_MEDIUM: (2_028_328_000, 56_623_104), SD35_MEDIUM: (2_243_171_520, 226_492_416),
              SD35_LARGE: (8_056_627_520, 89_653_248)}
    with torch.device("meta"):
        for cfg, (params, table) in counts.items():
            model = MMDiT(cfg)
            assert sum(p.numel() for p in model.parameters()) == params
            assert sum(b.numel() for b in model.buffers()) == table
        for cfg in (SD3_MEDIUM, SD35_MEDIUM):  # identity at full size: the same names and shapes as diffusers
            reference = SD3Transformer2DModel(**{k: v for k, v in config_to_diffusers(cfg).items() if k[0] != "_"})
            assert ({k: v.shape for k, v in MMDiT(cfg).state_dict().items()}
                    == {k: v.shape for k, v in reference.state_dict().items()})
        assert sum(p.numel() for p in AutoencoderKL(SD3).parameters()) == 83_819_683


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_layout_round_trips_through_diffusers_converter(variant, tmp_path):
    cfg = VARIANTS[variant]
    ours = randomize(MMDiT(cfg))
    save_mmdit(ours, tmp_path / "sd3.safetensors", layout="original")
    state = read_state(tmp_path / "sd3.safetensors")
    assert all(k.startswith("model.diffusion_model.") for k in state)
    assert state["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].shape == (3 * cfg.hidden, cfg.hidden)
    remaining = dict(state)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(remaining)  # pops every key it understands
    assert not remaining, f"keys diffusers' converter does not know: {sorted(remaining)[:5]}"
    expected = ours.state_dict()
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], expected[k]) for k in expected)
    loaded = load_mmdit(tmp_path / "sd3.safetensors")  # config detected from the weights
    assert loaded.config == cfg
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_loads_diffusers_folders_and_ignores_other_components(tmp_path):
    reference = diffusers_twin(TINY_35)
    reference.save_pretrained(tmp_path / "pipe" / "transformer")
    from_pipeline = load_mmdit(tmp_path / "pipe")  # pipeline folder: transformer/ and its config.json
    assert from_pipeline.config == TINY_35 == config_from_diffusers(dict(reference.config))
    x, t, context, y = inputs(TINY_35)
    with torch.no_grad():
        assert_close(from_pipeline(x, t, context, y), reference(x, context, y, t).sample, atol=PARITY, rtol=0)
    save_mmdit(from_pipeline, tmp_path / "out")  # diffusers reads what we write, config.json included
    again = SD3Transformer2DModel.from_pretrained(tmp_path / "out")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in reference.state_dict().items())
    save_mmdit(from_pipeline, tmp_path / "single.safetensors", layout="original")
    whole = {**read_state(tmp_path / "single.safetensors"), "first_stage_model.decoder.conv_in.weight": torch.zeros(1),
             "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}
    assert load_mmdit(whole).config == TINY_35  # the VAE and text encoders of a single file are not the MMDiT's


def test_bad_weights_and_inputs_raise_one_clear_error(tmp_path):
    state = diffusers_twin(TINY).state_dict()
    with pytest.raises(ValueError, match="missing keys.*\n.*proj_out.bias"):
        load_mmdit({k: v for k, v in state.items() if k != "proj_out.bias"}, TINY)
    with pytest.raises(ValueError, match="wrong shape"):
        load_mmdit(state, dataclasses.replace(TINY, context_dim=25))
    with pytest.raises(ValueError, match="not an SD3 MMDiT"):
        load_mmdit({"conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown MMDiT preset"):
        load_mmdit(state, "sd4")
    with pytest.raises(ValueError, match="qk_norm='layer_norm' is not supported"):
        config_from_diffusers({**config_to_diffusers(TINY), "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="unknown layout"):
        save_mmdit(MMDiT(TINY), tmp_path / "x", layout="ckpt")
    assert not (tmp_path / "x").exists()
    model, (x, t, context, y) = MMDiT(TINY), inputs(TINY)
    for bad, match in ((x[:, :3], "latent must be"), (x[..., :11, :], "divisible by 2"),
                       (torch.zeros(2, 16, 34, 20), "exceeds the position table")):
        with pytest.raises(ValueError, match=match):
            model(bad, t, context, y)
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, context[..., :5], y)
    with pytest.raises(ValueError, match="pooled text y must be"):
        model(x, t, context, y[:1])


# --- the SD3 VAE --------------------------------------------------------------------------------------------------------


def test_sd3_vae_matches_diffusers_and_loads_both_layouts(tmp_path):
    # SD3's VAE at tiny widths; four levels, as the original-layout rows write the released decoder out literally
    cfg = dataclasses.replace(SD3, block_out_channels=(32, 32, 64, 64), layers_per_block=1)
    fields = {k: v for k, v in vae_config_to_diffusers(cfg).items() if k[0] != "_"}
    assert fields["shift_factor"] == 0.0609 and not fields["use_quant_conv"] and fields["latent_channels"] == 16
    reference = randomize(DiffusersAutoencoderKL(**fields))
    reference.save_pretrained(tmp_path / "pipe" / "vae")
    ours = load_sd3_vae(tmp_path / "pipe")  # config.json read: 16 channels, no quant convs, scale and shift
    assert ours.config == cfg
    x, latent = torch.randn(2, 3, 32, 48), torch.randn(2, 16, 4, 6)
    with torch.no_grad():
        theirs, mine = reference.encode(x).latent_dist, ours.encode(x)
        assert_close(mine.mean, theirs.mean, atol=PARITY, rtol=0)
        assert_close(mine.logvar, theirs.logvar, atol=PARITY, rtol=0)
        # the SD3 pipelines: latent = (z - shift) * scale in, z = latent / scale + shift out
        z = theirs.sample(torch.Generator().manual_seed(3))
        assert_close(ours.encode_latent(x, torch.Generator().manual_seed(3)), (z - 0.0609) * 1.5305, atol=PARITY, rtol=0)
        image = reference.decode(latent / 1.5305 + 0.0609).sample
        assert_close(ours.decode_latent(latent), image, atol=PARITY, rtol=0)
    # the original single file: LDM names under first_stage_model., as diffusers' converter reads them
    ldm, _ = KeyMap(SD_VAE_ROWS).inverse().apply(reference.state_dict())
    single = {**{f"first_stage_model.{k}": v for k, v in ldm.items()}, "model.diffusion_model.pos_embed": torch.zeros(1)}
    converted = convert_ldm_vae_checkpoint(dict(single), fields)
    assert all(torch.equal(converted[k], v) for k, v in reference.state_dict().items())
    save_state(single, tmp_path / "sd3.safetensors")
    loaded = load_sd3_vae(tmp_path / "sd3.safetensors", cfg)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())


# --- the SD3 ControlNet baseline ----------------------------------------------------------------------------------------


def test_sd3_controlnet_matches_diffusers(tmp_path):
    cfg = TINY_CONTROLNET
    transformer = diffusers_twin(cfg.mmdit)
    fields = {k: v for k, v in config_to_diffusers(cfg.mmdit).items() if k[0] != "_"}
    controlnet = randomize(SD3ControlNetModel(**{**fields, "num_layers": cfg.num_layers}), seed=1)  # zero layers too
    controlnet.save_pretrained(tmp_path / "controlnet")
    ours = load_sd3_controlnet(tmp_path, cfg.mmdit)  # config.json read and checked against the MMDiT's
    assert ours.config == cfg
    mmdit = load_mmdit(transformer.state_dict(), cfg.mmdit)
    x, t, context, y = inputs(cfg.mmdit)
    control = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = controlnet(x, control, 0.7, context, y, t).controlnet_block_samples
        mine = ours(x, t, context, y, control, scale=0.7)
        for a, b in zip(mine, theirs, strict=True):
            assert_close(a, b, atol=PARITY, rtol=0)
        expected = transformer(x, context, y, t, block_controlnet_hidden_states=theirs).sample
        assert_close(mmdit(x, t, context, y, control=residual_hook(mine, cfg.mmdit.depth)), expected,
                     atol=PARITY, rtol=0)
    with pytest.raises(ValueError, match="does not describe the given MMDiT: pooled_projection_dim"):
        load_sd3_controlnet(tmp_path, dataclasses.replace(cfg.mmdit, pooled_dim=8))


def test_sd3_controlnet_is_an_exact_noop_at_init_and_copies_the_mmdit():
    mmdit = randomize(MMDiT(TINY))
    controlnet = SD3ControlNet.from_mmdit(mmdit, num_layers=2)
    copied = controlnet.state_dict()
    assert all(torch.equal(copied[k], v) for k, v in mmdit.state_dict().items()
               if k.startswith(("pos_embed.", "time_text_embed.", "transformer_blocks.1.")))
    x, t, context, y = inputs(TINY)
    with torch.no_grad():
        residuals = controlnet(x, t, context, y, torch.randn(x.shape))
        assert len(residuals) == 2 and all(not r.any() for r in residuals)
        assert_close(mmdit(x, t, context, y, control=residual_hook(residuals, TINY.depth)), mmdit(x, t, context, y),
                     atol=0, rtol=0)  # adding exact zeros
    with pytest.raises(ValueError, match="num_layers must be in 1..3"):
        SD3ControlNet.from_mmdit(mmdit, num_layers=4)
    with pytest.raises(ValueError, match="control latent must be"):
        controlnet(x, t, context, y, torch.randn(2, 16, 4, 4))
