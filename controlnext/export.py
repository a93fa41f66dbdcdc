"""Export a train.py run to the files other tools load: the official ControlNeXt pair, a merged single file, a diffusers
folder.

    python -m controlnext.export --checkpoint=runs/<run>/checkpoints/step_000400_ema.safetensors --format=official \\
        --out=export/official [--increments]              # controlnet.safetensors + unet.safetensors (or ΔW)
    python -m controlnext.export --checkpoint=... --format=single_file --out=export/model.safetensors
    python -m controlnext.export --checkpoint=... --format=diffusers --out=export/pipeline

Formats (../shared/reference/controlnext.md §3, §6; checkpoints.md §2, §7):
- "official": the release layout the official runners load: `controlnet.safetensors` (the branch under its official
  names, G1 with its `scale`) and the trained UNet tensors as `unet.safetensors` (absolute, diffusers names) or, with
  --increments, `unet_weight_increments.safetensors` (ΔW = W_trained - W_base, the SDXL releases' form). sample.py reads
  either back and tells them apart by their values (controlnext/controls.py).
- "single_file": the base with the trained UNet tensors merged (a lora:R run's adapters folded in), as one original-layout
  .safetensors (UNet + VAE + text encoders: what A1111 and ComfyUI load), the branch beside it as
  `<name>.controlnext.safetensors` (the web UIs have no slot for it).
- "diffusers": the same merged model as a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder(s)/,
  tokenizer(s)/, scheduler/) that diffusers loads, the branch in a `controlnext/` sub-folder with its config.
Only the official-form arm (cross_norm) has an official layout: the zero_conv / paper_norm arms' extra tensors (the
1x1 conv, γ) and the ControlNet baseline have none, and are refused with a clear error for "official".
Left out: fp16 casting on export (the tensors keep the run's dtype), the ControlNet baseline in diffusers' layout.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from controlnext import cli
from controlnext.checkpoint import read_metadata, read_state, save_json, save_state, write_folder
from controlnext.controls import from_run
from controlnext.controlnext import ControlNeXtUNet
from controlnext.releases import weight_increments
from controlnext.sd_pipeline import load_sd
from controlnext.selection import merge_lora

FORMATS = ("official", "single_file", "diffusers")


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str = ""          # a train.py checkpoint (step_N[_ema].safetensors)
    pretrained: str = ""          # the base it was trained on; "" = the one named in the run's config
    tokenizer: str = ""           # single-file bases: as train.py's --tokenizer
    format: str = "official"      # "official" | "single_file" | "diffusers"
    increments: bool = False      # official: store the UNet tensors as ΔW against the base
    out: str = "export"           # a folder (official, diffusers) or a .safetensors file (single_file)


def export(config: ExportConfig) -> Path:
    """Write the export; returns its path. Every setting is checked before the model is loaded."""
    if config.format not in FORMATS:
        raise ValueError(f"--format={config.format!r}: expected one of {', '.join(FORMATS)}")
    checkpoint = Path(config.checkpoint)
    if not checkpoint.is_file():
        raise ValueError(f"--checkpoint={config.checkpoint}: no such train.py checkpoint")
    if config.format == "single_file" and Path(config.out).suffix != ".safetensors":
        raise ValueError(f"--out={config.out}: a single file ends in .safetensors")
    run_config = from_run_config(checkpoint)
    pipe = load_sd(config.pretrained or run_config["pretrained"], config.tokenizer or run_config["tokenizer"] or None)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    control = from_run(checkpoint, pipe)
    model, out = control.model, Path(config.out)
    trained = {k.removeprefix("unet."): v for k, v in read_state(checkpoint).items() if k.startswith("unet.")}
    if config.format == "official":
        if not isinstance(model, ControlNeXtUNet) or model.injection.form != "official":
            raise ValueError(f"{checkpoint}: a {run_config['ablation']} run has no official ControlNeXt layout (only "
                             "cross_norm's branch does): export it with --format=single_file or diffusers")
        if any("lora_" in k for k in trained):
            raise ValueError(f"{checkpoint}: a LoRA run's adapters are not UNet tensors: use --format=single_file")
        unet_name = "unet_weight_increments.safetensors" if config.increments else "unet.safetensors"
        unet_state = weight_increments(trained, base) if config.increments else trained
        write_folder(out, {"controlnet.safetensors": lambda p: save_state(model.branch.state_dict(), p),
                           unet_name: lambda p: save_state(unet_state, p)})
        return out
    merge_lora(pipe.unet)  # a lora:R run: W + (alpha/r) B A, plain Linear layers again
    branch = model.branch.state_dict() if isinstance(model, ControlNeXtUNet) else None
    if config.format == "single_file":
        pipe.save(out, layout="original")
        if branch is not None:
            save_state(branch, out.with_suffix(".controlnext.safetensors"))
        return out
    pipe.save(out, layout="diffusers")
    if branch is not None:
        meta = {"branch": dataclasses.asdict(model.branch.config), "injection": dataclasses.asdict(model.injection),
                "trained_control_scale": control.scale}
        write_folder(out / "controlnext", {"diffusion_pytorch_model.safetensors": lambda p: save_state(branch, p),
                                           "config.json": lambda p: save_json(meta, p)})
    return out


def from_run_config(checkpoint: Path) -> dict:
    """The run's resolved TrainConfig fields, from the checkpoint's metadata (controlnext/runs.py writes them)."""
    meta = read_metadata(checkpoint)
    if "config" not in meta:
        raise ValueError(f"{checkpoint}: no training config in its metadata; is it a train.py checkpoint?")
    return json.loads(meta["config"])


if __name__ == "__main__":
    try:
        config, dry_run = cli.parse_args(ExportConfig, sys.argv[1:])
        if dry_run:
            print(cli.dumps(config))
            sys.exit(0)
        print(f"wrote {export(config)}")
    except ValueError as e:  # bad input: one clear line, no traceback
        sys.exit(f"export: {e}")
