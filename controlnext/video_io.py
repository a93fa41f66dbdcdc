"""Video frames in and out: PNG folders, animated GIFs (PIL) and video files such as MP4 (imageio-ffmpeg, optional).

Frames are (F, H, W, 3) uint8 RGB arrays throughout; `to_uint8` converts a model's (F, 3, H, W) tensor.
Reading: a folder of images (PNG/JPEG/WebP/BMP, sorted naturally: 2.png before 10.png), a GIF (PIL), or a video file
(imageio-ffmpeg: the ffmpeg wrapper that imageio itself uses, with a bundled ffmpeg binary; one optional package and
no plugin layer), with a stride and a frame limit, or at given frame indices (the video datasets).
Writing: a PNG folder (exact), a GIF through PIL (always available; fps becomes the per-frame duration, which GIF
stores in hundredths of a second) and an MP4 (H.264, yuv420p) through imageio-ffmpeg. Every file and folder is
written under a temporary name in the target's folder and renamed into place, so a failed write leaves nothing
half-written.
The official scripts use decord (reading), cv2 and moviepy/imageio (writing) (dvlab-research/ControlNeXt@ab4b3ac:
ControlNeXt-SVD-v2/run_controlnext.py write_mp4, ControlNeXt-SVD-v2-Training/utils/vid_dataset.py); any of them
decodes to the same RGB frames. Left out: audio, variable frame rates, and other containers for writing (PNG
folders and GIFs need nothing beyond PIL; MP4 plays everywhere).
GIF caveats (PIL's encoder): colours are quantised to a 256-colour palette per frame, and identical consecutive
frames are merged into one (their durations add up, so playback timing is kept). Use PNGs for exact frames.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageSequence, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what a frame folder may hold
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")  # read through ffmpeg
GIF_SUFFIX = ".gif"
MP4_QUALITY = 8  # imageio-ffmpeg's 0..10 quality scale; 8 gives H.264 crf 10 (visually lossless for previews)
FFMPEG_MISSING = "reading or writing {what} needs imageio-ffmpeg: pip install imageio-ffmpeg (GIF and PNG need nothing)"


def require_ffmpeg(what: str) -> ModuleType:
    """The optional imageio-ffmpeg module, or one clear error naming what to install."""
    try:  # imported here so that PNG folders and GIFs work without the optional dependency
        import imageio_ffmpeg
    except ImportError:
        raise ModuleNotFoundError(FFMPEG_MISSING.format(what=what)) from None
    return imageio_ffmpeg


def natural_key(name: str) -> list:
    """Sort key that orders the digit runs of a name by value: frame2.png < frame10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: str | Path) -> list[Path]:
    """The image files of a frame folder, in natural order; ValueError when there are none."""
    folder = Path(folder)
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise ValueError(f"{folder}: no frames ({', '.join(IMAGE_SUFFIXES)} files)")
    return files


def _check_source(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"frames not found: {path}")
    if path.is_file() and path.suffix.lower() not in VIDEO_SUFFIXES + (GIF_SUFFIX,):
        raise ValueError(f"{path}: not a frame folder or a video file ({', '.join(VIDEO_SUFFIXES + (GIF_SUFFIX,))})")


def _load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read frame {path}: {e}") from None


def _decoded(path: Path):
    """Iterate over the frames of a GIF or video file as (H, W, 3) uint8 arrays."""
    if path.suffix.lower() == GIF_SUFFIX:
        with Image.open(path) as im:
            for frame in ImageSequence.Iterator(im):
                yield np.array(frame.convert("RGB"))
        return
    reader = require_ffmpeg(f"{path.suffix} files").read_frames(str(path))
    try:
        width, height = next(reader)["size"]  # the first item is ffmpeg's metadata
        for raw in reader:
            yield np.frombuffer(raw, np.uint8).reshape(height, width, 3)  # rgb24 bytes -> (H, W, 3)
    finally:
        reader.close()  # stops ffmpeg when the caller stops early


def count_frames(path: str | Path) -> int:
    """Number of frames of a folder, GIF or video file (a video is decoded once: ffmpeg's own count)."""
    path = Path(path)
    _check_source(path)
    if path.is_dir():
        return len(frame_files(path))
    if path.suffix.lower() == GIF_SUFFIX:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1)
    return require_ffmpeg(f"{path.suffix} files").count_frames_and_secs(str(path))[0]


def video_fps(path: str | Path) -> float | None:
    """Frames per second stored in a GIF (from its first frame's duration) or video file; None for folders."""
    path = Path(path)
    _check_source(path)
    if path.is_dir():
        return None
    if path.suffix.lower() == GIF_SUFFIX:
        with Image.open(path) as im:
            duration = im.info.get("duration")
        return 1000 / duration if duration else None
    reader = require_ffmpeg(f"{path.suffix} files").read_frames(str(path))
    fps = next(reader)["fps"]
    reader.close()
    return fps or None


def read_frames_at(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """The frames at `indices` (any order, repeats allowed) -> (len(indices), H, W, 3) uint8.

    A folder opens only those files; a GIF or video is decoded up to the last index needed.
    """
    path = Path(path)
    _check_source(path)
    if len(indices) == 0 or min(indices) < 0:
        raise ValueError(f"{path}: frame indices must be a non-empty list of indices >= 0, got {list(indices)}")
    if path.is_dir():
        files = frame_files(path)
        if max(indices) >= len(files):
            raise ValueError(f"{path}: frame {max(indices)} requested, the folder has {len(files)} frames")
        frames = [_load_image(files[i]) for i in indices]
    else:
        wanted, found, decoded = set(indices), {}, _decoded(path)
        for i, frame in enumerate(decoded):
            if i in wanted:
                found[i] = frame.copy()
            if len(found) == len(wanted):
                break
        decoded.close()
        if len(found) < len(wanted):
            raise ValueError(f"{path}: frame {max(wanted - found.keys())} requested, the video has fewer frames")
        frames = [found[i] for i in indices]
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"{path}: frames of different sizes {sorted({f.shape[1::-1] for f in frames})}")
    return np.stack(frames)


def read_frames(path: str | Path, *, stride: int = 1, max_frames: int | None = None) -> np.ndarray:
    """Frames 0, stride, 2 * stride, ... (at most max_frames) of a folder, GIF or video -> (F, H, W, 3) uint8."""
    if stride < 1 or (max_frames is not None and max_frames < 1):
        raise ValueError(f"stride and max_frames must be >= 1, got stride={stride}, max_frames={max_frames}")
    path = Path(path)
    _check_source(path)
    if path.is_dir():
        indices = list(range(0, len(frame_files(path)), stride))[:max_frames]
        return read_frames_at(path, indices)
    frames, decoded = [], _decoded(path)
    for i, frame in enumerate(decoded):
        if i % stride == 0:
            frames.append(frame.copy())
            if len(frames) == max_frames:
                break
    decoded.close()
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    return np.stack(frames)


def to_uint8(frames: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """(F, 3, H, W) float in value_range (e.g. (-1, 1) for a VAE's output) -> (F, H, W, 3) uint8, rounded."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (F, 3, H, W), got {tuple(frames.shape)}")
    low, high = value_range
    scaled = ((frames.detach().float().cpu() - low) / (high - low)).clamp(0, 1) * 255
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (F, H, W, 3)


def _check_frames(frames: np.ndarray) -> None:
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
            and len(frames) > 0):
        shape = getattr(frames, "shape", None)
        raise ValueError(f"frames must be a non-empty (F, H, W, 3) uint8 array, got {type(frames).__name__} {shape}")


def _temporary(path: Path) -> Path:
    """A fresh name beside `path`, same suffix (ffmpeg picks the container from it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    return Path(tmp)


def write_png_folder(frames: np.ndarray, folder: str | Path) -> None:
    """Frames as 00000.png, 00001.png, ... in `folder`, replacing it whole; written to a temporary folder first."""
    _check_frames(frames)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"{i:05d}.png")
        if folder.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside first
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_gif(frames: np.ndarray, path: str | Path, fps: float) -> None:
    """An animated, looping GIF through PIL: each frame lasts round(1000 / fps) ms (GIF keeps 10 ms steps)."""
    _check_frames(frames)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    path = Path(path)
    tmp = _temporary(path)
    try:
        images = [Image.fromarray(f) for f in frames]
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_mp4(frames: np.ndarray, path: str | Path, fps: float, quality: float = MP4_QUALITY) -> None:
    """An H.264 MP4 (yuv420p, plays everywhere) through imageio-ffmpeg; width and height must be even."""
    ffmpeg = require_ffmpeg(".mp4 files")
    _check_frames(frames)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: H.264 in yuv420p needs an even width and height, got {width}x{height}")
    path = Path(path)
    tmp = _temporary(path)
    try:
        # macro_block_size 2: keep the size (imageio-ffmpeg would otherwise resize up to a multiple of 16)
        writer = ffmpeg.write_frames(str(tmp), (width, height), fps=fps, quality=quality, macro_block_size=2,
                                     codec="libx264", ffmpeg_log_level="error")
        writer.send(None)  # start ffmpeg
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_frames(frames: np.ndarray, path: str | Path, fps: float | None = None) -> None:
    """By the path: '.gif' -> write_gif, '.mp4' -> write_mp4, no suffix -> write_png_folder (fps unused)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (GIF_SUFFIX, ".mp4") and fps is None:
        raise ValueError(f"{path}: writing a {suffix} needs fps")
    if suffix == GIF_SUFFIX:
        write_gif(frames, path, fps)
    elif suffix == ".mp4":
        write_mp4(frames, path, fps)
    elif suffix == "":
        write_png_folder(frames, path)
    else:
        raise ValueError(f"{path}: cannot write {suffix!r}; use .mp4, .gif or a folder name (PNG frames)")
