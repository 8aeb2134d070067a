"""scripts/sweep_zoo.py: the per-model run (on a copy and in place) and the whole script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # each test runs the sweep script


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_zoo", ROOT / "scripts" / "sweep_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_in_place_mode_measures_the_same_as_a_copy(sweep):
    """A model too large for a copy is folded in place, then rebuilt bit for bit for the fx
    comparison: every figure equals the copy mode's."""
    phases = []
    on_copy = sweep.run_one("torchvision:resnet18", "classification", phases.append)
    in_place = sweep.run_one("torchvision:resnet18", "classification", phases.append, 100.0)
    assert "in_place" not in on_copy and in_place.pop("in_place") is True
    assert {"phase": "rebuild"} in phases and "limit" not in in_place
    for key in ("bn", "folded", "left", "err", "fx", "fx_err", "status"):
        assert in_place[key] == on_copy[key], key
    assert on_copy["status"] == "ok" and on_copy["folded"] == on_copy["bn"] == 20


def test_a_check_that_cannot_fit_is_recorded_as_skipped(sweep):
    record = sweep.run_one("timm:tf_efficientnetv2_b0", "timm", lambda m: None, 100.0)
    assert record["in_place"] and record["status"] == "over_tolerance"
    assert record["f64_error"].startswith("skipped: needs about")
    assert record["data_err"] < record["err"] and 0 < record["ulp32"] < 1e-2


def test_the_script_writes_its_table_and_side_file(tmp_path, sweep):
    out = tmp_path / "sweep.md"
    common = ["--filter", "timm:resnet10t", "--out", str(out), "--timeout-per-model", "120"]
    code = sweep.main(["--filter", "torchvision:squeezenet1_0", *common])
    assert code == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert {r["name"]: r["status"] for r in rows} == {
        "torchvision:squeezenet1_0": "no_bn",
        "timm:resnet10t": "ok",
    }
    table = out.read_text()
    assert "- models with BN swept: **1** (timm 1, torchvision 0); skipped without BN: 1" in table
    assert "| timm:resnet10t | ok |" in table

    # --redo: the records with that status are dropped and their models run again
    side = out.with_suffix(".jsonl")
    side.write_text(side.read_text().replace('"status": "ok"', '"status": "timeout"'))
    code = sweep.main(["--resume", "--redo", "timeout", *common])
    rows = [json.loads(line) for line in side.read_text().splitlines()]
    assert code == 0 and sorted((r["name"], r["status"]) for r in rows) == [
        ("timm:resnet10t", "ok"),
        ("torchvision:squeezenet1_0", "no_bn"),
    ]

    # --report-only: the table again from the side file, which stays as it was
    kept, out_text = side.read_bytes(), out.read_text()
    out.unlink()
    assert sweep.main(["--report-only", "--out", str(out)]) == 0
    assert side.read_bytes() == kept and "| timm:resnet10t | ok |" in out.read_text()
    assert out.read_text().splitlines()[4:] == out_text.splitlines()[4:]


def test_ulp_noise_moves_every_weight_one_ulp_and_restores_them(sweep):
    import torch
    from torch import nn

    from .measure import max_rel_error

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moved = []
    sweep._ulp_step(model, 0)
    for k, v in model.state_dict().items():
        steps = (v.view(torch.int32) - state[k].view(torch.int32)).abs()
        moved.append(bool((steps == 1).all()))
    sweep._ulp_step(model, 0, back=True)
    assert all(moved)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        noise = sweep.ulp_noise(model, (x,), model(x), max_rel_error)
    assert 1e-8 < noise < 1e-5
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_export_sweep_checks_each_file_itself(tmp_path):
    """scripts/sweep_export.py: a model exported to both formats and checked apart from
    bnsurgery's own check; the selection has 200+ models (a detector's refusal, with where:
    tests/test_families.py and test_export.py)."""
    spec = importlib.util.spec_from_file_location(
        "sweep_export", ROOT / "scripts" / "sweep_export.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(module.chosen()) >= 200
    out = tmp_path / "export.md"
    args = ["--filter", "timm:resnet10t", "--out", str(out)]
    assert module.main(args) == 0
    rows = {
        r["name"]: r for r in map(json.loads, out.with_suffix(".jsonl").read_text().splitlines())
    }
    ok = rows["timm:resnet10t"]
    assert ok["status"] == "ok"
    for fmt in ("onnx", "pt2"):
        assert ok[fmt]["bn_nodes"] == 0 and ok[fmt]["check_err"] <= ok[fmt]["tolerance"]
        assert ok[fmt]["check_batch"] == 3 and ok[fmt]["folded"] == ok["bn"]
    table = out.read_text()
    assert "| onnx | 1 | 0 | 0 | 0 | 0 | 0 |" in table and "`timm:resnet10t`" in table
