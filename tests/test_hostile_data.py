"""Hostile calibration data: ``recalibrate --data`` and ``swap --calibrate``, and the library.

Data is checked before it changes anything. Every case runs the real entry point and checks
the guarantees of ``tests/hostile.py`` (exit code, one stderr line naming the data file, no
traceback, inputs byte-identical, nothing written); the library cases check that
:func:`bnsurgery.recalibrate` and :func:`bnsurgery.swap` raise :class:`DataError` and leave the
model bit-identical: every tensor, every module and every training flag.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bnsurgery
from bnsurgery.errors import DataError

from .hostile import DATA, SOURCE, UNSAFE, Payload, check, command_args, run_cli, snapshot
from .models import SimpleCNN

pytestmark = pytest.mark.hostile

SHAPE = (8, 3, 16, 16)  # the world's model takes 3 channels; batches of 3: 0-2, 3-5, 6-7


def _samples(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _save(folder: Path, name: str, value) -> Path:
    path = folder / name
    if name.endswith(".npy"):
        np.save(path, value)
    else:
        torch.save(value, path)
    return path


def _nan_in_last_batch(folder: Path, world) -> Path:
    x = _samples()
    x[7, 1, 2, 3] = float("nan")  # one pixel, in the last batch only
    return _save(folder, "nan.pt", x)


def _inf(folder: Path, world) -> Path:
    x = _samples()
    x[4, 0, 5, 5] = float("inf")
    return _save(folder, "inf.pt", x)


def _huge_values(folder: Path, world) -> Path:
    return _save(folder, "huge.pt", _samples() * 1e30)  # finite, but BN's variance is not


def _wrong_channels(folder: Path, world) -> Path:
    return _save(folder, "four_channels.pt", torch.randn(8, 4, 16, 16))


def _channels_last(folder: Path, world) -> Path:
    return _save(folder, "nhwc.npy", _samples().permute(0, 2, 3, 1).numpy())


def _one_dimensional(folder: Path, world) -> Path:
    return _save(folder, "flat.pt", torch.randn(8))


def _empty_tensor(folder: Path, world) -> Path:
    return _save(folder, "nothing.pt", torch.zeros(0, 3, 16, 16))


def _dict_without_tensor(folder: Path, world) -> Path:
    return _save(folder, "dict.pt", {"labels": [1, 2], "name": "calib"})


def _integer_labels(folder: Path, world) -> Path:
    return _save(folder, "labels.pt", torch.randint(0, 10, SHAPE))


def _raw_pixels(folder: Path, world) -> Path:
    """uint8 pixels: fed as they are they would be 0 to 255, not what the model was trained on."""
    return _save(folder, "pixels.npy", np.full(SHAPE, 200, dtype=np.uint8))


def _bool_mask(folder: Path, world) -> Path:
    return _save(folder, "mask.npy", np.zeros(SHAPE, dtype=bool))


def _float64_overflow(folder: Path, world) -> Path:
    return _save(folder, "wide.npy", _samples().double().numpy() * 1e300)  # inf in float32


def _safetensors_without_tensor(folder: Path, world) -> Path:
    from safetensors.torch import save_file

    path = folder / "calib.safetensors"
    save_file({}, str(path))
    return path


def _pickle_payload(folder: Path, world) -> Path:
    return _save(folder, "calib.pt", {"images": _samples(), "x": Payload(world["marker"])})


def _huge_npy_header(folder: Path, world) -> Path:
    path = folder / "huge_header.npy"
    with path.open("wb") as f:  # claims 1.5 PB of float32 in 64 bytes of data
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3, 224, 224)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    return path


def _truncated_npy(folder: Path, world) -> Path:
    whole = _save(folder, "whole.npy", _samples().numpy())
    path = folder / "truncated.npy"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    whole.unlink()
    return path


def _folder_without_images(folder: Path, world) -> Path:
    path = folder / "no_images"
    (path / "class0").mkdir(parents=True)
    (path / "class0" / "notes.txt").write_text("not an image")
    return path


def _corrupt_image(folder: Path, world) -> Path:
    from PIL import Image

    path = folder / "images"
    path.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path / "a.png")
    data = (path / "a.png").read_bytes()
    (path / "b.png").write_bytes(data[:40])  # a PNG header, then nothing
    return path


#: case: (make the data in the inputs folder, exit code, phrases the one line must contain)
CASES: dict[str, tuple[Callable, int, tuple[str, ...]]] = {
    "nan_in_last_batch": (_nan_in_last_batch, DATA, ("batch 2 holds 1 NaN value", "sample 1")),
    "inf": (_inf, DATA, ("batch 1 holds 1 infinite value", "sample 1")),
    "huge_values": (_huge_values, DATA, ("values up to", "at bn1")),
    "wrong_channels": (_wrong_channels, DATA, ("(3, 4, 16, 16)", "expects 3 channels")),
    "channels_last": (_channels_last, DATA, ("(3, 16, 16, 3)", "permute to (N, C, H, W)")),
    "one_dimensional": (_one_dimensional, DATA, ("shape (8,)", "at least 2 dimensions")),
    "empty_tensor": (_empty_tensor, DATA, ("no samples",)),
    "dict_without_tensor": (_dict_without_tensor, DATA, ("no tensor", "labels")),
    "integer_labels": (_integer_labels, DATA, ("int64 values",)),
    "bool_mask": (_bool_mask, DATA, ("bool values",)),
    "raw_uint8_pixels": (_raw_pixels, DATA, ("uint8 values, raw pixels",)),
    "float64_overflow": (_float64_overflow, DATA, ("overflow the model's float32",)),
    "safetensors_without_tensor": (_safetensors_without_tensor, DATA, ("no tensor",)),
    "pickle_payload": (_pickle_payload, UNSAFE, ("not run",)),
    "huge_npy_header": (_huge_npy_header, SOURCE, ("truncated or corrupt",)),
    "truncated_npy": (_truncated_npy, SOURCE, ("truncated or corrupt",)),
    "folder_without_images": (_folder_without_images, DATA, ("no images",)),
    "corrupt_image": (_corrupt_image, SOURCE, ("b.png", "cannot read image")),
}


def _args(command: str, world, data: Path) -> list[str]:
    """``recalibrate --data`` or ``swap --to groupnorm --calibrate`` on the world's model."""
    args = command_args(command, world, world["model"])
    if command == "swap":
        args[args.index("--to") + 1] = "groupnorm"
        args += ["--calibrate", str(data), "--batch-size", "3"]
    else:
        args[args.index("--data") + 1] = str(data)
    return [*args, "--input-size", "3,16,16"]


@pytest.mark.parametrize("command", ["recalibrate", "swap"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_data(case, command, world, capsys):
    make, expected, phrases = CASES[case]
    data = make(world["in"], world)
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, _args(command, world, data))
    check(code, err, expected, before, snapshot(world["in"], world["out"]))
    for phrase in (str(data), *phrases):
        assert phrase in err, err
    if case == "huge_values" and command == "recalibrate":
        assert "overflow float32 at bn1" in err, err
    assert not world["marker"].exists(), "the pickle payload ran"


@pytest.mark.parametrize("command", ["recalibrate", "swap"])
def test_clean_data_is_the_control(command, world, capsys):
    """The same invocation on clean data succeeds, so the cases above fail for their data."""
    data = _save(world["in"], "clean.npy", _samples().numpy())
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, _args(command, world, data))
    written = (str(world["out"] / f"result-{command}.safetensors"),)
    check(code, err, 0, before, snapshot(world["in"], world["out"]), written)


# --------------------------------------------------------------------------- the library


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = bnsurgery.testing.randomize_bn(SimpleCNN()).eval()
    model.bn1.train()  # mixed flags: each must come back as it was
    return model


def _state(model: nn.Module) -> dict:
    """Every tensor bit for bit, every module by identity, every training flag."""
    tensors = {
        k: (v.dtype, tuple(v.shape), v.detach().reshape(-1).clone().view(torch.uint8))
        for k, v in model.state_dict(keep_vars=True).items()
    }
    modules = {name: (m, m.training) for name, m in model.named_modules()}
    return {"tensors": tensors, "modules": modules, "dict": dict(model.bn1.__dict__)}


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _state(model)
    assert after["modules"].keys() == before["modules"].keys()
    for name, (module, training) in before["modules"].items():
        now, now_training = after["modules"][name]
        assert now is module, f"{name} was replaced"
        assert now_training == training, f"{name}: training flag changed"
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, (dtype, shape, bits) in before["tensors"].items():
        now_dtype, now_shape, now_bits = after["tensors"][key]
        assert (now_dtype, now_shape) == (dtype, shape), key
        assert torch.equal(now_bits, bits), f"{key} changed"
    assert after["dict"].keys() == before["dict"].keys()  # no forward left patched in
    assert bnsurgery.last_report(model) is None


def _batches(kind: str) -> list[torch.Tensor]:
    data = [_samples(i)[:3] for i in range(3)]
    if kind == "nan_in_last_batch":
        data[2][1, 0, 4, 4] = float("nan")
    elif kind == "inf":
        data[1][0, 2, 0, 0] = -float("inf")
    elif kind == "huge_values":
        data = [x * 1e30 for x in data]
    elif kind == "float64_overflow":  # the float64 statistics are finite, not in float32
        data = [x * 1e20 for x in data]
    elif kind == "channels_last":
        data = [x.permute(0, 2, 3, 1) for x in data]
    elif kind == "wrong_channels":
        data = [torch.randn(3, 5, 16, 16) for _ in data]
    elif kind == "one_dimensional":
        data = [x.reshape(-1) for x in data]
    return data


LIBRARY_CASES = {
    "nan_in_last_batch": "batch 2 holds 1 NaN value (first at sample 1)",
    "inf": "batch 1 holds 1 infinite value (first at sample 0)",
    "huge_values": "at bn1",
    "float64_overflow": "overflow float32 at bn1",
    "channels_last": "channels-last",
    "wrong_channels": "expects 3 channels in dimension 1",
    "one_dimensional": "batches of shape (2304,)",
}


@pytest.mark.parametrize("mode", ["exact", "ema"])
@pytest.mark.parametrize("case", sorted(LIBRARY_CASES))
def test_recalibrate_raises_and_changes_nothing(case, mode):
    model = _model()
    before = _state(model)
    seen = []
    model.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    with pytest.raises(
        DataError, match=LIBRARY_CASES[case].replace("(", r"\(").replace(")", r"\)")
    ):
        bnsurgery.recalibrate(model, iter(_batches(case)), mode=mode)
    _assert_unchanged(model, before)
    assert model.bn1.momentum == 0.1
    if case == "nan_in_last_batch":
        assert len(seen) == 2, "the model saw the bad batch"


@pytest.mark.parametrize("case", sorted(LIBRARY_CASES))
def test_swap_raises_and_changes_nothing(case):
    model = _model()
    before = _state(model)
    match = LIBRARY_CASES[case].replace("(", r"\(").replace(")", r"\)")
    if case == "float64_overflow":
        match = "at bn1"
    with pytest.raises(DataError, match=match):
        bnsurgery.swap(model, "groupnorm", calibrate=iter(_batches(case)))
    _assert_unchanged(model, before)
    assert type(model.bn1) is nn.BatchNorm2d


def test_clean_batches_still_work_and_stay_lazy():
    """The control for the library cases, and: only the batches used are produced."""

    def endless():
        for i in itertools.count():
            if i >= 2:
                raise AssertionError("a batch beyond the ones asked for was produced")
            yield _samples(i)[:3]

    model = bnsurgery.recalibrate(_model(), endless(), num_batches=2)
    assert torch.isfinite(model.bn1.running_var).all()
    swapped = bnsurgery.swap(_model(), "groupnorm", calibrate=endless(), calibrate_batches=2)
    assert isinstance(swapped.bn1, nn.GroupNorm)
    assert bnsurgery.last_report(swapped).calibrated


def test_a_batch_that_raises_midway_restores_the_swap():
    model = _model()
    before = _state(model)

    def flaky():
        yield _samples()[:3]
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        bnsurgery.swap(model, "groupnorm", calibrate=flaky())
    _assert_unchanged(model, before)


def test_a_model_deepcopy_is_not_needed_for_safety():
    """A failed recalibration leaves the very model usable: a clean pass afterwards equals a
    clean pass on a copy that never saw the bad data."""
    model = _model()
    twin = copy.deepcopy(model)
    with pytest.raises(DataError):
        bnsurgery.recalibrate(model, _batches("huge_values"))
    clean = _batches("clean")
    bnsurgery.recalibrate(model, clean)
    bnsurgery.recalibrate(twin, clean)
    for key, value in twin.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
