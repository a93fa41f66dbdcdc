"""train.py end to end on tiny Stable Diffusion checkpoints in the real layouts (an SD1.5-structured original single
file written by our exporter, and SD1.5/SDXL diffusers folders written by diffusers): every ablation trains, the
official recipe resolves per family, resume is exact, 2-process DDP equals one process accumulating the same
micro-batches, the NaN guard trips, the latent cache changes nothing, bad inputs fail before anything is written."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from controlnext import cli
from controlnext.controlnext import ABLATIONS
from controlnext.checkpoint import read_state
from controlnext.config import TrainConfig
from controlnext.data import Fill50k, fill50k_tokenizer, write_fill50k
from controlnext.runs import EMA, load_checkpoint, step_generator
from controlnext.sd_pipeline import PRESETS, StableDiffusion, load_sd
from controlnext.stages import ControlStage, build_stage, weighted_mean
from schedulers.sigmas import SD15 as SD15_SCHEDULE, make_alphas_cumprod
from tests.sd_fixtures import tiny_sd15, tiny_sdxl

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> str:
    """A random tiny SD1.5-structured pipeline as one original-layout single file (+ tokenizer/ beside it)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny_sd15.safetensors"
    StableDiffusion.random(PRESETS["tiny_sd15"], fill50k_tokenizer()).save(path)
    return str(path)


def smoke(pretrained: str, out: Path, **overrides) -> TrainConfig:
    small = dict(pretrained=pretrained, out_dir=str(out), batch_size=2, max_steps=2, eval_every=0, eval_count=2,
                 sampling_steps=2, save_every=1000, progress=False, num_threads=1, warmup_steps=1)
    return dataclasses.replace(TrainConfig(), **(small | overrides))


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_each_ablation_trains(tiny_file, tmp_path, ablation):
    result = train.main(smoke(tiny_file, tmp_path, ablation=ablation))
    run = Path(result["run"])
    assert len(result["losses"]) == 2 and all(math.isfinite(x) and x > 0 for x in result["losses"])
    assert {"iou", "color_error_in"} <= set(result["eval"])
    for name in ("config.json", "log.txt", "metrics.jsonl", "plot.png", "samples/step_000002.png",
                 "checkpoints/step_000002.safetensors", "checkpoints/step_000002_ema.safetensors",
                 "checkpoints/step_000002.pt"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert (config["injection"], config["trainable"], config["branch"]) == ("sd15_train", "to_out", "tiny")  # resolved
    trained = read_state(run / "checkpoints" / "step_000002.safetensors")
    unet_keys = [k for k in trained if k.startswith("unet.")]
    assert len(trained) > len(unet_keys) and all(".to_out." in k for k in unet_keys)


def test_control_site_moves_the_injection_and_the_checkpoint_keeps_it(tiny_file, tmp_path):
    """--control_site=down_1 (the site ablation of issue 18): the run's config records it, load_control rebuilds the
    control there, and its output is the UNet with h + k CN(h, c) added after down block 1 and nowhere else."""
    from controlnext.controlnext import align, run_unet  # noqa: PLC0415
    from controlnext.controls import load_control  # noqa: PLC0415
    run = Path(train.main(smoke(tiny_file, tmp_path, control_site="down_1"))["run"])
    assert json.loads((run / "config.json").read_text())["control_site"] == "down_1"
    pipe = load_sd(tiny_file)
    model = load_control(run / "checkpoints" / "step_000002.safetensors", pipe).model
    assert model.injection.site == "down_1" and model.injection.eps == 1e-12  # the rest of sd15_train unchanged
    torch.manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, pipe.config.unet.context_dim)
    features = model.features(model.prepare(torch.rand(1, 3, 64, 64)), t)
    sizes = {}

    def by_hand(site, h):
        sizes[site] = tuple(h.shape[-2:])
        return h + align(h, features, model.injection) if site == "down_1" else h
    with torch.no_grad():
        expected = run_unet(model.unet, x, t, ctx, None, by_hand)
        plain = run_unet(model.unet, x, t, ctx, None, None)
        torch.testing.assert_close(model.forward_with_features(x, t, ctx, features), expected, atol=1e-6, rtol=0)
    assert (expected - plain).abs().max() > 1e-4 and sizes["down_1"] != sizes["down_0"]
    with pytest.raises(ValueError, match="is not a site of this UNet"):
        train.main(smoke(tiny_file, tmp_path / "bad", control_site="down_9"))
    assert not (tmp_path / "bad").exists()  # the site is checked when the stage is built, before the run folder


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_folders_train_with_their_family_recipe(tmp_path, family):
    folder = (tiny_sd15 if family == "sd15" else tiny_sdxl)(tmp_path / family)
    result = train.main(smoke(str(folder), tmp_path / "runs", ablation="cross_norm"))
    config = json.loads((Path(result["run"]) / "config.json").read_text())
    expected = ("sd15_train", "to_out") if family == "sd15" else ("sdxl", "attn2_to_out")  # controlnext.md §3
    assert (config["injection"], config["trainable"]) == expected
    assert all(math.isfinite(x) for x in result["losses"])
    keys = read_state(Path(result["run"]) / "checkpoints" / "step_000002.safetensors")
    if family == "sdxl":
        assert all("attn2" in k for k in keys if k.startswith("unet."))


def test_resume_is_exact(tiny_file, tmp_path):
    straight = train.main(smoke(tiny_file, tmp_path / "a", max_steps=4))
    half = train.main(smoke(tiny_file, tmp_path / "b", max_steps=2))
    ckpt = Path(half["run"]) / "checkpoints" / "step_000002.pt"
    rest = train.main(smoke(tiny_file, tmp_path / "b", max_steps=4, resume=str(ckpt)))
    # Same process, same kernels, same batch sizes: the resumed run must be bit-identical to the straight one.
    assert half["losses"] + rest["losses"] == straight["losses"]
    assert Path(rest["run"]) == Path(half["run"])
    a = load_checkpoint(Path(straight["run"]) / "checkpoints" / "step_000004.pt")
    b = load_checkpoint(Path(rest["run"]) / "checkpoints" / "step_000004.pt")
    for key in ("params", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert [r["loss"] for r in rows(Path(rest["run"])) if "loss" in r] == straight["losses"]
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        train.main(smoke(tiny_file, tmp_path / "b", max_steps=4, lr=1.0, resume=str(ckpt)))
    with pytest.raises(ValueError, match="below the checkpoint's step"):
        train.main(smoke(tiny_file, tmp_path / "b", max_steps=1, resume=str(ckpt)))


def test_resume_survives_a_torn_metrics_line_and_stale_temp_files(tiny_file, tmp_path):
    half = train.main(smoke(tiny_file, tmp_path, max_steps=2, save_every=1))
    run = Path(half["run"])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill in the middle of a row
    (run / "checkpoints" / ".tmpab12cd").write_bytes(b"x")  # safetensors' own temp file
    (run / "checkpoints" / ".step_000003.pt.k2j4.tmp").write_bytes(b"")  # ours
    rest = train.main(smoke(tiny_file, tmp_path, max_steps=3, resume=str(run / "checkpoints" / "step_000002.pt")))
    assert len(rest["losses"]) == 1
    assert not list((run / "checkpoints").glob(".*"))
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2, 3]


def test_two_process_ddp_equals_gradient_accumulation(tiny_file, tmp_path):
    """torchrun 2 ranks x 1 micro-batch == 1 process x 2 micro-batches (rank r draws micro-batch r): DDP averages the
    gradients as accumulation does. Different reduction order and batch kernels: a float tolerance, not bitwise."""
    args = ["train.py", f"--pretrained={tiny_file}", "--batch_size=2", "--max_steps=2", "--eval_every=0",
            "--eval_count=1", "--sampling_steps=1", "--progress=False", "--num_threads=1", "--warmup_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", *args,
                    f"--out_dir={tmp_path / 'ddp'}"], cwd=ROOT, env=env, check=True, capture_output=True)
    single = train.main(smoke(tiny_file, tmp_path / "one", grad_accum=2, eval_count=1, sampling_steps=1))
    ddp_run = next((tmp_path / "ddp").iterdir())
    a = read_state(ddp_run / "checkpoints" / "step_000002.safetensors")
    b = read_state(Path(single["run"]) / "checkpoints" / "step_000002.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [r["loss"] for r in rows(ddp_run) if "loss" in r] == pytest.approx(single["losses"], rel=1e-5)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tiny_file, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = ControlStage.forward

    def poisoned(self, batch, generator):  # the 3rd step's loss is NaN
        calls["n"] += 1
        loss = forward(self, batch, generator)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(ControlStage, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="step_000002.pt"):
        train.main(smoke(tiny_file, tmp_path, max_steps=4, save_every=1))
    run = next(tmp_path.iterdir())
    assert (run / "checkpoints" / "step_000002.pt").is_file() and not (run / "checkpoints" / "step_000003.pt").exists()
    assert "non-finite" in (run / "log.txt").read_text()


def test_final_checkpoint_is_written_before_the_final_evaluation(tiny_file, tmp_path, monkeypatch):
    def broken(self, evals, generator):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(ControlStage, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train.main(smoke(tiny_file, tmp_path, max_steps=2))
    assert (next(tmp_path.iterdir()) / "checkpoints" / "step_000002.pt").is_file()


def test_latent_cache_gives_the_same_losses(tiny_file, tmp_path):
    data = tmp_path / "data"
    write_fill50k(data, count=6, size=64)
    plain = train.main(smoke(tiny_file, tmp_path / "a", dataset=str(data), max_steps=3))
    cached = train.main(smoke(tiny_file, tmp_path / "b", dataset=str(data), max_steps=3, cache_latents=True))
    assert (Path(cached["run"]) / "latent_cache.safetensors").is_file()
    # The cache stores the posterior (mean, std) computed at batch 16 instead of per batch: same draws, fp32 rounding.
    assert cached["losses"] == pytest.approx(plain["losses"], rel=1e-5)


@pytest.mark.parametrize("ablation", ["cross_norm", "controlnet"])
def test_gradient_checkpointing_recomputes_every_network_and_trains_the_same(tiny_file, tmp_path, monkeypatch,
                                                                                  ablation):
    """--gradient_checkpointing reaches the UNet's blocks and the control module's (the ControlNeXt branch's stages,
    the ControlNet copy's blocks), and trains the same tensors as the plain run: recomputation runs the same kernels
    on the same inputs, so the losses and weights agree to float rounding (rel 1e-5, atol 1e-6)."""
    import controlnext.control_branch  # noqa: PLC0415
    import controlnext.controlnet  # noqa: PLC0415
    import unet.sd_unet  # noqa: PLC0415

    calls = {}
    for module in (unet.sd_unet, controlnext.control_branch, controlnext.controlnet):
        def counted(*args, _module=module, _inner=module.checkpoint, **kwargs):
            calls[_module.__name__] = calls.get(_module.__name__, 0) + 1
            return _inner(*args, **kwargs)
        monkeypatch.setattr(module, "checkpoint", counted)
    plain = train.main(smoke(tiny_file, tmp_path / "plain", ablation=ablation))
    assert calls == {}
    ckpt = train.main(smoke(tiny_file, tmp_path / "ckpt", ablation=ablation, gradient_checkpointing=True))
    own = "controlnext.controlnet" if ablation == "controlnet" else "controlnext.control_branch"
    assert calls.get("unet.sd_unet", 0) > 0 and calls.get(own, 0) > 0, calls
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    a, b = (read_state(Path(r["run"]) / "checkpoints" / "step_000002.safetensors") for r in (plain, ckpt))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_vae_and_base_stages_write_a_loadable_single_file(tmp_path):
    vae_run = Path(train.main(smoke("", tmp_path, stage="vae", model="tiny_sd15", max_steps=1))["run"])
    base_run = Path(train.main(smoke(str(vae_run / "model.safetensors"), tmp_path, stage="base", model="tiny_sd15",
                                     max_steps=1))["run"])
    pipe = load_sd(base_run / "model.safetensors")  # the tokenizer/ beside it is found
    preset = PRESETS["tiny_sd15"]
    scale = pipe.config.vae.latent_scale  # calibrated by the vae stage to 1 / std of its latents (LDM scale_by_std)
    assert pipe.config == dataclasses.replace(preset, vae=dataclasses.replace(preset.vae, latent_scale=scale))
    assert scale != preset.vae.latent_scale
    trained_vae = read_state(vae_run / "model.safetensors")
    shipped = read_state(base_run / "model.safetensors")
    vae_keys = [k for k in shipped if k.startswith("first_stage_model.")]
    assert vae_keys and all(torch.equal(shipped[k], trained_vae[k]) for k in vae_keys)  # the VAE stayed frozen
    # what is shipped is the EMA of the trained tensors (after one update: 0.1 init + 0.9 trained), cast to fp16
    ema = read_state(base_run / "checkpoints" / "step_000001_ema.safetensors")
    raw = read_state(base_run / "checkpoints" / "step_000001.safetensors")
    for name, tower in (("unet", pipe.unet), ("text_encoders.0", pipe.text_encoders[0])):
        for k, v in tower.state_dict().items():
            assert torch.equal(v, ema[f"{name}.{k}"].half().float()), k
    assert any(not torch.equal(ema[k].half(), raw[k].half()) for k in ema)  # the check can tell EMA from raw


def test_stage_losses_closed_forms():
    """VAEStage: L1 of the decoded posterior sample + kl_weight * KL(q || N(0, I)) per pixel (KL from
    torch.distributions, an independent formula); BaseStage: the text encoder gets gradients (it trains)."""
    from controlnext.stages import BaseStage, VAEStage

    torch.manual_seed(0)
    pipe = StableDiffusion.random(PRESETS["tiny_sd15"], fill50k_tokenizer())
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    config = dataclasses.replace(TrainConfig(), stage="vae", kl_weight=0.01)
    loss = VAEStage(config, pipe)({"image": images}, torch.Generator().manual_seed(5))
    with torch.no_grad():
        posterior = pipe.vae.encode(images)
        eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
        recon = pipe.vae.decode(posterior.mean + posterior.std * eps)
        normal = torch.distributions.Normal
        kl = torch.distributions.kl_divergence(normal(posterior.mean, posterior.std), normal(0.0, 1.0)).sum((1, 2, 3))
        expected = (recon - images).abs().mean() + 0.01 * kl.mean() / (3 * 64 * 64)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    base = BaseStage(dataclasses.replace(config, stage="base"), pipe)
    base({"image": images, "prompt": ["red circle with blue background", ""]}, torch.Generator().manual_seed(5)).backward()
    grads = [p.grad for p in pipe.text_encoders.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_ema_follows_its_closed_form():
    """ema_n = d_n ema_{n-1} + (1 - d_n) v_n with d_n = min(decay, (1 + n) / (10 + n)), from ema_{-1} = the init."""
    p = torch.nn.Parameter(torch.full((3,), 5.0))
    ema = EMA({"p": p}, decay=0.5)
    values = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]
    for n, v in enumerate(values):
        p.data.fill_(v)
        ema.update({"p": p}, n)
    expected = 5.0
    for n, v in enumerate(values):
        d = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.1818, ..., then capped at 0.5 from n = 8 on
        expected = d * expected + (1 - d) * v
    assert [ema.decay_at(n) for n in (0, 8, 100)] == [0.1, 0.5, 0.5]
    torch.testing.assert_close(ema.shadow["p"], torch.full((3,), expected), atol=1e-5, rtol=0)


def test_a_run_follows_the_closed_forms_of_accumulation_warmup_and_ema(tiny_file, tmp_path, monkeypatch):
    """One run against an independent recomputation of its first step and the closed forms of its schedule:
    - the step-1 gradient is that of the mean loss over its grad_accum micro-batches (AdamW is nearly invariant to a
      gradient scale, so a sum instead of a mean trains almost the same and only this check sees it);
    - the logged lr is base * min(1, step / warmup_steps) (steps counted from 1);
    - the EMA tensors of steps 1..3 are d_n ema + (1 - d_n) param from the initial tensors, d_n = min(decay, (1 + n) /
      (10 + n)) at the n-th update (test_ema_follows_its_closed_form checks EMA itself, this its use by the loop)."""
    config = smoke(tiny_file, tmp_path, grad_accum=2, max_steps=3, warmup_steps=2, save_every=1)
    seen, check = {}, train.check_finite

    def spy(loss, params, step, last_good, log):  # the gradients the optimizer is about to use
        if step == 1:
            seen.update({name: p.grad.clone() for name, p in params.items() if p.grad is not None})
        return check(loss, params, step, last_good, log)

    monkeypatch.setattr(train, "check_finite", spy)
    result = train.main(config)
    run = Path(result["run"])

    torch.manual_seed(config.seed)  # as train.main: the same initial tensors
    stage = build_stage(config).train()
    params = stage.trainable()
    init = {name: p.detach().clone() for name, p in params.items()}
    dataset = Fill50k(stage.config.resolution, seed=stage.config.dataset_seed)
    losses = [stage(batch, g) for g, batch in (train.batch_for(dataset, stage.config, 0, k) for k in range(2))]
    ((losses[0] + losses[1]) / 2).backward()
    assert seen.keys() == {name for name, p in params.items() if p.grad is not None} and seen
    for name, grad in seen.items():  # the same kernels; only the order of the two micro-batch sums may differ
        torch.testing.assert_close(grad, params[name].grad, rtol=1e-5, atol=1e-9, msg=name)
    assert result["losses"][0] == pytest.approx((losses[0].item() + losses[1].item()) / 2, rel=1e-6)

    lrs = [r["lr"] for r in rows(run) if "loss" in r]
    assert lrs == pytest.approx([config.control_lr * min(1.0, s / 2) for s in (1, 2, 3)], rel=1e-12)

    ema = init
    for n, step in enumerate((1, 2, 3)):
        trained = read_state(run / "checkpoints" / f"step_{step:06d}.safetensors")
        stored = read_state(run / "checkpoints" / f"step_{step:06d}_ema.safetensors")
        d = min(config.ema_decay, (1 + n) / (10 + n))  # 0.1, 0.18, 0.25: far from a constant 0.99
        ema = {k: d * ema[k] + (1 - d) * trained[k] for k in ema}
        for k in ema:  # fp32 arithmetic on O(0.1) values, ~1e-8; an off-by-one d moves it by > 1e-5
            torch.testing.assert_close(stored[k], ema[k], rtol=0, atol=1e-6, msg=k)


def test_restore_puts_the_torch_rng_state_back():
    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([p])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    torch.rand(10)  # the generator moves on
    resumed = {"params": {"p": torch.ones(3)}, "optimizer": optimizer.state_dict(), "ema": None, "scaler": None,
               "torch_rng": state, "step": 7}
    assert train.restore(resumed, {"p": p}, optimizer, None, None) == 7
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(p.detach(), torch.ones(3))


def test_control_loss_weight_map_closed_form():
    """w = 1 + (weight - 1) [lit], average-pooled to the latent grid: a lit 8x8 block gives weight there, 1 elsewhere,
    and a block half in a pooling cell gives the mean."""
    from controlnext.stages import loss_weight_map

    control = torch.zeros(1, 3, 16, 24)
    control[0, 1, :8, :8] = 1.0  # one channel lit: the map takes the max over channels
    control[0, :, 8:, 12:16] = 0.8  # the right half of the 8x8 cell (1, 1)
    w = loss_weight_map(control, 5.0, 8)
    assert loss_weight_map(control, 1.0, 8) is None  # plain MSE
    torch.testing.assert_close(w, torch.tensor([[[[5.0, 1.0, 1.0], [1.0, 3.0, 1.0]]]]), rtol=0, atol=1e-6)


BAD = [("sampler", "bogus", "--sampler='bogus'"), ("ablation", "bogus", "--ablation='bogus'"),
       ("trainable", "bogus", "--trainable='bogus'"), ("mixed_precision", "bogus", "--mixed_precision"),
       ("batch_size", 0, "--batch_size=0"), ("lr", -1.0, "--lr=-1.0"), ("resolution", 60, "--resolution=60"),
       ("device", "cuda", "--device=cuda"), ("dataset", "/nonexistent", "--dataset=/nonexistent"),
       ("pretrained", "/nonexistent.safetensors", "--pretrained=/nonexistent"),
       ("control_site", "down_x", "--control_site='down_x'")]


@pytest.mark.parametrize("field,value,message", BAD, ids=[b[0] for b in BAD])
def test_bad_settings_fail_before_anything_is_written(tiny_file, tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as e:
        train.main(smoke(tiny_file, tmp_path / "runs", **{field: value}) if field != "pretrained" else
                   smoke(value, tmp_path / "runs"))
    assert len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # checked first, run folder after


def test_command_line_errors_are_one_line_without_traceback(tiny_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv, message in ((["--sampler=bogus"], "--sampler='bogus'"), (["--bogus=1"], "unknown option --bogus")):
        result = subprocess.run([sys.executable, "train.py", f"--pretrained={tiny_file}", f"--out_dir={tmp_path}", *argv],
                                cwd=ROOT, capture_output=True, text=True, env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


def test_resume_from_an_unreadable_checkpoint_says_so(tiny_file, tmp_path):
    for content in (b"", b"\x00" * 100, os.urandom(300)):
        bad = tmp_path / "step_000001.pt"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="cannot read checkpoint") as e:
            train.main(smoke(tiny_file, tmp_path, resume=str(bad)))
        assert "weights_only=False" not in str(e.value)


def test_experiment_file_and_overrides_round_trip_through_json():
    config, dry_run = cli.parse_args(TrainConfig, ["experiments/sd15_fill50k.py", "--lr=2e-5", "--dry_run"])
    assert dry_run and config.lr == 2e-5 and config.experiment == "sd15_fill50k"
    assert cli.from_dict(TrainConfig, json.loads(cli.dumps(config))) == config


@pytest.mark.parametrize("recipe,family", [("sd15_fill50k", "sd15"), ("sdxl_depth", "sdxl")])
def test_the_real_weight_recipes_run_on_tiny_checkpoints(tmp_path, recipe, family):
    """The experiment files as written, with only what a CPU test must change: the model (and the branch width that
    follows it), the data, the size, the step count, and no fp16 autocast (a CPU has no fp16 kernels for every op)."""
    folder = (tiny_sd15 if family == "sd15" else tiny_sdxl)(tmp_path / family)
    data = tmp_path / "data"
    write_fill50k(data, count=4, size=64)
    config, _ = cli.parse_args(TrainConfig, [f"experiments/{recipe}.py", f"--pretrained={folder}", f"--dataset={data}",
                                             "--branch=tiny", "--resolution=64", "--batch_size=1", "--max_steps=1",
                                             "--eval_count=1",
                                             "--sampling_steps=2", "--mixed_precision=no", f"--out_dir={tmp_path}",
                                             "--progress=False", "--num_threads=1"])
    result = train.main(config)
    assert all(math.isfinite(x) for x in result["losses"]) and (Path(result["run"]) / "latent_cache.safetensors").is_file()


def test_min_snr_weighted_loss_closed_form():
    """--snr_gamma: the batch loss is mean_i(w_i mean(err_i)) with w_i = min(SNR_i, gamma) / SNR_i (eps); off, the
    plain mean. Two samples with different errors and SNRs on either side of gamma: a weight applied to the batch
    mean instead of per sample, or a summed batch, gives another number."""
    abar = make_alphas_cumprod(SD15_SCHEDULE)
    t = torch.tensor([20, 700])
    err = torch.stack([torch.full((4, 2, 2), 1.0), torch.full((4, 2, 2), 3.0)])  # per-sample mean errors 1 and 3
    snr = abar.double()[t] / (1 - abar.double()[t])
    assert snr[0] > 5 > snr[1]
    w = (snr.clamp(max=5) / snr).float()  # (5 / SNR_0, 1)
    gamma5 = dataclasses.replace(TrainConfig(), snr_gamma=5.0)
    torch.testing.assert_close(weighted_mean(err, t, abar, gamma5, "epsilon"), (w[0] * 1 + w[1] * 3) / 2,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(weighted_mean(err, t, abar, TrainConfig(), "epsilon"), torch.tensor(2.0))


def test_prompt_dropout_draws_after_the_indices_and_empties_the_drawn_share():
    """--proportion_empty_prompts p: sample i's prompt is replaced by the empty prompt when u_i < p, u drawn from the
    micro-batch's generator right after the indices (diffusers' train_controlnet.py: random.random() < p). The
    default p = 0 never drops, so the runs above cannot see a reversed comparison (which would drop 1 - p)."""
    items = [{"image": torch.zeros(3, 2, 2), "control": torch.zeros(3, 2, 2), "prompt": f"p{i}"} for i in range(10)]
    config = dataclasses.replace(TrainConfig(), batch_size=64, proportion_empty_prompts=0.25, seed=3)
    _, batch = train.batch_for(items, config, step=5, micro=1)
    g = step_generator(3, 5, 1)
    index = torch.randint(10, (64,), generator=g)
    dropped = torch.rand(64, generator=g) < 0.25
    assert torch.equal(batch["index"], index) and torch.equal(batch["dropped"], dropped) and 0 < dropped.sum() < 32
    assert batch["prompt"] == [config.empty_prompt if d else f"p{i}" for i, d in zip(index.tolist(), dropped.tolist())]
