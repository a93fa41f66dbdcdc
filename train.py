"""Train a control method on a frozen base (`--stage=control`) or the toy base itself (`--stage=base`).

    python train.py --ablation zero_conv                      # the main job: ~5 min on 2 CPU cores, fill50k toy
    python train.py experiments/toy_base.py                   # the toy base (prompt only), ~30 min on CPU
    torchrun --nproc_per_node=2 train.py --ablation=cross_norm  # data parallel (gloo on CPU, NCCL on GPU)
    python train.py experiments/sd15_fill50k.py --dry_run     # print the resolved config and exit

Paper: ControlNeXt (Peng et al. 2024, arXiv 2408.06070) §3-4; the recipe is the official SD1.5 trainer
(dvlab-research/ControlNeXt@ab4b3ac ControlNeXt-SD1.5-Training/train_controlnext.py; ../shared/reference/controlnext.md
§4.1): DDPM epsilon MSE with uniform t, AdamW, the control branch at 10x the UNet's learning rate. Ours adds warmup,
gradient clipping, EMA, a NaN guard and fp32 master weights under autocast. The default task is procedural fill50k
at 64 px with a pixel space-to-depth "latent" (stride 8, like SD's VAE) and the TOY UNet (experiments/weights/).
Left out here: loading SD1.5/SDXL/SVD weights, VAE and CLIP encoding (a later issue adds those recipes).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from controlnext import cli
from controlnext.checkpoint import load_into, read_state, save_state, strip_prefix
from controlnext.control_branch import PRESETS as BRANCHES
from controlnext.data import VOCAB, Fill50k, FolderDataset, fill50k_example
from controlnext.controlnext import PRESETS as INJECTIONS, build_controlled_unet
from controlnext.metrics import fill50k_metrics
from controlnext.sampling import cfg_denoiser, decode_pixels, encode_pixels, generate
from controlnext.selection import select_trainable
from controlnext.training import (EMA, RunLog, load_checkpoint, loss_weight_map, make_run_dir, save_checkpoint,
                                  save_grid, save_plot, step_generator)
from encoders.toy_text import PRESETS as TEXT_ENCODERS, ToyTextEncoder
from schedulers.sigmas import PRESETS as SCHEDULES, make_alphas_cumprod
from schedulers.training import sd_training_noise
from unet.sd_unet import PRESETS as UNETS, UNet


# --- config -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    # what to train
    stage: str = "control"             # "control": a method on the frozen base; "base": the toy UNet + text encoder
    ablation: str = "cross_norm"       # controlnext/controlnext.py: cross_norm zero_conv no_norm paper_norm controlnet
    trainable: str = "to_out"          # UNet tensors trained with the branch (selection.py): none to_out ... lora:R
    injection: str = "sd15_train"      # controlnext.py preset: site, eps, pool order (official SD1.5-Training)
    control_scale: float = 1.0         # k on the added control term while training (official SD1.5 default 1.0)
    # models
    unet: str = "toy"                  # unet/sd_unet.py PRESETS name
    text_encoder: str = "toy"          # encoders/toy_text.py PRESETS name
    branch: str = "tiny"               # control_branch.py PRESETS name (its out_channels = the UNet width at the site)
    base_weights: str = "experiments/weights/toy_base.safetensors"  # unet.* + text_encoder.*; "" = random (base stage)
    latent_factor: int = 8             # toy codec: pixel space-to-depth by this factor (8 = SD's VAE stride)
    schedule: str = "toy"              # noise schedule preset (schedulers/sigmas.py PRESETS): toy = DDPM linear, x0
    # data
    dataset: str = "fill50k"           # "fill50k" (procedural) or a folder with prompt.json / metadata.jsonl
    resolution: int = 64               # pixels, multiple of 8
    dataset_seed: int = 0              # procedural fill50k stream
    proportion_empty_prompts: float = 0.0  # prompt -> empty_prompt with this probability (official flag)
    empty_prompt: str = ""             # official SD1.5 trainer uses the literal "PBH"
    loss_weight_control: float = 1.0  # per-pixel loss weight where the condition is lit (1 = plain MSE)
    # optimisation (official SD1.5: AdamW, lr 1e-5, branch 1e-4, betas (0.9, 0.999), wd 1e-2, eps 1e-8)
    max_steps: int = 400               # optimizer steps (toy: ~5 min on 2 CPU cores)
    batch_size: int = 32               # per process and micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    lr: float = 3e-4                   # UNet tensors (base stage: everything); toy: 1e-4 and 1e-3 both learn slower
    control_lr: float = 3e-3           # control branch (official: 10x lr)
    warmup_steps: int = 50             # linear warmup, then constant
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0             # max global grad norm; 0 = off (the official SD1.5 trainer has it off)
    ema_decay: float = 0.99            # EMA of the trainable tensors; 0 = off
    mixed_precision: str = "no"        # "no" | "bf16" | "fp16" (autocast; fp32 master weights)
    gradient_checkpointing: bool = False
    # evaluation: fixed held-out procedural set, fixed sampler and noise
    eval_every: int = 100              # steps (and step 0); also writes samples/ and plot.png; 0 = only at the end
    eval_count: int = 32               # held-out examples (fill50k, seed eval_seed)
    eval_seed: int = 1
    sampler: str = "dpmpp_2m"          # controlnext/sampling.py SAMPLERS
    sampling_steps: int = 10
    guidance_scale: float = 2.0        # classifier-free guidance (needs a base trained with empty prompts)
    # bookkeeping
    experiment: str = ""               # run folder name; "" = "toy_<ablation>" or "toy_base"
    out_dir: str = "runs"
    log_every: int = 10
    save_every: int = 250              # checkpoint period (and one at the end)
    seed: int = 0
    device: str = "auto"               # "auto" | "cpu" | "cuda"
    num_threads: int = 1               # torch CPU threads (toy-sized ops gain little from more and lose badly on
                                       # shared cores: 0.7 vs 2.3 it/s measured); 0 = torch's default
    resume: str = ""                   # a checkpoint .pt to continue from, in its own run folder
    inject_nan_at: int = -1            # tests: poison the loss at this step to exercise the NaN guard
    progress: bool = True              # tqdm bar


# Fields that may change when resuming (they do not change the math of the steps already taken).
RESUMABLE = {"max_steps", "resume", "eval_every", "log_every", "save_every", "progress", "device", "num_threads",
             "experiment", "out_dir", "inject_nan_at"}


def main(config: TrainConfig) -> dict:
    """Run the training loop; returns {"run": run folder, "losses": [...], "eval": last metrics}."""
    # --- setup: threads, DDP, device, dtype -----------------------------------------------------------------------
    if config.stage not in ("base", "control"):
        raise ValueError(f"stage must be 'base' or 'control', got {config.stage!r}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {config.schedule!r}; expected one of {sorted(SCHEDULES)}")
    if config.unet not in UNETS or config.text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"unknown unet {config.unet!r} or text_encoder {config.text_encoder!r}; this trainer runs "
                         f"the toy text encoders {sorted(TEXT_ENCODERS)} (SD1.5/SDXL weights: a later issue)")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    amp_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    torch.manual_seed(config.seed + rank)  # per-rank seed (module init is seeded identically below)

    resumed = load_checkpoint(config.resume) if config.resume else None
    if resumed:
        changed = {k for k, v in cli.to_dict(config).items() if resumed["config"].get(k) != v} - RESUMABLE
        if changed:
            raise ValueError(f"--resume: these fields differ from the checkpoint's config: {sorted(changed)}")
    run = Path(config.resume).parent.parent if resumed else None
    if rank == 0 and run is None:
        run = make_run_dir(config.out_dir, config.experiment or ("toy_base" if config.stage == "base"
                                                                  else f"toy_{config.ablation}"))
    log = RunLog(None if rank else run, write=tqdm.write)
    if rank == 0:
        (log.run / "config.json").write_text(cli.dumps(config))
    log.line(f"run {run} | {world} process(es) on {device} | stage {config.stage}")

    # --- models and weights -------------------------------------------------------------------------------------
    torch.manual_seed(config.seed)  # identical initialisation on every rank
    unet = UNet(UNETS[config.unet])
    unet.gradient_checkpointing = config.gradient_checkpointing
    text_encoder = ToyTextEncoder(TEXT_ENCODERS[config.text_encoder], VOCAB)
    if config.base_weights:
        base = read_state(config.base_weights)
        load_into(unet, strip_prefix(base, "unet."), what=f"UNet from {config.base_weights}")
        load_into(text_encoder, strip_prefix(base, "text_encoder."), what=f"text encoder from {config.base_weights}")
    elif config.stage == "control":
        raise ValueError("the control stage needs base_weights (a trained base: experiments/weights/)")
    if config.stage == "base":
        model = unet
        groups = {"unet": dict(unet.named_parameters()), "text_encoder": dict(text_encoder.named_parameters())}
        params = {f"{g}.{n}": p for g, named in groups.items() for n, p in named.items()}
        param_groups = [{"params": list(params.values()), "lr": config.lr}]
    else:
        text_encoder.requires_grad_(False)
        model = build_controlled_unet(config.ablation, unet, BRANCHES[config.branch], INJECTIONS[config.injection])
        control = model.control_parameters()
        unet_params = {f"unet.{n}": p for n, p in select_trainable(unet, config.trainable).items()}
        params = {**control, **unet_params}
        param_groups = [{"params": list(control.values()), "lr": config.control_lr},
                        {"params": list(unet_params.values()), "lr": config.lr}]
    model.to(device)
    text_encoder.to(device)
    ema = EMA(params, config.ema_decay) if config.ema_decay else None
    log.line(f"trainable {sum(p.numel() for p in params.values()):,} of "
             f"{sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in text_encoder.parameters()):,} "
             f"parameters ({len(params)} tensors)")

    # --- data --------------------------------------------------------------------------------------------------
    schedule = SCHEDULES[config.schedule]
    alphas_cumprod = make_alphas_cumprod(schedule).to(device)
    dataset = (Fill50k(config.resolution, seed=config.dataset_seed) if config.dataset == "fill50k"
               else FolderDataset(config.dataset, config.resolution))
    evals = [fill50k_example(i, config.resolution, config.eval_seed) for i in range(config.eval_count)]

    def batch_for(step: int, micro: int) -> tuple[torch.Generator, dict]:
        g = step_generator(config.seed, step, micro)
        items = [dataset[i] for i in torch.randint(len(dataset), (config.batch_size,), generator=g).tolist()]
        prompts = [config.empty_prompt if drop else it["prompt"] for it, drop in
                   zip(items, (torch.rand(len(items), generator=g) < config.proportion_empty_prompts).tolist())]
        return g, {"image": torch.stack([it["image"] for it in items]), "prompt": prompts,
                   "control": torch.stack([it["control"] for it in items])}

    # --- optimizer ---------------------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(param_groups, betas=config.adam_betas, eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    start = 0
    if resumed:
        if resumed["params"].keys() != params.keys():
            raise ValueError(f"--resume: the checkpoint's tensors do not match this run's trainable ones: "
                             f"{sorted(resumed['params'].keys() ^ params.keys())[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(resumed["params"][name])
        optimizer.load_state_dict(resumed["optimizer"])
        if ema is not None and resumed["ema"] is not None:
            ema.shadow = {k: v.to(device) for k, v in resumed["ema"].items()}
        if scaler is not None:
            scaler.load_state_dict(resumed["scaler"])
        torch.set_rng_state(resumed["torch_rng"])
        start = resumed["step"]
        log.line(f"resumed from {config.resume} at step {start}")

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        model.eval()
        prompts = [e["prompt"] for e in evals]
        context = text_encoder(prompts)
        uncond = text_encoder([config.empty_prompt] * len(prompts))
        controls = torch.stack([torch.from_numpy(e["control"]).permute(2, 0, 1).float() / 255 for e in evals]).to(device)
        denoiser = cfg_denoiser(unet, schedule, context, uncond, config.guidance_scale,
                                () if config.stage == "base" else [(model, controls, config.control_scale)])
        f, r = config.latent_factor, config.resolution
        latents = generate(denoiser, (len(evals), 3 * f * f, r // f, r // f), schedule, config.sampler,
                           config.sampling_steps, torch.Generator().manual_seed(config.eval_seed), device)
        images = decode_pixels(latents, f).cpu()
        metrics = fill50k_metrics(images, torch.from_numpy(np.stack([e["disc"] for e in evals])),
                                  [e["circle_rgb"] for e in evals], [e["background_rgb"] for e in evals])
        save_grid(log.run / "samples" / f"step_{step:06d}.png", controls[:16].cpu(), images[:16])
        model.train()
        return metrics

    history = {"loss": [], "iou": [], "palette_error": []}  # for plot.png; a resumed run keeps its rows up to `start`
    if resumed and rank == 0:
        rows = [r for r in log.read_rows() if r["step"] <= start]
        log.rewrite_rows(rows)  # drop rows a stopped run logged after its last checkpoint
        for name in history:
            history[name] = [(r["step"], r[name]) for r in rows if name in r]

    def log_eval(step: int) -> dict:
        metrics = evaluate(step)
        log.row(step=step, **metrics)
        history["iou"].append((step, metrics["iou"]))
        history["palette_error"].append((step, metrics["palette_error"]))
        log.line(f"step {step} | eval | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        save_plot(log.run / "plot.png", history)
        return metrics

    # --- loop --------------------------------------------------------------------------------------------------
    model.train()
    losses, metrics, last_good = [], {}, (Path(config.resume) if resumed else None)
    if rank == 0 and start == 0 and config.eval_every:  # where training starts from (zero_conv: the base exactly)
        metrics = log_eval(0)
    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, disable=rank or not config.progress)
    tic = time.time()
    for step in bar:
        for group in optimizer.param_groups:  # linear warmup, then constant
            group["lr"] = group["base_lr"] * min(1.0, (step + 1) / max(1, config.warmup_steps))
        step_loss = 0.0
        for k in range(config.grad_accum):
            g, batch = batch_for(step, rank * config.grad_accum + k)
            x0 = encode_pixels(batch["image"].to(device), config.latent_factor)  # (B, 3 f^2, H/f, W/f)
            x_t, t, target = sd_training_noise(x0.cpu(), alphas_cumprod.cpu(), schedule.prediction_type, generator=g)
            x_t, t, target = x_t.to(device), t.to(device), target.to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                with torch.set_grad_enabled(config.stage == "base"):
                    context = text_encoder(batch["prompt"])  # (B, L, D)
                if config.stage == "base":
                    pred = model(x_t, t, context)
                else:
                    pred = model(x_t, t, context, batch["control"].to(device), scale=config.control_scale)
            err = (pred.float() - target).square()  # (B, C, h, w)
            weight = loss_weight_map(batch["control"], config.loss_weight_control, config.latent_factor)
            loss = (err * weight.to(device)).mean() if weight is not None else err.mean()
            if step == config.inject_nan_at:
                loss = loss * float("nan")
            (scaler.scale(loss / config.grad_accum) if scaler else loss / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
        grads = [p.grad for p in params.values() if p.grad is not None]
        if distributed:  # data parallel: average the gradients over ranks (what DDP does, without bucketing)
            for grad in grads:
                dist.all_reduce(grad)
                grad /= world
            step_loss = torch.tensor(step_loss).to(device)
            dist.all_reduce(step_loss)
            step_loss = step_loss.item() / world
        if scaler:
            scaler.unscale_(optimizer)
        if not math.isfinite(step_loss) or not all(torch.isfinite(g_).all() for g_ in grads):  # the NaN guard
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            log.line(f"step {step + 1} | non-finite loss or gradient ({step_loss}); stopping: {where}")
            if distributed:
                dist.destroy_process_group()
            raise FloatingPointError(f"non-finite loss or gradient at step {step + 1}; {where}")
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
        (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(params)
        losses.append(step_loss)
        done = step + 1

        if rank == 0:
            log.row(step=done, loss=step_loss, lr=optimizer.param_groups[0]["lr"])
            history["loss"].append((done, step_loss))
            if done % config.log_every == 0 or done == config.max_steps:
                rate = (done - start) / (time.time() - tic)
                mem = f" | {torch.cuda.max_memory_allocated() / 2**30:.1f} GB" if device.type == "cuda" else ""
                log.line(f"step {done} | loss {step_loss:.4f} | lr {optimizer.param_groups[0]['lr']:.1e} | "
                         f"{rate:.2f} it/s{mem}")
            if (config.eval_every and done % config.eval_every == 0) or done == config.max_steps:
                metrics = log_eval(done)
            if done % config.save_every == 0 or done == config.max_steps:
                last_good = save_checkpoint(log.run, done, params, ema, optimizer, scaler, cli.to_dict(config))

    # --- save --------------------------------------------------------------------------------------------------
    if rank == 0 and config.stage == "base":  # the base weights file: EMA (or live) UNet + text encoder
        final = ema.shadow if ema is not None else {k: p.detach() for k, p in params.items()}
        save_state({k: v.float().contiguous().cpu() for k, v in final.items()}, log.run / "base_weights.safetensors")
        log.line(f"wrote {log.run / 'base_weights.safetensors'}")
    if rank == 0:
        log.line(f"done: {config.max_steps - start} steps in {time.time() - tic:.0f} s")
    if distributed:
        dist.destroy_process_group()
    return {"run": run, "losses": losses, "eval": metrics}


if __name__ == "__main__":
    import train  # experiment files import `train.TrainConfig`; use that class, not this __main__ copy of it
    config, dry_run = cli.parse_args(train.TrainConfig, sys.argv[1:])
    if dry_run:
        print(cli.dumps(config))
        sys.exit(0)
    train.main(config)
