"""The edits plans are made of: small frozen values that know how to apply themselves.

Each edit changes one BN through a :class:`~bnsurgery.plan.Transaction`, so that any of them
can be undone, and says what it will do (``str(edit)``) and, for scripts, ``to_dict()``.
:class:`Replace` puts a registry target (:mod:`bnsurgery.targets`) in the BN's place;
:class:`Restore` gives a frozen BN's original back; :class:`SetAffineTraining` frees or fixes a
frozen BN's affine; :class:`SetStatistics` writes new running statistics. Fold's edit,
:class:`~bnsurgery.foldplan.FoldEdit`, lives with the fold's rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import targets
from .errors import UsageError
from .frozen import FrozenBatchNorm
from .hooks import carry_hooks
from .tree import parents

if TYPE_CHECKING:
    from .plan import Transaction

__all__ = [
    "FreezeFused",
    "FuseFrozen",
    "Replace",
    "Restore",
    "SetAffineTraining",
    "SetStatistics",
]


@dataclass(frozen=True)
class Replace:
    """Put a replacement in the BN's place, under every name the BN has.

    ``target`` names a :data:`~bnsurgery.targets.TARGETS` entry, built from the BN with
    ``options`` (as the plan resolved them) and recorded for checkpoints; or ``factory``, a
    user's ``factory(bn) -> module`` (recorded as ``custom``: a checkpoint cannot rebuild it).
    """

    bn: str
    target: str
    options: Mapping[str, Any] = field(default_factory=dict)
    factory: Callable[[nn.Module], nn.Module] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"bn": self.bn, "target": self.target, "options": dict(self.options)}

    def __str__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"-> {self.target}" + (f" ({options})" if options else "")

    def apply(self, model: nn.Module, txn: Transaction) -> None:
        bn = model.get_submodule(self.bn)
        # a replacement may share the BN's parameters and set their flags (a frozen BN fixes
        # requires_grad): a rollback gives the BN its flags back with the BN
        flags = [(p, p.requires_grad) for p in bn.parameters()]
        txn.call(lambda: None, lambda: [p.requires_grad_(f) for p, f in flags])
        if self.factory is not None:
            new = self.factory(bn)
            if not isinstance(new, nn.Module):
                raise UsageError(f"the swap callable returned a {type(new).__name__} for {self.bn}")
            record: dict[str, Any] = {"with": "custom"}
        else:
            new = targets.target(self.target).build(bn, self.options)
            record = {"with": self.target}
            if self.options:
                record["options"] = dict(self.options)
        if new is not bn:
            carry_hooks(bn, new)
        txn.replace(bn, new, record)


@dataclass(frozen=True)
class FreezeFused(Replace):
    """Freeze the BN (a :class:`Replace` with ``"frozen"``) and have ``layer``, the conv or
    linear whose output only it reads, compute it (:mod:`bnsurgery.fused`)."""

    layer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "fused_into": self.layer}

    def __str__(self) -> str:
        return f"{super().__str__()}, computed inside {self.layer}"

    def apply(self, model: nn.Module, txn: Transaction) -> None:
        from .fused import fuse, unfuse

        super().apply(model, txn)
        frozen = model.get_submodule(self.bn)
        layer = model.get_submodule(self.layer)
        txn.call(lambda: fuse(layer, frozen), lambda: unfuse(frozen))


@dataclass(frozen=True)
class FuseFrozen:
    """Have ``layer`` compute a BN bnsurgery froze earlier (a frozen checkpoint loaded back:
    fusion is how the model runs, not what its file records)."""

    bn: str
    layer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"bn": self.bn, "fused_into": self.layer}

    def __str__(self) -> str:
        return f"-> stays frozen, computed inside {self.layer}"

    def apply(self, model: nn.Module, txn: Transaction) -> None:
        from .fused import fuse, unfuse

        frozen = model.get_submodule(self.bn)
        layer = model.get_submodule(self.layer)
        txn.call(lambda: fuse(layer, frozen), lambda: unfuse(frozen))


@dataclass(frozen=True)
class Restore:
    """Put back the BN a :class:`~bnsurgery.frozen.FrozenBatchNorm` froze (``unfreeze``)."""

    bn: str

    def __str__(self) -> str:
        return "-> the BN it froze"

    def apply(self, model: nn.Module, txn: Transaction) -> None:
        frozen = model.get_submodule(self.bn)
        if not isinstance(frozen, FrozenBatchNorm):
            raise UsageError(f"{self.bn} is a {type(frozen).__name__}, not frozen by bnsurgery")
        from .fused import fuse, fused_into

        flag, layer = frozen.train_affine, fused_into(frozen)
        txn.call(lambda: None, lambda: frozen.set_train_affine(flag))
        if layer is not None:  # restore() unfuses; a rollback fuses again
            txn.call(lambda: None, lambda: fuse(layer, frozen))
        txn.replace(frozen, frozen.restore(), None)


@dataclass(frozen=True)
class SetAffineTraining:
    """Make a frozen BN's affine parameters trainable (``True``) or fixed; statistics stay."""

    bn: str
    train_affine: bool

    def __str__(self) -> str:
        return f"affine {'trainable' if self.train_affine else 'fixed'} (stays frozen)"

    def apply(self, model: nn.Module, txn: Transaction) -> None:
        frozen = model.get_submodule(self.bn)
        before = frozen.train_affine
        txn.call(
            lambda: frozen.set_train_affine(self.train_affine),
            lambda: frozen.set_train_affine(before),
        )
        for _, _, path in parents(model, frozen):
            txn.amend(path, {"train_affine": self.train_affine})


@dataclass(frozen=True)
class SetStatistics:
    """New running statistics for one BN (``recalibrate``), with how far they moved."""

    bn: str
    mean: torch.Tensor = field(repr=False)
    var: torch.Tensor = field(repr=False)
    batches: int | None = None
    samples: int = 0
    mean_kl: float = float("nan")
    max_kl: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        keys = ("bn", "batches", "samples", "mean_kl", "max_kl")
        return {k: getattr(self, k) for k in keys}

    def __str__(self) -> str:
        return f"new statistics over {self.samples} values, mean KL(old||new) {self.mean_kl:.3g}"

    def apply(self, model: nn.Module, txn: Transaction) -> None:
        bn = model.get_submodule(self.bn)
        txn.copy(bn.running_mean, self.mean)
        txn.copy(bn.running_var, self.var)
        tracked = getattr(bn, "num_batches_tracked", None)
        if self.batches is not None and isinstance(tracked, torch.Tensor):
            txn.copy(tracked, torch.tensor(self.batches))
