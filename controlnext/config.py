"""TrainConfig: every setting of a training run, shared by train.py (which runs it) and sample.py (which reads a run's
config.json to rebuild its model), with the checks that run before any work is done.

One name per knob (STYLE.md §3): the field, the `--flag`, the log key and the checkpoint entry. Defaults are the main
job (`python train.py --ablation zero_conv`): ControlNeXt on the shipped miniature SD1.5 (experiments/weights/), the
procedural fill50k at 64 px, a few minutes on 2 CPU cores. Real-weight recipes are experiment files
(experiments/sd15_fill50k.py, experiments/sdxl_depth.py) that set the official numbers
(../shared/reference/controlnext.md §4.1-4.2). The fields named "auto" resolve from the loaded model (the official
recipe of its family, controlnext/stages.py RECIPES) and are written resolved into config.json.
Why a module and not the top of train.py (STYLE.md §6 puts it there): sample.py and the experiment protocols read
runs too, and importing train.py for its dataclass imported the whole trainer.
Left out: YAML, nested configs, environment-variable overrides.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    stage: str = "control"             # "control": a method on a frozen base; "base": UNet + text encoder (prompt only)
                                       # on a trained VAE; "vae": the autoencoder (the miniature SD1.5's stages)
    ablation: str = "cross_norm"       # controlnext/controlnext.py ABLATIONS: cross_norm zero_conv no_norm paper_norm controlnet
    trainable: str = "auto"            # UNet tensors trained with the branch (selection.py): none to_out attn2_to_out
                                       # to_out_to_v all lora:R; auto = the family's official recipe
    injection: str = "auto"            # inject.py preset (site, eps, pool order); auto = the family's official one
    branch: str = "auto"               # control_branch.py preset; auto = g2 for released-width UNets, else tiny
    control_scale: float = 1.0         # k on the added control term while training (official SD1.5 default 1.0)
    control_site: str = ""             # move the preset's site: conv_in, down_<k>, mid_in, mid_out (SD3: block_<k>);
                                       # "" = the preset's own (the site ablation, issue 18)
    # the model
    pretrained: str = "experiments/weights/mini_sd15.safetensors"  # SD single file or diffusers folder (control
                                       # stage); base stage: the file holding the trained VAE
    tokenizer: str = ""                # single files: vocab folder or BPE .txt.gz; "" = tokenizer/ beside the file
    prediction_type: str = ""          # override the checkpoint's ("epsilon" | "v_prediction"; SD2 single files)
    model: str = "mini_sd15"           # base/vae stages: the sd_pipeline.py preset built from scratch
    clip_skip: int = 0                 # text layers skipped (diffusers' convention; A1111's "clip skip 2" is 1)
    # the model, video: --pretrained an SVD pipeline folder or svd*.safetensors trains ControlNeXt-SVD-v2
    # (controlnext/video_stages.py; controlnext.md §4.3)
    eps_layout: str = "sgm"            # SVD UNet GroupNorm eps (unet/svd_unet.py): "sgm" as SVD was trained, or
                                       # "diffusers" as the official ControlNeXt-SVD releases were trained
    fps_id: int = 6                    # SVD micro-conditioning while training (official SVD-v2 trainer: fps_id 6,
    motion_bucket_id: int = 127        # motion bucket 127, noise_aug 0.02 on the reference frame)
    noise_aug: float = 0.02
    conditioning_dropout: float = 0.1  # r ~ U(0, 1) per clip: r < 2p drops the image embedding, p <= r < 3p the
                                       # reference latents (official --conditioning_dropout_prob); never the control
    frame_chunk: int = 0               # SVD UNet per-frame layers on this many frames at a time (exact, less memory);
                                       # 0 = all frames at once
    fsdp: bool = False                 # torchrun: FSDP full shard (PyTorch fully_shard) of the UNet blocks and the
                                       # rest, sharded checkpoints (torch.distributed.checkpoint); else DDP
    # data
    dataset: str = "fill50k"           # "fill50k" (procedural) or a folder with prompt.json / metadata.jsonl
    resolution: int = 64               # pixels, multiple of 8; images are resized (shorter side) and centre-cropped
    dataset_seed: int = 0              # procedural fill50k stream
    proportion_empty_prompts: float = 0.0  # prompt -> empty_prompt with this probability (official flag)
    empty_prompt: str = ""             # official SD1.5 trainer uses the literal "PBH"
    loss_weight_control: float = 1.0  # per-pixel loss weight where the condition is lit (1 = plain MSE)
    noise_offset: float = 0.0          # offset noise strength (schedulers/training.py; 0 = the official trainers)
    snr_gamma: float = 0.0             # Min-SNR-gamma loss weighting (schedulers/training.py; 0 = off, plain MSE)
    cache_latents: bool = False        # folder datasets: VAE posterior + text embeddings computed once, kept on disk
    # data, video (controlnext/video_data.py): --dataset=fill50k is the moving-disc toy (MovingFill50k), else a
    # meta_info .json (the official layout) or a folder of clip folders
    num_frames: int = 8                # frames per training clip; frame 0 is the reference (official script.sh: 14)
    frame_interval: int = 3            # stride between a clip's frames; <= 0 draws it from 2..7 (official: 3)
    video_width: int = 64              # clip size in pixels, multiples of 8 (official 576 x 1024); the toy is square
    video_height: int = 64
    video_buckets: tuple[tuple[int, int], ...] = ()  # clip sizes (width, height) for datasets that mix sizes: each clip
                                       # trains at the bucket nearest its aspect ratio, a step's batch is one bucket
                                       # (video_data.py); multiples of 8, best 64 (SVD-XT's latents then halve evenly
                                       # 3 times) at about one pixel budget: 576 x 1024 -> ((576, 1024), (1024, 576),
                                       # (768, 768)); () = every clip at video_width x video_height
    # optimisation (official SD1.5: AdamW, lr 1e-5, branch 1e-4, betas (0.9, 0.999), wd 1e-2, eps 1e-8)
    max_steps: int = 400               # optimizer steps
    batch_size: int = 32               # per process and micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    lr: float = 3e-4                   # UNet tensors (base/vae stages: everything); the mini model learns slowly at 1e-5
    control_lr: float = 3e-3           # control branch (official: 10x lr)
    warmup_steps: int = 50             # linear warmup, then constant
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0             # max global grad norm; 0 = off (the official SD1.5 trainer has it off)
    ema_decay: float = 0.99            # EMA of the trainable tensors; 0 = off
    kl_weight: float = 1e-6            # vae stage: weight of the KL term (LDM's autoencoder configs use 1e-6)
    mixed_precision: str = "no"        # "no" | "bf16" | "fp16" (autocast; fp32 master weights, frozen parts in bf16/fp16)
    gradient_checkpointing: bool = False  # recompute in backward: the UNet's blocks, the branch's stages, ControlNet's
    compile: bool = False              # torch.compile the networks of the step (stages.py compile_networks); the first
                                       # step compiles (minutes on a CPU), later ones run the fused kernels
    # evaluation: fixed held-out procedural set, fixed sampler and noise
    eval_every: int = 100              # steps (and step 0); also writes samples/ and plot.png; 0 = only at the end
    eval_count: int = 32               # held-out examples (fill50k, seed eval_seed)
    eval_seed: int = 1
    sampler: str = "dpmpp_2m"          # controlnext/sampling.py SAMPLERS
    sampling_steps: int = 10
    guidance_scale: float = 2.0        # classifier-free guidance (needs a base trained with empty prompts)
    # SD3 (--pretrained an SD3 model: controlnext/sd3_stages.py; issue 19)
    control_source: str = "dataset"    # the condition: "dataset" (its control images) or "super_resolution" (the
                                       # target area-downsampled sr_factor x, upsampled back bicubic; SD3 only)
    sr_factor: int = 4                 # super_resolution: the downsampling factor
    use_t5: bool = True                # load SD3's T5 encoder; False: T5-less (zeros, as SD3 allows; 9.5 GB less)
    t5_tokenizer: str = ""             # SD3 single files: a folder with spiece.model; "" = tokenizer_3/ beside the file
    # bookkeeping
    experiment: str = ""               # run folder name; "" = "<stage>_<ablation>"
    out_dir: str = "runs"
    log_every: int = 10
    save_every: int = 250              # checkpoint period (and one at the end)
    seed: int = 0
    device: str = "auto"               # "auto" | "cpu" | "cuda"
    num_threads: int = 1               # torch CPU threads (small ops gain little from more and lose badly on shared
                                       # cores: 0.7 vs 2.3 it/s measured on a small model); 0 = torch's default
    resume: str = ""                   # a checkpoint .pt to continue from, in its own run folder
    progress: bool = True              # tqdm bar


# Fields that may change when resuming (they do not change the math of the steps already taken).
RESUMABLE = {"max_steps", "resume", "eval_every", "log_every", "save_every", "progress", "device", "num_threads",
             "experiment", "out_dir", "compile"}
STAGES = ("control", "base", "vae")
CHOICES = {"stage": STAGES, "mixed_precision": ("no", "bf16", "fp16"), "device": ("auto", "cpu", "cuda"),
           "prediction_type": ("", "epsilon", "v_prediction"), "eps_layout": ("sgm", "diffusers"),
           "control_source": ("dataset", "super_resolution")}  # SD3 (issue 19)


def check(config: TrainConfig, *, names: dict[str, tuple[str, ...]]) -> None:
    """Every field that can be checked without loading a model, before any work (one ValueError naming the field).

    `names` holds the registries the caller knows (ablation, sampler, injection, branch, trainable, model), so this
    module imports none of them.
    """
    for field, allowed in {**CHOICES, **names}.items():
        value = getattr(config, field)
        if field == "trainable" and value.startswith("lora:"):
            continue  # checked by selection.parse_selection at build time
        if value not in allowed and value != "auto":
            raise ValueError(f"--{field}={value!r}: expected one of {', '.join(map(repr, allowed))}")
    positive = ("max_steps", "batch_size", "grad_accum", "eval_count", "log_every", "save_every", "sampling_steps",
                "num_frames")
    for field in positive:
        if getattr(config, field) < 1:
            raise ValueError(f"--{field}={getattr(config, field)}: must be at least 1")
    for field in ("lr", "control_lr", "weight_decay", "adam_eps", "grad_clip", "kl_weight", "warmup_steps", "noise_offset",
                  "snr_gamma", "eval_every", "num_threads", "clip_skip", "noise_aug", "frame_chunk"):
        if getattr(config, field) < 0:
            raise ValueError(f"--{field}={getattr(config, field)}: must not be negative")
    if config.control_site and not re.fullmatch(r"conv_in|down_\d+|mid_in|mid_out|block_\d+", config.control_site):
        raise ValueError(f"--control_site={config.control_site!r}: expected conv_in, down_<k>, mid_in, mid_out or "
                         "block_<k> (or '' for the preset's own)")
    if config.lr == 0 and config.control_lr == 0:
        raise ValueError("--lr and --control_lr are both 0: nothing would train")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"--ema_decay={config.ema_decay}: must be in [0, 1)")
    if not 0 <= config.proportion_empty_prompts <= 1:
        raise ValueError(f"--proportion_empty_prompts={config.proportion_empty_prompts}: must be in [0, 1]")
    if not all(0 <= b < 1 for b in config.adam_betas):
        raise ValueError(f"--adam_betas={config.adam_betas}: each must be in [0, 1)")
    if not 0 <= config.conditioning_dropout <= 1:
        raise ValueError(f"--conditioning_dropout={config.conditioning_dropout}: must be in [0, 1]")
    for field in ("video_width", "video_height"):
        if getattr(config, field) <= 0 or getattr(config, field) % 8:
            raise ValueError(f"--{field}={getattr(config, field)}: must be a positive multiple of 8 (the VAE stride)")
    buckets = config.video_buckets
    if not all(isinstance(b, tuple) and len(b) == 2 and all(type(v) is int and v > 0 and v % 8 == 0 for v in b)
               for b in buckets):
        raise ValueError(f"--video_buckets={buckets}: each bucket must be (width, height), positive multiples of 8 "
                         f"(the VAE stride)")
    if len(set(buckets)) < len(buckets):
        raise ValueError(f"--video_buckets={buckets}: a bucket is listed twice")
    if buckets and config.dataset == "fill50k":
        raise ValueError("--video_buckets: the moving-disc toy (--dataset=fill50k) is square; buckets are for clip "
                         "datasets (a meta_info .json or a folder of clip folders)")
    if config.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("--fsdp shards over processes: launch with torchrun --nproc_per_node=N (N >= 2)")
    if config.fsdp and config.mixed_precision == "fp16":
        raise ValueError("--fsdp with --mixed_precision=fp16: use bf16 (no gradient scaler for sharded gradients)")
    if config.resolution <= 0 or config.resolution % 8:
        raise ValueError(f"--resolution={config.resolution}: must be a positive multiple of 8 (the VAE stride)")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda: no CUDA device is available on this machine")
    dataset = Path(config.dataset)
    if config.dataset != "fill50k" and not (dataset.is_dir() or (dataset.suffix == ".json" and dataset.is_file())):
        raise ValueError(f"--dataset={config.dataset}: not 'fill50k', a folder, or a video meta_info .json file")
    if config.stage != "vae" and not Path(config.pretrained).exists():
        raise ValueError(f"--pretrained={config.pretrained}: no such file or folder")
    if config.resume and not Path(config.resume).is_file():
        raise ValueError(f"--resume={config.resume}: no such checkpoint file")


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
