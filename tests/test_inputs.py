"""Example inputs beyond one float tensor, TorchScript of models with structured outputs, and
data-loader workers.

* ``bnsurgery.save(..., "m.ts")`` of models that return a dict, a dataclass, a namedtuple, a
  tuple holding a dict, or a Hugging Face ``ModelOutput``: the program returns plain dicts and
  tuples of the same names in the same order, verified against the eager model before anything
  is written.
* ``--inputs FILE`` (safetensors, ``.pt``, ``.npy``) for a graph net taking ``(x, edge_index)``
  with an integer ``edge_index`` and a keyword-input net, through ``fold``, ``inspect`` and the
  ``.ts`` writers of ``freeze``, ``unfreeze``, ``swap`` and ``recalibrate``; every hostile
  ``--inputs`` file with the guarantees of ``tests/hostile.py``.
* ``--workers N`` reads an image folder in N processes and gives the very same statistics.

The factories here are the ``--arch``/``SOURCE`` of the command-line cases
(``tests.test_inputs:graph_net``); each is seeded and has random BN statistics, so a wrong fold
changes the output.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import bnsurgery
from bnsurgery.datasets import batches_from_path, read_example_inputs
from bnsurgery.errors import DataError, TraceError, VerificationError
from bnsurgery.testing import randomize_bn
from bnsurgery.verify import max_relative_error

from .hostile import (
    DATA,
    OUTPUT,
    SOURCE,
    UNSAFE,
    USAGE,
    Payload,
    check,
    run_cli,
    snapshot,
)

NODES, EDGES, FEATURES = 10, 30, 6


def _seeded(model: nn.Module) -> nn.Module:
    """Random BN statistics and affine parameters (a fold that ignores them shows), eval mode."""
    return randomize_bn(model, seed=1).eval()


# --------------------------------------------------------------------------- test models


class GraphNet(nn.Module):
    """Message passing over ``edge_index`` (2, E) int64: Linear -> BN1d on node features."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(FEATURES, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.lin2 = nn.Linear(8, 8)
        self.bn2 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.lin1(x)))
        src, dst = edge_index
        messages = torch.zeros_like(h).index_add(0, dst, h[src])
        return self.head(torch.relu(self.bn2(self.lin2(h + messages))))


def graph_net() -> nn.Module:
    """Factory (``tests.test_inputs:graph_net``)."""
    torch.manual_seed(0)
    return _seeded(GraphNet())


class KeywordNet(nn.Module):
    """Called by keyword, as Hugging Face models are, and returning a dict; ``mask`` and
    ``scale`` are optional."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, pixel_values, mask=None, scale=None):
        features = torch.relu(self.bn(self.conv(pixel_values)))
        if mask is not None:
            features = features * mask[:, None]
        if scale is not None:
            features = features * scale[:, None, None, None]
        return {"logits": self.head(features.mean((2, 3))), "features": features}


def keyword_net() -> nn.Module:
    """Factory (``tests.test_inputs:keyword_net``)."""
    torch.manual_seed(0)
    return _seeded(KeywordNet())


class KeywordOnlyNet(KeywordNet):
    def forward(self, pixel_values, *, scale):  # type: ignore[override]
        return super().forward(pixel_values, scale=scale)


def keyword_only_net() -> nn.Module:
    """Factory (``tests.test_inputs:keyword_only_net``): ``scale`` only by keyword."""
    torch.manual_seed(0)
    return _seeded(KeywordOnlyNet())


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    features: torch.Tensor
    loss: torch.Tensor | None = None  # None, as without labels: left out of the program's dict


class DataclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        features = self.bn(self.conv(x))
        return Output(logits=self.head(features.mean((2, 3))), features=features)


Pair = collections.namedtuple("Pair", "logits features")


class NamedTupleNet(DataclassNet):
    """Takes a dict (so ``torch.jit.script`` fails and the trace path runs) and returns a
    namedtuple."""

    def forward(self, batch):  # type: ignore[override]
        out = super().forward(batch["image"])
        return Pair(out.logits, out.features)


class ScriptedNamedTupleNet(DataclassNet):
    def forward(self, x):  # type: ignore[override]
        out = self.bn(self.conv(x))
        return Pair(self.head(out.mean((2, 3))), out)


class TupleWithDictNet(DataclassNet):
    """Returns ``(logits, {"features": ..., "pooled": ...})`` and takes two inputs."""

    def forward(self, x, shift):  # type: ignore[override]
        out = super().forward(x + shift)
        return out.logits, {"features": out.features, "pooled": out.features.mean((2, 3))}


class CountingNet(DataclassNet):
    """Its output depends on how often it was called: a trace fixes the count it saw, so the
    program differs from the model on the very inputs it was traced on."""

    calls = 0

    def forward(self, x):  # type: ignore[override]
        self.calls += 1
        out = super().forward(x)
        return Output(logits=out.logits * self.calls, features=out.features)


class InPlaceNet(DataclassNet):
    """Changes its input in place, as ``x.relu_()`` at the top of a model does."""

    def forward(self, x):  # type: ignore[override]
        x.mul_(2.0)
        return super().forward(x)


class StringOutputNet(DataclassNet):
    def forward(self, x):  # type: ignore[override]
        return {"logits": super().forward(x).logits, "label": "cat"}


def hf_resnet() -> nn.Module:
    """Factory (``tests.test_inputs:hf_resnet``): a tiny Hugging Face ResNet from a config,
    random weights; returns an ``ImageClassifierOutputWithNoAttention``."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=3,
    )
    return _seeded(ResNetForImageClassification(config))


def _image(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _graph_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(NODES, FEATURES, generator=g)
    edge_index = torch.randint(0, NODES, (2, EDGES), generator=g)
    return x, edge_index


def _eager(model: nn.Module, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


def _plain(value):
    """The eager output as the program returns it (the documented contract)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if dataclasses.is_dataclass(value):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _assert_same(expected, got, tol: float = 1e-5) -> None:
    """Same structure (dict keys in the same order, tuple lengths), and values within tol."""
    assert type(got) is type(expected), (type(got), type(expected))
    if isinstance(expected, dict):
        assert list(got) == list(expected), (list(got), list(expected))
        for key in expected:
            _assert_same(expected[key], got[key], tol)
    elif isinstance(expected, tuple):
        assert len(got) == len(expected)
        for a, b in zip(expected, got, strict=True):
            _assert_same(a, b, tol)
    else:
        error = max_relative_error(expected, got)
        assert error <= tol, f"max relative error {error:.3g}"


# ------------------------------------------------------------------- TorchScript, the API


def _round_trip(model: nn.Module, tmp_path: Path, args: tuple, name: str = "m.ts"):
    path = bnsurgery.save(model, tmp_path / name, example_inputs=args)
    return torch.jit.load(str(path))


def test_dict_output_keeps_names_and_order(tmp_path):
    model = keyword_net()
    x = _image()
    program = _round_trip(model, tmp_path, (x,))
    got = program(x)
    assert list(got) == ["logits", "features"]
    _assert_same(_eager(model, x), got)


def test_dataclass_output_becomes_a_dict_of_its_fields(tmp_path):
    torch.manual_seed(0)
    model = _seeded(DataclassNet())
    x = _image()
    with pytest.raises(Exception):  # noqa: B017  (the reason tracing is needed at all)
        torch.jit.script(model)
    got = _round_trip(model, tmp_path, (x,))(x)
    assert list(got) == ["logits", "features"]  # loss is None: left out
    _assert_same(_plain(_eager(model, x)), got)


def test_traced_namedtuple_becomes_a_tuple_in_order(tmp_path):
    torch.manual_seed(0)
    model = _seeded(NamedTupleNet())
    batch = {"image": _image()}
    got = _round_trip(model, tmp_path, (batch,))(batch)
    expected = _eager(model, batch)
    assert isinstance(got, tuple) and len(got) == 2
    _assert_same(tuple(expected), tuple(got))


def test_scripted_namedtuple_stays_a_namedtuple(tmp_path):
    torch.manual_seed(0)
    model = _seeded(ScriptedNamedTupleNet())
    x = _image()
    got = _round_trip(model, tmp_path, (x,))(x)
    assert got._fields == ("logits", "features")
    _assert_same(tuple(_eager(model, x)), tuple(got))


def test_tuple_holding_a_dict(tmp_path):
    torch.manual_seed(0)
    model = _seeded(TupleWithDictNet())
    args = (_image(), torch.tensor(0.5))
    got = _round_trip(model, tmp_path, args)(*args)
    _assert_same(_eager(model, *args), got)
    assert list(got[1]) == ["features", "pooled"]


def test_optional_inputs_left_out_are_fixed_and_the_rest_taken_by_name(tmp_path):
    """(pixel_values, None, scale): the program takes pixel_values and scale by name."""
    model = keyword_net()
    x, scale = _image(), torch.tensor([0.5, 2.0])
    program = _round_trip(model, tmp_path, (x, None, scale))
    names = [a.name for a in program.forward.schema.arguments][1:]  # after self
    assert names == ["pixel_values", "scale"]
    _assert_same(_eager(model, x, scale=scale), program(pixel_values=x, scale=scale))
    _assert_same(_eager(model, x, scale=scale), program(x, scale))


def test_hugging_face_model_output(tmp_path):
    pytest.importorskip("transformers")
    model = hf_resnet()
    x = torch.randn(2, 3, 32, 32)
    expected = _eager(model, x)
    assert type(expected).__name__ == "ImageClassifierOutputWithNoAttention"
    got = _round_trip(model, tmp_path, (x,))(x)
    assert list(got) == ["logits"]  # loss and hidden_states are None
    _assert_same({"logits": expected.logits}, got)


def test_a_program_that_differs_from_the_model_is_not_written(tmp_path):
    torch.manual_seed(0)
    model = _seeded(CountingNet())
    with pytest.raises(VerificationError, match="differs from the model's"):
        bnsurgery.save(model, tmp_path / "m.ts", example_inputs=_image())
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_changes_its_input_in_place_is_verified_fairly(tmp_path):
    torch.manual_seed(0)
    model = _seeded(InPlaceNet())
    x = _image()
    program = _round_trip(model, tmp_path, (x.clone(),))
    _assert_same(_plain(_eager(model, x.clone())), program(x.clone()))


def test_an_output_a_trace_cannot_return_is_a_trace_error(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(TraceError, match="neither scripted nor traced"):
        bnsurgery.save(_seeded(StringOutputNet()), tmp_path / "m.ts", example_inputs=_image())
    assert list(tmp_path.iterdir()) == []


def test_the_model_keeps_its_own_output_and_flags(tmp_path):
    """The tracing hook is gone afterwards, and every module's mode is as it was."""
    torch.manual_seed(0)
    model = _seeded(DataclassNet()).train()
    model.bn.eval()
    bnsurgery.save(model, tmp_path / "m.ts", example_inputs=_image())
    assert isinstance(model.eval()(_image()), Output)
    assert not model._forward_hooks
    model.train()
    model.bn.eval()
    assert [m.training for m in model.modules()] == [True, True, False, True]


# ----------------------------------------------------------------- --inputs, the happy path


def _safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("form", ["safetensors", "pt tuple", "pt list", "pt dict of 0, 1"])
def test_fold_graph_net_with_integer_edge_index(form, tmp_path, capsys):
    x, edge_index = _graph_inputs()
    if form == "safetensors":
        inputs = _safetensors(tmp_path / "graph.safetensors", {"0": x, "1": edge_index})
    else:
        value = {"pt tuple": (x, edge_index), "pt list": [x, edge_index]}.get(
            form, {"0": x, "1": edge_index}
        )
        inputs = tmp_path / "graph.pt"
        torch.save(value, inputs)
    out = tmp_path / "graph.folded.safetensors"
    args = ["fold", "tests.test_inputs:graph_net", "--inputs", inputs, "-o", out, "--json"]
    code, stdout, err = run_cli(capsys, args)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["folded_count"] == report["bn_count"] == 2 and report["verified"]
    folded = bnsurgery.load(out, arch="tests.test_inputs:graph_net")
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    other = _graph_inputs(seed=1)  # not the inputs it was verified on
    _assert_same(_eager(graph_net(), *other), _eager(folded, *other))


def test_fold_graph_net_to_torchscript(tmp_path, capsys):
    x, edge_index = _graph_inputs()
    inputs = _safetensors(tmp_path / "graph.safetensors", {"0": x, "1": edge_index})
    out = tmp_path / "graph.ts"
    code, _, err = run_cli(
        capsys, ["fold", "tests.test_inputs:graph_net", "--inputs", inputs, "-o", out]
    )
    assert code == 0, err
    program = torch.jit.load(str(out))
    other = _graph_inputs(seed=2)
    _assert_same(_eager(graph_net(), *other), program(*other))


@pytest.mark.parametrize("form", ["safetensors", "pt dict"])
def test_fold_keyword_net_to_torchscript(form, tmp_path, capsys):
    """Keywords with a gap (mask left out): the program takes pixel_values and scale."""
    x, scale = _image(), torch.tensor([0.5, 2.0])
    if form == "safetensors":
        inputs = _safetensors(tmp_path / "kw.safetensors", {"pixel_values": x, "scale": scale})
    else:
        inputs = tmp_path / "kw.pt"
        torch.save({"scale": scale, "pixel_values": x}, inputs)  # order does not matter
    out = tmp_path / "kw.ts"
    code, stdout, err = run_cli(
        capsys, ["fold", "tests.test_inputs:keyword_net", "--inputs", inputs, "-o", out]
    )
    assert code == 0, err
    assert "folded 1 of 1" in stdout
    program = torch.jit.load(str(out))
    y, other_scale = _image(seed=3), torch.tensor([1.5, -1.0])
    expected = _eager(keyword_net(), pixel_values=y, scale=other_scale)
    _assert_same(expected, program(pixel_values=y, scale=other_scale))


def test_fold_npy_single_input(tmp_path, capsys):
    inputs = tmp_path / "x.npy"
    np.save(inputs, torch.randn(2, 3, 16, 16).numpy())
    out = tmp_path / "cnn.safetensors"
    code, stdout, err = run_cli(
        capsys, ["fold", "tests.models:simple_cnn", "--inputs", inputs, "-o", out]
    )
    assert code == 0, err
    assert "folded 1 of 1" in stdout and "verified" in stdout


def test_float_inputs_take_the_models_dtype(tmp_path):
    model = graph_net().double()
    x, edge_index = _graph_inputs()
    given = read_example_inputs(_safetensors(tmp_path / "g.safetensors", {"0": x, "1": edge_index}))
    args = bnsurgery.datasets.example_arguments(model, given)
    assert args[0].dtype == torch.float64 and args[1].dtype == torch.int64
    assert torch.equal(args[1], edge_index)


@pytest.mark.parametrize("model", ["graph_net", "keyword_net"])
def test_inspect_walks_the_real_forward_pass(model, tmp_path, capsys):
    if model == "graph_net":
        x, edge_index = _graph_inputs()
        inputs = _safetensors(tmp_path / "in.safetensors", {"0": x, "1": edge_index})
    else:
        inputs = _safetensors(tmp_path / "in.safetensors", {"pixel_values": _image()})
    code, stdout, err = run_cli(
        capsys, ["inspect", f"tests.test_inputs:{model}", "--inputs", inputs]
    )
    assert code == 0, err
    assert "fold plan from a runtime walk" in stdout


def test_inspect_without_inputs_is_symbolic(capsys):
    """The control: the same model without --inputs gets no runtime walk."""
    code, stdout, err = run_cli(capsys, ["inspect", "tests.test_inputs:keyword_net"])
    assert code == 0, err
    assert "runtime walk" not in stdout


def test_every_torchscript_writer_takes_inputs(tmp_path, capsys):
    """freeze, unfreeze, swap and recalibrate write .ts of the keyword net traced on --inputs;
    freeze, unfreeze and swap to frozen keep the eval function."""
    x, scale = _image(), torch.tensor([0.5, 2.0])
    inputs = _safetensors(tmp_path / "kw.safetensors", {"pixel_values": x, "scale": scale})
    spec = "tests.test_inputs:keyword_net"
    frozen = tmp_path / "frozen.safetensors"
    assert run_cli(capsys, ["freeze", spec, "-o", frozen])[0] == 0
    data = tmp_path / "data.npy"
    np.save(data, torch.randn(6, 3, 8, 8).numpy())
    runs = {
        "freeze": ["freeze", spec],
        "unfreeze": ["unfreeze", frozen, "--arch", spec],
        "swap": ["swap", spec, "--to", "frozen"],
        "recalibrate": ["recalibrate", spec, "--data", data, "--batch-size", "3", "--quiet"],
    }
    y, other_scale = _image(seed=4), torch.tensor([2.0, 0.25])
    expected = _eager(keyword_net(), pixel_values=y, scale=other_scale)
    for command, args in runs.items():
        out = tmp_path / f"{command}.ts"
        code, _, err = run_cli(capsys, [*args, "--inputs", inputs, "-o", out])
        assert code == 0, (command, err)
        got = torch.jit.load(str(out))(pixel_values=y, scale=other_scale)
        if command == "recalibrate":
            assert list(got) == ["logits", "features"]
            assert max_relative_error(expected, got) > 1e-3  # new statistics, new function
        else:
            _assert_same(expected, got)


def test_hugging_face_model_through_the_command_line(tmp_path, capsys):
    pytest.importorskip("transformers")
    x = torch.randn(2, 3, 32, 32)
    inputs = _safetensors(tmp_path / "pixels.safetensors", {"pixel_values": x})
    out = tmp_path / "hf.ts"
    code, stdout, err = run_cli(
        capsys, ["fold", "tests.test_inputs:hf_resnet", "--inputs", inputs, "-o", out, "--json"]
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["folded_count"] > 0 and report["verified"]
    got = torch.jit.load(str(out))(pixel_values=torch.ones(1, 3, 32, 32))
    assert list(got) == ["logits"]
    _assert_same({"logits": _eager(hf_resnet(), torch.ones(1, 3, 32, 32)).logits}, got)


# ------------------------------------------------------------------ --inputs, hostile files


def _nan(folder: Path, world) -> Path:
    x = torch.randn(4, 3, 16, 16)
    x[2, 1, 3, 3] = float("nan")
    np.save(folder / "nan.npy", x.numpy())
    return folder / "nan.npy"


def _inf(folder: Path, world) -> Path:
    x, edge_index = _graph_inputs()
    x[7, 0] = -float("inf")
    return _safetensors(folder / "inf.safetensors", {"0": x, "1": edge_index})


def _missing(folder: Path, world) -> Path:
    return folder / "missing.pt"


def _folder(folder: Path, world) -> Path:
    (folder / "inputs").mkdir()
    return folder / "inputs"


def _empty(folder: Path, world) -> Path:
    return world["empty"]


def _random_bytes(folder: Path, world) -> Path:
    return world["random_bytes"]


def _torchscript(folder: Path, world) -> Path:
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), folder / "program.pt")
    return folder / "program.pt"


def _pickle_payload(folder: Path, world) -> Path:
    torch.save({"0": torch.randn(2, 3, 16, 16), "1": Payload(world["marker"])}, folder / "p.pt")
    return folder / "p.pt"


def _gap(folder: Path, world) -> Path:
    x, edge_index = _graph_inputs()
    return _safetensors(folder / "gap.safetensors", {"0": x, "2": edge_index})


def _mixed(folder: Path, world) -> Path:
    x, edge_index = _graph_inputs()
    return _safetensors(folder / "mixed.safetensors", {"0": x, "edge_index": edge_index})


def _unknown_keyword(folder: Path, world) -> Path:
    return _safetensors(folder / "kw.safetensors", {"pixels": _image()})


def _keyword_only(folder: Path, world) -> Path:
    return _safetensors(
        folder / "kwonly.safetensors", {"pixel_values": _image(), "scale": _image()}
    )


def _too_many(folder: Path, world) -> Path:
    x, edge_index = _graph_inputs()
    torch.save((x, edge_index, edge_index), folder / "three.pt")
    return folder / "three.pt"


def _too_few(folder: Path, world) -> Path:
    torch.save((_graph_inputs()[0],), folder / "one.pt")
    return folder / "one.pt"


def _not_tensors(folder: Path, world) -> Path:
    torch.save({"pixel_values": _image(), "mask": [1, 2]}, folder / "labels.pt")
    return folder / "labels.pt"


def _empty_tuple(folder: Path, world) -> Path:
    torch.save((), folder / "nothing.pt")
    return folder / "nothing.pt"


def _empty_safetensors(folder: Path, world) -> Path:
    return _safetensors(folder / "none.safetensors", {})


def _overflow(folder: Path, world) -> Path:
    np.save(folder / "wide.npy", np.full((2, 3, 16, 16), 1e300))
    return folder / "wide.npy"


def _model_file(folder: Path, world) -> Path:
    """A checkpoint given as inputs by mistake: its keys are no parameter names."""
    return world["model"]


CNN = "tests.models:simple_cnn"
#: case: (make the file, source spec, exit code, phrases the one line must contain)
HOSTILE = {
    "nan": (_nan, CNN, DATA, ("input 0 holds 1 NaN value (first at sample 2)",)),
    "inf": (_inf, "graph_net", DATA, ("input 0 holds 1 infinite value (first at sample 7)",)),
    "missing": (_missing, CNN, SOURCE, ("no such file",)),
    "folder": (_folder, CNN, SOURCE, ("is a folder",)),
    "empty": (_empty, CNN, SOURCE, ("is empty",)),
    "random_bytes": (_random_bytes, CNN, SOURCE, ("not a tensor file",)),
    "torchscript": (_torchscript, CNN, UNSAFE, ("TorchScript", "not run")),
    "pickle_payload": (_pickle_payload, CNN, UNSAFE, ("pickled Python objects", "not run")),
    "gap": (_gap, "graph_net", DATA, ("0, 2", "without gaps")),
    "mixed": (_mixed, "graph_net", DATA, ("0, edge_index",)),
    "unknown_keyword": (_unknown_keyword, "keyword_net", DATA, ("'pixels' names no parameter",)),
    "keyword_only": (_keyword_only, "keyword_only_net", DATA, ("'scale'", "by keyword")),
    "too_many": (_too_many, "graph_net", DATA, ("too many positional arguments",)),
    "too_few": (_too_few, "graph_net", DATA, ("edge_index",)),
    "not_tensors": (_not_tensors, "keyword_net", DATA, ("input 'mask'[0] is a int",)),
    "empty_tuple": (_empty_tuple, CNN, DATA, ("empty tuple",)),
    "empty_safetensors": (_empty_safetensors, CNN, DATA, ("no tensor",)),
    "overflow": (_overflow, CNN, DATA, ("overflow the model's float32",)),
    "model_file": (_model_file, CNN, DATA, ("'bn1.bias' (and 6 more) names no parameter",)),
}


def _source(name: str) -> str:
    return name if ":" in name else f"tests.test_inputs:{name}"


@pytest.mark.hostile
@pytest.mark.parametrize("command", ["fold", "inspect", "freeze"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_inputs(case, command, world, capsys):
    make, source, expected, phrases = HOSTILE[case]
    inputs = make(world["in"], world)
    args = [command, _source(source), "--inputs", inputs]
    if command != "inspect":
        args += ["-o", world["out"] / f"{command}.ts"]
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, args)
    check(code, err, expected, before, snapshot(world["in"], world["out"]))
    for phrase in (str(inputs), *phrases):
        assert phrase in err, err
    assert not world["marker"].exists(), "the pickle payload ran"


@pytest.mark.hostile
def test_pickled_inputs_run_code_only_with_the_flag(world, capsys):
    """The control of ``pickle_payload``: with --trust-code the payload does run (so the case
    above would have seen it), and what it leaves, None, is not a tensor."""
    inputs = _pickle_payload(world["in"], world)
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, ["inspect", CNN, "--inputs", inputs, "--trust-code"])
    check(code, err, DATA, before, snapshot(world["in"], world["out"]))
    assert world["marker"].exists()
    assert "input 1 is a NoneType, not a tensor" in err


@pytest.mark.hostile
def test_clean_inputs_are_the_control(world, capsys):
    inputs = world["in"] / "clean.npy"
    np.save(inputs, torch.randn(4, 3, 16, 16).numpy())
    out = world["out"] / "fold.ts"
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, ["fold", CNN, "--inputs", inputs, "-o", out])
    check(code, err, 0, before, snapshot(world["in"], world["out"]), (str(out),))


@pytest.mark.hostile
@pytest.mark.parametrize(
    "extra",
    [
        ["--input-size", "3,16,16", "--inputs", "INPUTS"],
        ["--inputs", "INPUTS", "--input-size", "3,16,16"],
        ["--inputs", ""],
        ["--inputs", "INPUTS", "--inputs-size", "3"],
    ],
    ids=["size-first", "inputs-first", "empty-path", "typo"],
)
def test_usage_errors(extra, world, capsys):
    inputs = world["in"] / "x.npy"
    np.save(inputs, torch.randn(2, 3, 16, 16).numpy())
    args = ["fold", CNN, "-o", world["out"] / "m.ts"]
    args += [str(inputs) if a == "INPUTS" else a for a in extra]
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, args)
    check(code, err, USAGE, before, snapshot(world["in"], world["out"]))


@pytest.mark.hostile
@pytest.mark.parametrize("command", ["fold", "freeze", "swap", "recalibrate"])
def test_output_never_replaces_the_inputs_file(command, world, capsys):
    inputs = world["in"] / "x.pt"
    torch.save(torch.randn(4, 3, 16, 16), inputs)
    args = [command, CNN, "--inputs", inputs, "-o", inputs, "--force", "--format", "torchscript"]
    args += {"swap": ["--to", "frozen"], "recalibrate": ["--data", world["data"]]}.get(command, [])
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, args)
    check(code, err, OUTPUT, before, snapshot(world["in"], world["out"]))
    assert f"is the input {inputs}" in err, err


def test_library_reader_raises_typed_errors(tmp_path):
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(DataError, match=r"input 'x' holds 1 NaN value \(first at sample 1\)"):
        read_example_inputs(_safetensors(tmp_path / "a.safetensors", {"x": x}))
    given = read_example_inputs(_safetensors(tmp_path / "b.safetensors", {"scale": _image()}))
    assert given.kwargs.keys() == {"scale"} and not given.args
    with pytest.raises(DataError, match="pixel_values"):
        bnsurgery.datasets.example_arguments(keyword_net(), given)  # required, not given


# ------------------------------------------------------------------------------- --workers


def _image_folder(folder: Path, count: int = 11) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, size=(20 + i, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i}.png")
    return folder


def test_workers_give_the_same_batches(tmp_path):
    folder = _image_folder(tmp_path / "images")
    model = bnsurgery.load(CNN)
    kwargs = dict(batch_size=3, input_size=(3, 16, 16))
    serial, count = batches_from_path(folder, model, **kwargs)
    parallel, parallel_count = batches_from_path(folder, model, workers=2, **kwargs)
    serial, parallel = list(serial), list(parallel)
    assert count == parallel_count == len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("command", ["recalibrate", "swap"])
def test_workers_give_the_same_statistics(command, tmp_path, capsys):
    """recalibrate --data and swap --calibrate on a folder: --workers 2 writes the very
    model --workers 0 writes, and that model differs from the original."""
    folder = _image_folder(tmp_path / "images")
    written = {}
    for workers in (0, 2):
        out = tmp_path / f"{command}-{workers}.safetensors"
        args = [command, CNN, "-o", out, "--input-size", "3,16,16", "--batch-size", "3"]
        if command == "recalibrate":
            args += ["--data", folder, "--quiet"]
        else:
            args += ["--to", "groupnorm", "--calibrate", folder]
        code, _, err = run_cli(capsys, [*args, "--workers", workers])
        assert code == 0, err
        written[workers] = bnsurgery.load(out, arch=CNN).state_dict()
    original = bnsurgery.load(CNN).state_dict()
    assert written[0].keys() == written[2].keys()
    for key, value in written[0].items():
        assert torch.equal(value, written[2][key]), key
    changed = [
        k for k, v in written[0].items() if k in original and not torch.equal(v, original[k])
    ]
    assert changed, "the data changed nothing: the comparison proves nothing"


@pytest.mark.hostile
def test_a_corrupt_image_in_a_worker_is_one_line(world, capsys):
    folder = _image_folder(world["in"] / "images", count=7)
    (folder / "class0" / "bad.png").write_bytes((folder / "class0" / "0.png").read_bytes()[:40])
    args = ["recalibrate", world["model"], "--arch", "tests.models:simple_cnn", "--data", folder]
    args += ["--input-size", "3,16,16", "--batch-size", "2", "--workers", "2", "--quiet"]
    args += ["-o", world["out"] / "r.safetensors"]
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, args)
    check(code, err, SOURCE, before, snapshot(world["in"], world["out"]), message="bad.png")
    assert "cannot read image" in err and "worker" not in err, err


@pytest.mark.hostile
@pytest.mark.parametrize("value", ["-1", "257", "two"])
def test_workers_out_of_range(value, world, capsys):
    args = ["recalibrate", CNN, "--data", world["data"], "--workers", value]
    args += ["-o", world["out"] / "r.safetensors"]
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, args)
    check(code, err, USAGE, before, snapshot(world["in"], world["out"]), message="--workers")


def test_help_says_workers_do_not_apply_to_tensor_files():
    from click.testing import CliRunner

    from bnsurgery.cli import cli

    for command in ("recalibrate", "swap"):
        text = " ".join(CliRunner().invoke(cli, [command, "--help"]).output.split())
        assert "--workers" in text and "No effect on a tensor file" in text
    text = " ".join(CliRunner().invoke(cli, ["fold", "--help"]).output.split())
    assert "--inputs" in text and "--workers" not in text
