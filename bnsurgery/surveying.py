"""survey: a read-only report of a model's BN layers, their health and the fold plan.

Named ``survey`` so it never shadows the standard library's ``inspect``; the CLI command is
``bnsurgery inspect``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import BnSurgeryError
from .frozen import FrozenBatchNorm
from .norms import bad_statistics, eps_of, has_activation, is_batchnorm, is_frozen_batchnorm
from .report import survey_text
from .tree import on_unwrapped

__all__ = ["BNInfo", "Survey", "survey"]

#: A running variance below this (relative to eps) is flagged: the BN divides by ~sqrt(eps).
_NEAR_ZERO_VAR = 1e-6


@dataclass(frozen=True)
class BNInfo:
    """One BN layer as found."""

    name: str
    type: str
    channels: int | None
    eps: float | None
    momentum: float | None
    affine: bool
    track_running_stats: bool
    training: bool
    frozen: bool
    activation: str | None
    num_batches_tracked: int | None
    health: tuple[str, ...]
    fold: str

    @property
    def healthy(self) -> bool:
        return not self.health


@dataclass
class Survey:
    """Every BN layer of a model, plus the fold plan when the graph could be walked."""

    layers: list[BNInfo]
    fold_method: str | None
    fold_error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def foldable(self) -> int:
        return sum(1 for info in self.layers if info.fold.startswith("into "))

    def __str__(self) -> str:  # a short table for people; to_dict() for scripts
        return survey_text(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bn_count": len(self.layers),
            "foldable": self.foldable,
            "fold_method": self.fold_method,
            "fold_error": self.fold_error,
            "notes": self.notes,
            "layers": [{**asdict(info), "health": list(info.health)} for info in self.layers],
        }


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor) or isinstance(value, nn.parameter.UninitializedBuffer):
        return None
    if isinstance(value, nn.parameter.UninitializedParameter):
        return None
    return value


def _health(module: nn.Module) -> tuple[str, ...]:
    problems: list[str] = []
    mean, var = _tensor(module, "running_mean"), _tensor(module, "running_var")
    if isinstance(getattr(module, "running_mean", None), nn.parameter.UninitializedBuffer):
        return ("uninitialised lazy BN",)
    if mean is None or var is None:
        return ("no running statistics (track_running_stats=False)",)
    for label, t in (("mean", mean), ("var", var)):
        t = t.detach().float()
        if torch.isnan(t).any():
            problems.append(f"NaN in running {label}")
        if torch.isinf(t).any():
            problems.append(f"inf in running {label}")
    v = var.detach().float()
    if (v < 0).any():
        problems.append(f"negative running var in {int((v < 0).sum())} channels")
    near_zero = int((v.abs() < _NEAR_ZERO_VAR).sum())
    if near_zero:
        problems.append(f"running var near zero in {near_zero} channels")
    tracked = _tensor(module, "num_batches_tracked")
    if tracked is not None and int(tracked) == 0:
        problems.append("never trained (num_batches_tracked == 0)")
    for label in ("weight", "bias"):
        t = _tensor(module, label)
        if t is not None and not torch.isfinite(t.detach().float()).all():
            problems.append(f"non-finite {label}")
    return tuple(problems)


def _always_eval(module: nn.Module) -> bool:
    return isinstance(module, FrozenBatchNorm) or is_frozen_batchnorm(module)


def _is_frozen(module: nn.Module) -> bool:
    if is_frozen_batchnorm(module) or isinstance(module, FrozenBatchNorm):
        return True
    params = list(module.parameters(recurse=False))
    return bool(params) and not module.training and not any(p.requires_grad for p in params)


def _info(name: str, module: nn.Module, fold: str) -> BNInfo:
    tracked = _tensor(module, "num_batches_tracked")
    mean = _tensor(module, "running_mean")
    weight = getattr(module, "weight", None)
    channels = getattr(module, "num_features", None)
    if channels is None and mean is not None:
        channels = mean.numel()
    momentum = getattr(module, "momentum", None)
    eps = getattr(module, "eps", None)
    if eps is None and is_frozen_batchnorm(module):
        eps = eps_of(module)  # hard-coded in its forward (Hugging Face's frozen BN)
    return BNInfo(
        name=name,
        type=str(getattr(module, "original_name", None) or type(module).__name__),
        channels=int(channels) if channels is not None else None,
        eps=float(eps) if eps is not None else None,
        momentum=float(momentum) if momentum is not None else None,
        affine=isinstance(weight, torch.Tensor) and isinstance(weight, nn.Parameter),
        track_running_stats=bool(getattr(module, "track_running_stats", mean is not None)),
        training=module.training and not _always_eval(module),
        frozen=_is_frozen(module),
        activation=type(module.act).__name__ if has_activation(module) else None,
        num_batches_tracked=int(tracked) if tracked is not None else None,
        health=_health(module),
        fold=fold,
    )


@on_unwrapped
def survey(model: nn.Module, example_inputs: Any = None) -> Survey:
    """Survey every BN layer of ``model`` without changing it.

    Args:
        model: the model (eager or TorchScript; the fold plan needs an eager model).
        example_inputs: inputs for a real-forward graph walk; without them the fold plan uses
            symbolic tracing, and is omitted (with the reason) if that fails.

    Returns:
        A :class:`Survey`: per layer its name, type, channels, eps, momentum, mode, frozen
        state, statistics health and the fold plan (``"into <layer> (producer)"`` or
        ``"left: <reason>"``).

    >>> s = survey(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    >>> [(i.name, i.fold) for i in s.layers]
    [('1', 'into 0 (producer)')]
    """
    plan_for: dict[str, str] = {}
    method = None
    error = None
    notes: list[str] = []
    if isinstance(model, torch.jit.ScriptModule):
        error = "TorchScript model: no graph walk, so no fold plan"
        layers = [
            (name, m)
            for name, m in model.named_modules()
            if getattr(m, "original_name", "")
            .replace("Sync", "")
            .startswith(("BatchNorm", "FrozenBatchNorm"))
        ]
    else:
        layers = [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]
        if layers:
            from .foldplan import plan_fold

            try:
                plan = plan_fold(model, example_inputs)
            except BnSurgeryError as exc:
                error = str(exc)
            else:
                method = plan.method
                for edit in plan.edits:
                    plan_for[edit.bn] = f"into {edit.into} ({edit.placement})"
                for skip in plan.skipped:
                    plan_for[skip.bn] = f"left: {skip.reason}"
                for name, m in layers:  # what fold does with them: refuses the whole fold
                    problem = bad_statistics(m)
                    if problem is not None and plan_for.get(name, "").startswith("into "):
                        plan_for[name] = f"refused: {problem} (fold stops; recalibrate first)"
    if not layers:
        notes.append("no BatchNorm layers")
    infos = [_info(name, m, plan_for.get(name, "unknown: no fold plan")) for name, m in layers]
    return Survey(infos, method, error, notes)
