"""Every key table against the full-size key lists of the real checkpoints (STYLE.md §4.5), offline, no weights.

The lists in tests/fixtures/*_keys.txt (name and shape of every tensor) come from independent sources: the original
model code (CompVis/stable-diffusion, Stability-AI/stablediffusion, generative-models, open_clip, the official
ControlNeXt code) and diffusers / transformers, each built at full size on the meta device; each file's header and
tests/fixtures/record_keys.py say how. Here our model is built at full size on meta and the table the loaders use
must map the recorded set onto ours exactly (no unused key, no unfilled tensor, equal shapes: check_state raises
otherwise), and, where we export that layout, the inverse table must give back exactly the recorded set.
"""

import functools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from controlnext.checkpoint import KeyMap, check_state
from controlnext.control_branch import G1_SD15, G1_SVD, G2, ControlNeXt
from controlnext.keymap import CONTROL_BRANCH_ROWS, UNET_ROWS
from controlnext.loaders import ORIGINAL_PREFIXES, original_state
from encoders import keymap as clip_keymap
from encoders.clip import CLIP_L, OPENCLIP_BIGG_TEXT, OPENCLIP_H_TEXT, OPENCLIP_H_VISION, PRESETS as CLIP_PRESETS
from encoders.clip import build_clip
from unet.keymap import detect_unet_preset, svd_unet_original_rows, unet_original_rows
from unet.sd_unet import SD15, SD21, SDXL, UNet
from unet.svd_unet import SVD_XT, SVDUNet
from vae.autoencoder import SD, AutoencoderKL
from vae.keymap import LEGACY_DIFFUSERS_ROWS, SD_VAE_ROWS, SVD_FIRST_STAGE_ROWS, SVD_RELEASE_ROWS
from vae.temporal_decoder import SVD, TemporalAutoencoder

FIXTURES = Path(__file__).parent / "fixtures"


def recorded(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """A fixture as meta tensors of the recorded shapes, optionally under a single-file prefix."""
    state = {}
    for line in (FIXTURES / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            state[prefix + key] = torch.empty([int(d) for d in shape.split(",") if d], device="meta")
    return state


def meta(build):
    with torch.device("meta"):
        return build()


def shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@functools.cache
def clip_preset_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    return {name: shapes(meta(lambda: build_clip(preset)).state_dict()) for name, preset in CLIP_PRESETS.items()}


def assert_maps(rows: list, source: dict, model: torch.nn.Module, what: str) -> None:
    """The table sends every recorded key onto the model's keys, filling all of them with equal shapes."""
    renamed, origin = KeyMap(rows).apply(source)
    check_state(model, renamed, origin, what=what)  # lists unexpected / missing / wrong-shape keys if any


# --- UNets -------------------------------------------------------------------------------------------------------

UNETS = [("sd15", SD15), ("sd21", SD21), ("sdxl", SDXL)]


@pytest.mark.parametrize("tag, config", UNETS, ids=[t for t, _ in UNETS])
def test_unet_tables_map_the_original_and_diffusers_files(tag, config):
    model = meta(lambda: UNet(config))
    original = recorded(f"{tag}_unet_keys.txt")
    assert_maps(unet_original_rows(config), original, model, f"{tag} original")
    diffusers = recorded(f"diffusers_{tag}_unet_keys.txt")
    assert_maps([], diffusers, model, f"{tag} diffusers")  # our names are the diffusers names
    assert shapes(original_state(model, "unet")) == shapes(recorded(f"{tag}_unet_keys.txt", "model.diffusion_model."))
    assert detect_unet_preset(original) == detect_unet_preset(diffusers) == tag


def test_svd_unet_tables_map_the_original_and_diffusers_files():
    model = meta(lambda: SVDUNet(SVD_XT))
    original = recorded("svd_xt_unet_keys.txt")
    # two independent sources agree on the names: SGM's VideoUNet and DiffSynth-Studio's transcription of the file
    transcribed = [line.strip() for line in (FIXTURES / "svd_unet_original_keys.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    assert sorted(original) == sorted(transcribed)
    assert_maps(svd_unet_original_rows(SVD_XT), original, model, "svd original")
    assert_maps([], recorded("diffusers_svd_unet_keys.txt"), model, "svd diffusers")
    assert shapes(original_state(model, "unet")) == shapes(recorded("svd_xt_unet_keys.txt", "model.diffusion_model."))


# --- VAEs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["sd15", "sd21", "sdxl"])
def test_vae_tables_map_the_original_files(tag):
    model = meta(lambda: AutoencoderKL(SD))
    original = recorded(f"{tag}_vae_keys.txt")
    assert_maps(SD_VAE_ROWS + LEGACY_DIFFUSERS_ROWS, original, model, f"{tag} VAE")  # the rows load_vae uses
    # export: the mid attention goes back to 1x1 convs, every name back to LDM's
    assert shapes(original_state(model, "vae")) == shapes(recorded(f"{tag}_vae_keys.txt", "first_stage_model."))


def test_vae_tables_map_the_diffusers_folders():
    assert_maps(SD_VAE_ROWS + LEGACY_DIFFUSERS_ROWS, recorded("diffusers_sd_vae_keys.txt"),
                meta(lambda: AutoencoderKL(SD)), "SD VAE diffusers")
    assert_maps(SVD_FIRST_STAGE_ROWS + LEGACY_DIFFUSERS_ROWS, recorded("diffusers_svd_vae_keys.txt"),
                meta(lambda: TemporalAutoencoder(SVD)), "SVD VAE diffusers")


def test_svd_release_tables_map_svd_xt_safetensors():
    release = recorded("svd_xt_vae_keys.txt")  # first_stage_model. and conditioner.embedders.3.encoder.
    others = {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 8, 3, 3, device="meta"),
              "conditioner.embedders.0.open_clip.model.visual.proj": torch.empty(1280, 1024, device="meta")}
    model = meta(lambda: TemporalAutoencoder(SVD))
    assert_maps(SVD_RELEASE_ROWS, release | others, model, "svd_xt.safetensors VAE")  # the rest of the file dropped
    first_stage = {k[len("first_stage_model."):]: v for k, v in release.items() if k.startswith("first_stage_model.")}
    assert_maps(SVD_FIRST_STAGE_ROWS, first_stage, meta(lambda: TemporalAutoencoder(replace(SVD, use_quant_conv=False))),
                "SVD first stage alone")
    # export: everything but the embedder's image decoder and post_quant_conv, which our model does not hold
    unused = ("conditioner.embedders.3.encoder.decoder.", "conditioner.embedders.3.encoder.post_quant_conv.")
    assert shapes(original_state(model, "vae")) == {k: s for k, s in shapes(release).items() if not k.startswith(unused)}


# --- CLIP towers ---------------------------------------------------------------------------------------------------

CLIPS = [  # fixture, the component in single files, our preset, what the export leaves out of the file's keys
    ("clip_l_text_keys.txt", "sd15_text", CLIP_L, ()),
    ("clip_l_text_keys.txt", "sdxl_text_l", CLIP_L, ()),
    ("openclip_h_text_keys.txt", "sd2_text", OPENCLIP_H_TEXT,
     ("transformer.resblocks.23.", "text_projection", "logit_scale")),  # SD2 runs 23 of 24 blocks, no projection
    ("openclip_bigg_text_keys.txt", "sdxl_text_g", OPENCLIP_BIGG_TEXT, ("logit_scale",)),
    ("openclip_h_vision_keys.txt", "svd_image", OPENCLIP_H_VISION,  # the text leftovers SGM kept
     ("token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale")),
]


@pytest.mark.parametrize("fixture, part, config, not_exported", CLIPS, ids=[c[1] for c in CLIPS])
def test_clip_tables_map_the_original_files(fixture, part, config, not_exported):
    prefix = ORIGINAL_PREFIXES[part]
    model = meta(lambda: build_clip(config))
    assert_maps(clip_keymap.SINGLE_FILE[prefix], recorded(fixture), model, part)
    # load_clip's preset detection: exactly this preset fits the recorded shapes
    renamed, _ = KeyMap(clip_keymap.SINGLE_FILE[prefix]).apply(recorded(fixture))
    assert [name for name, preset_shapes in clip_preset_shapes().items() if preset_shapes == shapes(renamed)] == \
        [name for name, preset in CLIP_PRESETS.items() if preset == config]
    expected = {k: s for k, s in shapes(recorded(fixture, prefix)).items()
                if not k[len(prefix):].startswith(not_exported)}
    assert shapes(original_state(model, part)) == expected


@pytest.mark.parametrize("fixture, config", [
    ("clip_l_text_keys.txt", CLIP_L),  # SD1.5 / SDXL text_encoder/
    ("hf_sd2_text_encoder_keys.txt", OPENCLIP_H_TEXT),
    ("hf_sdxl_text_encoder_2_keys.txt", OPENCLIP_BIGG_TEXT),
    ("hf_svd_image_encoder_keys.txt", OPENCLIP_H_VISION),
], ids=["text_encoder", "sd2_text_encoder", "sdxl_text_encoder_2", "svd_image_encoder"])
def test_clip_tables_map_the_transformers_folders(fixture, config):
    model = meta(lambda: build_clip(config))
    rows = clip_keymap.HF_TEXT + clip_keymap.HF_VISION  # what load_clip uses for HF names
    assert_maps(rows, recorded(fixture), model, fixture)
    # folders saved by transformers >= 5 drop the `text_model.` level; the same rows put it back
    if not config.vision:
        flat = {k.removeprefix("text_model."): v for k, v in recorded(fixture).items()}
        assert_maps(rows, flat, model, fixture + " (transformers 5 names)")


# --- ControlNeXt releases ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag, config", [("g2", G2), ("g1_sd15", G1_SD15), ("g1_svd", G1_SVD)])
def test_control_branch_tables_map_the_official_modules(tag, config):
    model = meta(lambda: ControlNeXt(config))
    branch = recorded(f"controlnext_{tag}_keys.txt")
    assert_maps(CONTROL_BRANCH_ROWS, branch, model, f"{tag} branch")  # official names are ours
    if tag == "g2":  # SVD-v2-Training after zero_to_fp32: branch and UNet in one file, `controlnext.` / `unet.`
        unet = recorded("diffusers_svd_unet_keys.txt")
        both = {"controlnext." + k: v for k, v in branch.items()} | {"unet." + k: v for k, v in unet.items()}
        assert_maps(CONTROL_BRANCH_ROWS, both, model, "DeepSpeed export, branch half")
        assert_maps(UNET_ROWS, both, meta(lambda: SVDUNet(SVD_XT)), "DeepSpeed export, UNet half")


# --- the check itself ----------------------------------------------------------------------------------------------


def test_a_wrong_table_or_a_wrong_model_fails():
    model = meta(lambda: UNet(SD15))
    original = recorded("sd15_unet_keys.txt")
    # the last row is output block 11's transformer: its 26 tensors are left unmapped, ours unfilled
    with pytest.raises(ValueError, match=r"\(26 unexpected, 26 missing, 0 wrong shape\)"):
        assert_maps(unet_original_rows(SD15)[:-1], original, model, "a table missing its last row")
    with pytest.raises(ValueError, match=r"0 unexpected, 0 missing, \d+ wrong shape"):
        assert_maps(unet_original_rows(SD21), recorded("sd21_unet_keys.txt"), model, "SD2.1 weights, SD1.5 model")
