"""freeze and unfreeze: BN that stays frozen through fine-tuning, exactly reversible.

:func:`freeze` replaces each selected BN by a :class:`~bnsurgery.frozen.FrozenBatchNorm` that
shares its tensors and keeps its state-dict keys. Because the frozen module ignores its training
flag, ``model.train()`` cannot undo the freeze, and it survives ``copy.deepcopy``, pickling,
``state_dict`` round trips, ``.to()``, ``torch.compile`` and ``DistributedDataParallel``.
:func:`unfreeze` puts back the original module objects with everything they had.

Like every bnsurgery surgery it works in place and returns the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import targets
from .edits import FreezeFused, FuseFrozen, Replace, Restore, SetAffineTraining
from .errors import UsageError
from .frozen import FrozenBatchNorm
from .norms import check_finite, is_batchnorm
from .plan import Plan, Report, Skip, apply, select, set_report
from .report import freeze_text
from .tree import on_unwrapped

__all__ = [
    "FreezeReport",
    "freeze",
    "plan_freeze",
    "plan_unfreeze",
    "stage_names",
    "trainable_parameters",
    "unfreeze",
]


@dataclass
class FreezeReport(Report):
    """What :func:`freeze` or :func:`unfreeze` did: layers changed, and layers left with why;
    with ``fuse``, the frozen BNs computed inside their layer (``fused``: BN, layer) and the
    frozen BNs that were not, with why (``unfused``)."""

    train_affine: bool = False
    fused: list[tuple[str, str]] = field(default_factory=list)
    unfused: list[Skip] = field(default_factory=list)

    def __str__(self) -> str:  # a short table for people; to_dict() for scripts
        return freeze_text(self)


def stage_names(model: nn.Module) -> list[list[str]]:
    """Module-name prefixes of each stage, stem first.

    timm models define their stages (``group_matcher``); for any other model each top-level
    child that holds a BN is a stage, in registration order.
    """
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        try:
            from timm.models import group_modules

            groups = group_modules(model, matcher(coarse=True))
            return [list(names) for _, names in sorted(groups.items())]
        except Exception:  # a model whose matcher does not fit its modules: fall back
            pass
    return [
        [name]
        for name, child in model.named_children()
        if any(is_batchnorm(m) for m in child.modules())
    ]


def _in_stages(model: nn.Module, stages: int) -> set[str]:
    if stages < 1:
        raise UsageError("stages must be at least 1 (1 = the stem only)")
    prefixes = [p for group in stage_names(model)[:stages] for p in group]
    return {
        name
        for name, m in model.named_modules()
        if is_batchnorm(m) and any(name == p or name.startswith(p + ".") for p in prefixes)
    }


@dataclass
class FreezePlan(Plan):
    """A freeze's plan; ``unfused``: the BNs it freezes that no layer will compute, and why."""

    unfused: list[Skip] = field(default_factory=list)


def plan_freeze(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    types: Sequence[type[nn.Module]] | None = None,
    stages: int | None = None,
    train_affine: bool = False,
    fuse: bool = False,
    example_inputs: Any = None,
) -> FreezePlan:
    """Plan :func:`freeze` without changing anything: a :class:`FreezePlan` with one edit or
    one skip for every BN (arguments as for :func:`freeze`)."""
    chosen, skipped = select(model, include, exclude, types=types)
    if stages is not None:
        allowed = _in_stages(model, stages)
        skipped += [
            Skip(n, f"not in the first {stages} stages") for n, _ in chosen if n not in allowed
        ]
        chosen = [(n, m) for n, m in chosen if n in allowed]
    frozen = targets.target("frozen")
    edits: list[Any] = []
    for name, bn in chosen:
        if isinstance(bn, FrozenBatchNorm) and bn.train_affine != bool(train_affine):
            edits.append(SetAffineTraining(name, bool(train_affine)))  # frees or fixes the affine
        elif fuse and isinstance(bn, FrozenBatchNorm) and not bn.fused:
            edits.append(FuseFrozen(name))  # frozen before (a frozen file loaded back)
        elif (reason := frozen.refuses(bn, {})) is not None:
            skipped.append(Skip(name, reason))
        else:
            edits.append(Replace(name, "frozen", {"train_affine": bool(train_affine)}))
    unfused: list[Skip] = []
    step: dict[str, Any] = {"op": "freeze", "frozen": len(edits)}
    if fuse:
        edits, unfused = _fused(model, edits, example_inputs, skipped)
        step["frozen"] = sum(not isinstance(e, FuseFrozen) for e in edits)
        step["fused"] = sum(isinstance(e, FreezeFused | FuseFrozen) for e in edits)
    return FreezePlan("freeze", edits, skipped, step, unfused=unfused)


def _fused(
    model: nn.Module, edits: list[Any], example_inputs: Any, skipped: list[Skip]
) -> tuple[list[Any], list[Skip]]:
    """``edits`` with each freeze whose BN the layer before can compute made a
    :class:`~bnsurgery.edits.FreezeFused`; and the freezes that stay plain, with why.

    The layer is the one a fold would fold the BN into as its producer (the graph walk:
    :func:`~bnsurgery.foldplan.plan_fold`, on the example inputs or symbolically), called once,
    with the BN reading its output alone, directly (no layout op between), and an exact
    ``Conv1d``/``Conv2d``/``Conv3d``/``Linear`` (:func:`bnsurgery.fused.refuses`)."""
    from . import fused
    from .errors import BnSurgeryError
    from .foldplan import plan_fold

    names = [e.bn for e in edits if type(e) in (Replace, FuseFrozen)]
    if not names:
        return edits, []
    try:
        fold = plan_fold(model, example_inputs, include=names, placements=("producer",))
    except BnSurgeryError as exc:
        why = f"the graph walk failed ({exc}); pass example inputs"
        again = [e for e in edits if type(e) is FuseFrozen]
        skipped += [Skip(e.bn, f"already frozen by bnsurgery; not fused: {why}") for e in again]
        edits = [e for e in edits if type(e) is not FuseFrozen]
        return edits, [Skip(e.bn, why) for e in edits if type(e) is Replace]
    into = {e.bn: e for e in fold.edits}
    why_not = {s.bn: s.reason for s in fold.skipped}
    out: list[Any] = []
    unfused: list[Skip] = []
    for edit in edits:
        if type(edit) not in (Replace, FuseFrozen):
            out.append(edit)
            continue
        found = into.get(edit.bn)
        reason = why_not.get(edit.bn, "no layer before it takes it")
        if found is not None:
            reason = _unfusable(found) or fused.refuses(
                model.get_submodule(found.into), model.get_submodule(edit.bn)
            )
        if reason is None and isinstance(edit, FuseFrozen):
            out.append(FuseFrozen(edit.bn, layer=found.into))
        elif reason is None:
            out.append(FreezeFused(edit.bn, edit.target, edit.options, layer=found.into))
        elif isinstance(edit, FuseFrozen):  # nothing to do for it after all
            skipped.append(Skip(edit.bn, f"already frozen by bnsurgery; not fused: {reason}"))
        else:
            out.append(edit)
            unfused.append(Skip(edit.bn, reason))
    return out, unfused


def _unfusable(edit: Any) -> str | None:
    """Why a producer fold edit is not one a layer can compute at run time."""
    if edit.layer not in ("conv", "linear"):
        return f"its layer is a {edit.layer}"
    indirect = edit.indirect()
    if indirect:
        return indirect
    if edit.scales:
        return f"its layer's weight is computed ({edit.scales})"
    if edit.layer == "linear" and edit.notes:
        return "; ".join(edit.notes)
    return None


@on_unwrapped
def freeze(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    types: Sequence[type[nn.Module]] | None = None,
    stages: int | None = None,
    train_affine: bool = False,
    fuse: bool = False,
    example_inputs: Any = None,
) -> nn.Module:
    """Freeze BN statistics (and, by default, the affine parameters), in place.

    Args:
        model: the model; changed in place and returned.
        include, exclude: glob patterns on BN module names (``"layer1.*"``, ``"stages.0*"``).
        types: only BN modules of these classes (e.g. ``(nn.BatchNorm2d,)``).
        stages: only BN layers in the first ``stages`` stages, the stem counting as the first
            (see :func:`stage_names`).
        train_affine: keep ``weight`` and ``bias`` trainable; only the statistics freeze.
        fuse: have each frozen BN computed inside the conv or linear before it, where that
            layer's output goes to the BN alone (:mod:`bnsurgery.fused`): the same function
            and gradients, without keeping the layer's unnormalised output for the backward
            pass (less memory in training). The report lists what fused and why the rest
            did not.
        example_inputs: inputs to walk the graph on for ``fuse`` (default: symbolically).

    Returns:
        The model. Frozen layers are :class:`~bnsurgery.frozen.FrozenBatchNorm`. Every BN not
        frozen (not selected, already frozen, without running statistics, an uninitialised
        lazy BN) is listed with its reason in :func:`bnsurgery.last_report`'s
        :class:`FreezeReport`; a model without BN gives an empty report.

    Raises:
        UsageError: a pattern that selects nothing (nearest names suggested).
        StatisticsError: a BN to freeze has NaN/infinite statistics; nothing was changed.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    >>> net = freeze(net).train()
    >>> type(net[1]).__name__, net[1].weight.requires_grad
    ('FrozenBatchNorm', False)
    """
    plan = plan_freeze(
        model, include, exclude, types=types, stages=stages, train_affine=train_affine,
        fuse=fuse, example_inputs=example_inputs,
    )  # fmt: skip
    check_finite(
        ((e.bn, model.get_submodule(e.bn)) for e in plan.edits if isinstance(e, Replace)), "freeze"
    )
    applied = apply(model, plan)
    report = FreezeReport(
        "freeze", applied.changed, applied.left, train_affine=bool(train_affine),
        fused=[(e.bn, e.layer) for e in plan.edits if isinstance(e, FreezeFused | FuseFrozen)],
        unfused=list(plan.unfused),
    )  # fmt: skip
    set_report(model, report)
    return model


def plan_unfreeze(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> Plan:
    """Plan :func:`unfreeze` without changing anything."""
    chosen, skipped = select(model, include, exclude, statistics=False)
    edits = [Restore(n) for n, m in chosen if isinstance(m, FrozenBatchNorm)]
    skipped += [
        Skip(n, "not frozen by bnsurgery") for n, m in chosen if not isinstance(m, FrozenBatchNorm)
    ]
    return Plan("unfreeze", edits, skipped, {"op": "unfreeze", "unfrozen": len(edits)})


@on_unwrapped
def unfreeze(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> nn.Module:
    """Undo :func:`freeze` in place: the original BN modules come back with their class,
    momentum, ``num_batches_tracked``, affine, eps, ``requires_grad`` and training flag, and
    the current values (and dtype and device) of their tensors.

    Raises:
        UsageError: a pattern that selects nothing.
    """
    applied = apply(model, plan_unfreeze(model, include, exclude))
    set_report(model, FreezeReport("unfreeze", applied.changed, applied.left))
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should get: those that require grad, each once.

    Frozen BN affine parameters are excluded, so they never reach weight decay.

    >>> net = freeze(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    >>> len(trainable_parameters(net))
    2
    """
    return [p for p in model.parameters() if p.requires_grad]
