"""The module tree helpers: as_args, unwrapped, on_unwrapped, eval_mode, parents, device_of."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnsurgery.tree import as_args, device_of, eval_mode, on_unwrapped, parents, unwrapped


def small() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU())


# -------------------------------------------------------------------------------- as_args


def test_as_args_one_tensor_is_one_argument():
    x = torch.zeros(1)
    args = as_args(x)
    assert isinstance(args, tuple)
    assert len(args) == 1
    assert args[0] is x


def test_as_args_a_dict_is_one_argument():
    d = {"a": torch.zeros(1), "b": torch.ones(1)}
    args = as_args(d)
    assert len(args) == 1
    assert args[0] is d


def test_as_args_a_tuple_or_list_is_several_arguments():
    a, b = torch.zeros(1), torch.ones(1)
    for given in ((a, b), [a, b]):
        args = as_args(given)
        assert isinstance(args, tuple)
        assert len(args) == 2
        assert args[0] is a
        assert args[1] is b
    assert as_args(()) == ()
    assert as_args(None) == (None,)


# ------------------------------------------------------------------------------ unwrapped


def test_unwrapped_plain_module_is_itself():
    net = small()
    assert unwrapped(net) is net


def test_unwrapped_data_parallel():
    net = small()
    assert unwrapped(nn.DataParallel(net)) is net


def test_unwrapped_torch_compile_without_compiling():
    net = small()
    compiled = torch.compile(net)  # lazy: nothing is compiled until it is called
    assert compiled is not net
    assert type(compiled).__name__ == "OptimizedModule"
    assert unwrapped(compiled) is net


def test_unwrapped_nested_wrappers():
    net = small()
    wrapped = nn.DataParallel(torch.compile(nn.DataParallel(net)))
    assert unwrapped(wrapped) is net


def test_unwrapped_leaves_a_module_named_like_a_wrapper_without_orig_mod():
    class OptimizedModule(nn.Module):  # same class name, no _orig_mod module
        pass

    fake = OptimizedModule()
    assert unwrapped(fake) is fake


# --------------------------------------------------------------------------- on_unwrapped


def test_on_unwrapped_passes_the_inner_module_and_arguments():
    seen = []

    @on_unwrapped
    def surgery(model, a, *, b=None):
        """Doc of the surgery."""
        seen.append((model, a, b))
        return "result"

    net = small()
    assert surgery(nn.DataParallel(net), 1, b=2) == "result"
    assert len(seen) == 1
    assert seen[0][0] is net
    assert seen[0][1:] == (1, 2)
    assert surgery.__name__ == "surgery"
    assert surgery.__doc__ == "Doc of the surgery."


def test_on_unwrapped_returns_the_wrapper_when_the_surgery_returns_the_inner_module():
    @on_unwrapped
    def identity(model):
        return model

    net = small()
    wrapper = torch.compile(net)
    assert identity(wrapper) is wrapper
    assert identity(net) is net


def test_on_unwrapped_returns_a_new_module_as_is():
    replacement = nn.Identity()

    @on_unwrapped
    def replace(model):
        return replacement

    assert replace(nn.DataParallel(small())) is replacement


# ------------------------------------------------------------------------------ eval_mode


def mixed() -> nn.Sequential:
    net = nn.Sequential(small(), nn.BatchNorm2d(2), nn.Sequential(nn.Dropout(), nn.ReLU()))
    net.train()
    net[0][1].eval()  # a BN the user froze
    net[2].eval()  # a whole subtree in eval
    net[2][1].train()  # ...with one module in train inside it
    return net


def flags(net: nn.Module) -> list[bool]:
    return [m.training for m in net.modules()]


def test_eval_mode_puts_every_module_in_eval_and_restores_mixed_flags():
    net = mixed()
    before = flags(net)
    assert True in before
    assert False in before
    with eval_mode(net):
        assert not any(flags(net))
    assert flags(net) == before


def test_eval_mode_restores_flags_when_the_body_raises():
    net = mixed()
    before = flags(net)
    with pytest.raises(KeyError, match="boom"), eval_mode(net):
        assert not any(flags(net))
        raise KeyError("boom")
    assert flags(net) == before


def test_eval_mode_on_a_model_in_eval_stays_in_eval():
    net = small().eval()
    with eval_mode(net):
        pass
    assert not any(flags(net))


def test_eval_mode_makes_batchnorm_use_running_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).train()
    x = torch.randn(8, 3) * 5 + 2
    with eval_mode(bn):
        out = bn(x)
    assert torch.equal(out, x / torch.sqrt(torch.tensor(1 + bn.eps)))  # mean 0, var 1
    assert bn.num_batches_tracked.item() == 0
    assert bn.training


# -------------------------------------------------------------------------------- parents


def test_parents_of_a_nested_module():
    net = nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)))
    bn = net[0][1]
    assert parents(net, bn) == [(net[0], "1", "0.1")]


def test_parents_of_a_shared_module_registered_under_two_names():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(2)
            self.block = nn.Sequential(nn.Conv2d(2, 2, 1))
            self.block.norm = self.bn  # the same object, a second name
            self.alias = self.bn  # and a third, under the root

    net = Shared()
    found = parents(net, net.bn)
    assert len(found) == 3
    assert {path for _, _, path in found} == {"bn", "block.norm", "alias"}
    for parent, attr, path in found:
        assert getattr(parent, attr) is net.bn
        assert net.get_submodule(path) is net.bn
    by_path = {path: (parent, attr) for parent, attr, path in found}
    assert by_path["block.norm"] == (net.block, "norm")
    assert by_path["bn"] == (net, "bn")


def test_parents_of_a_module_that_is_not_in_the_model_or_is_the_model():
    net = small()
    assert parents(net, nn.ReLU()) == []
    assert parents(net, net) == []


# ------------------------------------------------------------------------------ device_of


def test_device_of_is_the_first_parameters_device():
    assert device_of(small()) == torch.device("cpu")
    with torch.device("meta"):
        meta = small()
    assert device_of(meta) == torch.device("meta")


def test_device_of_a_model_without_parameters_is_the_cpu():
    assert device_of(nn.ReLU()) == torch.device("cpu")
    with torch.device("meta"):
        buffers_only = nn.BatchNorm2d(2, affine=False)
    # buffers do not count: only parameters say where the model is
    assert device_of(buffers_only) == torch.device("cpu")
