"""fold: every placement, every "never" case, the seed models, rollback and dtypes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import timm.layers
import torch
import torchvision
from torch import nn

import bnsurgery
from bnsurgery.errors import TraceError, UsageError, VerificationError
from bnsurgery.layers import NormActRemainder
from bnsurgery.norms import iter_batchnorms

from . import models
from .conftest import assert_same_function, output, prepared


def fold_and_check(model, args, tol=1e-5):
    """Fold a copy; check the function is kept; return (folded, report)."""
    model = prepared(model)
    folded = bnsurgery.fold(copy.deepcopy(model), args)
    assert_same_function(model, folded, args if isinstance(args, tuple) else (args,), tol)
    report = bnsurgery.last_report(folded)
    left = {name for name, _ in iter_batchnorms(folded)}
    assert left == {s.bn for s in report.left}, "every BN left in the model has a reason"
    assert all(s.reason for s in report.left)
    return folded, report


def reasons(report):
    return {s.bn: s.reason for s in report.left}


# ---------------------------------------------------------------------------- seed models


@pytest.mark.parametrize("name", list(models.SEEDS))
def test_seed_models_fold_completely(name):
    factory, size = models.SEEDS[name]
    x = torch.randn(4, *size)
    _, report = fold_and_check(factory(), x)
    assert report.left == [] and len(report.folded) == report.bn_count > 0
    assert report.verified and report.max_rel_error < 1e-5


@pytest.mark.parametrize("name", list(models.SEEDS))
def test_seed_models_symbolic_walk_plans_the_same(name):
    factory, size = models.SEEDS[name]
    model = prepared(factory())
    runtime = bnsurgery.plan_fold(model, torch.randn(2, *size))
    symbolic = bnsurgery.plan_fold(model)
    assert symbolic.method == "symbolic" and runtime.method == "runtime"
    key = [(e.bn, e.into, e.placement) for e in runtime.edits]
    assert key == [(e.bn, e.into, e.placement) for e in symbolic.edits]


# ------------------------------------------------------------------- producer placements


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(
    "kw",
    [
        {"groups": 1, "bias": True},
        {"groups": 2, "bias": False, "dilation": 2},
        {"groups": 4, "bias": True, "stride": 2, "padding": 1, "padding_mode": "reflect"},
        {"groups": 1, "bias": False, "padding": 2, "padding_mode": "circular"},
        {"groups": 2, "bias": True, "padding": 1, "padding_mode": "replicate"},
    ],
)
def test_conv_into_producer(dims, kw):
    conv = getattr(nn, f"Conv{dims}d")(4, 8, 3, **kw)
    bn = getattr(nn, f"BatchNorm{dims}d")(8)
    folded, report = fold_and_check(nn.Sequential(conv, bn), torch.randn(2, 4, *([9] * dims)))
    (edit,) = report.folded
    assert (edit.into, edit.placement, edit.adds_bias) == ("0", "producer", not kw["bias"])
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_into_producer(dims, groups, bias):
    convt = getattr(nn, f"ConvTranspose{dims}d")(4, 6, 3, stride=2, groups=groups, bias=bias)
    bn = getattr(nn, f"BatchNorm{dims}d")(6)
    _, report = fold_and_check(nn.Sequential(convt, bn), torch.randn(2, 4, *([5] * dims)))
    assert [(e.layer, e.placement) for e in report.folded] == [("conv_transpose", "producer")]


@pytest.mark.parametrize("affine", [True, False])
def test_linear_bn1d_and_affine_false(affine):
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, affine=affine), nn.ReLU())
    _, report = fold_and_check(model, torch.randn(3, 6))
    assert [(e.into, e.layer) for e in report.folded] == [("0", "linear")]


def test_linear_on_sequence_is_not_folded():
    # Linear on (N, L, C) feeds BN1d whose channel dim is L: folding per output unit is wrong.
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    _, report = fold_and_check(model, torch.randn(2, 5, 6))
    assert "rank 3" in reasons(report)["1"]


def test_timm_norm_act_keeps_activation_and_drop():
    norm_act = timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=nn.Dropout)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), norm_act)
    folded, report = fold_and_check(model, torch.randn(2, 3, 8, 8))
    assert isinstance(folded[1], NormActRemainder)
    assert isinstance(folded[1].act, nn.SiLU) and isinstance(folded[1].drop, nn.Dropout)
    assert "act=SiLU" in report.folded[0].keeps


def test_sync_and_frozen_batchnorm_variants():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.SyncBatchNorm(8),
        nn.Conv2d(8, 8, 3),
        torchvision.ops.misc.FrozenBatchNorm2d(8),
        nn.Conv2d(8, 8, 3),
        timm.layers.FrozenBatchNormAct2d(8, act_layer=nn.ReLU),
    )
    with torch.no_grad():
        for m in (model[3], model[5]):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
    _, report = fold_and_check(model, torch.randn(2, 3, 12, 12))
    assert [e.bn for e in report.folded] == ["1", "3", "5"]


# ------------------------------------------------------------------- consumer placements


def test_bn_first_folds_into_following_linear():
    model = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3))
    _, report = fold_and_check(model, torch.randn(4, 6))
    assert [(e.into, e.placement) for e in report.folded] == [("1", "consumer")]


@pytest.mark.parametrize(
    "conv_kw, folds",
    [
        ({"padding": 0}, True),
        ({"padding": 0, "groups": 2, "bias": False}, True),
        ({"padding": 1, "padding_mode": "reflect"}, True),
        ({"padding": 1}, False),
    ],
)
def test_bn_first_folds_into_following_conv_only_without_zero_padding(conv_kw, folds):
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, **conv_kw))
    _, report = fold_and_check(model, torch.randn(2, 4, 8, 8))
    if folds:
        assert [(e.into, e.placement) for e in report.folded] == [("1", "consumer")]
    else:
        assert "pads with zeros" in reasons(report)["0"]


# -------------------------------------------------------------------------- never cases


def test_track_running_stats_false_is_left():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    _, report = fold_and_check(model, torch.randn(2, 3, 8, 8))
    assert "track_running_stats=False" in reasons(report)["1"]


@pytest.mark.parametrize(
    "cls, bn, expected",
    [
        (models.Residual, "bn", "also used by"),
        (models.SharedConvDifferentBN, "bn_a", "also used by"),
        (models.ReluBetween, "bn", "relu"),
        (models.InplaceAfterConv, "bn", "relu_"),
        (models.MutatedThroughView, "bn", "mutated in place"),
    ],
)
def test_unsafe_producers_are_left_with_reason(cls, bn, expected):
    _, report = fold_and_check(cls(), torch.randn(2, 4, 8, 8))
    assert expected in reasons(report)[bn]


def test_module_called_twice_with_the_same_bn_folds_at_both_sites():
    _, report = fold_and_check(models.SharedConvSameBN(), torch.randn(2, 4, 8, 8))
    (edit,) = report.folded
    assert edit.sites == 2 and edit.into == "conv"


def test_functional_conv_folds_into_the_owner_of_its_weight():
    _, report = fold_and_check(models.FunctionalConv(), torch.randn(2, 4, 8, 8))
    assert [(e.bn, e.into) for e in report.folded] == [("bn", "")]


def test_weight_standardised_conv_is_left():
    model = nn.Sequential(timm.layers.StdConv2d(3, 8, 3), nn.BatchNorm2d(8))
    _, report = fold_and_check(model, torch.randn(2, 3, 8, 8))
    assert "computed at run time" in reasons(report)["1"]


def test_dict_inputs_tuple_outputs_and_containers():
    batch = {"image": torch.randn(2, 3, 8, 8)}
    _, report = fold_and_check(models.DictInOut(), (batch,))
    # norms.b's output is also a model output, so only the producer placement works for it.
    assert {(e.bn, e.into) for e in report.folded} == {
        ("norms.a", "convs.0"),
        ("norms.b", "convs.1"),
    }


class StatisticsReadOutside(nn.Module):
    def __init__(self, read: str = "running_mean"):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.read = read

    def forward(self, x):
        y = self.bn(self.conv(x)) - getattr(self.bn, self.read).view(1, -1, 1, 1)
        return self.bn2(self.conv2(y))


@pytest.mark.parametrize("read", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("walk", ["symbolic", "runtime"])
def test_bn_whose_statistics_are_read_outside_its_call_is_left(walk, read):
    model = prepared(StatisticsReadOutside(read))
    x = torch.randn(2, 3, 8, 8)
    expected = output(model, x)
    folded = bnsurgery.fold(copy.deepcopy(model), None if walk == "symbolic" else x)
    report = bnsurgery.last_report(folded)
    assert report.method == walk
    assert [e.bn for e in report.folded] == ["bn2"]
    what = "statistics" if read.startswith("running") else "affine parameters"
    assert f"its {what} are also read by" in reasons(report)["bn"]
    assert torch.allclose(output(folded, x), expected, atol=1e-5)


def test_data_dependent_model_needs_example_inputs():
    model = prepared(models.DataDependent())
    with pytest.raises(TraceError, match="example_inputs"):
        bnsurgery.fold(copy.deepcopy(model))
    _, report = fold_and_check(models.DataDependent(), torch.randn(2, 3, 8, 8))
    assert len(report.folded) == 1


# ------------------------------------------------------------------ conventions & safety


def test_in_place_returns_same_object_and_keeps_train_flags():
    model = prepared(models.SimpleCNN()).train()
    out = bnsurgery.fold(model, torch.randn(2, 3, 8, 8))
    assert out is model and model.training and model.conv1.training
    report = bnsurgery.last_report(model)
    assert report.was_training and any("eval semantics" in n for n in report.notes)


def test_failed_verification_leaves_the_model_unchanged():
    model = prepared(models.CIFAR10Model())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    with pytest.raises(VerificationError, match="left unchanged"):
        bnsurgery.fold(model, torch.randn(2, 3, 32, 32), tolerance=-1.0)
    assert repr(model) == structure
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plan_fold_changes_nothing_and_include_exclude_select():
    model = prepared(models.sequential_model())
    before = copy.deepcopy(model.state_dict())
    plan = bnsurgery.plan_fold(model, torch.randn(2, 3, 32, 32), exclude="5")
    assert [e.bn for e in plan.edits] == ["1", "10"]
    assert ("5", "not selected") in {(s.bn, s.reason) for s in plan.skipped}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UsageError, match="nearest BN names: bn1"):
        bnsurgery.plan_fold(models.SimpleCNN(), include="bn")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fold_is_as_accurate_as_the_original(dtype):
    model = prepared(models.CIFAR10Model()).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    reference = output(model, x)
    low = copy.deepcopy(model).to(dtype)
    original_err = (output(low, x.to(dtype)).double() - reference).abs().max()
    bnsurgery.fold(low, x.to(dtype))
    folded_err = (output(low, x.to(dtype)).double() - reference).abs().max()
    assert len(bnsurgery.last_report(low).folded) == 4
    assert folded_err <= 2 * original_err + 1e-3 * reference.abs().max()


def test_model_without_bn_is_a_clean_no_op():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert bnsurgery.fold(model, torch.randn(1, 3, 8, 8)) is model
    report = bnsurgery.last_report(model)
    assert report.bn_count == 0 and not report.verified


def test_detection_post_processing_is_verified_layer_by_layer():
    # Random-init detectors tie many scores: NMS and top-k flip on rounding noise, so the
    # final outputs differ while every folded layer matches; fold must say so, not fail.
    model = prepared(bnsurgery.load("torchvision:ssdlite320_mobilenet_v3_large"))
    images = [torch.rand(3, 160, 160), torch.rand(3, 128, 160)]
    bnsurgery.fold(model, (images,))
    report = bnsurgery.last_report(model)
    assert report.verified and report.max_rel_error < 1e-4 and len(report.folded) == 70
    assert any("every folded layer" in n for n in report.notes)


def test_unit_check_of_a_layer_folded_from_both_sides():
    """A conv that absorbs the BN before it (consumer) and the BN after it (producer) is one
    unit: checked on the first BN's input against the second BN's output. (Checking each fold
    on its own compared a doubly folded conv with a singly folded one and left the BNs of
    maxvit unfolded for nothing.)"""
    from bnsurgery.foldcheck import unit_changes

    model = prepared(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)))
    x = torch.randn(2, 4, 5, 5)
    state = copy.deepcopy(model.state_dict())
    plan = bnsurgery.plan_fold(model, x)
    assert {(e.bn, e.into, e.placement) for e in plan.edits} == {
        ("0", "1", "consumer"),
        ("2", "1", "producer"),
    }
    changes = unit_changes(model, plan, (x,))
    assert set(changes) == {"0", "2"} and max(changes.values()) < 1e-5, changes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unit_check_sees_a_wrong_fold_and_names_only_its_unit(monkeypatch):
    """The unit check recomputes with the very weights the fold would write: a fold maths bug
    in one layer shows in that layer's BN alone."""
    from bnsurgery import foldmath
    from bnsurgery.foldcheck import unit_changes

    model = prepared(models.sequential_model())
    x = torch.randn(2, 3, 32, 32)
    plan = bnsurgery.plan_fold(model, x)
    right = foldmath.fold_producer

    def wrong(kind, weight, bias, scale, shift, groups):
        w, b = right(kind, weight, bias, scale, shift, groups)
        return (w * 1.01, b) if weight.shape[0] == 128 else (w, b)

    monkeypatch.setattr(foldmath, "fold_producer", wrong)
    changes = unit_changes(model, plan, (x,))
    moved = {bn for bn, change in changes.items() if change > 1e-3}
    assert len(moved) == 1 and all(changes[bn] < 1e-5 for bn in changes if bn not in moved)
    assert moved == {"5"}


def test_unit_check_keeps_one_activation_alive_not_all():
    """The layer-by-layer check streams: a unit's input is kept only until the unit's output
    appears, so memory does not grow with depth (it cloned every activation once)."""
    import gc

    from bnsurgery.foldcheck import unit_changes

    depth, shape = 24, (1, 8, 40, 40)
    layers = [nn.Conv2d(3, 8, 1)] + [
        m for _ in range(depth) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    ]
    peak = []

    class Probe(nn.Module):
        def forward(self, x):
            gc.collect()
            peak.append(
                sum(
                    1
                    for o in gc.get_objects()
                    if isinstance(o, torch.Tensor) and tuple(o.shape) == shape
                )
            )
            return x

    model = prepared(nn.Sequential(*layers, Probe()))
    x = torch.randn(1, 3, 40, 40)
    plan = bnsurgery.plan_fold(model, x)
    assert len(plan.edits) == depth
    peak.clear()
    changes = unit_changes(model, plan, (x,))
    assert max(changes.values()) < 1e-5
    assert peak and peak[0] <= 4, peak


# ------------------------------------------------------------------ through layout ops


class LinearNorm(nn.Module):
    """LeViT's block: a BatchNorm1d over the tokens of a linear layer's (B, N, C) output."""

    def __init__(self, c_in=6, c_out=8, flat=lambda y: y.flatten(0, 1)):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)
        self.bn = nn.BatchNorm1d(c_out)
        self.flat = flat

    def forward(self, x):
        y = self.linear(x)
        return self.bn(self.flat(y)).reshape_as(y)  # reshape_as reads y's shape only


class TokenNorm(nn.Module):
    """BatchNorm1d on (B, C, L) tokens: the linear's channel axis moved to 1 and back."""

    def __init__(self, swap=lambda y: y.transpose(1, 2)):
        super().__init__()
        self.linear, self.bn, self.swap = nn.Linear(6, 8), nn.BatchNorm1d(8), swap

    def forward(self, x):
        return self.bn(self.swap(self.linear(x))).transpose(1, 2)


class ConvFlatNorm(nn.Module):
    """A conv's (N, C, H, W) output flattened to (N, C, HW) for a BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.conv(x).flatten(2))


TOKENS = torch.randn(2, 5, 6, dtype=torch.float64)
FOLDS_THROUGH = {
    "flatten": (lambda: LinearNorm(), TOKENS, "flatten()"),
    "view": (lambda: LinearNorm(flat=lambda y: y.view(-1, 8)), TOKENS, "view()"),
    "reshape": (lambda: LinearNorm(flat=lambda y: y.reshape(10, 8)), TOKENS, "reshape()"),
    "transpose": (lambda: TokenNorm(), TOKENS, "transpose()"),
    "permute": (lambda: TokenNorm(swap=lambda y: y.permute(0, 2, 1)), TOKENS, "permute()"),
    "conv-flatten": (ConvFlatNorm, torch.randn(2, 3, 6, 6, dtype=torch.float64), "flatten()"),
}


@pytest.mark.parametrize("case", list(FOLDS_THROUGH))
def test_bn_folds_through_layout_ops_that_keep_the_channel_axis(case):
    make, x, op = FOLDS_THROUGH[case]
    _, report = fold_and_check(make().double(), x, tol=1e-12)  # exact in float64
    assert [e.bn for e in report.folded] == ["bn"] and op in str(report.folded[0])
    assert report.max_rel_error < 1e-12


REFUSED_THROUGH = {
    # (B, N, C) -> (B, N*C): each BN channel mixes tokens and channels
    "merged": (
        lambda: LinearNorm(c_out=4, flat=lambda y: y.reshape(y.shape[0], -1)),
        "merges or splits the channel axis",
    ),
    # the linear's channel axis ends at axis 2, the BN normalises axis 1 (same size)
    "wrong axis": (
        lambda: TokenNorm(swap=lambda y: y.reshape(y.shape)),
        "arrives at axis 2",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_THROUGH))
def test_layout_ops_that_move_the_channel_axis_elsewhere_are_refused(case):
    make, why = REFUSED_THROUGH[case]
    model = make().double()
    if case == "merged":
        model.bn = nn.BatchNorm1d(20).double()
        x = TOKENS
    else:
        model.linear = nn.Linear(6, 5).double()
        model.bn = nn.BatchNorm1d(5).double()
        x = TOKENS
    _, report = fold_and_check(model, x, tol=1e-12)
    assert not report.folded and why in reasons(report)["bn"], reasons(report)


class SharedFlatten(LinearNorm):
    def forward(self, x):
        y = self.linear(x)
        flat = y.flatten(0, 1)
        return self.bn(flat).reshape_as(y) + flat.sum()  # the flattened tensor is used twice


def test_a_layout_op_whose_output_is_used_elsewhere_is_refused():
    _, report = fold_and_check(SharedFlatten().double(), TOKENS, tol=1e-12)
    assert "the output of flatten() is also used by sum()" in reasons(report)["bn"]


def test_the_symbolic_walk_cannot_follow_the_channel_axis():
    model = prepared(LinearNorm())
    report = bnsurgery.last_report(bnsurgery.fold(model))
    assert "pass example inputs" in reasons(report)["bn"]


def test_the_layer_check_replays_the_layout_ops():
    from bnsurgery.foldcheck import unit_changes

    for make, x, _ in FOLDS_THROUGH.values():
        model = prepared(make().double())
        plan = bnsurgery.plan_fold(model, x)
        changes = unit_changes(model, plan, (x,))
        assert list(changes) == ["bn"] and changes["bn"] < 1e-12, (make, changes)


# ------------------------------------------------------------------ through concatenation


class MixedConv(nn.Module):
    """MixNet's block: split the channels, a conv per piece (own kernel size), cat, one BN."""

    def __init__(self, join=lambda ys: torch.cat(ys, 1), bias=(False, True)):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(2, 3, 3, padding=1, bias=bias[0]),
                nn.Conv2d(2, 5, 5, padding=2, groups=1, bias=bias[1]),
            ]
        )
        self.bn = nn.BatchNorm2d(8)
        self.join = join

    def forward(self, x):
        pieces = [x[:, :2], x[:, 2:]]  # slicing, not torch.split: fx can trace it
        return self.bn(self.join([self.convs[0](pieces[0]), self.convs[1](pieces[1])]))


MIXED_X = torch.randn(2, 4, 6, 6, dtype=torch.float64)


@pytest.mark.parametrize("walk", ["runtime", "symbolic"])
def test_bn_after_cat_folds_slice_by_slice_into_each_producer(walk):
    model = prepared(MixedConv().double())
    args = MIXED_X if walk == "runtime" else None
    folded = bnsurgery.fold(copy.deepcopy(model), args)
    assert_same_function(model, folded, (MIXED_X,), 1e-12)
    (edit,) = bnsurgery.last_report(folded).folded
    assert [(p.into, p.start, p.stop, p.adds_bias) for p in edit.parts] == [
        ("convs.0", 0, 3, True),
        ("convs.1", 3, 8, False),
    ]
    assert "per slice after cat() into [0:3] convs.0, [3:8] convs.1" in str(edit)
    assert isinstance(folded.bn, nn.Module) and not list(iter_batchnorms(folded))


def test_cat_fold_on_timm_mixnet_block_keeps_the_activation():
    block = timm.create_model("mixnet_s").blocks[1][0]  # split -> convs -> cat -> BatchNormAct
    x = torch.randn(2, block.conv_pw.in_channels, 8, 8, dtype=torch.float64)
    _, report = fold_and_check(block.double(), x, tol=1e-12)
    assert not report.left
    assert any(e.parts and "act=" in e.keeps for e in report.folded)


class CatWithRelu(MixedConv):
    def forward(self, x):
        return self.bn(torch.cat([self.convs[0](x[:, :2]), self.convs[1](x[:, 2:]).relu()], 1))


class CatPieceUsedTwice(MixedConv):
    def forward(self, x):
        a, b = self.convs[0](x[:, :2]), self.convs[1](x[:, 2:])
        return self.bn(torch.cat([a, b], 1)) + b.sum()


class CatAlongWidth(MixedConv):
    def __init__(self):
        super().__init__()
        self.convs[1] = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(torch.cat([self.convs[0](x[:, :2]), self.convs[1](x[:, 2:])], 3))


class CatSameConvTwice(MixedConv):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(torch.cat([self.convs[0](x[:, :2]), self.convs[0](x[:, 2:])], 1))


class CatWithInput(MixedConv):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn(torch.cat([self.convs[0](x[:, :2]), x[:, 2:]], 1))


REFUSED_CAT = {
    "relu in a piece": (CatWithRelu, "piece 1 of its cat() comes from relu()"),
    "piece used elsewhere": (CatPieceUsedTwice, "the output of conv2d() is also used by sum()"),
    "cat along width": (CatAlongWidth, "cat() along axis 3"),
    "same conv twice": (CatSameConvTwice, "`convs.0` is also used by conv2d()"),
    "input piece": (CatWithInput, "piece 1 of its cat() comes from __getitem__()"),
}


@pytest.mark.parametrize("case", list(REFUSED_CAT))
def test_cat_fold_refuses_pieces_it_cannot_fold_exactly(case):
    make, why = REFUSED_CAT[case]
    _, report = fold_and_check(make().double(), MIXED_X, tol=1e-12)
    assert not report.folded and why in reasons(report)["bn"], reasons(report)


def test_the_layer_check_recomputes_the_joined_layers():
    from bnsurgery.foldcheck import unit_changes

    model = prepared(MixedConv().double())
    plan = bnsurgery.plan_fold(model, MIXED_X)
    assert unit_changes(model, plan, (MIXED_X,))["bn"] < 1e-12
    broken = copy.deepcopy(plan)
    part = broken.edits[0].parts[1]
    broken.edits[0] = dataclasses.replace(
        broken.edits[0],
        parts=(broken.edits[0].parts[0], dataclasses.replace(part, start=2, stop=7)),
    )
    assert unit_changes(model, broken, (MIXED_X,))["bn"] > 1e-3  # a wrong slice is seen


# ------------------------------------------------------------- re-parameterised producers


WEIGHT_NORMED = {
    "parametrizations.weight_norm conv": lambda: torch.nn.utils.parametrizations.weight_norm(
        nn.Conv2d(3, 4, 3, bias=False)
    ),
    "parametrizations.weight_norm linear": lambda: torch.nn.utils.parametrizations.weight_norm(
        nn.Linear(3, 4)
    ),
}


@pytest.mark.parametrize("case", list(WEIGHT_NORMED))
@pytest.mark.parametrize("walk", ["runtime", "symbolic"])
def test_a_weight_normed_producer_folds_into_g_and_keeps_its_parametrisation(case, walk):
    layer = WEIGHT_NORMED[case]()
    linear = isinstance(layer, nn.Linear)
    model = prepared(nn.Sequential(layer, nn.BatchNorm1d(4) if linear else nn.BatchNorm2d(4)))
    model = model.double()
    x = torch.randn(2, 3, dtype=torch.float64) if linear else MIXED_X[:, :3]
    folded = bnsurgery.fold(copy.deepcopy(model), x if walk == "runtime" else None)
    assert_same_function(model, folded, (x,), 1e-12)
    (edit,) = bnsurgery.last_report(folded).folded
    assert "into its weight norm's g" in str(edit)
    assert torch.nn.utils.parametrize.is_parametrized(folded[0], "weight")  # still weight norm
    v = folded[0].parametrizations.weight.original1
    assert torch.equal(v, model[0].parametrizations.weight.original1)  # only g changed


def test_the_older_weight_norm_hook_folds_into_weight_g():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        layer = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    model = prepared(nn.Sequential(layer, nn.BatchNorm2d(4))).double()
    x = MIXED_X[:, :3]
    reference = output(model, x)
    bnsurgery.fold(model, x)  # (a module with this hook cannot be deep-copied)
    assert torch.allclose(output(model, x), reference, rtol=1e-12, atol=1e-12)
    assert "weight_g" in dict(model[0].named_parameters())


@pytest.mark.parametrize(
    "make, why",
    [
        (
            lambda: torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3)),
            "computed at run time (weight standardisation, spectral norm, a parametrisation)",
        ),
        (
            lambda: torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3), dim=1),
            "is weight-normed (dim 1)",
        ),
    ],
)
def test_other_parametrisations_are_left_with_the_reason(make, why):
    model = prepared(nn.Sequential(make(), nn.BatchNorm2d(4))).double()
    _, report = fold_and_check(model, MIXED_X[:, :3], tol=1e-12)
    assert not report.folded and why in reasons(report)["1"], reasons(report)


def test_a_weight_normed_consumer_is_left():
    layer = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    model = prepared(nn.Sequential(nn.BatchNorm1d(4), layer)).double()
    _, report = fold_and_check(model, torch.randn(2, 4, dtype=torch.float64), tol=1e-12)
    assert "only the layer before a BN" in reasons(report)["0"], reasons(report)


# --------------------------------------------------------------------------- functional BN


class FunctionalNorm(nn.Module):
    """A norm written as a call: ``F.batch_norm`` on running statistics the module holds."""

    def __init__(self, c=4, training=False):
        super().__init__()
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)
        self.weight, self.bias = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c))
        self.training_flag = training

    def forward(self, x):
        return torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training_flag, 0.1, 1e-3,
        )  # fmt: skip


class ConvFunctionalNorm(nn.Module):
    def __init__(self, training=False, twice=False, peek=False):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3), FunctionalNorm(training=training)
        self.twice, self.peek = twice, peek

    def forward(self, x):
        y = self.norm(self.conv(x)).relu()
        if self.twice:  # the same layer and norm again: both call sites fold
            y = y + self.norm(self.conv(x))
        if self.peek:  # the statistics read outside the call
            y = y + self.norm.running_mean.sum()
        return y


@pytest.mark.parametrize("walk", ["runtime", "symbolic"])
@pytest.mark.parametrize("twice", [False, True])
def test_functional_batch_norm_on_module_tensors_folds(walk, twice):
    model = ConvFunctionalNorm(twice=twice).double().eval()
    x = MIXED_X[:, :3]
    folded = bnsurgery.fold(copy.deepcopy(model), x if walk == "runtime" else None)
    assert_same_function(model, folded, (x,), 1e-12)
    report = bnsurgery.last_report(folded)
    (edit,) = report.folded
    assert edit.bn == "norm.running_mean" and edit.into == "conv" and edit.sites == 1 + twice
    assert "F.batch_norm left as an identity" in str(edit)
    assert torch.equal(folded.norm.weight, torch.ones(4, dtype=torch.float64))
    # the call is now an exact identity
    y = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(folded.norm(y), y)


class WeightNormedFunctionalNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
        self.norm = FunctionalNorm()

    def forward(self, x):
        return self.norm(self.conv(x))


def test_functional_batch_norm_folds_into_a_weight_normed_conv():
    from bnsurgery.foldcheck import unit_changes

    model, x = WeightNormedFunctionalNorm().double().eval(), MIXED_X[:, :3]
    folded = bnsurgery.fold(copy.deepcopy(model), x)  # raised AttributeError on the stats
    assert_same_function(model, folded, (x,), 1e-12)
    (edit,) = bnsurgery.last_report(folded).folded
    assert edit.functional and edit.scales == "weight_norm"
    assert torch.nn.utils.parametrize.is_parametrized(folded.conv, "weight")
    assert unit_changes(model, bnsurgery.plan_fold(model, x), (x,))[edit.bn] < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_functional_identity_is_exact_in_every_dtype(dtype):
    from bnsurgery.foldedit import identity_value

    for eps in (1e-5, 1e-3, 0.1):
        var = identity_value(torch.zeros(3, dtype=dtype), None, eps)
        assert bool(((var + eps).to(dtype) == 1).all()), (dtype, eps)


@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({"training": True}, "training=True normalises with batch statistics"),
        ({"peek": True}, "its tensors are also read by"),
    ],
)
def test_functional_batch_norm_that_cannot_fold_says_why(kwargs, why):
    model = ConvFunctionalNorm(**kwargs).double().eval()
    x = MIXED_X[:, :3]
    folded = bnsurgery.fold(copy.deepcopy(model), x)
    assert_same_function(model, folded, (x,), 0)
    report = bnsurgery.last_report(folded)
    assert not report.folded and report.bn_count == 1
    assert why in reasons(report)["norm.running_mean"], reasons(report)


class NormThenTokens(nn.Module):
    """FastViT's attention block: a BatchNorm2d, then the (B, C, H, W) map as (B, HW, C) tokens
    for a linear layer (``flatten(2).transpose(-2, -1)``)."""

    def __init__(self, tokens=lambda y: y.flatten(2).transpose(-2, -1)):
        super().__init__()
        self.bn, self.qkv, self.tokens = nn.BatchNorm2d(6), nn.Linear(6, 9), tokens

    def forward(self, x):
        return self.qkv(self.tokens(self.bn(x)))


@pytest.mark.parametrize(
    "tokens, folds",
    [
        (lambda y: y.flatten(2).transpose(-2, -1), True),
        (lambda y: y.permute(0, 2, 3, 1), True),
        (lambda y: y.flatten(2), False),  # channels on axis 1, the linear reads the last
    ],
)
def test_bn_folds_into_the_consumer_through_layout_ops(tokens, folds):
    from bnsurgery.foldcheck import unit_changes

    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    model = prepared(NormThenTokens(tokens).double())
    if not folds:
        model.qkv = nn.Linear(9, 9).double()
    _, report = fold_and_check(model, x, tol=1e-12)
    if folds:
        (edit,) = report.folded
        assert edit.placement == "consumer" and edit.through
        plan = bnsurgery.plan_fold(model, x)
        assert unit_changes(model, plan, (x,))["bn"] < 1e-12
    else:
        assert "arrives at axis 1" in reasons(report)["bn"], reasons(report)


class ConvPoolNorm(nn.Module):
    """A BN after pooling a conv's output (BoTNet's, CoAtNet's ``conv -> avg_pool -> BN``)."""

    def __init__(self, pool):
        super().__init__()
        self.conv, self.bn, self.pool = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), pool

    def forward(self, x):
        return self.bn(self.pool(self.conv(x)))


F_ = torch.nn.functional


@pytest.mark.parametrize(
    "pool, positive, folds",
    [
        (lambda y: F_.avg_pool2d(y, 2), False, True),
        (lambda y: F_.avg_pool2d(y, 3, 2, 1, count_include_pad=False), False, True),
        (lambda y: F_.adaptive_avg_pool2d(y, 1), False, True),
        (lambda y: F_.max_pool2d(y, 3, 2, 1), True, True),
        (lambda y: F_.max_pool2d(y, 2), False, False),  # a negative scale: max does not commute
        (lambda y: F_.avg_pool2d(y, 3, 2, 1), False, False),  # averages padded zeros
    ],
)
def test_bn_folds_into_the_conv_before_a_pooling_where_exact(pool, positive, folds):
    from bnsurgery.foldcheck import unit_changes

    model = prepared(ConvPoolNorm(pool).double())
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.5, 2.0, 1.0, 0.7] if positive else [1, -1, 2, 1]))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    folded = bnsurgery.fold(copy.deepcopy(model), x)  # (fold_and_check would redraw the BN)
    assert_same_function(model, folded, (x,), 1e-12)
    report = bnsurgery.last_report(folded)
    assert bool(report.folded) == folds, reasons(report)
    if folds:
        assert unit_changes(model, bnsurgery.plan_fold(model, x), (x,))["bn"] < 1e-12
    else:
        assert "pool" in reasons(report)["bn"], reasons(report)


def test_every_reason_a_fold_gives_falls_in_a_documented_class():
    import json
    from pathlib import Path

    from bnsurgery.foldplan import LEFT_CLASSES, left_class

    sweep = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "zoo_sweep.jsonl"
    reasons = {
        reason
        for line in sweep.read_text().splitlines()
        for reason in (json.loads(line).get("reasons") or {})
    }
    assert len(reasons) > 20
    assert {r: left_class(r) for r in reasons if left_class(r) == "other"} == {}
    readme = (sweep.parents[2] / "README.md").read_text()
    assert all(f"| {name} |" in readme for name in LEFT_CLASSES)
    for case in REFUSED_CAT.values():  # reasons worded by the newer placements too
        _, report = fold_and_check(case[0]().double(), MIXED_X, tol=1e-12)
        assert all(left_class(s.reason) != "other" for s in report.left), report.left
    report = bnsurgery.last_report(bnsurgery.fold(prepared(Branches_for_class()), X_CLASS))
    assert [left_class(s.reason) for s in report.left] == ["not one conv"]


def Branches_for_class():
    from .test_regions import Branches

    return nn.Sequential(Branches(groups1=2)).double()


X_CLASS = torch.randn(2, 8, 6, 6, dtype=torch.float64)


class NormToLayers(nn.Module):
    """A BN whose output several layers read, each through its own pooling or layout ops:
    EfficientFormerV2's ``norm -> mean((2, 3)) -> head, head_dist``, NextViT's key and value
    after one BatchNorm1d on tokens, a conv beside a pooled head."""

    def __init__(self, style):
        super().__init__()
        self.style, self.bn = style, nn.BatchNorm2d(6)
        self.a, self.b = nn.Linear(6, 5), nn.Linear(6, 4, bias=False)
        self.conv = nn.Conv2d(6, 3, 1, padding=1 if style == "padded" else 0)
        self.pixels = nn.Linear(16, 6)  # reads a 4x4 map's pixels

    def forward(self, x):
        y = self.bn(x)
        if self.style == "heads":
            pooled = y.mean((2, 3))
            return self.a(pooled), self.b(pooled)
        if self.style == "tokens":  # (B, C, H, W) -> (B, HW, C) for both, as NextViT
            tokens = y.flatten(2).transpose(1, 2)
            return self.a(tokens) + self.b(F_.adaptive_avg_pool2d(y, 1).flatten(1)).sum()
        if self.style in ("conv", "padded"):
            return self.conv(y).sum((2, 3)) + self.a(F_.avg_pool2d(y, 2).mean((2, 3)))[:, :3]
        if self.style == "also_summed":  # something that is no layer reads it too
            return self.a(y.mean((2, 3))) + y.sum()
        if self.style == "two_routes":  # one layer, reached two ways
            return self.a(y.mean((2, 3))) + self.a(y.amax((2, 3)))
        if self.style == "channel_mean":
            return self.pixels(y.mean(1).flatten(1))
        raise AssertionError(self.style)


@pytest.mark.parametrize("style", ["heads", "tokens", "conv"])
def test_bn_folds_into_every_layer_that_reads_it(style):
    from bnsurgery.foldcheck import unit_changes

    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    model = prepared(NormToLayers(style).double())
    folded, report = fold_and_check(model, x, tol=1e-12)
    (edit,) = report.folded
    assert edit.placement == "consumer" and len(edit.parts) == 2, edit
    assert {p.into for p in edit.parts} == ({"a", "b"} if style != "conv" else {"a", "conv"})
    assert all(p.through for p in edit.parts if p.into == "a"), edit.parts
    assert "into each of" in str(edit)
    assert any(p.adds_bias for p in edit.parts) == (style != "conv")
    changes = unit_changes(model, bnsurgery.plan_fold(model, x), (x,))
    assert changes["bn"] < 1e-12
    folded.train()
    folded(x)  # still runs in train mode (nothing left to update)


@pytest.mark.parametrize(
    "style, why",
    [
        ("padded", "pads with zeros"),
        ("also_summed", "not to convs or linears"),
        ("two_routes", "amax"),  # amax is no pooling a fold looks through
        ("channel_mean", "averages over the channel axis"),
    ],
)
def test_bn_read_by_several_layers_is_refused_where_not_exact(style, why):
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    _, report = fold_and_check(NormToLayers(style).double(), x, tol=1e-12)
    assert not report.folded
    assert why in reasons(report)["bn"], reasons(report)


def test_one_layer_reached_two_ways_from_a_bn_is_refused():
    class TwoWays(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.a = nn.BatchNorm2d(6), nn.Linear(6, 6)

        def forward(self, x):
            y = self.bn(x)
            return self.a(y.mean((2, 3))) + self.a(y.flatten(2).transpose(1, 2)).sum(1)

    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    _, report = fold_and_check(TwoWays().double(), x, tol=1e-12)
    assert "through different layout ops" in reasons(report)["bn"], reasons(report)


# ------------------------------------------------- the per-unit check of the newer placements


@pytest.mark.parametrize("case", [*WEIGHT_NORMED, "weight_norm hook"])
def test_the_unit_check_runs_a_weight_normed_layer_with_its_g_scaled(case):
    import warnings

    from bnsurgery.foldcheck import unit_changes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        layer = (
            WEIGHT_NORMED[case]()
            if case in WEIGHT_NORMED
            else torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
        )
    linear = isinstance(layer, nn.Linear)
    norm = nn.BatchNorm1d if linear else nn.BatchNorm2d
    model = prepared(nn.Sequential(layer, norm(4), norm(4))).double()  # the second stays
    x = torch.randn(2, 3, dtype=torch.float64) if linear else MIXED_X[:, :3]
    plan = bnsurgery.plan_fold(model, x, include="1")
    (edit,) = plan.edits
    assert edit.scales == "weight_norm"
    assert unit_changes(model, plan, (x,))["1"] < 1e-12
    wrong = dataclasses.replace(plan, edits=[dataclasses.replace(edit, bn="2")])
    assert unit_changes(model, wrong, (x,))["2"] > 1e-3  # the other BN's statistics: seen


class FunctionalNormThenLinear(nn.Module):
    """``F.batch_norm`` on a module's tensors, then the linear layer that absorbs it."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = FunctionalNorm(), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.norm(x))


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_the_unit_check_sees_a_functional_batch_norm_at_its_call(side):
    from bnsurgery.foldcheck import unit_changes

    if side == "producer":
        model, x = ConvFunctionalNorm().double().eval(), MIXED_X[:, :3]
    else:
        model, x = FunctionalNormThenLinear().double().eval(), torch.randn(5, 4).double()
    plan = bnsurgery.plan_fold(model, x)
    (edit,) = plan.edits
    assert edit.functional and edit.placement == side
    assert unit_changes(model, plan, (x,))["norm.running_mean"] < 1e-12
    wrong = dataclasses.replace(plan, edits=[dataclasses.replace(edit, eps=0.5)])
    assert unit_changes(model, wrong, (x,))["norm.running_mean"] > 1e-3  # a wrong fold shows


# ------------------------------------------------- a BN folded into the BN after it as well


class NormBeforeAttention(nn.Module):
    """NextViT's ``E_MHSA`` after its block's BN: the query reads the BN's tokens; the key and
    value read them after a pooling and a BatchNorm1d of the attention's own."""

    def __init__(self, style="nextvit"):
        super().__init__()
        self.style = style
        self.norm1 = nn.BatchNorm2d(6)
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4, bias=False)
        self.norm = nn.BatchNorm1d(6, affine=style != "no_affine")
        self.pool = nn.AvgPool1d(2, 2)

    def forward(self, x):
        tokens = self.norm1(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        kv = self.norm(self.pool(tokens.transpose(1, 2))).transpose(1, 2)
        if self.style == "shared":
            kv = kv + self.norm(x.flatten(2)[..., :8]).transpose(1, 2)  # another tensor
        return self.q(tokens)[:, :8] @ self.k(kv).transpose(1, 2) @ self.v(kv)


def test_bn_folds_through_the_bn_after_it_into_the_layers_after_that(monkeypatch):
    from bnsurgery import foldmath
    from bnsurgery.foldcheck import unit_changes
    from bnsurgery.plan import begin

    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    model = prepared(NormBeforeAttention().double())
    folded, report = fold_and_check(model, x, tol=1e-12)
    assert not report.left and len(report.folded) == 2
    first, second = report.folded  # the outer BN's edit first: the inner one folds its new map
    assert first.bn == "norm1"
    assert {p.into: p.layer for p in first.parts} == {"q": "linear", "norm": "batchnorm"}
    assert second.bn == "norm" and {p.into for p in second.parts} == {"k", "v"}
    assert "norm (a BN, in its weight and bias) through" in str(first)
    folded.train()
    folded(x)

    plan = bnsurgery.plan_fold(model, x)
    assert [e.bn for e in plan.edits] == ["norm1", "norm"]
    assert max(unit_changes(model, plan, (x,)).values()) < 1e-12
    for left in ("norm", "norm1"):  # either fold stands alone (the check may leave either)
        alone = copy.deepcopy(model)
        begin(alone, plan.without({left: "left by the check"})).commit({})
        assert_same_function(model, alone, (x,), 1e-12)
    real = foldmath.fold_into_norm  # a wrong map into the BN after it: the unit check sees it
    monkeypatch.setattr(foldmath, "fold_into_norm", lambda *a: (real(*a)[0], a[1]))
    assert unit_changes(model, plan, (x,))["norm1"] > 1e-3


@pytest.mark.parametrize(
    "style, why",
    [("no_affine", "no affine map to absorb it"), ("shared", "also called on other")],
)
def test_a_bn_after_a_bn_absorbs_it_only_when_it_can(style, why):
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    _, report = fold_and_check(NormBeforeAttention(style).double(), x, tol=1e-12)
    assert why in reasons(report)["norm1"], reasons(report)
    assert report.to_dict()["left"][0]["class"] == (
        "shared tensor" if style == "shared" else "no layer beside it"
    )


def test_a_bn_after_a_bn_that_is_not_selected_is_not_changed():
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    model = NormBeforeAttention().double()
    _, report = fold_and_check(model, x, tol=1e-12)
    folded = bnsurgery.fold(prepared(copy.deepcopy(model)), x, exclude="norm")
    report = bnsurgery.last_report(folded)
    assert not report.folded
    assert "`norm` would absorb it and is not selected" in reasons(report)["norm1"]


@pytest.mark.parametrize("after", ["bn", "norm_act"])
def test_a_bn_folds_into_a_lone_bn_after_it(after):
    second = (
        nn.BatchNorm2d(6) if after == "bn" else timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU)
    )
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(6), second).double()
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    _, report = fold_and_check(model, x, tol=1e-12)
    (edit,) = report.folded  # the second is the model's output: it stays, changed
    assert (edit.bn, edit.into, edit.layer) == ("1", "2", "batchnorm"), edit
    assert set(reasons(report)) == {"2"}  # its output is the model's, or its activation's
