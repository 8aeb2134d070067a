"""recalibrate against first-principles statistics, with restoration and two processes."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import bnsurgery
from bnsurgery import recalibration
from bnsurgery.errors import UsageError

from .conftest import prepared


class DictNet(nn.Module):
    """Takes keyword inputs, has dropout between its BN layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(4, 5, 1)
        self.bn2 = nn.BatchNorm2d(5)

    def forward(self, image, scale=1.0):
        return self.bn2(self.conv2(self.drop(torch.relu(self.bn1(self.conv1(image * scale))))))


def reference_stats(model, batches):
    """Each BN's input over all batches, with BN normalising by batch statistics, dropout off."""
    with torch.no_grad():
        first, second = [], []
        for b in batches:
            y = model.conv1(b["image"] * b["scale"])
            first.append(y)
            y = F.batch_norm(y, None, None, model.bn1.weight, model.bn1.bias, True)
            second.append(model.conv2(torch.relu(y)))
    return [
        (t.mean((0, 2, 3)), t.var((0, 2, 3), unbiased=True))
        for t in (torch.cat(first), torch.cat(second))
    ]


def batches(seed=0, sizes=(7, 2, 5, 1)):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randn(n, 3, 9, 9, generator=g) * (i + 1) + i, "scale": 1.5}
        for i, n in enumerate(sizes)
    ]


def test_exact_statistics_with_uneven_dict_batches_and_dropout():
    torch.manual_seed(0)
    model = DictNet().train()
    params = {k: v.clone() for k, v in model.named_parameters()}
    data = batches()
    bnsurgery.recalibrate(model, data)
    for bn, (mean, var) in zip((model.bn1, model.bn2), reference_stats(model, data), strict=True):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 4
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert "forward" not in model.bn1.__dict__
    report = bnsurgery.last_report(model)
    assert report.batches == 4 and [layer.name for layer in report.layers] == ["bn1", "bn2"]
    assert all(layer.mean_kl > 0 for layer in report.layers)


def test_failing_batch_restores_everything():
    model = DictNet().eval()
    model.bn1.train()
    before = copy.deepcopy(model.state_dict())

    def data():
        yield from batches()[:2]
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        bnsurgery.recalibrate(model, data())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.bn1.training and not model.bn2.training and not model.training
    assert "forward" not in model.bn1.__dict__
    with pytest.raises(RuntimeError):
        bnsurgery.recalibrate(model, data(), mode="ema")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ema_mode_matches_train_mode_updates_with_dropout_off():
    torch.manual_seed(0)
    model = DictNet()
    data = batches()
    expected = copy.deepcopy(model).eval()
    expected.bn1.train()
    expected.bn2.train()
    for m in (expected.bn1, expected.bn2):
        m.momentum = 0.5
    with torch.no_grad():
        for b in data:
            expected(**b)
    bnsurgery.recalibrate(model, data, mode="ema", momentum=0.5)
    torch.testing.assert_close(model.state_dict(), expected.state_dict())
    assert model.bn1.momentum == 0.1


def test_num_batches_selection_tuples_and_errors():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
    )
    old = model[3].running_mean.clone()
    data = [(torch.randn(3, 1, 6, 6), torch.zeros(3)) for _ in range(4)]
    bnsurgery.recalibrate(model, data, num_batches=2, include="1")
    assert bnsurgery.last_report(model).batches == 2
    assert torch.equal(model[3].running_mean, old)
    with pytest.raises(UsageError, match="no batch"):
        bnsurgery.recalibrate(model, [])
    with pytest.raises(UsageError, match="unknown mode"):
        bnsurgery.recalibrate(model, data, mode="fast")
    bnsurgery.recalibrate(model, data, autocast=torch.bfloat16)
    assert torch.isfinite(model[1].running_var).all()


def _rank(rank, world, port, shards, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DictNet()
        bnsurgery.recalibrate(model, shards[rank])
        torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_over_the_union(tmp_path):
    data = batches(sizes=(7, 2, 5, 1, 3))
    shards = [data[:3], data[3:]]
    mp.spawn(_rank, args=(2, 29561, shards, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = DictNet()
    bnsurgery.recalibrate(single, data)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), f"ranks differ at {key}"
    torch.testing.assert_close(states[0], single.state_dict(), rtol=1e-6, atol=1e-6)


def test_cli_recalibrate_from_tensor_file_and_image_folder(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from bnsurgery.cli import main

    np.save(
        tmp_path / "calib.npy",
        np.random.default_rng(0).normal(size=(10, 3, 16, 16)).astype("float32"),
    )
    for i in range(5):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    for data, out, expected in (
        (tmp_path / "calib.npy", "a.safetensors", 3),
        (tmp_path / "images", "b.safetensors", 2),
    ):
        code = main(
            ["recalibrate", "timm:resnet18", "--data", str(data), "--batch-size", "4",
             "--input-size", "3,16,16", "-o", str(tmp_path / out)]
        )  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert f"recalibrated 20 BN layers over {expected} batches" in captured.out
        model = bnsurgery.load(tmp_path / out)
        assert int(model.bn1.num_batches_tracked) == expected
    code = main(["recalibrate", "timm:resnet18", "--data", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1 and "no such file or folder" in err


def test_channels_last_pass_restores_the_layout_and_matches_the_default_layout():
    """On the CPU the pass runs 2-D convnets in channels-last format (much faster): the
    statistics match a pass in the default layout, and the model's layout is restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model.append(nn.BatchNorm2d(4))
    data = [torch.randn(n, 3, 12, 12) * 3 + 1 for n in (5, 2, 7)]
    params = {k: (v.clone(), v) for k, v in model.named_parameters()}
    fast = bnsurgery.recalibrate(copy.deepcopy(model), data)
    plain = bnsurgery.recalibrate(copy.deepcopy(model), data, channels_last=False)
    for key in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
        torch.testing.assert_close(fast.state_dict()[key], plain.state_dict()[key])
    bnsurgery.recalibrate(model, data)
    for name, param in model.named_parameters():
        value, same = params[name]
        assert param is same and torch.equal(param, value) and param.is_contiguous(), name


class Shapes(nn.Module):
    """BN inputs of every kind: the model's input itself (bn0), a conv output only the BN
    reads (bn1), a conv output the residual reads too (bn2), a linear output only the BN reads
    (bn3)."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.fc, self.bn3 = nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn1(self.conv1(self.bn0(x))).relu()
        z = self.conv2(y)
        y = self.bn2(z) + z
        return self.bn3(self.fc(y.mean((2, 3))))


def _in_place_calls(monkeypatch) -> list[int]:
    """The channel counts of the BNs that normalise in place, call by call."""
    from bnsurgery import moments

    calls: list[int] = []
    original = moments.batch_normalised

    def spy(x, *args, in_place=False):
        if in_place:
            calls.append(x.shape[1])
        return original(x, *args, in_place=in_place)

    monkeypatch.setattr(moments, "batch_normalised", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_bn_alone_reading_its_layers_output_normalises_it_in_place(monkeypatch, dtype):
    """On the CPU a BN whose input only it reads (the graph walk: a layer's output, no other
    reader, no hook) normalises it in place, which saves allocating a new tensor; the
    statistics are those of the pass without it, the batches are untouched, and a BN reading
    the model's input or a tensor another layer reads too does not."""
    torch.manual_seed(0)
    model = prepared(Shapes()).to(dtype)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 3, 8, 8, generator=g) * 3 + 2).to(dtype) for n in (5, 3, 6)]
    copies = [b.clone() for b in data]
    calls = _in_place_calls(monkeypatch)
    fast = bnsurgery.recalibrate(copy.deepcopy(model), data)
    assert sorted(set(calls)) == [4, 6] and len(calls) == 2 * len(data)  # bn1 and bn3
    assert all(torch.equal(a, b) for a, b in zip(data, copies, strict=True))
    # the walk goes through the pass's own feed: (inputs, labels), keyword batches, forward=
    labelled = [(b, torch.zeros(len(b))) for b in data]
    keyword = [{"x": b} for b in data]
    for batches, forward in ((labelled, None), (keyword, None), (keyword, lambda m, b: m(b["x"]))):
        calls.clear()
        again = bnsurgery.recalibrate(copy.deepcopy(model), batches, forward=forward)
        assert len(calls) == 2 * len(data)
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in fast.state_dict().items())
    calls.clear()
    monkeypatch.setattr(recalibration, "_normalised_in_place", lambda *args: set())
    plain = bnsurgery.recalibrate(model, data)
    assert calls == []
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[key], value, **tol, msg=key)


def test_nothing_in_place_where_a_hook_or_a_data_dependent_branch_could_see_it(monkeypatch):
    """A forward hook on the conv sees the conv's output as the model made it, not normalised;
    a model that branches on values may read a tensor on another batch's path: neither
    normalises in place."""
    torch.manual_seed(0)
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    calls = _in_place_calls(monkeypatch)
    model = prepared(Shapes())
    kept: list[torch.Tensor] = []
    model.conv1.register_forward_hook(lambda m, a, out: kept.append(out))
    bnsurgery.recalibrate(model, data)
    assert 4 in calls and 6 not in calls  # bn3 still in place; bn1 not
    with torch.no_grad():
        raw = [model.conv1(model.bn0(b)) for b in data]
    assert len(kept) >= len(data)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(kept[-2:], raw[-2:], strict=True))

    class Branching(Shapes):
        def forward(self, x):
            if x.mean().item() > 1e9:  # a decision on values
                x = x * 2
            return super().forward(x)

    calls.clear()
    bnsurgery.recalibrate(prepared(Branching()), data)
    assert calls == []
