"""SVD spatio-temporal UNet: parity with diffusers (patched to the original GroupNorm eps), image-only frames,
frame chunking, checkpointing, control hook, input errors, full-size counts and keys, and both checkpoint layouts.

diffusers is the numerical oracle only (requirements-dev.txt); these tests run, never skip.
"""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from controlnext.checkpoint import KeyMap, read_file, save_state
from controlnext.loaders import load_svd_unet, save_svd_unet
from unet.keymap import SVD_ROWS, svd_unet_config_to_diffusers
from unet.svd_unet import SVD, SVD_XT, TINY, SVDUNet, svd_added_time_ids

FIXTURE = Path(__file__).parent / "fixtures" / "svd_unet_original_keys.txt"
TEMPORAL = ("temporal_res_block.", "temporal_transformer_blocks.", "time_pos_embed.", "time_mixer.")


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with O(1) activations; mix factors spread so every alpha differs from 0.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim > 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:  # biases, and norm gains around 1
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + float("norm" in name and name.endswith("weight")))
    return model


def set_resnet_eps(reference: torch.nn.Module, eps: float) -> torch.nn.Module:
    """The original SGM code uses GN eps 1e-5 in every ResBlock; diffusers uses 1e-6 in some (checkpoints.md §12.1)."""
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.GroupNorm) and ".resnets." in name:
            module.eps = eps
    return reference


def diffusers_forward(ref, x, t, context, ids, indicator):
    """diffusers' own forward loop, but passing `indicator` to its blocks (its top level hard-codes zeros)."""
    B, F = x.shape[:2]
    emb = ref.time_embedding(ref.time_proj(t).to(x.dtype))
    emb = (emb + ref.add_embedding(ref.add_time_proj(ids.flatten()).reshape(B, -1).to(x.dtype))).repeat_interleave(F, 0)
    context = context.repeat_interleave(F, 0)
    h = ref.conv_in(x.flatten(0, 1))
    skips = (h,)
    for block in ref.down_blocks:
        extra = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        h, res = block(hidden_states=h, temb=emb, image_only_indicator=indicator, **extra)
        skips += res
    h = ref.mid_block(hidden_states=h, temb=emb, encoder_hidden_states=context, image_only_indicator=indicator)
    for block in ref.up_blocks:
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        extra = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, image_only_indicator=indicator, **extra)
    return ref.conv_out(ref.conv_act(ref.conv_norm_out(h))).unflatten(0, (B, F))


@pytest.fixture(autouse=True)
def _one_thread():
    # Toy-sized ops are dominated by threading overhead, and 2 threads on a busy 2-core machine run ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    """(ours, diffusers with its own eps, diffusers with the original eps), same random weights."""
    torch.manual_seed(0)
    ours = randomise(SVDUNet(TINY)).eval()
    stock = UNetSpatioTemporalConditionModel(**{k: v for k, v in svd_unet_config_to_diffusers(TINY).items()
                                                if not k.startswith("_")}).eval()
    stock.load_state_dict(ours.state_dict())  # identical key names: strict by default
    return ours, stock, set_resnet_eps(copy.deepcopy(stock), 1e-5)


def inputs(B=2, F=3, H=16, W=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, TINY.in_channels, H, W, generator=g)
    context = torch.randn(B, 1, TINY.context_dim, generator=g)
    ids = torch.cat([svd_added_time_ids(6, 127, 0.02), svd_added_time_ids(3, 30, 0.5)])[:B]  # fps_id, motion, aug
    t = torch.tensor([0.25 * 2.0, -0.25 * 1.5])[:B]  # c_noise = ln(sigma) / 4
    return x, t, context, ids


@pytest.mark.parametrize("size", [(16, 16), (12, 10)])  # (12, 10): odd sizes on the way down, upsample to skip size
@torch.no_grad()
def test_matches_diffusers_with_original_groupnorm_eps(models, size):
    ours, _, patched = models
    x, t, context, ids = inputs(H=size[0], W=size[1])
    out = ours(x, t, context, ids, num_frames=3)
    assert out.shape == (2, 3, 4, *size)
    assert (out - patched(x, t, context, ids).sample).abs().max().item() <= 1e-5


@torch.no_grad()
def test_matches_diffusers_in_float64(models):
    # In float64 the fp32 rounding above vanishes: the two compute the same function (measured 9e-15).
    ours, _, patched = (copy.deepcopy(m).double() for m in models)
    x, t, context, ids = (v.double() for v in inputs())
    assert (ours(x, t, context, ids, num_frames=3) - patched(x, t, context, ids).sample).abs().max().item() <= 1e-12


@torch.no_grad()
def test_documents_the_difference_to_stock_diffusers(models):
    ours, stock, _ = models
    # diffusers leaves 1e-6 exactly in the ResBlocks of down blocks 0-2 and of every up block.
    loose = {name.split(".resnets.")[0] for name, m in stock.named_modules()
             if isinstance(m, torch.nn.GroupNorm) and m.eps == 1e-6 and ".resnets." in name}
    assert loose == {"down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.0", "up_blocks.1", "up_blocks.2",
                     "up_blocks.3"}
    x, t, context, ids = inputs()
    diff = (ours(x, t, context, ids, num_frames=3) - stock(x, t, context, ids).sample).abs().max().item()
    # Measured 1.3e-4 at output scale 2.1 (checkpoints.md reports 1.4e-4 on its small configs), against 6e-6 once
    # patched: 20x the fp32 noise, and it grows where activations have small variance (eps weighs more there).
    assert 5e-5 < diff < 1e-3, diff


@torch.no_grad()
def test_diffusers_eps_layout_equals_stock_diffusers(models):
    # eps_layout="diffusers" (the layout the official ControlNeXt-SVD releases were trained on): every GroupNorm has
    # the eps of the same-named module in UNetSpatioTemporalConditionModel, and the outputs agree without patching it.
    ours, stock, _ = models
    loose = SVDUNet(dataclasses.replace(TINY, eps_layout="diffusers")).eval()
    loose.load_state_dict(ours.state_dict())
    eps = {name: m.eps for name, m in loose.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert eps == {name: m.eps for name, m in stock.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert sorted(set(eps.values())) == [1e-6, 1e-5]  # both values occur: the layout is not one eps everywhere
    x, t, context, ids = inputs()
    out = loose(x, t, context, ids, num_frames=3)
    assert (out - stock(x, t, context, ids).sample).abs().max().item() <= 1e-5  # fp32 noise at output scale ~2
    assert (out - ours(x, t, context, ids, num_frames=3)).abs().max().item() > 5e-5  # and it is not the SGM layout
    with pytest.raises(ValueError, match="eps_layout must be one of"):
        dataclasses.replace(TINY, eps_layout="1e-6")


@torch.no_grad()
def test_mixed_image_only_indicator_as_the_original(models):
    ours, _, patched = models
    x, t, context, ids = inputs()
    zeros = torch.zeros(2, 3)
    # The oracle loop is diffusers' forward: with zeros it reproduces the model's own output exactly (bitwise: the
    # same modules called in the same order at the same batch, i.e. the same kernels).
    assert torch.equal(diffusers_forward(patched, x, t, context, ids, zeros), patched(x, t, context, ids).sample)
    mixed = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = ours(x, t, context, ids, num_frames=3, image_only_indicator=mixed)
    assert (out - diffusers_forward(patched, x, t, context, ids, mixed)).abs().max().item() <= 1e-5
    assert (out - ours(x, t, context, ids, num_frames=3)).abs().max().item() > 1e-3  # honoured, not ignored


@torch.no_grad()
def test_image_only_frames_are_independent_images(models):
    # With every frame flagged, alpha = 1 everywhere: the temporal layers drop out and each frame is an image.
    ours = models[0]
    x, t, context, ids = inputs(B=1)
    out = ours(x, t, context, ids, num_frames=3, image_only_indicator=torch.ones(1, 3))
    for f in range(3):
        alone = ours(x[:, f:f + 1], t, context, ids, num_frames=1, image_only_indicator=torch.ones(1, 1))
        assert (out[:, f:f + 1] - alone).abs().max().item() <= 1e-5


@torch.no_grad()
def test_frame_chunking_is_exact(models):
    # Exact as mathematics: checked in float64, where fp32's batch-size-dependent rounding (~5e-6) is gone.
    ours = copy.deepcopy(models[0]).double()
    x, t, context, ids = (v.double() for v in inputs())
    full = ours(x, t, context, ids, num_frames=3)
    for chunk in (1, 4):
        assert (ours(x, t, context, ids, num_frames=3, frame_chunk=chunk) - full).abs().max().item() <= 1e-12


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomise(SVDUNet(TINY))
    x, t, context, ids = inputs(B=1, F=2)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, t, context, ids, num_frames=2).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_control_hook_and_residuals(models):
    ours = models[0]
    x, t, context, ids = inputs()
    base = ours(x, t, context, ids, num_frames=3)
    seen = []
    out = ours(x, t, context, ids, num_frames=3, control=lambda site, h: seen.append((site, tuple(h.shape))) or h)
    assert torch.equal(out, base)  # an identity hook is a no-op (bitwise: the same kernels at the same batch)
    assert seen == [("conv_in", (6, 32, 16, 16)), ("down_0", (6, 32, 8, 8)), ("down_1", (6, 32, 4, 4)),
                    ("down_2", (6, 64, 2, 2)), ("down_3", (6, 64, 2, 2)), ("mid_in", (6, 64, 2, 2)),
                    ("mid_out", (6, 64, 2, 2))]  # frames folded into the batch: (B*F, C, H, W)
    # ControlNeXt-SVD v2 adds at "down_0": a non-zero addition there changes the output.
    pushed = ours(x, t, context, ids, num_frames=3, control=lambda site, h: h + 0.1 if site == "down_0" else h)
    assert (pushed - base).abs().max().item() > 1e-4
    skips = [torch.zeros(6, c, s, s) for c, s in [(32, 16), (32, 16), (32, 16), (32, 8), (32, 8), (32, 8), (32, 4),
                                                    (64, 4), (64, 4), (64, 2), (64, 2), (64, 2)]]
    zero = ours(x, t, context, ids, num_frames=3, down_residuals=skips, mid_residual=torch.zeros(6, 64, 2, 2))
    assert torch.equal(zero, base)
    with pytest.raises(ValueError, match="expected 12 down residuals"):
        ours(x, t, context, ids, num_frames=3, down_residuals=skips[:-1])


@pytest.mark.parametrize("change, message", [
    ("frames", "num_frames=4 but x holds 3 frames"),
    ("channels", "x has 4 channels, this UNet takes 8"),
    ("indicator", r"image_only_indicator must be \(B, F\)"),
    ("ids", r"added_time_ids must be"),
    ("image", r"x must be video latents \(B, F, C, H, W\)"),
    ("chunk", "frame_chunk must be a positive number"),
])
def test_bad_input_gives_one_clear_error(models, change, message):
    ours = models[0]
    x, t, context, ids = inputs()
    kwargs = {"num_frames": 4 if change == "frames" else 3}
    if change == "channels":
        x = x[:, :, :4]
    if change == "indicator":
        kwargs["image_only_indicator"] = torch.zeros(2, 4)
    if change == "ids":
        ids = ids[:, :2]
    if change == "image":
        x = x.flatten(0, 1)
    if change == "chunk":
        kwargs["frame_chunk"] = 0
    with pytest.raises(ValueError, match=message):
        ours(x, t, context, ids, **kwargs)


def test_full_config_counts_and_diffusers_keys():
    with torch.device("meta"):
        ours = SVDUNet(SVD_XT)
        reference = UNetSpatioTemporalConditionModel(**{k: v for k, v in svd_unet_config_to_diffusers(SVD_XT).items()
                                                        if not k.startswith("_")})
    assert sum(p.numel() for p in ours.parameters()) == 1_524_623_082  # checkpoints.md §9
    assert sum(p.numel() for n, p in ours.named_parameters() if any(s in n for s in TEMPORAL)) == 656_076_838
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}  # one-to-one, by identity
    assert SVD.num_frames == 14 and SVD_XT.num_frames == 25 and SVD.channels == SVD_XT.channels


def test_original_layout_rows_full_size():
    with torch.device("meta"):
        state = SVDUNet(SVD_XT).state_dict()
    exported, _ = KeyMap(SVD_ROWS).inverse().apply(state)
    counts = {}
    for key in exported:
        counts[key.split(".")[0]] = counts.get(key.split(".")[0], 0) + 1
    assert counts == {"input_blocks": 522, "middle_block": 99, "output_blocks": 795, "time_embed": 4,
                      "label_emb": 4, "out": 4}  # checkpoints.md §3.5, 1428 in all
    recorded = [line.strip() for line in open(FIXTURE) if line.strip() and not line.startswith("#")]
    assert sorted(exported) == sorted(recorded)  # the released file's key names
    shapes = {k: tuple(v.shape) for k, v in exported.items()}
    assert shapes["input_blocks.0.0.weight"] == (320, 8, 3, 3)
    assert shapes["label_emb.0.0.weight"] == (1280, 768)
    assert shapes["input_blocks.1.0.time_stack.in_layers.2.weight"] == (320, 320, 3, 1, 1)
    assert shapes["input_blocks.4.1.time_stack.0.attn2.to_k.weight"] == (640, 1024)
    assert shapes["middle_block.1.time_pos_embed.0.weight"] == (5120, 1280)
    back, _ = KeyMap(SVD_ROWS).apply(exported)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_checkpoint_round_trips(models, tmp_path):
    ours, stock, _ = models
    state = ours.state_dict()
    # Original single file, with other components of the release beside the UNet: export, reload identical.
    save_svd_unet(ours, tmp_path / "svd.safetensors", layout="original")
    single = read_file(tmp_path / "svd.safetensors")
    assert len(single) == len(state) and all(k.startswith("model.diffusion_model.") for k in single)
    single["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    single["conditioner.embedders.3.encoder.quant_conv.bias"] = torch.zeros(1)
    save_state(single, tmp_path / "release.safetensors")
    loaded = load_svd_unet(tmp_path / "release.safetensors", config="tiny").state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    # Our diffusers folder, and a folder written by diffusers itself (its own config.json) give the same model.
    save_svd_unet(ours, tmp_path / "ours")
    stock.save_pretrained(tmp_path / "theirs")
    for folder in ("ours", "theirs"):
        model = load_svd_unet(tmp_path / folder)
        assert model.config == TINY
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    # Every key is accounted for: a missing and an unknown key are both named, in the file's own names.
    del single["model.diffusion_model.input_blocks.1.0.time_stack.in_layers.2.bias"]
    single["model.diffusion_model.input_blocks.1.1.time_stack.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 unexpected, 1 missing(.|\n)*input_blocks.1.1.time_stack.0.extra.weight"):
        load_svd_unet(single, config="tiny")
    with pytest.raises(ValueError, match="cannot tell which SVD UNet"):
        load_svd_unet(state)
