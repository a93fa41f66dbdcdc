"""Which UNet weights train (controlnext/selection.py): the official selections' counts at full size, LoRA as an exact
no-op at init that merges back, and weight increments (ΔW) saved and loaded in both key layouts."""

from __future__ import annotations

import copy

import pytest
import torch

from controlnext.checkpoint import KeyMap, save_state
from controlnext.releases import load_unet_weights, weight_increments
from controlnext.selection import count_selected, merge_lora, select_trainable, selected_names
from unet.keymap import unet_original_rows
from unet.sd_unet import SD15, SDXL, TINY, UNet
from unet.svd_unet import SVD_XT, SVDUNet


def tiny_inputs(batch: int = 2):
    return torch.randn(batch, 4, 8, 8), torch.tensor([10.0, 700.0])[:batch], torch.randn(batch, 5, TINY.context_dim)


def test_selection_counts_full_configs():
    with torch.device("meta"):
        sd15, sdxl = UNet(SD15), UNet(SDXL)
    assert count_selected(sd15, "to_out") == 24_805_760
    assert count_selected(sdxl, "attn2_to_out") == 102_483_200
    assert count_selected(sdxl, "to_out") == 204_966_400
    assert count_selected(sd15, "none") == 0 and count_selected(sd15, "all") == 859_520_964
    # SVD (controlnext.md §3, §7): the official selections over the spatio-temporal UNet, to_v included for the
    # SVD-v2-Training line that `to_out_to_v` names
    with torch.device("meta"):
        svd = SVDUNet(SVD_XT)
    assert count_selected(svd, "to_out") == 49_611_520 and count_selected(svd, "to_out_to_v") == 99_951_360
    # Names, not only counts: to_k and to_v have the same shapes in every attention, so a count cannot tell them
    # apart; the selections must be exactly the tensors their official lines name
    to_out_to_v = [n for n, _ in svd.named_parameters() if ".to_out." in n or ".to_v." in n]
    assert selected_names(svd, "to_out_to_v") == to_out_to_v and any(".to_v." in n for n in to_out_to_v)
    attn2 = [n for n, _ in sdxl.named_parameters() if ".attn2.to_out." in n]
    assert selected_names(sdxl, "attn2_to_out") == attn2 and len(attn2) == 140  # 70 blocks x (weight, bias)
    params = select_trainable(sd15, "to_out")
    assert len(params) == 64 and sum(p.numel() for p in params.values()) == 24_805_760
    assert sum(p.numel() for p in sd15.parameters() if p.requires_grad) == 24_805_760
    with pytest.raises(ValueError):
        select_trainable(sd15, "lora:x")


def test_lora_is_a_noop_at_init_and_merges():
    unet = UNet(TINY).eval()
    x, t, context = tiny_inputs()
    with torch.no_grad():
        ref = unet(x, t, context)
        params = select_trainable(unet, "lora:2")
        assert params and all(".to_out.0.lora_" in n for n in params)
        assert torch.equal(unet(x, t, context), ref)  # bitwise: the base Linear's kernel plus an exact 0 (B = 0)
        for n, p in params.items():
            p.normal_(0, 0.05)
        adapted = unet(x, t, context)
        merged = merge_lora(unet)(x, t, context)
    assert (adapted - ref).abs().max() > 1e-4
    torch.testing.assert_close(adapted, merged, rtol=0, atol=1e-5)  # W x + B A x vs (W + B A) x: rounding only
    assert set(unet.state_dict()) == set(UNet(TINY).state_dict())


def test_weight_increments_roundtrip(tmp_path):
    torch.manual_seed(0)
    base = UNet(TINY)
    trained = copy.deepcopy(base)
    names = select_trainable(trained, "to_out")
    with torch.no_grad():
        for p in names.values():
            p.add_(torch.randn_like(p) * 0.02)
    trained_state = trained.state_dict()
    delta = weight_increments({k: trained_state[k] for k in names}, base.state_dict())
    save_state(delta, tmp_path / "unet_weight_increasements.safetensors")

    restored = load_unet_weights(copy.deepcopy(base), tmp_path / "unet_weight_increasements.safetensors", increments=True)
    err = max((restored.state_dict()[k] - v).abs().max().item() for k, v in trained_state.items())
    assert err < 1e-6, err

    other = UNet(TINY)  # a different base (another fine-tune of the same architecture)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    # ... given the increments in the original (kohya / SGM) layout, as SDXL tools write them.
    original = KeyMap(unet_original_rows(TINY)).inverse().apply(delta)[0]
    assert all(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in original)
    load_unet_weights(other, original, increments=True)
    for k, v in other.state_dict().items():
        assert torch.allclose(v, before[k] + delta[k], atol=1e-6) if k in delta else torch.equal(v, before[k])

    absolute = load_unet_weights(copy.deepcopy(base), {k: trained_state[k] for k in names}, increments=False)
    assert all(torch.equal(absolute.state_dict()[k], v) for k, v in trained_state.items())
