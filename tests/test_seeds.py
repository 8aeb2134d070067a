"""The article's models, written as the article writes them (tests/seed_models.py), through
every API call and every CLI command: each surgered model runs in eval and train mode, trains
a step at batch size 1 wherever the surgery promises it (and wherever the original could),
and saves and loads back to the same function."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnsurgery
from bnsurgery.cli import main
from bnsurgery.errors import NothingToDoError, UsageError
from bnsurgery.norms import iter_batchnorms
from bnsurgery.targets import TARGETS

from . import seed_models
from .conftest import assert_same_function, output, prepared

SEEDS = {
    "SimpleCNN": ("tests.seed_models:SimpleCNN", (3, 32, 32)),
    "SimpleMLP": ("tests.seed_models:SimpleMLP", (10,)),
    "Sequential": ("tests.seed_models:sequential", (3, 32, 32)),
    "CIFAR10Model": ("tests.seed_models:CIFAR10Model", (3, 32, 32)),
}


def seed(name: str) -> tuple[nn.Module, torch.Tensor, str]:
    spec, size = SEEDS[name]
    model = prepared(bnsurgery.load(spec))  # random BN statistics, or a wrong fold goes unseen
    return model, torch.randn(6, *size, generator=torch.Generator().manual_seed(3)), spec


def trains_at_batch_one(model: nn.Module, x: torch.Tensor) -> bool:
    """One SGD step at batch size 1 in train mode; False where PyTorch's BN refuses it (a BN
    on (1, C) in train mode has one value per channel)."""
    model = copy.deepcopy(model).train()
    try:
        out = model(x[:1])
    except ValueError as exc:
        assert "more than 1 value per channel" in str(exc)
        return False
    params = [p for p in model.parameters() if p.requires_grad]
    out.square().mean().backward()
    torch.optim.SGD(params, lr=1e-3).step()
    return True


def eval_without_dropout(model: nn.Module) -> nn.Module:
    """Train mode for the norms, eval mode for Dropout: the BN's own train behaviour shows."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    return model


def surgeries(x: torch.Tensor) -> dict[str, object]:
    cases = {
        "fold": lambda m: bnsurgery.fold(m, x),
        "freeze": bnsurgery.freeze,
        "freeze_affine": lambda m: bnsurgery.freeze(m, train_affine=True),
        "unfreeze": lambda m: bnsurgery.unfreeze(bnsurgery.freeze(m)),
        "recalibrate": lambda m: bnsurgery.recalibrate(m, [x[:3], x[3:]]),
        "swap_calibrated": lambda m: bnsurgery.swap(m, "groupnorm", calibrate=[x]),
    }
    for target in TARGETS:
        cases[f"swap_{target}"] = lambda m, t=target: bnsurgery.swap(m, t)
    return cases


SAME_EVAL = {"fold", "freeze", "freeze_affine", "unfreeze", "swap_frozen", "swap_syncbatchnorm"}
#: surgeries after which no BN normalises with batch statistics in train mode
BATCH_ONE = {"fold", "freeze", "freeze_affine", "swap_calibrated", "swap_frozen"}
BATCH_ONE |= {f"swap_{t}" for t in ("groupnorm", "layernorm", "identity")}


@pytest.mark.parametrize("surgery", sorted(surgeries(torch.zeros(1))))
@pytest.mark.parametrize("name", list(SEEDS))
def test_every_api_call_on_the_articles_models(name, surgery, tmp_path):
    model, x, spec = seed(name)
    original = copy.deepcopy(model)
    if surgery == "swap_batchnorm":  # already BN: nothing to swap, said as such
        report = bnsurgery.last_report(surgeries(x)[surgery](model))
        assert not report.swapped and all("already a BatchNorm" in r for _, r in report.left)
        assert_same_function(original, model, (x,), tol=0)
        return
    result = surgeries(x)[surgery](model)
    assert result is model
    report = bnsurgery.last_report(model)
    assert report is not None
    if surgery in SAME_EVAL:
        assert_same_function(original, model, (x,))
    if surgery.startswith("freeze"):
        frozen_out = output(eval_without_dropout(model), x)
        assert torch.allclose(frozen_out, output(model.eval(), x), atol=1e-6)
    if surgery == "unfreeze":
        assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items())
    if surgery == "recalibrate":
        assert not report.left
        pairs = zip(iter_batchnorms(model), iter_batchnorms(original), strict=True)
        assert any(not torch.equal(a.running_mean, b.running_mean) for (_, a), (_, b) in pairs)
    if surgery.startswith("swap_") and surgery not in ("swap_frozen", "swap_syncbatchnorm"):
        left = dict(report.left)  # instance norm on (N, C) is refused, with its reason
        assert all(left.get(n) for n, _ in iter_batchnorms(model)), left
        if surgery != "swap_instancenorm":
            assert not left
    assert torch.isfinite(output(model.eval(), x)).all()
    assert torch.isfinite(output(eval_without_dropout(model), x)).all()
    if surgery in BATCH_ONE or trains_at_batch_one(original, x):
        stats = {n: b.running_mean.clone() for n, b in iter_batchnorms(model)}
        assert trains_at_batch_one(model, x)
        if surgery.startswith("freeze"):
            assert all(torch.equal(stats[n], b.running_mean) for n, b in iter_batchnorms(model))
    if surgery == "swap_syncbatchnorm":
        return  # SyncBatchNorm has no checkpoint rule of its own: saved as a BN state dict
    path = bnsurgery.save(model, tmp_path / "m.safetensors")
    loaded = bnsurgery.load(path, arch=spec)
    torch.testing.assert_close(output(loaded, x), output(model.eval(), x), rtol=1e-6, atol=1e-6)


def test_the_articles_own_freeze_is_undone_by_train_and_bnsurgerys_is_not():
    model, x, _ = seed("CIFAR10Model")
    article = seed_models.freeze_as_the_article_does(copy.deepcopy(model))
    article.train()
    article(x)  # the article's frozen BN2d layers update their statistics again
    moved = [
        n
        for (n, a), (_, b) in zip(iter_batchnorms(article), iter_batchnorms(model), strict=True)
        if not torch.equal(a.running_mean, b.running_mean)
    ]
    assert len(moved) == 4
    ours = bnsurgery.freeze(copy.deepcopy(model)).train()
    ours(x)
    assert all(
        torch.equal(a.running_mean, b.running_mean)
        for (_, a), (_, b) in zip(iter_batchnorms(ours), iter_batchnorms(model), strict=True)
    )


def test_the_lstm_model_has_no_bn_and_every_surgery_says_so(tmp_path, capsys):
    x = torch.randn(5, 2, 4)
    for surgery in ("fold", "freeze", "unfreeze", "recalibrate", "swap_groupnorm"):
        model = seed_models.RNNWithLayerNorm(4, 8)
        before = copy.deepcopy(model.state_dict())
        try:
            surgeries(x)[surgery](model)
        except UsageError as exc:  # freeze and recalibrate: nothing selected
            assert "no BatchNorm layer" in str(exc)
        else:  # fold, unfreeze, swap: an empty report
            report = bnsurgery.last_report(model)
            assert not any(getattr(report, k, None) for k in ("folded", "changed", "swapped"))
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    spec = "tests.seed_models:RNNWithLayerNorm(input_size=4, hidden_size=8)"
    torch.save(torch.randn(4, 2, 4), tmp_path / "data.pt")
    commands = {
        "fold": [],
        "freeze": [],
        "unfreeze": [],
        "swap": ["--to", "groupnorm"],
        "recalibrate": ["--data", tmp_path / "data.pt"],
    }
    for command, extra in commands.items():
        out = tmp_path / f"{command}.safetensors"
        code = cli(command, spec, "--input-size", "2,4", *extra, "-o", out)
        err = capsys.readouterr().err
        assert code == NothingToDoError.exit_code, (command, err)
        assert "BatchNorm" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("name", list(SEEDS))
def test_every_cli_command_on_the_articles_models(name, tmp_path, capsys):
    model, x, spec = seed(name)
    src = bnsurgery.save(model, tmp_path / "trained.safetensors")
    data = tmp_path / "data.pt"
    torch.save(x, data)
    size = ",".join(map(str, SEEDS[name][1]))
    common = ["--arch", spec, "--input-size", size]
    assert cli("inspect", src, *common) == 0
    assert "BatchNorm" in capsys.readouterr().out

    out = {k: tmp_path / f"{k}.safetensors" for k in ("fold", "freeze", "unfreeze", "swap")}
    out |= {"repair": tmp_path / "repair.safetensors", "recal": tmp_path / "recal.safetensors"}
    assert cli("fold", src, *common, "-o", out["fold"]) == 0
    assert cli("freeze", src, *common, "-o", out["freeze"]) == 0
    assert cli("unfreeze", out["freeze"], *common, "-o", out["unfreeze"]) == 0
    assert cli("swap", src, *common, "--to", "groupnorm", "-o", out["swap"]) == 0
    repair = ["--to", "layernorm", "--calibrate", data, "--batch-size", 3]
    assert cli("swap", src, *common, *repair, "-o", out["repair"]) == 0
    recal = ["--data", data, "--batch-size", 3]
    assert cli("recalibrate", src, *common, *recal, "-o", out["recal"]) == 0
    capsys.readouterr()

    loaded = {k: bnsurgery.load(p, arch=spec) for k, p in out.items()}
    for key in ("fold", "freeze", "unfreeze"):
        assert_same_function(model, loaded[key], (x,))
    assert not list(iter_batchnorms(loaded["fold"]))
    assert not list(iter_batchnorms(loaded["swap"])) and not list(iter_batchnorms(loaded["repair"]))
    for key, net in loaded.items():
        assert not net.training, key  # the CLI's models are in eval mode
        assert torch.isfinite(output(net, x)).all(), key
        if key in ("fold", "freeze", "swap", "repair") or trains_at_batch_one(model, x):
            assert trains_at_batch_one(net, x), key
