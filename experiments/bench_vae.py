"""Benchmark (issue 7): peak memory of tiled vs untiled VAE decoding at 1024x1024 (and of frame-chunked vs unchunked
SVD video decoding), and decode time ours vs diffusers.

Question: how much memory does tiled decoding save at 1024x1024 with the full SD VAE, and is our decoder as fast as
diffusers'? Random weights (memory and time do not depend on the values), fp32, CPU, one process.
Command:  python experiments/bench_vae.py            (about 5-10 minutes on 2 CPU cores; --size=512 is quicker)
          python experiments/bench_vae.py --skip_image  (only the video part: 8 frames at 128x128, about a minute)
Peak memory is the process's peak resident set (Linux VmHWM), reset before each measurement through
/proc/self/clear_refs, minus the resident set just before it; so it counts activations, not the model weights.
diffusers is imported only here and in tests, as the reference for timing.
"""

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from vae.autoencoder import SD, TINY, AutoencoderKL
from vae.temporal_decoder import SVD, TemporalAutoencoder


def resident_mb(field: str) -> float:
    """VmRSS or VmHWM of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mb(fn) -> tuple[float, float, torch.Tensor]:
    """(peak resident MiB above the start, seconds, result) of fn()."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    start = resident_mb("VmRSS")
    began = time.perf_counter()
    out = fn()
    return resident_mb("VmHWM") - start, time.perf_counter() - began, out


def video_part(frames: int) -> None:
    """Peak memory of the SVD temporal decoder, frame-chunked (4 frames per slice) vs unchunked."""
    model = TemporalAutoencoder(SVD).eval()
    z = torch.randn(1, frames, 4, 16, 16)
    with torch.no_grad():
        model.decode(z[:, :2, :, :4, :4])  # warm-up outside the measurement
        chunked_mb, chunked_s, chunked = peak_extra_mb(lambda: model.decode(z, chunked=True))
        full_mb, full_s, full = peak_extra_mb(lambda: model.decode(z))
    diff = (chunked - full).abs().max()
    print(f"decode svd {frames} frames 128x128 chunked ({SVD.chunk_frames}): peak +{chunked_mb:.0f} MiB, "
          f"{chunked_s:.0f} s; unchunked: peak +{full_mb:.0f} MiB, {full_s:.0f} s; max |diff| {diff:.1e}")


def image_part(size: int, tiling: dict[str, int]) -> None:
    """Decode time ours vs diffusers at small sizes; peak memory of tiled vs untiled decoding at `size`."""

    # --- ours vs diffusers decode time at a small size (tiny config and full SD config at 128x128)
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from vae.keymap import vae_config_to_diffusers

    for name, config, side in (("tiny", TINY, 64), ("sd", SD, 128)):
        fields = {k: v for k, v in vae_config_to_diffusers(config).items() if not k.startswith("_")}
        reference = DiffusersAutoencoderKL(**fields).eval()
        ours = AutoencoderKL(config).eval()
        ours.load_state_dict(reference.state_dict())
        z = torch.randn(1, 4, side // 8, side // 8)
        with torch.no_grad():
            ours.decode(z), reference.decode(z)  # warm-up: oneDNN builds its kernels for the shapes on first use
            timings = {"ours": [], "diffusers": []}
            for _ in range(5):  # alternate, and take medians, so that load from other processes hits both alike
                for label, call in (("ours", lambda: ours.decode(z)),
                                    ("diffusers", lambda: reference.decode(z).sample)):
                    began = time.perf_counter()
                    call()
                    timings[label].append(time.perf_counter() - began)
            timings = {label: statistics.median(values) for label, values in timings.items()}
            diff = (ours.decode(z) - reference.decode(z).sample).abs().max().item()
        print(f"decode {name} {side}x{side}: ours {timings['ours'] * 1e3:.0f} ms, "
              f"diffusers {timings['diffusers'] * 1e3:.0f} ms, max |diff| {diff:.1e}")
        del reference, ours

    # --- peak memory, full SD config, tiled then untiled
    model = AutoencoderKL(dataclasses.replace(SD, **tiling)).eval()
    z = torch.randn(1, 4, size // 8, size // 8)
    with torch.no_grad():
        model.decode(torch.randn(1, 4, 8, 8))  # warm-up outside the measurement
        tiled_mb, tiled_s, tiled_out = peak_extra_mb(lambda: model.decode(z, tiled_decode=True))
        print(f"decode sd {size}x{size} tiled:   peak +{tiled_mb:.0f} MiB, {tiled_s:.0f} s")
        full_mb, full_s, full_out = peak_extra_mb(lambda: model.decode(z))
        print(f"decode sd {size}x{size} untiled: peak +{full_mb:.0f} MiB, {full_s:.0f} s")
    error = (tiled_out - full_out).abs()
    print(f"tiled vs untiled (random weights, {tiling}): max |diff| {error.max():.3f}, "
          f"mean |diff| / mean |untiled| {error.mean() / full_out.abs().mean():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--frames", type=int, default=8, help="video frames (full SVD config, 128x128)")
    parser.add_argument("--skip_image", action="store_true", help="run only the video measurement")
    parser.add_argument("--tile_size", type=int, default=SD.tile_size, help="latent pixels per tile")
    parser.add_argument("--tile_overlap", type=int, default=SD.tile_overlap, help="latent pixels shared by neighbours")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    if not args.skip_image:
        image_part(args.size, dict(tile_size=args.tile_size, tile_overlap=args.tile_overlap))
    video_part(args.frames)


if __name__ == "__main__":
    main()
