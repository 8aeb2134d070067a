"""Hooks around BN layers: what the user registered, carried onto replacements, suspended
during bnsurgery's own passes.

A surgery that replaces a BN keeps the hooks on it (:func:`carry_hooks`, as ``torch.ao`` fusion
does); bnsurgery's own forward passes (graph walk, checks, probes) run without the user's hooks
(:func:`user_hooks_suspended`), so a hook that counts calls or collects features sees only the
passes the user made. Hooks of installed libraries (PyTorch's weight norm, transformers'
``hidden_states``) are part of the model's function and always stay.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import sysconfig
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = [
    "call_input",
    "carry_hooks",
    "has_hooks",
    "user_hooks",
    "user_hooks_suspended",
]


def call_input(args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
    """The input a norm module was called with: positionally, ``bn(x)``, or by keyword,
    ``bn(input=x)`` as ``nn.BatchNorm2d.forward(input)`` allows (for hooks registered
    ``with_kwargs=True``); ``None`` when there is none.

    >>> call_input((), {"input": 1}), call_input((2,), {})
    (1, 2)
    """
    if args:
        return args[0]
    return (kwargs or {}).get("input")


#: The hook tables a module that replaces a BN takes over (forward and backward; not the
#: state-dict hooks, whose meaning belongs to the BN class).
_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def carry_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """Make ``new`` fire the hooks registered on ``old``, as ``torch.ao`` fusion keeps them.

    The hook tables are shared, not copied: a handle the user holds removes the hook from both,
    and the original module (``unfreeze``, a swap back) still has them. Returns ``new``.
    """
    for table in _HOOK_TABLES:
        if hasattr(old, table):
            setattr(new, table, getattr(old, table))
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook
    return new


def has_hooks(module: nn.Module) -> bool:
    """True when forward or backward hooks are registered on ``module`` itself."""
    return any(
        bool(getattr(module, table, None))
        for table in _HOOK_TABLES
        if table not in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs")
    )


def _is_library_hook(hook: Any) -> bool:
    """True for hooks an installed library registers as part of its models' function:
    PyTorch's (``weight_norm``'s weight, pruning masks, quantisation observers), Hugging Face's
    (transformers computes ``hidden_states`` with hooks, and DPT's neck reads them), timm's, and
    any other package installed in this Python's library folders. A hook defined in code of
    your own (a script, a project folder, an editable install) is yours."""
    fn = getattr(hook, "__func__", None) or getattr(hook, "func", None) or hook
    name = getattr(fn, "__module__", None) or type(fn).__module__
    if name == "torch" or name.startswith("torch."):
        return True
    return _installed(name.partition(".")[0])


@functools.lru_cache(maxsize=256)
def _installed(package: str) -> bool:
    module = sys.modules.get(package)
    path = getattr(module, "__file__", None)
    if path is None:
        return module is not None and package in sys.builtin_module_names
    path = os.path.realpath(path)
    paths = sysconfig.get_paths()
    roots = {os.path.realpath(paths[k]) for k in ("purelib", "platlib", "stdlib")}
    return any(path.startswith(root + os.sep) for root in roots)


#: The forward-pass hook tables a user hook can sit in, and the global ones.
_FORWARD_TABLES = ("_forward_pre_hooks", "_forward_hooks")
_GLOBAL_TABLES = ("_global_forward_pre_hooks", "_global_forward_hooks")


def user_hooks(module: nn.Module | None, table: str) -> list[Any]:
    """The hooks of ``module``'s ``table`` (``"_forward_pre_hooks"`` or ``"_forward_hooks"``)
    that its user registered: every one but an installed library's (:func:`_is_library_hook`). With
    ``module=None``, the global ones, which fire on every module."""
    if module is None:
        from torch.nn.modules import module as torch_module

        hooks = getattr(torch_module, f"_global{table}", {})
    else:
        hooks = getattr(module, table, {})
    return [h for h in hooks.values() if not _is_library_hook(h)]


@contextlib.contextmanager
def user_hooks_suspended(model: nn.Module) -> Iterator[None]:
    """Run bnsurgery's own forward passes (the graph walk, the fold's checks) without firing
    the user's forward hooks and pre-hooks, module and global: a hook that counts calls or
    collects features must not see passes the user never made. Hooks of installed libraries
    stay (:func:`_is_library_hook`): a ``weight_norm`` conv computes its weight in one, a
    Hugging Face model its ``hidden_states``.

    The hooks are taken out of their tables in place and put back in their order, so tables
    that :func:`carry_hooks` shares between a BN and its replacement stay shared; hooks bnsurgery
    registers inside the block are its own to remove.
    """
    from torch.nn.modules import module as torch_module

    tables = [getattr(torch_module, name) for name in _GLOBAL_TABLES]
    tables += [getattr(m, name) for m in model.modules() for name in _FORWARD_TABLES]
    saved = []
    for table in {id(t): t for t in tables}.values():
        if any(not _is_library_hook(h) for h in table.values()):
            saved.append((table, list(table.items())))
            for key in [k for k, h in table.items() if not _is_library_hook(h)]:
                del table[key]
    try:
        yield
    finally:
        for table, items in saved:
            added = [(k, h) for k, h in table.items() if k not in dict(items)]
            table.clear()
            table.update(items)
            table.update(added)
