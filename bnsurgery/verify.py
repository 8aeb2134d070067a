"""Comparing a model's outputs before and after a surgery."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

__all__ = ["default_tolerance", "flatten", "max_relative_error", "tensors_in"]

_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def flatten(output: Any) -> tuple[list[Any], Any]:
    """``torch.utils._pytree.tree_flatten`` that also opens dataclasses (a model's output
    object, Hugging Face's ``ModelOutput`` included), field by field in their order: a tensor
    inside one is an output like any other, to compare and to keep.

    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Out:
    ...     logits: Any
    ...     extra: Any = None
    >>> flatten(Out(1, [2, 3]))[0]
    [1, 2, 3]
    """
    return tree_flatten(_plain(output))


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {type(obj).__qualname__: fields}  # the type in the structure, not a leaf
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj  # namedtuples and the rest: pytree's own rules


def tensors_in(output: Any) -> list[torch.Tensor]:
    """Every tensor in ``output`` (containers and dataclasses opened), in order."""
    return [t for t in flatten(output)[0] if isinstance(t, torch.Tensor)]


def default_tolerance(output: Any) -> float:
    """Tolerance suited to the lowest-precision floating tensor in ``output``."""
    dtypes = [t.dtype for t in tensors_in(output)]
    floats = [_TOLERANCE.get(d, 1e-4) for d in dtypes if d.is_floating_point]
    return max(floats, default=1e-4)


_CHUNK = 1 << 20  # elements compared at a time: float64 copies of a chunk, not of a tensor


def max_relative_error(reference: Any, candidate: Any) -> float:
    """Largest ``max|a - b| / max|a|`` over the floating tensors of two outputs.

    Each output tensor's error is scaled by its own largest magnitude, so the figure is
    comparable across models. Non-floating tensors must be equal. NaN matches NaN at the same
    place, and infinities must match exactly. A structure mismatch is ``inf``. The arithmetic
    is float64, a chunk at a time, so comparing a large activation costs little memory.
    """
    ref_leaves, ref_spec = flatten(reference)
    cand_leaves, cand_spec = flatten(candidate)
    if ref_spec != cand_spec or len(ref_leaves) != len(cand_leaves):
        return math.inf
    worst = 0.0
    for a, b in zip(ref_leaves, cand_leaves, strict=True):
        if not isinstance(a, torch.Tensor):
            if a != b:
                return math.inf
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return math.inf
        if not a.dtype.is_floating_point:
            if not torch.equal(a, b):
                return math.inf
            continue
        error = _tensor_error(a.detach().reshape(-1), b.detach().reshape(-1))
        if error is None:
            return math.inf
        worst = max(worst, error)
    return worst


def _tensor_error(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """``max|a - b| / max|a|`` over the finite values of two flat tensors (0 when there are
    none); None when NaN or infinities differ."""
    largest = difference = 0.0
    for start in range(0, a.numel(), _CHUNK):
        x = a[start : start + _CHUNK].double().cpu()
        y = b[start : start + _CHUNK].double().cpu()
        nan = torch.isnan(x)
        if not torch.equal(nan, torch.isnan(y)):
            return None
        x, y = x[~nan], y[~nan]
        finite = torch.isfinite(x)
        if not torch.equal(finite, torch.isfinite(y)) or not torch.equal(x[~finite], y[~finite]):
            return None
        x, y = x[finite], y[finite]
        if x.numel():
            largest = max(largest, float(x.abs().max()))
            difference = max(difference, float((x - y).abs().max()))
    return difference / max(largest, 1e-12)
