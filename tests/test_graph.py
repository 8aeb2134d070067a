"""The graph walk (bnsurgery.graph): producers and consumers of every tensor around each BN.

Small hand-built nets, walked at run time (with example inputs) and symbolically (without).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from bnsurgery.errors import TraceError, UnsupportedModelError
from bnsurgery.graph import DECISIONS, Graph, Node, Trace, Value, trace


def x4(channels: int = 4, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(2, channels, 5, 5)


def only(nodes: list[Node], kind: str) -> Node:
    found = [n for n in nodes if n.kind == kind]
    assert len(found) == 1, found
    return found[0]


def named(nodes: list[Node], name: str) -> Node:
    found = [n for n in nodes if n.name == name]
    assert len(found) == 1, found
    return found[0]


def conv_bn(cin: int = 4, cout: int = 4, k: int = 1, **kw) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, k, **kw), nn.BatchNorm2d(cout)


# ----------------------------------------------------------------------------- the models


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn(3, 4, 3, padding=1)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.b = nn.Parameter(torch.randn(4))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.w, self.b, stride=2, padding=1))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, x):
        return self.bn(self.conv(self.bn(self.conv(x))))


class InplaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, x):
        y = self.conv(x)
        y.relu_()
        return self.bn(y)


class InplaceAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, x):
        z = self.bn(self.conv(x))
        z += x
        return z


class MutatedThroughView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, x):
        y = self.conv(x)
        y.view(-1).relu_()  # changes y through an alias
        return self.bn(y)


class DictInOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, d):
        y = self.bn(self.conv(d["a"]))
        return {"y": y, "pair": (y * 2, d["b"] + 1)}


class ViewAfterBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, x):
        z = self.bn(self.conv(x))
        return z.view(2, -1)


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, x):
        return self.bn(input=self.conv(x))


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, x):
        y = self.conv(x)
        if x.sum() > 0:
            y = y * 2
        return self.bn(y)


class InputIntoBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(self.bn(x))


# ------------------------------------------------------------------------- conv -> bn -> relu


def test_conv_bn_relu_producer_and_consumers():
    model = ConvBnRelu()
    x = x4(3)
    walked = trace(model, x)
    assert isinstance(walked, Trace)
    graph = walked.graph
    assert isinstance(graph, Graph)
    assert graph.method == "runtime"
    assert [n.kind for n in graph.nodes] == ["conv", "batchnorm", "op"]
    conv, bn, relu = graph.nodes
    assert [n.index for n in graph.nodes] == [0, 1, 2]

    assert bn.name == "bn"
    assert bn.module is model.bn
    assert bn.data.producer is conv
    assert bn.data.consumers == [bn]
    assert bn.inputs == [bn.data]
    assert conv.outputs == [bn.data]
    assert relu.name == "relu"
    assert bn.outputs[0].consumers == [relu]
    assert graph.bn_sites(model.bn) == [bn]
    assert graph.bn_sites(nn.BatchNorm2d(4)) == []


def test_conv_node_carries_the_very_weight_bias_and_attributes():
    model = ConvBnRelu()
    graph = trace(model, x4(3)).graph
    conv = graph.nodes[0]
    assert conv.name == "conv2d"
    assert conv.weight is model.conv.weight
    assert conv.bias is model.conv.bias
    assert conv.attrs == {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    assert conv.data.origin == "model input"
    assert conv.data.producer is None
    assert conv.data.consumers == [conv]
    assert graph.uses(model.conv.weight) == [conv]
    assert graph.uses(model.conv.bias) == [conv]
    assert graph.uses(None) == []
    assert graph.uses(torch.zeros(1)) == []


def test_values_know_rank_output_and_their_reprs():
    model = ConvBnRelu()
    graph = trace(model, x4(3)).graph
    assert len(graph.values) == 4
    assert [v.index for v in graph.values] == [0, 1, 2, 3]
    assert [v.ndim for v in graph.values] == [4, 4, 4, 4]
    assert [v.is_output for v in graph.values] == [False, False, False, True]
    assert [v.origin for v in graph.values] == ["model input", "op", "op", "op"]
    assert repr(graph.values[1]) == "Value(%1 from conv2d, 1 consumers)"
    assert repr(graph.values[0]) == "Value(%0 from model input, 1 consumers)"
    assert repr(graph.nodes[1]) == "Node(#1 batchnorm bn)"


def test_trace_output_is_the_models_eval_output():
    model = ConvBnRelu()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
        model.bn.running_var.fill_(2.0)
    x = x4(3)
    walked = trace(model, x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(walked.output, expected)


# ------------------------------------------------------------------------------- residual


def test_residual_conv_output_has_two_consumers():
    model = Residual()
    graph = trace(model, x4()).graph
    conv, bn, add = graph.nodes
    assert (conv.kind, bn.kind, add.kind, add.name) == ("conv", "batchnorm", "op", "add")
    y = bn.data
    assert y.producer is conv
    assert y.consumers == [bn, add]
    assert add.inputs == [bn.outputs[0], y]
    assert add.outputs[0].is_output
    assert not y.is_output


# ------------------------------------------------------------------------- functional conv


def test_functional_conv_with_module_held_weights():
    model = FunctionalConv()
    x = x4()
    graph = trace(model, x).graph
    conv = only(graph.nodes, "conv")
    bn = only(graph.nodes, "batchnorm")
    assert conv.weight is model.w
    assert conv.bias is model.b
    assert conv.attrs == {"stride": 2, "padding": 1, "dilation": 1, "groups": 1}
    assert conv.data.origin == "model input"
    assert bn.data.producer is conv
    assert graph.uses(model.w) == [conv]
    assert graph.uses(model.b) == [conv]
    assert bn.data.ndim == 4


# ------------------------------------------------------------------------ a module twice


def test_module_called_twice_gives_two_sites():
    model = CalledTwice()
    graph = trace(model, x4()).graph
    assert [n.kind for n in graph.nodes] == ["conv", "batchnorm", "conv", "batchnorm"]
    first, second = graph.bn_sites(model.bn)
    assert first.index < second.index
    assert first.name == second.name == "bn"
    assert first.module is second.module is model.bn
    assert first.data is not second.data
    assert first.data.producer is graph.nodes[0]
    assert second.data.producer is graph.nodes[2]
    assert first.outputs[0].consumers == [graph.nodes[2]]
    assert graph.nodes[0].weight is graph.nodes[2].weight is model.conv.weight
    assert graph.uses(model.conv.weight) == [graph.nodes[0], graph.nodes[2]]
    assert second.outputs[0].is_output
    assert not first.outputs[0].is_output


# ------------------------------------------------------------------ in-place ops and views


def test_inplace_relu_between_conv_and_bn_is_the_producer():
    model = InplaceRelu()
    graph = trace(model, x4()).graph
    conv = only(graph.nodes, "conv")
    bn = only(graph.nodes, "batchnorm")
    relu = named(graph.nodes, "relu_")
    assert bn.data.producer is relu
    assert conv.outputs[0].consumers == [relu]
    assert relu.outputs == [bn.data]
    assert bn.data is not conv.outputs[0]  # the mutated tensor is a new value
    assert bn.data.ndim == 4


def test_inplace_add_after_bn_makes_a_new_value():
    model = InplaceAdd()
    x = x4()
    graph = trace(model, x).graph
    bn = only(graph.nodes, "batchnorm")
    add = named(graph.nodes, "add_")  # z += x
    out = bn.outputs[0]
    assert out.consumers == [add]
    assert add.inputs[0] is out
    assert add.inputs[1].origin == "model input"
    assert add.outputs[0].is_output
    assert add.outputs[0].producer is add
    # the tensor the model returns is the BN's output object, but mutated: not the BN's value
    assert not out.is_output


def test_mutation_through_a_view_is_seen_at_the_bn():
    model = MutatedThroughView()
    graph = trace(model, x4()).graph
    bn = only(graph.nodes, "batchnorm")
    conv = only(graph.nodes, "conv")
    view = named(graph.nodes, "view")
    assert conv.outputs[0].consumers == [view]
    assert bn.data.producer is None
    assert bn.data.origin == "mutated in place through a view or alias"
    assert bn.data is not conv.outputs[0]


def test_view_after_bn():
    model = ViewAfterBn()
    graph = trace(model, x4()).graph
    bn = only(graph.nodes, "batchnorm")
    view = named(graph.nodes, "view")
    out = bn.outputs[0]
    assert out.consumers == [view]
    assert view.inputs == [out]
    assert view.outputs[0].ndim == 2
    assert view.outputs[0].is_output
    assert out.ndim == 4
    assert not out.is_output


def test_metadata_reads_and_no_op_calls_are_not_consumers():
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn()

        def forward(self, x):
            y = self.conv(x)
            assert y.shape[1] == y.size(1) == 4 and y.dim() == 4 and y.numel() > 0
            y = y.contiguous()  # already contiguous: returns y itself
            return self.bn(y)

    graph = trace(Reads(), x4()).graph
    assert [n.kind for n in graph.nodes] == ["conv", "batchnorm"]
    conv, bn = graph.nodes
    assert conv.outputs[0].consumers == [bn]
    assert bn.data.producer is conv


# ---------------------------------------------------------------- dict inputs and outputs


@pytest.mark.parametrize("wrap", [True, False], ids=["tuple_of_dict", "bare_dict"])
def test_dict_inputs_and_dict_tuple_outputs(wrap):
    model = DictInOut()
    d = {"a": x4(seed=1), "b": x4(seed=2)}
    walked = trace(model, (d,) if wrap else d)
    graph = walked.graph
    conv = only(graph.nodes, "conv")
    bn = only(graph.nodes, "batchnorm")
    mul = named(graph.nodes, "mul")
    add = named(graph.nodes, "add")
    assert conv.data.origin == "model input"
    assert add.inputs[0].origin == "model input"
    assert conv.data is not add.inputs[0]  # d["a"] and d["b"] are two inputs
    assert bn.data.producer is conv
    assert not bn.data.is_output
    assert bn.outputs[0].is_output  # returned as "y"
    assert bn.outputs[0].consumers == [mul]
    assert mul.outputs[0].is_output  # inside the tuple
    assert add.outputs[0].is_output
    assert set(walked.output) == {"y", "pair"}
    assert isinstance(walked.output["pair"], tuple)


# ------------------------------------------------------------------------- keyword call


def test_bn_called_with_input_keyword():
    model = KeywordCall()
    graph = trace(model, x4()).graph
    conv = only(graph.nodes, "conv")
    bn = only(graph.nodes, "batchnorm")
    assert bn.data is not None
    assert bn.data.producer is conv
    assert conv.outputs[0].consumers == [bn]
    assert bn.outputs[0].is_output


# -------------------------------------------------------------------- data-dependent branch


def test_data_dependent_branch_is_counted_in_decisions():
    model = Branch()
    x = x4().abs()  # x.sum() > 0: the branch is taken
    graph = trace(model, x).graph
    conv = only(graph.nodes, "conv")
    bn = only(graph.nodes, "batchnorm")
    truth = named(graph.nodes, "__bool__")
    assert conv.decisions == 0
    assert conv.outputs[0].decisions == 0
    assert truth.decisions == 1
    assert bn.decisions == 1
    assert bn.outputs[0].decisions == 1
    assert bn.data.producer.name == "mul"  # the side the walk saw
    assert bn.data.decisions == 1  # made after the decision, inside the branch


def test_branch_not_taken_is_counted_too():
    graph = trace(Branch(), -x4().abs()).graph
    bn = only(graph.nodes, "batchnorm")
    assert bn.data.producer.kind == "conv"
    assert bn.data.decisions == 0
    assert bn.decisions == 1  # conv output crosses the decision before the BN


@pytest.mark.parametrize("read", ["item", "tolist", "__bool__", "__int__", "__float__"])
def test_every_decision_kind_is_counted(read):
    assert read in DECISIONS

    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn()

        def forward(self, x):
            y = self.conv(x)
            getattr(x[0, 0, 0, 0], read)()
            return self.bn(y)

    graph = trace(Reads(), x4()).graph
    assert only(graph.nodes, "batchnorm").decisions == 1
    assert only(graph.nodes, "conv").decisions == 0


def test_reading_a_parameter_or_buffer_is_not_a_decision():
    class Flags(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn()
            self.register_buffer("flag", torch.tensor(1.0))

        def forward(self, x):
            y = self.conv(x)
            if self.flag.item() > 0 and self.bn.num_batches_tracked.item() >= 0:
                y = y + 0
            return self.bn(y)

    graph = trace(Flags(), x4()).graph
    assert only(graph.nodes, "batchnorm").decisions == 0


def test_decisions_are_only_values_read_into_python():
    assert {"__bool__", "item", "tolist"} <= DECISIONS
    assert isinstance(DECISIONS, frozenset)
    assert not DECISIONS & {"size", "dim", "shape", "numel"}
    assert not DECISIONS & {"any", "all"}  # tensors: a branch on one is counted at __bool__


def test_any_not_converted_to_bool_is_no_decision():
    class Mask(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn()

        def forward(self, x):
            return self.bn(self.conv(x) * x.any())

    graph = trace(Mask(), x4()).graph
    assert only(graph.nodes, "batchnorm").decisions == 0


# ----------------------------------------------------------------------- model input into BN


def test_model_input_feeding_a_bn_directly():
    model = InputIntoBn()
    graph = trace(model, x4()).graph
    bn = only(graph.nodes, "batchnorm")
    conv = only(graph.nodes, "conv")
    assert bn.data.producer is None
    assert bn.data.origin == "model input"
    assert bn.outputs[0].consumers == [conv]
    assert conv.data is bn.outputs[0]


def test_a_plain_tensor_attribute_feeding_a_bn_is_an_input_or_constant():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.const = torch.ones(1, 4, 2, 2)  # not a buffer

        def forward(self, x):
            return self.bn(self.const) + x.mean()

    graph = trace(Constant(), x4()).graph
    bn = only(graph.nodes, "batchnorm")
    assert bn.data.producer is None
    assert bn.data.origin == "input or constant"


def test_bn_statistics_read_outside_the_bn_call_are_uses():
    class Stray(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn()

        def forward(self, x):
            return self.bn(self.conv(x)) - self.bn.running_mean.view(1, -1, 1, 1)

    model = Stray()
    graph = trace(model, x4()).graph
    uses = graph.uses(model.bn.running_mean)
    assert [n.name for n in uses] == ["view"]


# ------------------------------------------------------------------------- other layer kinds


def test_linear_and_conv_transpose_kinds():
    class Kinds(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(4, 6)
            self.bn1 = nn.BatchNorm1d(6)
            self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
            self.bn2 = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn1(self.lin(x.mean((2, 3)))), self.bn2(self.up(x))

    model = Kinds()
    graph = trace(model, x4()).graph
    lin = only(graph.nodes, "linear")
    up = only(graph.nodes, "conv_transpose")
    bn1, bn2 = graph.bn_sites(model.bn1)[0], graph.bn_sites(model.bn2)[0]
    assert lin.weight is model.lin.weight
    assert lin.bias is model.lin.bias
    assert lin.attrs == {}
    assert bn1.data.producer is lin
    assert bn1.data.ndim == 2
    assert up.weight is model.up.weight
    assert up.attrs["stride"] == (2, 2)
    assert up.attrs["output_padding"] == (0, 0)
    assert bn2.data.producer is up
    assert bn1.outputs[0].is_output
    assert bn2.outputs[0].is_output


# ---------------------------------------------------------------------------- symbolic walk


def shape(graph: Graph) -> list[tuple]:
    """The producer/consumer answers around each BN, free of the walk's naming."""
    rows = []
    for bn in (n for n in graph.nodes if n.kind == "batchnorm"):
        prod = bn.data.producer
        rows.append(
            (
                bn.name,
                prod.kind if prod else bn.data.origin,
                prod.weight if prod else None,
                [c.kind for c in bn.data.consumers],
                [c.kind for c in bn.outputs[0].consumers],
                bn.data.is_output,
                bn.outputs[0].is_output,
            )
        )
    return rows


@pytest.mark.parametrize(
    "make, inputs",
    [
        (ConvBnRelu, lambda: x4(3)),
        (Residual, x4),
        (FunctionalConv, x4),
        (CalledTwice, x4),
        (ViewAfterBn, x4),
        (InputIntoBn, x4),
        (InplaceAdd, x4),
        (DictInOut, lambda: {"a": x4(seed=1), "b": x4(seed=2)}),
    ],
    ids=["conv_bn_relu", "residual", "functional", "twice", "view", "input", "add_", "dict"],
)
def test_symbolic_walk_gives_the_same_answers(make, inputs):
    model = make()
    runtime = trace(model, inputs()).graph
    walked = trace(model)
    symbolic = walked.graph
    assert walked.output is None
    assert symbolic.method == "symbolic"
    assert shape(symbolic) == shape(runtime)
    assert len(shape(symbolic)) >= 1
    assert all(v.ndim is None for v in symbolic.values)


def test_symbolic_conv_bn_relu_in_detail():
    model = ConvBnRelu()
    graph = trace(model).graph
    assert [n.kind for n in graph.nodes] == ["conv", "batchnorm", "op"]
    conv, bn, relu = graph.nodes
    assert conv.name == "conv"  # the module's path on this walk
    assert conv.weight is model.conv.weight
    assert conv.bias is model.conv.bias
    assert conv.attrs["stride"] == (1, 1)
    assert conv.attrs["padding"] == (1, 1)
    assert conv.attrs["padding_mode"] == "zeros"
    assert conv.data.origin == "model input"
    assert bn.module is model.bn
    assert bn.data.producer is conv
    assert bn.data.consumers == [bn]
    assert relu.inputs == [bn.outputs[0]]
    assert relu.outputs[0].is_output
    assert graph.uses(model.conv.weight) == [conv]
    assert graph.bn_sites(model.bn) == [bn]


def test_symbolic_functional_conv_keeps_the_parameters():
    model = FunctionalConv()
    graph = trace(model).graph
    conv = only(graph.nodes, "conv")
    assert conv.weight is model.w
    assert conv.bias is model.b
    assert conv.attrs == {"stride": 2, "padding": 1, "dilation": 1, "groups": 1}
    assert graph.uses(model.w) == [conv]


def test_symbolic_walk_fails_on_data_dependent_control_flow():
    with pytest.raises(TraceError) as info:
        trace(Branch())
    assert "symbolic tracing failed" in str(info.value)
    assert "example_inputs" in str(info.value)
    assert info.value.__cause__ is not None


# --------------------------------------------------------------------------- unsupported


@pytest.mark.parametrize("inputs", [None, "x"], ids=["symbolic", "runtime"])
def test_torchscript_is_unsupported(inputs):
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        trace(scripted, None if inputs is None else x4())


def test_a_failing_forward_pass_is_a_trace_error_in_one_line():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            self.bn(x)
            raise RuntimeError("went\n   wrong")

    model = Boom()
    model.train()
    model.bn.eval()
    with pytest.raises(TraceError) as info:
        trace(model, x4())
    assert (
        str(info.value) == "the forward pass on the example inputs failed: RuntimeError: went wrong"
    )
    assert isinstance(info.value.__cause__, RuntimeError)
    assert model.training
    assert not model.bn.training
    assert len(model.bn._forward_hooks) == 0  # the walk's own hooks are gone
    assert len(model.bn._forward_pre_hooks) == 0


# ------------------------------------------------------------ hooks and an unchanged model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_user_hooks_do_not_fire_and_the_model_is_unchanged():
    model = Residual()
    model.train()  # BN in train mode: a forward pass outside eval would move its statistics
    model.conv.eval()  # mixed flags
    calls = []
    handles = [
        model.bn.register_forward_hook(lambda m, i, o: calls.append("bn")),
        model.bn.register_forward_pre_hook(lambda m, i: calls.append("bn pre")),
        model.register_forward_hook(lambda m, i, o: calls.append("root")),
        model.conv.register_forward_pre_hook(lambda m, i: calls.append("conv pre")),
        torch_module.register_module_forward_hook(lambda m, i, o: calls.append("global")),
    ]
    before = state(model)
    flags = [m.training for m in model.modules()]
    copied = copy.deepcopy(model)
    try:
        graph = trace(model, x4()).graph
        assert calls == []
        assert len(graph.bn_sites(model.bn)) == 1
        after = state(model)
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert after["bn.num_batches_tracked"].item() == 0
        assert [m.training for m in model.modules()] == flags
        assert set(vars(model)) == set(vars(copied))
        # the user's hooks are back, in place: the user's own pass fires each once
        with torch.no_grad():
            model(x4())
        # a global hook fires on every module called: the root, conv and bn
        assert sorted(calls) == sorted(["bn", "bn pre", "root", "conv pre"] + ["global"] * 3)
    finally:
        for h in handles:
            h.remove()


def test_symbolic_walk_leaves_the_model_unchanged():
    model = Residual()
    model.train()
    model.conv.eval()
    before = state(model)
    flags = [m.training for m in model.modules()]
    trace(model)
    after = state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [m.training for m in model.modules()] == flags


# ---------------------------------------------------- symbolic walk: once-suspected bugs


class TrainOnlyBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, x):
        y = self.conv(x)
        if not self.training:
            y = y * 2
        return self.bn(y)


def test_symbolic_walk_of_a_train_mode_model_follows_eval_branches():
    model = TrainOnlyBranch().train()
    runtime = only(trace(model, x4()).graph.nodes, "batchnorm")
    assert runtime.data.producer.name == "mul"  # eval: conv -> *2 -> bn
    symbolic = only(trace(model).graph.nodes, "batchnorm")
    assert symbolic.data.producer.kind == "op"  # not the conv: folding into it is wrong
    assert model.training  # and the flag is left as it was


def test_symbolic_walk_adds_no_attributes_to_the_model():
    class MakesAConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn()

        def forward(self, x):
            return self.bn(self.conv(x)) + torch.ones(1)

    model = MakesAConstant()
    before = (set(vars(model)), set(model.state_dict()), {n for n, _ in model.named_buffers()})
    names = {n for n in dir(model)}
    graph = trace(model).graph
    after = (set(vars(model)), set(model.state_dict()), {n for n, _ in model.named_buffers()})
    assert after == before
    assert {n for n in dir(model)} == names
    assert not any(n.startswith("_tensor_constant") for n in names)
    add = named(graph.nodes, "add")  # the constant is still resolved as the add's argument
    assert add.inputs == [only(graph.nodes, "batchnorm").outputs[0]]


def test_symbolic_walk_fires_no_user_hooks():
    model = nn.Sequential(nn.Sequential(*conv_bn()), nn.ReLU())
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append(type(o).__name__))
    graph = trace(model).graph
    assert calls == []  # fx ran it on a Proxy before; the runtime walk never runs it
    assert len(graph.bn_sites(model[0][1])) == 1
    assert len(model[0]._forward_hooks) == 1  # and it is back


def test_symbolic_walk_failure_adds_no_attributes_either():
    class ConstantThenBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(x) + torch.ones(1)
            return y if y.sum() > 0 else -y

    model = ConstantThenBranch()
    before = set(vars(model))
    with pytest.raises(TraceError):
        trace(model)
    assert set(vars(model)) == before


def test_symbolic_walk_sees_bn_statistics_read_outside_the_bn_call():
    class Stray(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn()

        def forward(self, x):
            return self.bn(self.conv(x)) - self.bn.running_mean.view(1, -1, 1, 1)

    model = Stray()
    uses = trace(model).graph.uses(model.bn.running_mean)
    assert [n.name for n in uses if n.kind != "batchnorm"] == ["view"]
    assert [n.kind for n in uses] == ["batchnorm", "op"]  # the BN call itself, then the view


def test_symbolic_walk_does_not_proxy_other_buffers_or_metadata_reads_of_statistics():
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn()
            self.register_buffer("flag", torch.tensor(1.0))

        def forward(self, x):
            y = self.bn(self.conv(x))
            if self.flag.item() > 0:  # a plain buffer still steers Python code symbolically
                y = y * 2
            return y.view(2, self.bn.running_mean.shape[0], -1)

    model = Reads()
    graph = trace(model).graph
    assert graph.uses(model.bn.running_mean) == graph.bn_sites(model.bn)
    assert not hasattr(model, "_tensor_constant0")


@pytest.mark.parametrize(
    "test",
    [
        lambda x: torch.equal(x, x.abs()),
        lambda x: torch.allclose(x, x.abs()),
        lambda x: torch.is_nonzero(x.sum()),
        lambda x: x.equal(x.abs()),
        lambda x: x.allclose(x.abs()),
        lambda x: x.sum().is_nonzero(),
        lambda x: x.any(),
        lambda x: 0.5 in x,
        lambda x: x.numpy().sum() > 0,
    ],
    ids=[
        "equal",
        "allclose",
        "is_nonzero",
        "m_equal",
        "m_allclose",
        "m_is_nonzero",
        "any",
        "in",
        "numpy",
    ],
)
def test_python_bools_from_tensor_values_are_decisions(test):
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn()

        def forward(self, x):
            y = self.conv(x)
            if test(x):
                y = y * 2
            return self.bn(y)

    graph = trace(Branches(), x4()).graph
    assert only(graph.nodes, "batchnorm").decisions == 1


def test_symbolic_walk_of_a_bn_called_with_input_keyword():
    model = KeywordCall()
    graph = trace(model).graph
    bn = only(graph.nodes, "batchnorm")
    assert bn.data is not None
    assert bn.data.producer is only(graph.nodes, "conv")


def test_symbolic_walk_does_not_count_metadata_reads_as_consumers():
    class ShapeRead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn()
            self.conv2 = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            z = self.bn(self.conv(x))
            return self.conv2(z) * z.shape[1]

    model = ShapeRead()
    runtime = only(trace(model, x4()).graph.nodes, "batchnorm")
    assert [c.kind for c in runtime.outputs[0].consumers] == ["conv"]
    symbolic = only(trace(model).graph.nodes, "batchnorm")
    assert [c.kind for c in symbolic.outputs[0].consumers] == ["conv"]


def test_value_dataclass_defaults():
    v = Value(0, None)
    assert (v.origin, v.consumers, v.is_output, v.ndim, v.decisions) == ("op", [], False, None, 0)
    n = Node(0, "op", "relu")
    assert (n.inputs, n.outputs, n.data, n.weight, n.bias, n.attrs, n.decisions) == (
        [],
        [],
        None,
        None,
        None,
        {},
        0,
    )
