"""Every surgery on generated *user-style* models (hypothesis): the invariants of
``test_generated.py``, on the habits of user code that archgen's clean graphs lack.

Models come from :func:`tests.usergen.recipes` (``.view`` right after a norm, keyword calls,
``F.conv2d``/``F.linear`` on module parameters, Dropout, hooks registered by the model, dict and
dataclass outputs, BN on ``(N, C)``, ``(N, C, L)`` and ``(N, C, 1, 1)``, a head fed empty
batches, branches taken by a flag or by the input's values, a conv or BN called twice,
residual adds). For each surgery, on a fresh copy: its own properties, then the surgered model
runs a forward pass in eval and in train mode and a train step at batch size 1, and comes back
from ``save`` + ``load`` with the same eval output and the same hook calls.

Examples per test: ``BNSURGERY_USER_EXAMPLES`` (default 40); derandomised in CI like the other
property tests (``HYPOTHESIS_PROFILE=explore`` draws fresh ones).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten

import bnsurgery
from bnsurgery.frozen import FrozenBatchNorm
from bnsurgery.norms import is_batchnorm
from bnsurgery.verify import max_relative_error

from .conftest import assert_identical
from .usergen import build, hookable, inputs, recipes, spec_of

pytestmark = pytest.mark.generated

EXAMPLES = int(os.environ.get("BNSURGERY_USER_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None)
FLOAT32_TOLERANCE = 1e-4  # fold's own default for float32 outputs
FLOAT64_TOLERANCE = 1e-10
RECALIBRATION_TOLERANCE = 1e-5  # float32 statistics, on the scale of std + |mean|
# the means of the data batches, in any order: the branches that look at the input's values
# take both ways, either first
OFFSETS = st.permutations((1.0, -1.0, 0.0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models take microseconds per layer: a second thread only adds synchronisation,
    which on a loaded machine costs a hundred times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers


def leaves(output: Any) -> list[torch.Tensor]:
    """The tensors of an output: a tensor, a tuple, a dict or a dataclass."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        output = [getattr(output, f.name) for f in dataclasses.fields(output)]
    return [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]


def run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The eval output's tensors (the model's own mode is left as it was)."""
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return leaves(model(x.clone()))
    finally:
        for m, flag in was:
            m.training = flag


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        s.shape == t.shape and s.dtype == t.dtype and torch.equal(s, t)
        for s, t in zip(a, b, strict=True)
    )


def bn_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_batchnorm(m)]


def hook_calls(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often each hook the model registered fires in one eval forward pass on ``x``."""
    model.calls.clear()
    run(model, x)
    return dict(model.calls)


def hooked(recipe: dict[str, Any]) -> dict[str, set[str]]:
    """Module name -> the kinds of hooks the recipe registers on it."""
    names = hookable(build(recipe))
    on: dict[str, set[str]] = {}
    for kind, index in recipe["hooks"]:
        on.setdefault(names[index % len(names)], set()).add(kind)
    return on


def values_per_channel(model: nn.Module, x: torch.Tensor) -> dict[str, list[int]]:
    """For each BN module still training as BN, the values per channel of each call's input."""
    seen: dict[str, list[int]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):

            def pre(module, args, kwargs, name=name):
                t = args[0] if args else kwargs["input"]
                seen.setdefault(name, []).append(t.numel() // t.shape[1])

            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        run(model, x)
    finally:
        for h in handles:
            h.remove()
    return seen


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    """One SGD step on the mean square of every output, in train mode."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    outs = [t for t in leaves(model(x.clone())) if t.numel() and t.is_floating_point()]
    loss = sum(t.pow(2).mean() for t in outs)
    if params and isinstance(loss, torch.Tensor) and loss.requires_grad:
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} is not finite after a train step"


def check_runs(model: nn.Module, recipe: dict[str, Any], batch_one: bool) -> None:
    """A forward pass in eval and in train mode, a train step at batch size 1, eval again.

    ``batch_one``: the surgery left no BN that trains on batch statistics with a single value
    per channel (every one frozen or swapped), so batch size 1 must work. Otherwise batch size
    1 is used where PyTorch allows it: a BN still training on ``(1, C)`` or ``(1, C, 1, 1)``
    raises by design, and then the step runs at batch size 2.
    """
    x = inputs(recipe, 3, seed=5)
    for t in run(model, x):
        assert torch.isfinite(t).all()
    model.train()
    with torch.no_grad():
        for t in leaves(model(x.clone())):
            assert torch.isfinite(t).all()
    one = inputs(recipe, 1, seed=6)
    single = [name for name, counts in values_per_channel(model, one).items() if 1 in counts]
    assert not (batch_one and single), f"BN left training at batch size 1: {single}"
    train_step(model, one if not single else inputs(recipe, 2, seed=6))
    for t in run(model, x):
        assert torch.isfinite(t).all()
    model.eval()


def check_save_load(model: nn.Module, recipe: dict[str, Any], what: str) -> None:
    """``save`` then ``load``, safe format and pickle: the same eval output, the same hooks."""
    x = inputs(recipe, 3, seed=7)
    expected, calls = run(model, x), hook_calls(model, x)
    spec = spec_of(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".safetensors", ".pt"):
            path = Path(tmp) / f"model{suffix}"
            bnsurgery.save(model, path, arch=spec if suffix == ".safetensors" else None)
            if suffix == ".pt":  # a pickle runs code: only with trust
                loaded = bnsurgery.load(path, trust_code=True)
            else:  # the file records our own factory: naming it lets the file build it
                loaded = bnsurgery.load(path, arch=spec)
            assert same(run(loaded, x), expected), f"{what} then {suffix}: the output changed"
            assert hook_calls(loaded, x) == calls, f"{what} then {suffix}: hooks {calls}"


# ------------------------------------------------------------------------------------ fold


def must_fold(recipe: dict[str, Any]) -> set[str]:
    """BNs any correct fold folds into the layer before: each is called on every input and
    reads a conv or linear whose output goes only to it, with no user hook in between (a
    forward hook on the layer, a pre-hook on the BN: README, "Calling convention and hooks")."""
    on = hooked(recipe)
    pairs: list[tuple[str, str]] = []

    def cbr(prefix: str, spec: dict[str, Any]) -> None:
        conv, bn = ("body.0", "body.1") if spec["call"] == "seq" else ("conv", "bn")
        pairs.append((f"{prefix}.{conv}", f"{prefix}.{bn}"))

    if not recipe["expose"]:  # else the conv's output is also a model output
        cbr("stem", recipe["stem"])
    for i, spec in enumerate(recipe["blocks"]):
        if spec["kind"] == "cbr":
            cbr(f"blocks.{i}", spec)
        elif spec["kind"] == "branch" and spec["by"] == "flag":
            taken = "a" if spec["flag"] else "b"
            cbr(f"blocks.{i}.{taken}", spec[taken])
        elif spec["kind"] == "res" and spec["share"] is None:
            pairs += [(f"blocks.{i}.conv{k}", f"blocks.{i}.bn{k}") for k in (1, 2)]
    tail = recipe["tail"]
    if tail["kind"] == "flat":
        cbr("tail.block", tail["cbr"])
    elif tail["kind"] == "seq1d":
        pairs.append(("tail.conv", "tail.bn"))
    pairs += [(f"dense.{i}.fc", f"dense.{i}.bn") for i in range(len(recipe["dense"]))]
    if recipe["det"]:
        pairs.append(("detector.conv", "detector.bn"))
    between = ({"count", "scale"}, {"pre", "kwpre"})  # hooks that see the tensor between
    return {
        bn
        for layer, bn in pairs
        if not on.get(layer, set()) & between[0] and not on.get(bn, set()) & between[1]
    }


def check_fold(recipe: dict[str, Any]) -> None:
    model = build(recipe)
    x = inputs(recipe, 2, seed=1)
    state = copy.deepcopy(model.state_dict())
    reference = run(model, x)
    calls = hook_calls(model, x)
    folded = copy.deepcopy(model)
    bnsurgery.fold(folded, x)
    assert folded.calls == calls, "the user's hooks fired during the fold's own passes"
    report = bnsurgery.last_report(folded)
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, state[key]), key

    # every BN folded or left with a reason; the ones any correct fold folds are folded
    names = set(bn_names(model))
    done = {e.bn for e in report.folded}
    left = {s.bn: s.reason for s in report.left}
    assert done | set(left) == names and not done & set(left), (done, left)
    assert all(reason.strip() for reason in left.values()), left
    assert set(bn_names(folded)) == set(left)
    assert must_fold(recipe) <= done, f"not folded: {must_fold(recipe) - done}: {left}"

    error = max_relative_error(reference, run(folded, x))
    assert error <= FLOAT32_TOLERANCE, f"fold error {error:.3g}: {report.notes}"
    assert hook_calls(folded, x) == calls
    for name, kinds in hooked(recipe).items():  # a hook on a folded BN: the report says so
        if name in done and kinds:
            assert any(name in note and "hooks of" in note for note in report.notes), name

    # in float64, where rounding cannot hide a wrong fold: the same function on the example
    # and on inputs that take the other branches
    model64 = copy.deepcopy(model).double()
    batches = [x, *(inputs(recipe, 3, seed=2, offset=o) for o in (-1.0, 1.0))]
    reference64 = [run(model64, t.double()) for t in batches]
    bnsurgery.fold(model64, x.double())
    for t, want in zip(batches, reference64, strict=True):
        error = max_relative_error(want, run(model64, t.double()))
        assert error <= FLOAT64_TOLERANCE, (
            f"float64 fold error {error:.3g} (input mean {t.mean():.2f})"
        )

    check_runs(folded, recipe, batch_one=False)
    check_save_load(folded, recipe, "fold")


@SETTINGS
@given(recipes())
def test_fold_keeps_the_function_and_says_why_it_left_a_bn(recipe):
    check_fold(recipe)


# ---------------------------------------------------------------------------------- freeze


def check_freeze(recipe: dict[str, Any], train_affine: bool) -> None:
    model = build(recipe)
    original = copy.deepcopy(model)
    x = inputs(recipe, 2, seed=1)
    reference, calls = run(model, x), hook_calls(model, x)
    frozen = bnsurgery.freeze(model, train_affine=train_affine)
    report = bnsurgery.last_report(frozen)
    assert sorted(report.changed) == sorted(bn_names(original)) and not report.left, report
    assert not any(isinstance(m, _BatchNorm) for m in frozen.modules())
    assert same(run(frozen, x), reference)
    assert hook_calls(frozen, x) == calls

    # train mode computes what eval mode computes, but for Dropout (the same masks: seeded)
    reference_train = copy.deepcopy(original).train()
    for m in reference_train.modules():
        if is_batchnorm(m):
            m.eval()
    outs = []
    for net in (frozen.train(), reference_train):
        torch.manual_seed(3)
        with torch.no_grad():
            outs.append(leaves(net(x.clone())))
    assert same(*outs), "a frozen model in train mode differs from the original's BN in eval"

    # a train step at batch size 1: statistics (and affine unless train_affine) stay
    keep = {}
    for name in report.changed:
        for key, value in frozen.get_submodule(name).state_dict().items():
            if not (train_affine and key in ("weight", "bias")):
                keep[f"{name}.{key}"] = value.clone()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    train_step(frozen, inputs(recipe, 1, seed=4))
    after = frozen.state_dict()
    for key, value in keep.items():
        assert torch.equal(after[key], value), f"{key} moved"
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in keep)

    # unfreeze gives back exactly the original, also after training
    again = bnsurgery.unfreeze(bnsurgery.freeze(copy.deepcopy(original), train_affine=train_affine))
    assert_identical(original, again)
    assert hook_calls(again, x) == calls
    trained = bnsurgery.unfreeze(copy.deepcopy(frozen))
    assert [type(m) for m in trained.modules()] == [type(m) for m in original.modules()]
    for key, value in keep.items():
        assert torch.equal(trained.state_dict()[key], value), key

    check_runs(frozen, recipe, batch_one=True)
    check_save_load(frozen, recipe, "freeze")


@SETTINGS
@given(recipes(), st.booleans())
def test_freeze_holds_in_train_mode_and_unfreezes_exactly(recipe, train_affine):
    check_freeze(recipe, train_affine)


# ------------------------------------------------------------------------------------ swap


def check_swap(recipe: dict[str, Any], target: str, offsets: list[float] | None) -> None:
    model = build(recipe)
    x = inputs(recipe, 2, seed=1)
    reference, calls = run(model, x), hook_calls(model, x)
    data = None
    if offsets is not None:
        data = [inputs(recipe, 2 + i, seed=10 + i, offset=o) for i, o in enumerate(offsets)]
        called, reached = reached_by(model, data)
    # with example inputs (or data), groupnorm sees which BNs get one value per channel
    example = x if data is None else None
    swapped = bnsurgery.swap(copy.deepcopy(model), target, calibrate=data, example_inputs=example)
    report = bnsurgery.last_report(swapped)
    assert sorted(s.bn for s in report.swapped) == sorted(bn_names(model)), report.left
    assert not any(isinstance(m, _BatchNorm) for m in swapped.modules())
    if target == "frozen":
        assert all(isinstance(m, FrozenBatchNorm) for m in swapped.modules() if is_batchnorm(m))
        assert same(run(swapped, x), reference), "swap to frozen changed the eval output"
    if data is not None:  # least squares cannot fit worse than the scale and shift carried over
        for s in report.swapped:
            if s.bn not in reached:  # keeps the BN's scale and shift, and the report says why
                why = "saw only empty batches" if s.bn in called else "not called"
                assert s.fit_error_after is None, s
                assert any(s.bn in note and why in note for note in report.notes), report.notes
                continue
            assert s.fit_error_after is not None and s.fit_error_before is not None, s
            assert s.fit_error_after <= s.fit_error_before * (1 + 1e-6) + 1e-9, s
    assert hook_calls(swapped, x) == calls
    check_runs(swapped, recipe, batch_one=True)
    check_save_load(swapped, recipe, f"swap to {target}")


def reached_by(model: nn.Module, data: list[torch.Tensor]) -> tuple[set[str], set[str]]:
    """The BNs called on some batch of ``data``, and those of them that see a non-empty
    input."""
    called: set[str] = set()
    reached: set[str] = set()
    for batch in data:
        for name, counts in values_per_channel(model, batch).items():
            called.add(name)
            if any(counts):
                reached.add(name)
    return called, reached


SWAPS = [("groupnorm", False), ("groupnorm", True), ("layernorm", False), ("layernorm", True)]


@SETTINGS
@given(recipes(), st.sampled_from([*SWAPS, ("frozen", False)]), OFFSETS)
def test_swap_runs_in_both_modes_and_at_batch_size_one(recipe, how, offsets):
    target, calibrated = how
    check_swap(recipe, target, offsets if calibrated else None)


# ----------------------------------------------------------------------------- recalibrate


def reference_statistics(
    model: nn.Module, batches: list[torch.Tensor]
) -> dict[str, tuple[int, int, torch.Tensor | None, torch.Tensor | None]]:
    """Each BN's calls, values per channel, and its input's mean and unbiased variance over
    all batches in float64 (``None`` where it saw fewer than 2 values per channel).

    While collecting, every BN normalises with its batch's own statistics and everything else
    runs in eval mode, as recalibration specifies; the user's hooks still run.
    """
    copied = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    calls: dict[str, int] = {}
    for name, bn in copied.named_modules():
        if not is_batchnorm(bn):
            continue
        seen[name], calls[name] = [], 0

        def forward(input: torch.Tensor, bn: nn.Module = bn, name: str = name) -> torch.Tensor:
            calls[name] += 1
            if input.numel() == 0:
                return input.clone()
            c = input.shape[1]
            seen[name].append(input.detach().double().transpose(0, 1).reshape(c, -1))
            return torch.native_batch_norm(
                input, bn.weight, bn.bias, None, None, True, 0.0, bn.eps
            )[0]

        bn.forward = forward
    with torch.no_grad():
        for batch in batches:
            copied(batch.clone())
    stats = {}
    for name, chunks in seen.items():
        data = torch.cat(chunks, dim=1) if chunks else torch.zeros(0, 0, dtype=torch.float64)
        if data.shape[1] < 2:
            stats[name] = (calls[name], data.shape[1], None, None)
        else:
            stats[name] = (calls[name], data.shape[1], data.mean(1), data.var(1, unbiased=True))
    return stats


def check_recalibrate(recipe: dict[str, Any], offsets: list[float]) -> None:
    model = build(recipe)
    x = inputs(recipe, 2, seed=1)
    calls = hook_calls(model, x)
    batches = [inputs(recipe, 2 + i % 3, seed=20 + i, offset=o) for i, o in enumerate(offsets)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = reference_statistics(model, batches)
    bnsurgery.recalibrate(model, batches)
    report = bnsurgery.last_report(model)
    done = {layer.name for layer in report.layers}
    left = dict(report.left)
    for name, (n_calls, values, mean, var) in expected.items():
        bn = model.get_submodule(name)
        if mean is None or var is None:  # never reached, or fewer than 2 values
            assert name in left and name not in done, (name, left)
            if n_calls == 0:
                assert "not called" in left[name], left[name]
            elif values == 0:
                assert "saw only empty batches" in left[name], left[name]
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                assert torch.equal(getattr(bn, key), state[f"{name}.{key}"]), f"{name}.{key}"
            continue
        assert name in done and name not in left, (name, left)
        scales = (var.sqrt() + mean.abs(), var + mean.square())
        for what, got, want, scale in zip(
            ("mean", "var"), (bn.running_mean, bn.running_var), (mean, var), scales, strict=True
        ):
            worst = float(((got.double() - want).abs() / scale.clamp_min(1e-30)).max())
            assert worst <= RECALIBRATION_TOLERANCE, f"{name}: running {what} off by {worst:.3g}"
    for key, value in model.named_parameters():
        assert torch.equal(value, state[key]), key
    assert not model.training
    assert hook_calls(model, x) == calls
    check_runs(model, recipe, batch_one=False)
    check_save_load(model, recipe, "recalibrate")


@SETTINGS
@given(recipes(), OFFSETS)
def test_recalibrate_gives_first_principles_statistics(recipe, offsets):
    check_recalibrate(recipe, offsets)
