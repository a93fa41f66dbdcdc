"""controlnext/pose.py: the official alignment against closed forms, its filters, the renderer's colours and geometry,
and the keypoint JSON (round trip, errors)."""

import colorsys
import json
import math
import sys

import cv2
import numpy as np
import pytest

from controlnext import pose as pose_module
from controlnext.pose import (ALIGN_JOINTS, BODY_COLORS, BODY_LIMBS, HAND_EDGES, Pose, align_poses,
                              aligned_pose_frames, disc_offsets, fit_alignment, limb_polygon, load_pose_json,
                              render_pose, resize_linear, save_pose_json)

REF_SIZE, VIDEO_SIZE = (576, 1024), (1280, 720)  # (W, H): a portrait reference, a landscape driving video
CANVAS = 2160  # render at the canvas size so that pixels are the canvas's (no final resize)


def make_pose(body, score=None, visible=None, hands=None, hands_score=None, faces=None, faces_score=None) -> Pose:
    body = np.asarray(body, dtype=np.float64).reshape(-1, 18, 2)
    n = len(body)
    score = np.full((n, 18), 0.9) if score is None else np.asarray(score, dtype=np.float64).reshape(n, 18)
    visible = score > 0.3 if visible is None else np.asarray(visible).reshape(n, 18)
    hands = np.zeros((0, 21, 2)) if hands is None else np.asarray(hands, dtype=np.float64)
    faces = np.zeros((0, 68, 2)) if faces is None else np.asarray(faces, dtype=np.float64)
    hands_score = np.full(hands.shape[:2], 0.8) if hands_score is None else np.asarray(hands_score, np.float64)
    faces_score = np.full(faces.shape[:2], 0.7) if faces_score is None else np.asarray(faces_score, np.float64)
    return Pose(body, score, visible, hands, hands_score, faces, faces_score)


def affine_video(reference_body: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Video joints that the map reference = a * video + b sends exactly onto the reference."""
    return (reference_body - b) / a


def true_map(a_y: float, b_x: float, b_y: float) -> tuple[np.ndarray, np.ndarray]:
    a_x = a_y * (VIDEO_SIZE[0] / VIDEO_SIZE[1]) * (REF_SIZE[1] / REF_SIZE[0])  # controlnext.md §5 step 5
    return np.array([a_x, a_y]), np.array([b_x, b_y])


# --- alignment --------------------------------------------------------------------------------------------------------

def test_alignment_recovers_a_known_map_and_ignores_arms():
    rng = np.random.default_rng(0)
    ref_body = rng.uniform(0.2, 0.8, (18, 2))
    a, b = true_map(0.8, 0.05, 0.1)
    video = affine_video(ref_body, a, b)
    arms = [3, 4, 6, 7]  # elbows and wrists are not alignment joints: any value there must not matter
    assert not set(arms) & set(ALIGN_JOINTS)
    frames = []
    for t in range(3):
        body = video.copy()
        body[arms] = rng.uniform(0, 1, (4, 2))
        frames.append(make_pose(body))
    a_fit, b_fit = fit_alignment(make_pose(ref_body), frames, REF_SIZE, VIDEO_SIZE)
    np.testing.assert_allclose(a_fit, a, rtol=1e-12)  # an exact fit: only float rounding
    np.testing.assert_allclose(b_fit, b, rtol=1e-12, atol=1e-14)


def test_alignment_equals_polyfit_on_inexact_frames():
    """The official code: np.polyfit over all joints of all frames for y; a_x from the aspects; b_x the mean offset."""
    rng = np.random.default_rng(1)
    ref_body = rng.uniform(0.2, 0.8, (18, 2))
    frames = [make_pose(rng.uniform(0, 1, (18, 2))) for _ in range(4)]
    a_fit, b_fit = fit_alignment(make_pose(ref_body), frames, REF_SIZE, VIDEO_SIZE)
    joints = list(ALIGN_JOINTS)
    vid = np.stack([f.body[0, joints] for f in frames])  # (T, J, 2)
    a_y, b_y = np.polyfit(vid[..., 1].ravel(), np.tile(ref_body[joints, 1], len(frames)), 1)
    a_x = a_y / (VIDEO_SIZE[1] / VIDEO_SIZE[0] / REF_SIZE[1] * REF_SIZE[0])  # preprocess.py's own expression
    b_x = np.mean(np.tile(ref_body[joints, 0], len(frames)) - vid[..., 0].ravel() * a_x)
    np.testing.assert_allclose(a_fit, [a_x, a_y], rtol=1e-10)
    np.testing.assert_allclose(b_fit, [b_x, b_y], rtol=1e-10, atol=1e-12)


def test_alignment_filters_reference_confidence_and_multi_person_frames():
    rng = np.random.default_rng(2)
    ref_body = rng.uniform(0.2, 0.8, (18, 2))
    a, b = true_map(1.3, -0.2, 0.05)
    video = affine_video(ref_body, a, b)
    ref_score = np.full(18, 0.9)
    ref_score[[8, 16]] = 0.2  # undetected in the reference (subset -1): these joints leave the fit
    reference = make_pose(ref_body, ref_score)
    single = video.copy()
    single[[8, 16]] = rng.uniform(0, 1, (2, 2))  # so their video values may be anything
    two_people = make_pose(rng.uniform(0, 1, (2, 18, 2)))  # multi-person frames are dropped whatever they hold
    nobody = make_pose(np.zeros((0, 18, 2)))
    low_video_score = make_pose(single, np.full(18, 0.01))  # video confidences are not checked: still used
    a_fit, b_fit = fit_alignment(reference, [two_people, make_pose(single), nobody, low_video_score],
                                 REF_SIZE, VIDEO_SIZE)
    np.testing.assert_allclose(a_fit, a, rtol=1e-12)
    np.testing.assert_allclose(b_fit, b, rtol=1e-12, atol=1e-14)
    # the joints were really excluded: the same garbage at an included joint breaks the exact fit
    broken = video.copy()
    broken[0] = rng.uniform(0, 1, 2)
    a_bad, _ = fit_alignment(reference, [make_pose(broken)], REF_SIZE, VIDEO_SIZE)
    assert abs(a_bad[1] - a[1]) > 1e-3


def test_align_poses_maps_body_hands_and_face_and_keeps_the_reference_first():
    rng = np.random.default_rng(3)
    ref_body = rng.uniform(0.2, 0.8, (18, 2))
    a, b = true_map(0.7, 0.1, 0.2)
    hands, faces = rng.uniform(0.2, 0.8, (2, 21, 2)), rng.uniform(0.2, 0.8, (1, 68, 2))
    frame = make_pose(affine_video(ref_body, a, b), hands=hands, faces=faces)
    reference = make_pose(ref_body)
    poses = align_poses(reference, [frame, frame], REF_SIZE, VIDEO_SIZE)
    assert len(poses) == 3 and poses[0] is reference
    np.testing.assert_allclose(poses[1].body[0], ref_body, rtol=1e-12)
    np.testing.assert_allclose(poses[2].hands, hands * a + b, rtol=1e-12)
    np.testing.assert_allclose(poses[2].faces, faces * a + b, rtol=1e-12)
    np.testing.assert_array_equal(poses[1].hands_score, frame.hands_score)


def test_alignment_errors():
    body = np.random.default_rng(4).uniform(0, 1, (18, 2))
    with pytest.raises(ValueError, match="no detected person"):
        fit_alignment(make_pose(np.zeros((0, 18, 2))), [make_pose(body)], REF_SIZE, VIDEO_SIZE)
    with pytest.raises(ValueError, match="0 of 1 frames"):
        fit_alignment(make_pose(body), [make_pose(np.stack([body, body]))], REF_SIZE, VIDEO_SIZE)


# --- rendering --------------------------------------------------------------------------------------------------------

def rgb(bgr: tuple) -> tuple:
    return tuple(bgr[::-1])  # the official canvas is BGR; the output is RGB


def test_limb_colour_dimming_dots_and_low_confidence_joints():
    body = np.zeros((18, 2))
    score = np.zeros(18)  # every joint undetected unless set below
    body[1], body[2], body[5] = (0.5, 0.3), (0.3, 0.3), (0.7, 0.3)  # neck, right shoulder, left shoulder
    score[1], score[2], score[5] = 0.9, 0.8, 0.2  # the left shoulder is below the 0.3 cut-off
    image = render_pose(make_pose(body, score), CANVAS, CANVAS)
    assert image.shape == (CANVAS, CANVAS, 3) and image.dtype == np.uint8
    # limb 0 (neck - right shoulder): colour 0 times 0.9 * 0.8, truncated, then the layer x 0.6, truncated
    limb = tuple(int(int(c * 0.9 * 0.8) * 0.6) for c in BODY_COLORS[0])
    mid = (int(0.3 * CANVAS), int(0.4 * CANVAS))  # (row, column) of the limb's midpoint
    assert tuple(image[mid]) == rgb(limb)
    assert tuple(image[mid[0] + 3, mid[1]]) == rgb(limb)  # inside the minor semi-axis (4 px)
    assert tuple(image[mid[0] + 7, mid[1]]) == (0, 0, 0)  # outside it
    # joint dots at full colour times the joint's own score, drawn after the dimming
    for j in (1, 2):
        x, y = (int(v * CANVAS) for v in body[j])
        assert tuple(image[y, x]) == rgb(tuple(int(c * score[j]) for c in BODY_COLORS[j]))
    # the low-confidence left shoulder: no dot, and no neck - left shoulder limb
    x, y = (int(v * CANVAS) for v in body[5])
    assert tuple(image[y, x]) == (0, 0, 0)
    assert tuple(image[int(0.3 * CANVAS), int(0.6 * CANVAS)]) == (0, 0, 0)
    # nothing else anywhere: pixels are only black, the limb, or the two dots' colours
    colours = {tuple(c) for c in image.reshape(-1, 3)[::97]}
    assert colours <= {(0, 0, 0), rgb(limb)} | {rgb(tuple(int(c * score[j]) for c in BODY_COLORS[j])) for j in (1, 2)}


def test_limb_polygon_is_cv2_ellipse2poly_geometry():
    poly = np.array(limb_polygon(np.array([100.0, 100.0]), np.array([200.0, 100.0])))
    t = np.radians(np.arange(361))
    # axes (50, 4) around (150, 100), rotated by atan2(p0 - p1) = 180 degrees: the first vertex is at p0
    expected = np.stack([np.rint(150 - 50 * np.cos(t)), np.rint(100 - 4 * np.sin(t))], axis=1)
    keep = np.r_[True, np.any(expected[1:] != expected[:-1], axis=1)]
    np.testing.assert_array_equal(poly, expected[keep])
    vertical = np.array(limb_polygon(np.array([100.0, 100.0]), np.array([100.0, 200.0])))
    assert vertical[:, 0].min() == 96 and vertical[:, 0].max() == 104  # the 4-px semi-axis is now along x
    assert vertical[:, 1].min() == 100 and vertical[:, 1].max() == 200


def test_hands_and_face_colours_and_undetected_points():
    hand = np.zeros((21, 2))
    hand[0], hand[1] = (0.2, 0.6), (0.4, 0.6)  # edge 0 (wrist - thumb base), long enough to sample its middle
    # points 2..20 stay at (0, 0): undetected, not drawn, nor their edges
    hand_score = np.full(21, 0.5)
    hand_score[0], hand_score[1] = 0.9, 0.8
    face = np.zeros((68, 2))
    face[10] = (0.7, 0.8)
    face_score = np.zeros(68)
    face_score[10] = 0.6
    pose = make_pose(np.zeros((0, 18, 2)), hands=hand[None], hands_score=hand_score[None], faces=face[None],
                     faces_score=face_score[None])
    image = render_pose(pose, CANVAS, CANVAS)
    level = int(0.9 * 0.8 * 255)  # edge 0: the rainbow's first colour (hue 0 = pure red in the BGR canvas)
    assert tuple(image[int(0.6 * CANVAS), int(0.3 * CANVAS)]) == rgb((level, 0, 0))
    for k in (0, 1):  # hand points: (0, 0, score) in BGR, i.e. red
        x, y = (int(v * CANVAS) for v in hand[k])
        assert tuple(image[y, x]) == (int(hand_score[k] * 255), 0, 0)
    x, y = (int(v * CANVAS) for v in face[10])
    assert tuple(image[y, x]) == (int(0.6 * 255),) * 3  # face points are grey
    assert image[:20, :20].max() == 0  # the undetected points at the origin
    assert len(HAND_EDGES) == 20


def test_output_size_and_downscale():
    body = np.zeros((18, 2))
    score = np.zeros(18)
    body[1], body[8], score[1], score[8] = (0.5, 0.2), (0.5, 0.8), 1.0, 1.0  # a long vertical limb (neck - hip)
    pose = make_pose(body, score)
    big = render_pose(pose, 576, 1024)  # canvas 2160 x 3840, resized by 1/3.75
    assert big.shape == (1024, 576, 3)
    small = render_pose(pose, 48, 80)
    assert small.shape == (80, 48, 3)
    # the limb is 8 canvas px wide; at 1/3.75 its centre column keeps the full (dimmed) limb colour
    limb = rgb(tuple(int(int(c * 1.0) * 0.6) for c in BODY_COLORS[6]))
    assert tuple(big[512, 288]) == limb


# --- against the official cv2 drawing ---------------------------------------------------------------------------------

def official_canvas(pose: Pose, size: int) -> np.ndarray:
    """The official drawing on a square canvas of `size` (no final resize), with cv2, in its BGR canvas: a
    transcription of the calls in ControlNeXt-SVD-v2/dwpose/util.py (draw_bodypose, draw_handpose, draw_facepose)."""
    canvas = np.zeros((size, size, 3), np.uint8)
    for i in range(17):
        j0, j1 = BODY_LIMBS[i]
        for body, score in zip(pose.body, pose.body_score):
            if score[j0] < 0.3 or score[j1] < 0.3:
                continue
            (x0, y0), (x1, y1) = body[j0] * size, body[j1] * size
            angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
            axes = (int(math.hypot(x0 - x1, y0 - y1) / 2), 4)
            polygon = cv2.ellipse2Poly((int((x0 + x1) / 2), int((y0 + y1) / 2)), axes, int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(c * score[j0] * score[j1]) for c in BODY_COLORS[i]])
    canvas = (canvas * 0.6).astype(np.uint8)
    for j in range(18):
        for body, score, visible in zip(pose.body, pose.body_score, pose.body_visible):
            if visible[j]:
                x, y = (int(v * size) for v in body[j])
                cv2.circle(canvas, (x, y), 4, [int(c * score[j]) for c in BODY_COLORS[j]], thickness=-1)
    for points, scores in zip(pose.hands, pose.hands_score):
        pixels = [tuple(int(v * size) for v in p) for p in points]
        for e, (k0, k1) in enumerate(HAND_EDGES):
            if min(pixels[k0] + pixels[k1]) > 0.01:
                color = np.array(colorsys.hsv_to_rgb(e / 20, 1.0, 1.0)) * int(scores[k0] * scores[k1] * 255)
                cv2.line(canvas, pixels[k0], pixels[k1], color, thickness=2)
        for (x, y), s in zip(pixels, scores):
            if min(x, y) > 0.01:
                cv2.circle(canvas, (x, y), 4, (0, 0, int(s * 255)), thickness=-1)
    for points, scores in zip(pose.faces, pose.faces_score):
        for p, s in zip(points, scores):
            x, y = (int(v * size) for v in p)
            if min(x, y) > 0.01:
                cv2.circle(canvas, (x, y), 3, (int(s * 255),) * 3, thickness=-1)
    return canvas[..., ::-1]  # BGR -> RGB


def standing_person(rng: np.random.Generator) -> Pose:
    """A plausible skeleton (jittered), both hands, a face; some joints below the 0.3 cut-off."""
    body = np.array([[.5, .15], [.5, .25], [.4, .25], [.35, .4], [.33, .52], [.6, .25], [.65, .4], [.67, .52],
                     [.44, .55], [.43, .72], [.43, .9], [.56, .55], [.57, .72], [.57, .9], [.48, .13], [.52, .13],
                     [.46, .14], [.54, .14]]) + rng.normal(0, 0.01, (18, 2))
    score = rng.uniform(0.25, 1.0, 18)
    hands = np.stack([body[4] + rng.normal(0, 0.02, (21, 2)), body[7] + rng.normal(0, 0.02, (21, 2))])
    return make_pose(body, score, hands=hands, hands_score=rng.uniform(0.2, 1, (2, 21)),
                     faces=(body[0] + rng.normal(0, 0.015, (68, 2)))[None], faces_score=rng.uniform(0.2, 1, (1, 68)))


def test_rendering_matches_the_official_cv2_drawing():
    pose, no_body = standing_person(np.random.default_rng(7)), np.zeros((0, 18, 2))
    parts = {"body": make_pose(pose.body, pose.body_score),
             "face": make_pose(no_body, faces=pose.faces, faces_score=pose.faces_score),
             "hands": make_pose(no_body, hands=pose.hands, hands_score=pose.hands_score)}
    # limbs: cv2's polygon vertices exactly, PIL's fill at the edges (measured 0.5%); dots and face: cv2's discs
    # exactly; hand edges: PIL's 3-px line for cv2's thickness-2 line (measured ~5%)
    limits = {"body": 0.01, "face": 0.0, "hands": 0.08}
    for name, part in parts.items():
        ours, ref = render_pose(part, CANVAS, CANVAS), official_canvas(part, CANVAS)
        differ = (ours != ref).any(-1).sum() / (ref.any(-1) | ours.any(-1)).sum()
        assert differ <= limits[name], f"{name}: {differ:.2%} of the drawn pixels differ from cv2's"


def test_limb_vertices_dots_and_resize_are_cv2s():
    rng = np.random.default_rng(8)
    for _ in range(100):
        p0, p1 = rng.uniform(0, 2000, 2), rng.uniform(0, 2000, 2)
        angle = int(math.degrees(math.atan2(p0[1] - p1[1], p0[0] - p1[0])))
        axes = (int(math.hypot(*(p0 - p1)) / 2), 4)
        expected = cv2.ellipse2Poly((int((p0[0] + p1[0]) / 2), int((p0[1] + p1[1]) / 2)), axes, angle, 0, 360, 1)
        np.testing.assert_array_equal(np.array(limb_polygon(p0, p1)), expected)
    for radius in (3, 4):
        canvas = np.zeros((11, 11), np.uint8)
        cv2.circle(canvas, (5, 5), radius, 1, thickness=-1)
        assert sorted(disc_offsets(radius)) == sorted((x - 5, y - 5) for y, x in zip(*np.nonzero(canvas)))
    image = (rng.uniform(0, 1, (375, 210, 3)) ** 4 * 255).astype(np.uint8)
    for width, height in ((56, 100), (33, 61), (420, 750), (210, 375)):  # down by 3.75 (576 x 1024), odd, up, same
        ours, ref = resize_linear(image, width, height).astype(int), cv2.resize(image, (width, height))
        assert np.abs(ours - ref).max() <= 1  # float here, 11-bit fixed point in cv2: rounding only
        assert (ours != ref).mean() < 0.15


# --- the keypoint JSON ------------------------------------------------------------------------------------------------

def test_json_round_trip_and_aligned_frames(tmp_path):
    rng = np.random.default_rng(5)
    ref_body = rng.uniform(0.3, 0.7, (18, 2))
    reference = make_pose(ref_body, hands=rng.uniform(0.3, 0.7, (2, 21, 2)), faces=rng.uniform(0.3, 0.7, (1, 68, 2)))
    a, b = true_map(0.9, 0.02, -0.03)
    video = [make_pose(affine_video(ref_body, a, b) + rng.normal(0, 0.01, (18, 2))) for _ in range(4)]
    save_pose_json(tmp_path / "ref.json", [reference], 64, 64)
    save_pose_json(tmp_path / "video.json", video, *VIDEO_SIZE)
    loaded = load_pose_json(tmp_path / "video.json")
    assert (loaded.width, loaded.height) == VIDEO_SIZE and len(loaded.frames) == 4
    for p, q in zip(video, loaded.frames):
        for field in Pose.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(p, field), getattr(q, field))  # JSON floats round-trip exactly
    raw = json.loads((tmp_path / "video.json").read_text())["frames"][0]["bodies"]
    assert len(raw["candidate"]) == 18 and raw["subset"][0][:3] == [0.0, 1.0, 2.0]  # DWPose's own layout
    frames = aligned_pose_frames(tmp_path / "ref.json", tmp_path / "video.json", 64, 64, stride=2, max_frames=1)
    assert frames.shape == (2, 64, 64, 3)  # [reference] + video frames 0, 2 truncated to 1
    np.testing.assert_array_equal(frames[0], render_pose(reference, 64, 64))
    poses = align_poses(reference, video[::2], (64, 64), VIDEO_SIZE)  # the fit used frames 0 and 2
    np.testing.assert_array_equal(frames[1], render_pose(poses[1], 64, 64))


def test_json_errors_name_file_frame_and_field(tmp_path):
    good = make_pose(np.random.default_rng(6).uniform(0, 1, (18, 2)))
    save_pose_json(tmp_path / "k.json", [good, good], 64, 64)
    data = json.loads((tmp_path / "k.json").read_text())
    cases = []
    bad = json.loads(json.dumps(data))
    del bad["frames"][1]["hands_score"]
    cases.append((bad, r"frame 1: missing field\(s\) hands_score"))
    bad = json.loads(json.dumps(data))
    bad["frames"][0]["bodies"]["candidate"] = bad["frames"][0]["bodies"]["candidate"][:17]
    cases.append((bad, r"frame 0: bodies.candidate has 17 rows, expected 18"))
    bad = json.loads(json.dumps(data))
    bad["frames"][1]["faces"] = [[[0.1, 0.2]] * 67]
    cases.append((bad, r"frame 1: faces has shape \(1, 67, 2\), expected \(n, 68, 2\)"))
    bad = json.loads(json.dumps(data))
    del bad["width"]
    cases.append((bad, "expected an object with width, height and frames"))
    for n, (content, message) in enumerate(cases):
        path = tmp_path / f"bad{n}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message) as info:
            load_pose_json(path)
        assert str(path) in str(info.value)
    (tmp_path / "broken.json").write_text('{"width": 64,\n "height": }')
    with pytest.raises(ValueError, match=r"broken.json:2: not valid JSON"):
        load_pose_json(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="keypoint file not found"):
        load_pose_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="a reference keypoint file has one frame, got 2"):
        aligned_pose_frames(tmp_path / "k.json", tmp_path / "k.json", 64, 64)
    save_pose_json(tmp_path / "ref.json", [good], 64, 64)
    with pytest.raises(ValueError, match="cannot be drawn at 64x128"):
        aligned_pose_frames(tmp_path / "ref.json", tmp_path / "k.json", 64, 128)


def test_cli_renders_the_control_frames(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(9)
    ref_body = rng.uniform(0.3, 0.7, (18, 2))
    save_pose_json(tmp_path / "ref.json", [make_pose(ref_body)], 64, 64)
    save_pose_json(tmp_path / "video.json", [make_pose(ref_body + rng.normal(0, 0.01, (18, 2))) for _ in range(3)],
                   *VIDEO_SIZE)
    args = ["pose", "--reference", str(tmp_path / "ref.json"), "--video", str(tmp_path / "video.json"),
            "--width", "64", "--height", "64", "--out", str(tmp_path / "poses")]
    monkeypatch.setattr(sys, "argv", args)
    pose_module.main()
    assert sorted(p.name for p in (tmp_path / "poses").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    monkeypatch.setattr(sys, "argv", args[:-1] + [str(tmp_path / "poses.gif")])  # a GIF without --fps
    with pytest.raises(SystemExit):
        pose_module.main()
    assert "a folder, or a .gif / .mp4 file with --fps" in capsys.readouterr().err
    assert not (tmp_path / "poses.gif").exists()
