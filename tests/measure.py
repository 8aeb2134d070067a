"""How far apart two model outputs are, measured without bnsurgery.

The zoo tests and ``scripts/sweep_zoo.py`` check the library with this, not with
:func:`bnsurgery.verify.max_relative_error`, so a bug there cannot hide itself. It is also
stricter: dtypes must match, and non-finite values must sit at the same places.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["leaves", "max_rel_error"]


def leaves(value: Any) -> list[Any]:
    """Tensors and scalars of a nested output in a fixed order, with its structure."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [("key", k) for k in value] + [x for k in value for x in leaves(value[k])]
    if isinstance(value, list | tuple):
        return [("len", len(value))] + [x for v in value for x in leaves(v)]
    return [value]


def max_rel_error(reference: Any, candidate: Any) -> float:
    """max |a - b| / max |a| over floating tensors (each by its own scale); inf on any
    structural or dtype difference, NaN/inf placement difference, or unequal integer tensors."""
    ref, cand = leaves(reference), leaves(candidate)
    if len(ref) != len(cand):
        return math.inf
    worst = 0.0
    for a, b in zip(ref, cand, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if a != b:
                return math.inf
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return math.inf
        if not a.dtype.is_floating_point:
            if not torch.equal(a, b):
                return math.inf
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        finite = torch.isfinite(a64)
        if not torch.equal(finite, torch.isfinite(b64)):
            return math.inf
        if not torch.equal(a64[~finite].nan_to_num(), b64[~finite].nan_to_num()):
            return math.inf
        a64, b64 = a64[finite], b64[finite]
        if a64.numel() == 0:
            continue
        scale = max(a64.abs().max().item(), 1e-30)
        worst = max(worst, (a64 - b64).abs().max().item() / scale)
    return worst
