"""Calibration data from the command line: a folder of images or a tensor file.

* a folder of images, with or without class subfolders (``.jpg``, ``.jpeg``, ``.png``,
  ``.bmp``, ``.webp``, ``.tif``), preprocessed with timm's data config for the model (resize,
  centre crop, normalise) or the ImageNet defaults at the given input size;
* a tensor file: ``.pt``/``.pth`` (a tensor, or a dict holding one, loaded with
  ``weights_only=True``), ``.npy`` (no pickles), or ``.safetensors`` (the first tensor, or
  ``images``/``inputs``/``x``).

Batches are plain tensors; under ``torch.distributed`` each rank takes every ``world``-th
batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import exists, is_dir
from .errors import SourceError

__all__ = ["IMAGE_SUFFIXES", "batches_from_path"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_TENSOR_KEYS = ("images", "inputs", "x", "data")


def _load_tensor(path: Path) -> torch.Tensor:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            import numpy as np

            value: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            value = load_file(str(path))
        else:
            value = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SourceError(
            f"{path}: cannot read calibration tensors ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(value, dict):
        found = next(
            (value[k] for k in _TENSOR_KEYS if isinstance(value.get(k), torch.Tensor)), None
        )
        if found is None:
            found = next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
        value = found
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        raise SourceError(
            f"{path}: expected a tensor of samples (N, ...), found {type(value).__name__}"
        )
    if not value.is_floating_point():
        value = value.float()
    return value


def _image_files(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        raise SourceError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
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
        SourceError: missing path, no images, unreadable tensors.
    """
    p = Path(path)
    if not exists(p):
        raise SourceError(f"{p}: no such file or folder")
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
    return (tensor[s : s + batch_size].to(dtype) for s in starts), len(starts)
