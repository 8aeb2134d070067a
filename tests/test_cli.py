"""The command line: end to end, and every bad input gives one line and a documented code."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import bnsurgery
from bnsurgery.cli import main
from bnsurgery.errors import (
    NothingToDoError,
    OutputError,
    SourceError,
    UnsafePickleError,
    UsageError,
)

from .conftest import output


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(err, code, expected_code):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, bnsurgery.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "bnsurgery", "--help"], capture_output=True, text=True, check=True
    )
    assert "fold" in result.stdout and "inspect" in result.stdout
    assert time.perf_counter() - start < 5


def test_fold_spec_end_to_end(tmp_path, capsys):
    out = tmp_path / "r18.safetensors"
    code, stdout, err = run(capsys, "fold", "timm:resnet18", "-o", out, "--input-size", "3,64,64")
    assert code == 0, err
    assert "folded 20 of 20" in stdout and f"wrote {out}" in err
    model = bnsurgery.load(out)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fold_state_dict_file_keeps_input_and_writes_beside_it(tmp_path, capsys):
    from bnsurgery.testing import randomize_bn

    reference = randomize_bn(bnsurgery.load("torchvision:resnet18")).eval()
    src = tmp_path / "weights.pth"
    torch.save({"state_dict": reference.state_dict()}, src)
    before = digest(src)
    code, stdout, err = run(capsys, "fold", src, "--arch", "torchvision:resnet18", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["folded_count"] == report["bn_count"] == 20 and report["verified"]
    assert digest(src) == before
    folded = bnsurgery.load(tmp_path / "weights.folded.safetensors").eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(output(folded, x), output(reference, x), rtol=1e-4, atol=1e-4)


def test_inspect_table_and_json(capsys):
    code, stdout, _ = run(capsys, "inspect", "tests.models:simple_cnn", "--input-size", "3,16,16")
    assert code == 0 and "bn1" in stdout and "into conv1 (producer)" in stdout
    code, stdout, _ = run(capsys, "inspect", "timm:resnet18", "--json")
    data = json.loads(stdout)
    assert data["bn_count"] == 20 and data["fold_method"] == "runtime"
    assert "never trained (num_batches_tracked == 0)" in data["layers"][0]["health"]


def test_model_without_bn_is_a_clean_no_op(tmp_path, capsys):
    code, _, err = run(capsys, "fold", "torch.nn:Identity", "-o", tmp_path / "x.safetensors")
    assert code == NothingToDoError.exit_code and err.startswith("nothing to do: ")
    assert "no BatchNorm layer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


@pytest.fixture
def saved(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    path = tmp_path / "full.pt"
    torch.save(model, path)
    return path


def _bad_cases(tmp_path, saved):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(7, 256)) * 4)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    zipped = tmp_path / "notes.zip"
    import zipfile

    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("notes.txt", "hello")
    sd = tmp_path / "sd.pt"
    torch.save(bnsurgery.load("timm:resnet18").state_dict(), sd)
    return [
        (["fold", tmp_path / "missing.pt"], SourceError, None),
        (["fold", tmp_path], SourceError, None),
        (["fold", empty], SourceError, empty),
        (["fold", garbage], SourceError, garbage),
        (["fold", zipped], SourceError, zipped),
        (["fold", saved], UnsafePickleError, saved),
        (["fold", sd], UsageError, sd),
        (["fold", sd, "--arch", "timm:resnet34"], SourceError, sd),
        (
            ["fold", sd, "--arch", "timm:resnet18", "-o", tmp_path / "no" / "x.safetensors"],
            OutputError,
            sd,
        ),
        (["fold", sd, "--arch", "timm:resnet18", "-o", sd], OutputError, sd),
        (["fold", sd, "--arch", "timm:resnet18", "-o", tmp_path / "x.weird"], UsageError, sd),
        (["fold", "tests.models:simple_cnn"], UsageError, None),
        (["fold", "timm:resnet18", "--input-size", "3,a"], UsageError, None),
        (["fold", "--nonsense"], None, None),
        (
            [
                "fold",
                saved,
                "--trust-pickle",
                "-o",
                tmp_path / "y.safetensors",
                "--input-size",
                "3,8,8",
            ],
            UsageError,
            saved,
        ),
    ]


def test_bad_inputs_one_line_documented_code_input_untouched(tmp_path, saved, capsys):
    for args, error, source in _bad_cases(tmp_path, saved):
        before = digest(source) if source else None
        listing = sorted(p.name for p in tmp_path.iterdir())
        code, _, err = run(capsys, *args)
        assert_one_line_error(err, code, error.exit_code if error else 2)
        if source:
            assert digest(source) == before, args
        assert sorted(p.name for p in tmp_path.iterdir()) == listing, f"{args} wrote a file"


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = run(
        capsys, "fold", "tests.models:simple_cnn", "--input-size", "3,8,8", "-o", out
    )
    assert_one_line_error(err, code, OutputError.exit_code)
    assert out.read_bytes() == b"keep me"
    code, _, err = run(
        capsys, "fold", "tests.models:simple_cnn", "--input-size", "3,8,8", "-o", out, "--force"
    )
    assert code == 0, err
    assert bnsurgery.load(out, arch="tests.models:simple_cnn") is not None


def test_swap_choices_are_the_registry():
    """``--to`` lists its names without importing torch; they must be the registry's."""
    from bnsurgery.cli import SWAP_TARGETS
    from bnsurgery.targets import TARGETS

    assert tuple(TARGETS) == SWAP_TARGETS


def test_nothing_to_do_comes_after_the_report(tmp_path, capsys):
    """Every writing command renders its report first, then stops: unfreeze too."""
    out = tmp_path / "u.safetensors"
    code, stdout, err = run(capsys, "unfreeze", "tests.models:simple_cnn", "-o", out)
    assert code == NothingToDoError.exit_code and err.startswith("nothing to do: ")
    assert "not frozen by bnsurgery" in stdout and "unfroze 0 BN layers" in stdout
    assert not out.exists()
