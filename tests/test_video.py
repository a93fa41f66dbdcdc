"""Video pieces for ControlNeXt-SVD: frame I/O (PNG, GIF, MP4), the official clip sampling and hand weights, the
procedural video toy, and the sliding windows (official rule and smooth blend)."""

import json
import math
import shutil
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from controlnext import video_io
from controlnext.data import render
from controlnext.video_data import (Clip, MovingFill50k, VideoClips, clip_indices, crop_box, disc_centres, hand_mask,
                                    moving_fill50k_params, read_clip_folders, read_meta_info, video_iou)
from controlnext.video_io import (count_frames, frame_files, natural_key, read_frames, read_frames_at, to_uint8,
                                  video_fps, write_frames, write_gif, write_mp4, write_png_folder)
from controlnext.windows import (apply_windows, blend_weights, merge_windows, official_weights, window_control,
                                 window_starts)


def bars(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frames that differ from each other: a coloured vertical bar moving right on a grey ramp (smooth for codecs)."""
    frames = np.tile(np.linspace(40, 200, width, dtype=np.uint8)[None, None, :, None], (count, height, 1, 3))
    for i in range(count):
        frames[i, :, 8 * i % width:8 * i % width + 8] = (230, 30 + 20 * i, 60)
    return frames


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- frame I/O --------------------------------------------------------------------------------------------------------

def test_png_folder_round_trip_natural_order_stride_and_replace(tmp_path):
    frames = bars(12)
    write_png_folder(frames, tmp_path / "clip")
    np.testing.assert_array_equal(read_frames(tmp_path / "clip"), frames)  # PNG is lossless: exact
    np.testing.assert_array_equal(read_frames(tmp_path / "clip", stride=5, max_frames=2), frames[[0, 5]])
    np.testing.assert_array_equal(read_frames_at(tmp_path / "clip", [7, 1, 7]), frames[[7, 1, 7]])
    assert count_frames(tmp_path / "clip") == 12 and video_fps(tmp_path / "clip") is None
    write_png_folder(frames[:3], tmp_path / "clip")  # replaces the folder whole: no stale frames 3..11
    assert count_frames(tmp_path / "clip") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]  # no temporary folders left
    # natural order: frame2 before frame10 (a plain sort would not)
    for i in (10, 2, 1):
        Image.fromarray(frames[i]).save(tmp_path / f"frame{i}.png")
    assert [p.name for p in frame_files(tmp_path)] == ["frame1.png", "frame2.png", "frame10.png"]
    assert sorted(["b10", "b9", "a1"], key=natural_key) == ["a1", "b9", "b10"]


def test_mp4_written_and_read_back(tmp_path):
    frames = bars(9)
    write_mp4(frames, tmp_path / "out.mp4", fps=7)
    back = read_frames(tmp_path / "out.mp4")
    assert back.shape == frames.shape and count_frames(tmp_path / "out.mp4") == 9
    assert video_fps(tmp_path / "out.mp4") == pytest.approx(7)
    # H.264 at crf 10 in yuv420p is lossy: bounded mean error on these smooth frames (chroma is subsampled at edges)
    assert np.abs(back.astype(int) - frames).mean() < 3
    oracle = iio.imread(tmp_path / "out.mp4", plugin="FFMPEG")  # imageio's own reader sees the same file
    assert oracle.shape == frames.shape
    np.testing.assert_array_equal(read_frames_at(tmp_path / "out.mp4", [8, 2]), back[[8, 2]])
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # the temporary file was renamed into place
    with pytest.raises(ValueError, match="even width and height, got 63x48"):
        write_mp4(frames[:, :, :63], tmp_path / "odd.mp4", fps=7)


def test_gif_written_and_read_back(tmp_path):
    frames = bars(6)
    write_frames(frames, tmp_path / "out.gif", fps=8)
    back = read_frames(tmp_path / "out.gif")
    assert back.shape == frames.shape and count_frames(tmp_path / "out.gif") == 6
    assert np.abs(back.astype(int) - frames).max() <= 8  # the 256-colour palette quantises the grey ramp a little
    assert video_fps(tmp_path / "out.gif") == pytest.approx(1000 / 120)  # 125 ms kept as 12 hundredths
    oracle = iio.imread(tmp_path / "out.gif", index=None)
    assert oracle.shape[:3] == frames.shape[:3]


def test_mp4_without_imageio_ffmpeg_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # makes `import imageio_ffmpeg` fail
    with pytest.raises(ModuleNotFoundError, match="pip install imageio-ffmpeg"):
        write_mp4(bars(2), tmp_path / "out.mp4", fps=8)
    assert not any(tmp_path.iterdir())  # nothing written
    write_gif(bars(2), tmp_path / "out.gif", fps=8)  # GIFs need nothing beyond PIL


def test_failed_writes_leave_nothing(tmp_path, monkeypatch):
    frames = bars(4)
    write_png_folder(frames[:2], tmp_path / "clip")
    calls = []

    def failing_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, fp, *args, **kwargs)
    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_png_folder(frames, tmp_path / "clip")
    monkeypatch.setattr(Image.Image, "save", original)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]  # no temporary folder left behind
    np.testing.assert_array_equal(read_frames(tmp_path / "clip"), frames[:2])  # the old folder is intact
    for bad, message in ((frames.astype(np.float32), "uint8 array"), (frames[0], r"\(F, H, W, 3\)")):
        with pytest.raises(ValueError, match=message):
            write_gif(bad, tmp_path / "bad.gif", fps=8)
    with pytest.raises(ValueError, match="cannot write '.avi'"):
        write_frames(frames, tmp_path / "x.avi", fps=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]


def test_to_uint8_and_read_errors(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(2, 3, 1, 4)
    np.testing.assert_array_equal(to_uint8(x, (-1, 1))[0, 0, :, 0], [0, 128, 255, 255])  # rounded and clamped
    with pytest.raises(ValueError, match="frames not found"):
        read_frames(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a frame folder or a video file"):
        read_frames(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="no frames"):
        read_frames(tmp_path)
    write_png_folder(bars(3), tmp_path / "clip")
    with pytest.raises(ValueError, match="frame 5 requested, the folder has 3 frames"):
        read_frames_at(tmp_path / "clip", [0, 5])


# --- clip sampling (vid_dataset.py UBCFashion) ------------------------------------------------------------------------

def test_clip_indices_follow_the_official_rules():
    starts, refs = set(), set()
    for seed in range(300):
        ids, ref = clip_indices(100, 14, 3, generator(seed))
        assert len(ids) == 14 and np.all(np.diff(ids) == 3)  # min(3, 100 // 14 = 7) = 3
        assert 0 <= ids[0] <= 100 - 42 and 0 <= ref <= 99
        starts.add(ids[0])
        refs.add(ref)
    assert min(starts) == 0 and max(starts) == 58  # the start is uniform over every valid offset, both ends included
    assert min(refs) < 5 and max(refs) > 94  # the reference is uniform over the whole video
    ids, _ = clip_indices(30, 14, 3, generator(0))
    assert np.all(np.diff(ids) == 2)  # the stride is capped at len // n = 2
    strides = {int(np.diff(clip_indices(200, 14, 0, generator(s))[0])[0]) for s in range(200)}
    assert strides == set(range(2, 8))  # interval <= 0: a random stride in 2..7
    assert clip_indices(100, 14, 3, generator(7)) == clip_indices(100, 14, 3, generator(7))
    with pytest.raises(ValueError, match="shorter than num_frames=14"):
        clip_indices(13, 14, 3, generator(0))


def test_crop_box_keeps_the_target_aspect():
    top, left, h, w = crop_box(200, 100, 64, 64, generator(0))  # too tall: full width, random top
    assert (left, h, w) == (0, 100, 100) and 0 <= top <= 100
    top, left, h, w = crop_box(100, 300, 96, 64, generator(1))  # too wide: full height, random left
    assert (top, h, w) == (0, 100, 66) and 0 <= left <= 234  # int(100 * 64 / 96) = 66, as the official code


def write_clip(folder, count, height=32, width=40, meta=None):
    """A plain-layout clip whose frame i is the colour (i, 2i, 3i) and pose frame i the colour (5i, 0, 255 - i)."""
    rgb = np.zeros((count, height, width, 3), np.uint8)
    pose = np.zeros_like(rgb)
    for i in range(count):
        rgb[i] = (i, 2 * i, 3 * i)
        pose[i] = (5 * i, 0, 255 - i)
    write_png_folder(rgb, folder / "frames")
    write_png_folder(pose, folder / "pose")
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return rgb, pose


def test_sampled_clip_replaces_frame_0_by_the_reference(tmp_path):
    write_clip(tmp_path / "a", 40)
    clips = VideoClips(read_clip_folders(tmp_path), width=40, height=32, num_frames=6, interval=4)
    sample = clips.sample(0, generator(3))
    ids, ref = sample["frame_ids"].tolist(), sample["reference_id"]
    assert ids == list(range(ids[0], ids[0] + 24, 4))  # min(4, 40 // 6) = 4
    # the video's aspect equals the target's and the size too: the crop is the frame, the resize an identity
    expected_rgb = torch.tensor([[ref, 2 * ref, 3 * ref]] + [[i, 2 * i, 3 * i] for i in ids[1:]]).float()
    expected_pose = torch.tensor([[5 * ref, 0, 255 - ref]] + [[5 * i, 0, 255 - i] for i in ids[1:]]).float()
    torch.testing.assert_close(sample["frames"][:, :, 5, 7], expected_rgb / 127.5 - 1, atol=1e-6, rtol=0)
    torch.testing.assert_close(sample["control"][:, :, 5, 7], expected_pose / 255, atol=1e-6, rtol=0)
    torch.testing.assert_close(sample["reference"], sample["frames"][0], atol=0, rtol=0)
    assert sample["frames"].shape == (6, 3, 32, 40) and sample["loss_weight"].shape == (6, 1, 32, 40)
    assert sample["frames"].min() >= -1 and sample["frames"].max() <= 1
    assert sample["control"].min() >= 0 and sample["control"].max() <= 1
    torch.testing.assert_close(sample["loss_weight"], torch.ones(6, 1, 32, 40), atol=0, rtol=0)  # no meta: w = 1
    again = clips.sample(0, generator(3))  # the same generator state gives the same clip, bit for bit
    assert again["frame_ids"].tolist() == ids and torch.equal(again["frames"], sample["frames"])
    # official layout: pose files stored BGR are swapped back
    swapped = VideoClips([Clip(tmp_path / "a" / "frames", tmp_path / "a" / "pose", None, True, "a")],
                         width=40, height=32, num_frames=6, interval=4).sample(0, generator(3))
    torch.testing.assert_close(swapped["control"], sample["control"].flip(1), atol=0, rtol=0)


def test_crop_and_resize_shapes_and_ranges(tmp_path):
    write_clip(tmp_path / "a", 20, height=48, width=40)
    sample = VideoClips(read_clip_folders(tmp_path), width=16, height=24, num_frames=4, interval=0).sample(
        0, generator(0))
    assert sample["frames"].shape == (4, 3, 24, 16) and sample["control"].shape == (4, 3, 24, 16)
    ids = sample["frame_ids"].tolist()
    value = torch.tensor([sample["reference_id"]] + ids[1:]).float() / 127.5 - 1  # uniform frames stay uniform
    torch.testing.assert_close(sample["frames"][:, 0].amax((1, 2)), value, atol=1e-5, rtol=0)
    torch.testing.assert_close(sample["frames"][:, 0].amin((1, 2)), value, atol=1e-5, rtol=0)


def test_hand_weights_against_a_hand_computed_map(tmp_path):
    height, width = 64, 80
    confident, faint = [0.9] * 21, [0.3] * 21
    meta = [{"boxes": [], "hands_boxes": [], "hands_score": []} for _ in range(12)]
    meta[4] = {"hands_boxes": [[[0.25, 0.25], [0.5, 0.5]], [[0.4, 0.4], [0.6, 0.6]]], "hands_score": [confident, faint]}
    meta[8] = {"hands_boxes": [[[0.0, 0.9], [0.05, 1.0]]], "hands_score": [confident]}
    meta[0] = meta[4]
    write_clip(tmp_path / "a", 12, height, width, meta)
    clips = VideoClips(read_clip_folders(tmp_path), width=width, height=height, num_frames=3, interval=4)
    sample = clips.sample(0, generator(0))
    assert sample["frame_ids"].tolist() == [0, 4, 8]  # 12 frames, 3 at stride 4: one possible start
    expected = torch.ones(3, 1, height, width)
    # frame 4: box 0 is confident (mean 0.9 > 0.5): columns int(0.25 * 80) - 10 = 10 .. int(0.5 * 80) + 10 = 50,
    # rows 16 - 10 = 6 .. 32 + 10 = 42, weight 1 + 4 * 0.8; box 1 (mean 0.3) then paints 0 over its own grown box,
    # rows int(25.6) - 10 = 15 .. int(38.4) + 10 = 48, columns 32 - 10 = 22 .. 48 + 10 = 58 (end excluded)
    expected[1, :, 6:42, 10:50] = 4.2
    expected[1, :, 15:48, 22:58] = 1.0
    expected[2, :, 47:64, 0:14] = 4.2  # frame 8: clipped at the frame's edges
    # frame 0 is the reference: weight 1 even where its own boxes are
    torch.testing.assert_close(sample["loss_weight"], expected, atol=1e-6, rtol=0)
    mask = hand_mask([[(np.array([[0.5, 0.5], [0.5, 0.5]]), 0.6)]], 20, 20)  # an empty box still grows by 10 px
    assert mask[0, 0, 0:20, 0:20].eq(0.8).all()


def test_official_meta_info_layout_and_errors(tmp_path):
    write_clip(tmp_path / "v", 10, meta=[{"hands_boxes": [], "hands_score": []}] * 10)
    (tmp_path / "meta_info.json").write_text(json.dumps(
        [{"video_path": "v/frames", "guide_path": "v/pose", "meta_info": "v/meta.json"}]))  # relative to the file
    clips = read_meta_info(tmp_path / "meta_info.json")
    assert clips[0].pose_bgr and clips[0].meta == tmp_path / "v" / "meta.json"
    sample = VideoClips.from_path(tmp_path / "meta_info.json", width=40, height=32, num_frames=4, interval=2).sample(
        0, generator(1))
    assert sample["frames"].shape == (4, 3, 32, 40)

    def fails(content, message, name="bad.json"):
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError, match=message):
            clips = read_meta_info(tmp_path / name)
            VideoClips(clips, width=40, height=32, num_frames=4, interval=2).sample(0, generator(0))

    fails([{"video_path": "v/frames"}], r"bad.json: entry 0: needs video_path and guide_path")
    fails([{"video_path": "v/frames", "guide_path": "v/nope"}], r"entry 0: guide_path not found: .*v/nope")
    fails('[{"video_path": "v/frames",\n "guide_path": }]', r"bad.json:2: not valid JSON")
    (tmp_path / "short.json").write_text(json.dumps([{}] * 5))
    fails([{"video_path": "v/frames", "guide_path": "v/pose", "meta_info": "short.json"}],
          r"short.json: expected a list with one entry per video frame \(10\), got 5")
    (tmp_path / "hands.json").write_text(json.dumps([{}] * 3 + [{"hands_boxes": [[0.1, 0.2]], "hands_score": [[1]]}]
                                                    + [{}] * 6))
    fails([{"video_path": "v/frames", "guide_path": "v/pose", "meta_info": "hands.json"}],
          r"hands.json: frame 3: hands_boxes\[0\] must be \[\[x0, y0\], \[x1, y1\]\]")
    write_png_folder(np.zeros((6, 32, 40, 3), np.uint8), tmp_path / "short_pose")
    fails([{"video_path": "v/frames", "guide_path": "short_pose"}], r"entry 0: the pose has 6 frames, the video 10")


def test_plain_layout_errors(tmp_path):
    write_clip(tmp_path / "a", 3)
    (tmp_path / "b").mkdir()
    write_png_folder(np.zeros((3, 8, 8, 3), np.uint8), tmp_path / "b" / "frames")
    with pytest.raises(ValueError, match=r"/b: expected one pose/ folder or pose\.<mp4"):
        read_clip_folders(tmp_path)
    with pytest.raises(ValueError, match="clip folder not found"):
        read_clip_folders(tmp_path / "missing")
    shutil.rmtree(tmp_path / "b")
    clips = read_clip_folders(tmp_path)
    assert [c.where for c in clips] == [str(tmp_path / "a")] and not clips[0].pose_bgr
    with pytest.raises(ValueError, match=r"/a: 3 frames, fewer than num_frames=4"):
        VideoClips(clips, width=40, height=32, num_frames=4, interval=1).sample(0, generator(0))
    with pytest.raises(ValueError, match="width and height must be positive multiples of 8.*got 36x32"):
        VideoClips(clips, width=36, height=32, num_frames=2, interval=1)


# --- the procedural video toy -----------------------------------------------------------------------------------------

def test_toy_is_deterministic_and_has_the_clip_structure():
    toy = MovingFill50k(size=64, num_frames=6, seed=3)
    a, b = toy[5], MovingFill50k(size=64, num_frames=6, seed=3).sample(5, generator(99))
    for key in ("frames", "control", "reference", "discs", "loss_weight"):
        assert torch.equal(a[key], b[key])  # a pure function of (index, seed): same code, same bits
    assert not torch.equal(a["frames"], toy[6]["frames"])
    assert not torch.equal(a["frames"], MovingFill50k(size=64, num_frames=6, seed=4)[5]["frames"])
    assert a["frames"].shape == (6, 3, 64, 64) and a["control"].shape == (6, 3, 64, 64)
    assert torch.equal(a["reference"], a["frames"][0])
    assert a["frames"].min() >= -1 and a["frames"].max() <= 1 and set(a["control"].unique().tolist()) <= {0.0, 1.0}


def test_toy_geometry_along_lines_and_arcs():
    seen = set()
    for index in range(12):
        p = moving_fill50k_params(index)
        ex = MovingFill50k(size=64, num_frames=5)[index]
        centres = ex["centres"]
        np.testing.assert_allclose(centres[1:], disc_centres(p, np.linspace(0, 1, 5)[1:]))
        np.testing.assert_allclose(centres[0], disc_centres(p, np.array([p["reference_time"]]))[0])
        for f, (cx, cy) in enumerate(centres):  # each frame is the fill50k rendering of its disc and ring
            ring, disc = render(cx, cy, p["r"], 64)
            assert torch.equal(ex["discs"][f], torch.from_numpy(disc))
            assert torch.equal(ex["control"][f, 0] > 0.5, torch.from_numpy(ring))
        path = disc_centres(p, np.linspace(0, 1, 9))
        steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
        np.testing.assert_allclose(steps, steps[0], rtol=1e-9)  # constant speed on both kinds of path
        start = np.array([p["cx"], p["cy"]])
        if p["linear"]:
            np.testing.assert_allclose(path[-1], p["end"])
        else:
            np.testing.assert_allclose(np.linalg.norm(path - start, axis=1), p["orbit"])
            assert abs(p["sweep"]) >= math.pi / 2
        seen.add(p["linear"])
        assert 32 <= p["r"] <= 128  # half of fill50k's radius range
    assert seen == {True, False}


def test_video_iou_per_frame():
    ex = MovingFill50k(size=64, num_frames=4)[0]
    iou = video_iou(ex["frames"], ex["discs"], ex["circle_rgb"], ex["background_rgb"])
    torch.testing.assert_close(iou, torch.ones(4), atol=0, rtol=0)  # the targets themselves score 1
    shifted = torch.roll(ex["discs"], 1, dims=0)  # each frame scored against the previous frame's disc
    inter = (ex["discs"] & shifted).flatten(1).sum(1).float()
    union = (ex["discs"] | shifted).flatten(1).sum(1).float()
    torch.testing.assert_close(video_iou(ex["frames"], shifted, ex["circle_rgb"], ex["background_rgb"]),
                               inter / union, atol=1e-6, rtol=0)


# --- sliding windows --------------------------------------------------------------------------------------------------

def official_merge(outputs, starts, num_frames):
    """Transcription of the official accumulation (pipeline_stable_video_diffusion_controlnext.py, v2)."""
    pred = torch.zeros((outputs[0].shape[0], num_frames) + outputs[0].shape[2:])
    counter = torch.zeros(outputs[0].shape[0], num_frames, 1, 1, 1)
    window = outputs[0].shape[1]
    for out, start in zip(outputs, starts):
        if start == 0:
            pred[:, start:start + window] += out
            counter[:, start:start + window] += 1
        else:
            pred[:, start + 1:start + window] += out[:, 1:]
            counter[:, start + 1:start + window] += 1
    return pred / counter


def test_window_starts_worked_examples():
    assert window_starts(50, 24, 6) == [0, 18, 26]  # v2 settings: 0, 18, then 36 clamped to 50 - 24
    assert window_starts(42, 24, 6) == [0, 18]  # the second window ends exactly at the last frame
    assert window_starts(43, 24, 6) == [0, 18, 19]  # a clamped last window can reach back over two windows
    assert window_starts(24, 24, 6) == [0] and window_starts(14, 14, 4) == [0]
    assert window_starts(24, 8, 0) == [0, 8, 16]
    for bad in ((10, 12, 2), (30, 8, 8), (30, 8, -1)):
        with pytest.raises(ValueError, match="sliding windows need"):
            window_starts(*bad)


def test_official_rule_on_the_worked_example():
    starts = window_starts(50, 24, 6)
    weights = official_weights(starts, 24)
    counts = torch.zeros(50)
    for s, w in zip(starts, weights):
        counts[s:s + 24] += w
    # window 0 gives 0..23, window 18 gives 19..41 (not 18), window 26 gives 27..49 (not 26)
    expected = torch.tensor([1.0] * 19 + [2.0] * 5 + [1.0] * 3 + [2.0] * 15 + [1.0] * 8)
    torch.testing.assert_close(counts, expected, atol=0, rtol=0)
    outputs = [torch.randn(2, 24, 4, 3, 5) for _ in starts]
    torch.testing.assert_close(merge_windows(outputs, starts, weights), official_merge(outputs, starts, 50),
                               atol=1e-6, rtol=1e-6)  # the same sums in another order: float rounding only
    tiles = [torch.randn(2, 8, 3) for _ in range(3)]  # overlap 0: the official rule leaves frames 8 and 16 empty
    with pytest.raises(ValueError, match=r"frames \[8, 16\] have zero total weight"):
        merge_windows(tiles, [0, 8, 16], official_weights([0, 8, 16], 8))


def test_tiling_windows_equal_running_them_separately():
    x = torch.randn(2, 24, 3, 4, 4)
    starts = window_starts(24, 8, 0)
    kernel = torch.randn(3, 3, 3, 1, 1)

    def model(chunk, start):  # a temporal convolution: its output depends on the window it sees
        return torch.nn.functional.conv3d(chunk.transpose(1, 2), kernel, padding=(1, 0, 0)).transpose(1, 2) + start
    for weights in (blend_weights(starts, 8, drop_first=False), torch.ones(len(starts), 8)):
        merged = apply_windows(model, x, starts, weights)
        separate = torch.cat([model(x[:, s:s + 8], s) for s in starts], dim=1)
        torch.testing.assert_close(merged, separate, atol=1e-6, rtol=1e-6)  # weights 1 / norm 1: unchanged values


@pytest.mark.parametrize("num_frames,window,overlap", [(50, 24, 6), (43, 24, 6), (30, 24, 6), (40, 14, 4),
                                                       (100, 14, 4), (25, 25, 5), (17, 6, 1), (33, 8, 7)])
def test_blend_weights_sum_to_one(num_frames, window, overlap):
    starts = window_starts(num_frames, window, overlap)
    for drop_first in (False, True):
        weights = blend_weights(starts, window, drop_first=drop_first)
        total = torch.zeros(num_frames)
        for s, w in zip(starts, weights):
            total[s:s + window] += w
        torch.testing.assert_close(total, torch.ones(num_frames), atol=1e-6, rtol=0)
        assert weights.min() >= 0
        if drop_first:
            assert weights[1:, 0].eq(0).all()  # the reference-pose slot of later windows never contributes
        constant = [torch.full((1, window, 2), 3.0) for _ in starts]
        torch.testing.assert_close(merge_windows(constant, starts, weights), torch.full((1, num_frames, 2), 3.0))


def test_blend_is_a_linear_cross_fade():
    weights = blend_weights([0, 18, 26], 24, drop_first=False)  # windows 0 and 18 share frames 18..23 (6)
    torch.testing.assert_close(weights[1, :6], torch.arange(1, 7) / 7.0)
    torch.testing.assert_close(weights[0, 18:], 1 - torch.arange(1, 7) / 7.0)
    assert weights[0, :18].eq(1).all() and weights[2, -8:].eq(1).all()
    dropped = blend_weights([0, 18, 26], 24, drop_first=True)  # frame 18 is window 18's reference slot
    torch.testing.assert_close(dropped[1, :6], torch.tensor([0.0, 1, 2, 3, 4, 5]) / 6)


def test_merging_euler_steps_equals_stepping_the_merged_denoiser():
    """Why a sampler may merge D(x) instead of the stepped latents (windows.py docstring)."""
    x, sigma, sigma_next = torch.randn(1, 30, 4), 2.0, 1.2
    starts = window_starts(30, 12, 4)
    denoised = [torch.randn(1, 12, 4) for _ in starts]
    for weights in (official_weights(starts, 12), blend_weights(starts, 12, drop_first=True)):
        steps = [x[:, s:s + 12] + (x[:, s:s + 12] - d) / sigma * (sigma_next - sigma) for s, d in zip(starts, denoised)]
        merged_d = merge_windows(denoised, starts, weights)
        torch.testing.assert_close(merge_windows(steps, starts, weights),
                                   x + (x - merged_d) / sigma * (sigma_next - sigma), atol=1e-5, rtol=1e-5)


def test_window_control_puts_the_reference_pose_first():
    control = torch.arange(10.0).view(1, 10, 1, 1, 1).expand(2, 10, 3, 2, 2)
    part = window_control(control, 4, 5)
    assert part[:, :, 0, 0, 0].tolist() == [[0.0, 5, 6, 7, 8]] * 2
    assert control[0, 4, 0, 0, 0] == 4  # the input is left as it was
