"""Choosing BN layers by name pattern and type."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

from torch import nn

from .errors import UsageError
from .norms import iter_batchnorms

__all__ = ["select_batchnorms"]


def patterns(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def matches(name: str, pattern: str) -> bool:
    # "layer1" selects the module and everything under it, "layer1.*" only what is under it.
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def select_batchnorms(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: Sequence[type[nn.Module]] | None = None,
) -> list[tuple[str, nn.Module]]:
    """The BN layers whose names match ``include`` (all if none) and not ``exclude``.

    Patterns are shell globs on module names (``"layer1.*"``, ``"stages.0*"``); a pattern also
    selects everything under the module it names. ``types`` keeps only instances of those
    classes.

    Raises:
        UsageError: a pattern, included or excluded, matches no BN layer (a typo in an exclude
            would otherwise act on the very layers it meant to spare); the message suggests
            the nearest names.
    """
    include_list, exclude_list = patterns(include), patterns(exclude)
    every = list(iter_batchnorms(model))
    names = [n for n, _ in every]
    for option, given in (("--include", include_list), ("--exclude", exclude_list)):
        for pattern in given:
            if not any(matches(n, pattern) for n in names):
                near = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
                hint = f"; nearest BN names: {', '.join(near)}" if near else ""
                raise UsageError(f"{option} {pattern!r} matches no BN layer{hint}")
    chosen = [
        (n, m)
        for n, m in every
        if (not include_list or any(matches(n, p) for p in include_list))
        and not any(matches(n, p) for p in exclude_list)
        and (types is None or isinstance(m, tuple(types)))
    ]
    if every and not chosen:
        raise UsageError("the include/exclude patterns and types leave no BN layer selected")
    return chosen
