"""Opening a file of tensors: the one place that reads a checkpoint, calibration data or example
inputs from disk, by the file's kind.

The kind comes from the file's bytes (:func:`bnsurgery.trust.kind_of`), never its name, and
what reading it may cause is decided by that kind and the user's flags (:mod:`bnsurgery.trust`),
never by what the file says:

* safetensors: tensors only (:func:`read_safetensors`; :func:`safetensors_header` reads the
  metadata and shapes without the data);
* a PyTorch zip or a bare pickle (:func:`read_torch_file`): a zip is checked first
  (:func:`bnsurgery.trust.check_zip`), then read with ``torch.load(weights_only=True)``; the
  full unpickler runs only with ``trust.code``;
* a NumPy ``.npy`` array (:func:`read_npy`): never with pickles (``allow_pickle=False``, whatever
  the flags), mapped before it is copied so a header claiming more than the file holds fails;
* a TorchScript archive is a program, never tensors: :func:`read_tensors` refuses it.

:func:`check_readable` refuses, before any of that, a path that is not a non-empty readable
regular file (a FIFO or a device would block a reader or never end). Every message names the
file: a file that cannot be read is a :class:`~bnsurgery.errors.SourceError`, one that would
run code an :class:`~bnsurgery.errors.UnsafeCodeError` (nothing from it ran), readable content
that is not tensors a :class:`~bnsurgery.errors.DataError`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import BnSurgeryError, DataError, SourceError, UnsafeCodeError, brief
from .outputs import exists, is_dir
from .trust import FLAG, Kind, Trust, check_zip, kind_of, require_code_trust

__all__ = [
    "check_readable",
    "read_npy",
    "read_safetensors",
    "read_tensors",
    "read_torch_file",
    "safetensors_header",
]


def check_readable(
    path: Path, *, missing: str = "no such file", directory: str = "is a folder, not a file"
) -> None:
    """Refuse anything but a non-empty, readable regular file.

    Args:
        path: the file.
        missing: what the message says of a missing path (after ``"{path}: "``).
        directory: what it says of a folder.

    Raises:
        SourceError: missing, a folder, not a regular file (a FIFO, a device), empty, or not
            readable.
    """
    if not exists(path):
        raise SourceError(f"{path}: {missing}")
    if is_dir(path):
        raise SourceError(f"{path}: {directory}")
    if not path.is_file():
        raise SourceError(f"{path}: is not a regular file")
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: is empty")
    if not os.access(path, os.R_OK):
        raise SourceError(f"{path}: is not readable")


def _refused(path: Path, holds: str, contents: str, *, flag: bool) -> UnsafeCodeError:
    """The error for tensors that would run code: ``holds`` says what, ``contents`` what the
    file should have held; ``flag``: whether :data:`~bnsurgery.trust.FLAG` would allow it."""
    allow = f", or pass {FLAG} only if you trust its origin" if flag else ""
    return UnsafeCodeError(
        f"{path}: holds {holds}; loading it would run code from the file, and it was not run: "
        f"save {contents} as tensors (.safetensors, .npy, or a .pt of tensors){allow}"
    )


def read_torch_file(
    path: Path, trust: Trust | None, kind: Kind | None = None, *, contents: str | None = None
) -> Any:
    """A torch file's contents: ``weights_only=True`` first (after :func:`~bnsurgery.trust.
    check_zip`), the full unpickler only when ``trust.code``.

    Args:
        path: the file.
        trust: what the user allowed; ``None`` where files of this role never run code (no
            flag is offered in the message).
        kind: the file's kind, if known already.
        contents: what the file should hold (``"the example inputs"``), for the message that
            refuses pickled objects; ``None`` for a checkpoint (see
            :func:`~bnsurgery.trust.require_code_trust`).

    Raises:
        SourceError: not a torch file, or unreadable.
        UnsafeCodeError: it holds pickled objects beyond tensors and containers, untrusted.
    """
    kind = kind or kind_of(path)
    if kind not in (Kind.TORCH_ZIP, Kind.PICKLE):
        raise SourceError(f"{path}: not a PyTorch checkpoint (nor safetensors, nor TorchScript)")
    if kind is Kind.TORCH_ZIP:
        check_zip(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        holds = "pickled Python objects" + (f" (it references {found.group(1)})" if found else "")
        if contents is None:
            require_code_trust(
                trust or Trust(), path, f"holds {holds}, and unpickling them runs code"
            )
        elif trust is None or not trust.code:
            raise _refused(path, holds, contents, flag=trust is not None) from exc
    except MemoryError as exc:
        raise SourceError(f"{path}: not a PyTorch checkpoint (it asks for {brief(exc)})") from exc
    except Exception as exc:
        raise SourceError(f"{path}: not a PyTorch checkpoint ({brief(exc)})") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SourceError(f"{path}: unpickling failed ({brief(exc)})") from exc


def read_safetensors(path: Path, *, prefer: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, by name, on the CPU.

    Args:
        path: the file.
        prefer: read one tensor only: the first of these names the file holds, else its first
            (the others are not read). ``None``: every tensor.

    Raises:
        SourceError: not a valid safetensors file (truncated, corrupt header...).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if prefer is not None and keys:
                keys = [next((k for k in prefer if k in keys), keys[0])]
            return {k: f.get_tensor(k) for k in keys}
    except Exception as exc:
        raise SourceError(f"{path}: not a valid safetensors file ({brief(exc)})") from exc


def safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The metadata and the tensor shapes of a safetensors file, read without its data.

    Raises:
        SourceError: not a valid safetensors file.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise SourceError(f"{path}: not a valid safetensors file ({brief(exc)})") from exc
    return meta, shapes


def read_npy(path: Path, contents: str = "the data") -> torch.Tensor:
    """The array of a ``.npy`` file as a tensor (a copy, in native byte order). Object arrays
    are refused whatever the flags: they are pickles.

    Raises:
        SourceError: truncated or corrupt (a header claiming more data than the file holds
            included: the file is mapped before anything is allocated).
        UnsafeCodeError: an array of Python objects (``contents`` names what it should hold).
        DataError: values that are not numbers (strings...).
    """
    import numpy as np

    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "Python objects" in str(exc):  # object arrays
            raise _refused(path, "pickled Python objects", contents, flag=False) from exc
        raise SourceError(
            f"{path}: not a readable .npy file, truncated or corrupt ({brief(exc, typed=True)})"
        ) from exc
    if not isinstance(mapped, np.ndarray):
        raise DataError(f"{path}: holds a {type(mapped).__name__}, not one array")
    array = np.array(mapped, dtype=mapped.dtype.newbyteorder("="), order="C")  # a copy
    del mapped
    try:
        return torch.from_numpy(array)
    except TypeError as exc:
        raise DataError(f"{path}: holds {array.dtype} values, not numbers") from exc


def read_tensors(
    path: Path,
    *,
    contents: str,
    trust: Trust | None = None,
    prefer: Sequence[str] | None = None,
) -> Any:
    """What a tensor file holds, read by its kind: a tensor (``.npy``), a dict of tensors by
    name (safetensors), or what a torch file holds (tensors in tuples, lists and dicts; other
    objects only with ``trust.code``).

    Args:
        path: the file (see :func:`check_readable`).
        contents: what it should hold (``"the example inputs"``), for messages.
        trust: what the user allowed; ``None`` where files of this role never run code.
        prefer: for a safetensors file, read only the first of these names it holds (see
            :func:`read_safetensors`).

    Raises:
        SourceError: not a tensor file, unreadable, or a TorchScript program that the user
            trusts (it is still not tensors).
        UnsafeCodeError: a TorchScript program, or pickled objects beyond tensors (untrusted);
            nothing from the file ran.
        DataError: a ``.npy`` array of something other than numbers.
    """
    try:
        kind = kind_of(path)
        if kind is Kind.NUMPY:
            return read_npy(path, contents)
        if kind is Kind.SAFETENSORS:
            return read_safetensors(path, prefer=prefer)
        if kind is Kind.TORCHSCRIPT:
            if trust is not None and trust.code:
                raise SourceError(f"{path}: is a TorchScript program, not {contents}")
            raise _refused(path, "a TorchScript program", contents, flag=False)
        if kind in (Kind.TORCH_ZIP, Kind.PICKLE):
            return read_torch_file(path, trust, kind, contents=contents)
        raise SourceError(f"{path}: not a tensor file (.safetensors, .pt or .npy content)")
    except BnSurgeryError:
        raise
    except Exception as exc:
        raise SourceError(f"{path}: cannot read {contents} ({brief(exc, typed=True)})") from exc
