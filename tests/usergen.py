"""Generated *user-style* models for the property tests: written the way people write their own
networks, not the way timm does.

``tests/archgen.py`` generates clean graphs; real user code has habits a surgery must survive:
``x.view(x.size(0), -1)`` right after a norm, keyword calls ``self.bn(input=x)``, ``F.conv2d``
and ``F.linear`` on a module's own parameters, Dropout, hooks registered in ``__init__`` (call
counters, and one that changes a module's output), dict and dataclass outputs, BN on ``(N, C)``,
``(N, C, L)`` and ``(N, C, 1, 1)``, a detection head that sees empty batches, branches taken
only for some inputs (by a flag, or by the input's values), a conv or a BN called twice,
residual adds (also in place), ``nn.Sequential`` blocks, Linear -> BatchNorm1d, and BNs that
only the layer after them could absorb (on the input, after a residual stack).

A model is described by a *recipe*: a dict of Python literals, so a checkpoint can name its
factory as ``tests.usergen:build(recipe={...})`` and be rebuilt without pickle. Every model is a
:class:`UserNet`, a plain ``nn.Module`` defined here (it pickles), with channels <= 8 and spatial
size <= 8 so that each example runs in milliseconds.

:func:`recipes` is the hypothesis strategy, :func:`build` the factory, :func:`inputs` a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from bnsurgery.testing import randomize_bn

ACTIVATIONS = ("relu", "torch.relu", "inplace", "module", "none")
FLATTENS = ("view", "reshape", "flatten", "torch.flatten")
MAX_CHANNELS = 8
NEVER = 1e9  # a detection threshold no sample reaches: the head sees (0, C, H, W)


# ------------------------------------------------------------------------- user idioms


def activate(x: torch.Tensor, how: str, module: nn.Module | None = None) -> torch.Tensor:
    """The activation as users spell it (``module`` is the ``nn.ReLU`` for ``"module"``)."""
    if how == "relu":
        return F.relu(x)
    if how == "torch.relu":
        return torch.relu(x)
    if how == "inplace":
        return F.relu(x, inplace=True)
    if how == "module":
        assert module is not None
        return module(x)
    return x


def flatten(x: torch.Tensor, how: str) -> torch.Tensor:
    """``(N, ...) -> (N, -1)`` the four ways user code writes it (``.view`` needs the default
    memory layout; the others do not)."""
    if how == "view":
        return x.view(x.size(0), -1)
    if how == "reshape":
        return x.reshape(x.size(0), -1)
    if how == "flatten":
        return x.flatten(1)
    return torch.flatten(x, 1)


def norm(bn: nn.Module, x: torch.Tensor, keyword: bool) -> torch.Tensor:
    """``bn(x)`` or ``bn(input=x)``, as ``nn.BatchNorm2d.forward(input)`` allows."""
    return bn(input=x) if keyword else bn(x)


@dataclass
class UserOutput:
    """A dataclass output, as user models return them (not registered with pytree)."""

    logits: torch.Tensor
    features: torch.Tensor | None = None
    detections: torch.Tensor | None = None


class CountCalls:
    """A hook that counts its calls in a dict the model holds (picklable: no closure)."""

    def __init__(self, counts: dict[str, int], key: str) -> None:
        self.counts = counts
        self.key = key

    def __call__(self, module: nn.Module, *args: Any) -> None:
        self.counts[self.key] = self.counts.get(self.key, 0) + 1


class ScaleOutput:
    """A forward hook that changes the module's output (``output * 0.5 + 0.25``)."""

    def __init__(self, counts: dict[str, int], key: str) -> None:
        self.count = CountCalls(counts, key)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        self.count(module)
        return output * 0.5 + 0.25


# ------------------------------------------------------------------------------ blocks


class ConvBNAct(nn.Module):
    """conv -> BN -> activation (-> Dropout2d), in one of three spellings: ``self.conv(x)``,
    ``F.conv2d`` on ``self.conv``'s parameters, or an ``nn.Sequential``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        conv = nn.Conv2d(
            spec["in"],
            spec["out"],
            spec["k"],
            stride=spec["stride"],
            padding=spec["k"] // 2,
            groups=spec["groups"],
            bias=spec["bias"],
        )
        bn = nn.BatchNorm2d(spec["out"], eps=spec["eps"], affine=spec["affine"])
        self.call, self.keyword, self.how = spec["call"], spec["keyword"], spec["act"]
        if self.call == "seq":
            layers = [conv, bn]
            if self.how != "none":
                layers.append(nn.ReLU(inplace=True))
            if spec["drop"]:
                layers.append(nn.Dropout2d(spec["drop"]))
            self.body = nn.Sequential(*layers)
            return
        self.conv, self.bn = conv, bn
        self.act = nn.ReLU() if self.how == "module" else None
        self.drop = nn.Dropout2d(spec["drop"]) if spec["drop"] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.call == "seq":
            return self.body(x)
        return self.features(x)[0]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and its conv's output (the pre-norm features, which a model may
        also return: the very tensor the BN reads)."""
        if self.call == "seq":
            pre = self.body[0](x)
            return self.body[1:](pre), pre
        if self.call == "functional":
            conv = self.conv
            pre = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, 1, conv.groups)
        else:
            pre = self.conv(x)
        y = activate(norm(self.bn, pre, self.keyword), self.how, self.act)
        return (self.drop(y) if self.drop is not None else y), pre


class Residual(nn.Module):
    """The basic residual block; ``share`` calls one conv (or one BN) at both places."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        c = spec["c"]
        self.share, self.keyword, self.inplace = spec["share"], spec["keyword"], spec["inplace"]
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        if self.share != "conv":
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        if self.share != "bn":
            self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(norm(self.bn1, self.conv1(x), self.keyword))
        conv2 = self.conv1 if self.share == "conv" else self.conv2
        bn2 = self.bn1 if self.share == "bn" else self.bn2
        out = norm(bn2, conv2(out), self.keyword)
        if self.inplace:
            out += x
            return out.relu_()
        return F.relu(out + x)


class Norm(nn.Module):
    """A BN (and activation) on features no conv just made: after a residual stack, as
    pre-activation ResNets end, so only the layer after it could absorb it."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(spec["c"])
        self.keyword, self.how = spec["keyword"], spec["act"]
        self.act = nn.ReLU() if self.how == "module" else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return activate(norm(self.bn, h, self.keyword), self.how, self.act)


class Branch(nn.Module):
    """Two alternatives; one runs, chosen by a flag set at construction or by the values of
    the model's input (``x.mean() > 0``), so the other's BN is not called on every input."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.by, self.flag = spec["by"], spec["flag"]
        self.a, self.b = make_stage(spec["a"]), make_stage(spec["b"])

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        take_a = self.flag if self.by == "flag" else bool(x.mean() > 0)
        return self.a(h) if take_a else self.b(h)


class Flat(nn.Module):
    """conv -> BN -> [activation] -> flatten: the flatten comes right after the norm or
    after its activation (``.view(x.size(0), -1)`` and friends)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.block = ConvBNAct(spec["cbr"])
        self.how = spec["how"]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return flatten(self.block(h), self.how)


class Pooled(nn.Module):
    """Global pooling, then BN on ``(N, C, 1, 1)``, then flatten: a BN that sees one value per
    channel per sample."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.pool, self.how, self.act = spec["pool"], spec["how"], spec["act"]
        self.keyword = spec["keyword"]
        self.bn = nn.BatchNorm2d(spec["c"])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(h, 1) if self.pool == "adaptive" else h.mean((2, 3), True)
        return flatten(activate(norm(self.bn, h, self.keyword), self.act), self.how)


class Sequence1d(nn.Module):
    """``(N, C, H, W) -> (N, C, L)``, then Conv1d -> BatchNorm1d on ``(N, C, L)``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.conv = nn.Conv1d(spec["in"], spec["out"], spec["k"], padding=spec["k"] // 2)
        self.bn = nn.BatchNorm1d(spec["out"])
        self.functional, self.keyword = spec["functional"], spec["keyword"]
        self.act, self.reduce = spec["act"], spec["reduce"]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.flatten(2)
        if self.functional:
            h = F.conv1d(h, self.conv.weight, self.conv.bias, padding=self.conv.padding)
        else:
            h = self.conv(h)
        h = activate(norm(self.bn, h, self.keyword), self.act)
        return h.mean(2) if self.reduce == "mean" else flatten(h, self.reduce)


class Dense(nn.Module):
    """[Dropout] -> Linear (or ``F.linear`` on its parameters) -> BatchNorm1d -> activation."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.drop = nn.Dropout(spec["drop"]) if spec["drop"] else None
        self.fc = nn.Linear(spec["in"], spec["out"])
        self.bn = nn.BatchNorm1d(spec["out"])
        self.functional, self.keyword, self.how = spec["functional"], spec["keyword"], spec["act"]
        self.act = nn.ReLU() if self.how == "module" else None

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.drop is not None:
            v = self.drop(v)
        v = F.linear(v, self.fc.weight, self.fc.bias) if self.functional else self.fc(v)
        return activate(norm(self.bn, v, self.keyword), self.how, self.act)


class Detector(nn.Module):
    """A head run only on the samples that qualify (``x.mean() > threshold`` per sample, on
    the model's input): with none, its conv and BN see a ``(0, C, H, W)`` batch."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.threshold = NEVER if spec["when"] == "never" else 0.0
        self.conv = nn.Conv2d(spec["in"], spec["out"], 3, padding=1)
        self.bn = nn.BatchNorm2d(spec["out"])
        self.fc = nn.Linear(spec["out"], spec["classes"])

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        keep = x.flatten(1).mean(1) > self.threshold
        rois = F.relu(self.bn(self.conv(h[keep])))
        return self.fc(rois.mean((2, 3)))


STAGES = {
    "cbr": ConvBNAct,
    "res": Residual,
    "norm": Norm,
    "branch": Branch,
    "flat": Flat,
    "gap": Pooled,
    "seq1d": Sequence1d,
    "dense": Dense,
}


def make_stage(spec: dict[str, Any]) -> nn.Module:
    """The block a stage spec describes (its ``kind`` names the class)."""
    return STAGES[spec["kind"]](spec)


class UserNet(nn.Module):
    """The model a recipe describes: stem, spatial blocks, a tail that makes vectors, dense
    layers, a classifier, and optionally a detection head and the stem's pre-norm features
    as further outputs. The hooks of the recipe are registered here, as user code does."""

    def __init__(self, recipe: dict[str, Any]) -> None:
        super().__init__()
        self.recipe = recipe
        self.input_bn = nn.BatchNorm2d(recipe["in"]) if recipe["input_bn"] else None
        self.stem = ConvBNAct(recipe["stem"])
        self.blocks = nn.ModuleList(make_stage(s) for s in recipe["blocks"])
        self.tail = make_stage(recipe["tail"])
        self.dense = nn.ModuleList(make_stage(s) for s in recipe["dense"])
        self.classifier = nn.Linear(recipe["vector"], recipe["classes"])
        self.detector = Detector(recipe["det"]) if recipe["det"] else None
        self.calls: dict[str, int] = {}
        names = hookable(self)
        for kind, index in recipe["hooks"]:
            name = names[index % len(names)]
            module, key = self.get_submodule(name), f"{kind}:{name}"
            if kind == "count":
                module.register_forward_hook(CountCalls(self.calls, key))
            elif kind == "pre":
                module.register_forward_pre_hook(CountCalls(self.calls, key))
            elif kind == "kwpre":
                module.register_forward_pre_hook(CountCalls(self.calls, key), with_kwargs=True)
            else:
                module.register_forward_hook(ScaleOutput(self.calls, key))

    def forward(self, x: torch.Tensor) -> Any:
        stem, pre = self.stem.features(self.input_bn(x) if self.input_bn is not None else x)
        h = stem
        for block in self.blocks:
            h = block(h, x) if isinstance(block, Branch) else block(h)
        v = self.tail(h, x) if isinstance(self.tail, Branch) else self.tail(h)
        for layer in self.dense:
            v = layer(v)
        logits = self.classifier(v)
        extras: dict[str, torch.Tensor] = {}
        if self.recipe["expose"]:
            extras["features"] = pre
        if self.detector is not None:
            extras["detections"] = self.detector(stem, x)
        kind = self.recipe["output"]
        if kind == "tensor":
            return logits
        if kind == "tuple":
            return (logits, *extras.values())
        if kind == "dict":
            return {"logits": logits, **extras}
        return UserOutput(logits, **extras)


def hookable(model: nn.Module) -> list[str]:
    """Names of the modules a recipe's hooks may go on: every BN, conv and linear."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear)
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]


def build(recipe: dict[str, Any]) -> UserNet:
    """The model ``recipe`` describes, with random BN statistics and affine values, in eval
    mode. Deterministic: the same recipe gives the same model in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = UserNet(recipe)
    return randomize_bn(model, recipe["seed"]).eval()


def inputs(
    recipe: dict[str, Any], batch: int = 2, seed: int = 0, offset: float = 0.0
) -> torch.Tensor:
    """A float32 input batch for ``recipe`` (``offset`` shifts its mean, which steers the
    branches that look at the input's values)."""
    g = torch.Generator().manual_seed(recipe["seed"] * 31 + seed)
    shape = (batch, recipe["in"], recipe["size"], recipe["size"])
    return torch.randn(shape, generator=g) + offset


def spec_of(recipe: dict[str, Any]) -> str:
    """The architecture spec a checkpoint of this model records."""
    return f"tests.usergen:build(recipe={recipe!r})"


# ---------------------------------------------------------------------------- strategy


@st.composite
def _cbr(
    draw: st.DrawFn, c_in: int, size: int, out: int | None = None, stride: int | None = None
) -> dict[str, Any]:
    """A conv -> BN -> activation spec (``out`` and ``stride`` fixed when given)."""
    out = out if out is not None else draw(st.integers(2, MAX_CHANNELS))
    if stride is None:
        stride = draw(st.sampled_from((1, 1, 2))) if size >= 4 else 1
    call = draw(st.sampled_from(("module", "module", "functional", "seq")))
    act = draw(st.sampled_from(ACTIVATIONS))
    if call == "seq" and act != "none":
        act = "module"  # nn.Sequential(conv, bn, nn.ReLU(inplace=True))
    return {
        "kind": "cbr",
        "in": c_in,
        "out": out,
        "k": draw(st.sampled_from((1, 3, 3))),
        "stride": stride,
        "groups": c_in if out == c_in and draw(st.booleans()) else 1,
        "bias": draw(st.booleans()),
        "call": call,
        "keyword": call != "seq" and draw(st.booleans()),
        "act": act,
        "eps": draw(st.sampled_from((1e-5, 1e-3))),
        "affine": draw(st.sampled_from((True, True, False))),
        "drop": draw(st.sampled_from((0.0, 0.0, 0.1))),
    }


def _shrunk(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


@st.composite
def _tail(draw: st.DrawFn, c: int, size: int, kind: str) -> tuple[dict[str, Any], int]:
    """A stage that turns ``(N, c, size, size)`` into vectors, and the vector length."""
    if kind == "flat":
        cbr = draw(_cbr(c, size, stride=1))
        spec = {"kind": "flat", "cbr": cbr, "how": draw(st.sampled_from(FLATTENS))}
        return spec, cbr["out"] * size * size
    if kind == "gap":
        spec = {
            "kind": "gap",
            "c": c,
            "pool": draw(st.sampled_from(("adaptive", "mean"))),
            "how": draw(st.sampled_from(FLATTENS)),
            "act": draw(st.sampled_from((*ACTIVATIONS[:3], "none"))),
            "keyword": draw(st.booleans()),
        }
        return spec, c
    out = draw(st.integers(2, MAX_CHANNELS))
    reduce = draw(st.sampled_from(("mean", *FLATTENS)))
    spec = {
        "kind": "seq1d",
        "in": c,
        "out": out,
        "k": draw(st.sampled_from((1, 3))),
        "functional": draw(st.booleans()),
        "keyword": draw(st.booleans()),
        "act": draw(st.sampled_from((*ACTIVATIONS[:3], "none"))),
        "reduce": reduce,
    }
    return spec, out if reduce == "mean" else out * size * size


@st.composite
def _branch(draw: st.DrawFn, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    by = draw(st.sampled_from(("value", "value", "flag")))
    flag = by == "flag" and draw(st.booleans())
    return {"kind": "branch", "by": by, "flag": flag, "a": a, "b": b}


@st.composite
def recipes(draw: st.DrawFn) -> dict[str, Any]:
    """A random user-style model (see the module docstring)."""
    c_in, input_size = draw(st.integers(1, 3)), draw(st.integers(4, 8))
    input_bn = draw(st.booleans())  # a BN on the model's input, as tabular models start
    size = input_size
    stem = draw(_cbr(c_in, size, stride=1))  # the detection head reads the stem at full size
    c = stem["out"]
    blocks = []
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(("cbr", "res", "branch", "norm")))
        if kind == "res":
            share = draw(st.sampled_from((None, None, "conv", "bn")))
            spec = {"kind": "res", "c": c, "share": share}
            spec.update(keyword=draw(st.booleans()), inplace=draw(st.booleans()))
        elif kind == "norm":
            act = draw(st.sampled_from(("none", *ACTIVATIONS)))
            spec = {"kind": "norm", "c": c, "act": act, "keyword": draw(st.booleans())}
        else:
            spec = draw(_cbr(c, size))
            if kind == "branch":
                other = draw(_cbr(c, size, out=spec["out"], stride=spec["stride"]))
                spec = draw(_branch(spec, other))
            first = spec if kind == "cbr" else spec["a"]
            c, size = first["out"], _shrunk(size, first["stride"])
        blocks.append(spec)
    kind = draw(st.sampled_from(("flat", "gap", "seq1d", "branch", "branch")))
    if kind == "branch":  # two flatten tails of one shape, spelt differently
        a, vector = draw(_tail(c, size, "flat"))
        b = dict(a, how=draw(st.sampled_from([h for h in FLATTENS if h != a["how"]])))
        b["cbr"] = draw(_cbr(c, size, out=a["cbr"]["out"], stride=1))
        tail = draw(_branch(a, b))
    else:
        tail, vector = draw(_tail(c, size, kind))
    dense = []
    for _ in range(draw(st.integers(0, 2))):
        out = draw(st.integers(2, MAX_CHANNELS))
        dense.append(
            {
                "kind": "dense",
                "in": vector,
                "out": out,
                "functional": draw(st.booleans()),
                "keyword": draw(st.booleans()),
                "act": draw(st.sampled_from(ACTIVATIONS)),
                "drop": draw(st.sampled_from((0.0, 0.1, 0.5))),
            }
        )
        vector = out
    classes = draw(st.integers(2, 5))
    det = None
    if draw(st.booleans()):
        det = {"in": stem["out"], "out": draw(st.integers(2, MAX_CHANNELS)), "classes": classes}
        det["when"] = draw(st.sampled_from(("never", "some")))
    expose = draw(st.booleans())
    outputs = ("tuple", "dict", "dataclass") if det or expose else ("tensor", "dict", "dataclass")
    hook_kinds = st.sampled_from(("count", "pre", "kwpre", "scale"))
    hooks = draw(st.lists(st.tuples(hook_kinds, st.integers(0, 30)), max_size=3))
    return {
        "in": c_in,
        "size": input_size,
        "input_bn": input_bn,
        "stem": stem,
        "blocks": blocks,
        "tail": tail,
        "vector": vector,
        "dense": dense,
        "classes": classes,
        "det": det,
        "expose": expose,
        "output": draw(st.sampled_from(outputs)),
        "hooks": [list(h) for h in hooks],
        "seed": draw(st.integers(0, 2**16)),
    }
