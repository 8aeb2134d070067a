"""Pure tensor maths of folding: weights and a per-channel affine map in, weights out.

A BN in eval mode is ``y = x * scale + shift`` per channel (:meth:`BNStats.scale_shift`).
Folding it into the layer that produces its input (*producer*) or the layer that consumes its
output (*consumer*) is a reparametrisation of that layer's weight and bias. Everything here
takes and returns float64 tensors; callers cast back to the model's dtype.

Weight layouts (``g`` = groups):

* conv: ``[out, in / g, *k]``; output channel ``o`` belongs to group ``o // (out / g)``.
* conv_transpose: ``[in, out / g, *k]``; output channel ``o = group * (out / g) + j``.
* linear: ``[out, in]``.
"""

from __future__ import annotations

import torch

__all__ = ["fold_consumer", "fold_producer", "out_channels", "in_channels"]


def out_channels(kind: str, weight: torch.Tensor, groups: int = 1) -> int:
    """Output channels of a layer from its weight."""
    return int(weight.shape[1] * groups) if kind == "conv_transpose" else int(weight.shape[0])


def in_channels(kind: str, weight: torch.Tensor, groups: int = 1) -> int:
    """Input channels of a layer from its weight."""
    return int(weight.shape[0]) if kind == "conv_transpose" else int(weight.shape[1] * groups)


def _per_out_channel(kind: str, weight: torch.Tensor, values: torch.Tensor, groups: int):
    """Broadcast a per-output-channel vector onto the weight's layout."""
    tail = [1] * (weight.dim() - 2)
    if kind == "conv_transpose":
        in_ch, out_per_group = weight.shape[0], weight.shape[1]
        grid = values.reshape(groups, 1, out_per_group).expand(
            groups, in_ch // groups, out_per_group
        )
        return grid.reshape(in_ch, out_per_group, *tail)
    return values.reshape(-1, *([1] * (weight.dim() - 1)))


def _per_in_channel(kind: str, weight: torch.Tensor, values: torch.Tensor, groups: int):
    """Broadcast a per-input-channel vector onto a conv or linear weight's layout."""
    tail = [1] * (weight.dim() - 2)
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    grid = values.reshape(groups, 1, in_per_group).expand(groups, out_ch // groups, in_per_group)
    return grid.reshape(out_ch, in_per_group, *tail)


def fold_producer(
    kind: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``bn(layer(x))`` as one layer: ``W' = W * scale[o]``, ``b' = b * scale + shift``.

    Args:
        kind: ``"conv"``, ``"conv_transpose"`` or ``"linear"``.
        weight: the layer's weight (float64).
        bias: its bias, or ``None`` for none.
        scale, shift: the BN's per-channel affine map (float64, one entry per output channel).
        groups: the layer's groups (convolutions).

    Returns:
        ``(weight, bias)`` in float64.

    >>> w, b = fold_producer("linear", torch.ones(2, 3, dtype=torch.float64), None,
    ...                      torch.tensor([2.0, 3.0], dtype=torch.float64),
    ...                      torch.tensor([1.0, 0.0], dtype=torch.float64))
    >>> w[:, 0].tolist(), b.tolist()
    ([2.0, 3.0], [1.0, 0.0])
    """
    new_weight = weight * _per_out_channel(kind, weight, scale, groups)
    base = bias if bias is not None else torch.zeros_like(scale)
    return new_weight, base * scale + shift


def fold_into_norm(
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine parameters of ``norm(x * s + t)`` as one eval-mode BN with the same statistics.

    ``w (s x + t - m) / r + b = (w s) (x - m) / r + b + w (t + (s - 1) m) / r`` with
    ``r = sqrt(var + eps)``: a BN absorbs a per-channel affine map in front of it exactly
    (NextViT's BN before a pooling and the attention's own BN).

    Returns:
        ``(weight, bias)`` in float64.

    >>> one = torch.ones(1, dtype=torch.float64)
    >>> w, b = fold_into_norm(one, 0 * one, one, 3 * one, 1.0, 2 * one, one)
    >>> w.tolist(), b.tolist()  # (2x + 1 - 1) / 2 = x = (2 (x - 1)) / 2 + 1
    ([2.0], [1.0])
    """
    ratio = weight / torch.sqrt(var + eps)
    return weight * scale, bias + ratio * (shift + (scale - 1) * mean)


def fold_consumer(
    kind: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``layer(bn(x))`` as one layer, for a conv without zero padding or a linear.

    ``layer(x * s + t) = (W * s[in]) x + (b + W t)``: exact for a linear layer and for a conv
    that never sees padded zeros (padding 0, or a padding mode that copies real values).

    Returns:
        ``(weight, bias)`` in float64.
    """
    if kind == "conv_transpose":
        raise ValueError("a transposed conv cannot absorb a BN in front of it exactly")
    s = _per_in_channel(kind, weight, scale, groups)
    t = _per_in_channel(kind, weight, shift, groups)
    offset = (weight * t).reshape(weight.shape[0], -1).sum(dim=1)
    base = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    return weight * s, base + offset
