"""Comparing a model's outputs before and after a surgery."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

__all__ = ["default_tolerance", "max_relative_error"]

_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def default_tolerance(output: Any) -> float:
    """Tolerance suited to the lowest-precision floating tensor in ``output``."""
    dtypes = [t.dtype for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
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
    ref_leaves, ref_spec = tree_flatten(reference)
    cand_leaves, cand_spec = tree_flatten(candidate)
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
