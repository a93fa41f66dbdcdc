"""The SD UNet on tiny presets: shapes, the control hook, gradient checkpointing, SDXL's vector, full-size counts."""

import dataclasses

import pytest
import torch

from unet.blocks import timestep_embedding
from unet.sd_unet import PRESETS, SD15, SD21, SDXL, TINY, UNet, control_sites, sdxl_vector

TINY_XL = dataclasses.replace(TINY, channels=(32, 64, 64), attention=(False, True, True), transformer_depth=(1, 2, 3),
                              heads=(2, 4, 4), linear_proj=True, adm_channels=32 + 6 * 256)


def test_tiny_forward_shape_dtype_and_speed():
    model = UNet(TINY).eval()
    x, context = torch.randn(2, 4, 16, 24), torch.randn(2, 7, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 999]), context)
    assert out.shape == x.shape and out.dtype == torch.float32
    with torch.no_grad():  # bf16 end to end (the time sinusoid itself stays fp32 inside)
        out16 = model.to(torch.bfloat16)(x.bfloat16(), 10, context.bfloat16())
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()


def test_odd_latent_sizes_follow_the_skips():
    # 13x21 is not divisible by 8: each upsample must land on the size of the skip it meets.
    model = UNet(TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 13, 21), 5, torch.randn(1, 3, 32))
    assert out.shape == (1, 4, 13, 21)


def test_control_hook_sites_and_zero_residual_is_a_noop():
    model = UNet(TINY).eval()
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([3, 400]), torch.randn(2, 5, 32)
    seen = []

    def hook(site, h):
        seen.append((site, tuple(h.shape)))
        return h + 0.0 * torch.randn_like(h)  # a control at scale 0

    with torch.no_grad():
        plain = model(x, t, context)
        hooked = model(x, t, context, control=hook)
    assert torch.equal(plain, hooked)  # bitwise: the same kernels at the same batch, plus exact zeros
    assert seen == [("conv_in", (2, 32, 16, 16)), ("down_0", (2, 32, 8, 8)), ("down_1", (2, 32, 4, 4)),
                    ("down_2", (2, 64, 2, 2)), ("down_3", (2, 64, 2, 2)), ("mid_in", (2, 64, 2, 2)),
                    ("mid_out", (2, 64, 2, 2))]
    assert control_sites(TINY) == {site: shape[1] for site, shape in seen}  # what ControlNeXtUNet validates against


def test_control_hook_changes_only_what_follows_the_site():
    # A residual after down block 0 must not touch the skips stored up to it (the official SD1.5/SVD-v2 placement:
    # unet.py adds it to `sample` after down_block_res_samples took theirs). Push order: conv_in, down_blocks[0]'s two
    # ResBlocks, its downsample (the h at the site), then the deeper levels. The last up block pops the first three,
    # up_blocks[2] pops two level-1 skips (computed after the site) and then the site's own skip.
    model = UNet(TINY).eval()
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)
    popped = []  # each up block's skips: its positional args are (h, emb, context, skips, size)
    hooks = [block.register_forward_pre_hook(lambda m, args: popped.append(list(args[3]))) for block in model.up_blocks]
    with torch.no_grad():
        base = model(x, 7, context)
        out = model(x, 7, context, control=lambda site, h: h + 1.0 if site == "down_0" else h)
    for hook in hooks:
        hook.remove()
    plain, controlled = popped[:4], popped[4:]
    # before the site: the same kernels on the same inputs, bitwise
    assert all(torch.equal(a, b) for a, b in zip(plain[3], controlled[3]))  # conv_in and down_blocks[0]'s ResBlocks
    assert torch.equal(plain[2][2], controlled[2][2])  # down_blocks[0]'s downsample output: stored before the residual
    assert (plain[2][0] - controlled[2][0]).abs().max() > 1e-2  # after the site: level 1 sees h + 1
    assert (out - base).abs().max() > 1e-2


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = UNet(TINY)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, torch.tensor([10, 20]), context).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)


def test_sdxl_vector_layout():
    pooled = torch.randn(2, 1280)
    y = sdxl_vector(pooled, torch.tensor([1024, 768]), torch.tensor([0, 16]), torch.tensor([1024, 1024]),
                    id_dim=SDXL.added_id_dim)
    assert y.shape == (2, 2816)
    assert torch.equal(y[:, :1280], pooled)
    torch.testing.assert_close(y[:, 1280 + 256:1280 + 512], timestep_embedding(torch.full((2,), 768.0), 256))


def test_missing_vector_condition_is_a_clear_error():
    with pytest.raises(ValueError, match="vector condition y"):
        UNet(TINY_XL)(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 3, 32))


@pytest.mark.parametrize("config, expected", [(SD15, 859_520_964), (SD21, 865_910_724), (SDXL, 2_567_463_684)])
def test_full_config_parameter_counts(config, expected):
    with torch.device("meta"):
        model = UNet(config)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_presets_table():
    assert PRESETS["sd15"] is SD15 and PRESETS["tiny"] is TINY
