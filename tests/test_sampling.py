"""The sampling path (controlnext/sampling.py): the CFG closure with control equals the plain forward of each half.

The references here never tile: each CFG half is one plain `model(x, t, context, image, y, scale)` call at batch B,
combined by Eq. 6 by hand, so a wrong tiling order (repeat_interleave for torch.cat's repeat), a control zeroed on the
wrong half, a y given to the wrong half, or a stale prepared stem all fail. The closure runs the branch at batch B and
the UNet at 2B where the references run both at B: different batch sizes round differently in fp32 (5e-7 measured on
an AMD EPYC, amplified to 2e-4 in x0_hat by the tiny SVD UNet), so these checks run in float64, where the two agree
to 1e-12 on any CPU; a wrong tiling moves x0_hat by > 1e-2. The whole-run check stays fp32 (the samplers draw fp32).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from controlnext import controlnext as cnx
from controlnext.control_branch import TINY as BRANCH_TINY
from controlnext.controlnext import build_controlled_unet
from controlnext.sampling import cfg_denoiser, generate, sigmas_for, windowed
from schedulers.denoisers import make_denoiser
from schedulers.guidance import cfg_combine
from schedulers.sigmas import SD15 as SD15_SCHEDULE, SVD as SVD_SCHEDULE
from unet.sd_unet import TINY, UNet
from unet.svd_unet import TINY as SVD_TINY, SVDUNet

TOL = dict(rtol=0, atol=1e-9)  # float64: only the order of additions differs (measured <= 2e-12)


def plain_cfg(model, schedule, context, uncond, w, image=None, scale=1.0, control_uncond=True, y=None, uncond_y=None):
    """The reference D(x, sigma): uncond and cond halves as two plain calls at batch B, no tiling, CFG by hand."""
    def net(x, t):
        def half(ctx, vec, k):
            if image is None:
                return cnx.run_unet(model, x, t, ctx, vec, None)
            return model(x, t, ctx, image, vec, k)
        return cfg_combine(half(uncond, y if uncond_y is None else uncond_y, scale if control_uncond else 0.0),
                           half(context, y, scale), w)
    return make_denoiser(schedule, net)


def randomise_zero_conv(model):
    if getattr(model, "zero_conv", None) is not None:
        nn.init.normal_(model.zero_conv.weight)  # otherwise the control term is exactly 0 and the test is vacuous
    return model


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    unet = UNet(TINY).eval().double()
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, TINY.context_dim, generator=g)
    image = torch.rand(2, 3, 64, 64, generator=g)  # two samples with different controls: a wrong tiling shows
    return unet, x.double(), context.double(), torch.zeros_like(context).double(), image.double()


@pytest.mark.parametrize("ablation, control_uncond", [("cross_norm", True), ("cross_norm", False), ("zero_conv", True),
                                                      ("controlnet", True)])
@torch.no_grad()
def test_cfg_closure_equals_the_plain_forward_per_half(tiny, ablation, control_uncond):
    unet, x, context, uncond, image = tiny
    model = randomise_zero_conv(build_controlled_unet(ablation, unet, BRANCH_TINY,
                                                      replace(cnx.SD15_TRAIN, control_uncond=control_uncond)).eval())
    model.double()
    if ablation == "controlnet":
        for m in [*model.controlnet.controlnet_down_blocks, model.controlnet.controlnet_mid_block,
                  model.controlnet.controlnet_cond_embedding.conv_out]:
            nn.init.normal_(m.weight, 0, 0.1)  # as zero_conv: a control term that is not 0
    denoiser = cfg_denoiser(unet, SD15_SCHEDULE, context, uncond, 3.0, [(model, image, 0.7)])
    reference = plain_cfg(model, SD15_SCHEDULE, context, uncond, 3.0, image, 0.7, control_uncond)
    for sigma in (14.0, 0.5):  # two steps of one run: the stem prepared once serves both
        torch.testing.assert_close(denoiser(x, sigma), reference(x, sigma), **TOL)
    # Without CFG the closure is the plain forward at batch B: the same kernels in the same order, bitwise.
    plain = cfg_denoiser(unet, SD15_SCHEDULE, context, None, 1.0, [(model, image, 0.7)])
    direct = make_denoiser(SD15_SCHEDULE, lambda x_in, t: model(x_in, t, context, image, None, 0.7))
    assert torch.equal(plain(x, 2.0), direct(x, 2.0))


@torch.no_grad()
def test_a_sampling_run_equals_the_official_way(tiny):
    # The official pipelines pass the image per CFG half (torch.cat([image] * 2)) and run the whole branch at 2B
    # every step; ours prepares the stem once and runs the branch once at B. Whole 4-step runs agree.
    unet, _, context, uncond, image = (v.float() for v in tiny)
    model = build_controlled_unet("cross_norm", unet, BRANCH_TINY, cnx.SD15_TRAIN).eval()
    ours = generate(cfg_denoiser(unet, SD15_SCHEDULE, context, uncond, 3.0, [(model, image, 1.0)]), (2, 4, 8, 8),
                    SD15_SCHEDULE, "euler", 4, torch.Generator().manual_seed(1))

    def official(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, context]), torch.cat([image, image]))
        return cfg_combine(*out.chunk(2), 3.0)

    theirs = generate(make_denoiser(SD15_SCHEDULE, official), (2, 4, 8, 8), SD15_SCHEDULE, "euler", 4,
                      torch.Generator().manual_seed(1))
    # fp32, batch 2B against B in every call, 4 steps: ~1e-6 per call (a wrong tiling: > 1e-2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_video_control_only_on_the_cond_half():
    # SVD-v2's pipeline: EDM closure, the control video shared by both halves but zeroed on the uncond one, k per
    # video repeated over its frames, the added_time_ids (y) the same for both halves (uncond_y=None).
    torch.manual_seed(0)
    # 4 input channels: the conditioning-frame latents that SVD concatenates to x are left out of this closure
    unet = SVDUNet(replace(SVD_TINY, in_channels=4)).eval().double()
    model = build_controlled_unet("cross_norm", unet, BRANCH_TINY, cnx.SVD_V2).eval().double()
    F_ = SVD_TINY.num_frames
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, F_, 4, 8, 8, generator=g), torch.randn(2, 1, SVD_TINY.context_dim, generator=g)
    ids, video = torch.tensor([[6.0, 127.0, 0.02], [6.0, 30.0, 0.1]]), torch.rand(2, F_, 3, 64, 64, generator=g)
    x, ctx, ids, video = x.double(), ctx.double(), ids.double(), video.double()
    denoiser = cfg_denoiser(unet, SVD_SCHEDULE, ctx, torch.zeros_like(ctx), 2.5, [(model, video, 1.0)], y=ids)
    reference = plain_cfg(model, SVD_SCHEDULE, ctx, torch.zeros_like(ctx), 2.5, video, 1.0, control_uncond=False, y=ids)
    torch.testing.assert_close(denoiser(x, 3.0), reference(x, 3.0), **TOL)


@torch.no_grad()
def test_sdxl_vector_condition_per_half():
    unet = UNet(replace(TINY, adm_channels=16)).eval().double()
    g = torch.Generator().manual_seed(3)
    x, ctx, y, uncond_y = (torch.randn(*shape, generator=g).double() for shape in
                           ((2, 4, 8, 8), (2, 5, TINY.context_dim), (2, 16), (2, 16)))
    denoiser = cfg_denoiser(unet, SD15_SCHEDULE, ctx, torch.zeros_like(ctx), 4.0, y=y, uncond_y=uncond_y)
    reference = plain_cfg(unet, SD15_SCHEDULE, ctx, torch.zeros_like(ctx), 4.0, y=y, uncond_y=uncond_y)
    torch.testing.assert_close(denoiser(x, 3.0), reference(x, 3.0), **TOL)
    swapped = plain_cfg(unet, SD15_SCHEDULE, ctx, torch.zeros_like(ctx), 4.0, y=uncond_y, uncond_y=y)
    assert (denoiser(x, 1.0) - swapped(x, 1.0)).abs().max() > 1e-2  # the halves' y matter: the check is not vacuous


@torch.no_grad()
def test_several_controls_are_summed_against_the_same_h(tiny):
    unet, x, context, uncond, image = tiny
    torch.manual_seed(4)
    first = build_controlled_unet("cross_norm", unet, BRANCH_TINY, cnx.SD15_TRAIN).eval().double()
    second = build_controlled_unet("cross_norm", unet, BRANCH_TINY, cnx.SD15_TRAIN).eval().double()  # other weights
    other = image.flip(-1)
    both = cfg_denoiser(unet, SD15_SCHEDULE, context, uncond, 2.0, [(first, image, 0.6), (second, other, 0.3)])

    def net(x_in, t):  # the official CN twice at the same site, both against the uncontrolled h
        c1, c2 = first.branch(image, t), second.branch(other, t)
        p = cnx.SD15_TRAIN

        def hook(site, h):
            if site != p.site:
                return h
            return (h + 0.6 * cnx.cross_normalize(h, c1, eps=p.eps, pool_first=True, paper_form=False)
                    + 0.3 * cnx.cross_normalize(h, c2, eps=p.eps, pool_first=True, paper_form=False))

        return cfg_combine(unet(x_in, t, uncond, control=hook), unet(x_in, t, context, control=hook), 2.0)

    torch.testing.assert_close(both(x, 1.0), make_denoiser(SD15_SCHEDULE, net)(x, 1.0), **TOL)
    # one of them at scale 0: the other alone, through the single-control path
    single = cfg_denoiser(unet, SD15_SCHEDULE, context, uncond, 2.0, [(first, image, 0.6)])
    off = cfg_denoiser(unet, SD15_SCHEDULE, context, uncond, 2.0, [(first, image, 0.6), (second, other, 0.0)])
    torch.testing.assert_close(off(x, 1.0), single(x, 1.0), **TOL)
    with pytest.raises(ValueError, match="another UNet"):
        cfg_denoiser(UNet(TINY), SD15_SCHEDULE, context, uncond, 2.0, [(first, image, 0.6)])
    controlnet = build_controlled_unet("controlnet", unet, BRANCH_TINY)
    with pytest.raises(ValueError, match="ControlNeXt models only"):
        cfg_denoiser(unet, SD15_SCHEDULE, context, uncond, 2.0, [(first, image, 0.6), (controlnet, image, 1.0)])


def test_control_window_holds_exactly_the_steps_inside_it():
    """Step i of n sits at i/n: the window [start, end] controls the steps with start <= i/n <= end, both ends
    included (4 steps: [0.3, 0.75] holds steps 2 and 3; [0.25, 0.5] holds 1 and 2; [0, 1] all of them)."""
    sigmas = sigmas_for(SD15_SCHEDULE, "euler", 4)
    levels = sigmas.float()[:-1].tolist()  # what generate() hands the denoiser, step by step
    for (start, end), expected in (((0.3, 0.75), "ppcc"), ((0.25, 0.5), "pccp"), ((0.0, 1.0), "cccc"),
                                   ((1.0, 1.0), "pppp")):
        seen = []
        denoiser = windowed(lambda x, s: seen.append("c"), lambda x, s: seen.append("p"), sigmas, start, end)
        for sigma in levels:
            denoiser(None, sigma)
        assert "".join(seen) == expected, (start, end)
