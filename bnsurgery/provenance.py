"""Where a model came from and what surgery changed its structure, so it can be rebuilt.

A model loaded through :mod:`bnsurgery.checkpoint` remembers its architecture spec
(``timm:resnet18``). Every surgery appends a step (a summary) and the structural edits it made
(a module replaced, a bias added). The safe checkpoint format stores this record; loading
rebuilds the architecture, replays the structural edits and then loads the weights strictly,
without unpickling anything.

The record is a plain dict of builtins kept in the model's ``__dict__``, so it survives
``copy.deepcopy`` and pickling without importing bnsurgery.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn

from .errors import BnSurgeryError, SourceError
from .hooks import carry_hooks
from .norms import NormActRemainder, remainder_of
from .tree import unwrapped

__all__ = [
    "add_zero_bias",
    "get_record",
    "last_report",
    "parents",
    "set_report",
    "record_step",
    "replace_module",
    "replay",
    "set_arch",
]

_ATTR = "_bnsurgery_record"


def get_record(model: nn.Module) -> dict[str, Any]:
    """The model's record: ``{"arch": str | None, "steps": [...], "structure": [...]}``
    (of the module a ``torch.compile`` or DataParallel wrapper runs, which surgeries change)."""
    model = unwrapped(model)
    record = model.__dict__.get(_ATTR)
    if record is None:
        record = {"arch": None, "steps": [], "structure": []}
        model.__dict__[_ATTR] = record
    return record


_REPORTS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def set_report(model: nn.Module, report: Any) -> None:
    """Remember the report of the last surgery applied to this model object."""
    _REPORTS[unwrapped(model)] = report


def last_report(model: nn.Module) -> Any:
    """The report of the last surgery (fold, freeze, ...) applied to this model object."""
    return _REPORTS.get(unwrapped(model))


def set_arch(model: nn.Module, arch: str | None) -> None:
    """Remember the architecture spec the model was built from."""
    get_record(model)["arch"] = arch


def record_step(model: nn.Module, step: dict[str, Any], structure: list[dict[str, Any]]) -> None:
    """Append a surgery step and the structural edits it made."""
    record = get_record(model)
    record["steps"].append(step)
    record["structure"].extend(structure)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, child


def parents(model: nn.Module, module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """Every place ``module`` is registered in ``model``: ``(parent, attribute, path)``.

    A module shared under several names is found under each of them.
    """
    return [
        (parent, child_name, f"{name}.{child_name}" if name else child_name)
        for name, parent in model.named_modules(remove_duplicate=False)
        for child_name, child in list(parent._modules.items())
        if child is module
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the module path ``name``; return the module that was there."""
    parent, child = _parent(model, name)
    old = parent._modules[child]
    setattr(parent, child, new)
    return old


def add_zero_bias(module: nn.Module, channels: int, like: torch.Tensor) -> None:
    """Give a conv or linear module without bias a zero bias (it then uses ``self.bias``)."""
    module.bias = nn.Parameter(
        torch.zeros(channels, dtype=like.dtype, device=like.device),
        requires_grad=like.requires_grad,
    )


def _frozen(old: nn.Module, edit: dict[str, Any]) -> nn.Module:
    from .frozen import FrozenBatchNorm

    return FrozenBatchNorm(old, train_affine=bool(edit.get("train_affine", False)))


#: Structural edit kinds: how to build the replacement from the module being replaced.
_BUILDERS = {
    "identity": lambda old, edit: remainder_of(old),
    "norm_act_remainder": lambda old, edit: remainder_of(old),
    "frozen": _frozen,
}


def structure_kind(module: nn.Module) -> str:
    """The builder name that reproduces a replacement module."""
    if isinstance(module, NormActRemainder):
        return "norm_act_remainder"
    if isinstance(module, nn.Identity):
        return "identity"
    raise ValueError(f"no rebuild rule for {type(module).__name__}")


def replay(model: nn.Module, structure: list[dict[str, Any]]) -> None:
    """Apply recorded structural edits to a freshly built architecture.

    Raises:
        SourceError: an edit names a module the architecture does not have.
    """
    for edit in structure:
        try:
            if "replace" in edit:
                name = edit["replace"]
                parent, child = _parent(model, name)
                old = parent._modules[child]
                kind = edit["with"]
                if kind.startswith("swap:"):
                    from .swapping import rebuild

                    new = rebuild(old, kind[5:], edit.get("options", {}))
                else:
                    new = _BUILDERS[kind](old, edit)
                # hooks the architecture's own code registered on the BN fire on its
                # replacement, as they did when the surgery was made
                setattr(parent, child, carry_hooks(old, new))
            elif "add_bias" in edit:
                module = model.get_submodule(edit["add_bias"])
                add_zero_bias(module, int(edit["channels"]), module.weight)
        except (AttributeError, KeyError, TypeError, ValueError, BnSurgeryError) as exc:
            raise SourceError(
                f"checkpoint structure does not fit the architecture at {edit}: {exc}"[:400]
            ) from exc
    record = get_record(model)
    record["structure"] = copy.deepcopy(list(structure))
