"""Reports read well: str(report) is the short table the command line prints, for every
surgery, and to_dict() is for scripts."""

from __future__ import annotations

import json

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
