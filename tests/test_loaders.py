"""The checkpoint engine and the model loaders on tiny models: bad files give one plain error, legacy pickles are
read without running code, folders are written as one unit, tensors load in their stored dtype, every loader
takes a whole pipeline folder, and the original single-file exports read back (issues 12, 13, 15, 16, 17).
diffusers is a test-only oracle here (requirements-dev.txt). Equalities below are bitwise where the same bytes
are only moved (a load, a rename), and with a stated tolerance where two implementations compute.
"""

import json
import os
import stat
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from controlnext import loaders
from controlnext.checkpoint import load_into, read_file, read_metadata, read_state, read_torch, save_state, write_folder
from controlnext.meta import on_meta
from controlnext.loaders import (load_clip, load_svd_unet, load_temporal_vae, load_unet, load_vae, original_state,
                                 save_clip, save_unet, save_vae)
from controlnext.runs import load_checkpoint
from encoders.clip import TINY as TINY_CLIP, TINY_VISION, build_clip
from unet.keymap import unet_config_from_diffusers, unet_config_to_diffusers
from unet.sd_unet import TINY, UNet, sdxl_vector
from unet.svd_unet import TINY as TINY_SVD, SVDUNet
from vae.autoencoder import TINY as TINY_VAE, AutoencoderKL
from vae.temporal_decoder import TINY as TINY_VIDEO_VAE, TemporalAutoencoder

TINY_XL = replace(TINY, channels=(32, 64, 64), attention=(False, True, True), transformer_depth=(1, 2, 1),
                  heads=(2, 4, 4), linear_proj=True, adm_channels=32 + 6 * 256)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def plain_error(message: str, path) -> None:
    """The one-line error issue 15 asks for: names the file, never advises unsafe loading, no terminal escapes."""
    assert message.startswith(f"cannot read checkpoint {path}: "), message
    assert "weights_only" not in message and "\x1b" not in message and "\n" not in message, message


# --- reading: bad files, legacy pickles, metadata ------------------------------------------------------------------


def test_bad_torch_files_are_one_plain_error(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"step": 3, "x": torch.ones(100)}, good)
    data = good.read_bytes()
    cases = {"zero.pt": b"", "truncated.pt": data[: len(data) // 2], "random.pt": os.urandom(2000),
             "text.ckpt": b"not a checkpoint at all\n"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError) as err:
            read_torch(tmp_path / name)
        plain_error(str(err.value), tmp_path / name)
    assert torch.equal(read_torch(good)["x"], torch.ones(100))
    # train.py --resume reads its .pt through the same reader
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_000004.pt").write_bytes(data[:100])
    with pytest.raises(ValueError, match="^cannot read checkpoint .*step_000004.pt: truncated or corrupt"):
        load_checkpoint(tmp_path / "checkpoints" / "step_000004.pt")


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy_format"])
def test_legacy_ckpt_with_lightning_objects_reads_its_tensors(tmp_path, monkeypatch, zipped):
    # A stand-in for the class older SD1.x .ckpt files pickle under "callbacks" (pytorch_lightning is not installed).
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ran = []
    ModelCheckpoint = type("ModelCheckpoint", (), {"__setstate__": lambda self, state: ran.append(state),
                                                   "__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    instance = ModelCheckpoint()
    instance.best_model_path = "logs/last.ckpt"
    weights = {"model.diffusion_model.conv_in.weight": torch.randn(4, 4), "betas": torch.rand(10)}
    ckpt = {"state_dict": weights, "global_step": 875000, "epoch": 6, "callbacks": {ModelCheckpoint: {
        "best_model_score": np.float64(0.25), "dirpath": "logs"}}, "trainer": instance}
    path = tmp_path / "v1-legacy.ckpt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zipped)
    monkeypatch.delitem(sys.modules, "pytorch_lightning.callbacks.model_checkpoint")  # as on a user's machine
    state = read_file(path)
    assert state.keys() == weights.keys() and all(torch.equal(state[k], v) for k, v in weights.items())
    assert read_torch(path)["global_step"] == 875000 and not ran  # the stub ran no code of the pickled class


def test_a_pickle_that_runs_code_is_refused_by_name(tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Payload()}, path)
    with pytest.raises(ValueError) as err:
        read_file(path)
    plain_error(str(err.value), path)
    assert "'posix.system'" in str(err.value) or "'nt.system'" in str(err.value)
    assert not marker.exists()


def test_bad_safetensors_files_and_metadata(tmp_path):
    path = tmp_path / "step_000010.safetensors"
    save_state({"w": torch.arange(6.0).reshape(2, 3)}, path, metadata={"config": json.dumps({"lr": 1e-4})})
    assert json.loads(read_metadata(path)["config"]) == {"lr": 1e-4}  # sample.py's reader of the run config
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    cases = {"short.safetensors": data[:5], "big_header.safetensors": (10**9).to_bytes(8, "little") + data[8:],
             "not_json.safetensors": data[:8] + b"{" * header + data[8 + header:],
             "truncated.safetensors": data[:-4]}  # the tensor's bytes run past the end of the file
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        for reader in (read_file, read_metadata):
            with pytest.raises(ValueError) as err:
                reader(tmp_path / name)
            plain_error(str(err.value), tmp_path / name)
            assert "not a readable safetensors file" in str(err.value)
    torch.save({"w": torch.ones(1)}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="state.pt: not a .safetensors file"):
        read_metadata(tmp_path / "state.pt")


# --- loading: stored dtype, mapped tensors, casts ------------------------------------------------------------------


def test_loads_in_the_stored_dtype_and_casts_only_when_asked(tmp_path):
    model = UNet(TINY).half()
    save_unet(model, tmp_path / "unet")
    loaded = load_unet(tmp_path / "unet")
    assert {p.dtype for p in loaded.state_dict().values()} == {torch.float16} and same(loaded, model)
    cast, stored = load_unet(tmp_path / "unet", dtype=torch.float32).state_dict(), model.state_dict()
    assert all(v.dtype == torch.float32 and torch.equal(v, stored[k].float()) for k, v in cast.items())
    # a file mixing float dtypes loads as float32 unless a dtype is given
    mixed = {k: v.float() if "norm" in k else v for k, v in model.state_dict().items()}
    assert {p.dtype for p in load_unet(mixed, TINY).parameters()} == {torch.float32}
    assert {p.dtype for p in load_unet(mixed, TINY, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    # the loaded tensors map the file; saving over that very folder still works and reads back the same
    save_unet(loaded, tmp_path / "unet")
    assert same(load_unet(tmp_path / "unet"), model)



def test_a_meta_load_casts_the_float_tensors_only():
    # None of our models has an integer tensor today, so the UNet test above cannot see a cast applied to every
    # tensor: a module with an int64 buffer must keep it an integer (a float step count or index table is a bug)
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
        model.register_buffer("steps", torch.zeros((), dtype=torch.int64))
    state = {"weight": torch.ones(2, 2, dtype=torch.float16), "bias": torch.zeros(2, dtype=torch.float16),
             "steps": torch.tensor(7)}
    load_into(model, state, dtype=torch.float32)
    assert model.weight.dtype == torch.float32 and model.steps.dtype == torch.int64 and model.steps.item() == 7

def test_on_meta_skips_only_the_meta_inits_and_the_assign_keeps_each_tensors_role():
    # on_meta (every loader's build): parameters on meta with their init skipped; a real tensor made inside the
    # build is still initialised, and nn.init works again afterwards
    def build():
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GroupNorm(2, 4))
        model.real = torch.nn.init.ones_(torch.empty(2, device="cpu"))
        model[0].weight.requires_grad_(False)  # a frozen tensor: the assign must keep the flag
        model.register_buffer("scale", torch.zeros(()))
        return model
    model = on_meta(build)
    assert all(t.is_meta for t in model.state_dict().values())
    assert model.real.tolist() == [1.0, 1.0]  # ones_ ran: exact ones, no arithmetic
    assert torch.nn.init.constant_(torch.empty(2), 3.0).tolist() == [3.0, 3.0]
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    load_into(model, dict(state))
    for key, value in model.state_dict().items():
        assert value is not None and value.data_ptr() == state[key].data_ptr()  # the very tensors, no copy
    assert isinstance(model[0].weight, torch.nn.Parameter) and not model[0].weight.requires_grad
    assert model[1].weight.requires_grad
    assert "scale" in model._buffers and not isinstance(model.scale, torch.nn.Parameter)


# --- writing: folders as one unit ----------------------------------------------------------------------------------


def test_folder_save_is_one_unit(tmp_path, monkeypatch):
    old, new = UNet(TINY), UNet(TINY)
    save_unet(old, tmp_path / "unet")

    def failing_json(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(loaders, "save_json", failing_json)  # fails after the new weights are written
    with pytest.raises(OSError, match="disk full"):
        save_unet(new, tmp_path / "unet")
    monkeypatch.undo()
    assert same(load_unet(tmp_path / "unet"), old)  # the old folder, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]  # no staging folder left behind
    save_unet(new, tmp_path / "unet")
    assert same(load_unet(tmp_path / "unet"), new)
    umask = os.umask(0o022)
    os.umask(umask)  # read it back unchanged
    mode = 0o666 & ~umask  # as any file the user writes, not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode) == mode
    # a folder that holds anything but model files is not ours to replace
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match="project: exists and is not a model folder .*notes.md"):
        save_unet(new, tmp_path / "project")
    with pytest.raises(ValueError, match="is not a model folder .*notes.md is a file"):
        write_folder(tmp_path / "project" / "notes.md", {})
    assert (tmp_path / "project" / "notes.md").read_text() == "mine"


# --- pipeline folders ----------------------------------------------------------------------------------------------


def test_every_loader_takes_a_pipeline_folder(tmp_path):
    sd, svd = tmp_path / "sd", tmp_path / "svd"
    unet, vae = UNet(TINY), AutoencoderKL(TINY_VAE)
    text, text_2 = build_clip(replace(TINY_CLIP, projection_dim=None)), build_clip(TINY_CLIP)
    save_unet(unet, sd / "unet")
    save_vae(vae, sd / "vae")
    save_clip(text, sd / "text_encoder")
    save_clip(text_2, sd / "text_encoder_2")
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert same(load_unet(sd), unet) and same(load_vae(sd), vae)
    with pytest.raises(ValueError, match="a pipeline folder with 2 matching CLIP towers"):
        load_clip(sd)
    assert same(load_clip(sd, text.config), text) and same(load_clip(sd, text_2.config), text_2)
    svd_unet, svd_vae, image = SVDUNet(TINY_SVD), TemporalAutoencoder(TINY_VIDEO_VAE), build_clip(TINY_VISION)
    save_unet(svd_unet, svd / "unet")
    save_vae(svd_vae, svd / "vae")
    save_clip(image, svd / "image_encoder")
    (svd / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    assert same(load_svd_unet(svd), svd_unet) and same(load_temporal_vae(svd), svd_vae) and same(load_clip(svd), image)
    with pytest.raises(ValueError, match="an image UNet .* load it with load_unet"):
        load_svd_unet(sd)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="a pipeline folder without unet/"):
        load_unet(tmp_path / "empty")


# --- SDXL ids of another width (issue 15.11) ---------------------------------------------------------------------


def test_sdxl_id_width_comes_from_the_config(tmp_path):
    cfg = replace(TINY_XL, adm_channels=32 + 6 * 64, added_id_dim=64)
    fields = {k: v for k, v in unet_config_to_diffusers(cfg).items() if k != "_class_name"}
    assert fields["addition_time_embed_dim"] == 64 and unet_config_from_diffusers(fields) == cfg
    reference = UNet2DConditionModel(**fields).eval()
    reference.save_pretrained(tmp_path / "unet")
    ours = load_unet(tmp_path / "unet").eval()
    assert ours.config.added_id_dim == 64
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.randn(2, 7, cfg.context_dim)
    pooled, ids = torch.randn(2, 32), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 768, 512]])
    with torch.no_grad():
        expected = reference(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = ours(x, t, context, sdxl_vector(pooled, ids[:, :2], ids[:, 2:4], ids[:, 4:], id_dim=64))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)  # fp32, same maths in another order
    with pytest.raises(ValueError, match="addition_embed_type='image' is not supported"):
        unet_config_from_diffusers({**fields, "addition_embed_type": "image"})


# --- original single-file exports, merged ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "svd"])
def test_merged_original_files_read_back_per_component(tmp_path, family):
    text = build_clip(replace(TINY_CLIP, projection_dim=None))
    openclip = build_clip(replace(TINY_CLIP, quick_gelu=False, eos_token_id=999))
    parts = {"sd15": [(UNet(TINY), "unet"), (AutoencoderKL(TINY_VAE), "vae"), (text, "sd15_text")],
             "sd2": [(UNet(TINY), "unet"), (AutoencoderKL(TINY_VAE), "vae"),
                     (build_clip(replace(openclip.config, projection_dim=None)), "sd2_text")],
             "sdxl": [(UNet(TINY_XL), "unet"), (AutoencoderKL(TINY_VAE), "vae"), (text, "sdxl_text_l"),
                      (openclip, "sdxl_text_g")],
             "svd": [(SVDUNet(TINY_SVD), "unet"), (TemporalAutoencoder(TINY_VIDEO_VAE), "vae"),
                     (build_clip(TINY_VISION), "svd_image")]}[family]
    merged = {}
    for model, part in parts:
        state = original_state(model, part)
        assert not merged.keys() & state.keys()
        merged |= state
    save_state(merged, tmp_path / f"{family}.safetensors")
    path = tmp_path / f"{family}.safetensors"
    for model, part in parts:
        if part == "unet":
            back = (load_svd_unet if family == "svd" else load_unet)(path, model.config)
        elif part == "vae":
            back = (load_temporal_vae if family == "svd" else load_vae)(path, model.config)
        else:
            back = load_clip(path, model.config)
        assert same(back, model), part
    with pytest.raises(ValueError, match="cannot be exported as 'sd15_text'"):
        original_state(build_clip(TINY_VISION), "sd15_text")
    assert read_state(path).keys() == merged.keys()
