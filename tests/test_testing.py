"""bnsurgery.testing: the helpers that give random-init models realistic BN statistics."""

from __future__ import annotations

import torch
from torch import nn

from bnsurgery.testing import match_bn_to_data, randomize_bn


def test_match_bn_to_data_sets_statistics_from_what_each_bn_sees_and_keeps_the_flags():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
    )
    randomize_bn(model, 0)
    model.train()
    model[3].eval()  # mixed flags must come back as they were
    flags = [m.training for m in model.modules()]
    x = torch.randn(4, 3, 10, 10) * 5 + 2
    match_bn_to_data(model, (x,))
    assert [m.training for m in model.modules()] == flags

    # the first BN's input is the conv output: mean within 0.1 sd (+ rounding), var within
    # a factor 0.8..1.25 of the data's
    with torch.no_grad():
        seen = model[0](x).transpose(0, 1).reshape(8, -1).double()
    mean, var = seen.mean(1), seen.var(1)
    bn = model[1]
    assert ((bn.running_mean.double() - mean).abs() <= 0.45 * var.sqrt() + 1e-5).all()
    ratio = bn.running_var.double() / var
    assert ((ratio > 0.8 - 1e-4) & (ratio < 1.25 + 1e-4)).all()
    # the second BN saw the first one's output as the final model normalises it
    with torch.no_grad():
        seen2 = model[:4].eval()(x).transpose(0, 1).reshape(4, -1).double()
    ratio2 = model[4].running_var.double() / seen2.var(1)
    assert ((ratio2 > 0.8 - 1e-4) & (ratio2 < 1.25 + 1e-4)).all()


def test_match_bn_to_data_keeps_the_statistics_of_a_bn_fed_only_empty_batches():
    net = nn.Sequential(nn.BatchNorm2d(3))
    match_bn_to_data(net, (torch.randn(0, 3, 4, 4),))
    assert torch.equal(net[0].running_mean, torch.zeros(3))
    assert torch.equal(net[0].running_var, torch.ones(3))
