"""Calibration data: batches for :func:`bnsurgery.recalibrate` from a folder of images or a
tensor file (``--data``, ``--calibrate``).

* a folder of images, with or without class subfolders (``.jpg``, ``.jpeg``, ``.png``,
  ``.bmp``, ``.webp``, ``.tif``), preprocessed with timm's data config for the model (resize,
  centre crop, normalise) or the ImageNet defaults at the given input size;
* a tensor file, opened by its kind (:func:`bnsurgery.tensorfiles.read_tensors`), never the
  full unpickler: a torch file (a tensor, or a dict holding one), a NumPy ``.npy`` array, or
  safetensors (the first tensor, or ``images``/``inputs``/``x``/``data``; only that one is
  read).

Batches are plain tensors, made lazily, one at a time, and cast to the model's dtype; under
``torch.distributed`` each rank takes every ``world``-th batch. Images are read and
preprocessed by a ``torch.utils.data.DataLoader``, in ``workers`` processes if asked.

A tensor file is fed to the model as it is, so it is checked when it is read: it must hold a
floating-point tensor of samples ``(N, C, ...)``, preprocessed as the model expects, with at
least one sample (integers, raw ``uint8`` pixels included, are refused rather than rescaled in
silence). A file that cannot be read at all is a :class:`~bnsurgery.errors.SourceError`, one
that holds pickled code (refused unrun) an :class:`~bnsurgery.errors.UnsafeCodeError`, and
readable data that cannot be used a :class:`~bnsurgery.errors.DataError`. Every message
names the file. NaN and infinite values are not refused here: recalibration names the batch
and the sample that holds them.

Example inputs (``--inputs``) live in :mod:`bnsurgery.inputs`; :func:`read_example_inputs` and
:func:`example_arguments` are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DataError, SourceError
from .inputs import ExampleInputs, cast_to, example_arguments, model_dtype, read_example_inputs
from .outputs import is_dir
from .tensorfiles import check_readable, read_tensors

__all__ = [
    "IMAGE_SUFFIXES",
    "ExampleInputs",
    "batches_from_path",
    "example_arguments",
    "image_files",
    "read_example_inputs",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_TENSOR_KEYS = ("images", "inputs", "x", "data")


def _load_tensor(path: Path) -> torch.Tensor:
    """The samples of a tensor file; data never runs code (no trust is taken)."""
    value = read_tensors(path, contents="the calibration data", prefer=_TENSOR_KEYS)
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


def image_files(folder: Path) -> Iterator[Path]:
    """The image files under ``folder``, at every depth, as they are found: what a data folder
    is read from (:mod:`bnsurgery.outputs` protects each from being overwritten)."""
    return (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _sorted_images(folder: Path) -> list[Path]:
    files = sorted(image_files(folder))
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
        yield batch.to(dtype)  # normalised pixels: no float overflows


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
        SourceError: missing path, neither a folder nor a non-empty regular file (a FIFO or
            a device would block or never end), an unreadable tensor file or image (a corrupt
            image is found when its batch is made).
        UnsafeCodeError: a tensor file that holds pickled code (it was not run).
        DataError: a folder without images; a tensor file whose content cannot be used (no
            tensor, fewer than 2 dimensions, no samples, an integer or bool dtype (raw
            ``uint8`` pixels included: never fed unscaled)); values that overflow the model's
            dtype (when their batch is made).
    """
    p = Path(path)
    dtype = model_dtype(model)
    if is_dir(p):
        files = _sorted_images(p)
        transform = _image_transform(model, input_size)
        starts = list(range(0, len(files), batch_size))[rank::world]
        chunks = [list(range(s, min(s + batch_size, len(files)))) for s in starts]
        return _image_batches(_Images(files, transform), chunks, dtype, workers), len(starts)
    check_readable(p, missing="no such file or folder")
    tensor = _load_tensor(p)
    starts = list(range(0, len(tensor), batch_size))[rank::world]
    batches = (cast_to(tensor[s : s + batch_size], dtype, str(p)) for s in starts)
    return batches, len(starts)
