"""norms: what counts as a BN, its epsilon and statistics, and the one policy on which BNs
a surgery can work on (:func:`~bnsurgery.norms.unusable`,
:func:`~bnsurgery.norms.bad_statistics`)."""

from __future__ import annotations

import pytest
import timm.layers
import torch
import torchvision
from torch import nn

from bnsurgery.errors import StatisticsError
from bnsurgery.frozen import FrozenBatchNorm
from bnsurgery.layers import FoldedBatchNorm
from bnsurgery.norms import bad_statistics, bn_stats, check_finite, eps_of, is_batchnorm, unusable

LAZY = "an uninitialised lazy BN (run one forward pass first)"
NO_STATS = "no running statistics (track_running_stats=False): it normalises with batch statistics"


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


@pytest.mark.parametrize("key", ["running_mean", "running_var", "weight"])
def test_broken_statistics_are_refused_with_the_layer_named(key):
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        getattr(bn, key)[1] = float("nan")
    with pytest.raises(StatisticsError, match=rf"cannot fold: layer3: {key} is NaN in 1 of 4"):
        check_finite([("layer3", bn)], "fold")


def test_check_finite_names_the_first_broken_layer_and_counts_the_others():
    good, bad1, bad2 = nn.BatchNorm2d(2), nn.BatchNorm2d(2), nn.BatchNorm2d(2)
    with torch.no_grad():
        bad1.bias[0] = float("inf")
        bad2.running_var[1] = -1.0
    named = [("a", good), ("b", bad1), ("c", bad2)]
    with pytest.raises(
        StatisticsError, match=r"cannot freeze: b: bias is inf in 1 of 2 channels \(and 1 more"
    ):
        check_finite(named, "freeze")
    check_finite([("a", good)], "freeze")  # nothing wrong: no error


# ---- unusable: the shared policy -----------------------------------------------------------


@pytest.mark.parametrize("statistics", [True, False])
def test_a_lazy_bn_is_unusable_for_every_surgery(statistics):
    assert unusable(nn.LazyBatchNorm2d(), statistics=statistics) == LAZY
    assert unusable(nn.LazyBatchNorm1d(affine=False), statistics=statistics) == LAZY


def test_a_lazy_bn_is_usable_once_it_has_seen_an_input():
    bn = nn.LazyBatchNorm2d()
    bn(torch.randn(2, 3, 4, 4))
    assert unusable(bn) is None and unusable(bn, statistics=False) is None


def test_a_bn_without_running_statistics_is_unusable_only_where_statistics_are_needed():
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    assert bn_stats(bn) is None
    assert unusable(bn) == NO_STATS
    assert unusable(bn, statistics=True) == NO_STATS
    assert unusable(bn, statistics=False) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.BatchNorm2d(3),
        lambda: nn.BatchNorm1d(3, affine=False),
        lambda: timm.layers.BatchNormAct2d(3, act_layer=nn.SiLU),
        lambda: torchvision.ops.misc.FrozenBatchNorm2d(3),
        lambda: FrozenBatchNorm(nn.BatchNorm2d(3)),
    ],
    ids=["BatchNorm2d", "BatchNorm1d_no_affine", "BatchNormAct2d", "tv_Frozen", "Frozen"],
)
@pytest.mark.parametrize("statistics", [True, False])
def test_a_healthy_bn_is_usable(make, statistics):
    assert unusable(make(), statistics=statistics) is None


# ---- bad_statistics ------------------------------------------------------------------------


def test_healthy_statistics_have_nothing_wrong():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([-3.0, 0.0, 1e30, 2.0]))
        bn.running_var.copy_(torch.tensor([0.0, 1e-30, 5.0, 1e30]))  # zero variance is fine
        bn.weight.copy_(torch.tensor([-1.0, 0.0, 2.0, 3.0]))
    assert bad_statistics(bn) is None
    assert bad_statistics(nn.BatchNorm2d(4, affine=False)) is None
    assert bad_statistics(nn.BatchNorm2d(4, track_running_stats=False)) is None
    assert bad_statistics(nn.LazyBatchNorm2d()) is None  # nothing to read yet


@pytest.mark.parametrize(
    ("key", "values", "expected"),
    [
        ("running_mean", [0.0, float("inf"), float("-inf"), 1.0], "running_mean is inf in 2 of 4"),
        ("running_var", [float("nan"), 1.0, 1.0, 1.0], "running_var is NaN in 1 of 4"),
        ("weight", [float("nan"), float("inf"), 1.0, 1.0], "weight is NaN/inf in 2 of 4"),
        ("bias", [0.0, 0.0, 0.0, float("nan")], "bias is NaN in 1 of 4"),
        ("running_var", [1.0, -0.5, -2.0, -1e-9], "running_var is negative in 3 of 4"),
    ],
    ids=["inf_mean", "nan_var", "nan_inf_weight", "nan_bias", "negative_var"],
)
def test_bad_statistics_says_which_tensor_what_and_how_many_channels(key, values, expected):
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        getattr(bn, key).copy_(torch.tensor(values))
    assert bad_statistics(bn) == f"{expected} channels"


def test_bad_statistics_reads_frozen_buffers_and_half_precision():
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(3)
    frozen.running_var[2] = float("inf")
    assert bad_statistics(frozen) == "running_var is inf in 1 of 3 channels"
    half = nn.BatchNorm2d(3).half()
    with torch.no_grad():
        half.running_mean[0] = 70000.0  # beyond float16: inf
    assert bad_statistics(half) == "running_mean is inf in 1 of 3 channels"
