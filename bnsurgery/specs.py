"""Architecture specs: ``timm:NAME``, ``torchvision:NAME`` and ``package.module:factory``.

A spec builds a randomly initialised model (pretrained weights are never downloaded), so
anyone can try the tool offline and a checkpoint can name the architecture it fits. Keyword
arguments go in parentheses as Python literals: ``timm:resnet18(num_classes=10)``.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import SourceError, UsageError

__all__ = [
    "Spec",
    "build",
    "default_input_size",
    "importable_from_cwd",
    "is_spec",
    "parse_spec",
]

_SPEC = re.compile(r"^(?P<ns>[A-Za-z_][\w.]*):(?P<name>[A-Za-z_][\w.\-]*)(?P<call>\(.*\))?$", re.S)
_MAX_SPEC = 4096  # characters: a spec is a name and a few options


@dataclass(frozen=True)
class Spec:
    """A parsed architecture spec."""

    namespace: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.kwargs:
            return f"{self.namespace}:{self.name}"
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.namespace}:{self.name}({args})"


def is_spec(text: str) -> bool:
    """True when ``text`` has the shape of a spec (``ns:name`` with optional kwargs); never for
    anything but a string."""
    return isinstance(text, str) and bool(_SPEC.match(text.strip()))


def parse_spec(text: str) -> Spec:
    """Parse ``ns:name`` or ``ns:name(key=literal, ...)``: one call, keyword arguments only,
    each a Python literal (numbers, strings, booleans, None, and tuples, lists, dicts of them).

    Raises:
        UsageError: not a string, longer than ``_MAX_SPEC`` characters, not a spec, or call
            syntax other than one call with keyword literals (the offending part is named).

    >>> parse_spec("timm:resnet18(num_classes=10)")
    Spec(namespace='timm', name='resnet18', kwargs={'num_classes': 10})
    """
    if not isinstance(text, str):
        raise UsageError(
            "expected an architecture spec string such as 'timm:resnet18', found a "
            f"{type(text).__name__}"
        )
    text = text.strip()
    if len(text) > _MAX_SPEC:
        raise UsageError(
            f"architecture spec {_shown(text)} is {len(text)} characters long; a spec is a name "
            f"and a few options, at most {_MAX_SPEC} characters"
        )
    match = _SPEC.match(text)
    if not match:
        raise UsageError(
            f"{_shown(text)} is not an architecture spec; use timm:NAME, torchvision:NAME or "
            "package.module:factory, with optional (key=value, ...) arguments"
        )
    kwargs = _keyword_literals(match["call"], text) if match["call"] else {}
    return Spec(match["ns"], match["name"], kwargs)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _keyword_literals(call_text: str, text: str) -> dict[str, Any]:
    """The keyword literals of ``(k=v, ...)``; anything else is a usage error naming it."""

    def bad(what: str) -> UsageError:
        return UsageError(
            f"spec {_shown(text)}: {what}; arguments must be key=literal pairs, e.g. "
            "timm:resnet18(num_classes=10)"
        )

    source = f"f{call_text}"
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError) as exc:
        raise bad(f"{_shown(call_text)} is not valid call syntax") from exc
    except (RecursionError, MemoryError) as exc:  # the parser's own limits, not a crash
        raise bad(f"{_shown(call_text)} nests too deeply to read") from exc
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise bad(f"{_shown(call_text)} is not one call")

    def typed(node: ast.AST) -> str:  # as the user typed it: ast.unparse recurses
        return _shown(ast.get_source_segment(source, node) or type(node).__name__)

    if tree.args:
        raise bad(f"positional argument {typed(tree.args[0])}")
    kwargs: dict[str, Any] = {}
    for keyword in tree.keywords:
        if keyword.arg is None:
            raise bad(f"{typed(keyword)} is not a keyword argument")
        if keyword.arg in kwargs:
            raise bad(f"{keyword.arg} is given twice")
        try:
            value = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
            raise bad(f"{keyword.arg}={typed(keyword.value)} is not a literal") from exc
        try:
            repr(value)  # a spec is written back as text (str(spec), the file's record)
        except (ValueError, RecursionError, MemoryError) as exc:
            shown = typed(keyword.value)
            raise bad(f"{keyword.arg}={shown} is too large to write back as text") from exc
        kwargs[keyword.arg] = value
    return kwargs


def _near(name: str, names: list[str]) -> str:
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(near)}?" if near else ""


def build(spec: Spec | str, *, search_cwd: bool = False) -> nn.Module:
    """Build the randomly initialised model a spec names (seeded: the same weights every time).

    Args:
        spec: the spec.
        search_cwd: import a ``package.module:factory`` from the current folder first, as
            ``python -m`` does; for specs the user typed, never for one a file names.

    Raises:
        SourceError: unknown model, a factory that fails or does not return an ``nn.Module``.
    """
    if isinstance(spec, str):
        spec = parse_spec(spec)
    with torch.random.fork_rng(devices=[]), importable_from_cwd(search_cwd):
        torch.manual_seed(0)  # the same random init in every process and every run
        return _build(spec)


@contextlib.contextmanager
def importable_from_cwd(enabled: bool = True) -> Iterator[None]:
    """While inside, modules in the current folder can be imported (it leads ``sys.path``, as
    under ``python -m``); ``sys.path`` is as it was afterwards."""
    if not enabled:
        yield
        return
    folder = os.getcwd()
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _build(spec: Spec) -> nn.Module:
    try:
        if spec.namespace == "timm":
            import timm

            if not timm.is_model(spec.name.split(".")[0]):
                raise SourceError(
                    f"timm has no model {spec.name!r}{_near(spec.name, timm.list_models())}"
                )
            model = timm.create_model(spec.name, pretrained=False, **spec.kwargs)
        elif spec.namespace == "torchvision":
            import torchvision

            names = torchvision.models.list_models()
            if spec.name not in names:
                raise SourceError(
                    f"torchvision has no model {spec.name!r}{_near(spec.name, names)}"
                )
            kwargs = dict(spec.kwargs)
            builder = torchvision.models.get_model_builder(spec.name)
            if "weights_backbone" in inspect.signature(builder).parameters:
                kwargs.setdefault("weights_backbone", None)  # never download a backbone
            model = builder(weights=None, **kwargs)
        else:
            try:
                module = importlib.import_module(spec.namespace)
            except ImportError as exc:
                raise SourceError(f"cannot import {spec.namespace!r}: {exc}") from exc
            factory = getattr(module, spec.name, None)
            if not callable(factory):
                raise SourceError(f"{spec.namespace!r} has no callable {spec.name!r}")
            model = factory(**spec.kwargs)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"building {spec} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise SourceError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def default_input_size(
    spec: Spec | str | None, model: nn.Module | None = None
) -> tuple[int, ...] | None:
    """The per-sample input size a model expects, where it is known.

    timm models carry it in ``pretrained_cfg``; torchvision image classifiers in their weights'
    transforms. Anything else returns ``None`` (pass ``--input-size``).
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if spec is not None and spec.namespace == "torchvision":
        try:
            import torchvision

            weights = torchvision.models.get_model_weights(spec.name).DEFAULT
            transform = weights.transforms()
        except Exception:
            return None
        if type(transform).__name__ == "ImageClassification":
            crop = list(transform.crop_size)
            return (3, crop[0], crop[-1])
    return None
