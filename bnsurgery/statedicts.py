"""State dicts: finding one in a checkpoint file, and loading it strictly into a model.

A checkpoint often wraps its state dict (``{"state_dict": ...}``, ``{"model": ...}``, an EMA
copy) and prefixes its keys (``module.`` from DataParallel, ``_orig_mod.`` from
``torch.compile``): :func:`unwrap_state_dict` takes those off. :func:`load_state_dict_into`
loads strictly, turning any mismatch into one line that names the first bad key, and keeps the
file's floating dtypes (a float64 fold saved and loaded back stays float64).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SourceError
from .tensorfiles import check_readable, read_safetensors, read_torch_file
from .trust import Kind, Trust, kind_of

__all__ = [
    "WRAPPER_KEYS",
    "load_state_dict_into",
    "read_state_dict",
    "state_mismatch",
    "unwrap_state_dict",
]

#: The keys under which checkpoints wrap a state dict (or a whole module).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "ema")


def unwrap_state_dict(obj: Any, where: Any = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside common checkpoint wrappers and strip DDP/compile prefixes.

    Raises:
        SourceError: no tensors found.
    """
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise SourceError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise SourceError(f"{where}: holds no tensors")
    for prefix in ("module.", "_orig_mod."):
        while state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_state_dict(
    path: str | os.PathLike[str], *, trust_code: bool = False, trust_pickle: bool | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or torch file (wrappers unwrapped).

    Raises:
        SourceError: unreadable, or not a state dict (a TorchScript archive is never loaded).
        UnsafeCodeError: pickled objects beyond tensors and ``trust_code`` is false.
    """
    p = Path(path)
    check_readable(p, directory="is a directory, not a checkpoint file")
    kind = kind_of(p)
    if kind is Kind.SAFETENSORS:
        return read_safetensors(p)
    if kind is Kind.TORCHSCRIPT:
        raise SourceError(f"{p}: is a TorchScript archive, not a state dict")
    trust = Trust(code=trust_code or bool(trust_pickle))
    return unwrap_state_dict(read_torch_file(p, trust, kind), p)


def state_mismatch(
    own: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]]
) -> str | None:
    """What keeps state ``given`` (key -> shape) from loading strictly into a model whose state
    is ``own``: shape mismatches, missing or unexpected keys (the first of each named).
    ``num_batches_tracked`` may be missing."""
    mismatched = [k for k, shape in given.items() if k in own and tuple(own[k]) != tuple(shape)]
    if mismatched:
        k = mismatched[0]
        return (
            f"{len(mismatched)} shape mismatches, first {k} {tuple(given[k])} vs "
            f"{tuple(own[k])} in the model"
        )
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]})")
    return ", ".join(parts) or None


def load_state_dict_into(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    """Load strictly, turning any mismatch into one clear line.

    Raises:
        SourceError: shape mismatches, missing or unexpected keys (the first of each named).
    """
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = state_mismatch(own, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise SourceError(f"weights do not fit {arch}: {problem}")
    _take_dtypes(model, state)
    model.load_state_dict(dict(state), strict=False)


def _take_dtypes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give each floating parameter and buffer the dtype its tensor has in the file: the
    architecture is built in float32, and copying a float64 (or half) checkpoint into it would
    round it in silence (a float64 fold saved and loaded back must stay float64)."""
    for key, tensor in model.state_dict(keep_vars=True).items():
        stored = state.get(key)
        if stored is None or not (tensor.is_floating_point() and stored.is_floating_point()):
            continue
        if stored.dtype != tensor.dtype:
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.to(stored.dtype)
            else:
                owner._buffers[attr] = tensor.to(stored.dtype)
