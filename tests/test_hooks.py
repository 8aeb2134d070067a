"""hooks: the user's hooks on a BN carried onto its replacement, and suspended (module and
global) during bnsurgery's own forward passes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bnsurgery.hooks import call_input, carry_hooks, has_hooks, user_hooks, user_hooks_suspended


def test_call_input_positional_and_keyword():
    assert call_input((1, 2), {"input": 3}) == 1
    assert call_input((), {"input": 3}) == 3
    assert call_input((), {}) is None
    assert call_input((), None) is None


def test_call_input_reads_what_a_kwargs_hook_sees():
    bn = nn.BatchNorm2d(2).eval()
    seen = []
    bn.register_forward_pre_hook(lambda m, a, kw: seen.append(call_input(a, kw)), with_kwargs=True)
    x, y = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    bn(x)
    bn(input=y)
    assert len(seen) == 2 and seen[0] is x and seen[1] is y


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


def test_carried_hooks_keep_pre_hooks_kwargs_hooks_and_their_order():
    bn, new = nn.BatchNorm2d(2), nn.Identity()
    calls = []
    bn.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    bn.register_forward_hook(lambda m, a, kw, out: calls.append(("kw", kw)), with_kwargs=True)
    bn.register_forward_hook(lambda m, a, out: calls.append("post"))
    assert carry_hooks(bn, new) is new
    new(input=torch.zeros(1))
    assert len(calls) == 3 and calls[0] == "pre" and calls[2] == "post"
    assert calls[1][0] == "kw" and torch.equal(calls[1][1]["input"], torch.zeros(1))


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


def test_suspension_keeps_carried_tables_shared_and_comes_back_after_an_error():
    bn, new = nn.BatchNorm2d(2), nn.Identity()
    calls = []
    bn.register_forward_hook(lambda *a: calls.append("user"))
    carry_hooks(bn, new)
    model = nn.Sequential(new)
    with pytest.raises(RuntimeError, match="boom"), user_hooks_suspended(model):
        new(torch.zeros(1))
        raise RuntimeError("boom")
    assert calls == []
    assert new._forward_hooks is bn._forward_hooks  # restored in place, still shared
    new(torch.zeros(1))
    assert calls == ["user"]


def test_hooks_registered_inside_the_block_stay_after_the_users():
    conv = nn.Conv2d(1, 1, 1)
    calls = []
    conv.register_forward_hook(lambda *a: calls.append("user"))
    with user_hooks_suspended(conv):
        handle = conv.register_forward_hook(lambda *a: calls.append("own"))
        conv(torch.zeros(1, 1, 1, 1))
        assert calls == ["own"]
    conv(torch.zeros(1, 1, 1, 1))
    assert calls == ["own", "user", "own"]  # the user's first, as registered
    handle.remove()
    conv(torch.zeros(1, 1, 1, 1))
    assert calls == ["own", "user", "own", "user"]


def test_an_installed_librarys_hooks_stay_during_suspension():
    conv = nn.Conv2d(2, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated for parametrizations, still a hook
        conv = torch.nn.utils.weight_norm(conv)  # torch's own forward pre-hook sets .weight
    calls = []
    conv.register_forward_pre_hook(lambda *a: calls.append("user"))
    assert len(conv._forward_pre_hooks) == 2 and len(user_hooks(conv, "_forward_pre_hooks")) == 1
    before = conv.weight.detach().clone()
    with user_hooks_suspended(conv):
        assert len(conv._forward_pre_hooks) == 1
        with torch.no_grad():
            conv.weight_g.mul_(2.0)
            out = conv(torch.ones(1, 2, 1, 1))
    assert calls == []
    # the weight norm hook ran: the weight doubled with its magnitude
    bias = conv.bias.detach().view(1, 2, 1, 1)
    expected = torch.nn.functional.conv2d(torch.ones(1, 2, 1, 1), 2.0 * before) + bias
    torch.testing.assert_close(out, expected)
    assert len(conv._forward_pre_hooks) == 2
