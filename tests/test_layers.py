"""layers: the modules bnsurgery puts in place of a BN, each called like the BN it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnsurgery.layers import (
    ChannelLayerNorm,
    FoldedBatchNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    NormAct,
    NormActRemainder,
)

SHAPES = {2: (3, 5), 3: (3, 5, 7), 4: (2, 5, 3, 4), 5: (2, 5, 2, 3, 2)}


def _affine(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
        module.bias.copy_(torch.randn(module.bias.shape, generator=g))
    return module


# ---- ChannelLayerNorm ----------------------------------------------------------------------


@pytest.mark.parametrize("rank", sorted(SHAPES))
def test_channel_layer_norm_normalises_over_the_channel_dim(rank):
    norm = _affine(ChannelLayerNorm(5, eps=1e-3)).double()
    x = torch.randn(SHAPES[rank], dtype=torch.float64) * 3 + 1
    expected = F.layer_norm(x.movedim(1, -1), (5,), norm.weight, norm.bias, 1e-3).movedim(-1, 1)
    out = norm(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # without the affine, every position's channels have mean 0 and variance 1
    plain = ChannelLayerNorm(5, eps=0.0, affine=False).double()(x)
    mean, var = plain.mean(1), plain.var(1, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-12, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-12, rtol=0)
    assert out.is_contiguous() and out.view(-1).numel() == x.numel()


def test_channel_layer_norm_keeps_the_layout_it_was_given():
    norm = _affine(ChannelLayerNorm(5))
    x = torch.randn(2, 5, 3, 4)
    last = x.to(memory_format=torch.channels_last)
    out = norm(last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, norm(x)) and norm(x).is_contiguous()
    assert norm(x).view(2, -1).shape == (2, 60)  # user code's .view after the norm it replaced


def test_channel_layer_norm_without_affine_has_no_parameters():
    norm = ChannelLayerNorm(4, affine=False)
    assert norm.weight is None and norm.bias is None and norm.eps == 1e-5
    assert dict(norm.state_dict()) == {}


# ---- instance norm on empty batches ---------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs", "shape"),
    [
        (InstanceNorm1d, nn.InstanceNorm1d, (0, 3, 5)),
        (InstanceNorm2d, nn.InstanceNorm2d, (0, 3, 4, 4)),
        (InstanceNorm3d, nn.InstanceNorm3d, (0, 3, 2, 2, 2)),
    ],
    ids=["1d", "2d", "3d"],
)
def test_instance_norm_passes_an_empty_batch_where_torchs_affine_one_raises(ours, theirs, shape):
    empty = torch.zeros(shape)
    with pytest.raises(IndexError):
        theirs(3, affine=True)(empty)
    norm = ours(3, affine=True)
    out = norm(empty)
    assert out.shape == shape and out is not empty
    assert isinstance(norm, theirs)
    # a non-empty batch: exactly torch's
    full = torch.randn(2, *shape[1:])
    reference = theirs(3, affine=True)
    _affine(norm), _affine(reference)
    assert torch.equal(norm(full), reference(full))


# ---- NormAct, NormActRemainder -------------------------------------------------------------


class _Step(nn.Module):
    """y = x * scale + shift, logging its name when called."""

    def __init__(self, name: str, log: list[str], scale: float, shift: float) -> None:
        super().__init__()
        self.name, self.log, self.scale, self.shift = name, log, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        return x * self.scale + self.shift


def test_norm_act_applies_norm_then_drop_then_act():
    log: list[str] = []
    norm, drop, act = _Step("norm", log, 2, 0), _Step("drop", log, 1, 1), _Step("act", log, 3, 0)
    layer = NormAct(norm, drop, act)
    assert layer.norm is norm and layer.drop is drop and layer.act is act
    out = layer(torch.tensor([1.0, -2.0]))
    assert log == ["norm", "drop", "act"]
    assert torch.equal(out, torch.tensor([9.0, -9.0]))  # ((x * 2) + 1) * 3


def test_norm_act_remainder_applies_drop_then_act_under_the_same_names():
    log: list[str] = []
    layer = NormActRemainder(_Step("drop", log, 1, 1), _Step("act", log, 3, 0))
    assert torch.equal(layer(torch.tensor([1.0, -2.0])), torch.tensor([6.0, -3.0]))
    assert log == ["drop", "act"]
    prelu = NormActRemainder(nn.Identity(), nn.PReLU(4))
    assert list(prelu.state_dict()) == ["act.weight"]  # the norm-act layer's key, kept


# ---- FoldedBatchNorm -----------------------------------------------------------------------


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


def test_a_folded_bn_keeps_the_bns_size_and_eps_but_none_of_its_values():
    bn = nn.BatchNorm1d(3, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.fill_(4.0)
        bn.weight.fill_(-2.0)
    left = FoldedBatchNorm(bn)
    assert left.num_features == 3 and left.eps == 1e-3
    assert torch.equal(left.running_mean, torch.zeros(3))
    assert torch.equal(left.weight, torch.ones(3)) and torch.equal(left.bias, torch.zeros(3))
    assert list(left.parameters()) == [] and left.state_dict() == {}
    assert repr(left) == "FoldedBatchNorm(3, folded)"
    assert nn.Sequential(left).load_state_dict({}, strict=True) == ([], [])


# ---- the BN's calling convention: bn(input=x) ----------------------------------------------


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: ChannelLayerNorm(3), (2, 3, 4, 4)),
        (lambda: InstanceNorm1d(3, affine=True), (2, 3, 5)),
        (lambda: InstanceNorm2d(3, affine=True), (2, 3, 4, 4)),
        (lambda: InstanceNorm3d(3, affine=True), (2, 3, 2, 2, 2)),
        (lambda: NormAct(nn.GroupNorm(1, 3), nn.Identity(), nn.SiLU()), (2, 3, 4, 4)),
        (lambda: NormActRemainder(nn.Identity(), nn.SiLU()), (2, 3, 4, 4)),
        (lambda: FoldedBatchNorm(nn.BatchNorm2d(3)), (2, 3, 4, 4)),
    ],
    ids=[
        "ChannelLayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "NormAct",
        "NormActRemainder", "FoldedBatchNorm",
    ],
)  # fmt: skip
def test_called_by_keyword_as_a_bn_is(make, shape):
    layer = make().eval()
    x = torch.randn(shape) * 2 + 1
    by_keyword = layer(input=x)
    assert torch.equal(by_keyword, layer(x))
    assert by_keyword.shape == x.shape
