"""Plans: what a surgery will do, as plain values, and the one driver that applies them.

Every surgery works in two steps, as fvcore's precise BN and pip-tools' sync do:

1. **plan** reads the model and decides, for every BN, one edit or one :class:`Skip` with its
   reason. Nothing changes, so a :class:`Plan` can be printed (``print(plan)``), saved as
   JSON (``plan.to_dict()``), filtered or checked before anything happens.
2. **apply** carries the edits out as one :class:`Transaction`: every assignment it makes can
   be undone, so an edit that fails (or a check after the edits: fold's verification, swap's
   calibration) puts the model back exactly as it was. On success the structural edits are
   recorded (:mod:`bnsurgery.provenance`) so that a saved checkpoint rebuilds them, and the
   surgery's report is kept for :func:`last_report`.

Edits are small frozen dataclasses with an ``apply(model, txn)`` method (:mod:`bnsurgery.edits`,
and fold's :class:`~bnsurgery.foldplan.FoldEdit`).

>>> from torch import nn
>>> from bnsurgery.edits import Replace
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
>>> plan = Plan("swap", [Replace("1", "identity")], [], {"op": "swap", "to": "identity",
...     "swapped": 1})
>>> report = apply(net, plan)
>>> type(net[1]).__name__, report.changed
('FoldedBatchNorm', ['1'])
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from . import provenance
from .norms import iter_batchnorms, unusable
from .report import plan_text, report_text
from .select import select_batchnorms
from .tree import parents, unwrapped

__all__ = [
    "NOT_SELECTED",
    "Edit",
    "Plan",
    "Report",
    "Skip",
    "Transaction",
    "apply",
    "last_report",
    "select",
    "set_report",
]

#: The reason every surgery gives for a BN its ``include``/``exclude``/``types`` left out.
NOT_SELECTED = "not selected"


class Skip(NamedTuple):
    """One BN left as it is, and why. Unpacks as ``(bn, reason)``."""

    bn: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"bn": self.bn, "reason": self.reason}


class Edit(Protocol):
    """One change to one BN (``bn`` is its module name)."""

    bn: str

    def apply(self, model: nn.Module, txn: Transaction) -> None: ...


def _as_dict(value: Any) -> dict[str, Any]:
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else dict(value)


@dataclass
class Plan:
    """What a surgery will do: edits, skips with reasons, and the step it records.

    Attributes:
        operation: ``"fold"``, ``"freeze"``, ``"unfreeze"``, ``"swap"`` or ``"recalibrate"``.
        edits: one edit per BN that changes.
        skipped: one :class:`Skip` per BN that does not, with the reason.
        step: the summary line the model's record keeps (see :mod:`bnsurgery.provenance`).
        notes: what the user should know about the plan as a whole.
    """

    operation: str
    edits: list[Edit]
    skipped: list[Skip]
    step: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:  # a short table for people; to_dict() for scripts
        return plan_text(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "edits": [_as_dict(e) for e in self.edits],
            "skipped": [s.to_dict() for s in self.skipped],
            "notes": list(self.notes),
        }

    def without(self, reasons: Mapping[str, str]) -> Plan:
        """The plan with the edits of these BNs turned into skips with these reasons."""
        edits = [e for e in self.edits if e.bn not in reasons]
        skipped = [*self.skipped, *(Skip(bn, why) for bn, why in reasons.items())]
        return dataclasses.replace(self, edits=edits, skipped=skipped)


@dataclass
class Report:
    """What a surgery did: the BNs it changed, those it left and why, and notes."""

    operation: str
    changed: list[str]
    left: list[Skip]
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:  # a short table for people; to_dict() for scripts
        return report_text(self)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["left"] = [Skip(*s).to_dict() for s in self.left]
        return data


# ----------------------------------------------------------------------------- selection


def select(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    types: Sequence[type[nn.Module]] | None = None,
    statistics: bool = True,
) -> tuple[list[tuple[str, nn.Module]], list[Skip]]:
    """The BNs a surgery may work on, and a :class:`Skip` for every other BN of the model.

    One policy for every surgery: a BN the patterns or ``types`` leave out is
    :data:`NOT_SELECTED`; the model itself being the BN, and a BN :func:`~bnsurgery.norms.
    unusable` finds unusable (an uninitialised lazy BN; without running statistics, when the
    surgery needs them), are skipped with that reason.

    Raises:
        UsageError: a pattern matches no BN (see :func:`~bnsurgery.select.select_batchnorms`).
    """
    chosen = {id(m) for _, m in select_batchnorms(model, include, exclude, types)}
    usable: list[tuple[str, nn.Module]] = []
    skipped: list[Skip] = []
    for name, bn in iter_batchnorms(model):
        if id(bn) not in chosen:
            skipped.append(Skip(name, NOT_SELECTED))
        elif not name:
            skipped.append(Skip(name, "the model itself is the BN: no module holds it"))
        elif (reason := unusable(bn, statistics=statistics)) is not None:
            skipped.append(Skip(name, reason))
        else:
            usable.append((name, bn))
    return usable, skipped


# ----------------------------------------------------------------------------- applying


class Transaction:
    """Changes to a model that can all be undone, in reverse order, and the record edits that
    go with them (written on :meth:`commit`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._undo: list[Callable[[], None]] = []
        self._record: list[tuple[str, Any]] = []

    def set(self, obj: Any, attr: str, value: Any) -> None:
        """``setattr(obj, attr, value)``, undoable."""
        old = getattr(obj, attr)
        setattr(obj, attr, value)
        self._undo.append(lambda: setattr(obj, attr, old))

    def copy(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """Copy ``value`` into ``tensor`` in place, undoable."""
        with torch.no_grad():
            old = tensor.detach().clone()
            tensor.copy_(value)

        def undo() -> None:
            with torch.no_grad():
                tensor.copy_(old)

        self._undo.append(undo)

    def call(self, do: Callable[[], None], undo: Callable[[], None]) -> None:
        """Run ``do``; ``undo`` on rollback."""
        do()
        self._undo.append(undo)

    def replace(self, module: nn.Module, new: nn.Module, record: Mapping[str, Any] | None) -> None:
        """Put ``new`` wherever ``module`` is registered. ``record``: the structural edit a
        checkpoint replays (``{"with": ..., "options": ...}``), or ``None`` when the module
        becomes what the architecture builds again (earlier edits of its paths are dropped)."""
        for parent, child, path in parents(self.model, module):
            self.set(parent, child, new)
            self._record.append(
                ("drop", path) if record is None else ("add", {"replace": path, **record})
            )

    def add_record(self, entry: Mapping[str, Any]) -> None:
        """A structural edit made otherwise (fold's added bias)."""
        self._record.append(("add", dict(entry)))

    def amend(self, path: str, options: Mapping[str, Any]) -> None:
        """Update the options of the recorded replacement at ``path``."""
        self._record.append(("amend", (path, dict(options))))

    def rollback(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._record.clear()

    def commit(self, step: Mapping[str, Any]) -> None:
        """Keep the changes; record ``step`` and the structural edits in the model's record."""
        provenance.record_step(self.model, dict(step), self._record)
        self._undo.clear()
        self._record = []


def begin(model: nn.Module, plan: Plan) -> Transaction:
    """Apply every edit of ``plan`` as one transaction and return it, open: the caller checks
    the result, then commits or rolls back. An edit that raises rolls back the others first."""
    txn = Transaction(model)
    try:
        for edit in plan.edits:
            edit.apply(model, txn)
    except BaseException:
        txn.rollback()
        raise
    return txn


def apply(model: nn.Module, plan: Plan) -> Report:
    """Apply ``plan`` to ``model`` in place, all or nothing, and record it.

    Returns:
        A :class:`Report`: the BNs changed, the BNs left with the plan's reasons. It is also
        :func:`last_report` of the model.

    Raises:
        Whatever an edit raises; the model is then exactly as it was.
    """
    begin(model, plan).commit(plan.step)
    report = Report(
        plan.operation, [e.bn for e in plan.edits], list(plan.skipped), list(plan.notes)
    )
    set_report(model, report)
    return report


# ----------------------------------------------------------------------------- reports

_REPORTS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def set_report(model: nn.Module, report: Any) -> None:
    """Keep ``report`` as the model's :func:`last_report`."""
    _REPORTS[unwrapped(model)] = report


def last_report(model: nn.Module) -> Any:
    """The report of the last surgery applied to this model object (``None`` before any).

    The surgeries return the model, so that ``model = bnsurgery.fold(model, x)`` reads as it
    does; this is where their report goes. :func:`apply` returns its report too.
    """
    return _REPORTS.get(unwrapped(model))
