"""fold's linear regions: branches of a block that add up to one conv, against each block's
own ``reparameterize()``, and the regions that must be refused."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from timm.models import byobnet, fastvit, ghostnet, reparameterize_model
from torch import nn

import bnsurgery
from bnsurgery.errors import SourceError
from bnsurgery.norms import iter_batchnorms
from bnsurgery.provenance import get_record

from .conftest import assert_same_function, output, prepared

X = torch.randn(2, 8, 10, 10, dtype=torch.float64)


def convs(model):
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def batchnorms(model):
    return len(list(iter_batchnorms(model)))


def folded(model, x=X):
    """Fold a copy of ``model`` (float64, random statistics); check the function is kept
    exactly and every BN left has a reason; return (folded model, report)."""
    out = bnsurgery.fold(copy.deepcopy(model), x)
    assert_same_function(model, out, (x,), 1e-12)
    report = bnsurgery.last_report(out)
    assert {s.bn for s in report.left} == {n for n, _ in iter_batchnorms(out)}
    return out, report


def wrapped(block):
    """The block inside a model (a fold rewrites blocks, never the model object itself)."""
    return prepared(nn.Sequential(block).double())


OWN_REPARAMETERIZE = {
    "repvgg 3x3+1x1+identity": lambda: byobnet.RepVggBlock(8, 8),
    "repvgg stride 2, no identity": lambda: byobnet.RepVggBlock(8, 8, stride=2),
    "mobileone 3 branches": lambda: byobnet.MobileOneBlock(8, 8, num_conv_branches=3),
    "mobileone depthwise": lambda: byobnet.MobileOneBlock(8, 8, group_size=1, num_conv_branches=2),
    "fastvit repmixer": lambda: fastvit.RepMixer(8, layer_scale_init_value=0.7),
    "fastvit mobileone": lambda: fastvit.MobileOneBlock(8, 8, 3, num_conv_branches=2),
    # regions in nested blocks (ghost modules) and in the block around them (strided dw)
    "ghostnetv3 stride 2": lambda: ghostnet.GhostBottleneckV3(8, 16, 8, stride=2),
    "ghostnetv3 stride 1": lambda: ghostnet.GhostBottleneckV3(8, 16, 8),
}


@pytest.mark.parametrize("case", list(OWN_REPARAMETERIZE))
def test_region_collapse_matches_the_blocks_own_reparameterize(case):
    model = wrapped(OWN_REPARAMETERIZE[case]())
    out, report = folded(model)
    assert not report.left and batchnorms(out) == 0
    theirs = reparameterize_model(model)  # every block's own reparameterize(), nested too
    assert_same_function(model, theirs, (X,), 1e-12)  # theirs is right too ...
    assert convs(out) <= convs(theirs)  # ... and ours has no more convs
    assert any(e.placement == "region" for e in report.folded)
    assert re.search(r"collapsed into 0(\.\w+)*\.collapsed\d* \(region:", str(report))


def test_repmixer_layer_scale_of_x_plus_s_times_mix_minus_norm():
    """x + s * (mix(x) - norm(x)): identity, a conv branch, a BN branch, a difference and a
    per-channel scale, one depthwise conv."""
    model = wrapped(fastvit.RepMixer(8, layer_scale_init_value=0.5))
    out, report = folded(model)
    (conv,) = [m for m in out.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == 8 and conv.kernel_size == (3, 3)
    assert {e.bn for e in report.folded} == {
        "0.mixer.identity", "0.mixer.conv_scale.bn", "0.mixer.conv_kxk.0.bn", "0.norm.identity"
    }  # fmt: skip


class Branches(nn.Module):
    """RepVGG's block written by hand: ``conv3(x) + conv1(x) + bn(x)``, variants by flags."""

    def __init__(self, relu_in_branch=False, stride1=1, groups1=1, shared=False, k=3):
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(8, 8, k, 1, k // 2, bias=False), nn.BatchNorm2d(8))
        self.conv1 = nn.Sequential(nn.Conv2d(8, 8, 1, stride1, groups=groups1), nn.BatchNorm2d(8))
        self.bn = nn.BatchNorm2d(8)
        self.relu_in_branch, self.shared = relu_in_branch, shared

    def forward(self, x):
        a = self.conv3(x)
        b = self.conv1(x)
        if self.relu_in_branch:
            b = b.relu()
        out = (a + b + self.bn(x)).relu()
        return (out, a) if self.shared else out


def test_hand_written_branches_collapse_into_one_conv():
    model = wrapped(Branches())
    out, report = folded(model)
    assert convs(out) == 1 and not report.left
    assert {e.bn for e in report.folded} == {"0.conv3.1", "0.conv1.1", "0.bn"}


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"relu_in_branch": True}, "its branches start from different tensors"),
        ({"groups1": 2}, "its convs differ in groups"),
        ({"shared": True}, None),
    ],
)
def test_regions_that_are_not_one_conv_are_refused(kwargs, expected):
    _, report = folded(wrapped(Branches(**kwargs)))
    left = {s.bn: s.reason for s in report.left}
    assert "0.bn" in left, left
    if expected:
        assert expected in left["0.bn"], left
    if kwargs.get("shared"):  # a branch tensor also returned: that BN folds alone, no region
        assert "0.conv1.1" in {e.bn for e in report.folded}
        assert all(e.placement != "region" for e in report.folded)


class Strided(nn.Module):
    """Two strided branches of the same output size whose kernels have no common centre
    (2x2 without padding beside 1x1): each BN folds into its own conv, no region."""

    def __init__(self, k=2, pad=0):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(8, 8, k, 2, pad), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1, 2), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("k, pad, merged", [(2, 0, False), (3, 1, True)])
def test_strided_branches_merge_only_on_a_common_centre(k, pad, merged):
    out, report = folded(wrapped(Strided(k, pad)))
    assert not report.left
    assert convs(out) == (1 if merged else 2)
    assert any(e.placement == "region" for e in report.folded) == merged


def test_a_hook_on_a_branch_keeps_the_region():
    model = wrapped(Branches())
    seen = []
    model[0].conv1[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _, report = folded(model)
    assert "a hook on `0.conv1.0`" in {s.bn: s.reason for s in report.left}["0.bn"]


def test_sums_in_the_models_own_forward_are_not_rewritten():
    model = prepared(Branches().double())
    _, report = folded(model)
    assert "the model's own forward is not rewritten" in {s.bn: s.reason for s in report.left}["bn"]


@pytest.mark.parametrize(  # ghostnet: nested regions
    "name", ["repvgg_a0", pytest.param("ghostnetv3_050", marks=pytest.mark.zoo)]
)
def test_a_collapsed_model_saves_loads_pickles_and_trains(tmp_path, name):
    model = prepared(bnsurgery.load(f"timm:{name}(num_classes=5)"))
    x = torch.randn(2, 3, 64, 64)
    reference = output(model, x)
    bnsurgery.fold(model, x)
    assert batchnorms(model) == 0
    path = bnsurgery.save(model, tmp_path / "m.safetensors")
    loaded = bnsurgery.load(path).eval()
    assert torch.equal(output(model, x), output(loaded, x))
    assert any("collapse" in e for e in get_record(loaded)["structure"])
    again = pickle.loads(pickle.dumps(loaded))
    assert torch.equal(output(again, x), output(loaded, x))
    assert torch.allclose(
        output(loaded, x), reference, rtol=1e-4, atol=1e-4 * reference.abs().max()
    )
    loaded.train()
    loaded(x).sum().backward()  # trains: the collapsed convs have gradients
    assert all(p.grad is not None for p in loaded.parameters())


def test_a_corrupt_collapse_record_is_refused(tmp_path):
    from bnsurgery import trust

    good = {
        "collapse": "stages.0.0",
        "regions": [
            {
                "source": "x", "output": "add_1", "name": "collapsed",
                "conv": {
                    "dims": 2, "in_channels": 8, "out_channels": 8, "kernel": [3, 3],
                    "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1,
                },
            }
        ],
    }  # fmt: skip
    assert trust.recorded_structure([good], "f") == [good]
    bad = [
        {**good, "extra": 1},
        {**good, "regions": []},
        {**good, "regions": [{**good["regions"][0], "name": "__import__('os')"}]},
        {**good, "regions": [{**good["regions"][0], "conv": {"dims": 2}}]},
        {
            **good,
            "regions": [
                {**good["regions"][0], "conv": {**good["regions"][0]["conv"], "kernel": [3]}}
            ],
        },
    ]
    for edit in bad:
        with pytest.raises(SourceError, match="corrupt bnsurgery metadata"):
            trust.recorded_structure([edit], "f")


def test_a_recorded_region_that_does_not_fit_the_block_is_a_source_error():
    from bnsurgery.provenance import replay

    model = byobnet.RepVggBlock(8, 8)
    edit = {
        "collapse": "",
        "regions": [{"source": "x", "output": "nope", "name": "collapsed", "conv": {}}],
    }
    holder = nn.Sequential(model)
    edit["collapse"] = "0"
    with pytest.raises(SourceError):
        replay(holder, [edit])


def test_the_layer_check_runs_each_collapsed_block_on_its_input(monkeypatch):
    from bnsurgery import regions
    from bnsurgery.foldcheck import unit_changes

    model = wrapped(byobnet.RepVggBlock(8, 8))
    plan = bnsurgery.plan_fold(model, X)
    changes = unit_changes(model, plan, (X,))
    assert set(changes) == {"0.identity", "0.conv_kxk.bn", "0.conv_1x1.bn"}
    assert max(changes.values()) < 1e-12

    real = regions._Affine.conv_weights

    def off(self, spec, gm):  # a wrong collapse: the check must see it
        weight, bias = real(self, spec, gm)
        return weight, bias + 1.0

    monkeypatch.setattr(regions._Affine, "conv_weights", off)
    assert min(unit_changes(model, plan, (X,)).values()) > 1e-3
    out = bnsurgery.fold(copy.deepcopy(model), X)  # the wrong region is left, with the reason
    report = bnsurgery.last_report(out)
    assert not report.folded and batchnorms(out) == 3
    assert "moved its layer's output" in report.left[0].reason
    assert_same_function(model, out, (X,), 0)


class WithConstant(Branches):
    """A block that makes a tensor in its forward (fx keeps it as ``_tensor_constant0``)."""

    def forward(self, x):
        return (self.conv3(x) + self.conv1(x) + self.bn(x)) * torch.tensor(2.0, dtype=x.dtype)


def test_a_block_that_makes_tensors_in_forward_collapses():
    model = wrapped(WithConstant())
    before = set(vars(model[0]))
    out, report = folded(model)
    assert convs(out) == 1 and not report.left
    assert set(vars(model[0])) == before  # the original block is left as it was


class Pooled(nn.Module):
    """A branch that averages the block's input (``x + bn(avg_pool(x))``, Inception's pooled
    branch beside a conv), as a depthwise conv: variants by the pooling's options."""

    def __init__(self, conv=True, identity=True, functional=False, bn_first=False, **pool):
        super().__init__()
        self.pool = {"kernel_size": 3, "stride": 1, "padding": 1, **pool}
        stride, padding = self.pool["stride"], self.pool["padding"]
        self.conv = (
            nn.Sequential(nn.Conv2d(8, 8, 3, stride, padding, groups=8), nn.BatchNorm2d(8))
            if conv
            else None
        )
        self.bn, self.avg = nn.BatchNorm2d(8), nn.AvgPool2d(**self.pool)
        self.functional, self.bn_first, self.identity = functional, bn_first, identity

    def forward(self, x):
        if self.bn_first:  # the pooling averages a BN's output
            pooled = self.avg(self.bn(x))
        else:
            y = torch.nn.functional.avg_pool2d(x, **self.pool) if self.functional else self.avg(x)
            pooled = self.bn(y)
        out = pooled + self.conv(x) if self.conv else pooled
        return (out + x if self.identity else out).relu()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"functional": True},
        {"conv": False},  # the pooled and identity branches alone: one depthwise conv
        {"padding": 0, "bn_first": True, "identity": False},  # unpadded: a BN may go first
        {"stride": 2, "identity": False},  # strided like the conv beside it
    ],
)
def test_an_average_pooling_of_the_input_collapses_as_a_depthwise_conv(kwargs):
    model = wrapped(Pooled(**kwargs))
    out, report = folded(model)
    assert not report.left and batchnorms(out) == 0, report.left
    (conv,) = [m for m in out.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == 8 and conv.kernel_size == (3, 3)
    assert conv.stride == (kwargs.get("stride", 1),) * 2
    assert all("1 average pooling into" in str(e) for e in report.folded), report.folded


@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({"count_include_pad": False}, "averages real values only at the border"),
        ({"ceil_mode": True}, "ceil mode"),
        ({"bn_first": True}, "pads what a BN shifted"),
    ],
)
def test_pooled_branches_that_are_not_one_conv_are_refused(kwargs, why):
    _, report = folded(wrapped(Pooled(**kwargs)))
    left = {s.bn: s.reason for s in report.left}
    assert "0.bn" in left and why in left["0.bn"], left


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "fastvit_t8", "ghostnetv3_050"])
def test_a_folded_zoo_model_runs_the_convs_of_timms_own_reparameterize(name):
    """The latency target (folded no slower than ``reparameterize_model``) by structure: the
    same convs (shape, stride, padding, dilation, groups; a block rewritten registers its
    convs in its own order), weights contiguous, and no BN where timm keeps some (FastViT's,
    GhostNetV3's), so no more work."""
    model = prepared(bnsurgery.load(f"timm:{name}(num_classes=5)"))
    x = torch.randn(2, 3, 64, 64)
    ours = bnsurgery.fold(copy.deepcopy(model), x)
    theirs = reparameterize_model(model)

    def specs(m):
        return sorted(
            str((tuple(c.weight.shape), c.stride, c.padding, c.dilation, c.groups))
            for c in m.modules()
            if isinstance(c, nn.Conv2d)
        )

    assert specs(ours) == specs(theirs)
    assert all(p.is_contiguous() for p in ours.parameters())
    assert batchnorms(ours) == 0 and sum(1 for _ in ours.modules()) <= sum(
        1 for _ in theirs.modules()
    )
