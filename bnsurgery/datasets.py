"""Calibration data from the command line: a folder of images or a tensor file.

* a folder of images, with or without class subfolders (``.jpg``, ``.jpeg``, ``.png``,
  ``.bmp``, ``.webp``, ``.tif``), preprocessed with timm's data config for the model (resize,
  centre crop, normalise) or the ImageNet defaults at the given input size;
* a tensor file, recognised by its content (:func:`bnsurgery.trust.kind_of`), not its suffix:
  a torch file (a tensor, or a dict holding one, read like a checkpoint: zip checked, then
  ``weights_only=True``, never the full unpickler), a NumPy ``.npy`` array (no pickles), or
  safetensors (the first tensor, or ``images``/``inputs``/``x``).

Batches are plain tensors, made lazily, one at a time, and cast to the model's dtype; under
``torch.distributed`` each rank takes every ``world``-th batch.

A tensor file is fed to the model as it is, so it is checked when it is read: it must hold a
floating-point tensor of samples ``(N, C, ...)``, preprocessed as the model expects, with at
least one sample (integers, raw ``uint8`` pixels included, are refused rather than rescaled in
silence). A file that cannot be read at all is a :class:`~bnsurgery.errors.SourceError`, one
that holds pickled code (refused unrun) an :class:`~bnsurgery.errors.UnsafeCodeError`, and
readable data that cannot be used a :class:`~bnsurgery.errors.DataError`. Every message
names the file. A ``.npy`` file is mapped before it is copied, so a header claiming more data
than the file holds fails instead of allocating it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import exists, is_dir
from .errors import DataError, SourceError, UnsafeCodeError, brief
from .trust import Kind, Trust, kind_of

__all__ = ["IMAGE_SUFFIXES", "batches_from_path"]

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


def batches_from_path(
    path: str | Path,
    model: nn.Module,
    *,
    batch_size: int,
    input_size: tuple[int, ...] | None = None,
    rank: int = 0,
    world: int = 1,
) -> tuple[Iterator[torch.Tensor], int]:
    """Batches for :func:`bnsurgery.recalibrate` and how many this rank will see.

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
    dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)
    if is_dir(p):
        files = _image_files(p)
        transform = _image_transform(model, input_size)
        starts = list(range(0, len(files), batch_size))[rank::world]

        def images() -> Iterator[torch.Tensor]:
            from PIL import Image

            for start in starts:
                chunk = []
                for f in files[start : start + batch_size]:
                    try:
                        with Image.open(f) as img:
                            chunk.append(transform(img.convert("RGB")))
                    except Exception as exc:
                        raise SourceError(f"{f}: cannot read image ({exc})") from exc
                yield torch.stack(chunk).to(dtype)

        return images(), len(starts)
    tensor = _load_tensor(p)
    starts = list(range(0, len(tensor), batch_size))[rank::world]
    return (_batch(p, tensor[s : s + batch_size], dtype) for s in starts), len(starts)
