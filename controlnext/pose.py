"""Pose keypoints for ControlNeXt-SVD-v2: the keypoint JSON, the official pose alignment, the OpenPose-style renderer.

ControlNeXt (arXiv 2408.06070, §4 and the SVD-v2 release) drives SVD with a sequence of rendered pose images. The
v2 inference path (controlnext.md §5 "v2 pose preprocessing") detects whole-body keypoints with DWPose, maps the
driving video's skeletons onto the reference image's by a per-axis linear fit and renders them. This file does the
last two steps, matching dvlab-research/ControlNeXt@ab4b3ac:
  ControlNeXt-SVD-v2/dwpose/preprocess.py  get_video_pose    -> fit_alignment, align_poses
  ControlNeXt-SVD-v2/dwpose/util.py        draw_pose & co.   -> render_pose
  ControlNeXt-SVD-v2/dwpose/dwpose_detector.py               -> the keypoint layout (Pose, the JSON file)
Pose *estimation* (DWPose: YOLOX-L + dw-ll_ucoco_384, ONNX weights) is left out: it needs weights that are not
here. Give keypoints (this JSON) or pose images. Render the control frames of two keypoint files:
`python -m controlnext.pose --reference ref.json --video video.json --out poses/ --stride 2`.

Keypoint JSON (what DWPoseDetector returns per frame, as json.dump writes it, plus the detected image's size):
    {"width": W, "height": H,                     # pixels of the images the keypoints were detected on
     "frames": [                                  # one entry per frame; a reference image is a file with one frame
        {"bodies": {"candidate": [[x, y], ...],   # 18*N rows: person n's OpenPose-18 joints are rows 18n..18n+17
                    "subset": [[...18], ...],     # N rows: 18n+j where joint j is detected (score > 0.3), else -1
                    "score": [[...18], ...]},     # N rows: joint confidences
         "hands": [[[x, y] * 21], ...],           # M hands (DWPose: the N left hands, then the N right hands)
         "hands_score": [[...21], ...],           # M rows
         "faces": [[[x, y] * 68], ...],           # K faces (DWPose: K = N)
         "faces_score": [[...68], ...]}]}         # K rows
Coordinates are normalised: x / W and y / H. Undetected hand/face points sit near 0 (DWPose writes them so) and
are not drawn (the official `> eps` test on pixel coordinates).

Rendering against the official cv2 drawing (PIL and numpy here; no OpenCV; tests/test_pose.py compares the two):
  - limbs: cv2.ellipse2Poly's vertices exactly (its float32 one-degree sine table, cvRound), filled by PIL's scanline
    polygon plus its outline instead of cv2.fillConvexPoly: about 0.5% of the limb pixels (edge pixels) differ;
  - joint, hand and face dots: cv2's filled circle exactly (the pixels with dx^2 + dy^2 <= r^2);
  - hand edges: cv2's thickness-2 line is a polygon of half-width 1 with its edge pixels and round caps, about 3 px
    across; PIL's width-3 line is the closest (about 5% of the hand pixels differ; width 2 would be 43%);
  - neither side anti-aliases (cv2 LINE_8 is the official default); the final downscale is cv2's INTER_LINEAR
    (half-pixel centres, two taps, no anti-aliasing) in float, so a value can differ by 1 from cv2's fixed point.
Kept as the official code does it: only the first 17 of the 19 OpenPose limbs are drawn (the two ear-shoulder limbs
never are), hands and faces have no confidence cut-off (their colours are scaled by the score), the colours are
written into a BGR canvas and the result is swapped to RGB. Left out: the official reading of candidate[-1] for a
joint whose score is exactly 0.3 (its subset says undetected while the limb test lets it through); here such a limb
is drawn from the joint's own coordinates.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from controlnext.video_io import require_ffmpeg, write_frames

# --- the OpenPose / DWPose tables (data) --------------------------------------------------------------------------

# OpenPose-18 joint order: 0 nose, 1 neck, 2-4 right shoulder/elbow/wrist, 5-7 left shoulder/elbow/wrist,
# 8-10 right hip/knee/ankle, 11-13 left hip/knee/ankle, 14 right eye, 15 left eye, 16 right ear, 17 left ear.
BODY_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
              (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))  # util.py limbSeq, 0-based
DRAWN_LIMBS = 17  # util.py draws `for i in range(17)`: the last two limbs (shoulder-ear) never appear
# One colour per limb and per joint, as written into the (BGR) canvas: util.py `colors`.
BODY_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
               (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
               (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
# Hand: 21 points, 0 the wrist, then four per finger from the thumb; edges from the wrist out along each finger.
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
# preprocess.py ref_keypoint_id: nose, neck, shoulders, hips, knees, ankles, eyes, ears (no elbows or wrists).
ALIGN_JOINTS = (0, 1, 2, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)

CANVAS_SHORT_SIDE = 2160  # util.py draw_pose ref_w: the canvas's short side in pixels, resized to (W, H) at the end
LIMB_HALF_WIDTH = 4       # util.py stickwidth: the ellipse's minor semi-axis in canvas pixels
LIMB_MIN_SCORE = 0.3      # util.py: a limb is skipped when either joint's score is below this
LIMB_DIM = 0.6            # util.py: the limb layer is multiplied by this before the joints are drawn
JOINT_RADIUS = 4          # body joints and hand points, canvas pixels
HAND_LINE_WIDTH = 3       # hand edges: util.py's thickness 2 in cv2 covers ~3 px across (module docstring)
FACE_RADIUS = 3           # face points, canvas pixels
VISIBLE_EPS = 0.01        # util.py eps: hand/face points are drawn only where both pixel coordinates exceed it


# --- keypoints --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pose:
    """One frame's keypoints, normalised coordinates (x / W, y / H), in DWPose's layout (module docstring)."""
    body: np.ndarray          # (N, 18, 2) OpenPose-18 joints per person
    body_score: np.ndarray    # (N, 18) joint confidences
    body_visible: np.ndarray  # (N, 18) bool: the subset entry is >= 0 (DWPose: score > 0.3)
    hands: np.ndarray         # (M, 21, 2)
    hands_score: np.ndarray   # (M, 21)
    faces: np.ndarray         # (K, 68, 2)
    faces_score: np.ndarray   # (K, 68)

    def moved(self, a: np.ndarray, b: np.ndarray) -> Pose:
        """Every point mapped to a * point + b, with a and b (2,) per axis (preprocess.py, after the fit)."""
        return Pose(self.body * a + b, self.body_score, self.body_visible, self.hands * a + b, self.hands_score,
                    self.faces * a + b, self.faces_score)


@dataclass(frozen=True)
class PoseFile:
    """A keypoint JSON: the frames and the pixel size of the images they were detected on."""
    width: int
    height: int
    frames: list[Pose]


def _array(value: object, shape: tuple, where: str, field: str) -> np.ndarray:
    """A JSON list as a float array of `shape` (None = any length); ValueError naming the field otherwise."""
    if isinstance(value, list) and len(value) == 0:
        value = np.zeros((0,) + tuple(s for s in shape[1:]))  # an empty list is zero rows of the right width
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {field} is not a numeric array") from None
    if array.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, array.shape)):
        expected = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{where}: {field} has shape {array.shape}, expected {expected}")
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: {field} has non-finite values")
    return array


def pose_from_dict(frame: object, where: str) -> Pose:
    """One frame of the JSON (module docstring) -> Pose; ValueError naming `where` and the field."""
    if not isinstance(frame, dict):
        raise ValueError(f"{where}: a frame must be an object with bodies, hands, hands_score, faces, faces_score")
    missing = [k for k in ("bodies", "hands", "hands_score", "faces", "faces_score") if k not in frame]
    bodies = frame.get("bodies")
    if not missing and isinstance(bodies, dict):
        missing = [f"bodies.{k}" for k in ("candidate", "subset", "score") if k not in bodies]
    elif not missing:
        missing = ["bodies.candidate", "bodies.subset", "bodies.score"]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    subset = _array(bodies["subset"], (None, 18), where, "bodies.subset")
    n = len(subset)
    candidate = _array(bodies["candidate"], (None, 2), where, "bodies.candidate")
    if len(candidate) != 18 * n:
        raise ValueError(f"{where}: bodies.candidate has {len(candidate)} rows, expected 18 * len(subset) = {18 * n}")
    score = _array(bodies["score"], (n, 18), where, "bodies.score")
    hands = _array(frame["hands"], (None, 21, 2), where, "hands")
    faces = _array(frame["faces"], (None, 68, 2), where, "faces")
    return Pose(body=candidate.reshape(n, 18, 2),  # (18N, 2) -> (N, 18, 2): rows 18n..18n+17 are person n
                body_score=score, body_visible=subset >= 0, hands=hands,
                hands_score=_array(frame["hands_score"], (len(hands), 21), where, "hands_score"), faces=faces,
                faces_score=_array(frame["faces_score"], (len(faces), 68), where, "faces_score"))


def pose_to_dict(pose: Pose) -> dict:
    """Pose -> one JSON frame (the inverse of pose_from_dict; subset numbered as DWPose numbers it)."""
    n = len(pose.body)
    index = np.arange(18 * n, dtype=np.float64).reshape(n, 18)  # DWPose's subset: 18n + j for detected joints
    return {"bodies": {"candidate": pose.body.reshape(18 * n, 2).tolist(),  # (N, 18, 2) -> (18N, 2)
                       "subset": np.where(pose.body_visible, index, -1.0).tolist(),
                       "score": pose.body_score.tolist()},
            "hands": pose.hands.tolist(), "hands_score": pose.hands_score.tolist(),
            "faces": pose.faces.tolist(), "faces_score": pose.faces_score.tolist()}


def load_pose_json(path: str | Path) -> PoseFile:
    """Read a keypoint JSON (module docstring); ValueError naming the file, frame and field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"keypoint file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not {"width", "height", "frames"} <= data.keys():
        raise ValueError(f"{path}: expected an object with width, height and frames")
    width, height = data["width"], data["height"]
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ValueError(f"{path}: width and height must be positive integers, got {width!r}, {height!r}")
    if not isinstance(data["frames"], list) or not data["frames"]:
        raise ValueError(f"{path}: frames must be a non-empty list")
    return PoseFile(width, height, [pose_from_dict(f, f"{path}: frame {i}") for i, f in enumerate(data["frames"])])


def save_pose_json(path: str | Path, poses: Sequence[Pose], width: int, height: int) -> None:
    """Write a keypoint JSON atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"width": width, "height": height, "frames": [pose_to_dict(p) for p in poses]})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- the official alignment (preprocess.py get_video_pose) ----------------------------------------------------------

def fit_alignment(reference: Pose, frames: Sequence[Pose], ref_size: tuple[int, int],
                  video_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each (2,) over (x, y), with reference ≈ a * video + b (controlnext.md §5 steps 2-5). Sizes are (W, H).

    Joints: ALIGN_JOINTS detected in the reference's person 0; frames: those with exactly one person (their joint
    confidences are not checked, as in the official code). y is a least-squares line over all those points; x uses
    the same pixel scale, a_x = a_y * (vid_W / vid_H) * (ref_H / ref_W), and the mean offset.
    """
    if len(reference.body) == 0:
        raise ValueError("pose alignment: the reference has no detected person")
    joints = [j for j in ALIGN_JOINTS if reference.body_visible[0, j]]
    single = [f.body[0, joints] for f in frames if len(f.body) == 1]  # each (J, 2)
    if len(joints) < 2 or not single:
        raise ValueError(f"pose alignment needs >= 2 detected reference joints and >= 1 single-person frame; "
                         f"got {len(joints)} joints and {len(single)} of {len(frames)} frames")
    video = np.stack(single)  # (T, J, 2)
    ref = np.broadcast_to(reference.body[0, joints], video.shape)  # (T, J, 2): the reference repeated per frame
    y_vid, y_ref = video[..., 1].ravel(), ref[..., 1].ravel()
    if np.ptp(y_vid) == 0:
        raise ValueError("pose alignment: the video joints all have the same y; the fit is undetermined")
    # np.polyfit(y_vid, y_ref, 1) in closed form: slope cov / var, intercept through the means.
    a_y = np.mean((y_vid - y_vid.mean()) * (y_ref - y_ref.mean())) / np.var(y_vid)
    b_y = y_ref.mean() - a_y * y_vid.mean()
    (ref_w, ref_h), (vid_w, vid_h) = ref_size, video_size
    # The coordinates are normalised per axis: one pixel scale for both axes means rescaling a_y by the aspects.
    a_x = a_y * (vid_w / vid_h) * (ref_h / ref_w)
    b_x = np.mean(ref[..., 0] - a_x * video[..., 0])
    return np.array([a_x, a_y]), np.array([b_x, b_y])


def align_poses(reference: Pose, frames: Sequence[Pose], ref_size: tuple[int, int],
                video_size: tuple[int, int]) -> list[Pose]:
    """The control sequence [reference] + every video frame aligned to it (body, hands and face; §5 steps 6-7)."""
    a, b = fit_alignment(reference, frames, ref_size, video_size)
    return [reference] + [f.moved(a, b) for f in frames]


# --- rendering (util.py draw_pose) ------------------------------------------------------------------------------------

def _scaled(color: Sequence[float], factor: float) -> tuple[int, ...]:
    """util.py alpha_blend_color: each channel times the confidence, truncated."""
    return tuple(int(c * factor) for c in color)


# cv2's one-degree sine table (drawing.cpp SinTable: sin rounded to 7 decimals, stored as float32), so that the
# limb polygon's vertices round exactly as cv2.ellipse2Poly's do; cos(k) is entry 450 - k.
SIN_TABLE = np.round(np.sin(np.radians(np.arange(451))), 7).astype(np.float32).astype(np.float64)


def limb_polygon(p0: np.ndarray, p1: np.ndarray) -> list[tuple[int, int]]:
    """The vertices cv2.ellipse2Poly gives for a limb between pixel points p0, p1 (util.py draw_bodypose).

    Centre and semi-axes are truncated to integers and the angle to whole degrees as the official call does; the
    vertices are sampled every degree and rounded half to even (cvRound), consecutive duplicates removed.
    """
    cx, cy = (p0 + p1) / 2
    length = math.hypot(*(p0 - p1))
    angle = int(math.degrees(math.atan2(p0[1] - p1[1], p0[0] - p1[0]))) % 360  # whole degrees, in [0, 360)
    cos_a, sin_a = SIN_TABLE[450 - angle], SIN_TABLE[angle]
    t = np.arange(361)
    ax, ay = int(length / 2) * SIN_TABLE[450 - t], LIMB_HALF_WIDTH * SIN_TABLE[t]  # the axis-aligned ellipse
    x = np.rint(int(cx) + ax * cos_a - ay * sin_a)  # rotated by the limb's angle (y down)
    y = np.rint(int(cy) + ax * sin_a + ay * cos_a)
    points = [(int(u), int(v)) for u, v in zip(x, y)]
    return [p for i, p in enumerate(points) if i == 0 or p != points[i - 1]]


def disc_offsets(radius: int) -> list[tuple[int, int]]:
    """The pixels of a filled cv2.circle: offsets with dx^2 + dy^2 <= radius^2 (49 at radius 4, 29 at 3)."""
    span = range(-radius, radius + 1)
    return [(dx, dy) for dy in span for dx in span if dx * dx + dy * dy <= radius * radius]


JOINT_DISC, FACE_DISC = disc_offsets(JOINT_RADIUS), disc_offsets(FACE_RADIUS)


def _dot(draw: ImageDraw.ImageDraw, x: int, y: int, disc: list[tuple[int, int]], color: tuple[int, ...]) -> None:
    draw.point([(x + dx, y + dy) for dx, dy in disc], fill=color)


def render_pose(pose: Pose, width: int, height: int) -> np.ndarray:
    """One frame of keypoints -> the official pose image (height, width, 3) uint8 RGB (util.py draw_pose)."""
    scale = CANVAS_SHORT_SIDE / min(width, height)
    canvas_w, canvas_h = int(width * scale), int(height * scale)
    size = np.array([canvas_w, canvas_h], dtype=np.float64)  # normalised (x, y) -> canvas pixels

    # Limbs on black, in the BGR canvas; filled ellipses coloured per limb and dimmed by both joints' scores.
    image = Image.new("RGB", (canvas_w, canvas_h))
    draw = ImageDraw.Draw(image)
    for i, (j0, j1) in enumerate(BODY_LIMBS[:DRAWN_LIMBS]):
        for joints, scores in zip(pose.body, pose.body_score):
            if scores[j0] < LIMB_MIN_SCORE or scores[j1] < LIMB_MIN_SCORE:
                continue
            polygon = limb_polygon(joints[j0] * size, joints[j1] * size)
            color = _scaled(BODY_COLORS[i], scores[j0] * scores[j1])
            draw.polygon(polygon, fill=color)
            draw.line(polygon + polygon[:1], fill=color)  # cv2 also draws the edges as 8-connected lines
    image = image.point([int(v * LIMB_DIM) for v in range(256)] * 3)  # the limb layer dimmed, truncated (a LUT)

    # Joints, hands and face on top, at full brightness times their own score.
    draw = ImageDraw.Draw(image)
    for j in range(18):  # joint by joint, then person by person: the official order, where dots overlap
        for joints, scores, visible in zip(pose.body, pose.body_score, pose.body_visible):
            if visible[j]:
                x, y = (int(v) for v in joints[j] * size)
                _dot(draw, x, y, JOINT_DISC, _scaled(BODY_COLORS[j], scores[j]))
    for points, scores in zip(pose.hands, pose.hands_score):
        pixels = [tuple(int(v) for v in p * size) for p in points]
        for e, (k0, k1) in enumerate(HAND_EDGES):
            (x0, y0), (x1, y1) = pixels[k0], pixels[k1]
            if min(x0, y0, x1, y1) > VISIBLE_EPS:
                level = int(scores[k0] * scores[k1] * 255)
                hue = colorsys.hsv_to_rgb(e / len(HAND_EDGES), 1.0, 1.0)  # the rainbow over the 20 edges
                draw.line((x0, y0, x1, y1), fill=tuple(int(np.rint(c * level)) for c in hue), width=HAND_LINE_WIDTH)
        for (x, y), s in zip(pixels, scores):
            if min(x, y) > VISIBLE_EPS:
                _dot(draw, x, y, JOINT_DISC, (0, 0, int(s * 255)))  # red once swapped to RGB
    for points, scores in zip(pose.faces, pose.faces_score):
        for p, s in zip(points, scores):
            x, y = (int(v) for v in p * size)
            if min(x, y) > VISIBLE_EPS:
                _dot(draw, x, y, FACE_DISC, (int(s * 255),) * 3)

    return resize_linear(np.asarray(image), width, height)[..., ::-1].copy()  # (H, W, 3), BGR -> RGB


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR along one axis: source taps i0, i1 and weight of i1 (half-pixel centres, clamped ends)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.clip(np.floor(src), 0, n_in - 1).astype(np.int64)
    return i0, np.minimum(i0 + 1, n_in - 1), np.clip(src - i0, 0, 1)[:, None]


def resize_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(image, (width, height)) with INTER_LINEAR, cv2's default: two taps per axis, no anti-aliasing.
    (h, w, 3) uint8 -> (height, width, 3) uint8, in float (cv2 uses fixed point: values can differ by 1)."""
    if image.shape[:2] == (height, width):
        return image.copy()  # the taps would be the pixels themselves
    y0, y1, fy = _linear_taps(image.shape[0], height)
    x0, x1, fx = _linear_taps(image.shape[1], width)
    fy, fx = fy[:, :, None], fx[None]  # (H, 1, 1) and (1, W, 1): broadcast over the output grid and channels

    def tap(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return image[rows[:, None], cols[None, :]].astype(np.float32)  # (H, W, 3): only the pixels read
    top = tap(y0, x0) * (1 - fx) + tap(y0, x1) * fx
    bottom = tap(y1, x0) * (1 - fx) + tap(y1, x1) * fx
    return np.rint(top * (1 - fy) + bottom * fy).clip(0, 255).astype(np.uint8)


def render_poses(poses: Sequence[Pose], width: int, height: int) -> np.ndarray:
    """A pose sequence -> (F, height, width, 3) uint8 RGB frames."""
    return np.stack([render_pose(p, width, height) for p in poses])


def aligned_pose_frames(reference_json: str | Path, video_json: str | Path, width: int, height: int, *,
                        stride: int = 1, max_frames: int | None = None) -> np.ndarray:
    """The v2 control frames from two keypoint JSONs: [reference] + aligned video frames, rendered at (width, height).

    The reference keypoints must come from the reference image as cropped to (width, height) (§5 step 1). Every
    `stride`-th video frame is used; the fit uses all of them and `max_frames` (video frames) truncates afterwards,
    as the official caller does. -> (1 + frames, height, width, 3) uint8.
    """
    if stride < 1 or (max_frames is not None and max_frames < 1):
        raise ValueError(f"stride and max_frames must be >= 1, got stride={stride}, max_frames={max_frames}")
    reference, video = load_pose_json(reference_json), load_pose_json(video_json)
    if len(reference.frames) != 1:
        raise ValueError(f"{reference_json}: a reference keypoint file has one frame, got {len(reference.frames)}")
    if abs(reference.width * height - reference.height * width) > 0.01 * reference.height * width:
        raise ValueError(f"{reference_json}: keypoints of a {reference.width}x{reference.height} image cannot be drawn "
                         f"at {width}x{height}; detect them on the reference cropped to that aspect (§5 step 1)")
    poses = align_poses(reference.frames[0], video.frames[::stride], (reference.width, reference.height),
                        (video.width, video.height))
    return render_poses(poses[: None if max_frames is None else 1 + max_frames], width, height)


def main() -> None:
    parser = argparse.ArgumentParser(description="render the v2 control frames: [reference] + aligned video poses")
    parser.add_argument("--reference", required=True, help="keypoint JSON of the reference image (one frame)")
    parser.add_argument("--video", required=True, help="keypoint JSON of the driving video")
    parser.add_argument("--width", type=int, default=576, help="output width (the official v2 size: 576)")
    parser.add_argument("--height", type=int, default=1024, help="output height (the official v2 size: 1024)")
    parser.add_argument("--stride", type=int, default=1, help="use every stride-th video frame (official: 2)")
    parser.add_argument("--max_frames", type=int, default=None, help="keep at most this many video frames")
    parser.add_argument("--out", required=True, help="a folder (PNG frames), or a .gif / .mp4 file")
    parser.add_argument("--fps", type=float, default=None, help="frames per second for .gif / .mp4")
    args = parser.parse_args()
    suffix = Path(args.out).suffix.lower()
    if suffix not in ("", ".gif", ".mp4") or (suffix and args.fps is None):
        parser.error(f"--out {args.out}: a folder, or a .gif / .mp4 file with --fps")
    if suffix == ".mp4":
        require_ffmpeg(".mp4 files")  # before the rendering, not after it
    frames = aligned_pose_frames(args.reference, args.video, args.width, args.height, stride=args.stride,
                                 max_frames=args.max_frames)
    write_frames(frames, args.out, args.fps)
    print(f"wrote {len(frames)} pose frames ({args.width}x{args.height}) to {args.out}")


if __name__ == "__main__":
    main()
