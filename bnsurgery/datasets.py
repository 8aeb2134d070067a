"""Data from the command line: calibration data (a folder of images or a tensor file) and
example inputs (a tensor file, :func:`read_example_inputs`).

* a folder of images, with or without class subfolders (``.jpg``, ``.jpeg``, ``.png``,
  ``.bmp``, ``.webp``, ``.tif``), preprocessed with timm's data config for the model (resize,
  centre crop, normalise) or the ImageNet defaults at the given input size;
* a tensor file, recognised by its content (:func:`bnsurgery.trust.kind_of`), not its suffix:
  a torch file (a tensor, or a dict holding one, read like a checkpoint: zip checked, then
  ``weights_only=True``, never the full unpickler), a NumPy ``.npy`` array (no pickles), or
  safetensors (the first tensor, or ``images``/``inputs``/``x``).

Batches are plain tensors, made lazily, one at a time, and cast to the model's dtype; under
``torch.distributed`` each rank takes every ``world``-th batch. Images are read and
preprocessed by a ``torch.utils.data.DataLoader``, in ``workers`` processes if asked.

A tensor file is fed to the model as it is, so it is checked when it is read: it must hold a
floating-point tensor of samples ``(N, C, ...)``, preprocessed as the model expects, with at
least one sample (integers, raw ``uint8`` pixels included, are refused rather than rescaled in
silence). A file that cannot be read at all is a :class:`~bnsurgery.errors.SourceError`, one
that holds pickled code (refused unrun) an :class:`~bnsurgery.errors.UnsafeCodeError`, and
readable data that cannot be used a :class:`~bnsurgery.errors.DataError`. Every message
names the file. A ``.npy`` file is mapped before it is copied, so a header claiming more data
than the file holds fails instead of allocating it.

Example inputs are the arguments of one call of the model, as the file holds them: integer
tensors (an ``edge_index``, ``lengths``) are legitimate there, and a ``.pt`` file needs
``trust_code`` only if it holds pickled objects beyond tensors and containers.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import exists, is_dir
from .errors import DataError, SourceError, UnsafeCodeError, brief
from .trust import FLAG, Kind, Trust, kind_of

__all__ = [
    "IMAGE_SUFFIXES",
    "ExampleInputs",
    "batches_from_path",
    "example_arguments",
    "read_example_inputs",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_TENSOR_KEYS = ("images", "inputs", "x", "data")


def _unsafe(path: Path, what: str) -> UnsafeCodeError:
    return UnsafeCodeError(
        f"{path}: holds {what}; loading it would run code from the file, and it was not run: "
        "save the calibration data as plain tensors (.pt of tensors, .npy, .safetensors)"
    )


def _read_npy(path: Path) -> Any:
    import numpy as np

    try:
        # mapped first: a header claiming more than the file holds fails here, unallocated
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "Python objects" in str(exc):  # object arrays
            raise _unsafe(path, "pickled Python objects") from exc
        raise SourceError(
            f"{path}: not a readable .npy file, truncated or corrupt ({brief(exc, typed=True)})"
        ) from exc
    if not isinstance(mapped, np.ndarray):
        raise DataError(f"{path}: holds a {type(mapped).__name__}, not one array of samples")
    array = np.array(mapped, dtype=mapped.dtype.newbyteorder("="), order="C")  # a copy
    del mapped
    try:
        return torch.from_numpy(array)
    except TypeError as exc:
        raise DataError(f"{path}: holds {array.dtype} values, not numbers") from exc


def _read_safetensors(path: Path) -> Any:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        if not keys:
            raise DataError(f"{path}: holds no tensor")
        key = next((k for k in _TENSOR_KEYS if k in keys), keys[0])
        return f.get_tensor(key)  # only the tensor used is read


def _read_torch(path: Path, kind: Kind) -> Any:
    from .checkpoint import read_torch_file

    if kind is Kind.TORCHSCRIPT:
        raise _unsafe(path, "a TorchScript program")
    try:
        return read_torch_file(path, Trust(), kind)  # data never runs code
    except UnsafeCodeError as exc:
        found = re.search(r"\(it references [\w.]+\)", str(exc))
        what = "pickled Python objects" + (f" {found.group(0)}" if found else "")
        raise _unsafe(path, what) from exc


def _load_tensor(path: Path) -> torch.Tensor:
    kind = kind_of(path)  # by content, as for every file (bnsurgery.trust)
    try:
        if kind is Kind.NUMPY:
            value: Any = _read_npy(path)
        elif kind is Kind.SAFETENSORS:
            value = _read_safetensors(path)
        elif kind in (Kind.TORCH_ZIP, Kind.PICKLE, Kind.TORCHSCRIPT):
            value = _read_torch(path, kind)
        else:
            raise SourceError(
                f"{path}: not a tensor file (.pt, .npy or .safetensors content) nor a folder"
            )
    except (DataError, UnsafeCodeError, SourceError):
        raise
    except Exception as exc:
        what = brief(exc, typed=True)
        raise SourceError(f"{path}: cannot read calibration tensors ({what})") from exc
    return _samples(path, value)


def _samples(path: Path, value: Any) -> torch.Tensor:
    """The tensor of samples in what a file held, or a :class:`DataError` saying why not."""
    if isinstance(value, dict):
        found = next(
            (value[k] for k in _TENSOR_KEYS if isinstance(value.get(k), torch.Tensor)), None
        )
        if found is None:
            found = next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
        if found is None:
            keys = ", ".join(str(k) for k in list(value)[:5]) or "none"
            raise DataError(f"{path}: holds a dict with no tensor (keys: {keys})")
        value = found
    if not isinstance(value, torch.Tensor):
        raise DataError(
            f"{path}: holds a {type(value).__name__}, not a tensor of samples (N, C, ...)"
        )
    shape = tuple(value.shape)
    if value.layout != torch.strided:
        raise DataError(f"{path}: holds a {value.layout} tensor; save a dense one")
    if value.dim() < 2:
        raise DataError(
            f"{path}: holds a tensor of shape {shape}; expected samples (N, C, ...) with at "
            "least 2 dimensions"
        )
    if shape[0] == 0 or value.numel() == 0:
        raise DataError(f"{path}: holds no samples (a tensor of shape {shape})")
    if not value.is_floating_point():
        kind = str(value.dtype).removeprefix("torch.")
        what = "raw pixels (0 to 255)" if value.dtype == torch.uint8 else "not images or features"
        raise DataError(
            f"{path}: holds {kind} values, {what}; a tensor file is fed to the model as it is, "
            "so save floating-point samples preprocessed the way the model expects (scaled and "
            "normalised), or pass a folder of images"
        )
    return value


def _batch(path: Path, chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A slice of the samples in the model's dtype: values that are finite in the file but do
    not fit that dtype are named here (the model would only see infinities)."""
    out = chunk.to(dtype)
    if chunk.dtype != dtype and chunk.is_floating_point():
        lo, hi = (float(v) for v in torch.aminmax(out))
        if not (math.isfinite(lo) and math.isfinite(hi)) and bool(torch.isfinite(chunk).all()):
            largest = float(chunk.abs().max())
            kind = str(dtype).removeprefix("torch.")
            raise DataError(f"{path}: values up to {largest:.3g} overflow the model's {kind}")
    return out


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its first floating parameter."""
    return next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)


def _image_files(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def _image_transform(model: nn.Module, input_size: tuple[int, ...] | None):
    from timm.data import create_transform, resolve_data_config

    overrides: dict[str, Any] = {}
    if input_size is not None:
        overrides["input_size"] = tuple(input_size)
    config = resolve_data_config(overrides, model=model)
    return create_transform(**config, is_training=False)


class _Images(torch.utils.data.Dataset):
    """The images of a folder, preprocessed. An image that cannot be read gives the text of
    the error instead of raising it: raised in a worker process, it would reach the caller with
    the worker's traceback folded into its message."""

    def __init__(self, files: list[Path], transform: Any) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        from PIL import Image

        f = self.files[index]
        try:
            with Image.open(f) as img:
                return self.transform(img.convert("RGB"))
        except Exception as exc:
            return f"{f}: cannot read image ({exc})"


def _stack(items: list[torch.Tensor | str]) -> torch.Tensor | str:
    """A batch, or the first error among its images."""
    problem = next((item for item in items if isinstance(item, str)), None)
    return problem if problem is not None else torch.stack(items)  # type: ignore[arg-type]


def _image_batches(
    images: _Images, chunks: list[list[int]], dtype: torch.dtype, workers: int
) -> Iterator[torch.Tensor]:
    """The batches of ``chunks`` (lists of image indices), in order, read by ``workers``
    processes (none: this one)."""
    loader = torch.utils.data.DataLoader(
        images, batch_sampler=chunks, num_workers=workers, collate_fn=_stack
    )
    for batch in loader:
        if isinstance(batch, str):
            raise SourceError(batch)
        yield batch.to(dtype)


def batches_from_path(
    path: str | Path,
    model: nn.Module,
    *,
    batch_size: int,
    input_size: tuple[int, ...] | None = None,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
) -> tuple[Iterator[torch.Tensor], int]:
    """Batches for :func:`bnsurgery.recalibrate` and how many this rank will see.

    ``workers``: processes that read and preprocess the images of a folder (a DataLoader's
    ``num_workers``; 0 reads them in this process). The batches are the same either way, in the
    same order. A tensor file is already in memory: ``workers`` does not apply to it.

    Raises:
        SourceError: missing path, an unreadable tensor file or image (a corrupt image is
            found when its batch is made).
        UnsafeCodeError: a tensor file that holds pickled code (it was not run).
        DataError: a folder without images; a tensor file whose content cannot be used (no
            tensor, fewer than 2 dimensions, no samples, an integer or bool dtype other than
            integer (raw ``uint8`` pixels included: never fed unscaled) or bool dtype, values
            that overflow the model's dtype).
    """
    p = Path(path)
    if not exists(p):
        raise SourceError(f"{p}: no such file or folder")
    if not is_dir(p) and not p.is_file():  # a FIFO or a device would block or never end
        raise SourceError(f"{p}: is not a regular file nor a folder")
    dtype = _model_dtype(model)
    if is_dir(p):
        files = _image_files(p)
        transform = _image_transform(model, input_size)
        starts = list(range(0, len(files), batch_size))[rank::world]
        chunks = [list(range(s, min(s + batch_size, len(files)))) for s in starts]
        return _image_batches(_Images(files, transform), chunks, dtype, workers), len(starts)
    tensor = _load_tensor(p)
    starts = list(range(0, len(tensor), batch_size))[rank::world]
    return (_batch(p, tensor[s : s + batch_size], dtype) for s in starts), len(starts)


# ------------------------------------------------------------------------- example inputs


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
    if not exists(p):
        raise SourceError(f"{p}: no such file")
    if is_dir(p):
        raise SourceError(f"{p}: is a folder; example inputs come from one tensor file")
    if not p.is_file():
        raise SourceError(f"{p}: is not a regular file")
    if p.stat().st_size == 0:
        raise SourceError(f"{p}: is empty")
    kind = kind_of(p)
    try:
        if kind is Kind.NUMPY:
            value: Any = _read_npy(p)
        elif kind is Kind.SAFETENSORS:
            value = _read_all_safetensors(p)
        elif kind in (Kind.TORCH_ZIP, Kind.PICKLE, Kind.TORCHSCRIPT):
            value = _read_torch_inputs(p, kind, trust_code)
        else:
            raise SourceError(f"{p}: not a tensor file (.safetensors, .pt or .npy content)")
    except (DataError, UnsafeCodeError, SourceError):
        raise
    except Exception as exc:
        raise SourceError(f"{p}: cannot read example inputs ({brief(exc, typed=True)})") from exc
    inputs = _arguments(p, value)
    for name, item in _named_arguments(inputs):
        _check_argument(p, name, item)
    return inputs


def _read_all_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)


def _read_torch_inputs(path: Path, kind: Kind, trust_code: bool) -> Any:
    from .checkpoint import read_torch_file

    if kind is Kind.TORCHSCRIPT:
        if trust_code:
            raise SourceError(f"{path}: is a TorchScript program, not example inputs")
        raise UnsafeCodeError(
            f"{path}: holds a TorchScript program; loading it would run code from the file, "
            "and it was not run: save the example inputs as tensors (.safetensors, .npy, or a "
            ".pt of tensors)"
        )
    try:
        return read_torch_file(path, Trust(code=trust_code), kind)
    except UnsafeCodeError as exc:
        found = re.search(r"\(it references [\w.]+\)", str(exc))
        what = "pickled Python objects" + (f" {found.group(0)}" if found else "")
        raise UnsafeCodeError(
            f"{path}: holds {what}; loading it would run code from the file, and it was not "
            f"run: save the example inputs as tensors (.safetensors, .npy, or a .pt of "
            f"tensors), or pass {FLAG} only if you trust its origin"
        ) from exc


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
    dtype = _model_dtype(model)
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
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    out = value.to(dtype)
    if value.dtype != dtype and not bool(torch.isfinite(out).all()):
        largest = float(value.abs().max())
        kind = str(dtype).removeprefix("torch.")
        raise DataError(
            f"{path}: input {name}: values up to {largest:.3g} overflow the model's {kind}"
        )
    return out
