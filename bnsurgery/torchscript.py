"""TorchScript export: the program of a model, scripted where that works, else traced, and
verified before it is written.

:func:`torchscript_bytes` returns the serialised program (``bnsurgery.checkpoint.save`` writes
it). It holds ``torch.jit.script(model)`` where that works, else the model traced on the example
inputs. A traced program cannot return every Python value, so what it returns is the model's
output made plain: a dict (``{"logits": ...}``), a dataclass and a Hugging Face ``ModelOutput``
become a dict of the same names in the same order (fields that are ``None`` left out, as
``ModelOutput`` leaves them), a namedtuple a tuple in the same order, a list a list; a scripted
model returns what its ``forward`` declares (a namedtuple stays one). Arguments that hold no
tensor (``None`` for an optional input) are fixed in a traced program, which then takes the
others by their names: ``program(pixel_values=x)``. With example inputs the program is verified
before anything is written: loaded back and called on them, its output must match the model's
(eval mode) leaf by leaf within the output dtype's tolerance (:func:`bnsurgery.verify.
default_tolerance`).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TraceError, UsageError, VerificationError, brief

__all__ = ["torchscript_bytes"]


def torchscript_bytes(model: nn.Module, example_inputs: Any, out: Path) -> memoryview:
    """The serialised TorchScript program of ``model``, verified on ``example_inputs`` when
    there are some (``out``, the file it is for, names it in messages).

    Raises:
        UsageError: the model cannot be scripted and there are no example inputs to trace it.
        TraceError: the model cannot be traced, or the program cannot run on the inputs.
        VerificationError: the program's output differs from the model's on the example inputs.
    """
    program, keywords = _to_torchscript(model, example_inputs)
    if example_inputs is not None:
        loaded = torch.jit.load(io.BytesIO(program))  # ours: no file's code runs here
        _verify_program(model, loaded, example_inputs, keywords, out)
    return program


def _serialised(program: torch.jit.ScriptModule) -> memoryview:
    buffer = io.BytesIO()
    torch.jit.save(program, buffer)
    return buffer.getbuffer()


def _to_torchscript(
    model: nn.Module, example_inputs: Any
) -> tuple[memoryview, dict[str, Any] | None]:
    """The serialised program, and the keyword arguments it was traced with (``None``: it
    takes the example inputs by position).

    Scripting counts as working once the program serialises: ``torch.jit.script`` accepts
    some models whose program ``torch.jit.save`` then rejects (an unannotated ``mask=None``
    parameter is typed as a tensor with an undefined default); those are traced.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return _serialised(model), None
    try:
        return _serialised(torch.jit.script(model)), None
    except Exception as exc:
        if example_inputs is None:
            raise UsageError(
                f"torch.jit.script failed ({brief(exc)}); give example inputs to trace it "
                "instead (--input-size or --inputs)"
            ) from exc
    from .tree import as_args, eval_mode

    args = as_args(example_inputs)
    keywords = None if all(map(_traceable, args)) else _tensor_keywords(model, args)
    # the output made plain as the model returns it, so the trace records that structure
    handle = model.register_forward_hook(lambda module, inputs, output: _plain_output(output))
    try:
        with eval_mode(model), torch.no_grad():
            if keywords is None:
                traced = torch.jit.trace(model, args, strict=False, check_trace=False)
            else:
                traced = torch.jit.trace(
                    model, example_kwarg_inputs=keywords, strict=False, check_trace=False
                )
            return _serialised(traced), keywords
    except Exception as exc:
        raise TraceError(
            f"{type(model).__name__} can be neither scripted nor traced for TorchScript "
            f"({brief(exc)})"
        ) from exc
    finally:
        handle.remove()


def _plain_output(value: Any) -> Any:
    """``value`` as a traced TorchScript program returns it: mappings, dataclasses and Hugging
    Face ``ModelOutput`` become dicts of the same names in the same order (``None`` fields
    left out), namedtuples tuples; tensors and everything else stay as they are.

    >>> from collections import namedtuple
    >>> _plain_output(namedtuple("Out", "logits aux")(1, {"x": 2, "y": None}))
    (1, {'x': 2})
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {k: _plain_output(v) for k, v in value.items() if v is not None}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return {k: _plain_output(v) for k, v in fields if v is not None}
    if isinstance(value, tuple):
        return tuple(_plain_output(v) for v in value)
    if isinstance(value, list):
        return [_plain_output(v) for v in value]
    return value


def _traceable(value: Any) -> bool:
    """Whether ``torch.jit.trace`` can take ``value`` as an input: tensors, and tuples, lists
    and dicts of them."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, tuple | list):
        return all(map(_traceable, value))
    if isinstance(value, Mapping):
        return all(map(_traceable, value.values()))
    return False


def _tensor_keywords(model: nn.Module, args: tuple[Any, ...]) -> dict[str, Any]:
    """The arguments that hold tensors, by the names ``forward`` gives them (the others,
    ``None`` for an optional input, are fixed in the traced program).

    Raises:
        TraceError: ``forward`` does not name as many positional parameters.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    if len(names) < len(args):
        raise TraceError(
            f"{type(model).__name__}: example inputs that hold no tensor (None) are traced by "
            "name, and forward does not name each of its positional parameters"
        )
    return {
        name: arg for name, arg in zip(names[: len(args)], args, strict=True) if _traceable(arg)
    }


def _verify_program(
    model: nn.Module,
    program: torch.jit.ScriptModule,
    example_inputs: Any,
    keywords: dict[str, Any] | None,
    out: Path,
) -> None:
    """Call the loaded ``program`` as its user will, and compare its output with the model's,
    both in eval mode, leaf by leaf; each call gets its own copy of the inputs, so a model
    that changes its input in place cannot tell them apart.

    Raises:
        TraceError: the model or the program fails on the example inputs.
        VerificationError: the outputs differ in structure or beyond the dtype's tolerance.
    """
    from torch.utils._pytree import tree_map, tree_structure

    from .tree import as_args, eval_mode
    from .verify import default_tolerance, max_relative_error

    def copied(value: Any) -> Any:
        return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)

    args = as_args(example_inputs)
    program.eval()  # the loaded copy only; the file keeps the model's flags
    with eval_mode(model), torch.no_grad():
        try:
            expected = _plain_output(model(*copied(args)))
            call = program(**copied(keywords)) if keywords is not None else program(*copied(args))
            got = _plain_output(call)
        except Exception as exc:
            raise TraceError(
                f"{out}: the TorchScript program cannot run on the example inputs ({brief(exc)})"
            ) from exc
    if tree_structure(got) != tree_structure(expected):
        raise VerificationError(
            f"{out}: the TorchScript program returns {_shape_of(got)} where the model returns "
            f"{_shape_of(expected)}; nothing written"
        )
    error, tolerance = max_relative_error(expected, got), default_tolerance(expected)
    if not error <= tolerance:
        raise VerificationError(
            f"{out}: the TorchScript program's output differs from the model's on the example "
            f"inputs (max relative error {error:.3g} > {tolerance:g}; a trace fixes one path "
            "through data-dependent control flow); nothing written"
        )


def _shape_of(value: Any) -> str:
    """A short description of an output's structure, for a message."""
    if isinstance(value, dict):
        return "a dict of " + (", ".join(map(str, value))[:120] or "nothing")
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
