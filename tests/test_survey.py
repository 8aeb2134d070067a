"""survey (bnsurgery inspect): read-only, with health flags and the fold plan."""

from __future__ import annotations

import copy

import timm.layers
import torch
import torchvision
from torch import nn

import bnsurgery
from bnsurgery.report import survey_text, to_json

from . import models
from .conftest import prepared


def test_health_flags_and_states():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.Conv2d(4, 4, 3),
        torchvision.ops.misc.FrozenBatchNorm2d(4),
        nn.Conv2d(4, 4, 3),
        timm.layers.BatchNormAct2d(4, act_layer=nn.GELU),
    )
    with torch.no_grad():
        model[1].running_var[0] = float("nan")
        model[1].running_var[1] = 0.0
        model[1].num_batches_tracked.fill_(5)
    model[7].eval()
    model[7].weight.requires_grad_(False)
    model[7].bias.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    result = bnsurgery.survey(model, torch.randn(2, 3, 16, 16))
    info = {i.name: i for i in result.layers}
    assert "NaN in running var" in info["1"].health
    assert "running var near zero in 1 channels" in info["1"].health
    assert not any("never trained" in h for h in info["1"].health)
    assert info["3"].health == ("no running statistics (track_running_stats=False)",)
    assert info["3"].fold.startswith("left: ") and "track_running_stats" in info["3"].fold
    assert info["5"].frozen and info["5"].type == "FrozenBatchNorm2d"
    assert info["7"].frozen and info["7"].activation == "GELU" and not info["7"].training
    assert info["1"].training and not info["1"].frozen and info["1"].channels == 4
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0, equal_nan=True)
    assert "NaN in running var" in survey_text(result)
    assert '"bn_count": 4' in to_json(result)


def test_survey_without_inputs_reports_why_no_plan():
    result = bnsurgery.survey(prepared(models.DataDependent()))
    assert result.fold_error and "example_inputs" in result.fold_error
    assert result.layers[0].fold == "unknown: no fold plan"


def test_survey_of_torchscript_lists_layers():
    scripted = torch.jit.script(models.SimpleCNN())
    result = bnsurgery.survey(scripted)
    assert [(i.name, i.type) for i in result.layers] == [("bn1", "BatchNorm2d")]
    assert "TorchScript" in result.fold_error
