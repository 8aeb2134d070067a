"""bnsurgery.verify.max_relative_error against the independent measure in tests/measure.py."""

from __future__ import annotations

import math

import pytest
import torch

from bnsurgery import verify
from bnsurgery.verify import max_relative_error

from .measure import max_rel_error


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_chunked_error_equals_the_whole_tensor_error(monkeypatch, chunk):
    monkeypatch.setattr(verify, "_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 7, generator=gen) * torch.logspace(-3, 3, 7)
    b = a + 1e-6 * torch.randn(a.shape, generator=gen)
    b[2, 4, 6] += 0.5  # the largest difference sits in the last chunk
    a[0, 0, 0] = b[0, 0, 0] = float("nan")
    a[1, 1, 1] = b[1, 1, 1] = -float("inf")
    out_a, out_b = {"x": a, "y": (a[0], 3)}, {"x": b, "y": (b[0], 3)}
    assert max_relative_error(out_a, out_b) == pytest.approx(max_rel_error(out_a, out_b), rel=1e-12)
    assert max_relative_error(out_a, out_b) == pytest.approx(
        0.5 / a[a.isfinite()].abs().max().item()
    )
    same = max_relative_error(a, b)
    assert max_relative_error(a.transpose(0, 2), b.transpose(0, 2)) == same  # any layout


@pytest.mark.parametrize(
    "a, b",
    [
        (torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])),
        (torch.tensor([1.0, float("inf")]), torch.tensor([1.0, -float("inf")])),
        (torch.tensor([1.0, float("inf")]), torch.tensor([1.0, 1e30])),
        (torch.ones(2), torch.ones(3)),
        (torch.tensor([1, 2]), torch.tensor([1, 3])),
        ((torch.ones(2),), [torch.ones(2)]),
    ],
)
def test_mismatches_are_infinite(a, b):
    assert max_relative_error(a, b) == math.inf


def test_equal_empty_and_all_nan_outputs_are_zero():
    assert max_relative_error(torch.empty(0, 4), torch.empty(0, 4)) == 0.0
    nan = torch.full((3,), float("nan"))
    assert max_relative_error(nan, nan.clone()) == 0.0
    assert max_relative_error(torch.tensor([1, 2]), torch.tensor([1, 2])) == 0.0
