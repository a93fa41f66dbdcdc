"""VAE (issue 7): parity with diffusers on tiny configs, both checkpoint layouts, full-size parameter counts, tiled and
chunked decoding, and one clear error per kind of bad input. diffusers is a test-only oracle (requirements-dev.txt).

Tolerances and why:
- ours vs diffusers, fp32: 1e-5 max abs. Same maths; the only differences are float rounding from operation order
  (GroupNorm on a transposed view in diffusers' attention, 1 - (1 - alpha) in its AlphaBlender); measured <= 8e-6.
- frame-chunked vs unchunked temporal decode: 1e-5. Only per-frame layers are chunked, so it is the same computation
  in slices; oneDNN may pick another conv algorithm for another batch size (measured 0 to 2.6e-6).
- tiled vs untiled: not exact by design (each tile normalises with its own GroupNorm statistics and its convs see zero
  padding at the tile borders). The pieces are checked exactly: one tile is the untiled path; the blend is a partition
  of unity (a pointwise function comes out unchanged, so there is no seam). On a whole random tiny model (2 levels,
  8-latent tiles, 4 overlap, 3 x 3 tiles) the bound is a relative mean error of 0.45 and a max abs error of 1.0
  (measured 0.30-0.37 and 0.57-0.69 over seeds 0-2, outputs up to ~2.5): random weights and tiles this small make the
  border effects large. The full SD config at 1024x1024 with the default 64/16 tiles measures 0.058 relative mean and
  0.26 max abs error (random weights, experiments/bench_vae.py); trained weights were not available offline.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import AutoencoderKLTemporalDecoder
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from controlnext.checkpoint import KeyMap, read_state, save_state
from controlnext.loaders import load_temporal_vae, load_vae, save_vae
from vae.keymap import vae_config_to_diffusers
from vae.autoencoder import SD, TINY, AutoencoderKL, blend_ramp, tile_spans, tiled
from vae.keymap import SD_VAE_ROWS, SVD_FIRST_STAGE_ROWS
from vae.temporal_decoder import SVD, TemporalAutoencoder, TemporalVAEConfig
from vae.temporal_decoder import TINY as TINY_VIDEO

PARITY = 1e-5


def diffusers_twin(config):
    """The diffusers model equal to `config`, random weights (mix factors randomised so the mix is tested)."""
    fields = {k: v for k, v in vae_config_to_diffusers(config).items() if not k.startswith("_")}
    video = isinstance(config, TemporalVAEConfig)
    model = (AutoencoderKLTemporalDecoder if video else DiffusersAutoencoderKL)(**fields)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):
                p.normal_()
    return model.eval()


def same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- shapes and the posterior -----------------------------------------------------------------------------------------


def test_tiny_shapes_posterior_and_scale():
    model = AutoencoderKL(TINY).eval()
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == (2, 4, 2, 3) and posterior.kl().shape == (2,)
        assert torch.equal(posterior.sample(torch.Generator().manual_seed(1)),
                           posterior.sample(torch.Generator().manual_seed(1)))
        assert torch.equal(posterior.mode(), posterior.mean)
        latent = model.encode_latent(x, torch.Generator().manual_seed(1))
        assert torch.allclose(latent, TINY.latent_scale * posterior.sample(torch.Generator().manual_seed(1)))
        assert model.decode(posterior.mean).shape == (2, 3, 16, 24)
        assert torch.allclose(model.decode_latent(latent), model.decode(latent / TINY.latent_scale))
    assert SD.latent_scale == 0.18215 and SVD.latent_scale == 0.18215
    from vae.autoencoder import SDXL
    assert SDXL.latent_scale == 0.13025


# --- parity with diffusers --------------------------------------------------------------------------------------------


def test_autoencoder_kl_matches_diffusers():
    reference = diffusers_twin(TINY)
    ours = load_vae(reference.state_dict(), TINY).eval()  # strict: every key accounted for
    x = torch.randn(2, 3, 32, 32)
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        theirs, mine = reference.encode(x).latent_dist, ours.encode(x)
        assert (theirs.mean - mine.mean).abs().max() <= PARITY
        assert (theirs.logvar - mine.logvar).abs().max() <= PARITY
        assert (theirs.kl() - mine.kl()).abs().max() <= PARITY * theirs.kl().abs().max()
        sample_theirs = theirs.sample(torch.Generator().manual_seed(3))
        assert (sample_theirs - mine.sample(torch.Generator().manual_seed(3))).abs().max() <= PARITY
        assert (reference.decode(z).sample - ours.decode(z)).abs().max() <= PARITY


def test_temporal_vae_matches_diffusers():
    reference = diffusers_twin(TINY_VIDEO)
    ours = load_temporal_vae(reference.state_dict(), TINY_VIDEO).eval()
    x = torch.randn(2, 3, 16, 16)
    B, num_frames = 1, 4
    z = torch.randn(B, num_frames, 4, 2, 3)
    with torch.no_grad():
        theirs, mine = reference.encode(x).latent_dist, ours.encode(x)
        assert (theirs.mean - mine.mean).abs().max() <= PARITY
        assert (theirs.logvar - mine.logvar).abs().max() <= PARITY
        video = reference.decode(z.flatten(0, 1), num_frames=num_frames).sample.unflatten(0, (B, num_frames))
        assert (video - ours.decode(z)).abs().max() <= PARITY


# --- checkpoint layouts -----------------------------------------------------------------------------------------------


def test_original_layout_round_trip_through_diffusers_converter(tmp_path):
    ours = AutoencoderKL(TINY).eval()
    save_vae(ours, tmp_path / "vae.safetensors", layout="original")
    state = read_state(tmp_path / "vae.safetensors")
    assert all(k.startswith("first_stage_model.") for k in state)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in the original layout
    config = vae_config_to_diffusers(TINY)
    converted = convert_ldm_vae_checkpoint(state, config)
    reference = DiffusersAutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    reference.load_state_dict(converted, strict=True)
    direct = DiffusersAutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    direct.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reference(x).sample, direct(x).sample)
        assert (reference(x).sample - ours(x)).abs().max() <= PARITY
    assert same_tensors(load_vae(tmp_path / "vae.safetensors", TINY), ours)
    # a whole single file: the other components are ignored
    save_state({**state, "model.diffusion_model.conv_in.weight": torch.zeros(1), "betas": torch.zeros(3)},
               tmp_path / "full.safetensors")
    assert same_tensors(load_vae(tmp_path / "full.safetensors", TINY), ours)


def test_diffusers_folder_and_legacy_names(tmp_path):
    ours = AutoencoderKL(TINY)
    save_vae(ours, tmp_path / "vae", layout="diffusers")
    loaded = load_vae(tmp_path)  # a pipeline folder holding vae/, config read from vae/config.json
    assert loaded.config.block_out_channels == TINY.block_out_channels and same_tensors(loaded, ours)
    legacy = {k.replace("attentions.0.to_q.", "attentions.0.query.").replace("attentions.0.to_out.0.",
                                                                               "attentions.0.proj_attn."): v
              for k, v in ours.state_dict().items()}
    assert same_tensors(load_vae(legacy, TINY), ours)


def test_temporal_layouts_round_trip(tmp_path):
    ours = TemporalAutoencoder(TINY_VIDEO)
    save_vae(ours, tmp_path / "svd.safetensors", layout="original")
    state = read_state(tmp_path / "svd.safetensors")
    assert "conditioner.embedders.3.encoder.quant_conv.weight" in state  # where the release keeps it (§4.3)
    assert "first_stage_model.decoder.conv_out.time_mix_conv.weight" in state
    assert "first_stage_model.decoder.up.0.block.0.time_stack.in_layers.0.weight" in state
    # a release-like file: the UNet, the embedder's image decoder and the first stage's own encoder are dropped
    extra = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
             "conditioner.embedders.3.encoder.decoder.conv_in.weight": torch.zeros(1),
             "conditioner.embedders.3.encoder.post_quant_conv.weight": torch.zeros(1)}
    save_state({**state, **extra}, tmp_path / "release.safetensors")
    assert same_tensors(load_temporal_vae(tmp_path / "release.safetensors", TINY_VIDEO), ours)
    # SGM's first stage alone has no quant_conv: the model is built without one
    first_stage = {k: v for k, v in state.items() if k.startswith("first_stage_model.")}
    alone = load_temporal_vae(first_stage, "tiny")
    assert alone.quant_conv is None and torch.equal(alone.encoder.conv_in.weight, ours.encoder.conv_in.weight)
    save_vae(ours, tmp_path / "vae", layout="diffusers")
    assert same_tensors(load_temporal_vae(tmp_path / "vae"), ours)


def test_parameter_counts_at_full_size():
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    with torch.device("meta"):
        sd, svd = AutoencoderKL(SD), TemporalAutoencoder(SVD)
        first_stage = TemporalAutoencoder(dataclasses.replace(SVD, use_quant_conv=False))
    assert count(sd) == 83_653_863  # checkpoints.md §9
    assert (count(sd.encoder), count(sd.decoder)) == (34_163_592, 49_490_179)
    assert count(svd) == 97_742_847 and count(svd.decoder) == 63_579_183
    assert count(first_stage) == 97_742_775  # SGM first_stage_model: no quant_conv
    # the original layouts at full size, on meta: key counts and names of checkpoints.md §2.1, §4.1, §4.2
    sd_keys, _ = KeyMap(SD_VAE_ROWS).inverse().apply(sd.state_dict())
    assert len(sd_keys) == 248 and {"decoder.up.1.block.0.nin_shortcut.weight", "decoder.up.3.upsample.conv.weight",
                                    "encoder.down.2.block.0.nin_shortcut.weight"} <= sd_keys.keys()
    svd_keys, _ = KeyMap(SVD_FIRST_STAGE_ROWS).inverse().apply(first_stage.state_dict())
    assert len(svd_keys) == 372 and len(svd.state_dict()) == 374
    assert {"decoder.mid.block_2.time_stack.out_layers.3.weight", "decoder.up.0.block.2.mix_factor",
            "decoder.conv_out.time_mix_conv.weight", "decoder.mid.attn_1.proj_out.weight"} <= svd_keys.keys()


# --- memory: tiling and chunking --------------------------------------------------------------------------------------


def test_tiling_pieces_are_exact():
    # one tile covering the image is the untiled path
    model = AutoencoderKL(dataclasses.replace(TINY, tile_size=4)).eval()
    x, z = torch.randn(1, 3, 32, 32), torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert (model.decode(z, tiled_decode=True) - model.decode(z)).abs().max() <= PARITY
        assert (model.encode(x, tiled_encode=True).mean - model.encode(x).mean).abs().max() <= PARITY
    # the blend is seam-free: a pointwise function is reproduced exactly, resolution going up or down
    h = torch.randn(2, 5, 24, 20)
    up = lambda t: F.interpolate(t, scale_factor=8)  # noqa: E731
    assert (tiled(up, h, 8, 4, 1, 8) - up(h)).abs().max() <= 1e-6
    image = torch.randn(1, 3, 96, 80)
    down = lambda t: F.avg_pool2d(t, 8)  # noqa: E731
    assert (tiled(down, image, 8, 3, 8, 1) - down(image)).abs().max() <= 1e-6


def test_blend_ramps_closed_form_and_partition_of_unity():
    # Two 8-pixel tiles sharing 4: the later one rises over the middle half of the overlap (pixel centres 0.5..3.5,
    # (pos - 1) / 2 clamped), the earlier one falls over it, and they sum to one (tiled() divides by the sum anyway,
    # so only this check sees a ramp that does not).
    spans = [(0, 8), (4, 12)]
    torch.testing.assert_close(blend_ramp(spans, 1, 1), torch.tensor([0, 0.25, 0.75, 1, 1, 1, 1, 1]), rtol=0, atol=1e-7)
    torch.testing.assert_close(blend_ramp(spans, 0, 1), torch.tensor([1, 1, 1, 1, 1, 0.75, 0.25, 0]), rtol=0, atol=1e-7)
    for length, tile, overlap, scale in ((20, 8, 4, 1), (24, 8, 4, 8), (17, 6, 3, 2)):
        spans = tile_spans(length, tile, overlap)
        total = torch.zeros(length * scale)
        for k, (start, end) in enumerate(spans):
            total[start * scale:end * scale] += blend_ramp(spans, k, scale)
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)


def test_tiled_decode_close_to_untiled():
    config = dataclasses.replace(TINY, block_out_channels=(32, 32), tile_size=8, tile_overlap=4)  # cheap: 2 levels
    model = AutoencoderKL(config).eval()
    z = torch.randn(1, 4, 16, 16)  # 3 x 3 tiles
    with torch.no_grad():
        reference = model.decode(z)
        error = (model.decode(z, tiled_decode=True) - reference).abs()
    assert error.mean() / reference.abs().mean() < 0.45 and error.max() < 1.0, (error.mean(), error.max())


def test_chunked_temporal_decode_equals_unchunked():
    model = TemporalAutoencoder(TINY_VIDEO).eval()
    z = torch.randn(1, 4, 4, 2, 3)  # chunks of 3 frames: 3 + 1
    with torch.no_grad():
        assert (model.decode(z, chunked=True) - model.decode(z)).abs().max() <= PARITY


# --- bad input --------------------------------------------------------------------------------------------------------


def test_bad_input_gives_one_clear_error(tmp_path):
    model, video = AutoencoderKL(TINY), TemporalAutoencoder(TINY_VIDEO)
    with pytest.raises(ValueError, match="divisible by 8"):
        model.encode(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="with 4 channels"):
        model.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, F, Z, h, w\)"):
        video.decode(torch.randn(2, 4, 4, 4))  # frames not given as a separate axis
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    save_state(unet, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="not a VAE checkpoint"):
        load_vae(tmp_path / "unet.safetensors")
    save_state({"conv_in.weight": torch.zeros(4), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(4)},
               tmp_path / "diffusers_unet.safetensors")
    with pytest.raises(ValueError, match="not a VAE checkpoint"):
        load_temporal_vae(tmp_path / "diffusers_unet.safetensors")
    # an SVD file or folder given to the image loader, and an image VAE given to the temporal one (issue 15.12)
    save_vae(video, tmp_path / "svd.safetensors", layout="original")
    save_vae(video, tmp_path / "svd_vae", layout="diffusers")
    for svd in (tmp_path / "svd.safetensors", tmp_path / "svd_vae"):
        with pytest.raises(ValueError, match="SVD's temporal VAE .*; load it with load_temporal_vae"):
            load_vae(svd)
    save_vae(model, tmp_path / "vae.safetensors", layout="original")
    with pytest.raises(ValueError, match="an image VAE .*; load it with load_vae"):
        load_temporal_vae(tmp_path / "vae.safetensors", "tiny")
    data = (tmp_path / "vae.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint .*: not a readable safetensors file"):
        load_vae(tmp_path / "truncated.safetensors", TINY)
    with pytest.raises(ValueError, match="wrong shape"):
        load_vae(tmp_path / "vae.safetensors", "sd")  # tiny weights, full-size model
    with pytest.raises(ValueError, match="unknown VAE preset"):
        load_vae(tmp_path / "vae.safetensors", "sd15")
    with pytest.raises(ValueError, match="not supported"):
        load_vae(tmp_path / "vae.safetensors", {"block_out_channels": [32, 32, 64, 64], "act_fn": "gelu"})
