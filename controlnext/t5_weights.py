"""Loading the T5 v1.1 encoder of encoders/t5.py (SD3's text_encoder_3) from the files people have (STYLE.md §4).

Sources, detected from the path and the keys:
- a transformers folder: `text_encoder_3/` of a diffusers SD3 folder (or that pipeline folder itself), config.json
  read, one model.safetensors or the shards named by model.safetensors.index.json;
- SD3's original single file (sd3_medium_incl_clips_t5xxlfp16.safetensors, ...fp8...): the T5 under
  `text_encoders.t5xxl.transformer.`, the other components (MMDiT, CLIPs, VAE) ignored;
- a standalone T5 file in transformers names (t5xxl_fp16.safetensors), a whole T5ForConditionalGeneration file (its
  decoder is dropped), or an in-memory state dict.
The names go through the rows in encoders/keymap.py (T5_ROWS) and the engine of controlnext/checkpoint.py, which
accounts for every key before anything is loaded. The model is built on the meta device and the tensors are assigned.
Config: the folder's config.json, else `config` (a T5Config or a preset name), else read off the weights' shapes.
dtype: the stored one (the floating dtype holding most elements) unless `dtype` is given; in fp16 the FF output
projections `wo` stay fp32, as transformers loads T5 (encoders/t5.py, T5Encoder.cast). float8 files (the fp8 T5 of
sd3_medium_incl_clips_t5xxlfp8) store but do not compute: they need dtype=.
Reference for the layouts: transformers@v5.23 `T5EncoderModel` (save_pretrained writes `shared.weight` only) and
diffusers@0.42 `loaders/single_file_utils.py` (`is_t5_in_single_file`, `convert_sd3_t5_checkpoint_to_diffusers`).
Left out: writing T5 files (our state dict already is the transformers layout), and downloads of any kind.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from controlnext.checkpoint import KeyMap, load_into, read_state
from controlnext.meta import on_meta
from encoders import keymap
from encoders.t5 import PRESETS, T5Config, T5Encoder, config_from_hf

EMBEDDING, STACK_EMBEDDING = "shared.weight", "encoder.embed_tokens.weight"  # one tied tensor, two names
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two stored tensors are the very same data (a byte view: float8 has no torch.equal on CPU)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _config_from_weights(state: Mapping[str, Tensor], where: str) -> T5Config:
    """Every field but the bucket distance and eps is a shape; those two are the same in every T5 v1.1 release."""
    table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    q, wi_0 = "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    missing = [k for k in (EMBEDDING, table, q, wi_0) if k not in state]
    if missing:
        raise ValueError(f"{where}: cannot read the T5 config off the weights (no {missing[0]}); pass config=")
    vocab_size, d_model = state[EMBEDDING].shape
    buckets, heads = state[table].shape
    layers = 1 + max(int(m[1]) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k)))
    return T5Config(vocab_size=vocab_size, d_model=d_model, num_layers=layers, num_heads=heads,
                    d_kv=state[q].shape[0] // heads, d_ff=state[wi_0].shape[0], relative_attention_num_buckets=buckets)


def _resolve_config(source, config: T5Config | str | None, where: str) -> T5Config | None:
    """config.json of a folder (checked against `config` if both are given), else the given config or preset."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown T5 preset {config!r} (expected one of {sorted(PRESETS)})")
        config = PRESETS[config]
    if config is not None and not isinstance(config, T5Config):
        raise ValueError(f"config must be a T5Config or a preset name, got {type(config).__name__}")
    if isinstance(source, Mapping) or not (Path(source) / "config.json").is_file():
        return config
    folder_config = config_from_hf(json.loads((Path(source) / "config.json").read_text()))
    if config is not None and config != folder_config:
        diff = [f"{f}: config.json {getattr(folder_config, f)!r} vs given {getattr(config, f)!r}"
                for f in T5Config.__dataclass_fields__ if getattr(folder_config, f) != getattr(config, f)]
        raise ValueError(f"{where}: the given T5 config does not match config.json ({'; '.join(diff)})")
    return folder_config


def load_t5(source: str | Path | Mapping[str, Tensor], config: T5Config | str | None = None, *,
            dtype: torch.dtype | None = None) -> T5Encoder:
    """Our T5Encoder with the weights of `source` (see the module docstring), in eval mode. Every key is accounted
    for; a file that does not fit raises one ValueError listing the keys, and nothing is half-loaded."""
    if not isinstance(source, Mapping) and (Path(source) / "text_encoder_3").is_dir():
        source = Path(source) / "text_encoder_3"  # a whole diffusers SD3 pipeline folder
    where = "state dict" if isinstance(source, Mapping) else str(source)
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, COMPUTE_DTYPES))}, got {dtype}")
    config = _resolve_config(source, config, where)
    state = read_state(source)
    prefix = keymap.T5_SINGLE_FILE_PREFIX if any(k.startswith(keymap.T5_SINGLE_FILE_PREFIX) for k in state) else ""
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # an SD3 file: the T5 part only
    if not any(k.startswith("encoder.block.") for k in state):
        raise ValueError(f"{where}: no T5 encoder weights found (looked for encoder.block.* under "
                         f"{keymap.T5_SINGLE_FILE_PREFIX!r} or without a prefix; first keys: {sorted(state)[:3]})")
    if EMBEDDING in state and STACK_EMBEDDING in state:
        # the tied embedding saved under both names: keep one, after checking it is one
        if not _same_bits(state[EMBEDDING], state[STACK_EMBEDDING]):
            raise ValueError(f"{where}: {prefix}{EMBEDDING} and {prefix}{STACK_EMBEDDING} differ; a T5 encoder "
                             "has one token embedding (transformers ties the two names)")
        state.pop(STACK_EMBEDDING)
    renamed, origin = KeyMap(keymap.T5_ROWS).apply(state)
    config = config or _config_from_weights(renamed, where)
    if dtype is None:
        sizes = Counter()
        for tensor in renamed.values():
            if tensor.is_floating_point():
                sizes[tensor.dtype] += tensor.numel()
        dtype = sizes.most_common(1)[0][0]
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"{where}: the T5 weights are stored as {dtype}, a storage-only type; pass dtype= "
                             "(torch.bfloat16, torch.float16 or torch.float32)")
    model = on_meta(lambda: T5Encoder(config))
    # fp16 keeps every `wo` in fp32 (T5Encoder.cast): load at fp32 first so those come straight from the file's values
    load_into(model, renamed, {k: prefix + v for k, v in origin.items()}, what=f"T5 encoder ({where})",
              dtype=torch.float32 if dtype == torch.float16 else dtype)
    return model.cast(dtype).eval()
