"""controlnext/lora.py: LoRA files built here, checked against merging by hand and against diffusers / PEFT.

- kohya SD1.5 (diffusers names), kohya SDXL (original LDM names, te1/te2), PEFT (metadata alphas, alpha_pattern,
  rsLoRA folder), old diffusers attention processors: every target merges to W + m (alpha / r) B A, computed here
  from layer names written out literally (an independent check of the name decoding);
- adapter mode equals merge mode in outputs (1e-5: the same fp32 math in another order), several named LoRAs with
  their own multipliers, switching off and removal restore the base model and its state dict;
- strict accounting: keys that match nothing, a partial mismatch, wrong shapes, unsupported variants, a missing
  tower: one ValueError naming them, and nothing is modified;
- independent references, same file, same outputs (<= 1e-5, outputs O(1)): diffusers 0.42.1's own loaders (its
  kohya converter, SDXL block remapping, PEFT files with metadata) on tiny diffusers UNets, its SDXL text-encoder
  loader on a transformers CLIPTextModelWithProjection, and PEFT directly on a transformers CLIPTextModel. Two
  diffusers paths cannot serve: its kohya converter drops per-layer alphas of attention layers (its alpha_pattern keys
  keep `.processor.to_q_lora.down.weight` and match nothing, as its own warning says), so the kohya files here give
  one alpha to every Linear and another to every conv, as kohya's network_alpha / conv_alpha do; and its
  text-encoder loader does not find the layers of transformers 5's flattened CLIPTextModel (no `text_model.`).
"""

import copy
import dataclasses
import json

import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from controlnext.loaders import load_clip, load_unet
from controlnext.lora import (LoRAAdaptedConv2d, LoRAAdaptedLinear, apply_lora, load_lora, remove_lora,
                              set_lora_multiplier)
from controlnext.selection import select_trainable
from encoders.clip import TINY as TINY_CLIP
from unet.keymap import unet_config_to_diffusers
from unet.sd_unet import TINY, UNet, sdxl_vector

TINY_XL = dataclasses.replace(TINY, channels=(32, 64, 64), attention=(False, True, True), transformer_depth=(1, 2, 3),
                              heads=(2, 4, 4), linear_proj=True, adm_channels=32 + 6 * 256)
TOL = dict(atol=1e-5, rtol=0)  # fp32 outputs of size O(1); the references compute the same math in another order

# SD1.5 kohya targets: Linear, Linear under Sequential, 1x1 conv (SD1.5 proj_in), 3x3 LoCon, stride-2 conv, 1x1
# shortcut, time embedding, GEGLU projection.
SD15_TARGETS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
                "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0", "mid_block.attentions.0.proj_in",
                "down_blocks.0.resnets.1.conv1", "down_blocks.1.downsamplers.0.conv",
                "up_blocks.2.resnets.0.conv_shortcut", "time_embedding.linear_1",
                "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", "up_blocks.3.resnets.2.time_emb_proj"]
# SDXL kohya names (original layout) and the diffusers layer each one is, written out from checkpoints.md §3.4.
SDXL_TARGETS = {
    "input_blocks_4_1_transformer_blocks_0_attn1_to_k": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
    "input_blocks_8_1_transformer_blocks_1_attn2_to_v": "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_v",
    "middle_block_1_transformer_blocks_2_ff_net_2": "mid_block.attentions.0.transformer_blocks.2.ff.net.2",
    "output_blocks_0_1_transformer_blocks_0_attn1_to_out_0":
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "output_blocks_5_1_proj_out": "up_blocks.1.attentions.2.proj_out", "input_blocks_7_1_proj_in":
        "down_blocks.2.attentions.0.proj_in", "time_embed_0": "time_embedding.linear_1",
    "label_emb_0_0": "add_embedding.linear_1", "input_blocks_0_0": "conv_in", "out_2": "conv_out",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_7_0_emb_layers_1": "up_blocks.2.resnets.1.time_emb_proj",
    "output_blocks_6_0_out_layers_3": "up_blocks.2.resnets.0.conv2",
}
TE_TARGETS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.2.mlp.fc1"]
TE2_TARGETS = ["text_model.encoder.layers.1.self_attn.out_proj", "text_model.encoder.layers.0.mlp.fc2",
               "text_projection"]


# --- helpers ---------------------------------------------------------------------------------------------------------


def random_pair(layer: nn.Module, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of a rank-r LoRA for a Linear or a Conv2d (down takes the kernel, up is 1x1)."""
    if isinstance(layer, nn.Conv2d):
        down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=generator)
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=generator)
    else:
        down = torch.randn(rank, layer.in_features, generator=generator)
        up = torch.randn(layer.out_features, rank, generator=generator)
    return 0.3 * down, 0.3 * up


def hand_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B A, for a conv the 1x1 up applied to every tap of the down kernel."""
    if down.ndim == 2:
        return scale * up @ down
    return scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)


def kohya_file(layers: dict[str, nn.Module], prefix: str, seed: int, alpha=lambda layer, rank: 2.0):
    """kohya tensors for {kohya layer name: layer}; returns (state, {name: (down, up, scale)}) for the hand merge."""
    g = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for i, (name, layer) in enumerate(layers.items()):
        rank = (2, 4, 3)[i % 3]
        down, up = random_pair(layer, rank, g)
        key = f"{prefix}{name}"
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        a = alpha(layer, rank)
        if a is not None:
            state[f"{key}.alpha"] = torch.tensor(a, dtype=torch.float16)  # kohya saves a 0-d tensor
        expected[name] = (down, up, (a if a is not None else rank) / rank)
    return state, expected


def locon_alpha(layer: nn.Module, rank: int) -> float:
    return 1.0 if isinstance(layer, nn.Conv2d) else 2.0  # kohya conv_alpha / network_alpha


def diffusers_unet(cfg) -> UNet2DConditionModel:
    config = {k: v for k, v in unet_config_to_diffusers(cfg).items() if k != "_class_name"}
    ref = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref


def ours_from(ref: nn.Module, cfg) -> UNet:
    return load_unet({k: v.clone() for k, v in ref.state_dict().items()}, cfg).eval()  # own storage, not shared


def unet_inputs(cfg):
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 16, 24, generator=g), torch.tensor([3, 781])  # non-square latent, integer timesteps
    ctx = torch.randn(2, 7, cfg.context_dim, generator=g)
    if not cfg.adm_channels:
        return (x, t, ctx), {}
    pooled = torch.randn(2, cfg.adm_channels - 6 * 256, generator=g)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 1024, 1024]])
    y = sdxl_vector(pooled, ids[:, 0:2], ids[:, 2:4], ids[:, 4:6], id_dim=256)
    return (x, t, ctx, y), {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}


def hf_text(with_projection: bool):
    cfg = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, projection_dim=16, hidden_act="quick_gelu",
                                      bos_token_id=998, eos_token_id=999, pad_token_id=1)
    model = (transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel)(cfg).eval()
    ours = load_clip({k: v.clone() for k, v in model.state_dict().items()},
                     TINY_CLIP if with_projection else dataclasses.replace(TINY_CLIP, projection_dim=None))
    return model, ours


def token_ids():
    ids = torch.randint(1, 998, (2, 77), generator=torch.Generator().manual_seed(3))
    ids[:, 12] = 999  # eos
    return ids


@pytest.fixture(scope="module")
def sd15():
    torch.manual_seed(0)
    ref = diffusers_unet(TINY)
    return ref, ours_from(ref, TINY)


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(1)
    ref = diffusers_unet(TINY_XL)
    return ref, ours_from(ref, TINY_XL)


# --- merging equals the hand merge ------------------------------------------------------------------------------------


def test_kohya_sd15_merges_as_by_hand(sd15):
    _, base = sd15
    unet = copy.deepcopy(base)
    te = hf_text(False)[1]
    layers = {n.replace(".", "_"): unet.get_submodule(n) for n in SD15_TARGETS}
    original = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"  # some SD1.5 files use LDM names
    layers["input_blocks_1_1_transformer_blocks_0_attn2_to_v"] = unet.get_submodule(original)
    # alphas: one per layer, one missing (scale 1)
    state, expected = kohya_file(layers, "lora_unet_", 0, alpha=lambda layer, rank: None if rank == 3 else 1.5 * rank)
    te_state, te_expected = kohya_file({n.replace(".", "_"): te.get_submodule(n) for n in TE_TARGETS}, "lora_te_", 1)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in te.state_dict().items()}
    lora = load_lora({**state, **te_state})
    assert lora.format == "kohya" and len(lora.targets) == len(SD15_TARGETS) + 1 + len(TE_TARGETS)
    applied = apply_lora(unet, {"text_encoder": te}, lora, multiplier=0.7)
    targets = SD15_TARGETS + [original]
    assert applied == sorted([f"unet:{n}" for n in targets] + [f"text_encoder:{n}" for n in TE_TARGETS])
    after = unet.state_dict()
    for name in targets:
        down, up, scale = expected[name.replace(".", "_") if name != original else
                                   "input_blocks_1_1_transformer_blocks_0_attn2_to_v"]
        expected_weight = before[name + ".weight"] + 0.7 * hand_delta(down, up, scale)
        torch.testing.assert_close(after[name + ".weight"], expected_weight, atol=1e-6, rtol=1e-6)
    untouched = set(before) - {n + ".weight" for n in targets}
    assert all(torch.equal(after[k], before[k]) for k in untouched)  # the same tensors, nothing else written
    for name in TE_TARGETS:
        down, up, scale = te_expected[name.replace(".", "_")]
        expected_weight = te_before[name + ".weight"] + 0.7 * hand_delta(down, up, scale)
        torch.testing.assert_close(te.state_dict()[name + ".weight"], expected_weight, atol=1e-6, rtol=1e-6)


def test_kohya_sdxl_original_names_merge_as_by_hand(sdxl):
    _, base = sdxl
    unet = copy.deepcopy(base)
    te1 = hf_text(False)[1]
    te2 = hf_text(True)[1]
    state, expected = kohya_file({k: unet.get_submodule(v) for k, v in SDXL_TARGETS.items()}, "lora_unet_", 2,
                                 alpha=locon_alpha)
    s1, e1 = kohya_file({n.replace(".", "_"): te1.get_submodule(n) for n in TE_TARGETS}, "lora_te1_", 3)
    s2, e2 = kohya_file({n.replace(".", "_"): te2.get_submodule(n) for n in TE2_TARGETS}, "lora_te2_", 4)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    w1 = {n: te1.get_submodule(n).weight.clone() for n in TE_TARGETS}
    w2 = {n: te2.get_submodule(n).weight.clone() for n in TE2_TARGETS}
    apply_lora(unet, {"text_encoder": te1, "text_encoder_2": te2}, load_lora({**state, **s1, **s2}))
    for kohya_name, ours in SDXL_TARGETS.items():
        down, up, scale = expected[kohya_name]
        torch.testing.assert_close(unet.state_dict()[ours + ".weight"], before[ours + ".weight"] +
                                   hand_delta(down, up, scale), atol=1e-6, rtol=1e-6)
    for model, names, exp, w in ((te1, TE_TARGETS, e1, w1), (te2, TE2_TARGETS, e2, w2)):
        for n in names:
            down, up, scale = exp[n.replace(".", "_")]
            torch.testing.assert_close(model.get_submodule(n).weight, w[n] + hand_delta(down, up, scale),
                                       atol=1e-6, rtol=1e-6)


def peft_state(model: nn.Module, names: list[str], prefix: str, seed: int, key_names: list[str] | None = None):
    g = torch.Generator().manual_seed(seed)
    state, pairs = {}, {}
    for name, key in zip(names, key_names or names):
        down, up = random_pair(model.get_submodule(name), 4, g)
        state[f"{prefix}{key}.lora_A.weight"], state[f"{prefix}{key}.lora_B.weight"] = down, up
        pairs[name] = (down, up)
    return state, pairs


def test_peft_file_with_metadata_alphas(sd15, tmp_path):
    _, base = sd15
    unet = copy.deepcopy(base)
    te = hf_text(False)[1]
    state, pairs = peft_state(unet, SD15_TARGETS, "unet.", 5)
    # transformers >= 5.6 names CLIPTextModel's layers without `text_model.`: such keys load too (encoders/keymap.py)
    te_keys = [TE_TARGETS[0], TE_TARGETS[1].removeprefix("text_model.")]
    te_state, te_pairs = peft_state(te, TE_TARGETS, "text_encoder.", 6, te_keys)
    metadata = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"mid_block.attentions.0.proj_in": 2},
                "text_encoder.r": 4, "text_encoder.lora_alpha": 4}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({**state, **te_state}, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata)})
    before = {n: unet.get_submodule(n).weight.clone() for n in SD15_TARGETS}
    te_before = {n: te.get_submodule(n).weight.clone() for n in TE_TARGETS}
    for source in (path, tmp_path):  # the file, or the folder diffusers' save_lora_weights writes
        lora = load_lora(source)
        assert lora.format == "peft" and lora.targets[("unet", SD15_TARGETS[0])].alpha == 8.0
    apply_lora(unet, {"text_encoder": te}, lora)
    for name in SD15_TARGETS:
        scale = (2 if name == "mid_block.attentions.0.proj_in" else 8) / 4
        torch.testing.assert_close(unet.get_submodule(name).weight, before[name] + hand_delta(*pairs[name], scale),
                                   atol=1e-6, rtol=1e-6)
    for name in TE_TARGETS:
        torch.testing.assert_close(te.get_submodule(name).weight, te_before[name] + hand_delta(*te_pairs[name], 1.0),
                                   atol=1e-6, rtol=1e-6)


def test_peft_folder_rslora_and_given_alpha(sd15, tmp_path):
    _, base = sd15
    unet = copy.deepcopy(base)
    names = SD15_TARGETS[:3]
    state, pairs = peft_state(unet, names, "base_model.model.", 7)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 6, "use_rslora": True}))
    before = {n: unet.get_submodule(n).weight.clone() for n in names}
    apply_lora(unet, None, load_lora(tmp_path), multiplier=-1.0)
    for name in names:  # rsLoRA: alpha / sqrt(r)
        torch.testing.assert_close(unet.get_submodule(name).weight, before[name] - hand_delta(*pairs[name], 6 / 2),
                                   atol=1e-6, rtol=1e-6)
    kohya = {"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
             "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1), "lora_unet_conv_in.alpha": torch.tensor(0.0)}
    assert load_lora(kohya).targets[("unet", "conv_in")].scale == 1.0  # sd-scripts: alpha 0 means alpha = r
    bare, _ = peft_state(unet, names, "unet.", 7)  # no metadata: the given alpha, else the rank
    assert load_lora(bare, alpha=2.0).targets[("unet", names[0])].scale == 0.5
    assert load_lora(bare).targets[("unet", names[0])].scale == 1.0


def test_old_attention_processor_format(sd15):
    _, base = sd15
    unet = copy.deepcopy(base)
    te = hf_text(False)[1]
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    g = torch.Generator().manual_seed(8)
    state, expected = {}, {}
    for key, layer_name in ((f"unet.{attn}.processor.to_q_lora", f"unet:{attn}.to_q"),
                            (f"{attn}.processor.to_out_lora", f"unet:{attn}.to_out.0"),  # no prefix: the UNet
                            ("unet.down_blocks.0.resnets.0.conv1.lora", "unet:down_blocks.0.resnets.0.conv1"),
                            ("text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora",
                             "text_encoder:text_model.encoder.layers.1.self_attn.k_proj"),
                            ("text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_linear_layer",
                             "text_encoder:text_model.encoder.layers.0.mlp.fc2")):
        component, name = layer_name.split(":")
        layer = (unet if component == "unet" else te).get_submodule(name)
        down, up = random_pair(layer, 2, g)
        state[f"{key}.down.weight"], state[f"{key}.up.weight"] = down, up
        expected[layer_name] = (layer, layer.weight.clone(), hand_delta(down, up, 1.0))  # no alpha: scale 1
    lora = load_lora(state)
    assert lora.format == "attn_procs"
    assert apply_lora(unet, {"text_encoder": te}, lora) == sorted(expected)
    for layer, before, delta in expected.values():
        torch.testing.assert_close(layer.weight, before + delta, atol=1e-6, rtol=1e-6)


# --- adapter mode -----------------------------------------------------------------------------------------------------


def test_adapter_mode_equals_merge_and_switches(sd15):
    _, base = sd15
    args, _ = unet_inputs(TINY)
    layers = {n.replace(".", "_"): base.get_submodule(n) for n in SD15_TARGETS}
    first = load_lora(kohya_file(layers, "lora_unet_", 9, alpha=locon_alpha)[0], name="style")
    second = load_lora(kohya_file(dict(list(layers.items())[::2]), "lora_unet_", 10)[0], name="detail")
    merged, adapted = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(merged, None, first, multiplier=0.8)
    apply_lora(merged, None, second, multiplier=-0.5)
    keys_before = {k: v.clone() for k, v in adapted.state_dict().items()}
    apply_lora(adapted, None, first, multiplier=0.8, mode="adapter")
    apply_lora(adapted, None, second, multiplier=-0.5, mode="adapter")
    assert isinstance(adapted.get_submodule(SD15_TARGETS[0]), LoRAAdaptedLinear)
    assert isinstance(adapted.get_submodule("down_blocks.0.resnets.1.conv1"), LoRAAdaptedConv2d)
    state = adapted.state_dict()
    assert state.keys() == keys_before.keys() and all(torch.equal(state[k], keys_before[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(adapted(*args), merged(*args), **TOL)
        assert set_lora_multiplier(adapted, "detail", 0.0) == len(SD15_TARGETS[::2])
        assert set_lora_multiplier(adapted, "style", 0.0) == len(SD15_TARGETS)
        torch.testing.assert_close(adapted(*args), base(*args), atol=0, rtol=0)  # m = 0 adds exact zeros
        set_lora_multiplier(adapted, "style", 0.8)
        single = copy.deepcopy(base)
        apply_lora(single, None, first, multiplier=0.8)
        torch.testing.assert_close(adapted(*args), single(*args), **TOL)
    with pytest.raises(ValueError, match="already has a LoRA named 'style'"):
        apply_lora(adapted, None, first, mode="adapter")
    remove_lora(adapted, "style")
    remove_lora(adapted, "detail")
    assert all(type(adapted.get_submodule(n)) in (nn.Linear, nn.Conv2d) for n in SD15_TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(adapted(*args), base(*args), atol=0, rtol=0)
    with pytest.raises(ValueError, match="no LoRA adapter named 'style'"):
        set_lora_multiplier(adapted, "style", 1.0)


def test_adapter_mode_leaves_a_training_lora_alone(sd15):
    _, base = sd15
    unet = copy.deepcopy(base)
    select_trainable(unet, "lora:2")  # to_out layers become selection.LoRALinear (a training-time adapter)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"
    nn.init.normal_(unet.get_submodule(name).lora_up.weight)
    lora = load_lora(kohya_file({name.replace(".", "_"): unet.get_submodule(name)}, "lora_unet_", 17)[0])
    with pytest.raises(ValueError, match="is a LoRALinear: adapter mode wraps plain"):
        apply_lora(unet, None, lora, mode="adapter")
    args, _ = unet_inputs(TINY)
    with torch.no_grad():
        before = unet(*args)
        apply_lora(unet, None, lora)  # merge mode adds to its frozen weight, its own LoRA path stays
        assert (unet(*args) - before).abs().max() > 1e-3 and hasattr(unet.get_submodule(name), "lora_up")


# --- strict accounting ------------------------------------------------------------------------------------------------


def test_a_file_matching_nothing_is_one_error_naming_its_keys(sd15):
    _, base = sd15
    unet = copy.deepcopy(base)
    layer = nn.Linear(16, 16)
    state = {}
    for i in range(12):
        down, up = random_pair(layer, 2, torch.Generator().manual_seed(i))
        key = f"lora_unet_not_a_layer_{i:02d}"
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
    with pytest.raises(ValueError, match=r"none of its 12 targets matches a layer") as err:
        apply_lora(unet, None, load_lora(state))
    assert "lora_unet_not_a_layer_00" in str(err.value) and "(12 in all)" in str(err.value)


def test_a_partial_mismatch_lists_them_and_changes_nothing(sd15):
    _, base = sd15
    unet = copy.deepcopy(base)
    te = hf_text(False)[1]
    layers = {n.replace(".", "_"): unet.get_submodule(n) for n in SD15_TARGETS[:4]}
    state, _ = kohya_file(layers, "lora_unet_", 11)
    state["lora_unet_down_blocks_9_bogus.lora_down.weight"] = torch.zeros(2, 8)
    state["lora_unet_down_blocks_9_bogus.lora_up.weight"] = torch.zeros(8, 2)
    name = "lora_unet_" + SD15_TARGETS[5].replace(".", "_")  # right name, wrong input width
    state[f"{name}.lora_down.weight"] = torch.zeros(2, 7, 3, 3)
    state[f"{name}.lora_up.weight"] = torch.zeros(32, 2, 1, 1)
    state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 32)
    state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(64, 2)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"3 of 7 targets do not fit; nothing was applied") as err:
        apply_lora(unet, None, load_lora(state))  # and no text encoder given
    message = str(err.value)
    assert "lora_unet_down_blocks_9_bogus" in message and "lora_te_text_model_encoder_layers_0_mlp_fc1" in message
    assert "(no text_encoder was given)" in message and f"{name}: down (2, 7, 3, 3)" in message
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert all(type(m) in (nn.Linear, nn.Conv2d) for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    with pytest.raises(ValueError, match="do not fit"):
        apply_lora(unet, {"text_encoder": te}, load_lora(state), mode="adapter")
    assert not any(isinstance(m, (LoRAAdaptedLinear, LoRAAdaptedConv2d)) for m in unet.modules())


def test_bad_files_are_one_clear_error(sd15, tmp_path):
    _, base = sd15
    pair = {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    with pytest.raises(ValueError, match="LoHa weights are not supported.*hada_w1_a"):
        load_lora({**pair, "lora_unet_conv_out.hada_w1_a": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="DoRA weights are not supported"):
        load_lora({**pair, "lora_unet_conv_in.dora_scale": torch.zeros(32)})
    with pytest.raises(ValueError, match="lora_unet_conv_in: no up tensor"):
        load_lora({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)})
    with pytest.raises(ValueError, match="lora_unet_conv_in.scale: not a LoRA tensor of the kohya format"):
        load_lora({**pair, "lora_unet_conv_in.scale": torch.zeros(())})
    with pytest.raises(ValueError, match=r"not a rank-r pair"):
        load_lora({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4), "lora_unet_conv_in.lora_up.weight":
                   torch.zeros(32, 3)})
    with pytest.raises(ValueError, match="not a LoRA file.*conv_in.weight"):
        load_lora(base.state_dict())  # a UNet, not a LoRA
    with pytest.raises(ValueError, match="mixes kohya keys"):
        load_lora({**pair, "unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3),
                   "unet.conv_in.lora_B.weight": torch.zeros(32, 2, 1, 1)})
    twice = {**pair, "lora_unet_input_blocks_0_0.lora_down.weight": torch.zeros(2, 4, 3, 3),
             "lora_unet_input_blocks_0_0.lora_up.weight": torch.zeros(32, 2, 1, 1)}  # conv_in by both names
    with pytest.raises(ValueError, match="lands on unet layer conv_in, as lora_unet_"):
        apply_lora(copy.deepcopy(base), None, load_lora(twice))
    with pytest.raises(ValueError, match="no LoRA weight file in the folder"):
        load_lora(tmp_path)
    with pytest.raises(ValueError, match="weight file not found"):
        load_lora(tmp_path / "missing.safetensors")
    lora = load_lora(pair)
    with pytest.raises(ValueError, match="mode must be one of"):
        apply_lora(copy.deepcopy(base), None, lora, mode="fuse")
    with pytest.raises(ValueError, match="text_encoders keys must be among"):
        apply_lora(copy.deepcopy(base), {"clip": nn.Linear(2, 2)}, lora)


# --- independent references -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_kohya_equals_diffusers(which, request):
    ref, base = request.getfixturevalue(which)
    cfg, loader = ((TINY, StableDiffusionLoraLoaderMixin) if which == "sd15" else
                   (TINY_XL, StableDiffusionXLLoraLoaderMixin))  # the SDXL one remaps input_blocks names itself
    names = {n.replace(".", "_"): n for n in SD15_TARGETS} if which == "sd15" else SDXL_TARGETS
    state, _ = kohya_file({k: base.get_submodule(v) for k, v in names.items()}, "lora_unet_", 12, alpha=locon_alpha)
    ours = copy.deepcopy(base)
    apply_lora(ours, None, load_lora(state))
    ref = copy.deepcopy(ref)
    converted, alphas = loader.lora_state_dict(dict(state), unet_config=ref.config)
    loader.load_lora_into_unet(converted, alphas, ref, adapter_name="a")
    args, ref_kwargs = unet_inputs(cfg)
    with torch.no_grad():
        expected = ref(*args[:3], **ref_kwargs).sample
        torch.testing.assert_close(ours(*args), expected, **TOL)
        assert (expected - base(*args)).abs().max() > 0.1  # the LoRA changes the output


def test_peft_file_equals_diffusers(sdxl, tmp_path):
    ref, base = sdxl
    names = list(SDXL_TARGETS.values())
    state, _ = peft_state(base, names, "unet.", 14)
    metadata = {"unet.r": 4, "unet.lora_alpha": 3, "unet.target_modules": names,
                "unet.alpha_pattern": {"conv_in": 1, "up_blocks.0.upsamplers.0.conv": 6}}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata)})
    ours = copy.deepcopy(base)
    apply_lora(ours, None, load_lora(path), mode="adapter")
    ref = copy.deepcopy(ref)
    converted, alphas, file_metadata = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(path),
                                                                                         return_lora_metadata=True)
    StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(converted, alphas, ref, adapter_name="a",
                                                         metadata=file_metadata)
    args, ref_kwargs = unet_inputs(TINY_XL)
    with torch.no_grad():
        torch.testing.assert_close(ours(*args), ref(*args[:3], **ref_kwargs).sample, **TOL)


def test_text_encoder_loras_equal_diffusers_and_peft():
    hf1, te1 = hf_text(False)
    hf2, te2 = hf_text(True)
    s1, _ = kohya_file({n.replace(".", "_"): te1.get_submodule(n) for n in TE_TARGETS}, "lora_te1_", 15)
    s2, _ = kohya_file({n.replace(".", "_"): te2.get_submodule(n) for n in TE2_TARGETS[:2]}, "lora_te2_", 16)
    ids = token_ids()
    with torch.no_grad():
        plain = te1(ids).last_hidden_state
    apply_lora(None, {"text_encoder": te1, "text_encoder_2": te2}, load_lora({**s1, **s2}), multiplier=1.0)
    # bigG-style tower (CLIPTextModelWithProjection keeps `text_model.`): diffusers' SDXL loader, same file.
    converted, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict({**s1, **s2})
    StableDiffusionXLLoraLoaderMixin.load_lora_into_text_encoder(converted, alphas, hf2, prefix="text_encoder_2",
                                                                 adapter_name="a")
    # CLIP-L tower (transformers 5 CLIPTextModel: layers without `text_model.`): PEFT itself, layers named by hand.
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2.0, rank_pattern={"q_proj": 2}, alpha_pattern={},
                                       target_modules=["encoder.layers.0.self_attn.q_proj",
                                                       "encoder.layers.2.mlp.fc1"]), hf1, adapter_name="a")
    peft_weights = {}
    for n in TE_TARGETS:
        key = "lora_te1_" + n.replace(".", "_")
        peft_weights[n.removeprefix("text_model.") + ".lora_A.weight"] = s1[key + ".lora_down.weight"]
        peft_weights[n.removeprefix("text_model.") + ".lora_B.weight"] = s1[key + ".lora_up.weight"]
    assert not set_peft_model_state_dict(hf1, peft_weights, adapter_name="a").unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(te1(ids).last_hidden_state, hf1(ids).last_hidden_state, **TOL)
        torch.testing.assert_close(te2(ids).hidden_states[-2], hf2(ids, output_hidden_states=True).hidden_states[-2],
                                   **TOL)
        torch.testing.assert_close(te2(ids).embeds, hf2(ids).text_embeds, **TOL)
        assert (te1(ids).last_hidden_state - plain).abs().max() > 0.1  # the LoRA changes the output
