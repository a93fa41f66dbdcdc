"""ControlNeXt: the branch presets against the reference's independent numbers, cross normalization against the
official code and closed forms, the injection presets and arms, ControlNet vs diffusers, and Table 1. Full configs
are built on the meta device only. The sampling path: tests/test_sampling.py; UNet selection: tests/test_selection.py."""

from __future__ import annotations

import math
import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from controlnext import controlnext as cnx
from controlnext.checkpoint import save_state
from controlnext.releases import load_control_branch
from controlnext.control_branch import G1_SD15, G1_SVD, G2, G2_SVD_INFER, TINY as BRANCH_TINY, ControlNeXt
from controlnext.controlnet import ControlNet, ControlNetConfig
from controlnext.controlnext import ABLATIONS, build_controlled_unet
from unet.sd_unet import SD15, TINY, UNet, control_sites

ROOT = Path(__file__).resolve().parents[1]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny_inputs(batch: int = 2):
    x = torch.randn(batch, 4, 8, 8)
    t = torch.tensor([10.0, 700.0])[:batch]
    context = torch.randn(batch, 5, TINY.context_dim)
    image = torch.rand(batch, 3, 64, 64)
    return x, t, context, image


# --- control branches: each preset against the numbers of ../shared/reference/controlnext.md §1.2-1.4 ---------------
# Written out here, not derived from our configs, so that a wrong preset cannot be its own reference.
# stem convs (in, out, stride, padding), max-pool after the stem, ResBlocks (in, out, GroupNorm groups), residual mid, out
OFFICIAL = {
    "g2": ([(3, 64, 2, 1), (64, 64, 1, 1), (64, 128, 1, 1)], False, [(128, 128, 4), (128, 256, 8)], True, 320),
    "g1_sd15": ([], False, [(3, 128, 1), (128, 256, 8), (256, 256, 8)], False, 1280),
    "g1_svd": ([(3, 64, 2, 1), (64, 64, 1, 0), (64, 128, 1, 0)], True, [(128, 128, 4), (128, 256, 8), (256, 256, 8)],
               True, 1280),
    "g2_svd_infer": ([(3, 64, 2, 1), (64, 64, 1, 0), (64, 128, 1, 0)], False, [(128, 128, 4), (128, 256, 8)], True, 320),
}
# Parameters per top-level module (§1.2-1.4 tables; the stem GroupNorms are 128, 128, 256; the ReLUs have none).
STEM = {"embedding.0": 1_792, "embedding.1": 128, "embedding.3": 36_928, "embedding.4": 128, "embedding.6": 73_856,
        "embedding.7": 256}
LAYER_COUNTS = {
    "g2": {"time_embedding": 98_816, **STEM, "down_res.0": 328_576, "down_sample.0": 147_584, "down_res.1": 984_832,
           "down_sample.1": 590_080, "mid_convs.0": 1_181_184, "mid_convs.1": 82_240},
    "g1_sd15": {"time_embedding": 98_816, "down_res.0": 184_838, "down_sample.0": 147_584, "down_res.1": 984_832,
                "down_sample.1": 590_080, "down_res.2": 1_246_976, "down_sample.2": 590_080, "mid_convs.0": 1_180_160,
                "mid_convs.1": 328_960, "scale": 1},
    "g1_svd": {"time_embedding": 98_816, **STEM, "down_res.0": 328_576, "down_sample.0": 147_584,
               "down_res.1": 984_832, "down_sample.1": 590_080, "down_res.2": 1_246_976, "down_sample.2": 590_080,
               "mid_convs.0": 1_181_184, "mid_convs.1": 328_960, "scale": 1},
}
LAYER_COUNTS["g2_svd_infer"] = LAYER_COUNTS["g2"]  # padding changes no parameter
TOTALS = {"g2": 3_526_400, "g1_sd15": 5_352_327, "g1_svd": 5_610_177, "g2_svd_infer": 3_526_400}
# Output map for a condition image (H, W), reference §1.2-1.4: stride 8, 8, 32; the v2 inference stem loses 4 px.
OUTPUT = {"g2": ((512, 512), (64, 64)), "g1_sd15": ((512, 512), (64, 64)), "g1_svd": ((512, 768), (16, 24)),
          "g2_svd_infer": ((576, 1024), (71, 127))}
PRESET_CONFIGS = {"g2": G2, "g1_sd15": G1_SD15, "g1_svd": G1_SVD, "g2_svd_infer": G2_SVD_INFER}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_branch_presets_are_the_official_modules(name):
    stem, maxpool, resblocks, residual_mid, out = OFFICIAL[name]
    with torch.device("meta"):
        branch = ControlNeXt(PRESET_CONFIGS[name])
        (H, W), size = OUTPUT[name]
        assert tuple(branch(torch.zeros(1, 3, H, W), torch.zeros(1)).shape) == (1, out, *size)
    counts = {}
    for key, p in branch.named_parameters():
        parts = key.split(".")
        layer = parts[0] if parts[0] in ("time_embedding", "scale") else ".".join(parts[:2])  # e.g. down_res.0
        counts[layer] = counts.get(layer, 0) + p.numel()
    assert counts == LAYER_COUNTS[name] and n_params(branch) == TOTALS[name]
    convs = [m for m in branch.embedding.children() if isinstance(m, nn.Conv2d)] if stem else []
    assert [(c.in_channels, c.out_channels, c.stride[0], c.padding[0]) for c in convs] == stem
    norms = [m for m in branch.embedding.children() if isinstance(m, nn.GroupNorm)] if stem else []
    assert [(g.num_groups, g.eps) for g in norms] == [(2, 1e-5)] * len(stem)  # plain nn.GroupNorm(2, C)
    assert (stem != [] and isinstance(list(branch.embedding.children())[-1], nn.MaxPool2d)) == maxpool
    for res, down, (c_in, c_out, groups) in zip(branch.down_res, branch.down_sample, resblocks, strict=True):
        assert (res.norm1.num_channels, res.conv1.out_channels) == (c_in, c_out)
        assert (res.norm1.num_groups, res.norm2.num_groups) == (groups, groups)
        assert (res.norm1.eps, res.norm2.eps) == (1e-6, 1e-6)  # diffusers ResnetBlock2D's default
        assert (down.conv.stride, down.conv.padding) == ((2, 2), (1, 1))
    mid_norms = [m for m in branch.mid_convs[0] if isinstance(m, nn.GroupNorm)]
    assert [(g.num_groups, g.eps) for g in mid_norms] == ([(8, 1e-5)] * 2 if residual_mid else [])
    assert branch.mid_convs[1].out_channels == out and branch.mid_convs[1].kernel_size == (1, 1)


def _official_branch(name: str) -> nn.Module:
    """The official module rebuilt from diffusers' blocks (ResnetBlock2D, Downsample2D, Timesteps, TimestepEmbedding)
    with the numbers of OFFICIAL, not with our config."""
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D

    stem, maxpool, resblocks, residual_mid, out = OFFICIAL[name]
    m = nn.Module()
    m.time_proj = Timesteps(128, flip_sin_to_cos=True, downscale_freq_shift=0)
    m.time_embedding = TimestepEmbedding(128, 256)
    layers = []
    for c_in, c_out, stride, pad in stem:
        layers += [nn.Conv2d(c_in, c_out, 3, stride, pad), nn.GroupNorm(2, c_out), nn.ReLU()]
    m.embedding = nn.Sequential(*layers, *([nn.MaxPool2d(2)] if maxpool else []))
    m.down_res = nn.ModuleList(ResnetBlock2D(in_channels=i, out_channels=o, temb_channels=256, groups=g)
                               for i, o, g in resblocks)
    m.down_sample = nn.ModuleList(Downsample2D(o, use_conv=True, out_channels=o, padding=1, name="op")
                                  for _, o, _ in resblocks)
    w = resblocks[-1][1]
    conv = lambda: nn.Conv2d(w, w, 3, padding=1)  # noqa: E731
    mid = [conv(), nn.ReLU(), nn.GroupNorm(8, w), conv(), nn.GroupNorm(8, w)] if residual_mid else [conv(), nn.ReLU(), conv()]
    m.mid_convs = nn.ModuleList([nn.Sequential(*mid), nn.Conv2d(w, out, 1)])
    m.residual_mid = residual_mid
    return m


@pytest.mark.parametrize("name", ["g2", "g1_sd15", "g1_svd"])
def test_branch_matches_official_blocks(name):
    torch.manual_seed(0)
    ours = ControlNeXt(PRESET_CONFIGS[name])
    ref = _official_branch(name)
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "scale"}, strict=True)
    image, t = torch.rand(2, 3, 64, 64), torch.tensor([3.0, 999.0])
    with torch.no_grad():
        emb = ref.time_embedding(ref.time_proj(t))
        h = ref.embedding(image)
        for res, down in zip(ref.down_res, ref.down_sample):
            h = down(res(h, emb))
        expected = ref.mid_convs[1](ref.mid_convs[0](h) + h if ref.residual_mid else ref.mid_convs[0](h))
        out = ours(image, t)
        # the stem once per run + the rest per step (what sampling.py does) is the same sequence of kernels
        assert torch.equal(ours.from_stem(ours.stem(image), t), out)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)  # fp32 noise on O(1) outputs; a wrong op is O(1)


def test_video_branch_gives_each_video_its_own_timestep():
    """(B, F, 3, H, W) with t (B,): frames are folded video-major (B*F), so t is repeated per video (the official
    modules' repeat_interleave), not tiled. Reference: each video alone at its own t. Batch 6 against batch 3: fp32
    kernels may round differently (tolerance 1e-5 on O(1) outputs); a tiled t gives O(1) differences."""
    torch.manual_seed(0)
    branch = ControlNeXt(BRANCH_TINY).eval()
    video, t = torch.rand(2, 3, 3, 64, 64), torch.tensor([5.0, 900.0])
    with torch.no_grad():
        out = branch(video, t)  # (6, C, h, w)
        expected = torch.cat([branch(video[b], t[b].expand(3)) for b in range(2)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_official_key_names_and_roundtrip(tmp_path):
    # A sample of keys and shapes from the official releases (reference controlnext.md §1.5).
    expected = {
        G2: {"time_embedding.linear_1.weight": (256, 128), "embedding.0.weight": (64, 3, 3, 3), "embedding.1.weight": (64,),
             "embedding.6.weight": (128, 64, 3, 3), "embedding.7.bias": (128,), "down_res.0.time_emb_proj.weight": (128, 256),
             "down_res.1.conv_shortcut.weight": (256, 128, 1, 1), "down_sample.1.conv.weight": (256, 256, 3, 3),
             "mid_convs.0.0.weight": (256, 256, 3, 3), "mid_convs.0.2.weight": (256,), "mid_convs.0.4.bias": (256,),
             "mid_convs.1.weight": (320, 256, 1, 1)},
        G1_SD15: {"scale": (), "down_res.0.norm1.weight": (3,), "down_res.0.conv1.weight": (128, 3, 3, 3),
                  "down_res.0.conv_shortcut.weight": (128, 3, 1, 1), "down_sample.2.conv.weight": (256, 256, 3, 3),
                  "mid_convs.0.2.weight": (256, 256, 3, 3), "mid_convs.1.weight": (1280, 256, 1, 1)},
        G1_SVD: {"scale": (), "embedding.3.weight": (64, 64, 3, 3), "down_res.2.conv2.weight": (256, 256, 3, 3),
                 "mid_convs.0.3.weight": (256, 256, 3, 3), "mid_convs.1.weight": (1280, 256, 1, 1)},
    }
    for cfg, keys in expected.items():
        with torch.device("meta"):
            state = ControlNeXt(cfg).state_dict()
        for k, shape in keys.items():
            assert tuple(state[k].shape) == shape, k
        assert ("scale" in state) == cfg.learnable_scale
        assert not any(k.startswith("mid_convs.0.1") or k.startswith("embedding.2") for k in state)  # ReLU slots
    # Round trip through a file, plain and wrapped as the SVD-v2 DeepSpeed export (`controlnext.` / `unet.`).
    for cfg, name in ((G2, "g2"), (G1_SD15, "g1_sd15"), (G1_SVD, "g1_svd")):
        branch = ControlNeXt(cfg)
        save_state(branch.state_dict(), tmp_path / f"{name}.safetensors")
        loaded = load_control_branch(tmp_path / f"{name}.safetensors")
        assert loaded.config == cfg
        assert all(torch.equal(a, b) for a, b in zip(branch.state_dict().values(), loaded.state_dict().values()))
    wrapped = {**{f"controlnext.{k}": v for k, v in branch.state_dict().items()}, "unet.conv_in.weight": torch.zeros(1)}
    loaded = load_control_branch(wrapped)
    assert all(torch.equal(a, b) for a, b in zip(branch.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="missing"):
        load_control_branch({k: v for k, v in branch.state_dict().items() if k != "mid_convs.1.bias"})




# --- cross normalization: the official transcriptions and closed forms -------------------------------------------------

def _stats(x):
    return torch.mean(x, dim=(1, 2, 3), keepdim=True), torch.std(x, dim=(1, 2, 3), keepdim=True)


def official(sample, control, k, *, eps, pool_first):
    """ControlNeXt@ab4b3ac: SD1.5 unet.py (pool, then CN) / SDXL and SVD (CN, then pool), then sample + control * k."""
    if pool_first:
        control = F.adaptive_avg_pool2d(control, sample.shape[-2:])
    mean_latents, std_latents = _stats(sample)
    mean_control, std_control = _stats(control)
    control = (control - mean_control) * (std_latents / (std_control + eps)) + mean_latents
    if not pool_first:
        control = F.adaptive_avg_pool2d(control, sample.shape[-2:])
    return sample + control * k


def _model_for(preset: cnx.Injection, learned: float = 0.8) -> cnx.ControlNeXtUNet:
    """A tiny controlled UNet whose branch fits the preset's site, with the G1 `scale` parameter set to `learned`."""
    branch = replace(BRANCH_TINY, out_channels=control_sites(TINY)[preset.site], learnable_scale=preset.scale != "none")
    model = cnx.ControlNeXtUNet(UNet(TINY), branch, preset)
    if model.branch.scale is not None:
        nn.init.constant_(model.branch.scale, learned)
    return model


def test_injection_presets_match_the_official_forwards():
    h = torch.randn(3, 8, 4, 6) * 2.5 + 0.7
    c = torch.randn(3, 8, 8, 12) * 0.3 - 1.0
    learned = torch.tensor(0.8)
    cases = {  # preset -> (official k at the user's scale, eps, pool first, site, CFG uncond half controlled);
        # sites and uncond halves as ../shared/reference/controlnext.md §0 and §2.4 give them, written out here
        "sd15_train": (0.35, 1e-12, True, "down_0", True),
        "sd15_release": (learned, 1e-12, True, "mid_out", True),  # after the mid block
        "sdxl": (1.0, 1e-12, False, "conv_in", True),
        "svd_v1": (torch.sigmoid(learned) * 1.3, 1e-5, False, "mid_in", False),  # before the mid block; intended "no"
        "svd_v2": (1.0 * 0.2, 1e-5, False, "down_0", False),
    }
    for name, (k, eps, pool_first, site, control_uncond) in cases.items():
        preset = cnx.PRESETS[name]
        assert (preset.site, preset.control_uncond) == (site, control_uncond), name
        user = 0.35 if name == "sd15_train" else 1.0
        with torch.no_grad():
            ours = h + _model_for(preset).strength(user) * cnx.align(h, c, preset)  # the add at the site
        torch.testing.assert_close(ours, official(h, c, k, eps=eps, pool_first=pool_first), rtol=0, atol=1e-6)
    # The official form gives the added term the main branch's std and mean when pooled first.
    out = cnx.cross_normalize(h, c, eps=1e-12, pool_first=True, paper_form=False)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), h.std(dim=(1, 2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), h.mean(dim=(1, 2, 3)), rtol=0, atol=1e-5)


def test_paper_form_is_eq10():
    h, c, gamma, eps = torch.randn(2, 4, 5, 5) + 3.0, torch.randn(2, 4, 5, 5), 0.7, 1e-5
    mu = h.mean(dim=(1, 2, 3), keepdim=True)
    var = ((h - mu) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # Eq. 8, 1/n
    expected = gamma * (c - mu) / torch.sqrt(var + eps)  # Eq. 9-10
    ours = gamma * cnx.cross_normalize(h, c, eps=eps, pool_first=True, paper_form=True)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_cross_normalize_eps_in_closed_form():
    # Small-variance inputs, where eps decides the result; values exact in fp32 (multiples of powers of 2), so the
    # expectation is exact up to one rounding. A wrong eps, a biased/unbiased mix-up or eps on the std instead of the
    # variance (or the reverse) moves the result by > 1e-3 relative; the tolerance is 1e-6.
    n, a, b = 16, 2.0**-10, 2.0**-14
    sign = torch.tensor([1.0, -1.0]).repeat(n // 2).view(1, 1, 4, 4)  # (1, 1, 4, 4): half +1, half -1
    # Paper form: h = 0.5 +- a (mean 0.5, biased var a^2), c = 1.5 -> (1.5 - 0.5) / sqrt(a^2 + eps)
    h, c = 0.5 + a * sign, torch.full((1, 1, 4, 4), 1.5)
    out = cnx.cross_normalize(h, c, eps=1e-5, pool_first=True, paper_form=True)
    torch.testing.assert_close(out, torch.full_like(out, 1 / math.sqrt(a * a + 1e-5)), rtol=1e-6, atol=0)
    # Official form (SVD eps 1e-5 on the unbiased std): h = +-1, c = +-b, both mean 0, std_h = s and std_c = b s with
    # s = sqrt(n / (n - 1)) (unbiased) -> c * std_h / (std_c + eps) = +-b s / (b s + eps).
    s = math.sqrt(n / (n - 1))
    out = cnx.cross_normalize(sign, b * sign, eps=1e-5, pool_first=True, paper_form=False)
    torch.testing.assert_close(out, sign * (b * s / (b * s + 1e-5)), rtol=1e-6, atol=0)


# --- injection presets and the --ablation arms ------------------------------------------------------------------------

def test_injection_fields_are_validated():
    for field, value in (("form", "cross_norm"), ("scale", "learned"), ("site", "down0"), ("eps", 0.0)):
        with pytest.raises(ValueError, match=f"Injection.{field}"):
            replace(cnx.SD15_TRAIN, **{field: value})
    unet = UNet(TINY)
    with pytest.raises(ValueError, match="not a site of this UNet"):
        cnx.ControlNeXtUNet(unet, BRANCH_TINY, replace(cnx.SD15_TRAIN, site="down_7"))
    with pytest.raises(ValueError, match="out_channels=32 differ from the UNet's width 64 at site 'mid_out'"):
        cnx.ControlNeXtUNet(unet, BRANCH_TINY, replace(cnx.SD15_TRAIN, site="mid_out"))
    with pytest.raises(ValueError, match="needs a branch with a learnable scale"):
        cnx.ControlNeXtUNet(unet, BRANCH_TINY, replace(cnx.SD15_TRAIN, scale="raw"))


def test_ablation_arms_at_init():
    unet = UNet(TINY).eval()
    x, t, context, image = tiny_inputs()
    with torch.no_grad():
        ref = unet(x, t, context)
        for name in ABLATIONS:
            model = build_controlled_unet(name, unet, BRANCH_TINY, cnx.SD15_TRAIN).eval()
            out = model(x, t, context, image)
            params = model.control_parameters()
            assert params and not any(n.startswith("unet.") for n in params), name
            if name in ("zero_conv", "controlnet"):
                # zero-initialised, the added term is exactly 0: bitwise the base UNet (same kernels, same batch)
                assert torch.equal(out, ref), name
            else:
                assert (out - ref).abs().max() > 1e-3, name  # cross normalization acts from step 0, as the official code
    arms = {name: build_controlled_unet(name, unet, BRANCH_TINY, cnx.SVD_V2) for name in ABLATIONS}
    assert arms["cross_norm"].injection == cnx.SVD_V2
    assert [arms[n].injection.form for n in ("zero_conv", "no_norm", "paper_norm")] == ["zero_conv", "plain", "paper"]
    assert arms["paper_norm"].injection.eps == 1e-5 and arms["paper_norm"].gamma is not None
    with pytest.raises(ValueError, match="unknown ablation"):
        build_controlled_unet("zeroconv", unet, BRANCH_TINY)


def test_paper_arm_applies_its_learnable_gamma():
    """Eq. 10's γ starts at 1, so at init the paper arm cannot tell γ applied from γ ignored: set it and compare with
    the UNet run through a hand-written hook, h + γ k (c - mean_h) / sqrt(var_h + eps) at the preset's site."""
    unet = UNet(TINY).eval()
    x, t, context, image = tiny_inputs()
    model = build_controlled_unet("paper_norm", unet, BRANCH_TINY, cnx.SD15_TRAIN).eval()
    with torch.no_grad():
        model.gamma.fill_(0.5)
        c = model.branch(image, t)

        def hook(site, h):
            if site != cnx.SD15_TRAIN.site:
                return h
            c_pooled = F.adaptive_avg_pool2d(c, h.shape[-2:])
            mean, var = h.mean(dim=(1, 2, 3), keepdim=True), h.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
            return h + 0.5 * 0.8 * (c_pooled - mean) / torch.sqrt(var + 1e-5)  # γ = 0.5, user scale 0.8

        expected = unet(x, t, context, control=hook)
        torch.testing.assert_close(model(x, t, context, image, scale=0.8), expected, rtol=0, atol=1e-5)
        model.gamma.zero_()
        assert torch.equal(model(x, t, context, image), unet(x, t, context))  # γ = 0: an exact 0 is added


def test_svd_injection_presets_on_the_video_unet():
    from unet.svd_unet import TINY as SVD_TINY, SVDUNet

    unet = SVDUNet(SVD_TINY).eval()
    frames = SVD_TINY.num_frames
    x, context = torch.randn(1, frames, 8, 8, 8), torch.randn(1, 1, SVD_TINY.context_dim)
    ids, video = torch.tensor([[6.0, 127.0, 0.02]]), torch.rand(1, frames, 3, 64, 64)
    g1_svd_tiny = replace(BRANCH_TINY, stem_padding=(1, 0, 0), stem_maxpool=True, res_channels=(16, 32, 32),
                          res_groups=(4, 8, 8), out_channels=SVD_TINY.channels[-1], learnable_scale=True)
    assert g1_svd_tiny.stride == 32
    with torch.no_grad():
        ref = unet(x, 1.0, context, ids, num_frames=frames)
        for preset, branch in ((cnx.SVD_V2, BRANCH_TINY), (cnx.SVD_V1, g1_svd_tiny)):
            if preset is cnx.SVD_V2:  # zero-initialised: bitwise the base UNet (same kernels, same batch)
                zero_conv = build_controlled_unet("zero_conv", unet, branch, preset)
                assert torch.equal(zero_conv(x, 1.0, context, video, ids), ref)
            model = build_controlled_unet("cross_norm", unet, branch, preset)
            assert (model(x, 1.0, context, video, ids) - ref).abs().max() > 1e-4
            # A per-video scale of 0 (the CFG uncond half in the SVD pipelines) is exactly the base UNet.
            off = model(x, 1.0, context, video, ids, scale=torch.zeros(1, 1, 1, 1))
            assert torch.equal(off, ref)


# --- ControlNet baseline vs diffusers ---------------------------------------------------------------------------------

def test_controlnet_matches_diffusers():
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet(TINY).eval()
    ours = ControlNet.from_unet(unet).eval()
    base = unet.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items() if k in base)  # the encoder is a copy
    with torch.no_grad():  # give the zero convs weights, or the comparison would be 0 == 0
        for m in [*ours.controlnet_down_blocks, ours.controlnet_mid_block, ours.controlnet_cond_embedding.conv_out]:
            m.weight.normal_(0, 0.1)
            m.bias.normal_(0, 0.1)
    u = TINY
    kwargs = dict(block_out_channels=u.channels, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  layers_per_block=u.layers_per_block, attention_head_dim=u.heads, cross_attention_dim=u.context_dim,
                  norm_num_groups=u.groups)
    ref = ControlNetModel(in_channels=4, conditioning_embedding_out_channels=ours.config.hint_channels, **kwargs)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, t, context, image = tiny_inputs()
    with torch.no_grad():
        down, mid = ours(x, t, context, image, scale=0.7)
        ref_down, ref_mid = ref(x, t, context, controlnet_cond=image, conditioning_scale=0.7, return_dict=False)
        assert len(down) == len(ref_down)
        err = max((a - b).abs().max().item() for a, b in zip([*down, mid], [*ref_down, ref_mid]))
        assert err < 1e-5, err
        ref_unet = UNet2DConditionModel(in_channels=4, out_channels=4, up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                        **kwargs)
        ref_unet.load_state_dict(unet.state_dict(), strict=True)
        out = unet(x, t, context, down_residuals=down, mid_residual=mid)
        expected = ref_unet(x, t, context, down_block_additional_residuals=tuple(down),
                            mid_block_additional_residual=mid).sample
        assert (out - expected).abs().max() < 1e-4


def test_controlnet_sd15_learnable_count():
    with torch.device("meta"):
        assert n_params(ControlNet(ControlNetConfig(SD15))) == 361_279_120


# --- Table 1 ----------------------------------------------------------------------------------------------------------

def test_table1_within_half_a_million():
    spec = importlib.util.spec_from_file_location("table1_params", ROOT / "experiments" / "table1_params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.table1()
    checked = 0
    for model, method, how, total, learnable, paper in rows:
        if paper is None:
            continue
        # The paper rounds some figures (864.87 -> 865) and truncates others (859.52 -> 859, 1220.80 -> 1220).
        assert abs(total - paper[0]) < 0.5 or math.floor(total) == paper[0], (model, method, total, paper)
        if paper[1] is not None:
            assert abs(learnable - paper[1]) < 0.5 or math.floor(learnable) == paper[1], (model, method, learnable, paper)
        checked += 1
    assert checked >= 6


def test_strength_is_scale_times_gain_times_learned_scale_times_gamma():
    """k of every arm in closed form: scale * gain [* raw or sigmoid(learned scale)] [* γ]. The preset tests run at
    gain 1 or with γ = 1, so a k that drops the gain in the paper arm or swaps raw and sigmoid is only visible here."""
    unet = UNet(TINY)
    paper = build_controlled_unet("paper_norm", unet, BRANCH_TINY, replace(cnx.SD15_TRAIN, gain=0.2))
    with torch.no_grad():
        paper.gamma.fill_(0.5)
    torch.testing.assert_close(paper.strength(0.8), torch.tensor(0.8 * 0.2 * 0.5), rtol=1e-6, atol=0)
    learned = replace(BRANCH_TINY, learnable_scale=True)
    for kind, expected in (("raw", 0.8 * 1.3 * -0.4), ("sigmoid", 0.8 * 1.3 / (1 + math.exp(0.4)))):
        model = build_controlled_unet("cross_norm", unet, learned, replace(cnx.SD15_TRAIN, gain=1.3, scale=kind))
        with torch.no_grad():
            model.branch.scale.fill_(-0.4)
        torch.testing.assert_close(model.strength(0.8), torch.tensor(expected), rtol=1e-6, atol=0)
    # per sample (B, 1, 1, 1) over F frames -> (B*F, 1, 1, 1), frame-major within each sample as SVDUNet folds them
    plain = build_controlled_unet("cross_norm", unet, BRANCH_TINY, cnx.SD15_TRAIN)
    k = plain.strength(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1), frames=3)
    assert k.flatten().tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
