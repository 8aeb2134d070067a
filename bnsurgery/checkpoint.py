"""Loading models from anywhere safely, and saving them atomically.

Sources (:func:`load`):

* an architecture spec (``timm:resnet18``; see :mod:`bnsurgery.specs`), optionally with a
  state dict from ``weights``;
* a bnsurgery safetensors file: weights plus metadata naming the architecture and the surgery
  applied, rebuilt without unpickling anything;
* a plain state dict (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) with ``arch``; the usual
  wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` and ``_orig_mod.``
  prefixes) are unwrapped;
* a TorchScript archive or a fully pickled ``nn.Module``, only with ``trust_code=True``: both
  run code from the file. Every torch file is first opened with ``weights_only=True``.

What a file may cause (run code, name an architecture, replay surgery) is decided by
:mod:`bnsurgery.trust`, from the file's kind and the caller's arguments; files are opened by
:mod:`bnsurgery.tensorfiles`, state dicts found and fitted by :mod:`bnsurgery.statedicts`, and a
bnsurgery file rebuilt by :mod:`bnsurgery.safemodel` (its architecture built on the meta device
and compared with the file's header before any memory is allocated for it).

Outputs (:func:`save`): ``safetensors`` (the safe format), ``pickle`` (``torch.save`` of the
module) or ``torchscript`` (:mod:`bnsurgery.torchscript`); the format follows the suffix unless
given. Writes go to a temporary file in the same folder and are renamed into place, so a failed
or interrupted write leaves nothing behind; an existing file is only replaced with
``force=True`` (see :mod:`bnsurgery.outputs`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import provenance
from .errors import SourceError, UsageError, brief
from .outputs import atomic_write, exists, is_dir
from .safemodel import load_safe_model, safe_metadata
from .specs import build, is_spec, parse_spec
from .statedicts import WRAPPER_KEYS, load_state_dict_into, read_state_dict, unwrap_state_dict
from .tensorfiles import check_readable, read_torch_file
from .torchscript import torchscript_bytes
from .trust import Kind, Trust, kind_of, require_code_trust

__all__ = [
    "ARTIFACT_FORMATS",
    "FORMATS",
    "default_output",
    "load",
    "output_format",
    "save",
    # re-exported from bnsurgery.outputs, where they live
    "atomic_write",
    "exists",
    "is_dir",
]

#: deployment artifacts: every BN lowered, checked once written (:mod:`bnsurgery.exporting`)
ARTIFACT_FORMATS = ("pt2", "onnx")
FORMATS = ("safetensors", "pickle", "torchscript", *ARTIFACT_FORMATS)
_SUFFIX_FORMAT = {
    ".pt2": "pt2",
    ".onnx": "onnx",
    ".safetensors": "safetensors",
    ".pt": "pickle",
    ".pth": "pickle",
    ".pkl": "pickle",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".jit": "torchscript",
}


# ------------------------------------------------------------------------------- loading


def load(
    source: str | os.PathLike[str],
    *,
    arch: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    trust_code: bool = False,
    trust_pickle: bool | None = None,
    search_cwd: bool = False,
) -> nn.Module:
    """Load a model from a spec or a file (see the module docstring), on the CPU.

    What a file may cause is decided by :mod:`bnsurgery.trust` from its kind and these
    arguments, never from the file's own contents.

    Args:
        source: a spec such as ``"timm:resnet18"`` or a path.
        arch: the architecture spec for a plain state-dict file; for a bnsurgery file it
            replaces the recorded one (naming the recorded ``package.module:factory`` allows
            the file to have that factory built).
        weights: a state-dict file to load into a spec's model.
        trust_code: allow files to run code: full pickles, TorchScript archives, and
            ``package.module:factory`` architectures recorded in a file.
        trust_pickle: the old name of ``trust_code``.
        search_cwd: import the ``package.module:factory`` that ``source`` or ``arch`` names from
            the current folder first, as ``python -m`` does (the command line sets it); never a
            factory that only a file names.

    Returns:
        The model. It remembers its architecture, so :func:`save` can write the safe format.
        A model bnsurgery builds (from a spec, a state dict or a bnsurgery file) is in eval
        mode, as a checkpoint is for inference until you call ``model.train()``; a pickled
        module keeps the mode it was saved in.

    Raises:
        SourceError: missing or unreadable file, unknown architecture, weights that do not fit.
        UnsafeCodeError: the file would run code and ``trust_code`` is false (nothing ran).
        UsageError: a bad spec, or a state dict without ``arch``.

    >>> model = load("torchvision:resnet18")
    >>> type(model).__name__
    'ResNet'
    """
    if trust_pickle is not None:
        trust_code = trust_code or trust_pickle
    trust = Trust(code=trust_code, arch=parse_spec(arch) if arch is not None else None)
    text = os.fspath(source)
    path = Path(text)
    if not exists(path) and is_spec(text):
        spec = parse_spec(text)
        model = build(spec, search_cwd=search_cwd)
        provenance.set_arch(model, str(spec))
        if weights is not None:
            state = read_state_dict(weights, trust_code=trust_code)
            load_state_dict_into(model, state, str(spec))
        return model.eval()
    if weights is not None:
        raise UsageError("--weights goes with an architecture spec source, not with a file")
    check_readable(
        path,
        missing="no such file (nor a timm:/torchvision:/module: spec)",
        directory="is a directory, not a checkpoint file",
    )
    kind = kind_of(path)
    if kind is Kind.SAFETENSORS:
        return load_safe_model(path, trust, search_cwd)
    if kind is Kind.TORCHSCRIPT:
        require_code_trust(trust, path, "is a TorchScript archive, and loading one runs its code")
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise SourceError(f"{path}: not a loadable TorchScript archive ({brief(exc)})") from exc
    obj = read_torch_file(path, trust, kind)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    if trust.arch is None:
        raise UsageError(
            f"{path} holds a state dict (weights only); pass --arch (for example "
            "--arch timm:resnet18) to say which architecture it belongs to"
        )
    model = build(trust.arch, search_cwd=search_cwd)
    provenance.set_arch(model, str(trust.arch))
    load_state_dict_into(model, unwrap_state_dict(obj, path), str(trust.arch))
    return model.eval()


# -------------------------------------------------------------------------------- saving


def output_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The format to write: ``fmt`` if given, else the one the suffix names.

    Raises:
        UsageError: unknown format, or a suffix that names none.
    """
    if fmt is not None:
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
        return fmt
    named = suffix_format(path)
    if named is None:
        raise UsageError(
            f"cannot tell the format from {Path(path).name!r}; use a .safetensors, .pt, .ts, "
            ".pt2 or .onnx suffix or pass --format"
        )
    return named


def suffix_format(path: str | os.PathLike[str]) -> str | None:
    """The format the suffix of ``path`` names, or None."""
    return _SUFFIX_FORMAT.get(Path(path).suffix.lower())


def default_output(source: str, operation: str) -> Path:
    """``<input stem>.<operation>.safetensors`` beside the input, or in the current folder
    for a spec."""
    path = Path(source)
    if exists(path) or not is_spec(source):
        stem = path.name.split(".")[0] if path.name else "model"
        return path.with_name(f"{stem}.{operation}.safetensors")
    name = parse_spec(source).name.replace("/", "_")
    return Path(f"{name}.{operation}.safetensors")


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    force: bool = False,
    arch: str | None = None,
    example_inputs: Any = None,
    expected: list[Any] | None = None,
) -> Path:
    """Write a model atomically.

    A TorchScript file holds ``torch.jit.script(model)`` where that works, else the model
    traced on ``example_inputs``, returning its output made plain (dicts, tuples, lists);
    with ``example_inputs`` the program is verified before anything is written (see
    :mod:`bnsurgery.torchscript`). A ``.pt2`` (``torch.export``) or ``.onnx`` file holds the
    model with every BN lowered to its inference-only map, checked once written, loaded back,
    against the model on ``example_inputs`` (needed) before it is published
    (:func:`bnsurgery.exporting.write_artifact`; to fold first, :func:`bnsurgery.export`).

    Args:
        model: the model to save.
        path: the output file.
        format: ``safetensors``, ``pickle``, ``torchscript``, ``pt2`` or ``onnx``; default
            from the suffix.
        force: replace an existing file.
        arch: architecture spec, for models not loaded through bnsurgery (safe format).
        example_inputs: a tensor or a tuple of positional inputs (TorchScript): to trace
            models that ``torch.jit.script`` rejects, and to verify the program; pt2 and
            ONNX: to export and check the artifact on (needed).
        expected: pt2 and ONNX: the outputs the artifact must reproduce
            (:func:`bnsurgery.exporting.expected_outputs` of the model before a surgery);
            default: the model's own.

    Returns:
        The path written.

    Raises:
        UsageError: unknown format, the safe format without a known architecture, or
            TorchScript of a model that cannot be scripted, without example inputs.
        TraceError: the model cannot be traced, or the program cannot run on the inputs.
        VerificationError: the TorchScript program's output differs from the model's on the
            example inputs (tracing fixes one path through data-dependent control flow), or
            the pt2/ONNX artifact's does, or it holds a batch norm; nothing was written.
        UnsupportedModelError: pt2/ONNX: the model cannot be exported, or holds a BN
            without running statistics; nothing was written.
        OutputError: the file exists (or appears while writing), is not a regular file, its
            folder is missing or read-only, or the write failed.

    >>> import tempfile
    >>> class Net(nn.Module):
    ...     def forward(self, x):
    ...         return {"logits": x.sum(1), "features": x}
    >>> path = save(Net(), Path(tempfile.mkdtemp()) / "net.ts", example_inputs=torch.ones(2, 3))
    >>> sorted(torch.jit.load(path)(torch.ones(2, 3)))
    ['features', 'logits']
    """
    from .tree import unwrapped

    model = unwrapped(model)  # torch.compile, DataParallel: the keys load() builds
    out = Path(path)
    fmt = output_format(out, format)
    if fmt in ARTIFACT_FORMATS:
        from .exporting import write_artifact

        write_artifact(model, example_inputs, out, fmt, expected=expected, force=force)
        return out
    if fmt == "safetensors":
        metadata = safe_metadata(model, arch)

        def write(tmp: str) -> None:
            from safetensors.torch import save_model

            save_model(model, tmp, metadata=metadata)

    elif fmt == "pickle":

        def write(tmp: str) -> None:
            torch.save(model, tmp)

    else:
        program = torchscript_bytes(model, example_inputs, out)

        def write(tmp: str) -> None:
            # Serialised in memory, written with Python's file I/O: torch.jit.save writing to
            # a path aborts the whole process when the disk fills up.
            with open(tmp, "wb") as f:
                f.write(program)

    return atomic_write(out, write, force=force)
