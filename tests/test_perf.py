"""The cheap-training and fast-sampling paths on tiny checkpoints (issue 17): under bf16 mixed precision the frozen
tensors are stored in bf16 and the trainable ones stay fp32 masters, only they get gradients and optimizer state, and
the loss stays close to fp32's; a bf16 train.py run and a bf16 sample.py run work end to end, the samples close to
fp32's; the ControlNet copy's gradient checkpointing gives the same gradients. torch.compile is exercised in the
benchmarks only (experiments/bench_train.py, bench_unet.py): compiling even the tiny UNet takes minutes on 2 cores."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import sample
import train
from controlnext.controlnet import ControlNet, ControlNetConfig
from controlnext.data import Fill50k
from controlnext.stages import build_stage, cast_frozen
from tests.test_sample import run_checkpoint, tiny  # noqa: F401 - the tiny SD1.5 file and run fixtures, shared
from tests.test_train import smoke
from unet.sd_unet import TINY, UNet


@pytest.mark.parametrize("ablation", ["cross_norm", "controlnet"])
def test_bf16_step_trains_fp32_masters_only(tiny, tmp_path, ablation):
    config = smoke(str(tiny), tmp_path, ablation=ablation, mixed_precision="bf16")
    stage = build_stage(config)
    batch = train.batch_for(Fill50k(config.resolution), stage.config, 0, 0)[1]
    loss32 = stage(batch, train.step_generator(0, 0, 0)).item()
    trainable = stage.trainable()
    cast_frozen(stage, torch.bfloat16)
    frozen = [p for p in stage.parameters() if not p.requires_grad]
    assert len(frozen) + len(trainable) == len(list(stage.parameters()))
    assert all(p.dtype == torch.bfloat16 for p in frozen) and all(p.dtype == torch.float32 for p in trainable.values())

    optimizer = torch.optim.AdamW(stage.param_groups())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = stage(batch, train.step_generator(0, 0, 0))
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in frozen)  # no gradient is computed or kept for a frozen tensor
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    state = {id(p) for p in optimizer.state}
    assert state == {id(p) for p in trainable.values()}  # optimizer state for the trained tensors only
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per op); through the tiny VAE + UNet the loss moved by
    # 0.02-0.2% in our runs; 2% is the bound a wrong cast (e.g. fp32 inputs meeting bf16 weights) would far exceed.
    assert math.isclose(loss.item(), loss32, rel_tol=2e-2), (loss.item(), loss32)


def test_bf16_training_run_and_evaluation_end_to_end(tiny, tmp_path):
    result = train.main(smoke(str(tiny), tmp_path, mixed_precision="bf16"))
    reference = train.main(smoke(str(tiny), tmp_path / "fp32"))
    assert all(math.isfinite(x) for x in result["losses"])
    # Same batches and noise; bf16 frozen weights and activations move the loss and metrics a little, not a lot.
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=2e-2, atol=0)
    assert abs(result["eval"]["iou"] - reference["eval"]["iou"]) < 0.05  # evaluation ran (under autocast) too


def test_bf16_sampling_is_close_to_fp32(tiny, tmp_path):
    base = dict(pretrained=str(tiny), batch=2, steps=3, out=str(tmp_path / "grid.png"), fill_index=3,
                prompt="red circle with blue background")
    images = {d: sample.main(dataclasses.replace(sample.SampleConfig(), **base, dtype=d))["images"]
              for d in ("fp32", "bf16")}
    error = (images["bf16"] - images["fp32"]).abs()
    assert images["bf16"].dtype == torch.float32 and error.max() > 1e-4  # the weights really were bf16
    # Measured on the tiny model over 3 dpmpp_2m steps with CFG: max 0.03, mean 0.003 on images in [-1, 1] (bf16's
    # relative rounding 2^-9 per op, compounded through CLIP, the UNet steps and the VAE decoder).
    assert error.max() < 0.1 and error.mean() < 0.01, (error.max().item(), error.mean().item())


def test_channels_last_sampling_gives_the_same_images(tiny, run_checkpoint, tmp_path):
    base = dict(pretrained=str(tiny), batch=2, steps=3, out=str(tmp_path / "grid.png"), fill_index=3,
                prompt="red circle with blue background", control=(str(run_checkpoint),))
    images = [sample.main(dataclasses.replace(sample.SampleConfig(), **base, channels_last=c))["images"]
              for c in (False, True)]
    # fp32 both ways, with a trained control; NHWC runs other conv / norm kernels, so a float tolerance (measured:
    # 1.5e-6 on images in [-1, 1])
    error = (images[1] - images[0]).abs().max().item()
    assert error <= 1e-5, error


def test_sample_rejects_an_unknown_dtype(tiny, tmp_path):
    with pytest.raises(ValueError, match="--dtype='fp8'"):
        sample.main(dataclasses.replace(sample.SampleConfig(), pretrained=str(tiny), dtype="fp8"))


@pytest.mark.parametrize("kind, fields, message", [
    ("StableDiffusion3Pipeline", {"dtype": "bf16"}, "--dtype='bf16': SD3"),
    ("StableDiffusion3Pipeline", {"compile": True}, "--compile"),
    ("StableVideoDiffusionPipeline", {"compile": True}, "--compile"),
    ("StableVideoDiffusionPipeline", {"channels_last": True}, "--channels_last")])
def test_sample_modes_without_the_fast_paths_say_so_before_loading(tmp_path, kind, fields, message):
    (tmp_path / "model_index.json").write_text(f'{{"_class_name": "{kind}"}}')  # the folder holds nothing else
    with pytest.raises(ValueError, match=message):
        sample.main(dataclasses.replace(sample.SampleConfig(), pretrained=str(tmp_path), **fields))


def test_controlnet_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = ControlNet.from_unet(UNet(TINY), ControlNetConfig(unet=TINY))
    for conv in model.controlnet_down_blocks:  # non-zero residuals, so every block's gradient is exercised
        torch.nn.init.normal_(conv.weight, std=0.1)
    x, context, hint = torch.randn(2, 4, 16, 16), torch.randn(2, 5, TINY.context_dim), torch.rand(2, 3, 128, 128)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        down, mid = model(x, torch.tensor([10, 700]), context, hint)
        (sum(r.square().sum() for r in down) + mid.square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for name in grads[0]:  # recomputation runs the same kernels on the same inputs; 1e-6 covers summation order
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("preset", ["g2", "g1_sd15"])
def test_branch_gradient_checkpointing_gives_the_same_gradients_and_input_gradient(preset):
    """--gradient_checkpointing also recomputes the ControlNeXt branch's stages (stem, ResBlock + downsample, mid):
    the branch's weight gradients and the gradient reaching the control image are the plain run's."""
    from controlnext.control_branch import PRESETS, ControlNeXt  # noqa: PLC0415

    torch.manual_seed(0)
    branch = ControlNeXt(PRESETS[preset])
    cond, t = torch.rand(2, 3, 64, 64), torch.tensor([10, 700])
    grads = []
    for flag in (False, True):
        branch.gradient_checkpointing = flag
        branch.zero_grad()
        image = cond.clone().requires_grad_(True)
        branch(image, t).square().mean().backward()
        grads.append({"image": image.grad, **{n: p.grad.clone() for n, p in branch.named_parameters()
                                              if p.grad is not None}})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:  # the same kernels recomputed on the same inputs; 1e-6 covers summation order
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_flop_counts_ours_equal_diffusers_and_a_selection_costs_its_weight_gradients():
    """experiments/flops.py (issue 17): (1) our UNet and diffusers' do the same work: equal FLOPs per forward on the
    tiny config; (2) with the site at conv_in every block is on the gradient path either way, so training `to_out`
    instead of nothing adds exactly its weight gradients: sum over the to_out Linears of 2 x tokens x in x out."""
    import importlib.util  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from diffusers import UNet2DConditionModel  # noqa: PLC0415 - test-only reference
    from unet.keymap import unet_config_to_diffusers  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("flops", Path(__file__).resolve().parents[1] / "experiments" / "flops.py")
    flops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flops)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(TINY).items()
                                            if not k.startswith("_")})
        x, t, context = torch.randn(2, 4, 16, 16), torch.full((2,), 500.0), torch.randn(2, 77, TINY.context_dim)
        with torch.no_grad():
            theirs = flops.count(lambda: reference(x, t, encoder_hidden_states=context))
    ours = flops.unet_forward_flops("tiny", batch=2, size=16)
    assert ours == theirs and ours > 0

    shapes = []  # (tokens, in, out) of every to_out Linear, recorded on a forward of the same shapes
    with torch.device("meta"):
        unet = UNet(TINY)
        hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((i[0].shape[:-1].numel(), m.in_features,
                                                                          m.out_features)))
                 for n, m in unet.named_modules() if n.endswith("to_out.0") and isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            unet(x, t, context, None)
        for h in hooks:
            h.remove()
    assert len(shapes) > 0
    weight_grads = sum(2 * n * i * o for n, i, o in shapes)
    gap = (flops.step_flops("cross_norm", "to_out", "conv_in", preset="tiny", batch=2, size=128)
           - flops.step_flops("cross_norm", "none", "conv_in", preset="tiny", batch=2, size=128))
    assert gap == weight_grads


def test_channels_last_unet_computes_the_same_function():
    """bench_unet.py --channels_last: weights and input in NHWC give the contiguous model's output. Different conv
    and norm kernels run on the two layouts, so the comparison carries a float tolerance (1e-5, fp32)."""
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    x = torch.randn(2, TINY.in_channels, 16, 16)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 7, TINY.context_dim)
    with torch.no_grad():
        want = model(x, t, context)
        model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last), t, context)
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (got - want).abs().max().item() <= 1e-5


def test_checkpointing_leaves_only_block_inputs_saved_for_backward():
    """bench_train.py --saved (issue 17: what checkpointing buys): with the UNet's checkpointing on, its forward keeps
    a small fraction of the activations it keeps otherwise (each block's inputs, the rest recomputed in backward);
    so do the ControlNeXt branch's stages and the ControlNet copy's blocks (its hint encoder is not checkpointed)."""
    import importlib.util  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pipe, arms, root = bench.build_arms(("controlnext", "controlnet"), "tiny_sd15", 64, torch.device("cpu"), False)
    batch = bench.make_batch(2, 64, "cpu")
    saved = {}
    for name, arm in arms.items():
        for ckpt in (False, True):
            bench.prepare(arm, root, None)
            arm.set_checkpointing(ckpt)
            saved[name, ckpt] = bench.saved_bytes(arm, pipe, batch, None, torch.device("cpu"))
    for name in arms:
        off, on = saved[name, False], saved[name, True]
        assert off["unet"] > 0 and on["unet"] < 0.15 * off["unet"], (name, off, on)
    assert saved["controlnext", True]["rest"] < 0.3 * saved["controlnext", False]["rest"]  # the branch's stages too
    assert saved["controlnet", True]["rest"] < 0.9 * saved["controlnet", False]["rest"]  # 4.2 vs 5.3 MiB: its hint
    # encoder at full resolution is not checkpointed (byte counts, not timings)
