"""Fused freezing: each frozen BN computed inside the conv or linear before it
(``freeze(fuse=True)``), with the function, gradients, state dict and reversibility of a
plain freeze."""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnsurgery
from bnsurgery.frozen import FrozenBatchNorm
from bnsurgery.fused import FusedConv2d, FusedLinear

from . import models
from .conftest import prepared


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return float((a - b).abs().max() / max(float(a.abs().max()), 1e-300))


def step(model, x):
    """One training forward-backward (dropout drawing the same masks each time); the output."""
    torch.manual_seed(0)
    model.train()
    out = model(x)
    out.square().mean().backward()
    return out.detach()


def plain_and_fused(model, x, **options):
    plain = bnsurgery.freeze(copy.deepcopy(model), **options)
    fused = bnsurgery.freeze(copy.deepcopy(model), fuse=True, example_inputs=x, **options)
    return plain, fused


@pytest.mark.parametrize("train_affine", [False, True], ids=["affine_fixed", "affine_trained"])
@pytest.mark.parametrize("name", list(models.SEEDS))
def test_same_function_and_gradients_as_a_plain_freeze_in_float64(name, train_affine):
    factory, size = models.SEEDS[name]
    model = prepared(factory()).double()
    x = torch.randn(4, *size, dtype=torch.float64)
    plain, fused = plain_and_fused(model, x, train_affine=train_affine)
    report = bnsurgery.last_report(fused)
    assert report.fused, report.unfused
    assert len(report.fused) + len(report.unfused) == len(report.changed)
    for bn, layer in report.fused:
        assert fused.get_submodule(bn).fused
        assert type(fused.get_submodule(layer)).__name__.startswith("Fused")
    assert rel(step(plain, x), step(fused, x)) < 1e-12
    a, b = grads(plain), grads(fused)
    assert a.keys() == b.keys() and a  # the same parameters learn
    for key in a:
        assert rel(a[key], b[key]) < 1e-10, key
    bn_grads = [k for k in a if any(k.startswith(bn + ".") for bn, _ in report.fused)]
    assert bool(bn_grads) == train_affine  # a trainable affine learns through the layer


def test_state_dict_round_trip_and_unfreeze_are_exact():
    model = prepared(models.SimpleCNN())
    x = torch.randn(2, 3, 32, 32)
    original = copy.deepcopy(model)
    plain, fused = plain_and_fused(model, x, train_affine=True)
    state = fused.state_dict()
    assert list(state) == list(plain.state_dict()) == list(original.state_dict())
    assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())
    # a fused checkpoint loads into the original architecture, and back into a fused model
    fresh = models.SimpleCNN()
    fresh.load_state_dict(state)
    again = bnsurgery.freeze(models.SimpleCNN(), fuse=True, example_inputs=x)
    again.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), original.eval()(x), rtol=1e-5, atol=1e-6)
    # unfreeze: exactly the original modules, classes, flags and tensors
    bnsurgery.unfreeze(fused)
    for (n, m), (_, o) in zip(fused.named_modules(), original.named_modules(), strict=True):
        assert type(m) is type(o), n
        assert m.training == o.training, n
        assert "fused_bn" not in vars(m) and "_fused_into" not in vars(m), n
    for (n, p), (_, q) in zip(fused.named_parameters(), original.named_parameters(), strict=True):
        assert torch.equal(p, q) and p.requires_grad == q.requires_grad, n
    with torch.no_grad():
        assert torch.equal(fused.eval()(x), original.eval()(x))


def test_it_stays_frozen_in_train_mode_at_batch_size_1_and_survives_copies():
    model = prepared(models.SimpleCNN())
    x = torch.randn(1, 3, 32, 32)
    _, fused = plain_and_fused(model, torch.randn(2, 3, 32, 32))
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with torch.no_grad():
        reference = model.eval()(x)
        torch.testing.assert_close(fused.train()(x), reference, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in before.items())
    # deep copies and pickles keep the link between each layer and its BN
    for clone in (copy.deepcopy(fused), _pickled(fused)):
        report = bnsurgery.last_report(fused)
        for bn, layer in report.fused:
            assert clone.get_submodule(layer).fused_bn is clone.get_submodule(bn)
        with torch.no_grad():
            torch.testing.assert_close(clone.train()(x), reference, rtol=1e-5, atol=1e-6)
    double = copy.deepcopy(fused).double()  # .to() moves the BN the layer reads
    with torch.no_grad():
        torch.testing.assert_close(double(x.double()).float(), reference, rtol=1e-4, atol=1e-5)


def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_torch_compile_and_autocast():
    model = prepared(models.SimpleCNN())
    x = torch.randn(2, 3, 32, 32)
    plain, fused = plain_and_fused(model, x, train_affine=True)
    compiled = torch.compile(copy.deepcopy(fused), backend="aot_eager")
    torch.testing.assert_close(step(compiled, x), step(plain, x), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = plain.train()(x), fused.train()(x)
    assert b.dtype == torch.bfloat16
    assert rel(a.float(), b.float()) < 5e-2


def test_the_callers_saved_tensor_hooks_still_see_the_activations():
    """Activation offloading and memory counters (``saved_tensors_hooks`` of the caller's)
    see every activation autograd keeps, fused or not; only the scaled weight copy, which the
    fused layer keeps as its recipe, is not theirs. Offloaded to another place and back, the
    gradients are the plain freeze's."""
    model = prepared(models.SimpleCNN()).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    plain, fused = plain_and_fused(model, x, train_affine=True)
    for net in (plain, fused):
        params = {p.untyped_storage().data_ptr() for p in net.parameters()}
        seen, unpacked, alive = {}, [], []

        def pack(t, params=params, seen=seen, alive=alive):
            storage = t.untyped_storage()
            alive.append(t)  # no address reused while counting
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return ("offloaded", t.clone())  # as save_on_cpu does: a copy elsewhere

        def unpack(saved, unpacked=unpacked):
            unpacked.append(saved[0])
            return saved[1]

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            net.out = step(net, x)
        assert unpacked and set(unpacked) == {"offloaded"}
        assert x.untyped_storage().data_ptr() in seen  # the conv's input
        net.counted = sum(seen.values())
    assert rel(plain.out, fused.out) < 1e-12
    a, b = grads(plain), grads(fused)
    for key in a:
        assert rel(a[key], b[key]) < 1e-10, key
    # the conv inputs are seen in both; the plain freeze also keeps each BN's input (the conv's
    # output, 16 channels at 32 x 32) for the trainable affine
    assert fused.counted > x.numel() * 8  # the conv's input at least
    assert plain.counted - fused.counted >= 2 * 16 * 32 * 32 * 8


def test_ddp_train_step():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = prepared(models.SimpleCNN())
        x = torch.randn(2, 3, 32, 32)
        plain, fused = plain_and_fused(model, x, train_affine=True)
        ddp = nn.parallel.DistributedDataParallel(fused)
        torch.testing.assert_close(step(ddp, x), step(plain, x), rtol=1e-5, atol=1e-6)
        a, b = grads(plain), grads(fused)
        assert a.keys() == b.keys()
        for key in a:
            assert rel(a[key], b[key]) < 1e-4, key
    finally:
        dist.destroy_process_group()


class Unfusable(nn.Module):
    """Frozen BNs no layer can compute, each for its own reason."""

    class OwnForward(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    def __init__(self):
        super().__init__()
        self.own = self.OwnForward(3, 4, 3)
        self.bn_own = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)  # its conv's output is also read by the sum
        self.bn_first = nn.BatchNorm2d(4)  # after a ReLU: no layer before it
        self.head = nn.Conv2d(4, 4, 1)
        self.bn_head = nn.BatchNorm2d(4)  # fuses

    def forward(self, x):
        y = self.bn_own(self.own(x))
        z = self.conv(y)
        y = self.bn_shared(z) + z
        return self.bn_head(self.head(self.bn_first(y.relu())))


def test_what_cannot_fuse_stays_frozen_with_its_reason():
    model = prepared(Unfusable())
    x = torch.randn(2, 3, 8, 8)
    plain, fused = plain_and_fused(model, x)
    report = bnsurgery.last_report(fused)
    assert report.fused == [("bn_head", "head")]
    why = {s.bn: s.reason for s in report.unfused}
    assert set(why) == {"bn_own", "bn_shared", "bn_first"}
    assert "OwnForward" in why["bn_own"]
    assert "also" in why["bn_shared"]
    assert all(isinstance(fused.get_submodule(n), FrozenBatchNorm) for n in why)
    assert isinstance(fused.head, FusedConv2d) and type(fused.own) is Unfusable.OwnForward
    assert rel(step(plain, x), step(fused, x)) < 1e-5
    text = str(report)
    assert "computed inside" in text or "fused" in text


def test_a_linear_fuses_with_example_inputs_and_the_symbolic_walk_says_why_not():
    model = prepared(models.SimpleMLP())
    x = torch.randn(4, 10)
    _, fused = plain_and_fused(model, x)
    layers = [m for m in fused.modules() if isinstance(m, FusedLinear)]
    assert layers and len(layers) == len(bnsurgery.last_report(fused).fused)
    symbolic = bnsurgery.freeze(copy.deepcopy(model), fuse=True)
    report = bnsurgery.last_report(symbolic)
    assert not report.fused and all("rank" in s.reason for s in report.unfused)


class NamedConv(nn.Conv2d):
    """A subclass that keeps nn.Conv2d's forward (as torchvision's Conv3DSimple does)."""

    kind = "named"


class WithNamedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = NamedConv(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_a_subclass_that_keeps_its_forward_fuses_and_stays_itself():
    model = prepared(WithNamedConv())
    x = torch.randn(2, 3, 8, 8)
    plain, fused = plain_and_fused(model, x, train_affine=True)
    assert bnsurgery.last_report(fused).fused == [("bn", "conv")]
    assert isinstance(fused.conv, NamedConv) and fused.conv.kind == "named"
    assert type(fused.conv).__name__ == "FusedNamedConv"
    for clone in (copy.deepcopy(fused), _pickled(fused)):
        assert type(clone.conv) is type(fused.conv) and clone.conv.fused_bn is clone.bn
        assert rel(step(plain, x), step(clone, x)) < 1e-5
    bnsurgery.unfreeze(fused)
    assert type(fused.conv) is NamedConv


def test_a_fused_model_saves_and_its_frozen_checkpoint_fuses_again(tmp_path):
    """The file records a plain freeze (fusion is how the model runs); loaded back, the model
    is frozen, and freeze(fuse=True) fuses the BNs it froze before."""
    model = prepared(models.SimpleCNN())
    x = torch.randn(2, 3, 32, 32)
    _, fused = plain_and_fused(model, x, train_affine=True)
    path = bnsurgery.save(fused, tmp_path / "f.safetensors", arch="tests.models:SimpleCNN")
    loaded = bnsurgery.load(path, arch="tests.models:SimpleCNN")
    frozen = [m for m in loaded.modules() if isinstance(m, FrozenBatchNorm)]
    assert frozen and not any(m.fused for m in frozen)
    assert all(m.train_affine for m in frozen)
    bnsurgery.freeze(loaded, train_affine=True, fuse=True, example_inputs=x)
    report = bnsurgery.last_report(loaded)
    assert report.fused == bnsurgery.last_report(fused).fused and not report.left
    assert rel(step(fused, x), step(loaded, x)) < 1e-6
    again = bnsurgery.freeze(loaded, train_affine=True, fuse=True, example_inputs=x)
    assert not bnsurgery.last_report(again).changed  # already fused: nothing to do


def test_the_cli_says_what_fuses_and_writes_the_frozen_checkpoint(tmp_path, capsys):
    from .test_cli import run

    out = tmp_path / "f.safetensors"
    code, report, err = run(capsys, "freeze", "tests.models:simple_cnn", "--fuse", "-o", out)
    assert code == 0, err
    assert "computed inside" in report and "stay plain frozen" in report
    loaded = bnsurgery.load(out, arch="tests.models:simple_cnn")
    assert any(isinstance(m, FrozenBatchNorm) for m in loaded.modules())


def test_other_surgeries_see_plain_frozen_bns_and_fused_pairs_come_back(tmp_path):
    """fold, swap, recalibrate and export on a fused model: each works as on a plain frozen
    one (a fused layer would otherwise apply a BN that was folded or replaced a second time);
    a pair still in place afterwards is fused again."""
    model = prepared(models.SimpleCNN())
    x = torch.randn(4, 3, 32, 32)
    plain, fused = plain_and_fused(model, x)
    pairs = bnsurgery.last_report(fused).fused
    with torch.no_grad():
        reference = plain.eval()(x)

    folded = bnsurgery.fold(copy.deepcopy(fused), x)
    assert not any(isinstance(m, (FrozenBatchNorm, FusedConv2d)) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), reference, rtol=1e-4, atol=1e-5)

    swapped = bnsurgery.swap(copy.deepcopy(fused), "identity")
    assert not any(isinstance(m, FusedConv2d) for m in swapped.modules())

    again = bnsurgery.recalibrate(copy.deepcopy(fused), [x, x])
    again_plain = bnsurgery.recalibrate(copy.deepcopy(plain), [x, x])
    for key, value in again_plain.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert [(b, type(again.get_submodule(layer)).__name__) for b, layer in pairs] == [
        (b, "FusedConv2d") for b, _ in pairs
    ]  # still frozen in place: fused again

    report = bnsurgery.export(fused, x, tmp_path / "m.pt2")
    from .test_export import batch_norm_nodes, run_artifact

    assert not batch_norm_nodes(tmp_path / "m.pt2") and len(report.folded) == len(pairs)
    (got,) = run_artifact(tmp_path / "m.pt2", x)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    assert isinstance(fused.get_submodule(pairs[0][1]), FusedConv2d)  # the model given: as it was
