"""Train a control method on a frozen Stable Diffusion (`--stage=control`), or a small SD pipeline's stages.

    python train.py --ablation zero_conv                      # the main job: the miniature SD1.5, fill50k, CPU minutes
    python train.py experiments/sd15_fill50k.py --pretrained=v1-5-pruned-emaonly.safetensors --tokenizer=tokenizer/
    torchrun --nproc_per_node=2 train.py --ablation=cross_norm  # data parallel (gloo on CPU, NCCL on GPU)
    python train.py experiments/sd15_fill50k.py --dry_run     # print the resolved config and exit

Paper: ControlNeXt (Peng et al. 2024, arXiv 2408.06070) §3-4; the recipe is the official SD1.5/SDXL trainers
(dvlab-research/ControlNeXt@ab4b3ac ControlNeXt-SD1.5-Training/train_controlnext.py, ControlNeXt-SDXL-Training;
../shared/reference/controlnext.md §4.1-4.2): VAE latents, CLIP text, DDPM eps/v MSE with uniform t, AdamW with the
control branch at 10x the UNet's learning rate. Ours adds warmup, gradient clipping, EMA, a NaN guard, fp32 master
weights under autocast, and DistributedDataParallel under torchrun. What one step computes is controlnext/stages.py;
the settings are controlnext/config.py (TrainConfig); run folders and checkpoints controlnext/runs.py.
Video: an SVD --pretrained trains ControlNeXt-SVD-v2 (controlnext/video_stages.py; controlnext.md §4.3), on the
moving-disc toy or pose-video clips; `torchrun ... train.py experiments/svd_pose.py --fsdp` shards the full UNet
fine-tune (FSDP, sharded checkpoints: controlnext/parallel.py). An SD3 --pretrained trains through
controlnext/sd3_stages.py (stages.build_stage dispatches both).
Left out: aspect-ratio buckets for images (video has them: --video_buckets), wandb.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from controlnext import cli, parallel
from controlnext.config import RESUMABLE, TrainConfig, check
from controlnext.control_branch import PRESETS as BRANCHES
from controlnext.data import Fill50k, FolderDataset
from controlnext.controlnext import ABLATIONS, PRESETS as INJECTIONS
from controlnext.sampling import SAMPLERS
from controlnext.runs import EMA, RunLog, load_checkpoint, remove_stale_temp_files, save_checkpoint, step_generator
from controlnext.sd_pipeline import PRESETS as MODELS
from controlnext.selection import SELECTIONS
from controlnext.stages import LatentCache, build_stage, cast_frozen, eval_set
from controlnext.video_stages import VideoStage, video_data

NAMES = {"ablation": tuple(ABLATIONS), "sampler": tuple(SAMPLERS), "injection": tuple(INJECTIONS),
         "branch": tuple(BRANCHES), "trainable": tuple(SELECTIONS), "model": tuple(MODELS)}


def read_resume(config: TrainConfig) -> dict | None:
    """The checkpoint --resume names, after checking that it can continue this config (before any work)."""
    if not config.resume:
        return None
    resumed = load_checkpoint(config.resume)
    changed = {k for k, v in cli.to_dict(config).items() if k not in RESUMABLE and resumed["config"].get(k) != v
               and v != "auto"}  # "auto" fields were resolved into the checkpoint's config
    if changed:
        raise ValueError(f"--resume: these fields differ from the checkpoint's config: {sorted(changed)}")
    if config.max_steps < resumed["step"]:
        raise ValueError(f"--max_steps={config.max_steps} is below the checkpoint's step {resumed['step']}")
    return resumed


def restore(resumed: dict, params: dict, optimizer, ema: EMA | None, scaler) -> int:
    """Put a checkpoint's tensors, optimizer, EMA, scaler and RNG state back; returns the step to continue from."""
    if resumed["params"].keys() != params.keys():
        raise ValueError(f"--resume: the checkpoint's tensors do not match this run's trainable ones: "
                         f"{sorted(resumed['params'].keys() ^ params.keys())[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(resumed["params"][name])
    optimizer.load_state_dict(resumed["optimizer"])
    if ema is not None and resumed["ema"] is not None:
        ema.shadow = {k: v.to(next(iter(params.values())).device) for k, v in resumed["ema"].items()}
    if scaler is not None:
        scaler.load_state_dict(resumed["scaler"])
    torch.set_rng_state(resumed["torch_rng"])
    return resumed["step"]


def check_finite(loss: float, params: dict, step: int, last_good: Path | None, log: RunLog) -> None:
    """The NaN guard: stop at a non-finite loss or gradient, before the optimizer step spreads it into the weights."""
    if math.isfinite(loss) and parallel.grads_finite(params):  # FSDP: each rank checks its shards, then agrees
        return
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    log.line(f"step {step} | non-finite loss or gradient ({loss}); stopping: {where}")
    if dist.is_initialized():
        dist.destroy_process_group()
    raise FloatingPointError(f"non-finite loss or gradient at step {step}; {where}")


def grad_norms(stage) -> dict[str, float]:
    """The gradient norm of each parameter group before clipping (the branch's and the UNet's; Fig. 3 diagnostics)."""
    norms = {}
    for group, params in stage.groups.items():
        grads = [p.grad.detach().float().norm() for p in params.values() if p.grad is not None]
        norms[f"grad_norm_{group}"] = torch.stack(grads).norm().item() if grads else 0.0
    return norms


def batch_for(dataset, config: TrainConfig, step: int, micro: int) -> tuple[torch.Generator, dict]:
    """Micro-batch `micro` of `step`: a pure function of (seed, step, micro), so resuming redraws the same batches."""
    g = step_generator(config.seed, step, micro)
    index = torch.randint(len(dataset), (config.batch_size,), generator=g)
    items = [dataset[i] for i in index.tolist()]
    dropped = torch.rand(len(items), generator=g) < config.proportion_empty_prompts
    prompts = [config.empty_prompt if d else it["prompt"] for it, d in zip(items, dropped.tolist())]
    return g, {"image": torch.stack([it["image"] for it in items]), "control": torch.stack([it["control"] for it in items]),
               "prompt": prompts, "index": index, "dropped": dropped}


def main(config: TrainConfig) -> dict:
    """Run the training loop; returns {"run": run folder, "losses": [...], "eval": last metrics}."""
    # --- setup: checks, threads, DDP/FSDP, device, dtype (nothing is written before every check has passed) -------
    check(config, names=NAMES)
    resumed = read_resume(config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    distributed, created, rank, world, device = parallel.setup(config)
    amp_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    # --- models and weights (the stage resolves the "auto" fields from the loaded model) ------------------------
    torch.manual_seed(config.seed)  # identical initialisation on every rank
    stage = build_stage(config)
    config = stage.config
    stage.to(device)
    stage.pipe.unet.gradient_checkpointing = config.gradient_checkpointing
    if (branch := getattr(getattr(stage, "model", None), "branch", None)) is not None:  # ControlNeXt arms' branch
        branch.gradient_checkpointing = config.gradient_checkpointing
    net = parallel.wrap(stage, config, device) if distributed else stage  # before the optimizer: FSDP shards params
    params = stage.trainable()
    if isinstance(stage, VideoStage):  # video (SVD): clips, held-out toy clips, clip batches (video_stages.py)
        dataset, evals, batches = video_data(config)
    else:
        dataset = Fill50k(config.resolution, seed=config.dataset_seed) if config.dataset == "fill50k" else \
            FolderDataset(config.dataset, config.resolution)
        evals, batches = eval_set(config), batch_for

    # --- run folder and logs (rank 0; with FSDP every rank writes its checkpoint shards there) -----------------------
    run = parallel.run_folder(config, resumed, rank)
    log = RunLog(None if rank else run, write=tqdm.write)
    if rank == 0:
        (run / "config.json").write_text(cli.dumps(config))
        for path in remove_stale_temp_files(run):
            log.line(f"removed {path.name}, left by an interrupted checkpoint write")
    total = sum(p.numel() for p in stage.parameters())
    log.line(f"run {run} | {world} process(es) on {device} | stage {config.stage} | {config.pretrained}")
    log.line(f"trainable {sum(p.numel() for p in params.values()):,} of {total:,} parameters ({len(params)} tensors)")
    if config.cache_latents and config.dataset != "fill50k":
        stage.cache = LatentCache.build(stage.pipe, dataset, run / "latent_cache.safetensors", config.empty_prompt,
                                        config.clip_skip)

    # --- optimizer ------------------------------------------------------------------------------------------------
    if amp_dtype is not None and not config.fsdp:  # frozen tensors in the compute dtype, trained ones fp32 masters
        cast_frozen(stage, amp_dtype)  # (after the cache; FSDP casts through its MixedPrecisionPolicy instead)
    if config.compile:
        stage.compile_networks()
    optimizer = torch.optim.AdamW(stage.param_groups(), betas=config.adam_betas, eps=config.adam_eps,
                                  weight_decay=config.weight_decay, fused=True)  # one kernel: 3x the CPU for-loop
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    ema = EMA(params, config.ema_decay) if config.ema_decay else None
    start = 0
    if resumed:
        start = parallel.restore_sharded(resumed, net, params, optimizer, ema) if config.fsdp else \
            restore(resumed, params, optimizer, ema, scaler)
    log.resume_at(start)  # a resumed run keeps its metric rows up to the checkpoint

    def log_eval(step: int) -> dict:  # the fixed held-out set, fixed noise: curves comparable across runs
        with parallel.gathered(net), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                    enabled=amp_dtype is not None):  # FSDP: every rank evaluates
            metrics, controls, images = stage.evaluate(evals, torch.Generator().manual_seed(config.eval_seed))
        log.eval(step, metrics, controls, images)
        return metrics

    # --- loop -------------------------------------------------------------------------------------------------------
    losses, metrics, last_good = [], {}, (Path(config.resume) if resumed else None)
    evaluates = rank == 0 or config.fsdp
    if evaluates and start == 0 and config.eval_every and not config.fsdp:  # the start (zero_conv: the base exactly);
        metrics = log_eval(0)  # FSDP sets its units up in the first forward, so its first evaluation comes later
    stage.train()
    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, disable=rank or not config.progress)
    tic = time.time()
    for step in bar:
        for group in optimizer.param_groups:  # linear warmup, then constant
            group["lr"] = group["base_lr"] * min(1.0, (step + 1) / max(1, config.warmup_steps))
        step_loss = 0.0
        for k in range(config.grad_accum):
            g, batch = batches(dataset, config, step, rank * config.grad_accum + k)
            with parallel.gradient_sync(net, k == config.grad_accum - 1):  # ranks average on the last micro-batch
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = net(batch, g)
                (scaler.scale(loss / config.grad_accum) if scaler else loss / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
        step_loss = parallel.mean_over_ranks(step_loss, device) if distributed else step_loss
        if scaler:
            scaler.unscale_(optimizer)
        check_finite(step_loss, params, step + 1, last_good, log)
        logged = rank == 0 and (step + 1) % config.log_every == 0
        diagnostics = {**grad_norms(stage), **stage.diagnostics(batch, g)} if logged else {}
        if config.grad_clip:
            parallel.clip_grad_norm(params, config.grad_clip)  # FSDP: on the local shards
        (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(params, step)
        losses.append(step_loss)
        done = step + 1
        if rank == 0:
            log.row(step=done, loss=step_loss, lr=optimizer.param_groups[0]["lr"], **diagnostics)
            if done % config.log_every == 0 or done == config.max_steps:
                rate = (done - start) / (time.time() - tic)
                mem = f" | {torch.cuda.max_memory_allocated() / 2**30:.1f} GB" if device.type == "cuda" else ""
                log.line(f"step {done} | loss {step_loss:.4f} | lr {optimizer.param_groups[0]['lr']:.1e} | "
                         f"{rate:.2f} it/s{mem}")
        if done % config.save_every == 0 or done == config.max_steps:  # before the eval: an eval error loses nothing
            last_good = parallel.save(run, done, net, params, ema, optimizer, scaler, cli.to_dict(config)) \
                if distributed else save_checkpoint(run, done, params, ema, optimizer, scaler, cli.to_dict(config))
        if evaluates and ((config.eval_every and done % config.eval_every == 0) or done == config.max_steps):
            stage.eval()
            metrics = log_eval(done)
            stage.train()

    # --- save ---------------------------------------------------------------------------------------------------------
    exported = stage.export(run, ema) if rank == 0 else None  # base / vae stages: the pipeline as one single file
    if exported:
        log.line(f"wrote {exported} (EMA weights, fp16) and its tokenizer/")
    if rank == 0:
        log.line(f"done: {config.max_steps - start} steps in {time.time() - tic:.0f} s")
    if created:  # a process group the caller made stays for the caller
        dist.destroy_process_group()
    return {"run": run, "losses": losses, "eval": metrics}


if __name__ == "__main__":
    try:
        config, dry_run = cli.parse_args(TrainConfig, sys.argv[1:])
        if dry_run:
            check(config, names=NAMES)
            print(cli.dumps(config))
            sys.exit(0)
        main(config)
    except ValueError as e:  # bad input: one clear line, no traceback (STYLE.md §10)
        sys.exit(f"train.py: {e}")
