"""Reports read well: str(report) is the short table the command line prints, for every
surgery, and to_dict() is for scripts."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

import bnsurgery
from bnsurgery.report import to_json

from .conftest import prepared
from .models import KeywordTutorial

X = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))

SURGERIES = {
    "fold": lambda m: bnsurgery.fold(m, X),
    "freeze": bnsurgery.freeze,
    "swap": lambda m: bnsurgery.swap(m, "groupnorm", calibrate=[X]),
    "recalibrate": lambda m: bnsurgery.recalibrate(m, [X]),
}


@pytest.mark.parametrize("surgery", list(SURGERIES))
def test_str_of_a_report_is_its_table(surgery):
    net = prepared(KeywordTutorial())
    SURGERIES[surgery](net)
    report = bnsurgery.last_report(net)
    text = str(report)
    assert "Report(" not in text and len(text) < 2000
    lines = text.splitlines()
    assert lines[0].split()[0] in ("bn", "name", "layer") and set(lines[1]) <= {"-", " "}
    assert "bn1d" in text
    assert json.loads(to_json(report))  # and the same report for scripts


def test_str_of_a_survey_is_the_inspect_table():
    text = str(bnsurgery.survey(prepared(KeywordTutorial()), X))
    assert text.splitlines()[0].split()[:3] == ["name", "type", "C"]
    assert "2 BN layers, 2 foldable" in text


# ----------------------------------------------------------------------------- golden tables
# Reports built from known values, rendered at a fixed width: the exact text people read.


def _golden_reports():
    from bnsurgery.folding import FoldReport
    from bnsurgery.foldplan import FoldEdit
    from bnsurgery.freezing import FreezeReport
    from bnsurgery.plan import Skip
    from bnsurgery.recalibration import LayerDrift, RecalibrationReport
    from bnsurgery.swapping import Swapped, SwapReport

    left = [
        Skip("head.bn", "its output goes to add(), not to a conv or linear"),
        Skip("x", "not selected"),
    ]
    edit = FoldEdit("stem.bn", "stem.conv", "producer", "conv", 1, True)
    return {
        "fold": FoldReport(
            "fold", ["stem.bn"], left, ["a note"], folded=[edit], method="runtime",
            bn_count=3, verified=True, max_rel_error=1.5e-7, tolerance=1e-4,
        ),
        "freeze": FreezeReport("freeze", ["stem.bn"], left, train_affine=True),
        "swap": SwapReport(
            "swap", ["stem.bn"], left, target="groupnorm", calibrated=True,
            swapped=[Swapped("stem.bn", "BatchNorm2d", "GroupNorm", "groups=8", 0.25, 0.125)],
        ),
        "recalibrate": RecalibrationReport(
            "recalibrate", ["stem.bn"], left, mode="exact", batches=4,
            layers=[LayerDrift("stem.bn", 512, 0.0123, 0.5)],
        ),
    }  # fmt: skip


GOLDEN = pathlib.Path(__file__).parent / "golden"


@pytest.mark.parametrize("surgery", ["fold", "freeze", "swap", "recalibrate"])
def test_golden_tables(surgery, monkeypatch):
    """The exact text of each report (tests/golden/report_*.txt); a deliberate change of the
    layout is made there, where a reviewer sees it."""
    monkeypatch.setenv("COLUMNS", "120")
    expected = (GOLDEN / f"report_{surgery}.txt").read_text()
    assert str(_golden_reports()[surgery]) + "\n" == expected


def test_golden_plan_table(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.BatchNorm2d(8)
    )
    assert str(bnsurgery.plan_swap(net, "groupnorm", include="1", groups=4)) == (
        "bn  plan\n"
        "--  -------------------------------------------\n"
        "1   -> groupnorm (groups=4, force_affine=False)\n"
        "plan: swap 1 BN layer, left 1 (1 not selected)"
    )
