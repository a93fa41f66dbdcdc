"""Video training data for ControlNeXt-SVD: pose-video clips (the official SVD-v2 sampling) and a procedural toy.

ControlNeXt (arXiv 2408.06070, §4.3 "SVD") fine-tunes SVD on dance videos paired with rendered pose videos
(controlnext.md §4.3). `VideoClips` samples clips the way dvlab-research/ControlNeXt@ab4b3ac:
ControlNeXt-SVD-v2-Training/utils/vid_dataset.py `UBCFashion` does:
  - stride min(interval, len // num_frames) (interval <= 0: uniform in 2..7), a uniform start, num_frames frames;
  - a reference frame uniform over the whole video; frame 0 of the clip, RGB and pose, is replaced by it;
  - a random crop to the target aspect (height / width), then an antialiased bilinear resize (torchvision's Resize);
  - the hand-region loss weight (hand_mask): each hand box grown by 10 px, 0.8 inside when the hand's mean keypoint
    score is > 0.5, later boxes overwriting earlier ones, cropped and resized with the frame, w = 1 + 4 * mask
    (4.2 on confident hands), w = 1 on frame 0; at pixel resolution (the trainer average-pools it to the latents).
Ranges: frames and reference in [-1, 1]; control (pose) in [0, 1]. Every random choice comes from the
torch.Generator passed to `sample`, in the official order (interval, start, reference, crop).

Pose channel order (controlnext.md §8 item 7): the tensors returned are the pose images as render_pose draws them
(RGB), which is what the official inference feeds the model. The official trainer swaps R and B of every decoded
pose-video frame; its authors' pose videos must therefore store R and B swapped (what cv2.VideoWriter does to RGB
frames), so that training sees what inference gives. `Clip.pose_bgr` says a clip's pose files are stored that way:
True for the official layout (the official trainer's swap), False for the plain layout (PNGs as render_pose writes
them).

Layouts (paths inside JSON files are absolute or relative to that JSON file's folder; the official loader opens
them as given, i.e. relative to the working directory):
  official: meta_info.json = [{"video_path": ..., "guide_path": <pose video, frame-aligned>,
                               "meta_info": <per-video json, optional>}, ...];
            per-video json = one entry per video frame: {"boxes": [[[x0, y0], [x1, y1]], ...] (persons),
                             "hands_boxes": [[[x0, y0], [x1, y1]], ...], "hands_score": [[21 scores], ...]},
            coordinates normalised by the frame size. Entries without hands_boxes/hands_score have no hands.
  plain:    root/<clip>/frames (a folder of images or frames.<mp4|gif|...>), root/<clip>/pose (the same, pose.*),
            root/<clip>/meta.json (optional, the per-video json above). Clip folders in natural order.
`MovingFill50k` is a procedural toy that runs on CPU: a fill50k disc (controlnext/data.py: colours, prompt, centre;
radius halved) moving along a line or an arc over the clip, its ring outline as the pose, and the same clip
structure (frame 0 is the reference, taken at a uniform time on the path). It is a pure function of (index, seed).
Resolution buckets (not in the official trainer, which trains every clip at one size): with `buckets`, a
list of (width, height), each clip trains at the bucket nearest its own aspect ratio (its first frame's size, read
once), cropped to that aspect and resized as above, so a mixed set of portrait and landscape clips loses little to
the crop. train.py's batches (controlnext/video_stages.py video_batch) hold clips of one bucket: `step_bucket`.
Left out: the official try/except that silently replaces an unreadable or too-short video by a random other one
(here it is an error naming the clip), and the unused `stage`/`ref_aug` arguments of UBCFashion.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from controlnext.data import CENTER_RANGE, check_size, fill50k_params, make_example, render, to_tensors
from controlnext.metrics import fill_iou
from controlnext.video_io import GIF_SUFFIX, VIDEO_SUFFIXES, count_frames, natural_key, read_frames_at

RANDOM_INTERVAL = (2, 7)  # vid_dataset.py: interval_frame <= 0 draws the stride uniformly from 2..7
HAND_MARGIN = 10          # vid_dataset.py draw_mask: hand boxes grow by 10 video pixels on every side
HAND_MIN_SCORE = 0.5      # a hand counts when its mean keypoint score is above this
HAND_LEVEL = 0.8          # the mask value on a counted hand
HAND_GAIN = 4.0           # loss weight = 1 + HAND_GAIN * mask: 4.2 on confident hands
BUCKET_STREAM = 1         # spawn key of the per-step bucket draw (step_bucket)


# --- layouts ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    """One training video: RGB frames, frame-aligned pose frames, optional per-frame detections."""
    frames: Path       # a folder of images or a video file
    pose: Path         # the same for the pose frames
    meta: Path | None  # the per-video json (hands_boxes, hands_score per frame), or None
    pose_bgr: bool     # the pose files store R and B swapped (module docstring): swap them back when reading
    where: str         # how error messages name the clip


def _resolve(base: Path, value: object, where: str, field: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {field} must be a path string, got {value!r}")
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.exists():
        raise ValueError(f"{where}: {field} not found: {path}")
    return path


def read_meta_info(path: str | Path, pose_bgr: bool = True) -> list[Clip]:
    """The official layout's meta_info.json -> clips (files checked now, per-video jsons when first sampled)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"meta_info file not found: {path}")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of {{video_path, guide_path, meta_info}} objects")
    clips = []
    for k, entry in enumerate(entries):
        where = f"{path}: entry {k}"
        if not isinstance(entry, dict) or not {"video_path", "guide_path"} <= entry.keys():
            raise ValueError(f"{where}: needs video_path and guide_path (meta_info optional)")
        meta = _resolve(path.parent, entry["meta_info"], where, "meta_info") if "meta_info" in entry else None
        clips.append(Clip(_resolve(path.parent, entry["video_path"], where, "video_path"),
                          _resolve(path.parent, entry["guide_path"], where, "guide_path"), meta, pose_bgr, where))
    return clips


def _frames_source(clip_dir: Path, name: str) -> Path:
    """clip_dir/name (a folder) or clip_dir/name.<video suffix>."""
    if (clip_dir / name).is_dir():
        return clip_dir / name
    files = [clip_dir / f"{name}{s}" for s in VIDEO_SUFFIXES + (GIF_SUFFIX,) if (clip_dir / f"{name}{s}").is_file()]
    if len(files) != 1:
        found = "several" if files else "none"
        raise ValueError(f"{clip_dir}: expected one {name}/ folder or {name}.<{'|'.join(s[1:] for s in VIDEO_SUFFIXES)}"
                         f"|gif> file, found {found}")
    return files[0]


def read_clip_folders(root: str | Path, pose_bgr: bool = False) -> list[Clip]:
    """The plain layout: every visible subfolder of `root` is a clip with frames, pose and an optional meta.json."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"clip folder not found: {root}")
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: natural_key(d.name))
    if not dirs:
        raise ValueError(f"{root}: no clip folders (each holds frames/ and pose/, or frames.mp4 and pose.mp4)")
    return [Clip(_frames_source(d, "frames"), _frames_source(d, "pose"),
                 d / "meta.json" if (d / "meta.json").is_file() else None, pose_bgr, str(d)) for d in dirs]


def _floats(value: object) -> np.ndarray | None:
    """A JSON number list as a float array, or None when it is not one (ragged, strings, ...)."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def read_hands(path: Path, num_frames: int) -> list[list[tuple[np.ndarray, float]]]:
    """Per frame, each hand's (box (2, 2) as [[x0, y0], [x1, y1]], mean keypoint score) from a per-video json."""
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(entries, list) or len(entries) < num_frames:
        count = len(entries) if isinstance(entries, list) else "no"
        raise ValueError(f"{path}: expected a list with one entry per video frame ({num_frames}), got {count}")
    hands = []
    for i, entry in enumerate(entries[:num_frames]):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: frame {i}: expected an object, got {type(entry).__name__}")
        frame = []
        if "hands_boxes" in entry and "hands_score" in entry:  # vid_dataset.py: both keys, or no hands
            boxes, scores = entry["hands_boxes"], entry["hands_score"]
            if not isinstance(boxes, list) or not isinstance(scores, list) or len(scores) < len(boxes):
                raise ValueError(f"{path}: frame {i}: hands_boxes and hands_score must be lists, one score list "
                                 f"per box")
            for h, (box, score) in enumerate(zip(boxes, scores)):
                box, score = _floats(box), _floats(score)
                if box is None or box.shape != (2, 2) or score is None or score.ndim != 1 or len(score) == 0:
                    raise ValueError(f"{path}: frame {i}: hands_boxes[{h}] must be [[x0, y0], [x1, y1]] and "
                                     f"hands_score[{h}] a list of scores")
                frame.append((box, float(score.mean())))
        hands.append(frame)
    return hands


def hand_mask(hands: list[list[tuple[np.ndarray, float]]], height: int, width: int) -> Tensor:
    """(F, 1, height, width) mask at video resolution: HAND_LEVEL inside each confident hand's grown box, else 0.

    vid_dataset.py draw_mask: box corners truncated to pixels, grown by HAND_MARGIN, clipped to the frame; boxes are
    painted in order, so a later box (even an unconfident one, value 0) overwrites an earlier one where they meet.
    """
    mask = torch.zeros(len(hands), 1, height, width)
    for f, frame in enumerate(hands):
        for box, score in frame:
            (x0, y0), (x1, y1) = box
            left, right = max(int(x0 * width) - HAND_MARGIN, 0), min(int(x1 * width) + HAND_MARGIN, width)
            top, bottom = max(int(y0 * height) - HAND_MARGIN, 0), min(int(y1 * height) + HAND_MARGIN, height)
            mask[f, :, top:bottom, left:right] = HAND_LEVEL if score > HAND_MIN_SCORE else 0.0
    return mask


# --- clip sampling ----------------------------------------------------------------------------------------------------

def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high], both included (Python's random.randint, which the official loader uses)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def clip_indices(length: int, num_frames: int, interval: int, generator: torch.Generator) -> tuple[list[int], int]:
    """(frame ids, reference id) of one clip: the official stride, start and reference rules (module docstring)."""
    if interval <= 0:
        interval = _randint(*RANDOM_INTERVAL, generator)
    stride = min(interval, length // num_frames)
    if stride < 1:
        raise ValueError(f"a video of {length} frames is shorter than num_frames={num_frames}")
    start = _randint(0, length - stride * num_frames, generator)
    reference = _randint(0, length - 1, generator)
    return list(range(start, start + stride * num_frames, stride)), reference


def crop_box(height: int, width: int, target_height: int, target_width: int,
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width): the largest crop of the target aspect, at a random offset (official)."""
    if height / width > target_height / target_width:  # too tall: keep the width, slide vertically
        crop_h, crop_w = int(width * target_height / target_width), width
        return _randint(0, height - crop_h, generator), 0, crop_h, crop_w
    crop_h, crop_w = height, int(height * target_width / target_height)  # too wide (or exact): slide horizontally
    return 0, _randint(0, width - crop_w, generator), crop_h, crop_w


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the (width, height) bucket whose aspect ratio is nearest width / height, measured in log ratio
    (a 2:1 landscape is as far from square as a 1:2 portrait); ties go to the earlier bucket."""
    ratio = math.log(width / height)
    distances = [round(abs(ratio - math.log(w / h)), 9) for w, h in buckets]  # rounded: exact ties stay ties
    return distances.index(min(distances))


def step_bucket(counts: Sequence[int], seed: int, step: int) -> int:
    """The bucket of every micro-batch of `step` on every rank: the bucket of one clip drawn uniformly, so a bucket
    comes up in proportion to its clips (an empty one never). The stream depends on (seed, step) alone: the ranks
    agree without communicating and a resumed run draws the same buckets."""
    state = np.random.SeedSequence([seed, step], spawn_key=(BUCKET_STREAM,))  # apart from step_generator's streams
    clip = np.random.default_rng(state).integers(sum(counts))
    return int(np.searchsorted(np.cumsum(counts), clip, side="right"))


def _resize(x: Tensor, height: int, width: int) -> Tensor:
    """torchvision Resize((height, width), antialias=True) on float tensors: antialiased bilinear."""
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


class VideoClips:
    """Pose-video clips in either layout (module docstring), sampled as the official SVD-v2 trainer samples them;
    at width x height, or with `buckets` each clip at the (width, height) bucket nearest its aspect ratio."""

    def __init__(self, clips: list[Clip], *, width: int, height: int, num_frames: int, interval: int,
                 buckets: tuple[tuple[int, int], ...] = ()):
        self.sizes = tuple(buckets) or ((width, height),)  # (width, height) per bucket
        for w, h in self.sizes:
            if w <= 0 or h <= 0 or w % 8 or h % 8:
                raise ValueError(f"width and height must be positive multiples of 8 (the VAE stride), got {w}x{h}")
        if not clips or num_frames < 1:
            raise ValueError(f"VideoClips needs clips and num_frames >= 1, got {len(clips)} clips, {num_frames}")
        self.clips, self.num_frames, self.interval = clips, num_frames, interval
        self._lengths: dict[int, int] = {}
        self._hands: dict[int, list] = {}
        self._frame_sizes: dict[int, tuple[int, int]] = {}
        self._members: list[list[int]] | None = None

    @classmethod
    def from_path(cls, path: str | Path, *, width: int, height: int, num_frames: int, interval: int,
                  buckets: tuple[tuple[int, int], ...] = ()) -> VideoClips:
        """A meta_info .json file (official layout) or a folder of clip folders (plain layout)."""
        path = Path(path)
        clips = read_meta_info(path) if path.suffix.lower() == ".json" else read_clip_folders(path)
        return cls(clips, width=width, height=height, num_frames=num_frames, interval=interval, buckets=buckets)

    def frame_size(self, index: int) -> tuple[int, int]:
        """(width, height) of clip `index`'s first frame; read once, then cached."""
        if index not in self._frame_sizes:
            height, width = read_frames_at(self.clips[index].frames, [0]).shape[1:3]  # (1, h, w, 3)
            self._frame_sizes[index] = (width, height)
        return self._frame_sizes[index]

    def bucket(self, index: int) -> int:
        """The bucket clip `index` trains in (one bucket: 0, without opening the clip)."""
        return nearest_bucket(*self.frame_size(index), self.sizes) if len(self.sizes) > 1 else 0

    def members(self) -> list[list[int]]:
        """Clip indices per bucket; the first call opens every clip's first frame once."""
        if self._members is None:
            self._members = [[] for _ in self.sizes]
            for index in range(len(self.clips)):
                self._members[self.bucket(index)].append(index)
        return self._members

    def __len__(self) -> int:
        return len(self.clips)

    def length(self, index: int) -> int:
        """Frames of clip `index` (its pose must have as many); counted once, then cached."""
        if index not in self._lengths:
            clip = self.clips[index]
            frames, poses = count_frames(clip.frames), count_frames(clip.pose)
            if poses < frames:
                raise ValueError(f"{clip.where}: the pose has {poses} frames, the video {frames} ({clip.pose})")
            self._lengths[index] = frames
        return self._lengths[index]

    def sample(self, index: int, generator: torch.Generator) -> dict:
        """One clip: frames (F, 3, H, W) and reference (3, H, W) in [-1, 1], control (F, 3, H, W) in [0, 1],
        loss_weight (F, 1, H, W), frame_ids (F,), reference_id."""
        clip = self.clips[index]
        length = self.length(index)
        if length < self.num_frames:
            raise ValueError(f"{clip.where}: {length} frames, fewer than num_frames={self.num_frames}")
        ids, ref = clip_indices(length, self.num_frames, self.interval, generator)
        rgb = read_frames_at(clip.frames, ids + [ref])  # (F + 1, h, w, 3) uint8: the clip, then the reference
        pose = read_frames_at(clip.pose, ids + [ref])
        if pose.shape != rgb.shape:
            raise ValueError(f"{clip.where}: pose frames are {pose.shape[2]}x{pose.shape[1]}, video frames "
                             f"{rgb.shape[2]}x{rgb.shape[1]}; they must match")
        if clip.pose_bgr:
            pose = pose[..., ::-1]  # vid_dataset.py: cv2.cvtColor(BGR2RGB) on every decoded pose frame
        rgb, pose = rgb.copy(), pose.copy()
        rgb[0], pose[0] = rgb[-1], pose[-1]  # frame 0 of the clip becomes the reference, image and pose
        h, w = rgb.shape[1:3]
        if clip.meta is not None and index not in self._hands:
            self._hands[index] = read_hands(clip.meta, length)
        mask = hand_mask([self._hands[index][i] for i in ids], h, w) if clip.meta else torch.zeros(len(ids), 1, h, w)

        width, height = self.sizes[self.bucket(index)]
        top, left, crop_h, crop_w = crop_box(h, w, height, width, generator)
        rgb_t = torch.from_numpy(rgb[:-1]).permute(0, 3, 1, 2).float() / 255  # (F, 3, h, w) in [0, 1]
        pose_t = torch.from_numpy(pose[:-1]).permute(0, 3, 1, 2).float() / 255
        crop = (..., slice(top, top + crop_h), slice(left, left + crop_w))  # the same window in every tensor
        frames = _resize(rgb_t[crop], height, width) * 2 - 1  # (F, 3, H, W) in [-1, 1]
        control = _resize(pose_t[crop], height, width)  # (F, 3, H, W) in [0, 1]
        weight = 1 + HAND_GAIN * _resize(mask[crop], height, width)  # (F, 1, H, W)
        weight[0] = 1  # the reference frame carries no hand weight
        return {"frames": frames, "reference": frames[0].clone(), "control": control, "loss_weight": weight,
                "frame_ids": torch.tensor(ids), "reference_id": ref}


# --- the procedural toy ----------------------------------------------------------------------------------------------

TOY_RADIUS_SCALE = 0.5          # the toy's disc radius is half of fill50k's (32..128 px at 512) so that it can move
ORBIT_RANGE = (32.0, 96.0)      # arc motion: orbit radius at 512 px (the centre stays within 0..512)
ARC_RANGE = (0.5 * math.pi, 2 * math.pi)  # arc motion: the angle swept over the clip, either direction


def moving_fill50k_params(index: int, seed: int = 0) -> dict:
    """fill50k's colours, prompt and centre for `index`, plus a path and a reference time. Pure in (index, seed)."""
    params = fill50k_params(index, seed)
    rng = np.random.default_rng([seed, index, 1])  # a stream of its own: fill50k's draws stay as they are
    params["r"] = params["r"] * TOY_RADIUS_SCALE
    params["linear"] = bool(rng.integers(2))
    params["end"] = tuple(float(v) for v in rng.integers(CENTER_RANGE[0], CENTER_RANGE[1] + 1, size=2))
    params["orbit"] = float(rng.uniform(*ORBIT_RANGE))
    params["phase"] = float(rng.uniform(0, 2 * math.pi))
    params["sweep"] = float(rng.uniform(*ARC_RANGE) * rng.choice([-1.0, 1.0]))
    params["reference_time"] = float(rng.uniform())
    return params


def disc_centres(params: dict, times: np.ndarray) -> np.ndarray:
    """Centres (T, 2) at 512 px along the path at times in [0, 1]: a line to `end`, or an arc around the start."""
    start = np.array([params["cx"], params["cy"]], dtype=np.float64)
    if params["linear"]:
        return start + times[:, None] * (np.array(params["end"]) - start)
    angle = params["phase"] + times * params["sweep"]
    return start + params["orbit"] * np.stack([np.cos(angle), np.sin(angle)], axis=1)


class MovingFill50k:
    """The video toy: clips of `num_frames` frames at `size` px, identical for the same (index, seed)."""

    def __init__(self, size: int = 64, num_frames: int = 8, length: int = 50_000, seed: int = 0):
        check_size(size)
        if num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 (the reference plus motion), got {num_frames}")
        self.size, self.num_frames, self.length, self.seed = size, num_frames, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        """frames, reference, control, loss_weight as VideoClips.sample; plus discs (F, H, W) bool, centres (F, 2)
        at 512 px, prompt and both colours."""
        p = moving_fill50k_params(index, self.seed)
        times = np.linspace(0, 1, self.num_frames)
        times[0] = p["reference_time"]  # frame 0 is the reference, taken anywhere on the path (official rule)
        centres = disc_centres(p, times)
        examples = [make_example(*render(cx, cy, p["r"], self.size), p["prompt"]) for cx, cy in centres]
        tensors = [to_tensors(e) for e in examples]
        frames = torch.stack([t["image"] for t in tensors])  # (F, 3, H, W) in [-1, 1]
        return {"frames": frames, "reference": frames[0].clone(),
                "control": torch.stack([t["control"] for t in tensors]),  # (F, 3, H, W) in [0, 1]: the ring
                "loss_weight": torch.ones(self.num_frames, 1, self.size, self.size),
                "discs": torch.from_numpy(np.stack([e["disc"] for e in examples])), "centres": centres,
                "prompt": p["prompt"], "circle_rgb": examples[0]["circle_rgb"],
                "background_rgb": examples[0]["background_rgb"]}

    def sample(self, index: int, generator: torch.Generator) -> dict:
        """The same interface as VideoClips.sample; the toy is a pure function of (index, seed) and ignores it."""
        return self[index]


def video_iou(frames: Tensor, discs: Tensor, circle_rgb: tuple, background_rgb: tuple) -> Tensor:
    """Per-frame fill IoU (controlnext/metrics.py) of generated frames (F, 3, H, W) in [-1, 1] with discs (F, H, W)."""
    images = ((frames.float() + 1) / 2).clamp(0, 1)
    n = len(frames)
    return fill_iou(images, discs, [circle_rgb] * n, [background_rgb] * n)
