from __future__ import annotations

import copy

import pytest
import torch

from bnsurgery.testing import randomize_bn
from bnsurgery.verify import max_relative_error


def prepared(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics (so a wrong fold shows) and eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(model, seed).eval()


def output(model, *args):
    with torch.no_grad():
        return model(*args)


def assert_same_function(original, folded, args, tol=1e-5):
    err = max_relative_error(output(original, *args), output(folded, *args))
    assert err <= tol, f"max relative error {err:.3g} > {tol}"
    return err


@pytest.fixture
def fresh_copy():
    return copy.deepcopy
