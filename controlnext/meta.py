"""Models built on the meta device for loading: `on_meta` builds one without the random init a file's weights
replace, `assign` puts checked tensors in place of its meta tensors without copying (checkpoint.load_into)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

# In-place initialisers a module's constructor calls; on the meta device they compute nothing worth keeping.
_TENSOR_INITS = frozenset({torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_, torch.Tensor.fill_})


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Skips torch.nn.init functions and the Tensor initialisers above when their target is a meta tensor (its
    values do not exist); everything else, and any real tensor, runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _TENSOR_INITS or getattr(func, "__module__", None) == "torch.nn.init":
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with its parameters on the meta device and their initialisation skipped, ready for load_into: the
    weights come from a file, so random init would be thrown away (a third of an SD1.5 UNet's build time)."""
    with torch.device("meta"), _SkipMetaInit():
        return build()


def assign(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Put each tensor of a checked `state` in place of the meta tensor its key names, without copying: what
    load_state_dict(assign=True) does for plain modules (none of ours overrides _load_from_state_dict), without its
    per-module walk and hooks."""
    for key, value in state.items():
        owner_name, _, name = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(value, requires_grad=owner._parameters[name].requires_grad)
        else:
            owner._buffers[name] = value
