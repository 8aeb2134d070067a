"""--dry-run on every command that writes: the whole surgery runs and reports, every check
(outputs included) happens, and nothing is written."""

from __future__ import annotations

import pytest
import torch

import bnsurgery
from bnsurgery.cli import main

from .conftest import prepared

ARCH = "tests.models:keyword_tutorial"

COMMANDS = {
    "fold": ["--input-size", "3,4,4"],
    "freeze": [],
    "unfreeze": [],
    "swap": ["--to", "groupnorm"],
    "swap_repair": ["--to", "layernorm", "--calibrate", "{data}"],
    "recalibrate": ["--data", "{data}", "--plot", "{tmp}/drift.png"],
}


@pytest.fixture
def sources(tmp_path):
    net = prepared(bnsurgery.load(ARCH))
    plain = bnsurgery.save(net, tmp_path / "net.safetensors")
    frozen = bnsurgery.save(bnsurgery.freeze(net), tmp_path / "frozen.safetensors")
    torch.save(torch.randn(6, 3, 4, 4), tmp_path / "d.pt")
    return plain, frozen, tmp_path / "d.pt"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_dry_run_reports_and_writes_nothing(command, sources, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plain, frozen, data = sources
    source = frozen if command == "unfreeze" else plain
    extra = [a.format(data=data, tmp=tmp_path) for a in COMMANDS[command]]
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [command.split("_")[0], str(source), "--arch", ARCH, *extra]
    code = main([*args, "-o", str(tmp_path / "out.safetensors"), "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "dry run: would write" in captured.err and "nothing written" in captured.err
    assert captured.out.strip()  # the report
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_dry_run_still_checks_the_output(sources, tmp_path, capsys):
    plain, _, _ = sources
    code = main(["fold", str(plain), "--arch", ARCH, "-o", str(plain), "--dry-run"])
    assert code == 5  # the output is the input: refused before any work, dry run or not
    assert "nothing written" not in capsys.readouterr().err
