"""bnsurgery.tensorfiles: opening a file of tensors by its kind, with the safety rules of
bnsurgery.trust (what a file may cause depends on its kind and the user's flags only)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bnsurgery.errors import DataError, SourceError, UnsafeCodeError
from bnsurgery.tensorfiles import (
    check_readable,
    read_npy,
    read_safetensors,
    read_tensors,
    read_torch_file,
    safetensors_header,
)
from bnsurgery.trust import Trust

from .hostile import Payload

X = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)


# --------------------------------------------------------------------------- check_readable


def test_check_readable_accepts_a_regular_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"x")
    assert check_readable(path) is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "custom missing"),
        (lambda p: p.mkdir(), "custom folder"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: os.mkfifo(p), "is not a regular file"),
    ],
    ids=["missing", "folder", "empty", "fifo"],
)
def test_check_readable_refuses(tmp_path, make, message):
    path = tmp_path / "x.pt"
    make(path)
    with pytest.raises(SourceError) as info:
        check_readable(path, missing="custom missing", directory="custom folder")
    assert str(info.value) == f"{path}: {message}"


def test_check_readable_refuses_an_unreadable_file(tmp_path, monkeypatch):
    # simulated: tests may run as root, for whom every file is readable
    path = tmp_path / "x.pt"
    path.write_bytes(b"x")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p == path else real(p, mode))
    with pytest.raises(SourceError, match="is not readable"):
        check_readable(path)


# ------------------------------------------------------------------------------ each kind


def test_npy_is_read_as_a_tensor(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, X.numpy().astype(">f8"))  # big-endian float64: native order after reading
    value = read_tensors(path, contents="the data")
    assert value.dtype == torch.float64 and value.shape == (2, 3, 4)
    assert torch.equal(value, X.double())


def test_npy_object_arrays_are_refused_even_when_trusted(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "objects.npy"
    np.save(path, np.array([Payload(marker), 1], dtype=object), allow_pickle=True)
    for trust in (None, Trust(), Trust(code=True)):
        with pytest.raises(UnsafeCodeError, match="pickled Python objects") as info:
            read_tensors(path, contents="the data", trust=trust)
        assert "--trust-code" not in str(info.value)  # the flag would not help
    assert not marker.exists()


def test_npy_of_strings_is_a_data_error(tmp_path):
    path = tmp_path / "words.npy"
    np.save(path, np.array(["a", "b"]))
    with pytest.raises(DataError, match="<U1 values, not numbers"):
        read_npy(path)


def test_truncated_npy(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, X.numpy())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SourceError, match="truncated or corrupt"):
        read_tensors(path, contents="the data")


def test_safetensors_every_tensor_or_the_preferred_one(tmp_path):
    path = tmp_path / "x.safetensors"
    labels = torch.tensor([1, 2])
    save_file({"labels": labels, "images": X, "z": X + 1}, str(path))
    every = read_tensors(path, contents="the data")
    assert sorted(every) == ["images", "labels", "z"]
    assert torch.equal(every["images"], X) and torch.equal(every["labels"], labels)
    assert list(read_tensors(path, contents="the data", prefer=("x", "images"))) == ["images"]
    assert list(read_safetensors(path, prefer=("missing",))) == ["images"]  # the file's first


def test_safetensors_header_reads_no_data(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": X}, str(path), metadata={"k": "v"})
    assert safetensors_header(path) == ({"k": "v"}, {"w": (2, 3, 4)})
    path.write_bytes(path.read_bytes()[:-10])  # truncated data
    with pytest.raises(SourceError, match="not a valid safetensors file"):
        read_safetensors(path)


def test_torch_file_of_containers(tmp_path):
    path = tmp_path / "x.pt"
    torch.save((X, {"mask": X > 3}), path)
    args = read_tensors(path, contents="the data")
    assert isinstance(args, tuple) and torch.equal(args[0], X)
    assert torch.equal(args[1]["mask"], X > 3)


def test_random_bytes_are_not_a_tensor_file(tmp_path):
    path = tmp_path / "x.pt"  # the suffix says nothing: the content decides
    path.write_bytes(bytes(range(7, 256)) * 3)
    with pytest.raises(SourceError, match=r"not a tensor file \(.safetensors, .pt or .npy"):
        read_tensors(path, contents="the data")


# ------------------------------------------------------------------------- code, by trust


def test_pickles_run_only_with_trust(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "payload.pt"
    torch.save({"x": X, "p": Payload(marker)}, path)
    with pytest.raises(UnsafeCodeError) as never:  # a role whose files never run code
        read_tensors(path, contents="the calibration data")
    assert "save the calibration data as tensors" in str(never.value)
    assert "--trust-code" not in str(never.value)
    with pytest.raises(UnsafeCodeError) as untrusted:
        read_tensors(path, contents="the example inputs", trust=Trust())
    assert "pickled Python objects (it references" in str(untrusted.value)
    assert "pass --trust-code only if you trust its origin" in str(untrusted.value)
    assert not marker.exists()
    value = read_tensors(path, contents="the example inputs", trust=Trust(code=True))
    assert marker.exists() and torch.equal(value["x"], X)  # the control: it ran


def test_checkpoint_refusal_message(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "payload.pt"
    torch.save(Payload(marker), path)
    with pytest.raises(UnsafeCodeError, match="unpickling them runs code; it was not loaded"):
        read_torch_file(path, Trust())
    assert not marker.exists()


def test_torchscript_is_never_tensors(tmp_path):
    path = tmp_path / "program.safetensors"  # whatever its name says
    torch.jit.script(nn.Linear(2, 2)).save(str(path))
    with pytest.raises(UnsafeCodeError, match="holds a TorchScript program") as info:
        read_tensors(path, contents="the data", trust=Trust())
    assert "--trust-code" not in str(info.value)
    with pytest.raises(SourceError, match="is a TorchScript program, not the data") as trusted:
        read_tensors(path, contents="the data", trust=Trust(code=True))
    assert not isinstance(trusted.value, UnsafeCodeError)


def test_a_compressed_zip_is_refused_before_torch_reads_it(tmp_path, monkeypatch):
    import zipfile

    path = tmp_path / "x.pt"
    torch.save(X, path)
    squeezed = tmp_path / "squeezed.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(squeezed, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(SourceError, match="is compressed"):
        read_tensors(squeezed, contents="the data")
