"""Benchmark: one training step (forward, backward, AdamW) of each control method at the full SD1.5 config.

Question (issue 17): what does a researcher pay per step? ControlNeXt's claim is a cheaper step than ControlNet's
(paper §1, §4.1: fewer trainable parameters, less memory). Goals, same run: ControlNeXt <= 0.55x ControlNet's time and
<= 0.5x its peak memory; our ControlNet <= 1.0x diffusers' ControlNetModel + UNet2DConditionModel on the same weights.
Command (CPU, the recorded rows; one process per dtype, the full fine-tune in its own because of its 10 GB of state):
    python experiments/bench_train.py --dtype=fp32
    python experiments/bench_train.py --dtype=bf16
    python experiments/bench_train.py --dtype=fp32 --arms="('controlnext', 'full')"
    python experiments/bench_train.py --dtype=bf16 --arms="('controlnext', 'full')"
    python experiments/bench_train.py --isolated=controlnet      # one arm alone: the whole process's peak RSS
    python experiments/bench_train.py --compile --arms="('controlnext',)" --batches="(2,)" --checkpointing="(False,)"
    python experiments/bench_train.py --dtype=bf16 --size=512 --saved    # bytes kept for backward, no timing
GPU rows:  python experiments/bench_train.py --device=cuda --dtype=bf16 --size=512 --threads=0
Method: the SD1.5 pipeline (UNet, VAE, CLIP-L) with random weights, 256 px images (32x32 latents), 77 text tokens.
Arms: `controlnext` = stages.ControlStage as train.py runs it (G2 branch at down_0, cross_norm, the UNet's to_out
trained); `controlnext_attn2` the same with attn2_to_out (the SDXL recipe); `controlnext_encode` = `controlnext`
without the latent cache (the VAE encode and CLIP text encode in every step); `controlnet` = our ControlNet with the
UNet frozen (the usual ControlNet recipe); `diffusers_controlnet` = diffusers' ControlNetModel + UNet2DConditionModel
holding the very same Parameter objects (so no extra memory), the same loss; `full` = the whole UNet trained with the
branch (the official SVD-v2 recipe, ControlNeXt-F). Every arm runs at each (batch, checkpointing) setting, in an
alternating order per round; each step is timed on the process CPU clock by default (2 shared cores: CPU time leaves
out the waiting for a core; `--clock=wall` on an idle machine), split into forward / backward / optimizer. Under bf16
the frozen tensors of the arm are stored in bf16 and the trainable ones in fp32 (stages.cast_frozen), the step under
autocast, as train.py does. Memory: the arm's resident weights (pipeline + its control module, as stored) + its
AdamW state (exact byte counts) + the step's transient high-water mark (gradients, activations, temporaries) from the
OS: the peak RSS is reset (/proc/self/clear_refs) after glibc has returned freed memory (malloc_trim), then read back
(VmHWM). `--isolated` runs one arm alone in a fresh process and reports its whole peak RSS (ru_maxrss) over the
interpreter's baseline, to check that accounting. `--saved` times nothing: it counts the bytes each arm's forward
keeps for backward (autograd's saved tensors, by module; checkpointing off and on), what checkpointing can remove.
diffusers is a benchmark-only import, and only for its arm.
"""

import argparse
import ast
import ctypes
import os
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from controlnext.config import TrainConfig
from controlnext.data import fill50k_tokenizer
from controlnext.sd_pipeline import PRESETS as MODELS, RELEASED, StableDiffusion
from controlnext.stages import ControlStage, LatentCache
from schedulers.training import sd_training_noise
from unet.keymap import unet_config_to_diffusers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `flops` beside this file, whatever the cwd
import flops  # noqa: E402

ARMS = ("controlnext", "controlnext_attn2", "controlnext_encode", "controlnet", "diffusers_controlnet")
ALL_ARMS = (*ARMS, "full")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GiB = 2**30


def rss_bytes(field: str = "VmRSS") -> int:
    """The process's resident set (or its high-water mark, VmHWM) from /proc, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Return freed heap memory to the OS, then reset the peak RSS to the current RSS; returns that RSS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return rss_bytes()


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def stage_config(**fields) -> TrainConfig:
    return replace(TrainConfig(), **fields)


def fake_cache(n: int, context_dim: int, latent: int) -> LatentCache:
    """A latent cache of n items (VAE posterior moments, text embeddings) with random values."""
    g = torch.Generator().manual_seed(1)
    return LatentCache(Path("unused"), {
        "mean": torch.randn(n, 4, latent, latent, generator=g),
        "std": 0.05 * torch.rand(n, 4, latent, latent, generator=g),
        "context": torch.randn(n, 77, context_dim, generator=g), "pooled": torch.zeros(n, 0),
        "empty_context": torch.randn(1, 77, context_dim, generator=g), "empty_pooled": torch.zeros(1, 0)})


class Arm:
    """One training setup: its forward (batch, generator) -> loss, trainable tensors, optimizer and control module."""

    def __init__(self, name: str, forward, params: list[nn.Parameter], own: nn.Module | None, optimizer,
                 set_checkpointing):
        self.name, self.forward, self.params, self.own, self.optimizer = name, forward, params, own, optimizer
        self.set_checkpointing = set_checkpointing


RECIPES = {"controlnext": ("cross_norm", "to_out"), "controlnext_attn2": ("cross_norm", "attn2_to_out"),
           "controlnext_encode": ("cross_norm", "to_out"), "controlnet": ("controlnet", "none"),
           "full": ("cross_norm", "all")}  # arm -> (--ablation, --trainable); diffusers' arm is the controlnet one
# arm -> flops.step_flops(ablation, trainable, site): the VAE + text encode of controlnext_encode is not counted
FLOP_ROWS = {**{name: (*recipe, "") for name, recipe in RECIPES.items()}, "diffusers_controlnet": ("controlnet", "none", "")}


def build_arms(names: tuple[str, ...], model: str, size: int, device: torch.device, fused: bool
               ) -> tuple[StableDiffusion, dict[str, Arm], nn.Module]:
    """The pipeline with random weights and each requested arm on it (all sharing the pipeline's tensors)."""
    torch.manual_seed(0)
    config = RELEASED["sd1"] if model == "sd15" else replace(MODELS[model], resolution=size)
    pipe = StableDiffusion.random(config, fill50k_tokenizer()).to(device).train()
    cache = fake_cache(4, config.unet.context_dim, size // 8)
    stages = {}  # (ablation, trainable) -> (ControlStage, its AdamW): arms on the same recipe share them

    def stage_arm(name: str, key: tuple[str, str], encode: bool = False) -> Arm:
        if key not in stages:
            stage = ControlStage(stage_config(ablation=key[0], trainable=key[1], resolution=size), pipe).to(device)
            stages[key] = (stage, torch.optim.AdamW(stage.param_groups(), betas=(0.9, 0.999), eps=1e-8,
                                                    weight_decay=1e-2, fused=fused))  # train.py: fused
        stage, optimizer = stages[key]

        def forward(batch, g):
            stage.cache = None if encode else cache
            return stage(batch, g)

        def set_ckpt(flag: bool) -> None:  # as train.py's --gradient_checkpointing
            pipe.unet.gradient_checkpointing = flag
            if key[0] == "controlnet":
                stage.model.controlnet.gradient_checkpointing = flag
            else:
                stage.model.branch.gradient_checkpointing = flag

        own = stage.model.controlnet if key[0] == "controlnet" else stage.model.branch  # the arm's own module
        return Arm(name, forward, list(stage.trainable().values()), own, optimizer, set_ckpt)

    arms = {}
    for name in names:
        if name != "diffusers_controlnet":
            arms[name] = stage_arm(name, RECIPES[name], encode=name == "controlnext_encode")
    models = [pipe] + [stage for stage, _ in stages.values()]
    if "diffusers_controlnet" in names:
        arm, reference = diffusers_arm(pipe, stage_arm("controlnet", RECIPES["controlnet"]), stages, cache, device)
        arms["diffusers_controlnet"] = arm
        models += reference
    return pipe, {name: arms[name] for name in names}, nn.ModuleList(models)


def diffusers_arm(pipe: StableDiffusion, ours: Arm, stages: dict, cache: LatentCache, device) -> tuple[Arm, list]:
    """diffusers' ControlNetModel + UNet2DConditionModel built on the meta device and given our Parameter objects."""
    stage, optimizer = stages[("controlnet", "none")]
    u = unet_config_to_diffusers(pipe.config.unet)
    fields = {k: v for k, v in u.items() if not k.startswith("_") and k not in ("out_channels", "up_block_types")}
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in u.items() if not k.startswith("_")})
        controlnet = ControlNetModel(conditioning_embedding_out_channels=stage.model.controlnet.config.hint_channels,
                                     **fields)
    unet.load_state_dict(dict(pipe.unet.named_parameters()), strict=True, assign=True)
    controlnet.load_state_dict(dict(stage.model.controlnet.named_parameters()), strict=True, assign=True)
    ours_unet = dict(pipe.unet.named_parameters())
    assert all(p is ours_unet[n] for n, p in unet.named_parameters()), "the UNet's tensors must be shared"
    unet.train(), controlnet.train()
    alphas = stage.alphas_cumprod

    def forward(batch, g):
        stage.cache = cache
        x0, context, _ = stage.conditions(batch, g)  # the same latents, text and noise as our arms
        x_t, t, target = sd_training_noise(x0.cpu(), alphas.cpu(), "epsilon", generator=g)
        x_t, t, hint = x_t.to(device), t.to(device), batch["control"].to(device)
        down, mid = controlnet(x_t, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        pred = unet(x_t, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        return (pred.float() - target.to(device)).square().mean()

    def set_ckpt(flag: bool) -> None:
        for model in (unet, controlnet):
            model.enable_gradient_checkpointing() if flag else model.disable_gradient_checkpointing()

    return Arm("diffusers_controlnet", forward, ours.params, ours.own, optimizer, set_ckpt), [unet, controlnet]


def prepare(arm: Arm, root: nn.Module, amp: torch.dtype | None) -> None:
    """Only the arm's tensors train; under mixed precision the rest is stored in `amp`, the arm's in fp32."""
    root.requires_grad_(False)
    trained = {id(p) for p in arm.params}
    for p in arm.params:
        p.requires_grad_(True)
    if amp is not None:
        for p in root.parameters():
            want = torch.float32 if id(p) in trained else amp
            if p.dtype != want:
                p.data = p.data.to(want)


def make_batch(batch_size: int, size: int, device) -> dict:
    g = torch.Generator().manual_seed(2)
    return {"image": torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1,
            "control": (torch.rand(batch_size, 3, size, size, generator=g) > 0.9).float(),
            "prompt": ["red circle with blue background"] * batch_size, "index": torch.arange(batch_size) % 4,
            "dropped": torch.zeros(batch_size, dtype=torch.bool)}


def run_step(arm: Arm, pipe: StableDiffusion, batch: dict, amp, device, clock) -> dict:
    """One optimizer step; its forward / backward / optimizer times and the transient peak over the RSS before it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak()
    t0 = clock()
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = arm.forward(batch, torch.Generator().manual_seed(3))
    sync()
    t1 = clock()
    loss.backward()
    sync()
    t2 = clock()
    arm.optimizer.step()
    arm.optimizer.zero_grad(set_to_none=True)
    sync()
    t3 = clock()
    peak = rss_bytes("VmHWM") if device.type == "cpu" else torch.cuda.max_memory_allocated()
    weights, state = resident(arm, pipe)
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0, "transient": peak - base,
            "weights": weights, "state": state}


def resident(arm: Arm, pipe: StableDiffusion) -> tuple[int, int]:
    """(bytes of the weights the arm needs: pipeline + its control module, as stored; bytes of its AdamW state)."""
    weights = nbytes(pipe.parameters()) + (nbytes(arm.own.parameters()) if arm.own is not None else 0)
    ids = {id(p) for p in arm.params}
    state = sum(nbytes(v for v in s.values() if torch.is_tensor(v) and v.ndim)
                for p, s in arm.optimizer.state.items() if id(p) in ids)
    return weights, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="fp32, or autocast (frozen in it)")
    parser.add_argument("--arms", default=repr(ARMS), help=f"a tuple of {ALL_ARMS}")
    parser.add_argument("--batches", default="(1, 2)")
    parser.add_argument("--checkpointing", default="(False, True)")
    parser.add_argument("--rounds", type=int, default=2, help="timed steps per arm and setting (after one warm-up)")
    parser.add_argument("--size", type=int, default=256, help="image pixels (latent = size / 8)")
    parser.add_argument("--model", default="sd15", choices=["sd15", *MODELS], help="or a small preset (smoke runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", default="", choices=["", "process", "wall"], help="default: process on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the arm's networks (ours or diffusers')")
    parser.add_argument("--unfused_adamw", action="store_true", help="torch's for-loop AdamW (train.py uses fused)")
    parser.add_argument("--isolated", default="", help="run this one arm alone (batch 2, no checkpointing)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="the device's peak for MFU (default: known GPUs)")
    parser.add_argument("--profile", default="", help="write a torch.profiler table of one step of each arm here")
    parser.add_argument("--saved", action="store_true", help="only count what each arm's forward saves for backward")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, amp = torch.device(args.device), DTYPES[args.dtype]
    clock = time.process_time if (args.clock or ("wall" if device.type != "cpu" else "process")) == "process" \
        else time.perf_counter
    names = (args.isolated,) if args.isolated else tuple(ast.literal_eval(args.arms))
    batches = (2,) if args.isolated else tuple(ast.literal_eval(args.batches))
    settings = [(b, c) for b in batches for c in ((False,) if args.isolated else ast.literal_eval(args.checkpointing))]
    if unknown := set(names) - set(ALL_ARMS):
        raise SystemExit(f"--arms: unknown {sorted(unknown)}; expected some of {ALL_ARMS}")
    if args.compile and len(names) > 1:  # arms flip requires_grad / dtype of shared tensors: each flip recompiles
        raise SystemExit("--compile: one arm per process")
    if "diffusers_controlnet" in names:
        from diffusers import ControlNetModel  # noqa: F401 - before the baseline: the interpreter with its imports
    baseline = rss_bytes()

    tic = time.perf_counter()
    pipe, arms, root = build_arms(names, args.model, args.size, device, not args.unfused_adamw)
    if args.saved:
        return print_saved(pipe, arms, root, amp, device, batches, args.size)
    for module in root if args.compile else ():  # ours as train.py does it; diffusers' two models
        if isinstance(module, ControlStage):
            module.compile_networks()
        elif not isinstance(module, StableDiffusion):  # diffusers' UNet2DConditionModel and ControlNetModel
            module.compile()
    print(f"built {', '.join(names)} in {time.perf_counter() - tic:.0f} s; RSS {rss_bytes() / GiB:.2f} GiB; "
          f"load average {os.getloadavg()}", flush=True)

    results = {}  # (arm, batch, checkpointing) -> list of step records
    for batch_size in batches:  # warm-up: kernel choice per shape, AdamW state, (compilation)
        batch = make_batch(batch_size, args.size, device)
        for arm in arms.values():
            prepare(arm, root, amp)
            arm.set_checkpointing(settings[0][1])
            tic = time.perf_counter()
            run_step(arm, pipe, batch, amp, device, clock)
            print(f"warm-up {arm.name} batch {batch_size}: {time.perf_counter() - tic:.1f} s wall", flush=True)
    for r in range(args.rounds):
        for batch_size, ckpt in settings:
            batch = make_batch(batch_size, args.size, device)
            order = list(arms.values()) if r % 2 == 0 else list(reversed(arms.values()))  # neither always first
            for arm in order:
                prepare(arm, root, amp)
                arm.set_checkpointing(ckpt)
                results.setdefault((arm.name, batch_size, ckpt), []).append(
                    run_step(arm, pipe, batch, amp, device, clock))
        print(f"round {r + 1}/{args.rounds} done; load average {os.getloadavg()}", flush=True)

    if args.profile:
        write_profile(Path(args.profile), pipe, arms, root, amp, device, settings[-1][0], args.size)
    print(f"\nSD1.5 training step, {args.size} px, {args.dtype}, {device}, threads {torch.get_num_threads()}, "
          f"clock {clock.__name__}, {args.rounds} rounds (medians){', compiled' if args.compile else ''}")
    print(f"{'arm':22s} {'batch':>5s} {'ckpt':>5s} {'step s':>7s} {'fwd':>6s} {'bwd':>6s} {'opt':>6s} {'weights':>8s} "
          f"{'adam':>6s} {'transient':>9s} {'peak GiB':>8s}")
    table = {}
    for (name, batch_size, ckpt), records in results.items():
        med = {k: statistics.median(r[k] for r in records) for k in records[0]}
        weights, state = med["weights"], med["state"]
        peak = weights + state + med["transient"]
        table[(name, batch_size, ckpt)] = (med["step"], peak)
        print(f"{name:22s} {batch_size:5d} {str(ckpt):>5s} {med['step']:7.2f} {med['forward']:6.2f} "
              f"{med['backward']:6.2f} {med['optimizer']:6.2f} {weights / GiB:8.2f} {state / GiB:6.2f} "
              f"{med['transient'] / GiB:9.2f} {peak / GiB:8.2f}")
    print_ratios(table, names, settings)
    peak = flops.peak_tflops(device, args.dtype, args.peak_tflops)  # model FLOPs of each step (flops.py, meta device)
    for (name, batch_size, ckpt), (seconds, _) in table.items():
        work = flops.step_flops(*FLOP_ROWS[name], preset=pipe.config.unet, batch=batch_size, size=args.size)
        print(f"{name}, batch {batch_size}, ckpt {ckpt}: {work / 1e9:.1f} GFLOP per step (fwd + bwd), "
              f"{work / seconds / 1e12:.3f} TFLOP/s, MFU {flops.mfu(work, seconds, peak)}")
    if args.isolated:
        whole = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"isolated {names[0]}: whole-process peak RSS {whole / GiB:.2f} GiB, minus the interpreter's "
              f"{baseline / GiB:.2f} GiB = {(whole - baseline) / GiB:.2f} GiB (accounted above: "
              f"{table[(names[0], 2, False)][1] / GiB:.2f} GiB)")


def print_ratios(table: dict, names: tuple, settings: list) -> None:
    pairs = [("controlnext", "controlnet"), ("controlnext_attn2", "controlnet"), ("controlnet", "diffusers_controlnet"),
             ("controlnext_encode", "controlnext"), ("full", "controlnext")]
    for a, b in pairs:
        if a in names and b in names:
            for batch_size, ckpt in settings:
                (ta, ma), (tb, mb) = table[(a, batch_size, ckpt)], table[(b, batch_size, ckpt)]
                print(f"{a} / {b}, batch {batch_size}, ckpt {ckpt}: time {ta / tb:.3f}, peak memory {ma / mb:.3f}")
    for name in names:
        for batch_size in sorted({b for b, _ in settings}):
            if (name, batch_size, True) in table and (name, batch_size, False) in table:
                (t1, m1), (t0, m0) = table[(name, batch_size, True)], table[(name, batch_size, False)]
                print(f"{name}, batch {batch_size}: checkpointing costs {t1 / t0:.3f}x the time, "
                      f"{m1 / m0:.3f}x the peak memory")


def saved_bytes(arm: Arm, pipe: StableDiffusion, batch: dict, amp, device) -> dict[str, int]:
    """Bytes the arm's forward leaves saved for backward, by where they were saved: inside our UNet's modules, or
    outside them (`rest`: the branch or our ControlNet copy, the loss; every tensor of the diffusers arm). Parameters
    themselves are not counted (they are resident anyway); under autocast the bf16 copies of fp32 (trained) weights
    are. Each storage once."""
    where = ["rest"]
    hooks = []
    for m in pipe.unet.modules():
        hooks.append(m.register_forward_pre_hook(lambda m, a: where.append("unet") and None))
        hooks.append(m.register_forward_hook(lambda m, a, o: where.pop() and None))  # None: output unchanged
    seen = {(p.untyped_storage().data_ptr(), p.dtype) for p in pipe.parameters()} | \
        {(p.untyped_storage().data_ptr(), p.dtype) for p in arm.own.parameters()}
    tally = {"unet": 0, "rest": 0}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            tally[where[-1]] += t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = arm.forward(batch, torch.Generator().manual_seed(3))
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    arm.optimizer.zero_grad(set_to_none=True)
    return tally


def print_saved(pipe: StableDiffusion, arms: dict, root: nn.Module, amp, device, batches: tuple, size: int) -> None:
    print(f"saved for backward at the end of the forward, MiB ({size} px; with checkpointing: the blocks' inputs; "
          f"`rest` = outside our UNet: the branch or our ControlNet copy; all of diffusers' arm)")
    print(f"{'arm':22s} {'batch':>5s} {'ckpt':>5s} {'unet':>7s} {'rest':>7s}")
    for batch_size in batches:
        batch = make_batch(batch_size, size, device)
        for arm in arms.values():
            for ckpt in (False, True):
                prepare(arm, root, amp)
                arm.set_checkpointing(ckpt)
                t = saved_bytes(arm, pipe, batch, amp, device)
                print(f"{arm.name:22s} {batch_size:5d} {str(ckpt):>5s} {t['unet'] / 2**20:7.1f} "
                      f"{t['rest'] / 2**20:7.1f}", flush=True)


def write_profile(path: Path, pipe: StableDiffusion, arms: dict, root: nn.Module, amp, device, batch_size: int,
                  size: int) -> None:
    """The top operators by self CPU time in one step of each arm (batch `batch_size`, no checkpointing)."""
    batch = make_batch(batch_size, size, device)
    lines = []
    for arm in arms.values():
        prepare(arm, root, amp)
        arm.set_checkpointing(False)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run_step(arm, pipe, batch, amp, device, time.process_time)
        lines += [f"== {arm.name}, batch {batch_size}", prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                                  row_limit=15), ""]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
