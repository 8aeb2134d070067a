"""plan: every surgery plans as a plain value, and one driver applies any plan, all or nothing."""

from __future__ import annotations

import ast
import copy
import json
import pathlib

import pytest
import torch
from torch import nn

import bnsurgery
from bnsurgery import provenance
from bnsurgery.edits import Replace
from bnsurgery.errors import StatisticsError
from bnsurgery.frozen import FrozenBatchNorm
from bnsurgery.plan import NOT_SELECTED, Plan, Skip, Transaction, apply, begin
from bnsurgery.report import to_json


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.BatchNorm2d(4),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def snapshot(model: nn.Module) -> tuple:
    return (
        [(n, id(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(provenance.get_record(model)),
    )


def same(model: nn.Module, before: tuple) -> bool:
    modules, state, record = before
    now = model.state_dict()
    return (
        [(n, id(m)) for n, m in model.named_modules()] == modules
        and now.keys() == state.keys()
        and all(
            torch.equal(now[k], v) or torch.equal(now[k].isnan(), v.isnan())
            for k, v in state.items()
        )
        and provenance.get_record(model) == record
    )


X = torch.randn(2, 3, 8, 8)


def plans(model: nn.Module) -> dict[str, Plan]:
    return {
        "freeze": bnsurgery.plan_freeze(model, include="1"),
        "unfreeze": bnsurgery.plan_unfreeze(model),
        "swap": bnsurgery.plan_swap(model, "groupnorm", exclude="7"),
        "fold": bnsurgery.plan_fold(model, X),
        "recalibrate": bnsurgery.plan_recalibrate(model, [X, X[:1]]),
    }


def test_planning_changes_nothing_and_every_bn_has_one_edit_or_one_skip():
    model = net()
    before = snapshot(model)
    for operation, plan in plans(model).items():
        assert same(model, before), operation
        assert plan.operation == operation
        names = [e.bn for e in plan.edits] + [s.bn for s in plan.skipped]
        assert sorted(names) == ["1", "4", "7"], (operation, names)
        json.loads(to_json(plan))  # a plain value: JSON for scripts
        assert str(plan).splitlines()[-1].startswith(f"plan: {operation}")


def test_skips_read_alike_in_every_plan():
    model = net()
    found = plans(model)
    assert Skip("4", NOT_SELECTED) in found["freeze"].skipped
    assert Skip("7", NOT_SELECTED) in found["swap"].skipped
    assert {s.reason for s in found["unfreeze"].skipped} == {"not frozen by bnsurgery"}
    bn, reason = found["freeze"].skipped[0]  # a skip unpacks as (bn, reason)
    assert (bn, reason) == ("4", NOT_SELECTED)


def test_one_unusable_policy_for_every_surgery():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d(), nn.Conv2d(4, 4, 1))
    model.add_module("3", nn.BatchNorm2d(4, track_running_stats=False))
    lazy = "an uninitialised lazy BN (run one forward pass first)"
    for plan in (
        bnsurgery.plan_freeze(model),
        bnsurgery.plan_swap(model, "groupnorm"),
        bnsurgery.plan_swap(model, "layernorm", calibrated=True),
        bnsurgery.plan_fold(model),
        bnsurgery.plan_recalibrate(model, [X]),
    ):
        reasons = dict(plan.skipped)
        assert reasons["1"] == lazy, plan.operation
        if plan.operation != "swap" or plan.step["to"] == "layernorm":
            assert reasons["3"].startswith("no running statistics"), plan.operation
    assert [e.bn for e in bnsurgery.plan_swap(model, "groupnorm").edits] == ["3"]


def test_a_failing_edit_rolls_every_earlier_edit_back():
    model = net()
    before = snapshot(model)
    bad = Replace("7", "custom", factory=lambda bn: "not a module")
    plan = Plan(
        "swap", [Replace("1", "frozen"), Replace("4", "groupnorm", {"groups": 2}), bad], [], {}
    )
    with pytest.raises(bnsurgery.BnSurgeryError, match="returned a str"):
        apply(model, plan)
    assert same(model, before)
    assert not isinstance(model[1], FrozenBatchNorm) and model[1].weight.requires_grad


def test_an_open_transaction_commits_or_rolls_back():
    model = net()
    before = snapshot(model)
    plan = bnsurgery.plan_freeze(model)
    txn = begin(model, plan)
    assert isinstance(txn, Transaction) and isinstance(model[4], FrozenBatchNorm)
    txn.rollback()
    assert same(model, before)
    begin(model, plan).commit(plan.step)
    record = provenance.get_record(model)
    assert record["steps"][-1] == {"op": "freeze", "frozen": 3}
    assert [e["replace"] for e in record["structure"]] == ["1", "4", "7"]


def test_apply_returns_the_report_and_keeps_it_as_last_report():
    model = net()
    report = apply(model, bnsurgery.plan_swap(model, "identity", include="4"))
    assert report is bnsurgery.last_report(model)
    assert report.changed == ["4"] and dict(report.left) == {"1": NOT_SELECTED, "7": NOT_SELECTED}
    assert "left 2 (2 not selected)" in str(report)


def test_records_replay_through_the_one_registry_and_unfreeze_drops_them(tmp_path):
    model = net()
    bnsurgery.freeze(model, include="1")
    bnsurgery.freeze(model, include="1", train_affine=True)  # amends the recorded options
    bnsurgery.swap(model, "groupnorm", include="4", groups=2)
    bnsurgery.fold(model, X, include="7")
    structure = provenance.get_record(model)["structure"]
    assert structure[0] == {"replace": "1", "with": "frozen", "options": {"train_affine": True}}
    assert structure[1]["with"] == "groupnorm" and structure[1]["options"]["groups"] == 2
    assert {"replace": "7", "with": "identity"} in structure
    rebuilt = net()
    provenance.replay(rebuilt, structure)
    rebuilt.load_state_dict(model.state_dict())
    assert [type(m).__name__ for m in rebuilt] == [type(m).__name__ for m in model]
    assert rebuilt[1].train_affine and rebuilt[1].weight.requires_grad
    torch.testing.assert_close(rebuilt(X), model(X), rtol=0, atol=0)
    bnsurgery.unfreeze(model)
    assert [e["replace"] for e in provenance.get_record(model)["structure"]] == ["4", "7"]


def test_older_record_shapes_still_replay():
    model = net()
    provenance.replay(
        model,
        [
            {"replace": "1", "with": "frozen", "train_affine": True},
            {"replace": "4", "with": "swap:groupnorm", "options": {"groups": 4}},
            {"replace": "7", "with": "norm_act_remainder"},
        ],
    )
    assert isinstance(model[1], FrozenBatchNorm) and model[1].train_affine
    assert isinstance(model[4], nn.GroupNorm) and model[4].num_groups == 4
    assert type(model[7]).__name__ == "FoldedBatchNorm"


def test_broken_statistics_stop_the_surgery_before_any_change_and_inspect_says_so():
    model = net()
    model[4].running_var[0] = float("nan")
    before = snapshot(model)
    with pytest.raises(StatisticsError, match="4: running_var is NaN"):
        bnsurgery.freeze(model)
    with pytest.raises(StatisticsError):
        bnsurgery.fold(model, X)
    assert same(model, before)
    survey = bnsurgery.survey(model, X)
    fold = {info.name: info.fold for info in survey.layers}
    assert fold["4"].startswith("refused: running_var is NaN") and fold["1"].startswith("into ")
    assert survey.foldable == 2


def test_models_without_bn_give_empty_reports():
    for surgery in (
        lambda m: bnsurgery.freeze(m),
        lambda m: bnsurgery.unfreeze(m),
        lambda m: bnsurgery.swap(m, "groupnorm"),
        lambda m: bnsurgery.fold(m, torch.randn(2, 3)),
        lambda m: bnsurgery.recalibrate(m, iter(())),  # no data read for nothing to do
    ):
        model = nn.Sequential(nn.Linear(3, 3))
        surgery(model)
        report = bnsurgery.last_report(model)
        assert report.changed == [] and report.left == []


def test_ema_recalibration_counts_the_values_each_bn_saw():
    model = net()
    bnsurgery.recalibrate(model, [X, X[:1]], mode="ema")
    layers = {d.name: d.samples for d in bnsurgery.last_report(model).layers}
    # (2 + 1) samples times the spatial positions each BN sees: 6x6 after the 3x3 conv
    assert layers == {"1": 3 * 36, "4": 3 * 36, "7": 3 * 36}


# ----------------------------------------------------------------------------- layout

PACKAGE = pathlib.Path(bnsurgery.__file__).parent


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of the module-level ``from .x import ...`` statements (not those
    under ``if TYPE_CHECKING``, not those inside functions)."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.append((node.module or "", [a.name for a in node.names]))
    return found


def _modules() -> dict[str, pathlib.Path]:
    files = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    for p in PACKAGE.glob("*/*.py"):
        files[f"{p.parent.name}.{p.stem}" if p.stem != "__init__" else p.parent.name] = p
    return files


def test_no_import_circles_among_the_modules():
    files = _modules()
    graph = {
        name: {m.split(".")[0] for m, _ in _imports(path) if m.split(".")[0] in files}
        for name, path in files.items()
        if "." not in name
    }
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError(f"import circle: {' -> '.join([*stack, name])}")
        if name in done:
            return
        for dep in sorted(graph.get(name, ())):
            visit(dep, [*stack, name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_no_private_name_is_imported_across_modules():
    offenders = [
        f"{name}: from .{module} import {n}"
        for name, path in _modules().items()
        for module, names in _imports(path)
        for n in names
        if n.startswith("_") and n != "__version__"
    ]
    assert offenders == []
