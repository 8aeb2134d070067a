"""Every surgery on generated architectures (hypothesis): the invariants that must always hold.

Architectures come from :func:`tests.archgen.architectures`: DAGs of convs (1d/2d/3d, functional,
transposed), linears, every BN flavour, activations, residual adds, concatenations, reshapes,
in-place ops, reused modules and shared BNs, in float32, float64 and bfloat16, with BN variances
from 1e-8 to 1e4. The checks are plain functions, so ``test_generated_regressions.py`` runs the
same ones on the examples hypothesis has found.

Examples per test: 200 by default (``BNSURGERY_EXAMPLES`` changes it); CI runs are
derandomised, so a red run reproduces. ``HYPOTHESIS_PROFILE=explore`` draws fresh examples.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from torch import nn
from torch.utils._pytree import tree_flatten

import bnsurgery
from bnsurgery.frozen import FrozenBatchNorm
from bnsurgery.moments import batch_normalised
from bnsurgery.verify import default_tolerance, max_relative_error

from . import tally
from .archgen import DTYPES, architectures, bn_modules, build, describe, extras, inputs
from .conftest import assert_identical

pytestmark = pytest.mark.generated


def run(model: nn.Module, x: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(x.clone())  # a fresh input: in-place ops never touch the caller's


def leaves(output: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]


def own_noise(model: nn.Module, x: torch.Tensor, out: Any) -> float:
    """How far the model's own output in its dtype is from the same model in float64."""
    if x.dtype == torch.float64:
        return 0.0
    return max_relative_error(run(copy.deepcopy(model).double(), x.double()), out)


# ------------------------------------------------------------------------------------ fold


def check_fold(arch: dict[str, Any]) -> dict[str, bool]:
    model = build(arch)
    x = inputs(arch)
    state = copy.deepcopy(model.state_dict())
    reference = run(model, x)
    folded = bnsurgery.fold(copy.deepcopy(model), x)
    report = bnsurgery.last_report(folded)
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, state[key]), key

    # every BN is accounted for: folded, or left with a reason
    names = set(bn_modules(model))
    done = {e.bn for e in report.folded}
    left = {s.bn: s.reason for s in report.left}
    assert done | set(left) == names and not done & set(left), (done, left, names)
    assert all(reason.strip() for reason in left.values()), left
    assert set(bn_modules(folded)) == set(left)

    # same function: within the dtype's tolerance, or within what the dtype's own rounding
    # does to this model (a random network can amplify it), which a wrong fold exceeds
    # (where the model's output in its dtype is off from float64 by half its size or more,
    # the dtype cannot represent the function: there is no tolerance to hold a fold to)
    after = run(folded, x)
    error = max_relative_error(reference, after)
    noise = own_noise(model, x, reference)
    allowed = max(default_tolerance(reference), 4 * noise)
    if noise < 0.5:
        assert error <= allowed, f"fold error {error:.3g} > {allowed:.3g}\n{describe(arch)}"

    # the same architecture in float64, where rounding cannot hide a wrong fold
    if arch["dtype"] != "float64":
        model64 = build(dict(arch, dtype="float64"))
        x64 = inputs(dict(arch, dtype="float64"))
        reference64 = run(model64, x64)
        error64 = max_relative_error(reference64, run(bnsurgery.fold(model64, x64), x64))
        assert error64 <= 1e-9, f"float64 fold error {error64:.3g}\n{describe(arch)}"
    return {
        "folded": bool(done),
        "float64 only": noise >= 0.5,
        "cat": any(e.parts and e.placement == "producer" for e in report.folded),
        "several layers": any(e.parts and e.placement == "consumer" for e in report.folded),
        "region": any(e.placement == "region" for e in report.folded),
        "pooled region": any(
            e.collapse and any(s.pools for s in e.collapse.sums) for e in report.folded
        ),
        "into a BN": any(p.layer == "batchnorm" for e in report.folded for p in e.targets()),
        "nested region": any(  # a nested block's region, collapsed in the block around it
            e.collapse and any(p.startswith("inner.") for s in e.collapse.sums for p in s.layers)
            for e in report.folded
        ),
    }


#: what a fold's outcome counts, by the key of :func:`check_fold`'s result
_COUNTED = {
    "cat": "generated: fold (a BN folded per slice after cat)",
    "region": "generated: fold (a block's branches collapsed)",
    "pooled region": "generated: fold (a block's pooled branch collapsed)",
    "into a BN": "generated: fold (a BN folded into the BN after it)",
    "nested region": "generated: fold (a nested block's branches collapsed)",
    "several layers": "generated: fold (a BN folded into several layers after it)",
    "float64 only": "generated: fold (dtype cannot represent the model)",
}


def _count(outcome: dict[str, bool], arch, keys) -> None:
    for key in keys:
        if outcome[key]:
            tally.add_unique(_COUNTED[key], arch)


@given(architectures(layer_bn_pairs=True))
def test_fold_of_layer_bn_pairs(arch):
    """Graphs where every conv/linear feeds its own BN: most of these BNs must fold (the
    exceptions are functional convs without bias, BNs without running statistics, and folds
    left for precision), and the same invariants hold."""
    outcome = check_fold(arch)
    tally.add_unique("generated: fold (layer-BN pairs)", arch)
    if outcome["folded"]:
        tally.add_unique("generated: fold (layer-BN pairs, a BN folded)", arch)
    _count(outcome, arch, ("cat", "region"))


@given(architectures())
def test_fold_keeps_the_function_or_says_why(arch):
    outcome = check_fold(arch)
    tally.add_unique("generated: fold", arch)
    if outcome["folded"]:
        tally.add_unique("generated: fold (with a BN folded)", arch)
    _count(outcome, arch, _COUNTED)


# ---------------------------------------------------------------------------------- freeze


def _sgd_step(model: nn.Module, x: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)
    loss = sum(t.float().pow(2).mean() for t in leaves(model(x.clone())))
    if not loss.requires_grad:  # the output does not depend on any trainable parameter
        return
    loss.backward()
    optimizer.step()


def check_freeze(arch: dict[str, Any], train_affine: bool = False) -> None:
    model = build(arch)
    original = copy.deepcopy(model)
    frozen = bnsurgery.freeze(model, train_affine=train_affine)
    report = bnsurgery.last_report(frozen)
    names = set(bn_modules(original))
    assert set(report.changed) | {n for n, _ in report.left} == names
    assert all(reason.strip() for _, reason in report.left)

    # a train step: frozen statistics and (unless train_affine) affine stay; the rest moves
    keep = {}
    for name in report.changed:
        bn = frozen.get_submodule(name)
        assert isinstance(bn, FrozenBatchNorm)
        for key, value in bn.state_dict().items():
            if train_affine and key in ("weight", "bias"):
                continue
            keep[f"{name}.{key}"] = value.clone()
    # batch size 1 works once BN is frozen; a BN left unfrozen still needs two values per channel
    batch = 2 if report.left else 1
    x = inputs(arch, batch=batch)
    frozen.train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    _sgd_step(frozen, x)
    after = frozen.state_dict()
    for key, value in keep.items():
        assert torch.equal(after[key], value), f"{key} moved\n{describe(arch)}"
    moved = [k for k in before if k not in keep and not torch.equal(before[k], after[k])]
    trainable = [p for p in frozen.parameters() if p.requires_grad and p.grad is not None]
    # (in bfloat16 a small step can round to no change at all; the gradient is the evidence)
    if any(bool(p.grad.abs().sum() > 0) for p in trainable) and arch["dtype"] != "bfloat16":
        assert moved, "nothing trained"
    assert frozen.training and all(m.training for m in frozen.modules())

    # the frozen layers compute in train mode what they compute in eval mode
    with torch.no_grad():
        train_out = frozen.train()(x.clone())
        eval_out = frozen.eval()(x.clone())
    for a, b in zip(leaves(train_out), leaves(eval_out), strict=True):
        assert torch.equal(a, b), describe(arch)

    # unfreeze gives back exactly the original
    if report.changed:
        again = bnsurgery.freeze(copy.deepcopy(original), train_affine=train_affine)
        assert_identical(original, bnsurgery.unfreeze(again))


@given(architectures())
def test_freeze_holds_through_a_train_step_and_unfreezes_exactly(arch):
    check_freeze(arch, train_affine=extras(arch).random() < 0.3)
    tally.add_unique("generated: freeze", arch)


def check_fused_freeze(arch: dict[str, Any], train_affine: bool = False) -> None:
    """freeze(fuse=True) against a plain freeze, both in float64: the same outputs in train
    mode and the same gradients for every parameter, the same state dict; every frozen BN is
    fused or has a reason; unfreeze gives back exactly the original."""
    original = build(arch).double()
    x = inputs(arch).double()
    plain = bnsurgery.freeze(copy.deepcopy(original), train_affine=train_affine)
    fused = bnsurgery.freeze(
        copy.deepcopy(original), train_affine=train_affine, fuse=True, example_inputs=x
    )
    report = bnsurgery.last_report(fused)
    assert sorted([b for b, _ in report.fused] + [s.bn for s in report.unfused]) == sorted(
        report.changed
    ), describe(arch)
    assert all(s.reason.strip() for s in report.unfused)
    tally.add("generated: BN layers fused", len(report.fused))
    tally.add("generated: BN layers frozen, not fused", len(report.unfused))
    assert list(fused.state_dict()) == list(plain.state_dict())
    outs = []
    for model in (plain, fused):
        model.train()
        out = leaves(model(x.clone()))
        loss = sum(t.pow(2).mean() for t in out if t.is_floating_point())
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        outs.append(out)
    for a, b in zip(*outs, strict=True):
        assert max_relative_error(a.detach(), b.detach()) < 1e-9, describe(arch)
    # each gradient to 1e-8 of the largest one (a gradient that is zero in exact arithmetic,
    # behind a BN that normalises with batch statistics, is rounding noise in both)
    grads = [p.grad for p in plain.parameters() if p.grad is not None]
    scale = max((float(g.abs().max()) for g in grads if g.numel()), default=0.0)
    for (name, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None and p.grad.numel():
            err = float((p.grad - q.grad).abs().max())
            assert err <= 1e-8 * scale, f"{name}: {err:.3g} of {scale:.3g}\n{describe(arch)}"
    if report.changed:
        fused.train(original.training)  # the mode the original was in
        assert_identical(original, bnsurgery.unfreeze(fused))


@given(architectures())
def test_fused_freeze_has_the_function_and_gradients_of_a_plain_freeze(arch):
    check_fused_freeze(arch, train_affine=extras(arch).random() < 0.5)
    tally.add_unique("generated: fused freeze", arch)


# ------------------------------------------------------------------------------------ swap


def check_swap(arch: dict[str, Any]) -> None:
    model = build(arch)
    x = inputs(arch)
    reference = run(model, x)
    swapped = bnsurgery.swap(copy.deepcopy(model), to="frozen")
    for a, b in zip(leaves(reference), leaves(run(swapped, x)), strict=True):
        assert torch.equal(a, b), f"swap to frozen changed the output\n{describe(arch)}"


@given(architectures())
def test_swap_to_frozen_is_exact(arch):
    check_swap(arch)
    tally.add_unique("generated: swap", arch)


# ----------------------------------------------------------------------------- recalibrate


def reference_statistics(
    model: nn.Module, names: list[str], batches: list[torch.Tensor], kernel: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each named BN's input over all batches: its mean and unbiased variance over the
    concatenation of everything it saw, in float64.

    While collecting, each named BN normalises with its batch's own mean and biased variance
    and everything else runs in eval mode. ``kernel=False`` normalises by the formula in
    float64 (a first-principles check of what recalibration computes); ``kernel=True`` with
    the batch-norm kernels recalibration uses, in the model's dtype, so that in float32 and
    bfloat16 every BN sees bit for bit the inputs it sees during recalibration and the
    statistics can be compared tightly (rounding in an upstream normalisation is not what is
    being tested).
    """
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []

    def collect(name):
        def pre(module, args):
            x = args[0]
            c = x.shape[1]
            seen[name].append(x.detach().double().transpose(0, 1).reshape(c, -1))

        def post(module, args, output):
            x = args[0]
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if kernel and x.dtype in (torch.float32, torch.float64):  # recalibration's kernel
                y = batch_normalised(x, weight, bias, module.eps)[0]
            elif kernel:
                y = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, module.eps)[0]
            else:
                x = x.double()
                dims = [0, *range(2, x.dim())]
                mean = x.mean(dims, keepdim=True)
                var = x.var(dims, unbiased=False, keepdim=True)
                shape = [1, -1] + [1] * (x.dim() - 2)
                y = (x - mean) / torch.sqrt(var + module.eps)
                if weight is not None:
                    y = y * weight.double().view(shape) + bias.double().view(shape)
                y = y.to(args[0].dtype)
            if hasattr(module, "act"):
                y = module.act(module.drop(y))
            return y

        return pre, post

    copies = copy.deepcopy(model).eval()
    for name in names:
        pre, post = collect(name)
        module = copies.get_submodule(name)
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    with torch.no_grad():
        for batch in batches:
            copies(batch.clone())
    for h in handles:
        h.remove()
    stats = {}
    for name, chunks in seen.items():
        data = torch.cat(chunks, dim=1)
        stats[name] = (data.mean(1), data.var(1, unbiased=True))
    return stats


# the statistics are exact in float64; what is left is the cast into the running buffers
# (bfloat16: half a unit in the last place, 2**-9) and float32 kernel rounding
RECALIBRATION_TOLERANCE = {"float64": 1e-9, "float32": 1e-5, "bfloat16": 4e-3}


def _recalibrated_matches(arch: dict[str, Any], sizes: list[int], kernel: bool) -> None:
    model = build(arch)
    with_stats = [
        n for n, m in bn_modules(model).items() if getattr(m, "running_mean", None) is not None
    ]
    batches = [inputs(arch, batch=n, seed=arch["seed"] + 10 + i) for i, n in enumerate(sizes)]
    params = {k: v.clone() for k, v in model.named_parameters()}
    if not with_stats:  # nothing to recalibrate: every BN left with the reason, nothing read
        bnsurgery.recalibrate(model, iter(()))
        report = bnsurgery.last_report(model)
        assert report.changed == [] and report.batches == 0
        assert sorted(s.bn for s in report.left) == sorted(bn_modules(model))
        assert all("running" in s.reason for s in report.left), report.left
        return
    expected = reference_statistics(model, with_stats, batches, kernel)
    bnsurgery.recalibrate(model, batches)
    report = bnsurgery.last_report(model)
    assert [layer.name for layer in report.layers] == with_stats
    tol = RECALIBRATION_TOLERANCE[arch["dtype"]]
    for name in with_stats:
        bn = model.get_submodule(name)
        mean, var = expected[name]
        # rounding scales with the spread and the size of the values: compare the mean on the
        # scale of std + |mean|, the variance on the scale of var + mean^2
        scales = (var.sqrt() + mean.abs(), var + mean.square())
        for what, got, want, scale in zip(
            ("mean", "var"), (bn.running_mean, bn.running_var), (mean, var), scales, strict=True
        ):
            worst = float(((got.double() - want).abs() / scale.clamp_min(1e-30)).max())
            assert worst <= tol, f"{name}: running {what} off by {worst:.3g}\n{describe(arch)}"
    assert not model.training
    for key, value in model.named_parameters():
        assert torch.equal(value, params[key]), key


def check_recalibrate(arch: dict[str, Any], sizes: list[int]) -> None:
    _recalibrated_matches(arch, sizes, kernel=arch["dtype"] != "float64")
    if arch["dtype"] != "float64":  # and the maths from first principles, in float64
        _recalibrated_matches(dict(arch, dtype="float64"), sizes, kernel=False)


@given(architectures())
def test_recalibrate_gives_first_principles_statistics(arch):
    rng = extras(arch)  # uneven batch sizes; at least 2, as BN in train mode needs
    check_recalibrate(arch, [rng.randint(2, 5) for _ in range(rng.randint(1, 3))])
    tally.add_unique("generated: recalibrate", arch)


# ------------------------------------------------------------------------------- save/load


def spec_of(arch: dict[str, Any]) -> str:
    return f"tests.archgen:build(arch={arch!r})"


def check_save_load(arch: dict[str, Any], surgery: str) -> None:
    model = bnsurgery.load(spec_of(arch)).to(DTYPES[arch["dtype"]]).eval()
    x = inputs(arch)
    if surgery == "fold":
        model = bnsurgery.fold(model, x)
    elif surgery == "freeze":
        model = bnsurgery.freeze(model)
    elif surgery == "swap":
        model = bnsurgery.swap(model, to="frozen")
    expected = leaves(run(model, x))
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".safetensors", ".pt"):
            path = Path(tmp) / f"model{suffix}"
            bnsurgery.save(model, path)
            if suffix == ".pt":  # a pickle runs code: only with trust
                loaded = bnsurgery.load(path, trust_code=True).eval()
            else:  # the file records our own factory: naming it lets the file build it
                loaded = bnsurgery.load(path, arch="tests.archgen:build").eval()
            got = leaves(run(loaded, x))
            for a, b in zip(expected, got, strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b), (
                    f"{surgery} then {suffix} changed the output\n{describe(arch)}"
                )


@given(architectures())
def test_save_then_load_gives_identical_outputs(arch):
    check_save_load(arch, extras(arch).choice(("none", "fold", "freeze", "swap")))
    tally.add_unique("generated: save/load", arch)
