"""Checkpoint I/O and the one key-map engine (STYLE.md §4).

Reads safetensors / torch files / diffusers folders into flat state dicts, renames keys with prefix-level rows
(`(source_prefix, our_prefix[, transform])`, `{name}` placeholders match an integer), and loads into a model with
strict accounting: every source key is used, every target is filled, every shape matches, or one error lists
what is wrong under the names the user's file uses. Nothing is loaded until everything checks out.

Matching rule: for each key the row with the longest matching source prefix wins (order-independent), a row
mapping to None drops the key, and a key no row matches keeps its name (identity: our module names equal the
diffusers names). Reference for the formats: ../shared/reference/checkpoints.md §1, §7.
Left out: pickled modules (only `torch.load(weights_only=True)`), downloads of any kind.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

Row = tuple[str, str | None] | tuple[str, str | None, str]
StateDict = dict[str, Tensor]

# ---------------------------------------------------------------------------------------------------------------------
# Reading and writing files
# ---------------------------------------------------------------------------------------------------------------------

# Weight file names of diffusers / transformers folders, in the order we look for them.
FOLDER_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


def read_file(path: str | Path) -> StateDict:
    """All tensors of one weight file: .safetensors directly, .ckpt/.pt/.pth/.bin through torch.load(weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses pickled objects; zip errors mean truncation
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({e}); "
                             "use the .safetensors version of this checkpoint") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # LDM / Lightning .ckpt: tensors sit under "state_dict"
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise ValueError(f"{path}: does not hold a flat dict of tensors")
        return dict(obj)
    raise ValueError(f"{path}: unknown weight file type {path.suffix!r} (expected .safetensors, .ckpt, .pt, .bin)")


def read_folder(folder: str | Path) -> StateDict:
    """Tensors of a diffusers/transformers model folder (single file or sharded with an index json)."""
    folder = Path(folder)
    for name in INDEX_FILES:
        if (folder / name).is_file():
            weight_map = json.loads((folder / name).read_text())["weight_map"]
            state: StateDict = {}
            for shard in sorted(set(weight_map.values())):
                state.update(read_file(folder / shard))
            return state
    for name in FOLDER_WEIGHT_FILES:
        if (folder / name).is_file():
            return read_file(folder / name)
    raise ValueError(f"{folder}: no weight file found (looked for {', '.join(FOLDER_WEIGHT_FILES)})")


def read_state(source: str | Path | Mapping[str, Tensor]) -> StateDict:
    """A flat state dict from a file, a model folder, or an in-memory mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    return read_folder(source) if Path(source).is_dir() else read_file(source)


def read_torch(path: str | Path) -> object:
    """A torch.save file read with weights_only=True; one clear error if it cannot be (never a hint to unpickle)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, EOF and unpickling errors all mean the same thing here
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ValueError(f"cannot read checkpoint {path}: truncated, corrupt or not a weights-only torch file "
                         f"({type(e).__name__}: {reason})") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file ({} for other files or none)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def list_keys(path: str | Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor in a safetensors file, read from the header only (fixtures, §4.5)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sorted((k, v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__")


def save_state(state: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically: a temporary file in the same folder, then an os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj: object, path: str | Path) -> None:
    """torch.save atomically (training state: optimizer, RNG, step, config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------------------------------
# Named transforms. Each maps (target key, tensor) to {key: tensor}; one source tensor may become several.
# ---------------------------------------------------------------------------------------------------------------------


def _split_qkv(key: str, t: Tensor) -> StateDict:
    # OpenCLIP's fused attention in_proj [3C, ...] -> q, k, v; the row's target prefix holds a literal "{qkv}".
    assert "{qkv}" in key, f"split_qkv row must put {{qkv}} in its target prefix, got {key}"
    return {key.replace("{qkv}", name): part for name, part in zip("qkv", t.chunk(3, dim=0))}


TRANSFORMS: dict[str, Callable[[str, Tensor], StateDict]] = {
    "squeeze_1x1": lambda k, t: {k: t[:, :, 0, 0] if t.ndim == 4 else t},  # 1x1 conv [O,I,1,1] -> Linear [O,I]
    "unsqueeze_1x1": lambda k, t: {k: t[:, :, None, None] if t.ndim == 2 else t},  # Linear -> 1x1 conv
    "transpose": lambda k, t: {k: t.t().contiguous()},  # OpenCLIP x @ W projections -> nn.Linear weight
    "split_qkv": _split_qkv,
    "swap_halves": lambda k, t: {k: torch.cat(t.chunk(2, dim=0)[::-1])},  # SD3 adaLN (shift, scale) <-> (scale, shift)
}
INVERSE_TRANSFORMS = {"squeeze_1x1": "unsqueeze_1x1", "unsqueeze_1x1": "squeeze_1x1", "transpose": "transpose",
                      "swap_halves": "swap_halves"}


# ---------------------------------------------------------------------------------------------------------------------
# The engine: rename with rows, then load with accounting
# ---------------------------------------------------------------------------------------------------------------------


class KeyMap:
    """Compiled rows. `apply` renames a state dict and remembers each new key's source name for error messages."""

    def __init__(self, rows: Iterable[Row]):
        self.literal: dict[str, tuple[str | None, str | None]] = {}  # source prefix -> (target prefix, transform)
        self.patterns: list[tuple[str, re.Pattern, int, str | None, str | None]] = []
        for row in rows:
            source, target, transform = (*row, None) if len(row) == 2 else row
            if transform is not None and transform not in TRANSFORMS:
                raise ValueError(f"key-map row {row}: unknown transform {transform!r}")
            if "{" in source:
                regex = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(source))
                literal_length = len(re.sub(r"\{\w+\}", "", source))  # rank patterns by their fixed text
                self.patterns.append((source, re.compile(regex), literal_length, target, transform))
            else:
                if source in self.literal:
                    raise ValueError(f"key-map source prefix {source!r} appears in two rows")
                self.literal[source] = (target, transform)

    def match(self, key: str) -> tuple[int, str | None, str | None, str] | None:
        """(rank, target prefix, transform, rest of the key) of the longest row matching `key`, or None."""
        best = None
        for end in range(1, len(key) + 1):
            if key[:end] in self.literal:  # the longest literal prefix wins
                target, transform = self.literal[key[:end]]
                best = (end, target, transform, key[end:])
        for _, regex, rank, target, transform in self.patterns:
            m = regex.match(key)
            if m and (best is None or rank > best[0]):
                # fill the matched placeholders only: a transform's own literal ({qkv} of split_qkv) stays for it
                filled = None if target is None else re.sub(r"\{(\w+)\}", lambda p: m.groupdict().get(p[1], p[0]), target)
                best = (rank, filled, transform, key[m.end():])
        return best

    def apply(self, state: Mapping[str, Tensor]) -> tuple[StateDict, dict[str, str]]:
        """Renamed tensors and, for each new key, the source key it came from."""
        out: StateDict = {}
        origin: dict[str, str] = {}
        for key, tensor in state.items():
            found = self.match(key)
            if found is None:
                pieces = {key: tensor}
            else:
                _, target, transform, rest = found
                if target is None:
                    continue  # an explicit drop row
                pieces = TRANSFORMS[transform](target + rest, tensor) if transform else {target + rest: tensor}
            for new_key, value in pieces.items():
                if new_key in out:
                    raise ValueError(f"key map sends both {origin[new_key]!r} and {key!r} to {new_key!r}")
                out[new_key], origin[new_key] = value, key
        return out, origin

    def inverse(self) -> KeyMap:
        """Rows for export (ours -> source layout). Drop rows and splitting transforms have no inverse."""
        rows: list[Row] = []
        for source, (target, transform) in self.literal.items():
            assert transform is None or transform in INVERSE_TRANSFORMS, f"transform {transform} cannot be inverted"
            if target is not None:
                rows.append((target, source, INVERSE_TRANSFORMS[transform]) if transform else (target, source))
        for source, _, _, target, transform in self.patterns:
            assert transform is None or transform in INVERSE_TRANSFORMS, f"transform {transform} cannot be inverted"
            if target is not None:
                rows.append((target, source, INVERSE_TRANSFORMS[transform]) if transform else (target, source))
        return KeyMap(rows)


def check_state(model: nn.Module, state: Mapping[str, Tensor], origin: Mapping[str, str], *, what: str,
                partial: bool = False) -> None:
    """Raise one ValueError listing unexpected, missing (unless partial) and wrong-shape keys, in source names."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unexpected = sorted(origin.get(k, k) for k in state if k not in expected)
    missing = [] if partial else sorted(k for k in expected if k not in state)
    wrong = sorted(f"{origin.get(k, k)}: file {tuple(v.shape)} vs model {expected[k]}"
                   for k, v in state.items() if k in expected and tuple(v.shape) != expected[k])
    if unexpected or missing or wrong:
        lines = [f"{what}: the weights do not fit the model "
                 f"({len(unexpected)} unexpected, {len(missing)} missing, {len(wrong)} wrong shape)"]
        for title, keys in (("unexpected keys (in the file, not in the model)", unexpected),
                            ("missing keys (in the model, not in the file)", missing),
                            ("wrong shapes", wrong)):
            if keys:
                lines.append(f"  {title}:")
                lines += [f"    {k}" for k in keys[:25]] + ([f"    ... and {len(keys) - 25} more"] if len(keys) > 25 else [])
        raise ValueError("\n".join(lines))


def load_into(model: nn.Module, state: Mapping[str, Tensor], origin: Mapping[str, str] | None = None, *,
              what: str = "model", mode: str = "strict") -> nn.Module:
    """Copy `state` into `model` after full accounting. mode="strict": every key; "partial": a subset, summarised.

    A model built on the meta device gets the tensors assigned (no second copy in memory), cast to the dtype of the
    model's parameters. Nothing is written unless every check passes.
    """
    if mode not in ("strict", "partial"):
        raise ValueError(f"load mode must be 'strict' or 'partial', got {mode!r}")
    origin = origin or {}
    check_state(model, state, origin, what=what, partial=mode == "partial")
    targets = model.state_dict()
    on_meta = any(t.is_meta for t in targets.values())
    with torch.no_grad():
        if on_meta:
            if mode == "partial":
                raise ValueError(f"{what}: a partial load needs a materialised model, not one on the meta device")
            model.load_state_dict({k: v.to(targets[k].dtype) for k, v in state.items()}, strict=True, assign=True)
        else:
            for key, value in state.items():
                targets[key].copy_(value)
    if mode == "partial":
        print(f"{what}: loaded {len(state)} of {len(targets)} tensors "
              f"({sum(v.numel() for v in state.values()):,} parameters)")
    leftovers = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftovers, f"{what}: tensors left on the meta device after loading: {leftovers[:5]}"
    return model


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> StateDict:
    """The tensors under `prefix`, with the prefix removed (e.g. `model.diffusion_model.` of a single file)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------------------
# --- Shared by the loaders: a folder's config.json, the diffusers folder and original single-file writers
# ---------------------------------------------------------------------------------------------------------------------


def config_or_folder_json(source: str | Path | Mapping[str, Tensor], config):
    """`config` if given, else the fields of a model folder's config.json, else None."""
    if config is None and not isinstance(source, Mapping) and (Path(source) / "config.json").is_file():
        return json.loads((Path(source) / "config.json").read_text())
    return config


def save_diffusers_folder(state: Mapping[str, Tensor], config_json: dict, folder: str | Path) -> None:
    """A diffusers model folder: config.json and diffusion_pytorch_model.safetensors (written atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))


def save_single_file(state: Mapping[str, Tensor], rows: list[Row], prefix: str, path: str | Path) -> None:
    """Our names -> an original single-file layout: the inverse of `rows`, every key under `prefix`."""
    renamed, _ = KeyMap(rows).inverse().apply(state)
    save_state({prefix + k: v for k, v in renamed.items()}, path)


# ---------------------------------------------------------------------------------------------------------------------
# --- UNets (issues 2 and 8): load_unet / save_unet (SD1.x, SD2.x, SDXL), load_svd_unet / save_svd_unet (SVD)
# ---------------------------------------------------------------------------------------------------------------------

ORIGINAL_UNET_PREFIX = "model.diffusion_model."  # LDM/SGM single files (checkpoints.md §2.1)


def _read_unet(source: str | Path | Mapping[str, Tensor], where: str) -> StateDict:
    """The UNet tensors of `source`, in either layout: other components of a single file are not ours."""
    state = read_state(source)
    if any(k.startswith(ORIGINAL_UNET_PREFIX) for k in state):
        state = strip_prefix(state, ORIGINAL_UNET_PREFIX)
    if not any(k.startswith(("conv_in.", "input_blocks.0.0.")) for k in state):
        raise ValueError(f"{where}: not a UNet checkpoint (no conv_in / input_blocks.0.0 weights; "
                         f"first keys: {sorted(state)[:3]})")
    return state


def _build_and_load(model_class, cfg, state: StateDict, rows: list[Row], dtype: torch.dtype, what: str) -> nn.Module:
    """Rename with `rows` (none for the diffusers layout), build on meta, load with full accounting."""
    renamed, origin = KeyMap(rows).apply(state)
    with torch.device("meta"):
        model = model_class(cfg)
    return load_into(model.to(dtype), renamed, origin, what=what)


def load_unet(source: str | Path | Mapping[str, Tensor], config=None, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Our UNet with the weights of `source`: a diffusers or original single file, a diffusers `unet/` folder, or a
    state dict. `config`: a preset name, a UNetConfig, or diffusers config.json fields; by default the folder's
    config.json, else detected from the weights. Every key is accounted for; nothing is half-loaded."""
    from unet.keymap import detect_unet_preset, unet_config_from_diffusers, unet_original_rows
    from unet.sd_unet import PRESETS, UNet, UNetConfig

    where = "state dict" if isinstance(source, Mapping) else str(source)
    config = config_or_folder_json(source, config)
    state = _read_unet(source, where)
    if isinstance(config, Mapping):
        config = unet_config_from_diffusers(config)
    elif not isinstance(config, UNetConfig):
        name = config if config is not None else detect_unet_preset(state)
        if name not in PRESETS:
            raise ValueError(f"{where}: cannot tell which UNet this is (got config {name!r}); "
                             f"pass config= one of {sorted(PRESETS)}, a UNetConfig or a diffusers config dict")
        config = PRESETS[name]
    rows = unet_original_rows(config) if any(k.startswith("input_blocks.") for k in state) else []
    return _build_and_load(UNet, config, state, rows, dtype, f"UNet from {where}")


def save_unet(model: nn.Module, path: str | Path, layout: str = "diffusers") -> None:
    """Write a UNet for other tools: "diffusers" -> folder with config.json + diffusion_pytorch_model.safetensors;
    "original" -> one .safetensors with `model.diffusion_model.` keys (LDM/SGM names)."""
    from unet.keymap import unet_config_to_diffusers, unet_original_rows

    if layout == "diffusers":
        save_diffusers_folder(model.state_dict(), unet_config_to_diffusers(model.config), path)
    elif layout == "original":
        save_single_file(model.state_dict(), unet_original_rows(model.config), ORIGINAL_UNET_PREFIX, path)
    else:
        raise ValueError(f"unknown layout {layout!r} (expected 'diffusers' or 'original')")


def load_svd_unet(source: str | Path | Mapping[str, Tensor], config=None, *,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """Our SVDUNet with the weights of `source`: the original single file (svd*.safetensors, `model.diffusion_model.`),
    a diffusers `unet/` folder or file, or a state dict in either layout. `config`: a preset name, an SVDUNetConfig
    or diffusers config.json fields; by default the folder's config.json, else svd_xt for full-size weights.
    Every key is accounted for; nothing is half-loaded."""
    from unet.keymap import svd_unet_config_from_diffusers, svd_unet_original_rows
    from unet.svd_unet import PRESETS, SVD_XT, SVDUNet, SVDUNetConfig

    where = "state dict" if isinstance(source, Mapping) else str(source)
    config = config_or_folder_json(source, config)
    state = _read_unet(source, where)
    if not any(".time_stack." in k or ".temporal_res_block." in k for k in state):
        raise ValueError(f"{where}: an image UNet (no temporal layers); load it with load_unet")
    if isinstance(config, Mapping):
        config = svd_unet_config_from_diffusers(config)
    elif config is None:
        # svd, svd_xt and svd_xt_1_1 have the same keys and shapes (§1 detection): full-size weights get svd_xt,
        # whose only difference from svd is the default frame count.
        conv_in = state.get("conv_in.weight", state.get("input_blocks.0.0.weight"))
        if tuple(conv_in.shape) != (SVD_XT.channels[0], SVD_XT.in_channels, 3, 3):
            raise ValueError(f"{where}: cannot tell which SVD UNet this is (not full size); pass config= one of "
                             f"{sorted(PRESETS)}, an SVDUNetConfig or a diffusers config dict")
        config = SVD_XT
    elif not isinstance(config, SVDUNetConfig):
        if config not in PRESETS:
            raise ValueError(f"{where}: unknown SVD UNet preset {config!r} (expected one of {sorted(PRESETS)})")
        config = PRESETS[config]
    rows = svd_unet_original_rows(config) if any(k.startswith("input_blocks.") for k in state) else []
    return _build_and_load(SVDUNet, config, state, rows, dtype, f"SVD UNet from {where}")


def save_svd_unet(model: nn.Module, path: str | Path, layout: str = "diffusers") -> None:
    """Write an SVDUNet for other tools: "diffusers" -> folder with config.json + diffusion_pytorch_model.safetensors;
    "original" -> one .safetensors with `model.diffusion_model.` keys (SGM VideoUNet names)."""
    from unet.keymap import svd_unet_config_to_diffusers, svd_unet_original_rows

    if layout == "diffusers":
        save_diffusers_folder(model.state_dict(), svd_unet_config_to_diffusers(model.config), path)
    elif layout == "original":
        save_single_file(model.state_dict(), svd_unet_original_rows(model.config), ORIGINAL_UNET_PREFIX, path)
    else:
        raise ValueError(f"unknown layout {layout!r} (expected 'diffusers' or 'original')")


# ---------------------------------------------------------------------------------------------------------------------
# --- CLIP encoders (issue 9): text towers (SD1.5 / SD2 / SDXL) and SVD's image tower, rows in encoders/keymap.py
# ---------------------------------------------------------------------------------------------------------------------


def _clip_tower(state: StateDict, config: "CLIPConfig | None", prefix: str | None) -> tuple[str, list[Row]]:
    """(prefix, rows) of the CLIP tower in `state`: a single-file prefix (§2.1), else bare OpenCLIP or HF names."""
    from encoders import keymap as clip_keymap

    present = [p for p in clip_keymap.SINGLE_FILE if any(k.startswith(p) for k in state)]
    if prefix is not None:
        if not any(k.startswith(prefix) for k in state):
            raise ValueError(f"no keys start with prefix {prefix!r}")
        present = [prefix]
    if len(present) > 1:  # SDXL holds two text towers: keep the one the config fits
        fits = [p for p in present if config is not None and _clip_fits(state, p, clip_keymap.SINGLE_FILE[p], config)]
        if len(fits) != 1:
            raise ValueError(f"the weights hold several CLIP towers ({', '.join(present)}) and "
                             f"{'no config was given' if config is None else f'{len(fits)} fit the config'}: "
                             "pass a config that fits one of them, or prefix=")
        present = fits
    if present and present[0] in clip_keymap.SINGLE_FILE:
        return present[0], clip_keymap.SINGLE_FILE[present[0]]
    start = present[0] if present else ""
    keys = [k[len(start):] for k in state if k.startswith(start)]
    if any(k.startswith(("transformer.resblocks.", "visual.", "token_embedding.")) for k in keys):  # OpenCLIP names
        vision = config.vision if config is not None else not any(k.startswith("token_embedding.") for k in keys)
        return start, clip_keymap.OPENCLIP_VISION if vision else clip_keymap.OPENCLIP_TEXT
    return start, clip_keymap.HF_TEXT + clip_keymap.HF_VISION


def _clip_fits(state: StateDict, prefix: str, rows: list[Row], config: "CLIPConfig") -> bool:
    """Whether the tower under `prefix` has exactly the keys and shapes of `config`'s model."""
    from encoders.clip import build_clip

    renamed, _ = KeyMap(rows).apply(strip_prefix(state, prefix))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_clip(config).state_dict().items()}
    return expected == {k: tuple(v.shape) for k, v in renamed.items()}


def load_clip(source: str | Path | Mapping[str, Tensor], config: "CLIPConfig | None" = None, *,
              prefix: str | None = None, dtype: torch.dtype = torch.float32) -> "CLIPTextModel | CLIPVisionModel":
    """A CLIP tower from an HF folder (text_encoder/, text_encoder_2/, image_encoder/), a file or a state dict.

    The layout is detected: an original single file (SD1.5, SD2, SDXL: pass the config or prefix= to choose one of
    its two text towers, SVD), OpenCLIP names, or HF names. The config comes from the folder's config.json, else
    from `config`, else from the one preset in encoders.clip.PRESETS whose shapes fit. Strict accounting throughout.
    """
    from encoders import keymap as clip_keymap
    from encoders.clip import PRESETS, CLIPConfig, build_clip, config_from_hf

    folder_config = None
    if not isinstance(source, Mapping) and (Path(source) / "config.json").is_file():
        folder_config = config_from_hf(json.loads((Path(source) / "config.json").read_text()))
        if config is not None and config != folder_config:
            diff = [f"{f}: config.json {getattr(folder_config, f)!r} vs given {getattr(config, f)!r}"
                    for f in CLIPConfig.__dataclass_fields__ if getattr(folder_config, f) != getattr(config, f)]
            raise ValueError(f"{source}: the given CLIP config does not match config.json ({'; '.join(diff)})")
    config = config or folder_config
    state = read_state(source)
    name = "state dict" if isinstance(source, Mapping) else str(source)
    start, rows = _clip_tower(state, config, prefix)
    renamed, origin = KeyMap(rows).apply(strip_prefix(state, start))
    if not any(k.startswith(("text_model.", "vision_model.")) for k in renamed):
        raise ValueError(f"{name}: no CLIP text or vision tower found (looked for the prefixes "
                         f"{', '.join(clip_keymap.SINGLE_FILE)}, and for HF or OpenCLIP names)")
    if config is None:
        fits = [c for c in PRESETS.values() if _clip_fits(state, start, rows, c)]
        if len(fits) != 1:
            raise ValueError(f"{name}: {'no' if not fits else 'more than one'} preset of encoders.clip.PRESETS "
                             f"fits these CLIP weights: pass config=")
        config = fits[0]
    with torch.device("meta"):
        model = build_clip(config).to(dtype)
    load_into(model, renamed, {k: start + v for k, v in origin.items()},
              what=f"CLIP {'vision' if config.vision else 'text'} tower ({name}, prefix {start or 'none'!r})")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# --- ControlNeXt (issue 4): control branches, UNet weight increments (ΔW), official UNet files
# ---------------------------------------------------------------------------------------------------------------------


def detect_control_branch(state: Mapping[str, Tensor]) -> str:
    """g2 / g1_sd15 / g1_svd from an official control-branch state dict (reference controlnext.md §1.5)."""
    if "scale" not in state:
        return "g2"
    return "g1_svd" if any(k.startswith("embedding.") for k in state) else "g1_sd15"


def load_control_branch(source: str | Path | Mapping[str, Tensor], config=None) -> nn.Module:
    """A ControlNeXt branch from an official or our file, loaded strictly (every key, every shape).
    `config`: a ControlNeXtConfig or a preset name; by default detected from the keys."""
    from controlnext.control_branch import PRESETS, ControlNeXt, ControlNeXtConfig
    from controlnext.keymap import CONTROL_BRANCH_ROWS

    renamed, origin = KeyMap(CONTROL_BRANCH_ROWS).apply(read_state(source))
    config = config if config is not None else detect_control_branch(renamed)
    cfg = config if isinstance(config, ControlNeXtConfig) else PRESETS[config]
    with torch.device("meta"):
        model = ControlNeXt(cfg)
    where = source if not isinstance(source, Mapping) else "state dict"
    return load_into(model, renamed, origin, what=f"ControlNeXt branch from {where}")


def weight_increments(trained: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> StateDict:
    """ΔW = W_trained - W_base for every tensor of `trained` (official `weight_increasements`, our key names)."""
    missing = sorted(k for k in trained if k not in base)
    if missing:
        raise ValueError(f"weight increments: {len(missing)} trained tensors have no base tensor, e.g. {missing[:3]}")
    return {k: trained[k].detach().float() - base[k].detach().float() for k in trained}


def load_unet_weights(unet: nn.Module, source: str | Path | Mapping[str, Tensor], *, increments: bool,
                      what: str = "UNet weights") -> nn.Module:
    """Load a partial UNet file over `unet`: absolute tensors (W = file) or increments (W = W_current + ΔW).
    Accepts our / diffusers names, original `input_blocks.*` names (SDXL kohya-style files) and the
    `unet.`-prefixed DeepSpeed export; every key must land on a UNet tensor of the same shape."""
    from controlnext.keymap import UNET_ROWS
    from unet.keymap import unet_original_rows

    state, origin0 = KeyMap(UNET_ROWS).apply(read_state(source))
    rows = unet_original_rows(unet.config) if any(k.startswith("input_blocks.") for k in state) else []
    renamed, origin = KeyMap(rows).apply(state)
    origin = {k: origin0.get(v, v) for k, v in origin.items()}
    if not increments:
        return load_into(unet, renamed, origin, what=what, mode="partial")
    check_state(unet, renamed, origin, what=what, partial=True)
    targets = unet.state_dict()
    with torch.no_grad():
        for key, delta in renamed.items():
            targets[key].add_(delta.to(device=targets[key].device, dtype=torch.float32).to(targets[key].dtype))
    print(f"{what}: added increments to {len(renamed)} of {len(targets)} tensors "
          f"({sum(v.numel() for v in renamed.values()):,} parameters)")
    return unet


# ---------------------------------------------------------------------------------------------------------------------
# --- VAE (issue 7): load_vae / load_temporal_vae / save_vae, diffusers config.json <-> VAEConfig; rows in vae/keymap.py
# ---------------------------------------------------------------------------------------------------------------------

ORIGINAL_VAE_PREFIX = "first_stage_model."  # LDM/SGM single files (checkpoints.md §2.1)
SVD_EMBEDDER_PREFIX = "conditioner.embedders.3.encoder."  # svd*.safetensors: the conditioning-frame autoencoder (§4.3)

def _vae_source(source, config, temporal: bool, where: str):
    """(state, config object): reads a file, a vae/ folder (or a pipeline folder holding one) or a state dict."""
    from vae.autoencoder import PRESETS as IMAGE_PRESETS, VAEConfig
    from vae.keymap import vae_config_from_diffusers
    from vae.temporal_decoder import PRESETS as VIDEO_PRESETS, TemporalVAEConfig

    if not isinstance(source, Mapping) and (Path(source) / "vae").is_dir():
        source = Path(source) / "vae"  # a whole diffusers pipeline folder
    config = config_or_folder_json(source, config)
    presets, kind = (VIDEO_PRESETS, TemporalVAEConfig) if temporal else (IMAGE_PRESETS, VAEConfig)
    if isinstance(config, Mapping):
        config = vae_config_from_diffusers(config, temporal)
    elif config is None or isinstance(config, str):
        name = config or ("svd" if temporal else "sd")
        if name not in presets:
            raise ValueError(f"{where}: unknown VAE preset {name!r} (expected one of {sorted(presets)})")
        config = presets[name]
    if not isinstance(config, kind):
        raise ValueError(f"{where}: config must be a preset name, a {kind.__name__} or config.json fields")
    return read_state(source), config


def _vae_check(state: Mapping[str, Tensor], where: str) -> None:
    """One clear error for a file that holds no VAE at all (a UNet, a text encoder, ...)."""
    if not any(k.startswith(("encoder.", "decoder.")) for k in state):
        raise ValueError(f"{where}: not a VAE checkpoint (no encoder./decoder. or first_stage_model. weights; "
                         f"first keys: {sorted(state)[:3]})")


def load_vae(source: str | Path | Mapping[str, Tensor], config=None) -> nn.Module:
    """Our AutoencoderKL from a diffusers file/folder, an original single file (`first_stage_model.`; the other
    components are ignored), a standalone LDM VAE file, or a state dict. `config`: a preset name ("sd" by default),
    a VAEConfig, or config.json fields (a folder's config.json is read). Every key is accounted for."""
    from vae.autoencoder import AutoencoderKL
    from vae.keymap import LEGACY_DIFFUSERS_ROWS, SD_VAE_ROWS

    where = "state dict" if isinstance(source, Mapping) else str(source)
    state, cfg = _vae_source(source, config, False, where)
    if any(k.startswith(ORIGINAL_VAE_PREFIX) for k in state):
        state = strip_prefix(state, ORIGINAL_VAE_PREFIX)
    _vae_check(state, where)
    renamed, origin = KeyMap(SD_VAE_ROWS + LEGACY_DIFFUSERS_ROWS).apply(state)  # diffusers names pass through
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    return load_into(model, renamed, origin, what=f"VAE from {where}")


def load_temporal_vae(source: str | Path | Mapping[str, Tensor], config=None) -> nn.Module:
    """Our TemporalAutoencoder (SVD) from the diffusers vae/ (file, folder or state dict), a whole svd*.safetensors
    (encoder + quant_conv from the conditioning embedder, decoder from first_stage_model, §4.3), or a file holding only
    `first_stage_model.` (no quant_conv there: the model is then built without one)."""
    from dataclasses import replace

    from vae.keymap import LEGACY_DIFFUSERS_ROWS, SVD_FIRST_STAGE_ROWS, SVD_RELEASE_ROWS
    from vae.temporal_decoder import TemporalAutoencoder

    where = "state dict" if isinstance(source, Mapping) else str(source)
    state, cfg = _vae_source(source, config, True, where)
    if SVD_EMBEDDER_PREFIX + "encoder.conv_in.weight" in state:
        rows = SVD_RELEASE_ROWS
    else:
        if any(k.startswith(ORIGINAL_VAE_PREFIX) for k in state):
            state = strip_prefix(state, ORIGINAL_VAE_PREFIX)
        _vae_check(state, where)
        rows = SVD_FIRST_STAGE_ROWS + LEGACY_DIFFUSERS_ROWS
    renamed, origin = KeyMap(rows).apply(state)
    if "quant_conv.weight" not in renamed and "quant_conv.bias" not in renamed:
        cfg = replace(cfg, use_quant_conv=False)  # SGM's first stage has no quant_conv (§2.1)
    with torch.device("meta"):
        model = TemporalAutoencoder(cfg)
    return load_into(model, renamed, origin, what=f"temporal VAE from {where}")


def save_vae(model: nn.Module, path: str | Path, layout: str = "diffusers") -> None:
    """Write an AutoencoderKL or TemporalAutoencoder. "diffusers": a folder with config.json and
    diffusion_pytorch_model.safetensors. "original": one .safetensors in the single-file layout: `first_stage_model.`
    (SD); for SVD also the encoder and quant_conv under `conditioner.embedders.3.encoder.`, as the release keeps them."""
    from vae.keymap import ENCODER_ROWS, SD_VAE_ROWS, SVD_RELEASE_ROWS, vae_config_to_diffusers
    from vae.temporal_decoder import TemporalAutoencoder

    state = model.state_dict()
    if layout == "diffusers":
        save_diffusers_folder(state, vae_config_to_diffusers(model.config), path)
    elif layout == "original" and isinstance(model, TemporalAutoencoder):
        out, _ = KeyMap(SVD_RELEASE_ROWS).inverse().apply(state)
        encoder, _ = KeyMap(ENCODER_ROWS).inverse().apply({k: v for k, v in state.items() if k.startswith("encoder.")})
        out.update({ORIGINAL_VAE_PREFIX + k: v.clone() for k, v in encoder.items()})  # SGM's first stage keeps a copy
        save_state(out, path)
    elif layout == "original":
        save_single_file(state, SD_VAE_ROWS, ORIGINAL_VAE_PREFIX, path)
    else:
        raise ValueError(f"unknown layout {layout!r} (expected 'diffusers' or 'original')")
