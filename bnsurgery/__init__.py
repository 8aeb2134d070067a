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
    "Survey",
    "FrozenBatchNorm",
    "fold",
    "freeze",
    "last_report",
    "load",
    "plan_fold",
    "recalibrate",
    "save",
    "survey",
    "swap",
    "trainable_parameters",
    "unfreeze",
]

_LAZY = {
    "BnSurgeryError": "bnsurgery.errors",
    "FoldPlan": "bnsurgery.folding",
    "FoldReport": "bnsurgery.folding",
    "fold": "bnsurgery.folding",
    "last_report": "bnsurgery.provenance",
    "FrozenBatchNorm": "bnsurgery.frozen",
    "freeze": "bnsurgery.freezing",
    "unfreeze": "bnsurgery.freezing",
    "trainable_parameters": "bnsurgery.freezing",
    "plan_fold": "bnsurgery.folding",
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
    from .folding import FoldPlan, FoldReport, fold, plan_fold
    from .freezing import freeze, trainable_parameters, unfreeze
    from .frozen import FrozenBatchNorm
    from .provenance import last_report
    from .recalibration import recalibrate
    from .surveying import Survey, survey
    from .swapping import swap


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnsurgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
