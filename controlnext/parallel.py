"""Training over processes (torchrun) for train.py: DDP or FSDP, the run folder every rank needs, sharded checkpoints.

- DDP (torch.nn.parallel.DistributedDataParallel): every rank holds the whole model, gradients are averaged. The
  default, and the right tool for the small trainable selections (a branch plus the to_out tensors).
- FSDP (torch.distributed.fsdp.fully_shard, "FSDP2"; Zhao et al. 2023, "PyTorch FSDP", §3-4), full shard (ZeRO-3):
  each UNet block (every down block, the mid block, every up block) is one unit and the rest of the stage
  (embeddings, conv_in/out, the control branch, the frozen VAE and image tower) the root unit. Parameters, gradients
  and AdamW states live as 1/N shards (DTensors); a unit is all-gathered for its forward and again for its backward,
  and freed after; gradients are reduce-scattered (averaged over ranks). --mixed_precision=bf16 adds a
  MixedPrecisionPolicy: bf16 all-gathers and compute, fp32 gradient reduction, the fp32 shards as master weights.
  Activation checkpointing is --gradient_checkpointing (the UNet's block loop, unet/sd_unet.py UNetBody._run, and
  the ControlNeXt branch's stages, control_branch.py ControlNeXt._run): it
  recomputes one FSDP unit at a time. This is what the full SVD UNet fine-tune needs: 1.5B parameters with fp32
  gradients and AdamW states are 24 GB before any activation.
- Sharded checkpoints (torch.distributed.checkpoint, DCP), beside runs.py's files: step_N.dcp/ holds every rank's
  shards of the trainable tensors, the optimizer state and the EMA; step_N.safetensors (+ _ema) the gathered trainable
  tensors, written by rank 0 (what sample.py reads); step_N.pt the step, RNG state and config with `sharded`, written
  last. A resume loads the shards into the freshly sharded model; DCP reshards, so the rank count may change.
Reference: the PyTorch 2.6+ documentation of fully_shard, MixedPrecisionPolicy and torch.distributed.checkpoint
(get_optimizer_state_dict / set_optimizer_state_dict). Left out: FSDP1, hybrid sharding, CPU offload, FSDP for the
SD stages (ControlStage trains small selections: DDP).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from controlnext.config import TrainConfig
from controlnext.runs import checkpoint_paths, make_run_dir, save_checkpoint
from controlnext.checkpoint import save_state, save_torch
from controlnext.video_stages import VideoStage


def setup(config: TrainConfig) -> tuple[bool, bool, int, int, torch.device]:
    """(distributed, created, rank, world size, device): the process group under torchrun (NCCL on GPU, gloo on
    CPU), created here unless the caller made one (then the caller also destroys it: `created` is False)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    created = distributed and not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)  # FSDP's default device mesh is built on the current device
    return distributed, created, rank, world, device


def wrap(stage: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """DDP around the stage, or (--fsdp) the stage sharded in place; call it before reading the trainable tensors."""
    if not config.fsdp:
        return DistributedDataParallel(stage, device_ids=[device.index] if device.type == "cuda" else None)
    if not isinstance(stage, VideoStage):
        raise ValueError("--fsdp shards the SVD video stage (the full UNet fine-tune); the SD stages train small "
                         "selections: leave --fsdp off (DDP)")
    bf16 = config.mixed_precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    unet = stage.pipe.unet
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:  # one unit per block, as the checkpointing
        fully_shard(block, mp_policy=policy)
    fully_shard(stage, mp_policy=policy)  # the root unit: everything else
    return stage


def gradient_sync(net: nn.Module, sync: bool):
    """Gradient accumulation: average over ranks on the last micro-batch only (DDP no_sync / FSDP's switch)."""
    if isinstance(net, FSDPModule):
        net.set_requires_gradient_sync(sync)
        return nullcontext()
    return net.no_sync() if isinstance(net, DistributedDataParallel) and not sync else nullcontext()


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The logged loss: the mean over ranks (the gradients were averaged by DDP / FSDP)."""
    total = torch.tensor(value, device=device)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


@contextmanager
def gathered(net: nn.Module):
    """FSDP: the root unit's parameters gathered for a call outside forward (evaluation); the block units gather on
    their own. Every rank must enter it. Needs one forward through the root first (FSDP sets its units up lazily)."""
    if not isinstance(net, FSDPModule):
        yield
        return
    net.unshard()
    try:
        yield
    finally:
        net.reshard()


def run_folder(config: TrainConfig, resumed: dict | None, rank: int) -> Path | None:
    """The run folder, made by rank 0 (a resumed run's own); FSDP: every rank gets it, to write its shards there."""
    run = Path(config.resume).parent.parent if resumed else None
    if rank == 0 and run is None:
        run = make_run_dir(config.out_dir, config.experiment or (config.ablation if config.stage == "control"
                                                                 else config.stage))
    if config.fsdp:
        shared = [str(run) if run else None]
        dist.broadcast_object_list(shared, src=0)
        run = Path(shared[0])
    return run


def grads_finite(params: dict) -> bool:
    """Every gradient finite on every rank: each rank checks its own shards (FSDP) and one all-reduce agrees."""
    local = all(torch.isfinite(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).all()
                for p in params.values() if p.grad is not None)
    if not dist.is_initialized():
        return bool(local)
    flag = torch.tensor(float(local))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def clip_grad_norm(params: dict, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_; with FSDP on the local shards: the squared norms of every rank's shards
    all-reduced into the global norm, then each rank scales its own shards (the same coefficient everywhere)."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
    local = [g.to_local() for g in grads]
    squares = torch.stack([torch.linalg.vector_norm(g.float()) for g in local]).square().sum()
    dist.all_reduce(squares)  # FSDP shards are disjoint (Shard(0)): the sum over ranks is the whole norm
    total = squares.sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule
    for g in local:
        g.mul_(coefficient.to(g.dtype))
    return total


def gathered_tensors(shards: Path, group: str) -> dict[str, torch.Tensor]:
    """The whole tensors of one group ("params", "ema") of a sharded checkpoint, read by one process from the shard
    files (no collectives)."""
    reader = dcp.FileSystemReader(shards)
    stored = reader.read_metadata().state_dict_metadata
    tensors = {key.split(".", 1)[1]: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in stored.items() if key.startswith(group + ".")}
    with warnings.catch_warnings():  # DCP warns that it reads without the process group: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({group: tensors}, storage_reader=reader, no_dist=True)
    return tensors


def save(run: Path | None, step: int, net: nn.Module, params: dict, ema, optimizer, scaler,
         config: dict) -> Path | None:
    """A training checkpoint: runs.save_checkpoint on rank 0, or (FSDP) sharded on every rank (module docstring).
    Returns the .pt path --resume takes (None on ranks that wrote nothing)."""
    rank = dist.get_rank()
    if not isinstance(net, FSDPModule):
        return save_checkpoint(run, step, params, ema, optimizer, scaler, config) if rank == 0 else None
    tensors_path, ema_path, state_path = checkpoint_paths(run, step)
    shards = state_path.with_suffix(".dcp")
    staging = shards.with_name(f".{shards.name}.tmp")  # renamed into place by rank 0 once every rank has written
    if rank == 0 and staging.exists():
        shutil.rmtree(staging)
    dist.barrier()
    dcp.save({"params": params, "optimizer": get_optimizer_state_dict(net, optimizer),
              "ema": ema.shadow if ema is not None else {}}, checkpoint_id=staging)
    dist.barrier()
    if rank == 0:
        meta = {"step": str(step), "config": json.dumps(config)}
        save_state(gathered_tensors(staging, "params"), tensors_path, metadata=meta)
        if ema is not None:
            save_state(gathered_tensors(staging, "ema"), ema_path, metadata=meta)
        if shards.exists():
            shutil.rmtree(shards)
        os.replace(staging, shards)
        save_torch({"step": step, "sharded": True, "optimizer": None, "scaler": None,
                    "torch_rng": torch.get_rng_state(), "config": json.dumps(config)}, state_path)
    dist.barrier()
    return state_path


def restore_sharded(resumed: dict, net: nn.Module, params: dict, optimizer, ema) -> int:
    """Load a sharded checkpoint's shards into the sharded model, optimizer and EMA; returns the step to go on from."""
    reader = dcp.FileSystemReader(resumed["shards"])
    stored = {k.split(".", 1)[1] for k in reader.read_metadata().state_dict_metadata if k.startswith("params.")}
    if stored != set(params):
        raise ValueError(f"--resume: the checkpoint's tensors do not match this run's trainable ones: "
                         f"{sorted(stored ^ set(params))[:5]}")
    state = {"params": params, "optimizer": get_optimizer_state_dict(net, optimizer),
             "ema": ema.shadow if ema is not None else {}}
    dcp.load(state, storage_reader=reader)
    set_optimizer_state_dict(net, optimizer, state["optimizer"])
    torch.set_rng_state(resumed["torch_rng"])
    return resumed["step"]
