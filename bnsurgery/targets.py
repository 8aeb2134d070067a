"""The one registry of what replaces a BN: swap targets, the frozen BN, the fold's leftover.

Every entry is built the same way, from the BN it replaces and a few options (as timm's
``create_norm`` does): :class:`Target` says when it does not apply (``refuses``: a reason, for
the plan), what options it records (``resolve``: resolved while planning, so a plan shows
them and a checkpoint replays them), and how to build it (``build``: at apply time, and again
when a checkpoint is loaded). The new module carries the BN's affine parameters, eps, dtype,
device and ``requires_grad``; timm norm-act layers become the matching norm-act layer with the
very same activation and drop modules.

>>> sorted(TARGETS)
['batchnorm', 'frozen', 'groupnorm', 'identity', 'instancenorm', 'layernorm', 'syncbatchnorm']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import UsageError
from .frozen import FrozenBatchNorm
from .layers import (
    ChannelLayerNorm,
    FoldedBatchNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    NormAct,
    NormActRemainder,
)
from .norms import (
    eps_of,
    has_activation,
    has_statistics,
    is_batchnorm,
    is_frozen_batchnorm,
    num_features,
    unusable,
)

__all__ = ["TARGETS", "Target", "auto_groups", "build", "remainder_of", "target"]

_INSTANCE_NORMS = {1: InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d}


def auto_groups(channels: int, preferred: int = 32, min_group_size: int = 1) -> int:
    """The largest group count at most ``preferred`` that divides ``channels`` into groups of
    at least ``min_group_size`` channels (1 group if none does).

    >>> auto_groups(72), auto_groups(64), auto_groups(7), auto_groups(5, min_group_size=2)
    (24, 32, 7, 1)
    """
    fits = [
        g
        for g in range(1, min(preferred, channels) + 1)
        if channels % g == 0 and channels // g >= min_group_size
    ]
    return max(fits, default=1)


def _groups(bn: nn.Module, groups: int | None, group_size: int | None, flat: bool = False) -> int:
    c = num_features(bn)
    if groups is not None and group_size is not None:
        raise UsageError("give groups or group_size, not both")
    if groups is not None:
        if groups < 1 or c % groups:
            raise UsageError(f"groups={groups} does not divide {c} channels")
        return groups
    if group_size is not None:
        if group_size < 1 or c % group_size:
            raise UsageError(f"group_size={group_size} does not divide {c} channels")
        return c // group_size
    # A BN that sees one value per channel and sample (BatchNorm1d on (N, C) vectors, a 2-D BN
    # after global pooling): a group there must hold enough channels to normalise.
    return auto_groups(c, min_group_size=16 if flat or isinstance(bn, nn.BatchNorm1d) else 1)


def _carry(new: nn.Module, bn: nn.Module, affine: bool) -> nn.Module:
    """Give ``new`` the BN's affine parameters (values, requires_grad), dtype and device."""
    weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
    like = next(
        (t for t in (weight, getattr(bn, "running_mean", None)) if isinstance(t, torch.Tensor)),
        None,
    )
    if like is not None:
        new.to(device=like.device, dtype=like.dtype)
    if affine and isinstance(getattr(new, "weight", None), nn.Parameter):
        with torch.no_grad():
            if isinstance(weight, torch.Tensor):
                new.weight.copy_(weight.detach().reshape(new.weight.shape))
                new.weight.requires_grad_(weight.requires_grad)
            if isinstance(bias, torch.Tensor) and isinstance(
                getattr(new, "bias", None), torch.Tensor
            ):
                new.bias.copy_(bias.detach().reshape(new.bias.shape))
                new.bias.requires_grad_(bias.requires_grad)
    return new


def _affine(bn: nn.Module, force: bool) -> bool:
    return force or isinstance(getattr(bn, "weight", None), torch.Tensor)


def _with_act(norm: nn.Module, bn: nn.Module) -> nn.Module:
    if not has_activation(bn):
        return norm
    return NormAct(norm, getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))


def _groupnorm_options(bn: nn.Module, opts: Mapping[str, Any]) -> dict[str, Any]:
    groups = _groups(bn, opts.get("groups"), opts.get("group_size"), opts.get("flat", False))
    return {"groups": groups, "force_affine": bool(opts.get("force_affine", False))}


def _groupnorm(bn: nn.Module, opts: Mapping[str, Any]) -> nn.Module:
    g = opts.get("groups") or _groupnorm_options(bn, opts)["groups"]
    affine = _affine(bn, opts.get("force_affine", False))
    if has_activation(bn):
        from timm.layers import GroupNormAct

        new = GroupNormAct(num_features(bn), g, eps=eps_of(bn), affine=affine, apply_act=False)
        new.drop, new.act = bn.drop, bn.act
        return _carry(new, bn, affine)
    return _carry(nn.GroupNorm(g, num_features(bn), eps=eps_of(bn), affine=affine), bn, affine)


def _layernorm(bn: nn.Module, opts: Mapping[str, Any]) -> nn.Module:
    affine = _affine(bn, opts.get("force_affine", False))
    if has_activation(bn):
        from timm.layers import LayerNormAct2d

        new = LayerNormAct2d(num_features(bn), eps=eps_of(bn), affine=affine, apply_act=False)
        new.drop, new.act = bn.drop, bn.act
        return _carry(new, bn, affine)
    return _carry(ChannelLayerNorm(num_features(bn), eps=eps_of(bn), affine=affine), bn, affine)


def _instancenorm_refuses(bn: nn.Module, opts: Mapping[str, Any]) -> str | None:
    if isinstance(bn, nn.BatchNorm1d) and opts.get("dims") != "1d":
        # On (N, C) vectors InstanceNorm1d would read C as the length: silently wrong.
        return (
            "a BatchNorm1d may see (N, C) vectors, which instance norm cannot take; "
            "pass dims='1d' if it sees (N, C, L)"
        )
    return None


def _instancenorm(bn: nn.Module, opts: Mapping[str, Any]) -> nn.Module:
    dims = {nn.BatchNorm1d: 1, nn.BatchNorm3d: 3}
    d = next((v for cls, v in dims.items() if isinstance(bn, cls)), 2)
    cls = _INSTANCE_NORMS[d]
    affine = _affine(bn, opts.get("force_affine", False))
    new = _carry(cls(num_features(bn), eps=eps_of(bn), affine=affine), bn, affine)
    return _with_act(new, bn)


def _frozen_refuses(bn: nn.Module, opts: Mapping[str, Any]) -> str | None:
    if isinstance(bn, FrozenBatchNorm):
        return "already frozen by bnsurgery"
    if is_frozen_batchnorm(bn):
        return f"already frozen ({type(bn).__name__})"
    return unusable(bn)  # the shared policy: running statistics to freeze


def _frozen(bn: nn.Module, opts: Mapping[str, Any]) -> nn.Module:
    return FrozenBatchNorm(bn, train_affine=bool(opts.get("train_affine", False)))


def _syncbatchnorm_refuses(bn: nn.Module, opts: Mapping[str, Any]) -> str | None:
    if isinstance(bn, nn.SyncBatchNorm):
        return "already a SyncBatchNorm"
    if not isinstance(bn, _BatchNorm):
        return f"{type(bn).__name__} has no SyncBatchNorm counterpart"
    return None


def _syncbatchnorm(bn: nn.Module, opts: Mapping[str, Any]) -> nn.Module:
    if has_activation(bn):
        from timm.layers.norm_act import SyncBatchNormAct

        new: nn.Module = SyncBatchNormAct(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats
        )
        new.drop, new.act = bn.drop, bn.act
    else:
        new = nn.SyncBatchNorm(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats
        )
    _share_state(new, bn)
    new.__dict__["_bnsurgery_from"] = f"{type(bn).__module__}.{type(bn).__qualname__}"
    return new


def _share_state(new: nn.Module, bn: nn.Module) -> None:
    """Give ``new`` the very parameter and buffer tensors of ``bn`` (state kept exactly)."""
    for name, param in bn._parameters.items():
        new._parameters[name] = param
    for name, buffer in bn._buffers.items():
        new._buffers[name] = buffer
    new.training = bn.training


_BN_CLASSES = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}


def _batchnorm_refuses(bn: nn.Module, opts: Mapping[str, Any]) -> str | None:
    return "already a BatchNorm" if type(bn) in _BN_CLASSES.values() else None


def _batchnorm(bn: nn.Module, opts: Mapping[str, Any]) -> nn.Module:
    if isinstance(bn, FrozenBatchNorm):
        return bn.restore()
    origin = bn.__dict__.get("_bnsurgery_from", "")
    dims = opts.get("dims") or next(
        (k for k in _BN_CLASSES if origin.endswith(f"BatchNorm{k}")), "2d"
    )
    if has_activation(bn) or "BatchNormAct2d" in origin:
        from timm.layers import BatchNormAct2d

        new: nn.Module = BatchNormAct2d(num_features(bn), eps=eps_of(bn), apply_act=False)
        new.drop, new.act = getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity())
    else:
        new = _BN_CLASSES[dims](num_features(bn), eps=eps_of(bn))
    if isinstance(bn, _BatchNorm):  # SyncBatchNorm and friends: same state, exactly
        new.momentum, new.affine, new.track_running_stats = (
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
        )
        for name in ("weight", "bias"):
            if name not in bn._parameters or bn._parameters[name] is None:
                new._parameters[name] = None
        _share_state(new, bn)
        return new
    # a buffer-only frozen BN (torchvision/timm FrozenBatchNorm2d): trainable again
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(bn, name))
    return new.to(bn.running_mean.device, bn.running_mean.dtype).train(bn.training)


def _identity(bn: nn.Module, opts: Mapping[str, Any]) -> nn.Module:
    return remainder_of(bn)


def _kept(names: tuple[str, ...]) -> Callable[[nn.Module, Mapping[str, Any]], dict[str, Any]]:
    def resolve(bn: nn.Module, opts: Mapping[str, Any]) -> dict[str, Any]:
        return {k: opts[k] for k in names if opts.get(k) is not None}

    return resolve


_AFFINE = _kept(("force_affine",))


def _never(bn: nn.Module, opts: Mapping[str, Any]) -> str | None:
    return None


@dataclass(frozen=True)
class Target:
    """One kind of module that can replace a BN.

    Attributes:
        build: ``build(bn, options) -> module``, the options as :attr:`resolve` returned them.
        refuses: ``refuses(bn, options) -> reason | None``: why it does not apply to ``bn``.
        resolve: ``resolve(bn, options) -> options``: the options a checkpoint records, from
            the ones the user gave (group counts worked out); raises ``UsageError`` on bad
            ones.
        fits: a least-squares repair (``swap(..., calibrate=data)``) can set its affine.
        keeps_statistics: it normalises with the BN's running statistics, which must be
            finite.
    """

    build: Callable[[nn.Module, Mapping[str, Any]], nn.Module]
    refuses: Callable[[nn.Module, Mapping[str, Any]], str | None] = _never
    resolve: Callable[[nn.Module, Mapping[str, Any]], dict[str, Any]] = _AFFINE
    fits: bool = False
    keeps_statistics: bool = False


#: Every replacement, by the name plans, the CLI (``--to``) and checkpoints use.
TARGETS: dict[str, Target] = {
    "groupnorm": Target(_groupnorm, resolve=_groupnorm_options, fits=True),
    "layernorm": Target(_layernorm, fits=True),
    "instancenorm": Target(
        _instancenorm, _instancenorm_refuses, _kept(("dims", "force_affine")), fits=True
    ),
    "frozen": Target(_frozen, _frozen_refuses, _kept(("train_affine",)), keeps_statistics=True),
    "syncbatchnorm": Target(_syncbatchnorm, _syncbatchnorm_refuses, _kept(())),
    "batchnorm": Target(_batchnorm, _batchnorm_refuses, _kept(("dims",))),
    "identity": Target(_identity, resolve=_kept(())),
}

#: Names older checkpoints record, and the entry each means now.
ALIASES = {"norm_act_remainder": "identity"}


def target(name: str) -> Target:
    """The registry entry called ``name``.

    Raises:
        UsageError: an unknown name; the message lists the valid ones.
    """
    entry = TARGETS.get(ALIASES.get(name, name))
    if entry is None:
        raise UsageError(f"unknown target {name!r}; valid: {', '.join(TARGETS)}")
    return entry


def build(name: str, bn: nn.Module, options: Mapping[str, Any]) -> nn.Module:
    """Build the ``name`` replacement of ``bn`` from recorded ``options`` (checkpoint replay).

    Raises:
        UsageError: an unknown name, or ``bn`` is not a BN module.
    """
    if not is_batchnorm(bn):
        raise UsageError(f"cannot replace a {type(bn).__name__} by {name}: not a BN module")
    return target(name).build(bn, {"groups": None, "group_size": None, **options})


def remainder_of(module: nn.Module) -> nn.Module:
    """The module that replaces a BN whose normalisation was folded elsewhere.

    A :class:`FoldedBatchNorm` (an identity) for plain BN; a :class:`NormActRemainder` keeping
    the activation and drop of a norm-act layer.
    """
    if has_activation(module):
        drop = getattr(module, "drop", None)
        act = getattr(module, "act", None)
        return NormActRemainder(
            drop if isinstance(drop, nn.Module) else nn.Identity(),
            act if isinstance(act, nn.Module) else nn.Identity(),
        )
    if not has_statistics(module):  # track_running_stats=False, or lazy: no BN view
        return nn.Identity()
    return FoldedBatchNorm(module)
