"""Resolution buckets for video training (--video_buckets; controlnext/video_data.py nearest_bucket, step_bucket,
VideoClips.members; controlnext/video_stages.py video_batch): assignment by aspect ratio against closed forms, batches
of one size that are a pure function of (seed, step, micro), the same bucket on every rank, buckets drawn in
proportion to their clips, a few training steps on clips of two aspect ratios, and bad bucket values refused before
anything is written.

Tolerances: none; the batches are compared bitwise (one process, the same kernels on the same inputs), the bucket
frequency within 4.4 binomial standard deviations.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from controlnext import cli
from controlnext.config import TrainConfig
from controlnext.video_data import VideoClips, nearest_bucket, step_bucket
from controlnext.video_stages import video_batch, video_dataset
from tests.svd_fixtures import MICRO_UNET, tiny_svd
from tests.test_video_train import _one_thread  # noqa: F401 - autouse: one torch thread for toy-sized ops

LANDSCAPE, PORTRAIT = (48, 32), (32, 48)  # (width, height) buckets of the data tests
SIZES = {"land": (60, 36), "port": (30, 46)}  # clip frame sizes (w, h): aspect 1.67 -> LANDSCAPE, 0.65 -> PORTRAIT


def write_clips(root: Path, kinds: list[str], frames: int = 6) -> Path:
    """The plain layout: root/<k>_<kind>/{frames,pose}/*.png, random pixels at SIZES[kind]."""
    rng = np.random.default_rng(0)
    for k, kind in enumerate(kinds):
        w, h = SIZES[kind]
        for part in ("frames", "pose"):
            (root / f"{k}_{kind}" / part).mkdir(parents=True)
            for i in range(frames):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / f"{k}_{kind}" / part / f"{i}.png")
    return root


def config_for(dataset: Path, **overrides) -> TrainConfig:
    small = dict(dataset=str(dataset), video_buckets=(LANDSCAPE, PORTRAIT), batch_size=3, num_frames=3,
                 frame_interval=1)
    return dataclasses.replace(TrainConfig(), **(small | overrides))


def test_each_clip_goes_to_the_bucket_nearest_its_aspect_ratio():
    official = ((1024, 576), (576, 1024), (768, 768))  # around the official 576 x 1024 pixel budget
    assert nearest_bucket(1920, 1080, official) == 0  # 16:9 exactly
    assert nearest_bucket(1080, 1920, official) == 1
    assert nearest_bucket(500, 500, official) == 2
    # log(16/9) = 2 log(4/3): a 4:3 frame is exactly halfway between square and 16:9; the tie goes to the earlier one
    assert nearest_bucket(800, 600, official) == 0
    assert official[::-1][nearest_bucket(800, 600, official[::-1])] == (768, 768)  # listed first, square wins
    assert nearest_bucket(1400, 1000, official) == 0 and nearest_bucket(1300, 1000, official) == 2  # either side
    assert nearest_bucket(600, 800, official) == 1 and nearest_bucket(1000, 1300, official) == 2  # portrait mirrors
    # log ratio, not ratio: 3:2 is nearer 2:1 (log 4/3) than 1:1 (log 3/2), where w / h would call it a tie (0.5, 0.5);
    # and a portrait goes where its mirrored landscape goes
    assert nearest_bucket(150, 100, ((64, 64), (128, 64))) == 1 and nearest_bucket(100, 150, ((64, 64), (64, 128))) == 1


def test_batches_hold_one_bucket_and_are_a_pure_function_of_seed_and_step(tmp_path):
    root = write_clips(tmp_path, ["land", "port", "land", "port", "land"])
    entries = [{"video_path": f"{d.name}/frames", "guide_path": f"{d.name}/pose"} for d in sorted(root.iterdir())]
    (root / "meta_info.json").write_text(json.dumps(entries))
    for dataset in (root, root / "meta_info.json"):  # both layouts
        config = config_for(dataset)
        clips = video_dataset(config)
        assert clips.members() == [[0, 2, 4], [1, 3]]  # by aspect ratio, read from each first frame
        assert clips.frame_size(1) == SIZES["port"]
        seen = set()
        for step in range(4):
            _, batch = video_batch(clips, config, step, 0)
            size = (batch["frames"].shape[-1], batch["frames"].shape[-2])
            assert size == (LANDSCAPE, PORTRAIT)[step_bucket([3, 2], config.seed, step)]
            assert batch["control"].shape[-2:] == batch["loss_weight"].shape[-2:] == batch["frames"].shape[-2:]
            _, again = video_batch(video_dataset(config), config, step, 0)  # a fresh dataset: a resumed run
            # bitwise on purpose: the same decode, resize and crop code on the same files in one process (no float
            # kernels that could differ between the two calls), so a resumed run must see the very same batch
            assert all(torch.equal(batch[k], again[k]) for k in batch)
            seen.add(size)
        assert seen == {LANDSCAPE, PORTRAIT}  # the steps above visit both buckets


def test_every_rank_and_micro_batch_of_a_step_use_the_same_bucket(tmp_path):
    root = write_clips(tmp_path, ["land", "port", "land"])
    config = config_for(root, batch_size=1, grad_accum=2)
    ranks = [video_dataset(config) for _ in range(2)]  # two processes: each reads the data on its own
    for step in range(6):
        sizes = {video_batch(ranks[rank], config, step, rank * config.grad_accum + k)[1]["frames"].shape[-2:]
                 for rank in range(2) for k in range(config.grad_accum)}  # micro = rank * grad_accum + k (train.py)
        assert len(sizes) == 1
    # the bucket is drawn in proportion to its clips, whatever the batch size; an empty bucket never comes up
    draws = np.array([step_bucket([3, 0, 1], 0, step) for step in range(4000)])
    assert 1 not in draws and abs((draws == 0).mean() - 0.75) < 0.03  # 4.4 sigma of Binomial(4000, 0.75) / 4000


def test_training_steps_on_two_aspect_ratios(tmp_path):
    micro = tiny_svd(tmp_path / "micro_svd", unet_config=MICRO_UNET)
    root = write_clips(tmp_path / "data", ["land", "port", "port"])
    config = config_for(root, pretrained=str(micro), out_dir=str(tmp_path / "runs"), batch_size=1, max_steps=3,
                        eval_every=0, eval_count=1, sampling_steps=1, save_every=2, progress=False, num_threads=1,
                        warmup_steps=1, lr=1e-4, control_lr=1e-3, video_width=32, video_height=32)
    assert {step_bucket([1, 2], config.seed, step) for step in range(3)} == {0, 1}  # both sizes are trained
    straight = train.main(config)
    assert len(straight["losses"]) == 3 and all(np.isfinite(straight["losses"]))
    run = Path(straight["run"])
    assert json.loads((run / "config.json").read_text())["video_buckets"] == [list(LANDSCAPE), list(PORTRAIT)]
    resumed = train.main(dataclasses.replace(config, resume=str(run / "checkpoints" / "step_000002.pt")))
    assert resumed["losses"] == straight["losses"][2:]  # the same buckets and clips again: bitwise


@pytest.mark.parametrize("buckets, message", [
    (((48, 36),), "each bucket must be \\(width, height\\), positive multiples of 8"),
    (((48, 0),), "positive multiples of 8"),
    (((48, 32, 8),), "each bucket must be \\(width, height\\)"),
    (((48, 32), (48, 32)), "a bucket is listed twice"),
    (((48, 32),), "the moving-disc toy \\(--dataset=fill50k\\) is square"),
])
def test_bad_buckets_fail_before_anything_is_written(tmp_path, buckets, message):
    dataset = "fill50k" if "toy" in message else str(write_clips(tmp_path / "data", ["land"]))
    config = dataclasses.replace(TrainConfig(), dataset=dataset, video_buckets=buckets, out_dir=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match=f"--video_buckets.*{message}"):
        train.main(config)
    assert not (tmp_path / "runs").exists()


def test_the_flag_parses_to_pairs():
    config, _ = cli.parse_args(TrainConfig, ["--video_buckets=((576, 1024), (1024, 576))"])
    assert config.video_buckets == ((576, 1024), (1024, 576))
    with pytest.raises(ValueError, match="--video_buckets"):
        cli.parse_args(TrainConfig, ["--video_buckets=(576, 1024, 8)"])
    with pytest.raises(ValueError, match="multiples of 8"):
        VideoClips([], width=32, height=32, num_frames=2, interval=1, buckets=((40, 36),))
