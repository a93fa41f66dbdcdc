"""LoRA files (kohya / sd-scripts, diffusers / PEFT, old diffusers attention processors) onto our UNet and CLIP towers.

Paper: Hu et al. 2021, LoRA (arXiv 2106.09685) Eq. 3: W' = W + (alpha / r) B A; ControlNeXt's pipelines load LoRAs
on the base model (dvlab-research/ControlNeXt@ab4b3ac ControlNeXt-SDXL/utils/tools.py `load_lora_weights`;
../shared/reference/controlnext.md §5). Formats: ../shared/reference/checkpoints.md §11. kohya-ss/sd-scripts@02298e3
networks/lora.py (LoRAModule, merge_to) writes `lora_<unet|te|te1|te2>_<module path, "." -> "_">.lora_down.weight /
.lora_up.weight / .alpha`, scale alpha / r with alpha 0 or absent meaning r (SD1.5 on diffusers names, SDXL on the
original LDM names, decoded here through unet/keymap.py's rows); diffusers /
PEFT write `<unet|text_encoder|text_encoder_2>.<path>.lora_A/lora_B.weight` with alpha in the safetensors metadata
(`lora_adapter_metadata`) or, for a PEFT folder, adapter_config.json; diffusers < 0.21 wrote
`<path>.processor.to_q_lora.down.weight` (no alpha). The kohya names are matched exactly against the flattened
names of our layers, never split on "_". Conv LoRA (LoCon): down [r, in, kh, kw] with the layer's stride and
padding, up [r -> out] 1x1, merged as kohya does: (up.flatten(1) @ down.flatten(1)).reshape(out, in, kh, kw).

Modes: "merge" adds multiplier * scale * B A to the weights in place; "adapter" swaps each target for an
nn.Linear / nn.Conv2d subclass that shares the layer's parameters (state-dict keys unchanged) and adds named LoRAs,
each with its own multiplier, switchable with `set_lora_multiplier` and removable with `remove_lora` (plain layers
only: a training-time controlnext/selection.py LoRALinear takes merge mode).
Strict accounting: every tensor of the file must be one of a LoRA pair (or its alpha) and every pair must land on a
Linear / Conv2d of the right shape; otherwise one ValueError lists what did not, and nothing is modified.
Left out (rejected with their name): LoHa, LoKr, DoRA, LoCon's Tucker `lora_mid`, LoRA biases, full `diff` weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from controlnext.checkpoint import KeyMap, read_state
from encoders.keymap import HF_TEXT
from unet.keymap import unet_original_rows

MODES = ("merge", "adapter")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # diffusers' pipeline attribute names

# Each LoRA key is one of these (first match wins). Groups: comp (component prefix, may be absent for old
# attention-processor files: the UNet), path (the module as the file names it), proj (attention-processor
# projection), role (which tensor).
KEY_FORMATS = [
    ("kohya", re.compile(r"lora_(?P<comp>unet|te1|te2|te)_(?P<path>[^.]+)\."
                         r"(?P<role>lora_down\.weight|lora_up\.weight|alpha)")),
    ("peft", re.compile(r"(?P<comp>unet|text_encoder_2|text_encoder|base_model\.model)\.(?P<path>.+)\."
                        r"(?P<role>lora_A\.weight|lora_B\.weight|alpha)")),
    ("attn_procs", re.compile(r"(?:(?P<comp>unet|text_encoder_2|text_encoder)\.)?(?P<path>.+?)\.(?:processor\.)?"
                              r"(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down\.weight|up\.weight)")),
    ("attn_procs", re.compile(r"(?:(?P<comp>unet|text_encoder_2|text_encoder)\.)?(?P<path>.+)\."
                              r"(?:lora_linear_layer|lora)\.(?P<role>down\.weight|up\.weight)")),
]
ROLES = {"lora_down.weight": "down", "lora_A.weight": "down", "down.weight": "down",
         "lora_up.weight": "up", "lora_B.weight": "up", "up.weight": "up", "alpha": "alpha"}
PREFIX_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2",
                    "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "base_model.model": "unet"}
# attention-processor projections -> the layer: the UNet's to_out is a Sequential (to_out.0), CLIP names q/k/v/out_proj
PROCESSOR_LAYERS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
# Other LyCORIS / PEFT variants, recognised by their tensor names so that the error can name them.
UNSUPPORTED = {r"\.hada_": "LoHa", r"\.lokr_": "LoKr", r"\.dora_scale$|lora_magnitude_vector": "DoRA",
               r"\.lora_mid\.": "LoCon Tucker (lora_mid)", r"\.diff(_b)?$": "full weight difference",
               r"\.lora_B\.bias$": "LoRA bias"}
ORIGINAL_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")  # LDM UNet
FOLDER_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin",
                "adapter_model.bin")  # diffusers save_lora_weights, PEFT save_pretrained


@dataclass(frozen=True)
class LoRAWeights:
    down: Tensor          # A: (r, in) for a Linear, (r, in, kh, kw) for a conv
    up: Tensor            # B: (out, r) or (out, r, 1, 1)
    alpha: float          # the file's alpha, else the one given to load_lora, else r (scale 1)
    key: str              # the file's key prefix, for messages
    rslora: bool = False  # PEFT use_rslora: scale alpha / sqrt(r) instead of alpha / r

    @property
    def scale(self) -> float:
        rank = self.down.shape[0]
        return self.alpha / (rank ** 0.5 if self.rslora else rank)

    def delta(self) -> Tensor:
        """(alpha / r) B A in fp32, shaped as the layer's weight: (out, in) or (out, in, kh, kw)."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()  # (out, in * kh * kw)
        return self.scale * product.view(self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True)
class LoRAFile:
    format: str                                  # "kohya", or "peft" / "attn_procs" / both (diffusers family)
    targets: dict[tuple[str, str], LoRAWeights]  # (component, layer as the file names it) -> weights
    name: str = "lora"                           # adapter name in "adapter" mode (file stem by default)


def _read(source: str | Path | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """Tensors and the PEFT alpha settings {component: {lora_alpha, alpha_pattern, use_rslora}} of a file/folder."""
    if isinstance(source, Mapping):
        return dict(source), {}
    path = Path(source)
    config = {}
    if path.is_dir():
        found = [path / f for f in FOLDER_FILES if (path / f).is_file()]
        if not found:
            raise ValueError(f"{path}: no LoRA weight file in the folder (looked for {', '.join(FOLDER_FILES)})")
        if (path / "adapter_config.json").is_file():  # a PEFT folder: one component, unprefixed settings
            config = {"unet": json.loads((path / "adapter_config.json").read_text())}
        path = found[0]
    state = read_state(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "lora_adapter_metadata" in metadata:  # diffusers: one JSON object, keys prefixed by component
            for key, value in json.loads(metadata["lora_adapter_metadata"]).items():
                component, _, field = key.partition(".")
                config.setdefault(component, {})[field] = value
    return state, config


def load_lora(source: str | Path | Mapping[str, Tensor], *, alpha: float | None = None,
              name: str | None = None) -> LoRAFile:
    """Read a LoRA file, folder or state dict; detect its format; pair every down/up (+ alpha). Nothing is applied.
    `alpha`: for targets whose file states none (default: the rank, i.e. scale 1)."""
    state, config = _read(source)
    where = "state dict" if isinstance(source, Mapping) else str(source)
    rejected = {k: v for k, v in ((k, next((n for rx, n in UNSUPPORTED.items() if re.search(rx, k)), None))
                                  for k in state) if v}
    if rejected:
        raise ValueError(f"{where}: {', '.join(sorted(set(rejected.values())))} weights are not supported "
                         f"(plain LoRA only): {_listing(sorted(rejected))}")
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    prefixes: dict[tuple[str, str], str] = {}
    formats, unknown = set(), []
    for key, tensor in state.items():
        found = next(((fmt, m) for fmt, rx in KEY_FORMATS if (m := rx.fullmatch(key))), None)
        if found is None:
            unknown.append(key)
            continue
        fmt, m = found
        component = PREFIX_COMPONENT[m["comp"] or "unet"]
        path = m["path"]
        if fmt == "attn_procs" and m.groupdict().get("proj"):
            path += "." + PROCESSOR_LAYERS["unet" if component == "unet" else "text"][m["proj"]]
        formats.add(fmt)
        parts.setdefault((component, path), {})[ROLES[m["role"]]] = tensor
        prefixes[(component, path)] = key[:m.start("role")].rstrip(".")
    if not parts:
        raise ValueError(f"{where}: not a LoRA file: no key is kohya (lora_unet_*.lora_down.weight), PEFT "
                         f"(unet.*.lora_A.weight) or diffusers attention-processor (*.to_q_lora.down.weight); "
                         f"its keys: {_listing(sorted(state))}")
    if "kohya" in formats and len(formats) > 1:
        raise ValueError(f"{where}: the file mixes kohya keys (lora_unet_*) with diffusers keys ({sorted(formats)})")
    problems = [f"{k}: not a LoRA tensor of the {'/'.join(sorted(formats))} format" for k in sorted(unknown)]
    targets = {}
    for target, p in parts.items():
        key = prefixes[target]
        missing = [role for role in ("down", "up") if role not in p]
        if missing:
            problems.append(f"{key}: no {' and no '.join(missing)} tensor")
            continue
        down, up = p["down"], p["up"]
        if (down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]
                or (up.ndim == 4 and up.shape[2:] != (1, 1))):
            problems.append(f"{key}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a rank-r pair")
            continue
        if "alpha" in p and p["alpha"].numel() != 1:
            problems.append(f"{key}: alpha must be one number, got shape {tuple(p['alpha'].shape)}")
            continue
        settings = config.get(target[0], {})
        stated = float(p["alpha"]) if "alpha" in p else _metadata_alpha(settings, target[1])  # the file's word
        if stated == 0 and formats == {"kohya"}:
            stated = None  # sd-scripts LoRAModule: an alpha of 0 means no scaling, i.e. alpha = r
        fallback = alpha if alpha is not None else float(down.shape[0])
        targets[target] = LoRAWeights(down, up, fallback if stated is None else stated, key,
                                      bool(settings.get("use_rslora", False)))
    if problems:
        raise ValueError(f"{where}: {len(problems)} problems with the LoRA tensors:\n  " + _listing(problems, "\n  "))
    default_name = "lora" if isinstance(source, Mapping) else Path(source).stem.replace(".", "_")
    return LoRAFile("+".join(sorted(formats)), targets, name or default_name)


def _metadata_alpha(settings: Mapping, layer: str) -> float | None:
    """PEFT's alpha for one layer: the first alpha_pattern entry matching its name's end, else lora_alpha."""
    for pattern, value in (settings.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer):  # peft.utils.other.get_pattern_key
            return float(value)
    return None if settings.get("lora_alpha") is None else float(settings["lora_alpha"])


def _listing(items: list[str], sep: str = ", ") -> str:
    """The first ten items, then how many there are in all."""
    return sep.join(items[:10]) + (f"{sep}... ({len(items)} in all)" if len(items) > 10 else "")


# --- adapters: the layer's own parameters plus named low-rank paths (buffers, not saved with the model) --------------


class LoRAPath(nn.Module):
    """One LoRA on one layer: A, B (non-persistent buffers: the model's state dict is unchanged), scale, multiplier."""

    def __init__(self, weights: LoRAWeights, multiplier: float, like: Tensor):
        super().__init__()
        self.register_buffer("down", weights.down.to(like.device, like.dtype), persistent=False)
        self.register_buffer("up", weights.up.to(like.device, like.dtype), persistent=False)
        self.scale = weights.scale
        self.multiplier = multiplier


class LoRAAdaptedLinear(nn.Linear):
    """nn.Linear sharing a layer's weight and bias, plus LoRAs: y = W x + b + sum_k m_k s_k B_k A_k x."""

    def __init__(self, base: nn.Linear):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: nothing copied, keys unchanged
        self.loras = nn.ModuleDict()

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        for lora in self.loras.values():
            out = out + (lora.multiplier * lora.scale) * F.linear(F.linear(x, lora.down), lora.up)  # (..., r) -> out
        return out


class LoRAAdaptedConv2d(nn.Conv2d):
    """nn.Conv2d sharing a layer's parameters, plus LoRAs: A is a conv with the layer's geometry, B a 1x1 conv."""

    def __init__(self, base: nn.Conv2d):
        super().__init__(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                         base.dilation, base.groups, base.bias is not None, base.padding_mode, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.loras = nn.ModuleDict()

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        for lora in self.loras.values():
            h = F.conv2d(x, lora.down, None, self.stride, self.padding, self.dilation)  # (B, r, H', W')
            out = out + (lora.multiplier * lora.scale) * F.conv2d(h, lora.up)  # (B, C_out, H', W')
        return out


ADAPTED = (LoRAAdaptedLinear, LoRAAdaptedConv2d)


def _plain(layer: nn.Module) -> nn.Module:
    """The plain nn.Linear / nn.Conv2d of an adapted layer, sharing its parameters."""
    if isinstance(layer, nn.Conv2d):
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight, plain.bias = layer.weight, layer.bias
    return plain


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Put `layer` where the submodule `name` is (an attribute of its parent; Sequential children too)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


# --- applying ---------------------------------------------------------------------------------------------------------


def _layer_names(model: nn.Module, rows: list, flat: bool) -> dict[str, str]:
    """{name a file may use: our layer name} over every Linear / Conv2d: ours and the names `rows` map to ours
    (original UNet layout; the CLIP towers' unprefixed names), flattened with "_" for kohya files."""
    inverse = KeyMap(rows).inverse()
    names = {}
    for ours, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        found = inverse.match(ours + ".weight")
        theirs = ours if found is None or found[1] is None else (found[1] + found[3]).removesuffix(".weight")
        for alias in {ours, theirs}:
            alias = alias.replace(".", "_") if flat else alias
            assert names.setdefault(alias, ours) == ours, f"layers {names[alias]} and {ours} share the name {alias}"
    return names


def _fits(layer: nn.Module, w: LoRAWeights) -> bool:
    """Whether the pair has the layer's shapes: A takes its input (and kernel), B gives its output."""
    if isinstance(layer, nn.Conv2d):
        return (layer.groups == 1 and layer.padding_mode == "zeros" and w.down.ndim == 4
                and tuple(w.down.shape[1:]) == tuple(layer.weight.shape[1:]) and w.up.shape[0] == layer.out_channels)
    return w.down.ndim == 2 and tuple(layer.weight.shape) == (w.up.shape[0], w.down.shape[1])


def _resolve(models: Mapping[str, nn.Module | None], lora: LoRAFile, mode: str,
             name: str) -> dict[tuple[str, str], LoRAWeights]:
    """{(component, our layer name): weights} for every target, or one ValueError listing all that do not fit."""
    flat = lora.format == "kohya"
    resolved, unmatched, wrong = {}, [], []
    for component in sorted({c for c, _ in lora.targets}):
        targets = {path: w for (c, path), w in lora.targets.items() if c == component}
        model = models.get(component)
        if model is None:
            unmatched += [f"{w.key} (no {component} was given)" for w in targets.values()]
            continue
        rows = HF_TEXT if component != "unet" else []
        if component == "unet" and any(p.startswith(tuple(r + ("_" if flat else ".") for r in ORIGINAL_ROOTS))
                                       for p in targets):
            if getattr(model, "config", None) is None:
                raise ValueError("apply_lora: the LoRA names original-layout UNet layers (input_blocks...): the UNet "
                                 "must carry its config to map them")
            rows = unet_original_rows(model.config)  # an SDXL kohya file: original LDM layer names
        names = _layer_names(model, rows, flat)
        for path, w in targets.items():
            ours = names.get(path)
            if ours is None:
                unmatched.append(w.key)
                continue
            layer = model.get_submodule(ours)
            if not _fits(layer, w):
                wrong.append(f"{w.key}: down {tuple(w.down.shape)}, up {tuple(w.up.shape)} vs {component} layer "
                             f"{ours} {type(layer).__name__} weight {tuple(layer.weight.shape)}")
            elif mode == "adapter" and not isinstance(layer, ADAPTED) and type(layer) not in (nn.Linear, nn.Conv2d):
                wrong.append(f"{w.key}: {component} layer {ours} is a {type(layer).__name__}: adapter mode wraps "
                             "plain nn.Linear / nn.Conv2d layers only (merge it first, or use mode='merge')")
            elif mode == "adapter" and isinstance(layer, ADAPTED) and name in layer.loras:
                wrong.append(f"{w.key}: {component} layer {ours} already has a LoRA named {name!r} (pass name=)")
            elif (component, ours) in resolved:
                wrong.append(f"{w.key}: lands on {component} layer {ours}, as {resolved[(component, ours)].key} does")
            else:
                resolved[(component, ours)] = w
    if unmatched or wrong:
        total = len(lora.targets)
        lines = [f"LoRA {lora.name!r}: none of its {total} targets matches a layer" if len(unmatched) == total else
                 f"LoRA {lora.name!r}: {len(unmatched) + len(wrong)} of {total} targets do not fit; nothing was applied"]
        if unmatched:
            lines.append(f"  matching no layer ({len(unmatched)}): {_listing(sorted(unmatched))}")
        if wrong:
            lines.append(f"  not fitting ({len(wrong)}):\n    " + _listing(sorted(wrong), "\n    "))
        raise ValueError("\n".join(lines))
    return resolved


def apply_lora(unet: nn.Module | None, text_encoders: Mapping[str, nn.Module] | None, lora: LoRAFile,
               multiplier: float = 1.0, mode: str = "merge", name: str | None = None) -> list[str]:
    """Apply `lora` to the UNet (diffusers layer names) and the text towers ({"text_encoder": CLIP-L,
    "text_encoder_2": bigG}, HF names). merge: W += multiplier * scale * B A; adapter: add it as LoRA `name`
    (default lora.name). Every target must fit, else nothing changes. Returns "component:layer" of each target."""
    if mode not in MODES:
        raise ValueError(f"apply_lora: mode must be one of {MODES}, got {mode!r}")
    models = {"unet": unet, **(text_encoders or {})}
    if set(models) - set(COMPONENTS):
        raise ValueError(f"apply_lora: text_encoders keys must be among {COMPONENTS[1:]}, got {sorted(text_encoders)}")
    name = name or lora.name
    if mode == "adapter" and (not name or "." in name):
        raise ValueError(f"apply_lora: adapter name must be non-empty without '.', got {name!r}")
    resolved = _resolve(models, lora, mode, name)
    with torch.no_grad():
        for (component, ours), w in resolved.items():
            model = models[component]
            layer = model.get_submodule(ours)
            if mode == "merge":
                layer.weight.copy_(layer.weight.float() + multiplier * w.delta().to(layer.weight.device))
                continue
            if not isinstance(layer, ADAPTED):
                layer = LoRAAdaptedConv2d(layer) if isinstance(layer, nn.Conv2d) else LoRAAdaptedLinear(layer)
                _replace(model, ours, layer)
            layer.loras[name] = LoRAPath(w, multiplier, layer.weight)
    return sorted(f"{component}:{ours}" for component, ours in resolved)


def set_lora_multiplier(model: nn.Module, name: str, multiplier: float) -> int:
    """Set the multiplier of adapter `name` in every layer of `model` that has it (0 switches it off); count."""
    layers = [m for m in model.modules() if isinstance(m, ADAPTED) and name in m.loras]
    if not layers:
        present = sorted({n for m in model.modules() if isinstance(m, ADAPTED) for n in m.loras})
        raise ValueError(f"no LoRA adapter named {name!r} in this model (present: {present})")
    for layer in layers:
        layer.loras[name].multiplier = multiplier
    return len(layers)


def remove_lora(model: nn.Module, name: str) -> int:
    """Remove adapter `name`; layers left without LoRAs become plain nn.Linear / nn.Conv2d again. Count of layers."""
    count = 0
    for ours, layer in list(model.named_modules()):
        if isinstance(layer, ADAPTED) and name in layer.loras:
            del layer.loras[name]
            count += 1
            if not layer.loras:
                _replace(model, ours, _plain(layer))
    if not count:
        raise ValueError(f"no LoRA adapter named {name!r} in this model")
    return count
