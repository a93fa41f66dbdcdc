"""Our SD UNet against diffusers (a test-only oracle) and the key-mapped loader in both layouts.

- numerical parity with diffusers.UNet2DConditionModel on tiny SD1.x-, SD2.x- and SDXL-structured configs;
- ControlNet residuals added exactly where diffusers adds them;
- the original single-file layout: our exporter -> diffusers' own convert_ldm_unet_checkpoint -> strict diffusers
  load with identical outputs (an independent check of unet/keymap.py), and our loader reading it back;
- full configs on the meta device: key sets map one-to-one onto diffusers' and through the tables;
- bad input: truncated file, another model's weights, mismatched config.
"""

import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from controlnext.checkpoint import KeyMap, load_into, read_state, save_state
from controlnext.loaders import ORIGINAL_PREFIXES, load_unet, save_unet
from unet.keymap import detect_unet_preset, unet_config_from_diffusers, unet_config_to_diffusers, unet_original_rows
from unet.sd_unet import SD15, SD21, SDXL, TINY, UNet, sdxl_vector

TINY_SD2 = dataclasses.replace(TINY, heads=(2, 2, 2, 2), linear_proj=True)
TINY_XL = dataclasses.replace(TINY, channels=(32, 64, 64), attention=(False, True, True), transformer_depth=(1, 2, 3),
                              heads=(2, 4, 4), linear_proj=True, adm_channels=32 + 6 * 256)
TOL = 1e-5  # fp32 max abs error; outputs are O(1)
ORIGINAL_UNET_PREFIX = ORIGINAL_PREFIXES["unet"]


def reference(cfg) -> UNet2DConditionModel:
    """A diffusers UNet of the same structure with random (not default-init) weights."""
    config = {k: v for k, v in unet_config_to_diffusers(cfg).items() if k != "_class_name"}
    ref = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref


def inputs(cfg, batch=2):
    x = torch.randn(batch, 4, 16, 24)  # non-square latent
    t = torch.tensor([3, 781][:batch])  # integer timesteps
    context = torch.randn(batch, 7, cfg.context_dim)
    ref_kwargs, y = {}, None
    if cfg.adm_channels:
        pooled = torch.randn(batch, cfg.adm_channels - 6 * cfg.added_id_dim)
        ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 1024, 1024]])[:batch]
        ref_kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        y = sdxl_vector(pooled, ids[:, 0:2], ids[:, 2:4], ids[:, 4:6], id_dim=cfg.added_id_dim)
    return x, t, context, y, ref_kwargs


@pytest.mark.parametrize("cfg", [TINY, TINY_SD2, TINY_XL], ids=["sd1", "sd2", "sdxl"])
def test_parity_with_diffusers(cfg):
    torch.manual_seed(0)
    ref = reference(cfg)
    ours = load_unet(ref.state_dict(), cfg).eval()
    x, t, context, y, ref_kwargs = inputs(cfg)
    with torch.no_grad():
        expected = ref(x, t, context, **ref_kwargs).sample
        got = ours(x, t, context, y)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("cfg", [TINY, TINY_XL], ids=["sd1", "sdxl"])
def test_parity_with_diffusers_in_float64(cfg):
    """The fp32 tolerance (1e-5) hides a wrong norm eps: GroupNorm 1e-5 for 1e-6 or a LayerNorm eps moves the output by
    4e-8..4e-6 on these weights. In float64 the two sides agree to 1e-14 (measured), so 1e-10 catches every eps."""
    torch.manual_seed(0)
    ref = reference(cfg).double()
    ours = load_unet(ref.state_dict(), cfg).eval()
    x, t, context, y, ref_kwargs = inputs(cfg)
    x, context = x.double(), context.double()
    ref_kwargs = {k: {name: v.double() for name, v in d.items()} for k, d in ref_kwargs.items()}
    with torch.no_grad():
        expected = ref(x, t, context, **ref_kwargs).sample
        got = ours(x, t, context, None if y is None else y.double())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_controlnet_residuals_match_diffusers():
    torch.manual_seed(1)
    ref = reference(TINY)
    ours = load_unet(ref.state_dict(), TINY).eval()
    x, t, context, _, _ = inputs(TINY)
    # One residual per skip (conv_in, each resnet, each downsample) and one for the mid block.
    with torch.no_grad():
        shapes = [(2, 32, 16, 24)] * 3 + [(2, 32, 8, 12)] * 3 + [(2, 32, 4, 6)] + [(2, 64, 4, 6)] * 2 + [(2, 64, 2, 3)] * 3
        down = [torch.randn(s) for s in shapes]
        mid = torch.randn(2, 64, 2, 3)
        expected = ref(x, t, context, down_block_additional_residuals=tuple(down),
                       mid_block_additional_residual=mid).sample
        got = ours(x, t, context, down_residuals=down, mid_residual=mid)
        plain = ours(x, t, context)
    assert (got - expected).abs().max().item() <= TOL
    assert (got - plain).abs().max().item() > 1e-2  # the residuals do something
    with pytest.raises(ValueError, match="down residuals"):
        ours(x, t, context, down_residuals=down[:-1], mid_residual=mid)


@pytest.mark.parametrize("cfg", [TINY, TINY_XL], ids=["sd1", "sdxl"])
def test_original_layout_through_diffusers_converter(cfg, tmp_path):
    torch.manual_seed(2)
    ours = UNet(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2)
    path = tmp_path / "model.safetensors"
    save_unet(ours, path, layout="original")
    single_file = load_unet_raw(path)
    assert all(k.startswith(ORIGINAL_UNET_PREFIX) for k in single_file)
    # diffusers' independent converter turns our original-layout file back into diffusers keys...
    config = {k: v for k, v in unet_config_to_diffusers(cfg).items() if k != "_class_name"}
    converted = convert_ldm_unet_checkpoint(single_file, config)
    ref = UNet2DConditionModel(**config).eval()
    ref.load_state_dict(converted, strict=True)
    x, t, context, y, ref_kwargs = inputs(cfg)
    with torch.no_grad():
        assert (ref(x, t, context, **ref_kwargs).sample - ours(x, t, context, y)).abs().max().item() <= TOL
    # ...and our loader reads the file back to identical tensors (other components in the file are ignored).
    save_state({**single_file, "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, path)
    back = load_unet(path, cfg)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def load_unet_raw(path):
    return read_state(path)


def test_diffusers_folder_roundtrip(tmp_path):
    torch.manual_seed(3)
    ours = UNet(TINY_XL)
    save_unet(ours, tmp_path / "unet", layout="diffusers")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert unet_config_from_diffusers(config) == TINY_XL
    back = load_unet(tmp_path / "unet")  # the folder's config.json picks the structure
    assert back.config == TINY_XL
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "unet")  # diffusers reads our export too
    assert set(ref.state_dict()) == set(ours.state_dict())


@pytest.mark.parametrize("cfg, n_original", [(SD15, 686), (SD21, 686), (SDXL, 1680)], ids=["sd15", "sd21", "sdxl"])
def test_full_config_key_sets_map_one_to_one(cfg, n_original):
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(cfg).items() if k != "_class_name"})
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs  # diffusers layout: identity
    original, _ = KeyMap(unet_original_rows(cfg)).inverse().apply(ours.state_dict())
    assert len(original) == n_original  # checkpoints.md §3.3-3.4 key counts
    converted = convert_ldm_unet_checkpoint({ORIGINAL_UNET_PREFIX + k: v for k, v in original.items()},
                                            unet_config_to_diffusers(cfg))
    assert {k: tuple(v.shape) for k, v in converted.items()} == theirs
    # and back through our forward table, onto our own keys
    renamed, _ = KeyMap(unet_original_rows(cfg)).apply(original)
    assert set(renamed) == set(theirs)


def test_preset_detection_from_weights(tmp_path):
    with torch.device("meta"):
        state = UNet(SD21).state_dict()
    assert detect_unet_preset(state) == "sd21"


def test_truncated_file_is_one_clear_error(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_state(UNet(TINY).state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_unet(path, TINY)


def test_another_models_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_state({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)},
               path)
    with pytest.raises(ValueError, match="not a UNet checkpoint"):
        load_unet(path, TINY)


def test_mismatched_config_lists_keys_and_loads_nothing():
    state = UNet(TINY).state_dict()
    target = UNet(TINY_SD2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_into(target, state, what="UNet")
    message = str(err.value)
    assert "wrong shape" in message and "proj_in.weight" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded
    extra = {**state, "something.else": torch.zeros(1)}
    del extra["conv_out.bias"]
    with pytest.raises(ValueError, match=r"1 unexpected, 1 missing") as err:
        load_unet(extra, TINY)
    assert "something.else" in str(err.value) and "conv_out.bias" in str(err.value)


def test_undetectable_unet_needs_a_config():
    with pytest.raises(ValueError, match="cannot tell which UNet"):
        load_unet(UNet(TINY).state_dict())
