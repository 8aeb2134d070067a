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
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import provenance
from .errors import UsageError
from .frozen import FrozenBatchNorm
from .hooks import carry_hooks
from .norms import bn_stats, check_finite, is_batchnorm
from .report import freeze_text
from .select import select_batchnorms
from .tree import on_unwrapped

__all__ = ["FreezeReport", "freeze", "stage_names", "trainable_parameters", "unfreeze"]


@dataclass
class FreezeReport:
    """What :func:`freeze` or :func:`unfreeze` did: layers changed, and layers left with why."""

    operation: str
    changed: list[str]
    left: list[tuple[str, str]]
    train_affine: bool = False
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:  # a short table for people; to_dict() for scripts
        return freeze_text(self)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["left"] = [{"bn": n, "reason": r} for n, r in self.left]
        return data


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


@on_unwrapped
def freeze(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    types: Sequence[type[nn.Module]] | None = None,
    stages: int | None = None,
    train_affine: bool = False,
) -> nn.Module:
    """Freeze BN statistics (and, by default, the affine parameters), in place.

    Args:
        model: the model; changed in place and returned.
        include, exclude: glob patterns on BN module names (``"layer1.*"``, ``"stages.0*"``).
        types: only BN modules of these classes (e.g. ``(nn.BatchNorm2d,)``).
        stages: only BN layers in the first ``stages`` stages, the stem counting as the first
            (see :func:`stage_names`).
        train_affine: keep ``weight`` and ``bias`` trainable; only the statistics freeze.

    Returns:
        The model. Frozen layers are :class:`~bnsurgery.frozen.FrozenBatchNorm`; a BN without
        running statistics, and one that is already frozen, is left with a reason in
        :func:`bnsurgery.last_report`.

    Raises:
        UsageError: a pattern that selects nothing (nearest names suggested), an uninitialised
            lazy BN, or a selection with no BN at all.
        StatisticsError: a BN to freeze has NaN/infinite statistics; nothing was changed.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    >>> net = freeze(net).train()
    >>> type(net[1]).__name__, net[1].weight.requires_grad
    ('FrozenBatchNorm', False)
    """
    chosen = select_batchnorms(model, include, exclude, types)
    if stages is not None:
        allowed = _in_stages(model, stages)
        chosen = [(n, m) for n, m in chosen if n in allowed]
    if not chosen:
        raise UsageError("no BatchNorm layer selected to freeze")
    check_finite(
        (
            (n, m)
            for n, m in chosen
            if isinstance(m, _BatchNorm)
            and not isinstance(m, FrozenBatchNorm)
            and bn_stats(m) is not None
        ),
        "freeze",
    )
    changed: list[str] = []
    left: list[tuple[str, str]] = []
    structure: list[dict[str, Any]] = []
    for name, bn in chosen:
        if isinstance(bn, FrozenBatchNorm):
            if bn.train_affine == bool(train_affine):
                left.append((name, "already frozen by bnsurgery"))
                continue
            bn.set_train_affine(train_affine)  # freeze(..., train_affine=True) frees the affine
            paths = {path for _, _, path in provenance.parents(model, bn)}
            for edit in provenance.get_record(model)["structure"]:
                if edit.get("with") == "frozen" and edit.get("replace") in paths:
                    edit["train_affine"] = bool(train_affine)
            changed.append(name)
            continue
        if not isinstance(bn, _BatchNorm):
            left.append((name, f"already frozen ({type(bn).__name__})"))
            continue
        if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
            raise UsageError(f"{name}: an uninitialised lazy BN; run one forward pass first")
        if bn_stats(bn) is None:
            left.append((name, "no running statistics (track_running_stats=False) to freeze"))
            continue
        frozen = carry_hooks(bn, FrozenBatchNorm(bn, train_affine=train_affine))
        parents = list(provenance.parents(model, bn))
        if not parents:
            left.append((name, "the model itself is the BN; use FrozenBatchNorm(model)"))
            continue
        for parent, child_name, path in parents:
            setattr(parent, child_name, frozen)
            structure.append({"replace": path, "with": "frozen", "train_affine": train_affine})
        changed.append(name)
    report = FreezeReport("freeze", changed, left, train_affine)
    provenance.record_step(model, {"op": "freeze", "frozen": len(changed)}, structure)
    provenance.set_report(model, report)
    return model


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
    frozen = [
        (n, m)
        for n, m in select_batchnorms(model, include, exclude)
        if isinstance(m, FrozenBatchNorm)
    ]
    changed: list[str] = []
    paths: set[str] = set()
    for name, module in frozen:
        original = module.restore()
        for parent, child_name, path in list(provenance.parents(model, module)):
            setattr(parent, child_name, original)
            paths.add(path)
        changed.append(name)
    left = [
        (n, "not frozen by bnsurgery")
        for n, m in select_batchnorms(model, include, exclude)
        if not isinstance(m, FrozenBatchNorm) and n not in changed
    ]
    record = provenance.get_record(model)
    record["structure"] = [
        e
        for e in record["structure"]
        if not (e.get("with") == "frozen" and e.get("replace") in paths)
    ]
    record["steps"].append({"op": "unfreeze", "unfrozen": len(changed)})
    provenance.set_report(model, FreezeReport("unfreeze", changed, left))
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should get: those that require grad, each once.

    Frozen BN affine parameters are excluded, so they never reach weight decay.

    >>> net = freeze(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    >>> len(trainable_parameters(net))
    2
    """
    return [p for p in model.parameters() if p.requires_grad]
