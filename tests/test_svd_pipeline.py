"""The SVD pipeline (controlnext/svd_pipeline.py) and its controls (controlnext/svd_controls.py): parity with diffusers'
StableVideoDiffusionPipeline on a tiny folder diffusers wrote, the official ControlNeXt-SVD releases against a
transcription of the official forward, sliding windows through the wired sampler, sample.py's video mode end to end
(pose images and keypoints, PNG/GIF/MP4 read back), and one clear error per bad input.

Tolerances and why:
- pipeline vs diffusers: 1e-4 on frames in [0, 1] (the bar of the issue), measured 3e-6; the same weights, image, noise
  (one generator: the reference noise first, then the latents) and scheduler. Our UNet is built with
  eps_layout="diffusers" so that diffusers runs exactly as it ships (the clean way: nothing patched; our default SGM
  layout is another function, tests/test_svd_unet.py measures it). The final latents (up to ~2.3) agree to 1e-3,
  measured 2e-4: sampling starts at sigma = 700, where fp32 holds x to ~4e-5, and two orders of the same float
  arithmetic (diffusers' scheduler in fp32 tensors, ours in float64 scalars) drift that far over the steps.
- the controlled UNet vs the official transcription: 1e-5 at the injection site and at the output (fp32 rounding of
  the same operations in another order, measured <= 2e-6).
- windows: 1e-5; the same arithmetic on differently shaped batches (oneDNN may pick other kernels).
Images are 96 x 128 (latents 12 x 16): at 64 x 64 the tiny UNet's lowest level is 1 x 1, where a GroupNorm of two
values amplifies fp32 rounding a thousandfold and no two implementations agree to 1e-4.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from PIL import Image
from torch import nn

import sample
from controlnext.control_branch import G1_SVD, ControlNeXt
from controlnext.checkpoint import save_state
from controlnext.controls import apply_unet_weights
from controlnext.loaders import original_state
from controlnext.pose import ALIGN_JOINTS, Pose, save_pose_json
from controlnext.sampling import summed_controls
from controlnext.svd_controls import load_video_control
from controlnext.svd_pipeline import TINY_CONFIG, image_to_video, is_svd, load_svd
from controlnext.video_data import MovingFill50k
from controlnext.video_io import to_uint8, write_mp4
from tests.svd_fixtures import tiny_svd
from unet.svd_unet import svd_added_time_ids

H, W = 96, 128


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy-sized ops: threads cost more than they save on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_svd(tmp_path_factory.mktemp("svd") / "tiny_svd")


def picture(seed: int) -> np.ndarray:
    """A smooth random RGB image (H, W, 3) uint8."""
    low = torch.rand(1, 3, 6, 8, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(low, size=(H, W), mode="bilinear")[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]


# --- parity with diffusers' StableVideoDiffusionPipeline --------------------------------------------------------------


@torch.no_grad()
def test_matches_diffusers_pipeline_without_control(folder):
    image = picture(0)
    theirs = StableVideoDiffusionPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    latents = theirs(Image.fromarray(image), height=H, width=W, num_frames=4, num_inference_steps=2,
                     min_guidance_scale=1.0, max_guidance_scale=2.5, fps=7, motion_bucket_id=127,
                     noise_aug_strength=0.02, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    frames = theirs.video_processor.postprocess_video(theirs.decode_latents(latents, 4, 3), output_type="pt")
    pipe = load_svd(folder, eps_layout="diffusers")
    mine = image_to_video(pipe, to_tensor(image)[None], num_frames=4, steps=2, guidance=(1.0, 2.5), fps_id=6,
                          motion_bucket_id=127, noise_aug=0.02, generator=torch.Generator().manual_seed(0),
                          decode=False)
    assert (mine - latents).abs().max() <= 1e-3  # latents up to ~2.3, measured 2e-4 (module docstring)
    video = pipe.decode(mine, chunk=3)  # decode_chunk_size=3: chunks of 3 and 1 frames, each its own clip
    assert video.shape == (1, 4, 3, H, W)
    assert (((video + 1) / 2).clamp(0, 1) - frames).abs().max() <= 1e-4


def test_original_single_file_loads_the_same_pipeline(folder, tmp_path):
    pipe = load_svd(folder)
    state = original_state(pipe.unet, "unet") | original_state(pipe.vae, "vae") | \
        original_state(pipe.image_encoder, "svd_image")  # the svd*.safetensors layout (checkpoints.md §2.1, §4.3)
    save_state(state, tmp_path / "svd_tiny.safetensors")
    assert is_svd(tmp_path / "svd_tiny.safetensors") and is_svd(folder) and not is_svd(folder / "unet")
    single = load_svd(tmp_path / "svd_tiny.safetensors", dataclasses.replace(TINY_CONFIG, image=pipe.config.image))
    for ours, theirs in ((single.unet, pipe.unet), (single.vae, pipe.vae), (single.image_encoder, pipe.image_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same tensors, renamed back


# --- the official ControlNeXt-SVD releases ----------------------------------------------------------------------------


class OfficialV2Branch(nn.Module):
    """ControlNeXtSDVModel of ControlNeXt-SVD-v2/models/controlnext_vid_svd.py (the inference file: the 2nd and 3rd
    stem convs unpadded), on diffusers' blocks, at test widths; its state-dict keys are the release's."""

    def __init__(self, time=16, emb=32, stem=(8, 8, 16), res=(16, 32), groups=(4, 8), out=32):
        super().__init__()
        self.time_proj = Timesteps(time, True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time, emb)
        self.embedding = nn.Sequential(nn.Conv2d(3, stem[0], 3, stride=2, padding=1), nn.GroupNorm(2, stem[0]),
                                       nn.ReLU(), nn.Conv2d(stem[0], stem[1], 3), nn.GroupNorm(2, stem[1]), nn.ReLU(),
                                       nn.Conv2d(stem[1], stem[2], 3), nn.GroupNorm(2, stem[2]), nn.ReLU())
        widths = (stem[2],) + res
        self.down_res = nn.ModuleList(ResnetBlock2D(in_channels=i, out_channels=o, temb_channels=emb, groups=g)
                                      for i, o, g in zip(widths, res, groups))
        self.down_sample = nn.ModuleList(Downsample2D(o, use_conv=True, out_channels=o, padding=1, name="op")
                                         for o in res)
        w = res[-1]
        self.mid_convs = nn.ModuleList([nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, w),
                                                      nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w)),
                                        nn.Conv2d(w, out, 1)])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        B, num_frames = sample.shape[:2]
        emb = self.time_embedding(self.time_proj(timestep.expand(B)).to(sample.dtype))
        emb = emb.repeat_interleave(num_frames, dim=0)  # one per frame
        h = self.embedding(sample.flatten(0, 1))
        for res, down in zip(self.down_res, self.down_sample):
            h = down(res(h, emb))
        h = self.mid_convs[0](h) + h
        return self.mid_convs[1](h)


def official_unet(unet, sample, timestep, context, ids, control, scale, site: dict):
    """unet_spatio_temporal_condition_controlnext.py's forward on diffusers' modules (ControlNeXt-SVD-v2): after down
    block 0 and its skips, the control is normalised with its own mean/std (unbiased, eps 1e-5 on the std), recoloured
    with the hidden state's, pooled to its size, and added times scale * 0.2. `site` receives the controlled state."""
    B, num_frames = sample.shape[:2]
    emb = unet.time_embedding(unet.time_proj(timestep.expand(B)).to(sample.dtype))
    emb = emb + unet.add_embedding(unet.add_time_proj(ids.flatten()).reshape(B, -1).to(emb.dtype))
    emb, context = emb.repeat_interleave(num_frames, 0), context.repeat_interleave(num_frames, 0)
    indicator = torch.zeros(B, num_frames)
    h = unet.conv_in(sample.flatten(0, 1))
    skips = (h,)
    for idx, block in enumerate(unet.down_blocks):
        extra = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        h, res = block(hidden_states=h, temb=emb, image_only_indicator=indicator, **extra)
        skips += res
        if idx == 0:
            mean_h, std_h = h.mean(dim=(1, 2, 3), keepdim=True), h.std(dim=(1, 2, 3), keepdim=True)
            mean_c, std_c = control.mean(dim=(1, 2, 3), keepdim=True), control.std(dim=(1, 2, 3), keepdim=True)
            c = F.adaptive_avg_pool2d((control - mean_c) * (std_h / (std_c + 1e-5)) + mean_h, h.shape[-2:])
            h = h + c * scale * 0.2
            site["h"] = h
    h = unet.mid_block(hidden_states=h, temb=emb, encoder_hidden_states=context, image_only_indicator=indicator)
    for block in unet.up_blocks:
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        extra = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, image_only_indicator=indicator, **extra)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h))).unflatten(0, (B, num_frames))


@pytest.fixture(scope="module")
def release(folder, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny official-format SVD-v2 release: controlnet.bin (G2 under the official names) and unet.bin (a full UNet
    state dict in diffusers names), both torch.save'd as the official files are."""
    out = tmp_path_factory.mktemp("release")
    torch.manual_seed(3)
    branch = OfficialV2Branch()
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the default init: biases and norm gains matter here
    torch.save(branch.state_dict(), out / "controlnet.bin")
    unet = UNetSpatioTemporalConditionModel.from_pretrained(folder / "unet")
    torch.save({k: v + 0.01 * torch.randn_like(v) for k, v in unet.state_dict().items()}, out / "unet.bin")
    return out / "controlnet.bin", out / "unet.bin"


@torch.no_grad()
def test_official_v2_release_equals_the_official_forward(folder, release):
    branch_file, unet_file = release
    pipe = load_svd(folder, eps_layout="diffusers")
    control = load_video_control(branch_file, pipe, "auto", 0.2)
    assert not apply_unet_weights(pipe, unet_file)  # absolute weights, read off the file
    model = control.model
    assert model.branch.config.stem_padding == (1, 0, 0)  # the v2 inference file's stem (G2_SVD_INFER), detected
    assert (model.injection.site, model.injection.eps, model.injection.pool_first, model.injection.gain) == \
        ("down_0", 1e-5, False, 0.2)

    official_branch = OfficialV2Branch()
    official_branch.load_state_dict(torch.load(branch_file))  # strict, as the official runner loads it
    official = UNetSpatioTemporalConditionModel.from_pretrained(folder / "unet").eval()
    official.load_state_dict(torch.load(unet_file))
    g = torch.Generator().manual_seed(5)
    num_frames, size = 3, 128  # latents 16 x 16: the official forward passes no upsample sizes (even sizes only)
    x = torch.randn(2, num_frames, 8, size // 8, size // 8, generator=g)  # the two CFG halves: uncond, cond
    context = torch.randn(2, 1, 32, generator=g)
    pose = torch.rand(2, num_frames, 3, size, size, generator=g)
    ids = svd_added_time_ids(6, 128, 0.02, 2)
    t = torch.tensor(0.25 * np.log(3.7), dtype=torch.float32)  # c_noise of one sampling step
    scale = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)  # the official pipeline zeroes the uncond half's scale

    site = {}
    rows = torch.tensor([0.0] * num_frames + [1.0] * num_frames)[:, None, None, None]  # official: per (B*F) row
    expected = official_unet(official, x, t, context, ids, official_branch(pose, t), rows, site)
    features = model.features(model.prepare(pose), t.expand(2))
    hook = summed_controls([(model, features, scale)], num_frames)
    seen = {}

    def recording(name, h):
        h = hook(name, h)
        seen[name] = h
        return h

    out = pipe.unet(x, t.expand(2), context, ids, num_frames=num_frames, control=recording)
    assert (seen["down_0"] - site["h"]).abs().max() <= 1e-5
    assert (out - expected).abs().max() <= 1e-5
    assert (model(x, t.expand(2), context, pose, y=ids, scale=scale) - expected).abs().max() <= 1e-5


def test_release_kind_is_detected_or_named_and_never_contradicts_the_file(folder, release, tmp_path):
    branch_file, _ = release
    pipe = load_svd(folder, eps_layout="diffusers")
    assert load_video_control(branch_file, pipe, "svd_v2_train", 0.2).model.branch.config.stem_padding == (1, 1, 1)
    with pytest.raises(ValueError, match="--release=svd_v1 is a g1_svd branch, this file holds g2"):
        load_video_control(branch_file, pipe, "svd_v1", 0.2)
    with pytest.raises(ValueError, match="eps_layout='diffusers'"):
        load_video_control(branch_file, load_svd(folder), "auto", 0.2)  # the SGM layout is refused
    v1 = dataclasses.replace(G1_SVD, time_channels=16, emb_dim=32, stem_channels=(8, 8, 16), res_channels=(16, 32, 64),
                             out_channels=64)
    torch.save(ControlNeXt(v1).state_dict(), tmp_path / "v1.bin")
    model = load_video_control(tmp_path / "v1.bin", pipe, "auto", 0.2).model
    assert (model.injection.site, model.injection.gain, model.injection.scale) == ("mid_in", 1.3, "sigmoid")
    with pytest.raises(ValueError, match="--control_level is SVD-v2's gain"):
        load_video_control(tmp_path / "v1.bin", pipe, "auto", 1.0)


# --- sliding windows --------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_tiling_windows_equal_running_them_separately(folder, release):
    pipe = load_svd(folder, eps_layout="diffusers")
    control = load_video_control(release[0], pipe, "auto", 0.2)
    pose = torch.rand(1, 4, 3, H, W, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(2))
    reference = to_tensor(picture(1))[None]
    run = dict(steps=1, guidance=(2.0, 2.0), blend="linear", reference_pose_first=False)
    whole = image_to_video(pipe, reference, num_frames=4, window=2, overlap=0, decode_chunk=2, noise=noise,
                           generator=torch.Generator().manual_seed(0), controls=[(control.model, pose, 1.0)], **run)
    parts = [image_to_video(pipe, reference, num_frames=2, noise=noise[:, s:s + 2],
                            generator=torch.Generator().manual_seed(0),
                            controls=[(control.model, pose[:, s:s + 2], 1.0)], **run) for s in (0, 2)]
    assert (whole - torch.cat(parts, dim=1)).abs().max() <= 1e-5


class FrameLocalUNet(nn.Module):
    """A stand-in UNet that treats every frame on its own: windows must then not change the result at all, whatever
    the overlap, exactly when the merge weights sum to 1 at every frame."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gain = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, context, ids, *, num_frames, control=None, frame_chunk=None):
        noisy, reference = x.chunk(2, dim=2)  # (B, F, 4, h, w) each
        return torch.tanh(self.gain * noisy + reference) * (1 + 0.1 * t.view(-1, 1, 1, 1, 1)) + context.mean()


@pytest.mark.parametrize("blend", ["official", "linear"])
@torch.no_grad()
def test_overlapping_windows_merge_with_weights_that_sum_to_one(folder, blend):
    pipe = load_svd(folder)
    pipe.unet = FrameLocalUNet(pipe.config.unet)
    reference = to_tensor(picture(2))[None]
    run = dict(num_frames=7, steps=3, guidance=(2.0, 2.0), generator=None, decode=False)
    noise = torch.randn(1, 7, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(4))
    plain = image_to_video(pipe, reference, noise=noise, **(run | {"generator": torch.Generator().manual_seed(0)}))
    windowed = image_to_video(pipe, reference, noise=noise, window=4, overlap=2, blend=blend,
                              **(run | {"generator": torch.Generator().manual_seed(0)}))
    assert (windowed - plain).abs().max() <= 1e-5


# --- sample.py's video mode -------------------------------------------------------------------------------------------


def person(dx: float, dy: float, scale: float) -> Pose:
    """One person's OpenPose-18 body (every alignment joint detected) at an offset and scale, no hands or face."""
    base = np.array([[0.5, 0.2], [0.5, 0.3], [0.4, 0.3], [0.35, 0.45], [0.3, 0.55], [0.6, 0.3], [0.65, 0.45],
                     [0.7, 0.55], [0.45, 0.6], [0.45, 0.75], [0.45, 0.9], [0.55, 0.6], [0.55, 0.75], [0.55, 0.9],
                     [0.47, 0.18], [0.53, 0.18], [0.44, 0.2], [0.56, 0.2]])
    body = (base - 0.5) * scale + 0.5 + np.array([dx, dy])
    visible = np.zeros(18, bool)
    visible[list(ALIGN_JOINTS)] = True
    return Pose(body[None], np.ones((1, 18)), visible[None], np.zeros((0, 21, 2)), np.zeros((0, 21)),
                np.zeros((0, 68, 2)), np.zeros((0, 68)))


def video_config(folder: Path, tmp: Path, **fields) -> sample.SampleConfig:
    Image.fromarray(picture(3)).save(tmp / "reference.png")
    base = dict(pretrained=str(folder), reference=str(tmp / "reference.png"), height=64, width=64, steps=2, window=3,
                overlap=1, decode_chunk=2, pose_stride=1, video_out=str(tmp / "video"))
    return dataclasses.replace(sample.SampleConfig(), **(base | fields))


def test_sample_py_video_mode_from_a_pose_video_writes_frames_gif_and_mp4(folder, release, tmp_path):
    clip = MovingFill50k(64, 5, seed=2)[0]
    write_mp4(to_uint8(clip["control"]), tmp_path / "poses.mp4", fps=7)
    config = video_config(folder, tmp_path, pose=str(tmp_path / "poses.mp4"), control=(str(release[0]),),
                          unet_weights=(str(release[1]),))
    assert is_svd(config.pretrained)  # sample.main dispatches on it
    result = sample.main(config)
    frames = result["frames"]
    assert frames.shape == (5, 3, 64, 64) and torch.isfinite(frames).all()
    out = Path(config.video_out)
    pngs = sorted((out / "frames").iterdir())
    assert len(pngs) == 5 and Image.open(pngs[0]).size == (64, 64)
    written = np.asarray(Image.open(pngs[4]))
    expected = ((frames[4].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
    assert np.abs(written.astype(int) - expected).max() <= 1  # the PNG holds the frame (rounding)
    with Image.open(out / "video.gif") as gif:
        assert (gif.n_frames, gif.size) == (5, (64, 64))
    with Image.open(out / "pose_and_video.gif") as gif:
        assert gif.size == (2 * 64, 64)
    mp4 = iio.imread(out / "video.mp4", plugin="FFMPEG")  # read back by imageio, an independent reader
    assert mp4.shape == (5, 64, 64, 3)


def test_sample_py_video_mode_from_keypoints(folder, release, tmp_path):
    save_pose_json(tmp_path / "reference.json", [person(0.0, 0.0, 1.0)], 64, 64)
    save_pose_json(tmp_path / "video.json", [person(0.05 * k, 0.0, 0.8) for k in range(6)], 256, 192)
    config = video_config(folder, tmp_path, pose=str(tmp_path / "video.json"), pose_stride=2,
                          pose_reference=str(tmp_path / "reference.json"), control=(str(release[0]),), window=0,
                          dtype="bf16")
    frames = sample.main(config)["frames"]
    assert frames.shape == (4, 3, 64, 64)  # [reference pose] + every 2nd of 6 driving frames
    assert torch.isfinite(frames).all()  # --dtype=bf16: weights, branch and compute in bfloat16


@pytest.mark.parametrize("change, message", [
    ({"reference": "missing.png"}, "--reference='missing.png'"),
    ({"control": ("a.bin",), "pose": ""}, "--pose: the controls need pose frames"),
    ({"pose": "poses.json"}, "--pose_reference=''"),
    ({"window": 4, "overlap": 4}, "--overlap=4: must be below --window=4"),
    ({"overlap": 0}, "--overlap=0: the official window rule"),
    ({"window_blend": "mean"}, "--window_blend='mean'"),
    ({"release": "v3"}, "--release='v3'"),
    ({"lora": ("style.safetensors",)}, "--lora: not used by the video mode"),
    ({"guidance_ramp": (1.0,)}, "--guidance_ramp=(1.0,)"),
    ({"dtype": "fp8"}, "--dtype='fp8'"),
])
def test_bad_video_input_is_one_clear_error_before_loading(folder, tmp_path, change, message):
    (tmp_path / "poses.json").write_text("{}")
    config = video_config(folder, tmp_path, **change)
    if config.pose == "poses.json":
        config = dataclasses.replace(config, pose=str(tmp_path / "poses.json"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        sample.main(config)
    assert not (tmp_path / "video").exists()
