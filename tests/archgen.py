"""Generated architectures for the property tests: a plain-data description and its model.

An architecture is a dict of Python literals (so it fits in a spec string,
``tests.archgen:build(arch={...})``, and a checkpoint made from it rebuilds without pickle):

* ``dims``: 0 for ``(N, C)`` features only, else the spatial rank 1, 2 or 3 of ``(N, C, *S)``;
* ``channels``, ``size``: the input's channels and spatial size (features when ``dims == 0``);
* ``dtype``: ``float32``, ``float64`` or ``bfloat16``;
* ``seed``: weights, BN statistics and inputs are all drawn from it;
* ``nodes``: the graph in execution order. Value 0 is the input; node ``i`` makes value
  ``i + 1`` from earlier values (``src``, or ``a`` and ``b``);
* ``outputs`` and ``container``: which values the model returns, as a tensor, tuple or dict.

Node kinds: ``conv`` (Conv1d/2d/3d, or ``F.conv*`` on a parameter when ``functional``), ``convT``,
``linear``, ``bn`` (every BN flavour; ``stats`` says how its running statistics are drawn),
``call`` (a module of an earlier node called again: a reused conv, a shared BN), ``act``
(``inplace`` ones modify their input, which no later node then reads), ``add``, ``cat``,
``reshape`` (a round trip through another shape, or a channel shuffle), ``flatten`` (to
features, by pooling or flattening), ``pool``, ``scale`` and ``rep`` (a block summing a kxk
and a 1x1 conv with their BNs, an identity BN, a BN after average pooling, a layer scale:
RepVGG, MobileOne; at times after a block of its own and a ReLU, GhostNetV3); a ``mixed``
draw adds MixNet's block from the other kinds (a 1x1 and a 3x3 conv of one input, their
``cat`` and a BN), a ``heads`` draw EfficientFormerV2's (a BN, a global mean, at times a second
BN, two linear heads of it, their ``cat``).

:func:`architectures` is the hypothesis strategy; :func:`build` the model factory;
:func:`inputs` the example batch.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAX_SIZE = {0: 16, 1: 12, 2: 7, 3: 4}  # spatial size cap, keeps every model tiny


# ---------------------------------------------------------------------------------- shapes


def conv_out(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def convt_out(size: int, k: int, stride: int, pad: int, dil: int, outpad: int) -> int:
    return (size - 1) * stride - 2 * pad + dil * (k - 1) + outpad + 1


# ---------------------------------------------------------------------------------- strategy


@st.composite
def architectures(
    draw: st.DrawFn, max_nodes: int = 8, layer_bn_pairs: bool = False
) -> dict[str, Any]:
    """A random valid architecture (see the module docstring).

    ``layer_bn_pairs``: every conv, transposed conv and linear is followed by a BN that only it
    feeds, and BNs appear nowhere else: the graphs a fold should fold completely.
    """
    dims = draw(st.sampled_from((2, 1, 3, 0, 2)))  # the first is the one drawn most
    channels = draw(st.integers(1, 6))
    size = draw(st.integers(2, MAX_SIZE[dims])) if dims else draw(st.integers(1, 12))
    # value shapes: (channels, spatial size or None for features); live: readable by later nodes
    shapes: list[tuple[int, int | None]] = [(channels, size if dims else None)]
    readable = [True]
    # a value may be modified in place only by its first and only reader, and only when it is
    # not a view (autograd needs what other ops saved; a view would change its base too)
    inplace_ok = [False]  # never the caller's input
    readers = [0]
    nodes: list[dict[str, Any]] = []
    callable_nodes: list[int] = []  # nodes owning a module that "call" may reuse
    n_nodes = draw(st.integers(1, max_nodes))

    def pick(pred=lambda i: True) -> int | None:
        choices = [i for i, ok in enumerate(readable) if ok and pred(i)]
        if not choices:
            return None
        # most recent first (hypothesis draws the first ones most): deep graphs, not wide ones
        return draw(st.sampled_from(choices[::-1]))

    def spatial(i: int) -> bool:
        return shapes[i][1] is not None

    def bn_node(src: int) -> dict[str, Any]:
        flavours = ["bn", "bn", "sync"]
        if shapes[src][1] is not None and dims == 2:
            flavours += ["act", "act", "tvfrozen"]
        flavour = draw(st.sampled_from(flavours))
        node = {"op": "bn", "src": src, "kind": flavour, "in": shapes[src][0]}
        node["rank"] = dims if shapes[src][1] is not None else 0
        if flavour != "tvfrozen":
            node["affine"] = draw(st.sampled_from((True, False)))
            node["track"] = draw(st.sampled_from((True, True, True, False)))  # mostly with stats
            node["momentum"] = draw(st.sampled_from((0.1, 0.01, None)))
        node["eps"] = draw(st.sampled_from((1e-5, 1e-3, 0.1)))
        # running statistics: "data" = those of its input on a calibration batch, moved a
        # little; "wild" = variance 10**lv whatever the data (1e-8 to 1e4)
        node["stats"] = draw(st.sampled_from(("data", "data", "wild")))
        node["lv"] = draw(st.integers(-8, 4))
        if flavour == "act":
            node["act"] = draw(st.sampled_from(sorted(ACTIVATIONS)))
        return node

    def add(node: dict[str, Any], new_shape: tuple[int, int | None]) -> None:
        if node["op"] in ("conv", "convT", "linear", "bn"):
            callable_nodes.append(len(nodes))
        nodes.append(node)
        shapes.append(new_shape)
        readable.append(True)
        readers.append(0)
        inplace_ok.append(node["op"] not in ("reshape", "flatten"))
        for key in ("src", "a", "b"):
            if key in node:
                readers[node[key]] += 1
        if node.get("inplace"):  # the modified tensor is now the new value; nobody reads the old
            old = node["src"] if node["op"] == "act" else node["a"]
            readable[old] = False
            inplace_ok[-1] = inplace_ok[old]

    for _ in range(n_nodes):
        kinds = ["conv" if dims else "linear", "bn", "conv", "bn", "act", "add", "cat", "call"]
        kinds += ["scale", "bn", "linear"] + (["flatten"] if dims else ["linear"])
        if dims:
            kinds += ["convT", "reshape", "pool", "mixed", "rep", "heads"]
        if layer_bn_pairs:
            kinds = [k for k in kinds if k not in ("bn", "call")]
        kind = draw(st.sampled_from(kinds))
        node: dict[str, Any] | None = None
        new_shape: tuple[int, int | None] | None = None
        if kind in ("conv", "convT"):
            src = pick(spatial)
            if src is None:
                continue
            c_in, s = shapes[src]
            assert s is not None
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if c_in % g == 0]))
            out = groups * draw(st.integers(1, max(1, 6 // groups)))
            k = draw(st.integers(1, 3))
            stride = draw(st.integers(1, 2))
            dil = draw(st.integers(1, 2))
            pad = draw(st.integers(0, 1))
            if kind == "conv":
                mode = draw(st.sampled_from(PADDING_MODES)) if pad else "zeros"
                if mode == "reflect" and pad >= s:
                    mode = "zeros"
                new = conv_out(s, k, stride, pad, dil)
                node = {"op": "conv", "functional": draw(st.booleans()) and mode == "zeros"}
                node["mode"] = mode
            else:
                outpad = draw(st.integers(0, max(stride, dil) - 1))
                new = convt_out(s, k, stride, pad, dil, outpad)
                node = {"op": "convT", "outpad": outpad}
            if not 1 <= new <= MAX_SIZE[dims]:
                continue
            node.update(src=src, out=out, k=k, stride=stride, pad=pad, dil=dil, groups=groups)
            node["in"] = c_in
            node.update(bias=draw(st.booleans()), gain=draw(st.integers(-3, 1)))
            new_shape = (out, new)
        elif kind == "linear":
            src = pick(lambda i: not spatial(i))
            if src is None:
                continue
            out = draw(st.integers(1, 8))
            node = {"op": "linear", "src": src, "out": out, "bias": draw(st.booleans())}
            node["in"] = shapes[src][0]
            node["gain"] = draw(st.integers(-3, 1))
            new_shape = (out, None)
        elif kind == "bn":
            src = pick()
            if src is None:
                continue
            node = bn_node(src)
            new_shape = shapes[src]
        elif kind == "call":
            usable = []
            for j in callable_nodes:
                owner = nodes[j]
                srcs = [
                    i
                    for i, ok in enumerate(readable)
                    if ok and i != owner["src"] and _fits(owner, shapes[owner["src"]], shapes[i])
                ]
                if srcs:
                    usable.append((j, srcs))
            if not usable:
                continue
            j, srcs = draw(st.sampled_from(usable))
            src = draw(st.sampled_from(srcs))
            node = {"op": "call", "src": src, "of": j}
            new_shape = _called_shape(nodes[j], shapes[src], dims)
            if new_shape is None:
                continue
        elif kind == "act":
            src = pick()
            if src is None:
                continue
            inplace = inplace_ok[src] and readers[src] == 0 and draw(st.booleans())
            fn = "relu" if inplace else draw(st.sampled_from(sorted(ACTIVATIONS)))
            node = {"op": "act", "src": src, "fn": fn, "inplace": inplace}
            new_shape = shapes[src]
        elif kind in ("add", "cat"):
            a = pick()
            if a is None:
                continue
            if kind == "add":
                b = pick(lambda i, a=a: shapes[i] == shapes[a])
                new_shape = shapes[a]
            else:
                b = pick(lambda i, a=a: shapes[i][1] == shapes[a][1])
                if b is not None:
                    new_shape = (shapes[a][0] + shapes[b][0], shapes[a][1])
            if b is None:
                continue
            node = {"op": kind, "a": a, "b": b}
            if kind == "add":
                node["inplace"] = (
                    inplace_ok[a] and readers[a] == 0 and a != b and draw(st.booleans())
                )
        elif kind == "reshape":
            src = pick(spatial)
            if src is None:
                continue
            c, s = shapes[src]
            hows = ["roundtrip"] + (["shuffle"] if c % 2 == 0 and c > 2 else [])
            node = {"op": "reshape", "src": src, "how": draw(st.sampled_from(hows))}
            new_shape = shapes[src]
        elif kind == "flatten":
            src = pick(spatial)
            if src is None:
                continue
            c, s = shapes[src]
            assert s is not None
            how = draw(st.sampled_from(("pool", "flatten")))
            if how == "flatten" and c * s**dims > 64:
                how = "pool"
            node = {"op": "flatten", "src": src, "how": how}
            new_shape = (c if how == "pool" else c * s**dims, None)
        elif kind == "pool":
            src = pick(lambda i: spatial(i) and (shapes[i][1] or 0) >= 2)
            if src is None:
                continue
            node = {"op": "pool", "src": src, "how": draw(st.sampled_from(("avg", "max")))}
            new_shape = (shapes[src][0], shapes[src][1] // 2)  # type: ignore[operator]
        elif kind == "rep":  # RepVGG / MobileOne: branches of one input summed (a block)
            src = pick(spatial)
            if src is None:
                continue
            c_in, s = shapes[src]
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if c_in % g == 0]))
            out = groups * draw(st.integers(1, max(1, 6 // groups)))
            stride, k = draw(st.integers(1, 2)), draw(st.sampled_from((1, 3)))
            # a kxk average of the input (PyTorch's CPU avg_pool3d has no half precision)
            pooled = k > 1 and dims < 3 and draw(st.booleans())
            out = c_in if pooled else out
            identity = stride == 1 and out == c_in and draw(st.booleans())
            node = {"op": "rep", "src": src, "in": c_in, "out": out, "k": k, "stride": stride}
            node.update(groups=groups, identity=identity, scale=draw(st.booleans()))
            node.update(bias=draw(st.booleans()), pooled=pooled)
            if draw(st.booleans()):  # GhostNetV3: a block of its own first (then a ReLU)
                inner = {"op": "rep", "in": c_in, "out": c_in, "k": k, "stride": 1}
                inner.update(groups=groups, identity=draw(st.booleans()), scale=False)
                node["inner"] = dict(inner, bias=draw(st.booleans()), pooled=False)
            new_shape = (out, conv_out(s, k, stride, k // 2, 1))
        elif kind == "heads":  # EfficientFormerV2: BN, global mean, a head and a second head
            src = pick(spatial)
            if src is None:
                continue
            c = shapes[src][0]  # (values are numbered from the input, 0: nodes from 1)
            add(bn_node(src), shapes[src])
            readable[len(nodes)] = False  # read by the pooling only
            add({"op": "flatten", "src": len(nodes), "how": "pool"}, (c, None))
            if draw(st.booleans()):  # a BN of the pooled features too: the first folds into it
                readable[len(nodes)] = False  # read by that BN only
                add(bn_node(len(nodes)), (c, None))
            readable[len(nodes)] = False  # read by the two heads only
            pooled, outs = len(nodes), []
            for _ in range(2):
                head = {"op": "linear", "src": pooled, "out": draw(st.integers(1, 4)), "in": c}
                head.update(bias=draw(st.booleans()), gain=draw(st.integers(-3, 1)))
                add(head, (head["out"], None))
                readable[len(nodes)] = False  # read by the cat only
                outs.append(head["out"])
            node = {"op": "cat", "a": len(nodes) - 1, "b": len(nodes)}
            new_shape = (sum(outs), None)
        elif kind == "mixed":  # MixNet: convs of different kernels on one input, cat, one BN
            src = pick(spatial)
            if src is None:
                continue
            c_in, s = shapes[src]
            stride = draw(st.integers(1, 2))
            outs = []
            for k in (1, 3):
                conv = {"op": "conv", "functional": False, "mode": "zeros", "src": src}
                conv.update(out=draw(st.integers(1, 4)), k=k, stride=stride, pad=k // 2, dil=1)
                conv.update(groups=1, bias=draw(st.booleans()), gain=draw(st.integers(-3, 1)))
                conv["in"] = c_in
                add(conv, (conv["out"], conv_out(s, k, stride, k // 2, 1)))
                readable[len(nodes)] = False  # read by the cat only
                outs.append(len(nodes))
            node = {"op": "cat", "a": outs[0], "b": outs[1]}
            add(node, (nodes[-1]["out"] + nodes[-2]["out"], shapes[-1][1]))
            node = bn_node(len(nodes))
            new_shape = shapes[-1]
            readable[len(nodes)] = False  # goes to the BN only
        elif kind == "scale":
            src = pick()
            if src is None:
                continue
            node = {"op": "scale", "src": src, "c": draw(st.sampled_from((-2.0, 0.5, 3.0)))}
            new_shape = shapes[src]
        assert node is not None and new_shape is not None
        add(node, new_shape)
        pair = layer_bn_pairs or draw(st.sampled_from((True, False)))
        if node["op"] in ("conv", "convT", "linear") and pair:
            add(bn_node(len(nodes)), new_shape)  # the usual conv -> BN pair: the conv output
            readable[len(nodes) - 1] = False  # goes to the BN only
    if not any(node["op"] == "bn" for node in nodes):  # every architecture has a BN
        src = max(i for i, ok in enumerate(readable) if ok)
        add(bn_node(src), shapes[src])
    last = len(nodes)
    outputs = [last]
    extra = [i for i in range(1, last) if readable[i]]
    if extra and draw(st.booleans()):
        outputs.append(draw(st.sampled_from(extra)))
    container = "tensor" if len(outputs) == 1 else draw(st.sampled_from(("tuple", "dict")))
    return {
        "dims": dims,
        "channels": channels,
        "size": size,
        "dtype": draw(st.sampled_from(("float32", "float32", "float64", "bfloat16"))),
        "seed": draw(st.integers(0, 2**16)),
        "nodes": nodes,
        "outputs": outputs,
        "container": container,
    }


def _fits(owner: dict[str, Any], owner_in: tuple, shape: tuple) -> bool:
    """Whether the module of ``owner`` accepts a value of ``shape``."""
    if owner["op"] == "linear":
        return shape[1] is None and shape[0] == owner_in[0]
    if owner["op"] in ("conv", "convT"):
        return shape[1] is not None and shape[0] == owner_in[0]
    if owner["op"] == "bn":  # same channels and the same rank
        return shape[0] == owner_in[0] and (shape[1] is None) == (owner_in[1] is None)
    return False


def _called_shape(owner: dict[str, Any], shape: tuple, dims: int) -> tuple | None:
    if owner["op"] == "linear":
        return (owner["out"], None)
    if owner["op"] == "bn":
        return shape
    s = shape[1]
    if owner["op"] == "conv":
        if owner["mode"] == "reflect" and owner["pad"] >= s:
            return None
        new = conv_out(s, owner["k"], owner["stride"], owner["pad"], owner["dil"])
    else:
        new = convt_out(s, owner["k"], owner["stride"], owner["pad"], owner["dil"], owner["outpad"])
    return (owner["out"], new) if 1 <= new <= MAX_SIZE[dims] else None


# ----------------------------------------------------------------------------------- model


class FunctionalConv(nn.Module):
    """Holds a conv's parameters and calls ``F.conv{1,2,3}d`` itself (not an ``nn.Conv``)."""

    def __init__(self, conv: nn.Module, dims: int) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return fn(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class RepBranches(nn.Module):
    """RepVGG's and MobileOne's block: a kxk and a 1x1 conv of one input, each with its BN, an
    identity BN where the shapes allow, a BN after a kxk average pooling (``pooled``: padded
    zeros counted, as a depthwise conv), summed; times a per-channel scale when ``scale``.
    With ``inner``, such a block of its own runs first, then a ReLU (GhostNetV3's nesting)."""

    def __init__(self, node: dict[str, Any], dims: int) -> None:
        super().__init__()
        c, out, k, stride, g = node["in"], node["out"], node["k"], node["stride"], node["groups"]
        conv = CONV[dims]
        self.kxk = nn.Sequential(
            conv(c, out, k, stride, k // 2, groups=g, bias=False), BN[dims](out)
        )
        self.one = nn.Sequential(
            conv(c, out, 1, stride, groups=g, bias=node["bias"]), BN[dims](out)
        )
        self.identity = BN[dims](c) if node["identity"] else None
        self.pooled = None
        if node.get("pooled"):
            pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](k, stride, k // 2)
            self.pooled = nn.Sequential(pool, BN[dims](c))
        self.gamma = nn.Parameter(torch.rand(out) + 0.5) if node["scale"] else None
        self.inner = RepBranches(node["inner"], dims) if node.get("inner") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            x = self.inner(x).relu()
        y = self.kxk(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        if self.pooled is not None:
            y = y + self.pooled(x)
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, *[1] * (x.dim() - 2))
        return y


def _make(node: dict[str, Any], dims: int) -> nn.Module | None:
    op = node["op"]
    c_in = node.get("in", 0)
    if op == "rep":
        return RepBranches(node, dims)
    if op == "conv":
        conv = CONV[dims](
            c_in,
            node["out"],
            node["k"],
            stride=node["stride"],
            padding=node["pad"],
            dilation=node["dil"],
            groups=node["groups"],
            bias=node["bias"],
            padding_mode=node["mode"],
        )
        _gain(conv, node["gain"])
        return FunctionalConv(conv, dims) if node["functional"] else conv
    if op == "convT":
        conv = CONV_T[dims](
            c_in,
            node["out"],
            node["k"],
            stride=node["stride"],
            padding=node["pad"],
            output_padding=node["outpad"],
            dilation=node["dil"],
            groups=node["groups"],
            bias=node["bias"],
        )
        _gain(conv, node["gain"])
        return conv
    if op == "linear":
        linear = nn.Linear(c_in, node["out"], bias=node["bias"])
        _gain(linear, node["gain"])
        return linear
    if op == "bn":
        return _make_bn(node, c_in)
    if op == "act" and not node["inplace"]:
        return ACTIVATIONS[node["fn"]]()
    return None


def _gain(module: nn.Module, exponent: int) -> None:
    with torch.no_grad():
        module.weight.mul_(10.0**exponent)


def _make_bn(node: dict[str, Any], c: int) -> nn.Module:
    kind, eps = node["kind"], node["eps"]
    if kind == "tvfrozen":
        from torchvision.ops.misc import FrozenBatchNorm2d

        return FrozenBatchNorm2d(c, eps=eps)
    kwargs = {
        "eps": eps,
        "momentum": node["momentum"],
        "affine": node["affine"],
        "track_running_stats": node["track"],
    }
    if kind == "act":
        from timm.layers import BatchNormAct2d

        return BatchNormAct2d(c, act_layer=ACTIVATIONS[node["act"]], **kwargs)
    if kind == "sync":
        return nn.SyncBatchNorm(c, **kwargs)
    return BN[max(node["rank"], 1)](c, **kwargs)


class GeneratedNet(nn.Module):
    """The model an architecture describes. Modules live in ``layers`` under ``n<node>``."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = arch
        self.layers = nn.ModuleDict()
        for i, node in enumerate(arch["nodes"]):
            module = _make(node, arch["dims"])
            if module is not None:
                self.layers[f"n{i}"] = module

    def forward(self, x: torch.Tensor) -> Any:
        values = [x]
        for i, node in enumerate(self.arch["nodes"]):
            values.append(self._node(i, node, values))
        outs = [values[i] for i in self.arch["outputs"]]
        if self.arch["container"] == "tuple":
            return tuple(outs)
        if self.arch["container"] == "dict":
            return {f"out{k}": v for k, v in enumerate(outs)}
        return outs[0]

    def _node(self, i: int, node: dict[str, Any], values: list[torch.Tensor]) -> torch.Tensor:
        op = node["op"]
        if op in ("conv", "convT", "linear", "bn", "rep"):
            return self.layers[f"n{i}"](values[node["src"]])
        if op == "call":
            return self.layers[f"n{node['of']}"](values[node["src"]])
        if op == "act":
            if node["inplace"]:
                return values[node["src"]].relu_()
            return self.layers[f"n{i}"](values[node["src"]])
        if op == "add":
            a, b = values[node["a"]], values[node["b"]]
            return a.add_(b) if node["inplace"] else a + b
        if op == "cat":
            return torch.cat([values[node["a"]], values[node["b"]]], dim=1)
        x = values[node["src"]]
        if op == "reshape":
            n, c = x.shape[:2]
            if node["how"] == "shuffle":
                return x.reshape(n, 2, c // 2, *x.shape[2:]).transpose(1, 2).reshape(x.shape)
            return x.reshape(n, -1).reshape(x.shape)
        if op == "flatten":
            if node["how"] == "pool":
                return x.mean(dim=tuple(range(2, x.dim())))
            return x.flatten(1)
        if op == "pool":
            dims = x.dim() - 2
            fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d) if node["how"] == "avg" else None
            fn = fn or (F.max_pool1d, F.max_pool2d, F.max_pool3d)
            if dims == 3 and x.dtype == torch.bfloat16 and node["how"] == "avg":
                return fn[2](x.float(), 2).to(x.dtype)  # no bfloat16 avg_pool3d on the CPU
            return fn[dims - 1](x, 2)
        if op == "scale":
            return x * node["c"]
        raise ValueError(f"unknown op {op!r}")


# ------------------------------------------------------------------------------ statistics


def inputs(arch: dict[str, Any], batch: int = 2, seed: int | None = None) -> torch.Tensor:
    """An input batch for ``arch`` in its dtype."""
    g = torch.Generator().manual_seed(arch["seed"] if seed is None else seed)
    shape = (batch, arch["channels"]) + (arch["size"],) * arch["dims"]
    return torch.randn(shape, generator=g).to(DTYPES[arch["dtype"]])


@torch.no_grad()
def _set_statistics(model: GeneratedNet, arch: dict[str, Any]) -> None:
    """Give every BN affine values and running statistics (see ``stats`` in the docstring).

    "data" statistics are measured on a calibration batch in one eval pass: a pre-hook sets
    each BN's statistics from the input it is about to normalise (so every BN downstream sees
    calibrated inputs), then moves them a little, as training would leave them.
    """
    g = torch.Generator().manual_seed(arch["seed"] + 1)
    done: set[int] = set()
    handles = []

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    def hook(module: nn.Module, args: tuple, node: dict[str, Any]) -> None:
        if id(module) in done:
            return
        done.add(id(module))
        x = args[0].double()
        c = x.shape[1]
        if node["stats"] == "data":
            flat = x.transpose(0, 1).reshape(c, -1)
            var = flat.var(1, unbiased=flat.shape[1] > 1) * 10 ** (rand(c) - 0.5)
            mean = flat.mean(1) + randn(c) * var.sqrt() * 0.5
        else:
            var = 10.0 ** (node["lv"] + rand(c) - 0.5)
            mean = randn(c) * 10.0 ** (node["lv"] / 2)
        if getattr(module, "running_var", None) is not None:
            module.running_var.copy_(var.clamp_min(1e-12))
            module.running_mean.copy_(mean)
            if getattr(module, "num_batches_tracked", None) is not None:
                module.num_batches_tracked.fill_(7)
        weight = getattr(module, "weight", None)
        if weight is not None:
            sign = torch.where(rand(c) < 0.2, -1.0, 1.0)
            weight.copy_(sign * (rand(c) + 0.5))
            module.bias.copy_(randn(c) * 0.5)

    for i, node in enumerate(arch["nodes"]):
        if node["op"] == "bn":
            module = model.layers[f"n{i}"]
            handles.append(
                module.register_forward_pre_hook(lambda m, a, node=node: hook(m, a, node))
            )
        elif node["op"] == "rep":  # its BNs: statistics of the data they see
            for module in model.layers[f"n{i}"].modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    handles.append(
                        module.register_forward_pre_hook(lambda m, a: hook(m, a, {"stats": "data"}))
                    )
    try:
        model.eval()(inputs(dict(arch, dtype="float32"), batch=4, seed=arch["seed"] + 2))
    finally:
        for h in handles:
            h.remove()


def build(arch: dict[str, Any]) -> GeneratedNet:
    """The model ``arch`` describes, with its weights and BN statistics, in its dtype, eval mode.

    Deterministic: the same ``arch`` gives the same model in every process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(arch["seed"])
        model = GeneratedNet(arch)
        _set_statistics(model, arch)
    return model.to(DTYPES[arch["dtype"]]).eval()


def extras(arch: dict[str, Any]) -> random.Random:
    """A random source for a test's other choices (batch sizes, options), seeded by the
    architecture, so one architecture is one example whatever the test draws besides."""
    return random.Random(arch["seed"] * 7919 + len(arch["nodes"]))


def describe(arch: dict[str, Any]) -> str:
    """One line per node, for failure messages."""
    lines = [f"dims={arch['dims']} in={arch['channels']}x{arch['size']} {arch['dtype']}"]
    for i, node in enumerate(arch["nodes"]):
        fields = ", ".join(f"{k}={v}" for k, v in node.items() if k != "op")
        lines.append(f"  v{i + 1} = {node['op']}({fields})")
    lines.append(f"  return {arch['container']} of {arch['outputs']}")
    return "\n".join(lines)


def bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    from bnsurgery.norms import is_batchnorm

    return {name: m for name, m in model.named_modules() if is_batchnorm(m)}


def finite(value: float) -> bool:
    return math.isfinite(value)
