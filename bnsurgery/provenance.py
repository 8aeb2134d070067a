"""Where a model came from and what surgery changed its structure, so it can be rebuilt.

A model loaded through :mod:`bnsurgery.checkpoint` remembers its architecture spec
(``timm:resnet18``). Every surgery appends a :class:`Step` (a summary) and the
:class:`StructureEdit` list it made (a BN replaced by a registry target, a bias added). The safe
checkpoint format stores this record; loading rebuilds the architecture, replays the
structural edits (:func:`replay`, through the one registry in :mod:`bnsurgery.targets`) and
then loads the weights strictly, without unpickling anything.

The record is a plain dict of builtins kept in the model's ``__dict__``, so it survives
``copy.deepcopy`` and pickling without importing bnsurgery; the types below say its shape.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, TypedDict

import torch
from torch import nn

from . import regions, targets
from .errors import BnSurgeryError, SourceError
from .hooks import carry_hooks
from .tree import unwrapped

__all__ = [
    "Record",
    "Step",
    "StructureEdit",
    "add_zero_bias",
    "get_record",
    "record_step",
    "replay",
    "set_arch",
]

_ATTR = "_bnsurgery_record"


class Step(TypedDict, total=False):
    """One surgery: ``op`` and its counts (the fields :data:`bnsurgery.trust.STEPS` allows)."""

    op: str


#: A structural edit: a module replaced (``{"replace": path, "with": target name, "options":
#: {...}}``), a zero bias added to a layer (``{"add_bias": path, "channels": n}``) or a block's
#: linear regions collapsed into convs (``{"collapse": path, "regions": [...]}``, see
#: :meth:`bnsurgery.regions.Collapse.record`). ("with" is a Python keyword, so this is a
#: mapping type rather than a TypedDict.)
StructureEdit = dict[str, Any]


class Record(TypedDict):
    """A model's provenance: its architecture spec, surgery steps and structural edits."""

    arch: str | None
    steps: list[Step]
    structure: list[StructureEdit]


def get_record(model: nn.Module) -> Record:
    """The model's record (of the module a ``torch.compile`` or DataParallel wrapper runs,
    which surgeries change)."""
    model = unwrapped(model)
    record = model.__dict__.get(_ATTR)
    if record is None:
        record = {"arch": None, "steps": [], "structure": []}
        model.__dict__[_ATTR] = record
    return record


def set_arch(model: nn.Module, arch: str | None) -> None:
    """Remember the architecture spec the model was built from."""
    get_record(model)["arch"] = arch


def record_step(
    model: nn.Module, step: dict[str, Any], changes: Iterable[tuple[str, Any]] = ()
) -> None:
    """Append a surgery step and apply its changes to the recorded structure, in order:
    ``("add", edit)`` appends an edit, ``("drop", path)`` removes the edits of ``path`` (the
    module there is again what the architecture builds), ``("amend", (path, options))``
    updates the options of the replacement recorded at ``path``."""
    record = get_record(model)
    record["steps"].append(step)
    structure = record["structure"]
    for kind, value in changes:
        if kind == "add":
            structure.append(dict(value))
        elif kind == "drop":
            structure[:] = [e for e in structure if e.get("replace") != value]
        elif kind == "amend":
            path, options = value
            for edit in structure:
                if edit.get("replace") == path:
                    edit["options"] = {**edit.get("options", {}), **options}
                    edit.pop("train_affine", None)  # an older file's place for it
        else:
            raise ValueError(f"unknown record change {kind!r}")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, child


def add_zero_bias(module: nn.Module, channels: int, like: torch.Tensor) -> None:
    """Give a conv or linear module without bias a zero bias (it then uses ``self.bias``)."""
    module.bias = nn.Parameter(
        torch.zeros(channels, dtype=like.dtype, device=like.device),
        requires_grad=like.requires_grad,
    )


def target_of(edit: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registry name and options of a recorded replacement, also in older files' shapes
    (``swap:NAME``, ``norm_act_remainder``, a frozen edit's top-level ``train_affine``)."""
    name = str(edit["with"]).removeprefix("swap:")
    options = dict(edit.get("options", {}))
    if "train_affine" in edit:
        options["train_affine"] = edit["train_affine"]
    return name, options


def replay(model: nn.Module, structure: list[dict[str, Any]]) -> None:
    """Apply recorded structural edits to a freshly built architecture.

    Raises:
        SourceError: an edit names a module the architecture does not have, or one it
            cannot rebuild.
    """
    for edit in structure:
        try:
            if "replace" in edit:
                name = edit["replace"]
                parent, child = _parent(model, name)
                old = parent._modules[child]
                kind, options = target_of(edit)
                new = targets.build(kind, old, options)
                # hooks the architecture's own code registered on the BN fire on its
                # replacement, as they did when the surgery was made
                setattr(parent, child, carry_hooks(old, new))
            elif "add_bias" in edit:
                module = model.get_submodule(edit["add_bias"])
                add_zero_bias(module, int(edit["channels"]), module.weight)
            elif "collapse" in edit:  # a block whose linear regions fold made one conv each
                parent, child = _parent(model, edit["collapse"])
                old = parent._modules[child]
                setattr(parent, child, carry_hooks(old, regions.rebuild(old, edit["regions"])))
        except (AttributeError, KeyError, TypeError, ValueError, BnSurgeryError) as exc:
            raise SourceError(
                f"checkpoint structure does not fit the architecture at {edit}: {exc}"[:400]
            ) from exc
    record = get_record(model)
    record["structure"] = copy.deepcopy(list(structure))
