"""The checkpoint engine (STYLE.md §4): read and write weight files and folders, rename keys with data rows, load
with strict accounting. The model loaders built on it are controlnext/loaders.py and controlnext/releases.py.

- Reading: safetensors (an 8-byte header length, a JSON header, raw bytes; checkpoints.md §1) is parsed here so that
  each tensor gets its own copy-on-write memory map: nothing is read before it is used, and a tensor cast to another
  dtype frees its pages at once. Torch files go through torch's weights-only unpickler; the training objects legacy
  .ckpt files pickle beside the tensors (Lightning's ModelCheckpoint, numpy scalars) unpickle to an inert stub, as
  the common web UIs' restricted unpicklers do; any other Python object is an error that names it. Every failure is
  one ValueError "cannot read checkpoint PATH: <reason>", which never suggests unsafe loading.
- Renaming: rows `(source_prefix, our_prefix[, transform])`; `{name}` matches an integer, `{qkv}` one of q, k, v; the
  longest matching source prefix wins (order-independent); a row to None drops the key; unmatched keys keep their
  name (our module names equal the diffusers names). `KeyMap.inverse()` is the export direction.
- Loading: every source key used, every target filled, every shape equal, or one error listing what is wrong in the
  file's own names, before anything is written. A model built on the meta device gets the (mapped) tensors
  assigned in their stored dtype, cast only when a dtype is asked for.
- Writing: a file via a temporary sibling and os.replace; a model folder staged whole beside its place, then swapped
  in, so a failure leaves the old folder whole. Modes follow the umask.
Left out: downloads of any kind, pickled modules, big-endian safetensors.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from controlnext.meta import assign

Row = tuple[str, str | None] | tuple[str, str | None, str]
StateDict = dict[str, Tensor]

# --- reading -----------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Weight files of diffusers / transformers model folders, in the order we look for them (checkpoints.md §7.1).
FOLDER_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                       "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                       "diffusion_pytorch_model.bin", "pytorch_model.bin")
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


class _Inert:
    """What an allow-listed training object unpickles to: it runs no code and keeps nothing."""

    def __init__(self, *args, **kwargs): ...

    def __setstate__(self, state): ...


# Objects legacy SD1.x .ckpt files pickle beside their tensors (Lightning callback state, numpy scalars and arrays of
# its scores, under numpy 1 and numpy 2 names). Read as _Inert; the tensors the loaders want are never among them.
INERT_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                 "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
                 "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
                 "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                 "numpy.dtype", "numpy.ndarray")


def cannot_read(path: str | Path, reason: str) -> ValueError:
    return ValueError(f"cannot read checkpoint {path}: {reason}")


def read_header(path: str | Path) -> tuple[dict, int]:
    """The checked JSON header of a safetensors file and the byte offset where its tensor data begins."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            raise cannot_read(path, f"not a readable safetensors file (a header of {length} bytes in {size} bytes:"
                                    " truncated, or not safetensors)")
        try:
            header = json.loads(f.read(length))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            raise cannot_read(path, "not a readable safetensors file (its header is not JSON)") from None
    data_bytes = size - 8 - length
    for name, info in (header.items() if isinstance(header, dict) else [("header", None)]):
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape, dtype = info["shape"], SAFETENSORS_DTYPES[info["dtype"]]
            numel = torch.Size(shape).numel()
            fits = 0 <= begin <= end <= data_bytes and end - begin == numel * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits:
            raise cannot_read(path, f"not a readable safetensors file (the entry of {name!r} does not fit "
                                    f"the {data_bytes} data bytes: truncated or corrupt)")
    return header, 8 + length


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file (train.py writes the run config there); {} if none."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise ValueError(f"{path}: not a .safetensors file" + ("" if path.is_file() else " (not found)"))
    return dict(read_header(path)[0].get("__metadata__") or {})


def _read_safetensors(path: Path) -> StateDict:
    header, start = read_header(path)
    state: StateDict = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            if begin == end:
                state[name] = torch.empty(shape, dtype=dtype)
                continue
            # One copy-on-write map per tensor (a whole-file map would keep every page resident until the last
            # tensor is gone); maps start on an allocation-granularity boundary.
            offset = start + begin
            aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
            pages = mmap.mmap(f.fileno(), start + end - aligned, access=mmap.ACCESS_COPY, offset=aligned)
            flat = torch.frombuffer(pages, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=offset - aligned)
            state[name] = flat.reshape(shape)
    return state


def read_torch(path: str | Path) -> object:
    """The object in a torch file (a .ckpt, a .bin, a training state .pt), read without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise cannot_read(path, "the file is empty")
    try:
        with torch.serialization.safe_globals([(_Inert, name) for name in INERT_GLOBALS]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # torch's advice (which suggests unsafe loading) is deliberately not passed on
            raise cannot_read(path, f"it stores the Python object {found[1]!r}, which is not on this reader's list "
                                    "of inert objects; only tensors and known training objects are read") from None
        raise cannot_read(path, "not a torch checkpoint (its contents do not unpickle)") from None
    except Exception:  # truncated zip archives, bad magic numbers, early EOF, ...: torch raises many types
        raise cannot_read(path, "truncated or corrupt (not a complete torch file)") from None


def read_file(path: str | Path) -> StateDict:
    """All tensors of one weight file: .safetensors (memory-mapped) or a torch file (its `state_dict` if it has one)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        obj = read_torch(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # LDM / Lightning .ckpt: the tensors sit under "state_dict"
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise cannot_read(path, "it does not hold a flat dict of tensors")
        return dict(obj)
    raise ValueError(f"{path}: unknown weight file type {path.suffix!r} "
                     f"(expected .safetensors or {', '.join(TORCH_SUFFIXES)})")


def read_folder(folder: str | Path) -> StateDict:
    """Tensors of a diffusers/transformers model folder (one weight file, or shards listed by an index json)."""
    folder = Path(folder)
    for name in INDEX_FILES:
        if (folder / name).is_file():
            try:
                shards = sorted(set(json.loads((folder / name).read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise cannot_read(folder / name, "not a shard index (no weight_map object)") from None
            return {k: v for shard in shards for k, v in read_file(folder / shard).items()}
    for name in FOLDER_WEIGHT_FILES:
        if (folder / name).is_file():
            return read_file(folder / name)
    raise ValueError(f"{folder}: no weight file found (looked for {', '.join(FOLDER_WEIGHT_FILES)})")


def read_state(source: str | Path | Mapping[str, Tensor]) -> StateDict:
    """A flat state dict from a file, a model folder, or an in-memory mapping (copied, not cloned)."""
    if isinstance(source, Mapping):
        return dict(source)
    return read_folder(source) if Path(source).is_dir() else read_file(source)


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> StateDict:
    """The tensors under `prefix`, with the prefix removed (e.g. `model.diffusion_model.` of a single file)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --- writing -----------------------------------------------------------------------------------------------------

# What a model folder may hold for write_folder to replace it: anything else means the path is not ours to delete.
MODEL_FOLDER_FILE = re.compile(r"(config\.json|.+\.safetensors|.+\.bin|.+\.index\.json)")


def _umask() -> int:
    mask = os.umask(0o022)  # the umask can only be read by setting it: put it straight back
    os.umask(mask)
    return mask


def _write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """write(temporary sibling), give it the umask's mode, then os.replace it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a saved file gets the mode of any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_state(state: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    _write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_torch(obj: object, path: str | Path) -> None:
    """torch.save atomically (training state: optimizer, RNG, step, config)."""
    _write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_json(obj: object, path: str | Path) -> None:
    """A JSON file (config.json), written atomically."""
    _write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def write_folder(folder: str | Path, files: Mapping[str, Callable[[Path], None]], pipeline: bool = False) -> None:
    """A model folder as one unit: files[name](path) writes each file (or, for a pipeline, each component folder)
    into a sibling staging folder, which then replaces `folder` (the old one is renamed aside first and restored if the
    swap fails). An existing folder is replaced only if it is a model folder (pipeline: holds model_index.json)."""
    folder, strangers = Path(folder), []
    if folder.exists() and pipeline:
        strangers = [] if (folder / "model_index.json").is_file() else ["no model_index.json"]
    elif folder.exists():
        strangers = sorted(p.name for p in folder.iterdir() if not (p.is_file() and MODEL_FOLDER_FILE.fullmatch(p.name))
                           ) if folder.is_dir() else [f"{folder.name} is a file"]
    if strangers:
        raise ValueError(f"{folder}: exists and is not a model folder that may be replaced (it holds "
                         f"{', '.join(strangers[:5])}); write to a new or empty folder")
    replace_folder(folder, files)


def replace_folder(folder: str | Path, files: Mapping[str, Callable[[Path], None]]) -> None:
    """files[name](path) writes each entry into a sibling staging folder, which then replaces `folder` (an existing
    one is renamed aside first, restored if the swap fails, removed after): readers see the old folder or the new one,
    never a mix. The caller decides whether `folder` may be replaced."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    aside = staging.with_name(staging.name[:-len(".tmp")] + ".old")
    try:
        for name, write in files.items():
            write(staging / name)
        os.chmod(staging, 0o777 & ~_umask())
        if folder.exists():
            os.rename(folder, aside)
            try:
                os.rename(staging, folder)
            except BaseException:
                os.rename(aside, folder)
                raise
            shutil.rmtree(aside)
        else:
            os.rename(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


# --- named transforms: (target key, tensor) -> {key: tensor}; one source tensor may become several ---------------


def _split_qkv(key: str, t: Tensor) -> StateDict:
    # OpenCLIP's fused attention in_proj [3C, ...] -> q, k, v; the row's target holds a literal "{qkv}". Cloned so
    # that the three do not share one storage (a safetensors file cannot hold tensors that share memory).
    assert "{qkv}" in key, f"split_qkv row must put {{qkv}} in its target prefix, got {key}"
    return {key.replace("{qkv}", name): part.clone() for name, part in zip("qkv", t.chunk(3, dim=0))}


TRANSFORMS: dict[str, Callable[[str, Tensor], StateDict]] = {
    "squeeze_1x1": lambda k, t: {k: t[:, :, 0, 0] if t.ndim == 4 else t},  # 1x1 conv [O,I,1,1] -> Linear [O,I]
    "unsqueeze_1x1": lambda k, t: {k: t[:, :, None, None] if t.ndim == 2 else t},  # Linear -> 1x1 conv
    "transpose": lambda k, t: {k: t.t().contiguous()},  # OpenCLIP x @ W projections <-> nn.Linear weight
    "split_qkv": _split_qkv,
    "swap_halves": lambda k, t: {k: torch.cat(t.chunk(2, dim=0)[::-1])},  # SD3 adaLN (shift, scale) <-> (scale, shift)
}
# Joins gather the keys that differ only in one placeholder into one tensor, concatenated along dim 0 in the order
# of the placeholder's values: q, k, v -> OpenCLIP's fused in_proj (the inverse of split_qkv).
JOINS = {"join_qkv": "qkv"}
INVERSE_TRANSFORMS = {"squeeze_1x1": "unsqueeze_1x1", "unsqueeze_1x1": "squeeze_1x1", "transpose": "transpose",
                      "split_qkv": "join_qkv",
                      "swap_halves": "swap_halves"}


# --- the engine: rename with rows, then load with accounting ------------------------------------------------------


class KeyMap:
    """Compiled rows. `apply` renames a state dict and remembers each new key's source name for error messages."""

    def __init__(self, rows: Iterable[Row]):
        self.rows = [(*row, None) if len(row) == 2 else tuple(row) for row in rows]
        self.literal: dict[str, tuple[str | None, str | None]] = {}  # source prefix -> (target prefix, transform)
        self.patterns: list[tuple[re.Pattern, int, str | None, str | None]] = []  # (regex, rank, target, transform)
        for source, target, transform in self.rows:
            if transform is not None and transform not in TRANSFORMS and transform not in JOINS:
                raise ValueError(f"key-map row {source!r}: unknown transform {transform!r}")
            if "{" in source:
                regex = re.sub(r"\\\{(\w+)\\\}", lambda m: rf"(?P<{m[1]}>{'[qkv]' if m[1] == 'qkv' else '[0-9]+'})",
                               re.escape(source))
                literal_length = len(re.sub(r"\{\w+\}", "", source))  # rank patterns by their fixed text
                self.patterns.append((re.compile(regex), literal_length, target, transform))
            elif source in self.literal:
                raise ValueError(f"key-map source prefix {source!r} appears in two rows")
            else:
                self.literal[source] = (target, transform)

    def match(self, key: str) -> tuple[int, str | None, str | None, str, dict[str, str]] | None:
        """(rank, target prefix, transform, rest of the key, placeholder values) of the longest matching row."""
        best = None
        for end in range(1, len(key) + 1):
            if key[:end] in self.literal:  # the longest literal prefix wins
                best = (end, *self.literal[key[:end]], key[end:], {})
        for regex, rank, target, transform in self.patterns:
            m = regex.match(key)
            if m and (best is None or rank > best[0]):
                # fill the matched placeholders only: a transform's own literal ({qkv} of split_qkv) stays for it
                groups = m.groupdict()
                filled = None if target is None else re.sub(r"\{(\w+)\}", lambda p: groups.get(p[1], p[0]), target)
                best = (rank, filled, transform, key[m.end():], groups)
        return best

    def apply(self, state: Mapping[str, Tensor]) -> tuple[StateDict, dict[str, str]]:
        """Renamed tensors and, for each new key, the source key it came from."""
        out: StateDict = {}
        origin: dict[str, str] = {}
        joins: dict[str, tuple[str, dict[str, tuple[str, Tensor]]]] = {}  # new key -> (join, {part: (key, tensor)})

        def put(new_key: str, value: Tensor, source_key: str) -> None:
            if new_key in out:
                raise ValueError(f"key map sends both {origin[new_key]!r} and {source_key!r} to {new_key!r}")
            out[new_key], origin[new_key] = value, source_key

        for key, tensor in state.items():
            found = self.match(key)
            if found is None:
                put(key, tensor, key)
                continue
            _, target, transform, rest, groups = found
            if target is None:
                continue  # an explicit drop row
            if transform in JOINS:
                joins.setdefault(target + rest, (transform, {}))[1][groups[JOINS[transform]]] = (key, tensor)
                continue
            pieces = TRANSFORMS[transform](target + rest, tensor) if transform else {target + rest: tensor}
            for new_key, value in pieces.items():
                put(new_key, value, key)
        for new_key, (transform, parts) in joins.items():
            order = JOINS[transform]  # the placeholder's values, in their order
            if sorted(parts) != sorted(order):
                raise ValueError(f"key map: {new_key!r} joins {', '.join(order)} but got only "
                                 f"{', '.join(sorted(parts))} (from {', '.join(k for k, _ in parts.values())})")
            put(new_key, torch.cat([parts[p][1] for p in order], dim=0), parts[order[0]][0])
        return out, origin

    def inverse(self) -> KeyMap:
        """Rows for export (ours -> source layout). Drop rows have no inverse and are left out."""
        rows: list[Row] = []
        for source, target, transform in self.rows:
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
                lines += [f"    {k}" for k in keys[:25]] + [f"    ... and {len(keys) - 25} more"] * (len(keys) > 25)
        raise ValueError("\n".join(lines))


def load_into(model: nn.Module, state: dict[str, Tensor], origin: Mapping[str, str] | None = None, *,
              what: str = "model", mode: str = "strict", dtype: torch.dtype | None = None) -> nn.Module:
    """Put `state` into `model` after full accounting. mode="strict": every key; "partial": a subset, summarised.

    A model on the meta device gets the tensors themselves (mapped file pages, no copy) in their stored dtype, or
    cast to `dtype`; a file whose float tensors mix dtypes is cast to float32 unless a dtype is given. Each cast
    tensor replaces its source in `state` at once, so the source's pages are freed before the next one is read.
    A materialised model is copied into (its own dtype stays). Nothing is written unless every check passes.
    """
    if mode not in ("strict", "partial"):
        raise ValueError(f"load mode must be 'strict' or 'partial', got {mode!r}")
    origin = origin or {}
    check_state(model, state, origin, what=what, partial=mode == "partial")
    targets = model.state_dict()
    with torch.no_grad():
        if any(t.is_meta for t in targets.values()):
            if mode == "partial":
                raise ValueError(f"{what}: a partial load needs a materialised model, not one on the meta device")
            stored = {v.dtype for v in state.values() if v.is_floating_point()}
            cast = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
            for key, value in state.items():
                state[key] = value.to(cast) if value.is_floating_point() else value
            assign(model, state)
        else:
            for key, value in state.items():
                targets[key].copy_(value)
    if mode == "partial":
        print(f"{what}: loaded {len(state)} of {len(targets)} tensors "
              f"({sum(v.numel() for v in state.values()):,} parameters)")
    leftovers = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftovers, f"{what}: tensors left on the meta device after loading: {leftovers[:5]}"
    return model
