"""Checkpoint layer: specs, safe round trips, wrappers, refusing pickles, atomic writes."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

import bnsurgery
from bnsurgery.checkpoint import atomic_write, default_output, output_format
from bnsurgery.errors import (
    OutputError,
    SourceError,
    UnsafeCodeError,
    UnsafePickleError,
    UsageError,
)
from bnsurgery.provenance import get_record
from bnsurgery.specs import parse_spec
from bnsurgery.statedicts import unwrap_state_dict

from .conftest import output, prepared


class _Payload:
    """Unpickling this creates a file: proof of code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_spec_parsing_and_errors():
    spec = parse_spec("timm:resnet18(num_classes=10, in_chans=1)")
    assert (spec.namespace, spec.name, spec.kwargs) == (
        "timm",
        "resnet18",
        {"num_classes": 10, "in_chans": 1},
    )
    assert str(spec) == "timm:resnet18(num_classes=10, in_chans=1)"
    with pytest.raises(UsageError):
        parse_spec("timm:resnet18(os.system('x'))")
    with pytest.raises(SourceError, match="did you mean"):
        bnsurgery.load("timm:resnet19x")
    with pytest.raises(SourceError, match="cannot import"):
        bnsurgery.load("no_such_package.mod:factory")


def test_safe_format_round_trip_rebuilds_folded_model(tmp_path):
    model = prepared(bnsurgery.load("timm:resnet18(num_classes=7)"))
    x = torch.randn(2, 3, 64, 64)
    bnsurgery.fold(model, x)
    path = bnsurgery.save(model, tmp_path / "m.safetensors")
    loaded = bnsurgery.load(path).eval()
    assert torch.equal(output(model, x), output(loaded, x))
    record = get_record(loaded)
    assert record["arch"] == "timm:resnet18(num_classes=7)"
    assert record["steps"][0]["op"] == "fold" and record["steps"][0]["verified"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())


def test_state_dict_wrappers_and_prefixes(tmp_path):
    model = prepared(bnsurgery.load("torchvision:resnet18"))
    wrapped = {
        "epoch": 3,
        "model": {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()},
    }
    torch.save(wrapped, tmp_path / "ckpt.pth")
    loaded = bnsurgery.load(tmp_path / "ckpt.pth", arch="torchvision:resnet18").eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(output(model, x), output(loaded, x))
    assert set(unwrap_state_dict({"state_dict": {"a": torch.ones(1)}})) == {"a"}


def test_plain_safetensors_needs_arch(tmp_path):
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(3, 2))
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(UsageError, match="--arch"):
        bnsurgery.load(tmp_path / "w.safetensors")


def test_mismatched_weights_name_first_keys(tmp_path):
    torch.save(bnsurgery.load("timm:resnet18").state_dict(), tmp_path / "r18.pt")
    with pytest.raises(SourceError, match=r"missing keys \(first layer1\.2"):
        bnsurgery.load(tmp_path / "r18.pt", arch="timm:resnet34")
    with pytest.raises(SourceError, match=r"shape mismatches, first fc\.weight"):
        bnsurgery.load(tmp_path / "r18.pt", arch="timm:resnet18(num_classes=3)")


def test_pickled_payload_is_not_run_without_the_flag(tmp_path):
    marker = tmp_path / "pwned"
    for name, writer in {
        "torch.pt": lambda p: torch.save({"x": _Payload(marker)}, p),
        "raw.pkl": lambda p: p.write_bytes(pickle.dumps(_Payload(marker), protocol=4)),
    }.items():
        writer(tmp_path / name)
        with pytest.raises(UnsafePickleError, match="--trust-code"):
            bnsurgery.load(tmp_path / name)
        assert not marker.exists()


def test_full_module_pickle_needs_trust(tmp_path):
    torch.save(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), tmp_path / "full.pt")
    with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules"):
        bnsurgery.load(tmp_path / "full.pt")
    assert isinstance(bnsurgery.load(tmp_path / "full.pt", trust_pickle=True), nn.Sequential)


@pytest.mark.parametrize("name", ["m.ts", "renamed.pth", "renamed.safetensors"])
def test_torchscript_source_loads_only_with_trust(tmp_path, name):
    """TorchScript runs code when loaded: whatever its suffix, it needs trust_code."""
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    scripted.save(str(tmp_path / name))
    with pytest.raises(UnsafeCodeError, match="TorchScript"):
        bnsurgery.load(tmp_path / name)
    assert isinstance(bnsurgery.load(tmp_path / name, trust_code=True), torch.jit.ScriptModule)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(bytes(range(7, 256)) * 3), "not a PyTorch checkpoint"),
    ],
)
def test_bad_sources(tmp_path, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(SourceError, match=message):
        bnsurgery.load(path)


def test_truncated_safetensors(tmp_path):
    model = bnsurgery.load("timm:resnet18")
    path = bnsurgery.save(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError):
        bnsurgery.load(tmp_path / "cut.safetensors")


def test_save_refuses_overwrite_missing_folder_and_unknown_arch(tmp_path):
    model = bnsurgery.load("timm:resnet18")
    path = bnsurgery.save(model, tmp_path / "m.safetensors")
    with pytest.raises(OutputError, match="--force"):
        bnsurgery.save(model, path)
    bnsurgery.save(model, path, force=True)
    with pytest.raises(OutputError, match="does not exist"):
        bnsurgery.save(model, tmp_path / "missing" / "m.safetensors")
    with pytest.raises(UsageError, match="architecture"):
        bnsurgery.save(nn.Linear(2, 2), tmp_path / "x.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left"):
        atomic_write(tmp_path / "out.safetensors", failing)
    assert os.listdir(tmp_path) == []


def test_read_only_folder(tmp_path, monkeypatch):
    # Simulated: tests may run as root, which ignores folder permissions.
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=r"cannot write .*Permission denied"):
        bnsurgery.save(bnsurgery.load("timm:resnet18"), tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_formats_follow_suffix(tmp_path):
    assert output_format("a.safetensors") == "safetensors"
    assert output_format("a.pt") == "pickle"
    assert output_format("a.ts") == "torchscript"
    assert output_format("a.bin", "safetensors") == "safetensors"
    with pytest.raises(UsageError):
        output_format("a.weird")
    assert default_output("timm:resnet18", "folded").name == "resnet18.folded.safetensors"
    src = tmp_path / "model.pth"
    src.write_bytes(b"x")
    assert default_output(str(src), "folded") == tmp_path / "model.folded.safetensors"


def test_torchscript_and_pickle_outputs(tmp_path):
    model = prepared(bnsurgery.load("timm:resnet18"))
    x = torch.randn(1, 3, 64, 64)
    bnsurgery.fold(model, x)
    bnsurgery.save(model, tmp_path / "m.ts", example_inputs=x)
    bnsurgery.save(model, tmp_path / "m.pt")
    scripted = bnsurgery.load(tmp_path / "m.ts", trust_code=True)
    pickled = bnsurgery.load(tmp_path / "m.pt", trust_code=True)
    reference = output(model, x)
    assert torch.allclose(output(scripted, x), reference, atol=1e-5)
    assert torch.equal(output(pickled.eval(), x), reference)


def test_outputs_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = bnsurgery.save(bnsurgery.load("timm:resnet18"), tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
