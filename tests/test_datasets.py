"""bnsurgery.datasets: calibration batches from a tensor file or a folder of images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bnsurgery.datasets import batches_from_path, image_files
from bnsurgery.errors import DataError, SourceError, UnsafeCodeError

from .hostile import Payload
from .models import SimpleCNN

#: ten samples, each filled with its own index: a batch says which samples it holds
SAMPLES = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1).expand(10, 3, 4, 4)


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    return SimpleCNN(width=4).to(dtype)


def _indices(batches) -> list[list[int]]:
    """The sample indices of each batch (see SAMPLES)."""
    return [[int(s[0, 0, 0]) for s in batch] for batch in batches]


def _pt(tmp_path: Path, value, name: str = "calib.pt") -> Path:
    path = tmp_path / name
    torch.save(value, path)
    return path


# ------------------------------------------------------------------------------ tensor files


def test_batches_and_the_last_partial_one(tmp_path):
    batches, count = batches_from_path(_pt(tmp_path, SAMPLES.clone()), _model(), batch_size=4)
    batches = list(batches)
    assert count == 3
    assert _indices(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(torch.cat(batches), SAMPLES)


@pytest.mark.parametrize(
    "rank, world, expected",
    [(0, 2, [[0, 1, 2], [6, 7, 8]]), (1, 2, [[3, 4, 5], [9]]), (2, 3, [[6, 7, 8]])],
)
def test_each_rank_takes_every_world_th_batch(tmp_path, rank, world, expected):
    path = _pt(tmp_path, SAMPLES.clone())
    batches, count = batches_from_path(path, _model(), batch_size=3, rank=rank, world=world)
    assert _indices(batches) == expected and count == len(expected)


def test_ranks_together_see_every_sample_once(tmp_path):
    path = _pt(tmp_path, SAMPLES.clone())
    seen = []
    for rank in range(3):
        batches, _ = batches_from_path(path, _model(), batch_size=2, rank=rank, world=3)
        seen += [i for batch in _indices(batches) for i in batch]
    assert sorted(seen) == list(range(10))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_batches_take_the_models_dtype(tmp_path, dtype):
    path = _pt(tmp_path, SAMPLES.clone())
    batches, _ = batches_from_path(path, _model(dtype), batch_size=4)
    batches = list(batches)
    assert [b.dtype for b in batches] == [dtype] * 3
    assert torch.equal(torch.cat(batches), SAMPLES.to(dtype))


def test_float64_data_is_rounded_to_a_float32_model(tmp_path):
    data = torch.full((2, 3, 2, 2), 1 / 3, dtype=torch.float64)
    np.save(tmp_path / "x.npy", data.numpy())
    (batch,), _ = batches_from_path(tmp_path / "x.npy", _model(), batch_size=8)
    assert batch.dtype == torch.float32 and torch.equal(batch, data.float())


def test_values_that_overflow_the_models_dtype(tmp_path):
    data = SAMPLES.clone()
    data[9] = 1e5  # float16 ends at 65504; only the last batch overflows
    batches, _ = batches_from_path(_pt(tmp_path, data), _model(torch.float16), batch_size=4)
    assert next(batches).dtype == torch.float16
    next(batches)
    with pytest.raises(DataError, match=r"values up to 1e\+05 overflow the model's float16"):
        next(batches)


def test_nan_is_left_for_recalibration_to_name(tmp_path):
    """Datasets does not judge NaN: recalibration names the batch and sample that hold it."""
    data = SAMPLES.clone()
    data[5, 1, 2, 3] = float("nan")
    batches, _ = batches_from_path(_pt(tmp_path, data), _model(torch.float64), batch_size=4)
    second = list(batches)[1]
    assert torch.isnan(second).sum() == 1 and torch.isnan(second[1, 1, 2, 3])


def test_npy_safetensors_and_dicts(tmp_path):
    np.save(tmp_path / "x.npy", SAMPLES.numpy())
    labels = torch.arange(10)
    save_file({"labels": labels, "images": SAMPLES.contiguous()}, str(tmp_path / "x.safetensors"))
    save_file({"a": SAMPLES[:3].contiguous()}, str(tmp_path / "first.safetensors"))
    _pt(tmp_path, {"labels": labels, "inputs": SAMPLES.clone()}, "dict.pt")
    expected = {"x.npy": 10, "x.safetensors": 10, "first.safetensors": 3, "dict.pt": 10}
    for name, count in expected.items():
        (batch,), _ = batches_from_path(tmp_path / name, _model(), batch_size=16)
        assert torch.equal(batch, SAMPLES[:count]), name


def test_the_content_decides_not_the_suffix(tmp_path):
    path = _pt(tmp_path, SAMPLES.clone(), "calibration.txt")
    (batch,), _ = batches_from_path(path, _model(), batch_size=16)
    assert torch.equal(batch, SAMPLES)
    garbage = tmp_path / "calib.pt"
    garbage.write_bytes(bytes(range(7, 256)) * 3)
    with pytest.raises(SourceError, match="not a tensor file"):
        batches_from_path(garbage, _model(), batch_size=4)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (torch.arange(30.0).reshape(10, 3).long(), DataError, "holds int64 values"),
        (torch.ones(10), DataError, r"shape \(10,\); expected samples"),
        (torch.zeros(0, 3, 4, 4), DataError, "holds no samples"),
        ({"name": "calib"}, DataError, "holds a dict with no tensor"),
        ([SAMPLES], DataError, "holds a list, not a tensor of samples"),
    ],
    ids=["integers", "one_dimension", "no_samples", "dict", "list"],
)
def test_unusable_content(tmp_path, value, error, message):
    path = _pt(tmp_path, value)
    with pytest.raises(error, match=message) as info:
        batches_from_path(path, _model(), batch_size=4)
    assert str(info.value).startswith(f"{path}: ")


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = _pt(tmp_path, {"images": SAMPLES.clone(), "x": Payload(marker)})
    with pytest.raises(UnsafeCodeError, match="save the calibration data as tensors"):
        batches_from_path(path, _model(), batch_size=4)
    assert not marker.exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file or folder"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: os.mkfifo(p), "is not a regular file"),
    ],
    ids=["missing", "empty", "fifo"],
)
def test_paths_that_cannot_be_read(tmp_path, make, message):
    path = tmp_path / "calib.pt"
    make(path)
    with pytest.raises(SourceError) as info:
        batches_from_path(path, _model(), batch_size=4)
    assert str(info.value) == f"{path}: {message}"


def test_an_unreadable_file(tmp_path, monkeypatch):
    path = _pt(tmp_path, SAMPLES.clone())
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p == path else real(p, mode))
    with pytest.raises(SourceError, match="is not readable"):
        batches_from_path(path, _model(), batch_size=4)


# --------------------------------------------------------------------------- image folders

#: solid colours, one an image; their normalised values survive any resize and crop
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, timm's default


def _images(folder: Path) -> Path:
    from PIL import Image

    for i, colour in enumerate(COLOURS):
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i, 24), colour).save(sub / f"{i}.png")
    (folder / "class0" / "notes.txt").write_text("not an image")
    return folder


def _colour(sample: torch.Tensor) -> tuple[int, ...]:
    """The colour an image was, from its normalised, preprocessed tensor."""
    means = sample.double().mean(dim=(1, 2))
    return tuple(
        round((float(m) * s + mu) * 255) for m, s, mu in zip(means, STD, MEAN, strict=True)
    )


def test_image_folder_batches(tmp_path):
    folder = _images(tmp_path / "images")
    batches, count = batches_from_path(folder, _model(), batch_size=2, input_size=(3, 8, 8))
    batches = list(batches)
    assert count == 3 and [tuple(b.shape) for b in batches] == [(2, 3, 8, 8)] * 2 + [(1, 3, 8, 8)]
    # sorted by path: class0/0, class0/2, class0/4, class1/1, class1/3
    order = [COLOURS[i] for i in (0, 2, 4, 1, 3)]
    assert [_colour(s) for b in batches for s in b] == order
    red = batches[0][0]
    expected = torch.tensor([(1 - MEAN[0]) / STD[0], -MEAN[1] / STD[1], -MEAN[2] / STD[2]])
    assert torch.allclose(red.mean(dim=(1, 2)), expected, atol=1e-3)
    assert torch.allclose(red, red[:, :1, :1].expand_as(red), atol=1e-3)  # solid after resize


def test_image_folder_sharding_and_dtype(tmp_path):
    folder = _images(tmp_path / "images")
    model = _model(torch.float64)
    kwargs = dict(batch_size=2, input_size=(3, 8, 8), world=2)
    first, first_count = batches_from_path(folder, model, rank=0, **kwargs)
    second, second_count = batches_from_path(folder, model, rank=1, **kwargs)
    first, second = list(first), list(second)
    assert (first_count, second_count) == (2, 1)
    assert [len(b) for b in first] == [2, 1] and [len(b) for b in second] == [2]
    assert {b.dtype for b in first + second} == {torch.float64}
    colours = [_colour(s) for b in first + second for s in b]
    assert colours == [COLOURS[i] for i in (0, 2, 3, 4, 1)]


def test_a_folder_without_images(tmp_path):
    folder = tmp_path / "empty"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        batches_from_path(folder, _model(), batch_size=2)


def test_image_files_finds_images_at_every_depth(tmp_path):
    folder = _images(tmp_path / "images")
    (folder / "class1" / "deeper").mkdir()
    (folder / "class1" / "deeper" / "x.JPG").write_bytes(b"not decoded here")
    (folder / "class1" / "fake.png").mkdir()  # a folder named like an image
    names = sorted(p.relative_to(folder).as_posix() for p in image_files(folder))
    assert names == [
        "class0/0.png",
        "class0/2.png",
        "class0/4.png",
        "class1/1.png",
        "class1/3.png",
        "class1/deeper/x.JPG",
    ]
