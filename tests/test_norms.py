"""norms: what counts as a BN, its epsilon and statistics, the modules that replace it, and
the hook helpers every surgery shares."""

from __future__ import annotations

import pytest
import timm.layers
import torch
import torchvision
from torch import nn

from bnsurgery.errors import StatisticsError
from bnsurgery.hooks import call_input, carry_hooks, has_hooks, user_hooks, user_hooks_suspended
from bnsurgery.layers import FoldedBatchNorm, NormActRemainder
from bnsurgery.norms import bn_stats, check_finite, eps_of, is_batchnorm
from bnsurgery.targets import remainder_of


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: nn.BatchNorm1d(3), True),
        (lambda: nn.SyncBatchNorm(3), True),
        (nn.LazyBatchNorm2d, True),
        (lambda: timm.layers.BatchNormAct2d(3), True),
        (lambda: torchvision.ops.misc.FrozenBatchNorm2d(3), True),
        (lambda: timm.layers.FrozenBatchNormAct2d(3), True),
        (lambda: nn.GroupNorm(1, 3), False),
        (lambda: nn.InstanceNorm2d(3, track_running_stats=True), False),
        (lambda: FoldedBatchNorm(nn.BatchNorm2d(3)), False),  # a fold's leftover is no BN
    ],
    ids=[
        "BatchNorm1d", "SyncBatchNorm", "LazyBatchNorm2d", "BatchNormAct2d", "tv_Frozen",
        "timm_FrozenAct", "GroupNorm", "InstanceNorm2d", "FoldedBatchNorm",
    ],
)  # fmt: skip
def test_what_counts_as_a_bn(make, expected):
    assert is_batchnorm(make()) is expected


def test_eps_and_statistics_are_read_in_float64():
    bn = nn.BatchNorm2d(3, eps=1e-3).half()
    with torch.no_grad():
        bn.running_var.fill_(2.0)
        bn.weight.fill_(0.5)
    stats = bn_stats(bn)
    assert eps_of(bn) == 1e-3 and stats.eps == 1e-3
    assert stats.var.dtype == torch.float64
    scale, shift = stats.scale_shift()
    torch.testing.assert_close(
        scale, torch.full((3,), 0.5 / (2.0 + 1e-3) ** 0.5, dtype=torch.float64)
    )
    assert torch.equal(shift, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "make", [lambda: nn.BatchNorm2d(3, track_running_stats=False), nn.LazyBatchNorm2d]
)
def test_a_bn_without_statistics_has_no_fixed_map(make):
    module = make()
    assert bn_stats(module) is None
    assert type(remainder_of(module)) is nn.Identity


@pytest.mark.parametrize("key", ["running_mean", "running_var", "weight"])
def test_broken_statistics_are_refused_with_the_layer_named(key):
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        getattr(bn, key)[1] = float("nan")
    with pytest.raises(StatisticsError, match=rf"cannot fold: layer3: {key} is NaN in 1 of 4"):
        check_finite([("layer3", bn)], "fold")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
def test_a_folded_bn_reads_as_an_exact_identity_bn(dtype, eps):
    left = FoldedBatchNorm(nn.BatchNorm2d(5, eps=eps).to(dtype))
    assert left.running_var.dtype == dtype
    assert bool((left.running_var + left.eps == 1).all())
    assert left.state_dict() == {}  # nothing persistent: the checkpoint is Identity's
    x = torch.randn(2, 5, 3, 3).to(dtype)
    assert left(x) is x
    scale = left.weight / torch.sqrt(left.running_var + left.eps)
    assert torch.equal(scale, torch.ones_like(scale))


def test_a_norm_act_leaves_its_activation():
    bn = timm.layers.BatchNormAct2d(3, act_layer=nn.ReLU)
    left = remainder_of(bn)
    assert isinstance(left, NormActRemainder) and left.act is bn.act


def test_call_input_positional_and_keyword():
    assert call_input((1, 2), {"input": 3}) == 1
    assert call_input((), {"input": 3}) == 3
    assert call_input((), {}) is None


def test_carried_hooks_are_shared_tables():
    bn, new = nn.BatchNorm2d(2), nn.Identity()
    calls = []
    handle = bn.register_forward_hook(lambda *a: calls.append(1))
    carry_hooks(bn, new)
    assert has_hooks(new) and not has_hooks(nn.Identity())
    new(torch.zeros(1))
    handle.remove()  # the user's handle removes it from both
    new(torch.zeros(1))
    assert calls == [1] and not has_hooks(bn) and not has_hooks(new)


def test_user_hooks_are_suspended_module_and_global_and_come_back():
    conv = nn.Conv2d(1, 1, 1)
    calls = []
    conv.register_forward_hook(lambda *a: calls.append("module"))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda *a: calls.append("global")
    )
    try:
        assert user_hooks(None, "_forward_pre_hooks") and user_hooks(conv, "_forward_hooks")
        with user_hooks_suspended(conv):
            conv(torch.zeros(1, 1, 1, 1))
            assert not user_hooks(None, "_forward_pre_hooks")
        assert calls == []
        conv(torch.zeros(1, 1, 1, 1))
        assert calls == ["global", "module"]
    finally:
        handle.remove()
