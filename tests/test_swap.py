"""swap: every target over seeds and zoo models, norm-act kept, exact round trips, repair."""

from __future__ import annotations

import copy

import pytest
import timm.layers
import torch
from torch import nn

import bnsurgery
from bnsurgery.errors import UsageError
from bnsurgery.norms import iter_batchnorms

from . import models
from .conftest import output, prepared

ZOO = [
    ("timm:resnet18", (3, 32, 32)),
    ("timm:efficientnet_b0", (3, 32, 32)),
    ("timm:mobilenetv3_small_050", (3, 32, 32)),
    ("timm:regnety_002", (3, 32, 32)),
    ("torchvision:mobilenet_v2", (3, 32, 32)),
    ("torchvision:shufflenet_v2_x0_5", (3, 32, 32)),
]
CASES = [(name, factory, size) for name, (factory, size) in models.SEEDS.items()] + [
    (spec, lambda spec=spec: bnsurgery.load(spec), size) for spec, size in ZOO
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("to", ["groupnorm", "layernorm"])
@pytest.mark.parametrize("name, factory, size", CASES, ids=IDS)
def test_no_bn_left_shapes_kept_and_batch_one_trains(name, factory, size, to):
    model = prepared(factory())
    x = torch.randn(2, *size)
    shape = output(model, x).shape
    bnsurgery.swap(model, to)
    assert not list(iter_batchnorms(model))
    assert output(model.eval(), x).shape == shape
    model.train()
    out = model(x[:1])
    out.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("name, factory, size", CASES, ids=IDS)
def test_frozen_is_exact_and_sync_round_trip_keeps_state(name, factory, size):
    model = prepared(factory())
    x = torch.randn(2, *size)
    frozen = bnsurgery.swap(copy.deepcopy(model), "frozen")
    torch.testing.assert_close(output(frozen.eval(), x), output(model, x), rtol=0, atol=0)
    there_and_back = bnsurgery.swap(
        bnsurgery.swap(copy.deepcopy(model), "syncbatchnorm"), "batchnorm"
    )
    assert repr(there_and_back) == repr(model)
    expected, got = model.state_dict(), there_and_back.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_norm_act_layers_keep_activation_and_drop():
    bn = timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=nn.Dropout)
    for to, cls in [
        ("groupnorm", timm.layers.GroupNormAct),
        ("layernorm", timm.layers.LayerNormAct2d),
    ]:
        model = bnsurgery.swap(nn.Sequential(nn.Conv2d(3, 8, 3), copy.deepcopy(bn)), to)
        assert isinstance(model[1], cls)
        assert isinstance(model[1].act, nn.SiLU) and isinstance(model[1].drop, nn.Dropout)
    model = bnsurgery.swap(nn.Sequential(nn.Conv2d(3, 8, 3), copy.deepcopy(bn)), "identity")
    assert isinstance(model[1].act, nn.SiLU)


def test_new_norm_carries_affine_eps_dtype_device_and_requires_grad():
    bn = nn.BatchNorm2d(72, eps=1e-3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    bn.bias.requires_grad_(False)
    model = bnsurgery.swap(nn.Sequential(bn), "groupnorm")
    gn = model[0]
    assert gn.num_groups == 24 and gn.eps == 1e-3 and gn.weight.dtype == torch.float64
    assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
    assert gn.weight.requires_grad and not gn.bias.requires_grad
    assert (
        bnsurgery.swap(nn.Sequential(nn.BatchNorm2d(72)), "groupnorm", groups=8)[0].num_groups == 8
    )
    assert (
        bnsurgery.swap(nn.Sequential(nn.BatchNorm2d(72)), "groupnorm", group_size=4)[0].num_groups
        == 18
    )
    with pytest.raises(UsageError, match="does not divide"):
        bnsurgery.swap(nn.Sequential(nn.BatchNorm2d(72)), "groupnorm", groups=7)


def test_layernorm_on_features_and_on_vectors():
    model = bnsurgery.swap(models.SimpleMLP(), "layernorm")
    x = torch.randn(3, 10)
    expected = torch.relu(
        nn.functional.layer_norm(model.fc(x), (5,), model.bn.weight, model.bn.bias)
    )
    torch.testing.assert_close(model(x), expected)
    conv = bnsurgery.swap(models.SimpleCNN(), "layernorm")
    y = conv.conv1(torch.randn(2, 3, 8, 8))
    normed = conv.bn1(y)
    torch.testing.assert_close(normed.mean(1), torch.zeros_like(normed.mean(1)), atol=1e-5, rtol=0)


def test_unknown_target_and_callable():
    with pytest.raises(UsageError, match="valid: groupnorm, layernorm"):
        bnsurgery.swap(models.SimpleCNN(), "groupnrm")
    model = bnsurgery.swap(models.SimpleCNN(), lambda bn: nn.GroupNorm(1, bn.num_features))
    assert isinstance(model.bn1, nn.GroupNorm)


def test_repair_on_calibration_data_fits_clearly_better():
    torch.manual_seed(0)
    model = prepared(bnsurgery.load("timm:resnet18(num_classes=10)"))
    data = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    x = torch.randn(8, 3, 32, 32)
    reference = output(model, x)

    def error(m):
        return float((output(m.eval(), x) - reference).norm() / reference.norm())

    plain = bnsurgery.swap(copy.deepcopy(model), "groupnorm")
    repaired = bnsurgery.swap(copy.deepcopy(model), "groupnorm", calibrate=data)
    assert error(repaired) < 0.5 * error(plain)
    report = bnsurgery.last_report(repaired)
    fitted = [s for s in report.swapped if s.fit_error_after is not None]
    assert len(fitted) == 20 and all(s.fit_error_after <= s.fit_error_before + 1e-9 for s in fitted)
    with pytest.raises(UsageError, match="valid with"):
        bnsurgery.swap(copy.deepcopy(model), "frozen", calibrate=data)


def test_swapped_checkpoint_rebuilds(tmp_path):
    model = prepared(bnsurgery.load("timm:efficientnet_b0(num_classes=4)"))
    bnsurgery.swap(model, "groupnorm", group_size=8, exclude="bn1")
    path = bnsurgery.save(model, tmp_path / "gn.safetensors")
    loaded = bnsurgery.load(path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(output(loaded.eval(), x), output(model.eval(), x), rtol=0, atol=0)
    custom = bnsurgery.swap(models.SimpleCNN(), lambda bn: nn.Identity())
    with pytest.raises(UsageError, match="custom callable"):
        bnsurgery.save(custom, tmp_path / "c.safetensors", arch="tests.models:simple_cnn")


def test_cli_swap(tmp_path, capsys):
    from bnsurgery.cli import main

    torch.save(torch.randn(12, 3, 32, 32), tmp_path / "calib.pt")
    out = tmp_path / "gn.safetensors"
    args = ["swap", "timm:resnet18", "--to", "groupnorm", "--calibrate", str(tmp_path / "calib.pt")]
    assert main([*args, "--batch-size", "4", "-o", str(out)]) == 0
    assert "repaired on calibration data" in capsys.readouterr().out
    assert not list(iter_batchnorms(bnsurgery.load(out)))
    assert (
        main(["swap", "timm:resnet18", "--to", "nope", "-o", str(tmp_path / "x.safetensors")]) == 2
    )


PLACEMENTS = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.ReLU()), (3, 12)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(3, 8, 3), nn.BatchNorm3d(8)), (3, 6, 6, 6)),
    "convtranspose": (
        lambda: nn.Sequential(nn.ConvTranspose2d(3, 8, 3, stride=2), nn.BatchNorm2d(8)),
        (3, 5, 5),
    ),
    "linear": (lambda: nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU()), (6,)),
    "affine_false": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False)),
        (3, 6, 6),
    ),
    "norm_act": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU)),
        (3, 6, 6),
    ),
}


@pytest.mark.parametrize("to", ["groupnorm", "layernorm", "instancenorm", "identity", "frozen"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_placements_for_every_target(placement, to):
    factory, size = PLACEMENTS[placement]
    model = prepared(factory())
    x = torch.randn(2, *size)
    shape = output(model, x).shape
    sees_sequences = to == "instancenorm" and placement == "conv1d"
    bnsurgery.swap(model, to, dims="1d" if sees_sequences else None)
    report = bnsurgery.last_report(model)
    if to == "instancenorm" and placement == "linear":
        assert "(N, C) vectors" in report.left[0][1]
        return
    assert len(report.swapped) == 1 and not report.left
    assert output(model.eval(), x).shape == shape
    out = model.train()(x[:1])
    if out.requires_grad:
        out.mean().backward()
