from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from bnsurgery.testing import randomize_bn
from bnsurgery.verify import max_relative_error

from . import tally
from .hostile import world  # noqa: F401  (the hostile suites' fixture)

# Property tests: a fixed number of derandomised examples in CI (a red run reproduces);
# HYPOTHESIS_PROFILE=explore draws new ones, BNSURGERY_EXAMPLES sets how many.
# Three times the minimum of distinct architectures (different draws can describe the same
# architecture, and the summary counts architectures, not draws; the examples are small, so
# 600 per property cost about a minute, and the bfloat16 recalibration bug only showed there).
_EXAMPLES = int(os.environ.get("BNSURGERY_EXAMPLES", tally.MINIMUM_GENERATED * 3))
_COMMON = dict(
    max_examples=_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("explore", **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _away_from_the_checkout(tmp_path_factory):
    """Run every test in an empty folder of its own: the CLI writes default outputs beside
    the current folder's files and refuses to replace them, so a file a user made there (the
    README's first command writes ``resnet18.folded.safetensors``) must not change a test's
    outcome, and no test may leave a file in the checkout."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The robustness counts: what the generated and hostile suites checked in this run."""
    counts = tally.counts
    if not counts:
        return
    write = terminalreporter.write_line
    terminalreporter.section("bnsurgery robustness counts")
    for surgery in tally.SURGERIES:
        key = f"generated: {surgery}"
        if key in counts:
            write(f"generated architectures checked, {surgery}: {counts[key]}")
    folded = counts.get("generated: fold (with a BN folded)")
    if folded is not None:
        write(f"  of which fold folded at least one BN: {folded}")
    pairs = counts.get("generated: fold (layer-BN pairs)")
    if pairs is not None:
        pairs_folded = counts.get("generated: fold (layer-BN pairs, a BN folded)", 0)
        write(f"  plus layer-BN pair graphs: {pairs}, of which a BN folded: {pairs_folded}")
    joined = counts.get("generated: fold (a BN folded per slice after cat)")
    if joined is not None:
        write(f"  graphs where a BN after cat() folded slice by slice: {joined}")
    collapsed = counts.get("generated: fold (a block's branches collapsed)")
    if collapsed is not None:
        write(f"  graphs where a block's branches collapsed into one conv: {collapsed}")
        pooled = counts.get("generated: fold (a block's pooled branch collapsed)", 0)
        write(f"    of which with an average-pooled branch: {pooled}")
        nested = counts.get("generated: fold (a nested block's branches collapsed)", 0)
        write(f"    of which a nested block's, collapsed in the block around it: {nested}")
    several = counts.get("generated: fold (a BN folded into several layers after it)")
    if several is not None:
        write(f"  graphs where a BN folded into several layers after it: {several}")
        into_bn = counts.get("generated: fold (a BN folded into the BN after it)", 0)
        write(f"  graphs where a BN folded into the BN after it: {into_bn}")
    fused = counts.get("generated: BN layers fused")
    if fused is not None:
        left = counts.get("generated: BN layers frozen, not fused", 0)
        write(
            f"  fused freeze: BN layers fused {fused}, frozen but not fused (with a reason) {left}"
        )
    meaningless = counts.get("generated: fold (dtype cannot represent the model)")
    if meaningless:
        write(f"  of which checked in float64 only (own dtype noise >= 0.5): {meaningless}")
    for key in sorted(k for k in counts if k.startswith("hostile")):
        write(f"{key}: {counts[key]}")
    for key in tally.FAILURES:
        write(f"{key}: {counts.get(key, 0)}")


def pytest_sessionfinish(session, exitstatus):
    """A property test that ran to the end must have checked its share of architectures."""
    if _EXAMPLES < tally.MINIMUM_GENERATED:
        return
    short = [
        s
        for s in tally.SURGERIES
        if 0 < tally.counts.get(f"generated: {s}", 0) < tally.MINIMUM_GENERATED
    ]
    if short and session.exitstatus == 0:
        session.exitstatus = 1
        print(f"\ngenerated architectures below {tally.MINIMUM_GENERATED} for: {short}")


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


def assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Two models are the same: state (keys, dtypes, values), module types, flags, BN
    options and which parameters train (unfreeze must give back exactly this)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules(), strict=True):
        assert na == nb and type(ma) is type(mb), (na, type(ma), type(mb))
        assert ma.training == mb.training, na
        for attr in ("eps", "momentum", "affine", "track_running_stats", "num_features"):
            assert getattr(ma, attr, None) == getattr(mb, attr, None), (na, attr)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and pa.requires_grad == pb.requires_grad, na


@pytest.fixture
def fresh_copy():
    return copy.deepcopy
