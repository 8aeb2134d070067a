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


def max_relative_error(reference: Any, candidate: Any) -> float:
    """Largest ``max|a - b| / max|a|`` over the floating tensors of two outputs.

    Each output tensor's error is scaled by its own largest magnitude, so the figure is
    comparable across models. Non-floating tensors must be equal. NaN matches NaN at the same
    place. A structure mismatch is ``inf``.
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
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        nan_a, nan_b = torch.isnan(a64), torch.isnan(b64)
        if not torch.equal(nan_a, nan_b):
            return math.inf
        keep = ~nan_a
        a64, b64 = a64[keep], b64[keep]
        if a64.numel() == 0:
            continue
        if not torch.equal(torch.isinf(a64), torch.isinf(b64)):
            return math.inf
        finite = torch.isfinite(a64)
        if not torch.equal(a64[~finite], b64[~finite]):
            return math.inf
        a64, b64 = a64[finite], b64[finite]
        if a64.numel() == 0:
            continue
        scale = max(float(a64.abs().max()), 1e-12)
        worst = max(worst, float((a64 - b64).abs().max()) / scale)
    return worst
