"""Deploying in one verified step: fold, lower every BN left, export to torch.export (.pt2) or
ONNX, and check the written artifact itself (loaded back) against the eager model."""

from __future__ import annotations

import copy
import re

import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import bnsurgery
from bnsurgery.errors import OutputError, UnsupportedModelError, UsageError, VerificationError
from bnsurgery.exporting import LoweredBatchNorm, export, lower_batchnorms
from bnsurgery.norms import iter_batchnorms
from bnsurgery.testing import randomize_bn

from . import models
from .conftest import prepared
from .test_cli import run

FORMATS = ["pt2", "onnx"]


def run_artifact(path, *args):
    """The written file, loaded back by its own runtime, run on ``args`` (tensors)."""
    if str(path).endswith(".pt2"):
        with torch.no_grad():
            out = torch.export.load(str(path)).module()(*args)
        return tree_leaves(out)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = dict(zip(names, [a.numpy() for a in args], strict=True))
    return [torch.from_numpy(a) for a in session.run(None, feed)]


def batch_norm_nodes(path):
    """Batch norm operators in the file, and in a pt2 program any running statistics left as
    a graph input (a folded BN's, which nothing reads)."""
    if str(path).endswith(".pt2"):
        graph = torch.export.load(str(path)).graph
        ops = [n for n in graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
        stats = [n for n in graph.nodes if n.op == "placeholder" and "running_" in n.name]
        return ops + stats
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]


def close(a, b, tol=1e-4):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-12)


class LeftBehind(nn.Module):
    """BNs that no layer can absorb (a pre-activation BN, one after a sum), one that folds, and
    a timm norm-act whose activation stays after the lowered map."""

    def __init__(self):
        super().__init__()
        import timm.layers

        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pre = nn.BatchNorm2d(6)  # after a ReLU, before a padded conv: left
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU)  # after a sum: left
        self.head = nn.Linear(6, 4)
        self.flat = nn.BatchNorm1d(4)  # the model's output: left

    def forward(self, x):
        y = self.bn(self.conv(x)).relu()
        y = self.act(self.conv2(self.pre(y)) + y)
        return self.flat(self.head(y.mean((2, 3))).relu())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(models.SEEDS))
def test_a_seed_model_exports_with_no_batch_norm_checked_loaded_back(tmp_path, name, fmt):
    factory, size = models.SEEDS[name]
    model = prepared(factory())
    x = torch.randn(3, *size)
    state = copy.deepcopy(model.state_dict())
    report = export(model, x, tmp_path / f"m.{fmt}")
    path = tmp_path / f"m.{fmt}"
    assert path.is_file() and report.size == path.stat().st_size > 0
    assert not batch_norm_nodes(path)
    assert report.bn_count == len(report.folded) + len(report.lowered) > 0
    assert report.dynamic_batch and len(report.max_rel_error) == 2
    for batch in (3, 1, 5):  # the batch dimension is dynamic
        xb = torch.randn(batch, *size)
        (got,) = run_artifact(path, xb)
        assert close(got, model.eval()(xb).detach()), batch
    for key, value in model.state_dict().items():  # the model given is not changed
        assert torch.equal(value, state[key]), key
    assert len(list(iter_batchnorms(model))) == report.bn_count
    assert bnsurgery.last_report(model) is report


@pytest.mark.parametrize("lower_to", ["affine", "conv"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_bn_left_is_lowered_to_its_map(tmp_path, fmt, lower_to):
    model = prepared(LeftBehind())
    x = torch.randn(4, 3, 8, 8)
    path = tmp_path / f"m.{fmt}"
    report = export(model, x, path, lower_to=lower_to)
    assert [e.bn for e in report.folded] == ["bn"]
    lowered = dict(report.lowered)
    assert set(lowered) == {"pre", "act", "flat"}
    assert lowered["act"].endswith("kept act=SiLU")
    if lower_to == "conv":  # BatchNorm2d as a 1x1 depthwise conv; BatchNorm1d says no rank
        assert lowered["pre"] == "1x1 depthwise conv" and lowered["flat"] == "multiply-add"
    assert not batch_norm_nodes(path)
    (got,) = run_artifact(path, x)
    assert close(got, model.eval()(x).detach())
    assert "3 lowered" in str(report) and "no batch norm" in str(report)


class TwoHeads(nn.Module):
    """Two outputs of different scales: the report gives each its own error."""

    def __init__(self):
        super().__init__()
        self.body = LeftBehind()
        self.aux = nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5))

    def forward(self, x):
        return {"logits": self.body(x), "aux": self.aux(x) * 1e3}


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_report_counts_nodes_before_and_after_and_errors_per_output(tmp_path, fmt):
    model = prepared(TwoHeads())
    x = torch.randn(4, 3, 8, 8)
    path = tmp_path / f"m.{fmt}"
    report = export(model, x, path, dynamic_batch=False)
    original = copy.deepcopy(model).eval()
    if fmt == "pt2":  # counted here the way a reader of the file would
        before = torch.export.export(original, (x,))
        after = torch.export.load(str(path))
        counts = [sum(n.op == "call_function" for n in p.graph.nodes) for p in (before, after)]
        assert sum("batch_norm" in str(n.target) for n in before.graph.nodes) == 5
        # 2 BN folded away; 3 lowered to a multiply and an add each (no reshape)
        assert counts[1] == counts[0] - 2 + 3
    else:  # the exporter's own graph: its optimiser already fuses 2 conv-BN pairs
        before = torch.onnx.export(original, (x,), dynamo=True, verbose=False).model_proto
        counts = [len(before.graph.node), len(onnx.load(str(path)).graph.node)]
        assert [n.op_type for n in before.graph.node].count("BatchNormalization") == 3
    assert [report.nodes_before, report.nodes] == counts
    assert f"{report.nodes} graph nodes ({report.nodes_before} before)" in str(report)
    with torch.no_grad():
        reference = model.eval()(x)
    got = dict(zip(["logits", "aux"], run_artifact(path, x), strict=True))
    assert len(report.output_errors) == 2
    for (key, want), error in zip(reference.items(), report.output_errors, strict=True):
        measured = float((got[key] - want).abs().max() / want.abs().max())
        assert error == pytest.approx(measured, rel=1e-6, abs=1e-12), key
    assert max(report.output_errors) == report.max_rel_error[0]
    assert "per output" in str(report)


def test_lowering_keeps_the_function_in_float64_and_refuses_batch_statistics():
    model = prepared(LeftBehind()).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    reference = model(x)
    lowered = copy.deepcopy(model)
    assert len(lower_batchnorms(lowered)) == 4
    assert not list(iter_batchnorms(lowered))
    assert isinstance(lowered.flat, LoweredBatchNorm)
    assert close(lowered(x), reference, 1e-12)
    lowered = copy.deepcopy(model)
    lowered.pre.track_running_stats, lowered.pre.running_mean = False, None
    lowered.pre.running_var = None
    with pytest.raises(UnsupportedModelError, match="`pre` has no running statistics"):
        lower_batchnorms(lowered)
    assert not isinstance(lowered.bn, LoweredBatchNorm)  # nothing was changed
    with pytest.raises(UsageError, match="unknown lowering"):
        lower_batchnorms(lowered, "sum")


def test_an_artifact_that_moves_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    from bnsurgery import exporting

    def wrong(model, to="affine"):  # a lowering off by one in the shift
        done = real(model, to)
        for m in model.modules():
            if isinstance(m, LoweredBatchNorm):
                m.shift += 1
        return done

    real = exporting.lower_batchnorms
    monkeypatch.setattr(exporting, "lower_batchnorms", wrong)
    with pytest.raises(VerificationError, match=r"moved by .* nothing written"):
        export(prepared(LeftBehind()), torch.randn(2, 3, 8, 8), tmp_path / "m.pt2")
    assert not list(tmp_path.iterdir())


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # a Python branch on data: torch.export cannot capture it
            return y * 2
        return y


def test_an_unexportable_model_fails_in_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(UnsupportedModelError, match="cannot export to pt2") as err:
        export(prepared(DataDependent()), torch.randn(2, 3, 4, 4), tmp_path / "m.pt2")
    assert "\n" not in str(err.value) and err.value.exit_code == 8
    assert not list(tmp_path.iterdir())


def test_outputs_are_never_clobbered_and_a_missing_folder_is_an_output_error(tmp_path):
    model, x = prepared(models.SEEDS["SimpleCNN"][0]()), torch.randn(2, 3, 32, 32)
    path = tmp_path / "m.pt2"
    path.write_bytes(b"mine")
    with pytest.raises(OutputError):
        export(model, x, path)
    assert path.read_bytes() == b"mine"
    export(model, x, path, force=True)
    assert path.read_bytes() != b"mine"
    with pytest.raises(OutputError):
        export(model, x, tmp_path / "missing" / "m.onnx")
    with pytest.raises(UsageError, match=r"use \.pt2 or \.onnx"):
        export(model, x, tmp_path / "m.bin")


def test_a_fixed_batch_and_the_save_api(tmp_path):
    model, x = prepared(models.SEEDS["SimpleMLP"][0]()), torch.randn(3, 10)
    report = export(model, x, tmp_path / "m.onnx", dynamic_batch=False, opset=18)
    assert not report.dynamic_batch and len(report.max_rel_error) == 1
    assert (
        onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_value
        == 3
    )
    bnsurgery.save(model, tmp_path / "plain.pt2", example_inputs=x)  # lowered, not folded
    assert not batch_norm_nodes(tmp_path / "plain.pt2")
    with pytest.raises(UsageError, match="checked on example inputs"):
        bnsurgery.save(model, tmp_path / "none.pt2")


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_cli_folds_lowers_exports_and_checks(tmp_path, capsys, fmt):
    out = tmp_path / f"r.{fmt}"
    spec = "timm:resnet18(num_classes=3)"
    code, _, err = run(capsys, "fold", spec, "--input-size", "3x32x32", "-o", out)
    assert code == 0, err
    assert "no batch norm; loaded back: max relative error" in err
    assert re.search(r"\d+ graph nodes \(\d+ before\)", err), err
    assert out.is_file() and not batch_norm_nodes(out)
    code, _, err = run(capsys, "fold", spec, "--input-size", "3x32x32", "-o", out)
    assert code == 5 and "--force" in err  # never clobbered without it


def test_the_cli_lowers_where_nothing_folds_and_refuses_an_unexportable_model(
    tmp_path, capsys, monkeypatch
):
    (tmp_path / "cases.py").write_text(
        "from torch import nn\n"
        "class DataDependent(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)\n"
        "    def forward(self, x):\n"
        "        y = self.bn(self.conv(x))\n"
        "        return y * 2 if y.sum() > 0 else y\n"
        "class Left(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.bn = nn.BatchNorm2d(3)\n"
        "    def forward(self, x):\n"
        "        return self.bn(x.relu())\n"
    )
    monkeypatch.chdir(tmp_path)
    code, _, err = run(
        capsys, "fold", "cases:DataDependent", "--input-size", "3x4x4", "-o", "x.pt2"
    )
    assert code == 8 and "cannot export to pt2" in err, err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "fold", "cases:Left", "--input-size", "3x4x4", "-o", "l.onnx")
    assert code == 0, err  # nothing folds: the BN is lowered, and the artifact written
    assert "1 BN lowered" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.py", "l.onnx"]


#: architectures of every kind the fold sees (layer-BN pairs, BN left after it, regions,
#: layout ops, concatenations, BN into BN), timm's and torchvision's: input shape
ZOO = {
    "timm:resnet18": (3, 64, 64),
    "timm:densenet121": (3, 64, 64),  # 62 BN left: lowered
    "timm:resnetv2_50": (3, 64, 64),  # pre-activation: 16 left
    "timm:levit_128s": (3, 224, 224),  # flatten -> BatchNorm1d
    "timm:efficientnet_b0": (3, 64, 64),
    "timm:mobilenetv3_large_100": (3, 64, 64),
    "timm:regnetx_002": (3, 64, 64),
    "timm:ghostnet_100": (3, 64, 64),
    "timm:cs3darknet_s": (3, 64, 64),  # the CSP-Darknet backbone YOLO detectors use
    "timm:repvgg_a0": (3, 64, 64),  # regions collapsed
    "timm:mobileone_s0": (3, 64, 64),
    "timm:fastvit_t8": (3, 64, 64),
    "timm:mixnet_s": (3, 64, 64),  # split -> convs -> cat -> BN
    "timm:dpn68": (3, 64, 64),  # shared concatenated features: 27 left
    "timm:xcit_nano_12_p16_224": (3, 224, 224),  # GELU -> BN -> padded conv: left
    "timm:nextvit_small": (3, 224, 224),  # a BN into the BN after it
    "torchvision:mobilenet_v2": (3, 64, 64),
    "torchvision:googlenet": (3, 64, 64),  # auxiliary heads never called: left, lowered
    "torchvision:shufflenet_v2_x0_5": (3, 64, 64),  # channel split and shuffle
    "torchvision:mnasnet0_5": (3, 64, 64),
    "torchvision:r3d_18": (3, 4, 32, 32),  # video: BatchNorm3d
}


@pytest.mark.zoo
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_export_with_no_batch_norm_checked_loaded_back(tmp_path, name, fmt):
    model = bnsurgery.load(name).eval()
    randomize_bn(model)
    x = torch.randn(2, *ZOO[name])
    path = tmp_path / f"m.{fmt}"
    report = export(model, x, path, count_before=False)  # counts: tested on their own
    assert report.bn_count == len(report.folded) + len(report.lowered) > 0
    assert report.dynamic_batch and max(report.max_rel_error) <= report.tolerance
    assert not batch_norm_nodes(path)
    x3 = torch.randn(3, *ZOO[name])  # read back here, at another batch size
    (got,) = run_artifact(path, x3)
    with torch.no_grad():
        assert close(got, model(x3), report.tolerance)


class DetectionNetwork(nn.Module):
    """A torchvision detector as deployments export it: backbone and head, raw per-anchor
    scores and box offsets out; anchors, decoding and NMS (data-dependent) stay outside."""

    def __init__(self, detector):
        super().__init__()
        self.backbone, self.head = detector.backbone, detector.head

    def forward(self, images):
        out = self.head(list(self.backbone(images).values()))
        return out["cls_logits"], out["bbox_regression"]


@pytest.mark.zoo
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_detection_network_exports_with_no_batch_norm(tmp_path, fmt):
    detector = bnsurgery.load("torchvision:ssdlite320_mobilenet_v3_large").eval()
    model = DetectionNetwork(detector)
    randomize_bn(model)
    x = torch.randn(2, 3, 160, 160)
    path = tmp_path / f"m.{fmt}"
    report = export(model, x, path)
    assert report.bn_count == 70 and len(report.folded) == 70  # backbone and SSDLite head
    assert not batch_norm_nodes(path) and report.nodes <= report.nodes_before
    with torch.no_grad():
        want = model(x)
    for got, expected in zip(run_artifact(path, x), want, strict=True):
        assert close(got, expected, report.tolerance)


@pytest.mark.zoo
def test_a_detection_model_is_refused_in_one_line_with_the_exporters_reason(tmp_path):
    model = bnsurgery.load("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn").eval()
    with pytest.raises(UnsupportedModelError, match="cannot export to onnx: ") as err:
        export(model, torch.randn(1, 3, 64, 64), tmp_path / "m.onnx")
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "fmt, dtype", [("pt2", torch.float16), ("pt2", torch.bfloat16), ("onnx", torch.float16)]
)
def test_a_half_precision_artifact_is_folded_in_float64_then_cast(tmp_path, fmt, dtype):
    model = prepared(LeftBehind())
    x = torch.randn(4, 3, 8, 8)
    path = tmp_path / f"m.{fmt}"
    report = export(model, x, path, dtype=dtype)
    assert report.dtype == str(dtype).removeprefix("torch.")
    assert report.tolerance == (1e-2 if dtype == torch.float16 else 5e-2)
    assert "folded in float64" in str(report)
    (got,) = run_artifact(path, x.to(dtype)) if fmt == "pt2" else run_artifact(path, x.half())
    assert got.dtype == dtype
    assert close(got.float(), model.eval()(x), report.tolerance)
    assert next(model.parameters()).dtype == torch.float32  # the model given: as it was


def test_half_precision_options_that_cannot_be_checked_are_refused(tmp_path, capsys):
    model, x = prepared(LeftBehind()), torch.randn(2, 3, 8, 8)
    with pytest.raises(UsageError, match="no bfloat16 Conv"):
        export(model, x, tmp_path / "m.onnx", dtype=torch.bfloat16)
    with pytest.raises(UsageError, match="float16 or bfloat16"):
        export(model, x, tmp_path / "m.pt2", dtype=torch.float64)
    spec = "timm:resnet18(num_classes=3)"
    code, _, err = run(capsys, "fold", spec, "--input-size", "3x32x32", "--dtype", "float16")
    assert code == 2 and "--dtype is for a .pt2 or .onnx output" in err
    out = tmp_path / "r.pt2"
    code, _, err = run(
        capsys, "fold", spec, "--input-size", "3x32x32", "--dtype", "bfloat16", "-o", out
    )
    assert code == 0, err
    assert not list(tmp_path.glob(".*"))
    program = torch.export.load(str(out))
    assert {p.dtype for p in program.state_dict.values()} == {torch.bfloat16}


ARTICLE = {  # the article's models, as it writes them (tests/seed_models.py): size, format
    "SimpleCNN": ("3x32x32", "onnx"),
    "SimpleMLP": ("10", "pt2"),
    "sequential": ("3x32x32", "pt2"),
    "CIFAR10Model": ("3x32x32", "onnx"),
}


@pytest.mark.parametrize("name", list(ARTICLE))
def test_the_articles_models_deploy_from_the_command_line(tmp_path, capsys, name):
    size, fmt = ARTICLE[name]
    out = tmp_path / f"{name}.{fmt}"
    spec = f"tests.seed_models:{name}"
    code, _, err = run(capsys, "fold", spec, "--input-size", size, "-o", out)
    assert code == 0, err
    assert out.is_file() and not batch_norm_nodes(out)
    assert "batch dynamic, checked one larger" in err


def test_bns_a_pattern_leaves_out_of_the_fold_are_lowered(tmp_path):
    model, x = prepared(LeftBehind()), torch.randn(2, 3, 8, 8)
    report = export(model, x, tmp_path / "m.pt2", exclude="bn")
    assert not report.folded and "bn" in dict(report.lowered)
    assert report.bn_count == len(report.lowered) == 4


def test_an_artifact_that_refuses_another_batch_size_is_written_with_a_fixed_batch(
    tmp_path, monkeypatch
):
    """The exporter may fix one input's batch dimension while it was asked for a dynamic one
    (torchvision's RAFT, ONNX): the file runs on the example inputs but not one sample more.
    The export is redone with a fixed batch, checked, and says so."""
    from bnsurgery import exporting

    real, calls = exporting._check, []

    def refuse_the_larger_batch(tmp, fmt, runs, *args):
        calls.append(len(runs))
        if len(runs) > 1:
            raise exporting._OtherBatchRefused("Got invalid dimensions for input")
        return real(tmp, fmt, runs, *args)

    monkeypatch.setattr(exporting, "_check", refuse_the_larger_batch)
    model, x = prepared(LeftBehind()), torch.randn(2, 3, 8, 8)
    report = export(model, x, tmp_path / "m.onnx")
    assert calls == [2, 1] and not report.dynamic_batch
    assert any("does not take another batch size" in n for n in report.notes)
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 2
