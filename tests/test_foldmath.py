"""The fold maths against direct computation in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnsurgery.foldmath import fold_consumer, fold_producer

D = torch.float64


def bn(x, scale, shift):
    shape = [1, -1] + [1] * (x.dim() - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


def rand(*shape):
    return torch.randn(*shape, dtype=D)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_producer_conv(dims, groups, with_bias):
    conv = getattr(F, f"conv{dims}d")
    x = rand(2, 8, *([6] * dims))
    w, b = rand(12, 8 // groups, *([3] * dims)), rand(12) if with_bias else None
    scale, shift = rand(12), rand(12)
    fw, fb = fold_producer("conv", w, b, scale, shift, groups)
    expected = bn(conv(x, w, b, groups=groups, stride=2, dilation=1), scale, shift)
    torch.testing.assert_close(conv(x, fw, fb, groups=groups, stride=2), expected)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_producer_conv_transpose(dims, groups):
    convt = getattr(F, f"conv_transpose{dims}d")
    x = rand(2, 4, *([5] * dims))
    w, b = rand(4, 6 // groups, *([3] * dims)), rand(6)
    scale, shift = rand(6), rand(6)
    fw, fb = fold_producer("conv_transpose", w, b, scale, shift, groups)
    expected = bn(convt(x, w, b, stride=2, groups=groups), scale, shift)
    torch.testing.assert_close(convt(x, fw, fb, stride=2, groups=groups), expected)


def test_producer_linear_and_reference():
    x, w, b = rand(5, 7), rand(3, 7), rand(3)
    scale, shift = rand(3), rand(3)
    fw, fb = fold_producer("linear", w, b, scale, shift)
    torch.testing.assert_close(F.linear(x, fw, fb), F.linear(x, w, b) * scale + shift)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_consumer_conv(groups):
    x = rand(2, 8, 7, 7)
    w, b = rand(12, 8 // groups, 3, 3), rand(12)
    scale, shift = rand(8), rand(8)
    fw, fb = fold_consumer("conv", w, b, scale, shift, groups)
    expected = F.conv2d(bn(x, scale, shift), w, b, groups=groups)
    torch.testing.assert_close(F.conv2d(x, fw, fb, groups=groups), expected)


def test_consumer_linear_without_bias():
    x, w = rand(4, 6), rand(3, 6)
    scale, shift = rand(6), rand(6)
    fw, fb = fold_consumer("linear", w, None, scale, shift)
    torch.testing.assert_close(F.linear(x, fw, fb), F.linear(x * scale + shift, w))


def test_consumer_rejects_transposed():
    with pytest.raises(ValueError):
        fold_consumer("conv_transpose", rand(4, 2, 3, 3), None, rand(4), rand(4))
