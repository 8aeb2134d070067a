"""bnsurgery: BatchNorm surgery on pretrained PyTorch networks.

The public API is imported lazily, so ``import bnsurgery`` (and ``bnsurgery --help``) does not
import torch until a function is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BnSurgeryError",
    "FoldPlan",
    "FoldReport",
    "FrozenBatchNorm",
    "Plan",
    "Report",
    "Skip",
    "Survey",
    "apply",
    "export",
    "fold",
    "freeze",
    "last_report",
    "load",
    "plan_fold",
    "plan_freeze",
    "plan_recalibrate",
    "plan_swap",
    "plan_unfreeze",
    "recalibrate",
    "save",
    "survey",
    "swap",
    "trainable_parameters",
    "unfreeze",
]

_LAZY = {
    "BnSurgeryError": "bnsurgery.errors",
    "FoldPlan": "bnsurgery.foldplan",
    "FoldReport": "bnsurgery.folding",
    "export": "bnsurgery.exporting",
    "fold": "bnsurgery.folding",
    "Plan": "bnsurgery.plan",
    "Report": "bnsurgery.plan",
    "Skip": "bnsurgery.plan",
    "apply": "bnsurgery.plan",
    "last_report": "bnsurgery.plan",
    "plan_freeze": "bnsurgery.freezing",
    "plan_unfreeze": "bnsurgery.freezing",
    "plan_recalibrate": "bnsurgery.recalibration",
    "plan_swap": "bnsurgery.swapping",
    "FrozenBatchNorm": "bnsurgery.frozen",
    "freeze": "bnsurgery.freezing",
    "unfreeze": "bnsurgery.freezing",
    "trainable_parameters": "bnsurgery.freezing",
    "plan_fold": "bnsurgery.foldplan",
    "recalibrate": "bnsurgery.recalibration",
    "swap": "bnsurgery.swapping",
    "Survey": "bnsurgery.surveying",
    "survey": "bnsurgery.surveying",
    "load": "bnsurgery.checkpoint",
    "save": "bnsurgery.checkpoint",
}

if TYPE_CHECKING:
    from .checkpoint import load, save
    from .errors import BnSurgeryError
    from .exporting import export
    from .folding import FoldReport, fold
    from .foldplan import FoldPlan, plan_fold
    from .freezing import freeze, plan_freeze, plan_unfreeze, trainable_parameters, unfreeze
    from .frozen import FrozenBatchNorm
    from .plan import Plan, Report, Skip, apply, last_report
    from .recalibration import plan_recalibrate, recalibrate
    from .surveying import Survey, survey
    from .swapping import plan_swap, swap


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnsurgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
