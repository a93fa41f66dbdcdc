"""Which UNet parameters train: named regex presets over our (= diffusers) parameter names, and rank-R LoRA.

Paper: Peng et al. 2024, ControlNeXt (arXiv 2408.06070) §3.1: train a small subset of the base model; the authors
report that this beats LoRA (experiences.md, issue #14), which `lora:R` makes testable. Reference:
dvlab-research/ControlNeXt@ab4b3ac ControlNeXt-SD1.5-Training/train_controlnext.py (`"to_out" in name`) and
ControlNeXt-SDXL-Training/train_controlnext.py (`--unet_trainable_param_pattern` default `.*attn2.*to_out.*`);
counts in ../shared/reference/controlnext.md §3. LoRA: Hu et al. 2021, ΔW = (alpha/r)·B·A, B zero-initialised.
Interface: `select_trainable(unet, selection) -> {name: Parameter}` freezes the rest of the UNet.
Left out: LoRA on convolutions (no preset selects one), dropout on the LoRA path.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Regexes searched in each UNet parameter name (re.search). One line per preset, with its source.
SELECTIONS = {
    "none": r"(?!)",                       # the UNet stays frozen (control branch only)
    "to_out": r"\.to_out\.",               # every attention output projection: official SD1.5-Training, SVD v1
    "attn2_to_out": r"attn2\..*to_out\.",  # cross-attention output projections only: official SDXL-Training
    "to_out_to_v": r"\.(to_out|to_v)\.",   # the commented-out SVD-v2-Training selection
    "all": r"",                            # the whole UNet: official SVD-v2-Training, ControlNeXt-F
    "joint_to_out": r"\.attn\.to(_add)?_out\.",  # MMDiT: both streams' joint-attention outputs (ours, issue 19)
}
LORA_DEFAULT_SELECTION = "to_out"  # `lora:R` alone puts adapters where the official SD1.5 code trains weights


class LoRALinear(nn.Linear):
    """nn.Linear (same `weight`/`bias` keys, frozen) plus a rank-r update: y = W x + b + (alpha/r) B A x."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_scale = (alpha if alpha is not None else rank) / rank  # alpha defaults to r (checkpoints.md §11)
        self.init_weights()

    def init_weights(self) -> None:
        """A: Kaiming-uniform (nn.Linear default); B: zero, so the adapter starts as an exact no-op."""
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_scale * self.lora_up(self.lora_down(x))

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha/r) B A (for saving as increments or sampling without the adapter)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.lora_scale * self.lora_up.weight @ self.lora_down.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def parse_selection(selection: str) -> tuple[str, int]:
    """"to_out" -> ("to_out", 0); "lora:8" -> ("to_out", 8); "lora:8:attn2_to_out" -> ("attn2_to_out", 8)."""
    parts = selection.split(":")
    if parts[0] == "lora" and len(parts) in (2, 3) and parts[1].isdigit() and int(parts[1]) > 0:
        preset = parts[2] if len(parts) == 3 else LORA_DEFAULT_SELECTION
        if preset in SELECTIONS:
            return preset, int(parts[1])
    elif len(parts) == 1 and selection in SELECTIONS:
        return selection, 0
    raise ValueError(f"unknown UNet selection {selection!r}; expected one of {sorted(SELECTIONS)}, "
                     f"'lora:R' or 'lora:R:<preset>' with an integer rank R > 0")


def selected_names(model: nn.Module, preset: str) -> list[str]:
    """Parameter names of `model` the preset's regex selects (meta-device models work: nothing is touched)."""
    pattern = re.compile(SELECTIONS[preset])
    return [name for name, _ in model.named_parameters() if pattern.search(name)]


def add_lora(unet: nn.Module, preset: str, rank: int) -> dict[str, nn.Parameter]:
    """Swap every nn.Linear owning a selected weight for a LoRALinear; return the new adapter parameters."""
    owners = {name.rsplit(".", 1)[0] for name in selected_names(unet, preset)}
    params: dict[str, nn.Parameter] = {}
    for owner in sorted(owners):
        module = unet.get_submodule(owner)
        if type(module) is not nn.Linear:
            continue  # LoRA only on Linear layers; a preset's biases or norms stay frozen
        parent_name, _, child = owner.rpartition(".")
        lora = LoRALinear(module, rank)
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, lora)
        params.update({f"{owner}.{n}": p for n, p in lora.named_parameters() if n.startswith("lora_")})
    return params


def merge_lora(unet: nn.Module) -> nn.Module:
    """Fold every LoRALinear back into a plain nn.Linear (in place)."""
    for name, module in list(unet.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, module.merged())
    return unet


def select_trainable(unet: nn.Module, selection: str) -> dict[str, nn.Parameter]:
    """Freeze the UNet, then unfreeze (or add LoRA to) what `selection` picks; {our key name: Parameter}."""
    preset, rank = parse_selection(selection)
    unet.requires_grad_(False)
    if rank:
        params = add_lora(unet, preset, rank)
    else:
        named = dict(unet.named_parameters())
        params = {name: named[name] for name in selected_names(unet, preset)}
    for p in params.values():
        p.requires_grad_(True)
    return params


def count_selected(unet: nn.Module, selection: str) -> int:
    """Trainable UNet parameters a selection gives, without changing the model (LoRA: r*(in+out) per Linear)."""
    preset, rank = parse_selection(selection)
    named = dict(unet.named_parameters())
    if not rank:
        return sum(named[n].numel() for n in selected_names(unet, preset))
    owners = {n.rsplit(".", 1)[0] for n in selected_names(unet, preset)}
    linears = [unet.get_submodule(o) for o in owners if type(unet.get_submodule(o)) is nn.Linear]
    return sum(rank * (m.in_features + m.out_features) for m in linears)
