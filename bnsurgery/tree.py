"""The module tree: wrappers, modes, and where a module sits.

Small helpers every surgery shares: the module a ``torch.compile``/DataParallel wrapper runs
(:func:`unwrapped`, :func:`on_unwrapped`), eval mode with every flag restored
(:func:`eval_mode`), the places a module is registered (:func:`parents`), the model's device,
and example inputs as positional arguments (:func:`as_args`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["as_args", "device_of", "eval_mode", "on_unwrapped", "parents", "unwrapped"]


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise ``example_inputs`` to positional arguments: a tensor (or a dict) is one
    argument, a tuple or list is several."""
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs)
    return (example_inputs,)


def on_unwrapped(surgery: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``surgery(model, ...)`` work on the module a wrapper runs (:func:`unwrapped`): layer
    names without ``_orig_mod.`` or ``module.``, eager passes (a compiled graph skips the hooks
    a pass adds), and the record :func:`bnsurgery.save` writes. A surgery that returns the
    module it worked on returns what it was given, the wrapper."""

    @functools.wraps(surgery)
    def run(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        inner = unwrapped(model)
        result = surgery(inner, *args, **kwargs)
        return model if result is inner else result

    return run


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a wrapper runs: ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``),
    ``DataParallel`` and ``DistributedDataParallel`` (``module``), however nested.

    Passes that rely on hooks run it eagerly (a compiled graph skips hooks added after it was
    compiled), and :func:`bnsurgery.save` writes it, so the file has the keys :func:`bnsurgery.
    load` builds.

    >>> net = nn.Linear(2, 2)
    >>> unwrapped(nn.DataParallel(net)) is net
    True
    """
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode, and restore every module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


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


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
