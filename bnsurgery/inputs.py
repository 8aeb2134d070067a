"""What a model is called with: example inputs read from a file (:func:`read_example_inputs`,
``--inputs``), bound to the model's ``forward`` (:func:`example_arguments`), and tensors cast to
the model's dtype (:func:`cast_to`, for calibration batches too).

Example inputs are the arguments of one call of the model, as the file holds them: integer
tensors (an ``edge_index``, ``lengths``) are legitimate there, and a ``.pt`` file needs
``trust_code`` only if it holds pickled objects beyond tensors and containers. The file is
opened by :mod:`bnsurgery.tensorfiles`, by its kind.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DataError
from .tensorfiles import check_readable, read_tensors
from .trust import Trust

__all__ = [
    "ExampleInputs",
    "cast_to",
    "example_arguments",
    "model_dtype",
    "read_example_inputs",
]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its first floating parameter (float32 if it
    has none)."""
    return next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)


def cast_to(tensor: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """A floating ``tensor`` in ``dtype`` (any other as it is). Values that are finite but do
    not fit ``dtype`` are refused: the model would only see infinities (NaN and infinite values
    already in ``tensor`` are left for the caller to judge).

    Raises:
        DataError: ``"{where}: values up to X overflow the model's DTYPE"``.

    >>> cast_to(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.float32, "x").dtype
    torch.float32
    """
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    out = tensor.to(dtype)
    overflow = torch.isinf(out) & torch.isfinite(tensor)
    if bool(overflow.any()):
        largest = float(tensor[overflow].abs().max())
        kind = str(dtype).removeprefix("torch.")
        raise DataError(f"{where}: values up to {largest:.3g} overflow the model's {kind}")
    return out


@dataclass(frozen=True)
class ExampleInputs:
    """The arguments of one call of a model, read from a file: positional (``args``) or
    keyword (``kwargs``), never both.

    It is path-like (the file it was read from), so a command can list it among the files it
    reads and no output replaces it.
    """

    path: Path
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __fspath__(self) -> str:
        return os.fspath(self.path)


def read_example_inputs(path: str | os.PathLike[str], *, trust_code: bool = False) -> ExampleInputs:
    """Read the example inputs of a model from a tensor file, and check them.

    What the file may hold, recognised by its content (:func:`bnsurgery.trust.kind_of`):

    * safetensors: keyword arguments by key, or positional ones keyed ``0``, ``1``, ...;
    * a torch file (read like a checkpoint: zip checked, then ``weights_only=True``; the full
      unpickler only with ``trust_code``): a tensor, a tuple or list of positional arguments,
      or a dict of keyword arguments (keys ``0``, ``1``, ... are positional); an argument may
      itself be a tuple, list or dict of tensors;
    * a NumPy ``.npy`` array (no pickles): one positional argument.

    Integer and bool tensors are kept as they are (an ``edge_index`` or a mask); floating ones
    are cast to the model's dtype when the call is made (:func:`example_arguments`).

    Raises:
        SourceError: missing or empty file, a folder, not a tensor file, unreadable.
        UnsafeCodeError: pickled objects beyond tensors (or a TorchScript program) and
            ``trust_code`` is false; nothing from the file ran.
        DataError: no tensor, something other than tensors, keys that are neither all names
            nor ``0`` to ``n-1``, or NaN or infinite values (the input and sample are named).
    """
    p = Path(path)
    check_readable(p, directory="is a folder; example inputs come from one tensor file")
    value = read_tensors(p, contents="the example inputs", trust=Trust(code=trust_code))
    inputs = _arguments(p, value)
    for name, item in _named_arguments(inputs):
        _check_argument(p, name, item)
    return inputs


def _arguments(path: Path, value: Any) -> ExampleInputs:
    """Positional or keyword arguments, from what a file held."""
    if isinstance(value, torch.Tensor):
        return ExampleInputs(path, args=(value,))
    if isinstance(value, tuple | list):
        if not value:
            raise DataError(f"{path}: holds an empty {type(value).__name__}, no input")
        return ExampleInputs(path, args=tuple(value))
    if not isinstance(value, Mapping):
        raise DataError(
            f"{path}: holds a {type(value).__name__}; example inputs are a tensor, a tuple or "
            "list of positional inputs, or a dict of keyword inputs"
        )
    if not value:
        raise DataError(f"{path}: holds no tensor")
    keys = list(value)
    odd = next((k for k in keys if not isinstance(k, str)), None)
    if odd is not None:
        raise DataError(f"{path}: holds a dict keyed by {odd!r}; keys are argument names")
    numbered = [k for k in keys if k.isdecimal()]
    if not numbered:
        return ExampleInputs(path, kwargs=dict(value))
    if len(numbered) != len(keys) or sorted(int(k) for k in keys) != list(range(len(keys))):
        shown = ", ".join(sorted(keys, key=lambda k: (not k.isdecimal(), len(k), k))[:6])
        raise DataError(
            f"{path}: holds keys {shown}; keys are either all argument names (keyword "
            "inputs) or 0, 1, ... without gaps (positional inputs)"
        )
    return ExampleInputs(path, args=tuple(value[str(i)] for i in range(len(keys))))


def _named_arguments(inputs: ExampleInputs) -> list[tuple[str, Any]]:
    """Each argument with the name messages give it: ``0``, ``1``, ... or ``'pixel_values'``."""
    if inputs.kwargs:
        return [(repr(k), v) for k, v in inputs.kwargs.items()]
    return [(str(i), v) for i, v in enumerate(inputs.args)]


def _check_argument(path: Path, name: str, value: Any) -> None:
    """Tensors only (in tuples, lists and dicts of names), dense, and finite."""
    if isinstance(value, tuple | list):
        for i, item in enumerate(value):
            _check_argument(path, f"{name}[{i}]", item)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise DataError(f"{path}: input {name} is a dict keyed by {key!r}, not names")
            _check_argument(path, f"{name}[{key!r}]", item)
        return
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{path}: input {name} is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided:
        raise DataError(f"{path}: input {name} is a {value.layout} tensor; save a dense one")
    if not (value.is_floating_point() or value.is_complex()):
        return
    finite = torch.isfinite(value)
    if bool(finite.all()):
        return
    bad = ~finite
    nan = int(torch.isnan(value).sum())
    count, what = (nan, "NaN") if nan else (int(bad.sum()), "infinite")
    where = ""
    if value.dim() > 0:  # a bad value means at least one sample
        sample = int(bad.reshape(len(value), -1).any(1).nonzero()[0, 0])
        where = f" (first at sample {sample})"
    plural = "s" if count > 1 else ""
    raise DataError(f"{path}: input {name} holds {count} {what} value{plural}{where}")


def example_arguments(model: nn.Module, inputs: ExampleInputs) -> tuple[Any, ...]:
    """The positional arguments of ``model`` for ``inputs``, floating tensors cast to the
    model's dtype.

    Surgeries call the model with positional arguments, so keyword inputs are bound to the
    parameters of ``model.forward`` that can be given by position: a parameter the file leaves
    out between two it gives takes its default (``None`` as a rule, which the model sees
    exactly as if it had not been passed).

    Raises:
        DataError: more or fewer inputs than ``forward`` takes, a name that is not one of its
            parameters, or one that can only be given by keyword (``*, mask``, ``**kwargs``);
            floating values that overflow the model's dtype.
    """
    dtype = model_dtype(model)
    path, owner = inputs.path, f"{type(model).__name__}.forward"
    args = tuple(_cast(path, str(i), v, dtype) for i, v in enumerate(inputs.args))
    kwargs = {k: _cast(path, repr(k), v, dtype) for k, v in inputs.kwargs.items()}
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no signature to check against: the call will tell
        if kwargs:
            raise DataError(f"{path}: holds keyword inputs, and {owner} has no signature") from None
        return args
    owner += f"({', '.join(signature.parameters)})"
    unknown = [k for k in kwargs if k not in signature.parameters]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise DataError(f"{path}: input {unknown[0]!r}{more} names no parameter of {owner}")
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise DataError(f"{path}: its inputs do not fit {owner}: {exc}") from exc
    return args or _by_position(path, owner, signature, kwargs)


def _by_position(
    path: Path, owner: str, signature: inspect.Signature, kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """Keyword inputs, known to bind to ``signature``, as positional arguments."""
    params = signature.parameters.values()
    by_position = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in by_position]
    for key in kwargs:
        if key not in names:
            raise DataError(
                f"{path}: input {key!r} can only be passed to {owner} by keyword, and "
                "surgeries call the model with positional inputs"
            )
    last = max(names.index(k) for k in kwargs)
    return tuple(kwargs.get(p.name, p.default) for p in by_position[: last + 1])


def _cast(path: Path, name: str, value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``value`` cast to ``dtype``; values the cast would make infinite
    are refused (the model would only see infinities)."""
    if isinstance(value, tuple | list):
        items = [_cast(path, f"{name}[{i}]", v, dtype) for i, v in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, Mapping):
        return {k: _cast(path, f"{name}[{k!r}]", v, dtype) for k, v in value.items()}
    if not isinstance(value, torch.Tensor):
        return value
    return cast_to(value, dtype, f"{path}: input {name}")
