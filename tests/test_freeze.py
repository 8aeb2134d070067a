"""freeze / unfreeze: frozen through train(), copies, saves, moves and compile; exact undo."""

from __future__ import annotations

import copy
import io
import os

import pytest
import timm.layers
import torch
import torch.distributed as dist
import torchvision
from torch import nn

import bnsurgery
from bnsurgery.errors import UsageError
from bnsurgery.frozen import FrozenBatchNorm
from bnsurgery.norms import iter_batchnorms

from . import models
from .conftest import prepared

ZOO = [
    ("timm:resnet18", (3, 64, 64)),
    ("timm:efficientnet_b0", (3, 64, 64)),
    ("timm:mobilenetv3_small_050", (3, 64, 64)),
    ("timm:regnety_002", (3, 64, 64)),
    ("timm:cspresnet50", (3, 64, 64)),
    ("torchvision:mobilenet_v2", (3, 64, 64)),
    ("torchvision:densenet121", (3, 64, 64)),
]
CASES = [(name, factory, size) for name, (factory, size) in models.SEEDS.items()] + [
    (spec, lambda spec=spec: bnsurgery.load(spec), size) for spec, size in ZOO
]


def bn_state(model):
    """Every BN buffer and parameter, by state-dict key."""
    names = {n for n, _ in iter_batchnorms(model)}
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.rpartition(".")[0] in names
    }


def train_step(model, batch):
    model.train()
    params = bnsurgery.trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-2)
    out = model(batch)
    out = out if isinstance(out, torch.Tensor) else out[0]
    out.mean().backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # random deep nets: keep the step finite
    opt.step()


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("name, factory, size", CASES, ids=[c[0] for c in CASES])
def test_train_step_leaves_frozen_bn_unchanged(name, factory, size, batch_size):
    model = prepared(factory())
    bnsurgery.freeze(model)
    frozen_before = bn_state(model)
    others_before = {
        k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen_before
    }
    x = torch.randn(batch_size, *size)
    train_step(model, x)
    after = model.state_dict()
    for k, v in frozen_before.items():
        assert torch.equal(after[k], v), f"{k} changed"
    moved = [
        k
        for k, v in others_before.items()
        if v.is_floating_point() and not torch.equal(after[k], v)
    ]
    assert moved, "the non-BN parameters should move"
    # each frozen BN's train-mode output equals its eval output (dropout elsewhere may differ)
    seen = []
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out: seen.append((mod, args[0].clone(), out.clone()))
        )
        for _, m in iter_batchnorms(model)
    ]
    with torch.no_grad():
        model.train()(x)
        for h in hooks:
            h.remove()
        assert seen
        for module, inp, train_out in seen:
            assert module.training
            torch.testing.assert_close(module.eval()(inp), train_out, rtol=0, atol=0)


@pytest.mark.parametrize("name, factory, size", CASES, ids=[c[0] for c in CASES])
def test_freeze_then_unfreeze_restores_exactly(name, factory, size):
    original = prepared(factory()).train()
    model = copy.deepcopy(original)
    bnsurgery.freeze(model)
    assert all(isinstance(m, FrozenBatchNorm) for _, m in iter_batchnorms(model))
    bnsurgery.unfreeze(model)
    assert repr(model) == repr(original)
    expected, got = original.state_dict(), model.state_dict()
    assert expected.keys() == got.keys()
    assert all(
        torch.equal(expected[k], got[k]) and expected[k].dtype == got[k].dtype for k in expected
    )
    for (n1, a), (n2, b) in zip(original.named_modules(), model.named_modules(), strict=True):
        assert n1 == n2 and type(a) is type(b) and a.training == b.training
        for attr in ("momentum", "eps", "affine", "track_running_stats"):
            assert getattr(a, attr, None) == getattr(b, attr, None), (n1, attr)
    for (n1, p), (_, q) in zip(original.named_parameters(), model.named_parameters(), strict=True):
        assert p.requires_grad == q.requires_grad, n1


def test_unfreeze_restores_requires_grad_and_flags_it_found():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01, eps=1e-3))
    model[1].bias.requires_grad_(False)
    model[1].eval()
    bnsurgery.freeze(model)
    bnsurgery.unfreeze(model.train())
    bn = model[1]
    assert type(bn) is nn.BatchNorm2d and bn.momentum == 0.01 and bn.eps == 1e-3
    assert bn.weight.requires_grad and not bn.bias.requires_grad and not bn.training


def test_survives_copies_pickles_state_dicts_moves_and_compile():
    model = prepared(models.sequential_model())
    bnsurgery.freeze(model)
    x = torch.randn(1, 3, 32, 32)
    reference = model.eval()(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    clones = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    for clone in clones:
        assert isinstance(clone[1], FrozenBatchNorm)
        torch.testing.assert_close(clone.train()(x), reference)
    # frozen checkpoint -> original architecture -> frozen again
    plain = models.sequential_model()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain.eval()(x), reference)
    refrozen = bnsurgery.freeze(models.sequential_model())
    refrozen.load_state_dict(plain.state_dict())
    torch.testing.assert_close(refrozen.train()(x), reference)
    # dtype moves keep it frozen, and unfreeze brings the dtype along
    double = copy.deepcopy(model).double().train()
    torch.testing.assert_close(double(x.double()).float(), reference, rtol=1e-4, atol=1e-5)
    bnsurgery.unfreeze(double)
    assert double[1].running_mean.dtype == torch.float64
    compiled = torch.compile(copy.deepcopy(model).train(), backend="aot_eager")
    torch.testing.assert_close(compiled(x), reference, rtol=1e-5, atol=1e-6)


def test_ddp_train_step_keeps_frozen_state():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = bnsurgery.freeze(prepared(models.SimpleCNN()))
        before = bn_state(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        train_step(ddp, torch.randn(1, 3, 8, 8))
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    finally:
        dist.destroy_process_group()


def test_bn_variants_norm_act_and_existing_frozen_layers():
    model = nn.Sequential(
        nn.Conv3d(2, 4, 1),
        nn.BatchNorm3d(4),
        nn.Flatten(2),
        nn.BatchNorm1d(4),
        nn.Unflatten(2, (2, 2, 2)),
        nn.Conv3d(4, 4, 1),
        nn.SyncBatchNorm(4),
        nn.Flatten(2),
        nn.Unflatten(2, (4, 2)),
        timm.layers.BatchNormAct2d(4, act_layer=nn.GELU),
        torchvision.ops.misc.FrozenBatchNorm2d(4),
        nn.BatchNorm2d(4, track_running_stats=False),
    )
    model = prepared(model)
    x = torch.randn(1, 2, 2, 2, 2)
    reference = model(x)
    bnsurgery.freeze(model)
    report = bnsurgery.last_report(model)
    assert report.changed == ["1", "3", "6", "9"]
    assert dict(report.left) == {
        "10": "already frozen (FrozenBatchNorm2d)",
        "11": "no running statistics (track_running_stats=False): it normalises with batch "
        "statistics",
    }
    assert isinstance(model[9].act, nn.GELU)
    model.train()
    model[11].eval()  # batch statistics of a 1-sample batch are another matter
    torch.testing.assert_close(model(x), reference)


def test_lazy_bn_is_left_with_a_clear_reason():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d(), nn.Conv2d(4, 4, 1))
    net.add_module("3", nn.BatchNorm2d(4))
    bnsurgery.freeze(net)
    report = bnsurgery.last_report(net)
    assert report.changed == ["3"]
    assert dict(report.left) == {"1": "an uninitialised lazy BN (run one forward pass first)"}
    assert isinstance(net[1], nn.LazyBatchNorm2d)


def test_stats_only_keeps_affine_trainable():
    model = prepared(models.SimpleCNN())
    bnsurgery.freeze(model, train_affine=True)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    weight = model.bn1.weight.detach().clone()
    train_step(model, torch.randn(1, 3, 8, 8))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert not torch.equal(model.bn1.weight, weight)
    assert any(p is model.bn1.weight for p in bnsurgery.trainable_parameters(model))


def test_selection_by_pattern_type_and_stage():
    model = bnsurgery.load("timm:resnet18")
    bnsurgery.freeze(model, include="layer1.*", exclude="layer1.1.*")
    assert bnsurgery.last_report(model).changed == ["layer1.0.bn1", "layer1.0.bn2"]
    model = bnsurgery.load("timm:resnet18")
    bnsurgery.freeze(model, stages=2)
    assert bnsurgery.last_report(model).changed[0] == "bn1"
    assert all(n == "bn1" or n.startswith("layer1.") for n in bnsurgery.last_report(model).changed)
    mixed = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Unflatten(1, (4, 1)), nn.BatchNorm1d(4)
    )
    bnsurgery.freeze(mixed, types=[nn.BatchNorm1d], exclude="3")
    assert bnsurgery.last_report(mixed).changed == ["1"]
    with pytest.raises(UsageError, match="nearest BN names"):
        bnsurgery.freeze(bnsurgery.load("timm:resnet18"), include="layer9.*")


def test_trainable_parameters_exclude_frozen_affine():
    model = bnsurgery.freeze(models.SimpleCNN())
    params = bnsurgery.trainable_parameters(model)
    assert {id(p) for p in params} == {id(model.conv1.weight), id(model.conv1.bias)}


def test_cli_freeze_writes_a_checkpoint_that_loads_frozen(tmp_path):
    from bnsurgery.cli import main

    out = tmp_path / "frozen.safetensors"
    assert (
        main(["freeze", "timm:resnet18", "--stats-only", "--include", "layer4*", "-o", str(out)])
        == 0
    )
    model = bnsurgery.load(out)
    frozen = [n for n, m in iter_batchnorms(model) if isinstance(m, FrozenBatchNorm)]
    assert frozen and all(n.startswith("layer4") for n in frozen)
    assert model.layer4[0].bn1.weight.requires_grad
    back = tmp_path / "back.safetensors"
    assert main(["unfreeze", str(out), "-o", str(back)]) == 0
    assert not any(isinstance(m, FrozenBatchNorm) for m in bnsurgery.load(back).modules())
