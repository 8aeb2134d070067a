"""Linear regions: branches of a block that add up to one conv (RepVGG, MobileOne, FastViT).

A BN that neither the layer before it nor the layer after it can absorb may still sit in a
region of its block that is linear from one input tensor to one output tensor: convs, BN,
identity branches, per-channel scales (layer scale), sums and differences of branches, every
intermediate tensor used only inside the region. Such a region is one conv. This module finds
them on the block's own ``torch.fx`` graph (traced in eval mode, as the fold's symbolic walk),
works out the conv in float64 (kernels aligned by zero-padding the smaller ones, an identity
branch as a centred identity kernel, groups and strides checked) and rewrites the block: the
block becomes a :class:`torch.fx.GraphModule` that calls the one conv where the region was,
and keeps everything else its ``forward`` did (activations, attention, other branches).

No per-architecture code and no call of a model's own ``reparameterize()``: the graph says
what is linear. The rewritten block runs the code fx traced in eval mode, in train mode too.

:func:`find_collapses` plans; :class:`Collapse` applies (inside a fold's transaction) and
:func:`rebuild` replays a recorded collapse on a freshly built architecture.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from .errors import BnSurgeryError
from .graph import AVG_POOL_ARGS, fx_trace
from .hooks import user_hooks
from .layers import FoldedBatchNorm
from .norms import bn_stats, has_activation, is_batchnorm

__all__ = ["COLLAPSED", "Collapse", "ConvSpec", "Sum", "find_collapses", "rebuild"]

#: set on a block whose regions a fold collapsed (it is not collapsed twice)
COLLAPSED = "_bnsurgery_collapsed"

_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUBS = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MULS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
#: ops that write their first operand: it must be a tensor only the region sees
_IN_PLACE = {operator.iadd, operator.isub, operator.imul, "add_", "sub_", "mul_"}
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AVG_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
#: how far up from a BN to look for the block that sums its branches
_LEVELS = 3


class _NotLinear(Exception):
    """A node is not a linear function of one input; the message says why."""


@dataclass(frozen=True)
class ConvSpec:
    """The one conv a region becomes."""

    dims: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def build(self, like: torch.Tensor) -> nn.Module:
        conv = _CONVS[self.dims](
            self.in_channels, self.out_channels, self.kernel, self.stride, self.padding,
            self.dilation, self.groups, bias=True,
        )  # fmt: skip
        return conv.to(dtype=like.dtype, device=like.device)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvSpec:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class Sum:
    """One region of a block: the fx nodes ``source`` (its input) and ``output``, the new conv
    (``name`` in the rewritten block) and what it absorbs (paths inside the block)."""

    source: str
    output: str
    name: str
    conv: ConvSpec
    bns: tuple[str, ...]
    layers: tuple[str, ...]
    branches: int
    pools: int = 0  # average poolings of the input among the branches

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "name": self.name,
            "conv": self.conv.to_dict(),
        }


@dataclass(frozen=True)
class Collapse:
    """Every region of one block, applied together: the block is rewritten once."""

    block: str
    sums: tuple[Sum, ...]

    def record(self) -> dict[str, Any]:
        """The structural edit a checkpoint replays (:func:`rebuild`)."""
        return {"collapse": self.block, "regions": [s.to_dict() for s in self.sums]}

    def rewritten(self, block: nn.Module) -> nn.Module:
        """The block with each region replaced by its conv, weights worked out from the
        block's current ones (float64, cast back)."""
        graph, constants = fx_trace(block)
        gm = _graph_module(block, graph, constants)
        for s in self.sums:
            node = _node(gm.graph, s.output)
            affine = _Expressor(gm).express_region(node)
            if affine.spec(gm) != s.conv:
                raise BnSurgeryError(f"the block changed since its region {s.output} was planned")
            weight, bias = affine.conv_weights(s.conv, gm)
            conv = s.conv.build(_first_weight(gm, affine))
            with torch.no_grad():
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)
                conv.requires_grad_(_first_weight(gm, affine).requires_grad)
            _rewire(gm, affine, s.name, conv)
        _finish(gm)
        setattr(gm, COLLAPSED, True)
        return gm.train(block.training)


# ------------------------------------------------------------------------- the linear maps


@dataclass(frozen=True)
class _Pool:
    """An average pooling on the region's input that is a depthwise conv: every window's
    values over one divisor, padded zeros counted (or no padding)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]


@dataclass
class _Term:
    conv: str | None  # a conv module's path in the block; None: the identity (or ``pool``)
    scale: torch.Tensor | float = 1.0  # per output channel (float64), or a number
    pool: _Pool | None = None  # an average pooling of the input, as a depthwise conv


@dataclass
class _Affine:
    """A value as ``sum(term.scale * term(source)) + bias``, and the nodes that made it."""

    source: fx.Node | None
    terms: list[_Term]
    bias: torch.Tensor | float = 0.0
    nodes: list[fx.Node] = field(default_factory=list)
    consts: list[fx.Node] = field(default_factory=list)
    bns: list[str] = field(default_factory=list)
    channels: int | None = None
    rank: int | None = None

    def scaled(self, scale: torch.Tensor | float, shift: torch.Tensor | float = 0.0) -> _Affine:
        for t in self.terms:
            t.scale = t.scale * scale
        self.bias = self.bias * scale + shift
        return self

    def plus(self, other: _Affine, sign: float = 1.0) -> _Affine:
        if other.source is not None and self.source is not None and other.source is not self.source:
            raise _NotLinear("its branches start from different tensors")
        self.source = self.source if self.source is not None else other.source
        self.terms += [_Term(t.conv, t.scale * sign, t.pool) for t in other.terms]
        self.bias = self.bias + other.bias * sign
        for key in ("nodes", "consts", "bns"):
            getattr(self, key).extend(getattr(other, key))
        for key in ("channels", "rank"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine is not None and theirs is not None and mine != theirs:
                raise _NotLinear(f"its branches differ in {key}")
            setattr(self, key, mine if mine is not None else theirs)
        return self

    def convs(self) -> list[str]:
        return list(dict.fromkeys(t.conv for t in self.terms if t.conv is not None))

    def pools(self) -> list[_Pool]:
        return list(dict.fromkeys(t.pool for t in self.terms if t.pool is not None))

    def spec(self, gm: nn.Module) -> ConvSpec:
        """The one conv this map is, or :class:`_NotLinear` when none is exact."""
        convs = [gm.get_submodule(c) for c in self.convs()]
        pools = self.pools()
        if not convs and not pools:
            raise _NotLinear("no conv in the region")
        dims = convs[0].weight.dim() - 2 if convs else len(pools[0].kernel)
        if any(c.weight.dim() - 2 != dims for c in convs) or any(
            len(p.kernel) != dims for p in pools
        ):
            raise _NotLinear("its convs differ in spatial rank")
        c_in = {int(c.in_channels) for c in convs}
        c_out = {int(c.out_channels) for c in convs}
        if not convs:  # pooled and identity branches only: a depthwise conv
            if self.channels is None:
                raise _NotLinear("its channel count is unknown")
            c_in = c_out = {self.channels}
        if len(c_in) != 1 or len(c_out) != 1:
            raise _NotLinear("its convs differ in channels")
        (c_in_n,), (c_out_n,) = c_in, c_out
        identity = any(t.conv is None and t.pool is None for t in self.terms)
        strides = {tuple(c.stride) for c in convs} | ({(1,) * dims} if identity else set())
        strides |= {p.stride for p in pools}
        if len(strides) != 1:
            raise _NotLinear("its branches differ in stride")
        if (identity or pools) and c_in_n != c_out_n:
            raise _NotLinear(
                "an identity or pooled branch beside a conv that changes the channel count"
            )
        paddings = [_padding(c) for c in convs]
        if any(p is None for p in paddings):
            raise _NotLinear("a conv pads with other than zeros, or asymmetrically")
        kernels = [tuple(c.kernel_size) for c in convs]
        dilation = []
        for axis in range(dims):
            wide = {c.dilation[axis] for c, k in zip(convs, kernels, strict=True) if k[axis] > 1}
            wide |= {1 for p in pools if p.kernel[axis] > 1}
            if len(wide) > 1:
                raise _NotLinear("its convs differ in dilation")
            dilation.append(next(iter(wide), 1))
        # (kernel, padding) of every branch, the identity as a 1-wide kernel without padding
        shapes = [(k, p) for k, p in zip(kernels, paddings, strict=True)]
        shapes += [(p.kernel, p.padding) for p in pools]
        if identity:
            shapes.append(((1,) * dims, (0,) * dims))
        kernel, padding = [], []
        for axis in range(dims):
            d = dilation[axis]
            reach = {2 * p[axis] - d * (k[axis] - 1) for k, p in shapes}  # output size offset
            if len(reach) != 1:
                raise _NotLinear("its branches' kernels and paddings do not align on one centre")
            pad = max(p[axis] for _, p in shapes)
            if any((pad - p[axis]) % d for _, p in shapes):
                raise _NotLinear("its branches' kernels do not align under the dilation")
            kernel.append(max((pad - p[axis]) // d + k[axis] for k, p in shapes))
            padding.append(pad)
        groups = {int(c.groups) for c in convs} or {c_out_n}
        if len(groups) != 1:  # a dense conv from a depthwise one would be exact, and slow
            raise _NotLinear("its convs differ in groups")
        return ConvSpec(
            dims, c_in_n, c_out_n, tuple(kernel), next(iter(strides)), tuple(padding),
            tuple(dilation), groups.pop(),
        )  # fmt: skip

    def conv_weights(self, spec: ConvSpec, gm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The region's conv weight and bias in float64, for ``spec``."""
        c_out, c_in, g = spec.out_channels, spec.in_channels, spec.groups
        per_out, per_in = c_out // g, c_in // g
        weight = torch.zeros(c_out, per_in, *spec.kernel, dtype=torch.float64)
        bias = torch.zeros(c_out, dtype=torch.float64)
        bias += _vector(self.bias, c_out)
        group_of = torch.arange(c_out) // per_out
        for term in self.terms:
            scale = _vector(term.scale, c_out)
            if term.pool is not None:  # each channel's own input, 1 / window over its window
                window = _window(spec, term.pool.padding, term.pool.kernel)
                rows = torch.arange(c_out)
                values = (scale / math.prod(term.pool.kernel)).view(-1, *[1] * spec.dims)
                weight[(rows, rows - group_of * per_in, *window)] += values
                continue
            if term.conv is None:  # a centred identity kernel, on each channel's own input
                at = tuple(p // d for p, d in zip(spec.padding, spec.dilation, strict=True))
                rows = torch.arange(c_out)
                weight[(rows, rows - group_of * per_in, *at)] += scale
                continue
            conv = gm.get_submodule(term.conv)
            w = conv.weight.detach().double().cpu()
            if conv.bias is not None:
                bias += scale * conv.bias.detach().double().cpu()
            gc = int(conv.groups)
            out_c, in_c = c_out // gc, c_in // gc
            pad = _padding(conv)
            assert pad is not None
            window = _window(spec, pad, conv.kernel_size)
            for j in range(gc):  # conv group j inside target group j * g // gc
                rows = slice(j * out_c, (j + 1) * out_c)
                start = j * in_c - (j * out_c // per_out) * per_in
                cols = slice(start, start + in_c)
                weight[(rows, cols, *window)] += w[rows] * scale[rows].view(
                    -1, *[1] * (w.dim() - 1)
                )
        return weight, bias


def _window(spec: ConvSpec, padding: tuple[int, ...], kernel: tuple[int, ...]) -> tuple:
    """Where a branch's kernel (with its own ``padding``) sits in the region's conv kernel."""
    return tuple(
        slice((p0 - p) // d, (p0 - p) // d + k)
        for p0, p, d, k in zip(spec.padding, padding, spec.dilation, kernel, strict=True)
    )


def _is_zero(value: torch.Tensor | float) -> bool:
    return bool((torch.as_tensor(value) == 0).all())


def _vector(value: torch.Tensor | float, n: int) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.double().reshape(-1).expand(n) if value.numel() == 1 else value.double()
    return torch.full((n,), float(value), dtype=torch.float64)


def _padding(conv: nn.Module) -> tuple[int, ...] | None:
    """A conv's symmetric zero padding per axis, or ``None``."""
    dims = conv.weight.dim() - 2
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * dims
        reach = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        if any(r % 2 for r in reach):
            return None  # "same" with an even reach pads one side more
        padding = tuple(r // 2 for r in reach)
    padding = tuple(int(p) for p in padding)
    if any(padding) and conv.padding_mode != "zeros":
        return None
    return padding


class _Expressor:
    """Works out nodes of a block's fx graph as :class:`_Affine` maps of one source."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.constants: dict[fx.Node, tuple[torch.Tensor, list[fx.Node]] | None] = {}
        self.refused: list[str] = []  # why values were taken as inputs rather than worked out

    def express_region(self, node: fx.Node) -> _Affine:
        affine = self.express(node)
        if affine.source is None:
            raise _NotLinear("the region reads no tensor")
        return affine

    def operand(self, value: Any) -> _Affine:
        """A value used by a linear op: worked out further when only that op uses it,
        else the region's input (the identity of it)."""
        if isinstance(value, fx.Node):
            const = self.constant(value)
            if const is not None:
                return _Affine(None, [], const[0], consts=list(const[1]))
            if (
                value.op in ("call_module", "call_function", "call_method")
                and len(value.users) == 1
            ):
                try:
                    return self.express(value)
                except _NotLinear as why:
                    self.refused.append(f"{value.name}: {why}")
            return _Affine(value, [_Term(None)])
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _Affine(None, [], float(value))
        raise _NotLinear(f"an operand is a {type(value).__name__}")

    def express(self, node: fx.Node) -> _Affine:
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            if len(node.args) != 1 or node.kwargs:
                raise _NotLinear(f"`{node.target}` takes more than one input")
            if isinstance(module, _ConvNd) and not isinstance(
                module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d
            ):
                return self._conv(node, module)
            dims = next((d for d, t in _AVG_POOLS.items() if isinstance(module, t)), 0)
            if dims:
                options = {k: getattr(module, k, None) for k in AVG_POOL_ARGS}
                return self._pooled(node, node.args[0], dims, options)
            inner = self.operand(node.args[0])
            if isinstance(module, (*_IDENTITIES, FoldedBatchNorm)):
                inner.nodes.append(node)
                return inner
            if is_batchnorm(module) and not has_activation(module):
                stats = bn_stats(module)
                if stats is None:
                    raise _NotLinear(f"`{node.target}` has no running statistics")
                scale, shift = stats.scale_shift()
                inner.channels = inner.channels or int(scale.numel())
                inner.nodes.append(node)
                inner.bns.append(str(node.target))
                return inner.scaled(scale, shift)
            raise _NotLinear(f"`{node.target}` ({type(module).__name__}) is not linear")
        if node.op not in ("call_function", "call_method"):
            raise _NotLinear(f"{node.op} {node.name}")
        fn = node.target
        pool = re.fullmatch(r"avg_pool([123])d", getattr(fn, "__name__", ""))
        if pool and node.op == "call_function" and node.args:
            options = dict(zip(AVG_POOL_ARGS, node.args[1:], strict=False))
            options.update({k: v for k, v in node.kwargs.items() if k in AVG_POOL_ARGS})
            if set(node.kwargs) - set(AVG_POOL_ARGS):
                raise _NotLinear(f"{node.name}: unknown pooling arguments")
            return self._pooled(node, node.args[0], int(pool[1]), options)
        first_arg = node.args[0] if node.args else None
        if fn in _IN_PLACE and (not isinstance(first_arg, fx.Node) or len(first_arg.users) != 1):
            raise _NotLinear(f"{node.name} writes in place into a tensor used elsewhere")
        if fn in _ADDS | _SUBS:
            if len(node.args) != 2 or node.kwargs:
                raise _NotLinear(f"{node.name} has more than two operands")
            first, second = (self.operand(a) for a in node.args)
            if first.source is None and not first.terms:  # a constant plus a branch
                first, second, sign = second, first, (1.0 if fn in _ADDS else -1.0)
                if sign < 0:
                    first.scaled(-1.0)
                    sign = 1.0
            else:
                sign = 1.0 if fn in _ADDS else -1.0
            try:
                result = first.plus(second, sign)
            except _NotLinear as why:  # say what stopped a branch short of the common input
                hint = f" ({self.refused[-1]})" if self.refused else ""
                raise _NotLinear(f"{why}{hint}") from None
        elif fn in _MULS:
            if len(node.args) != 2 or node.kwargs:
                raise _NotLinear(f"{node.name} has more than two operands")
            first, second = (self.operand(a) for a in node.args)
            if first.terms and second.terms:
                raise _NotLinear(f"{node.name} multiplies two tensors that depend on the input")
            branch, factor = (first, second) if first.terms else (second, first)
            scale = self._per_channel(factor.bias, branch)
            branch.consts.extend(factor.consts)
            result = branch.scaled(scale)
        else:
            raise _NotLinear(f"{getattr(fn, '__name__', fn)}() is not linear")
        result.nodes.append(node)
        return result

    def _pooled(self, node: fx.Node, arg: Any, dims: int, options: dict[str, Any]) -> _Affine:
        """An average pooling that is a depthwise conv (no ceil mode, no divisor override,
        padded zeros counted in the average or no padding), of the region's input itself or
        of a per-channel scaling of it (a BN: only unpadded, as its shift is not zero on the
        padding)."""

        def per_axis(value: Any) -> tuple[int, ...]:
            value = tuple(value) if isinstance(value, tuple | list) else (value,) * dims
            if len(value) != dims or not all(isinstance(v, int) for v in value):
                raise _NotLinear(f"{node.name}: pooling sizes that are not ints")
            return tuple(int(v) for v in value)

        kernel = per_axis(options.get("kernel_size"))
        stride = per_axis(options.get("stride") or kernel)
        padding = per_axis(options.get("padding", 0))
        if options.get("ceil_mode") or options.get("divisor_override") is not None:
            raise _NotLinear(f"{node.name}: ceil mode or a divisor override")
        if any(padding) and not options.get("count_include_pad", True):
            raise _NotLinear(f"{node.name} averages real values only at the border")
        inner = self.operand(arg)
        if inner.source is None or any(t.conv is not None or t.pool for t in inner.terms):
            raise _NotLinear(f"{node.name} pools what a conv made (pooling only the input)")
        if any(padding) and not _is_zero(inner.bias):
            raise _NotLinear(f"{node.name} pads what a BN shifted")
        inner.terms = [_Term(None, t.scale, _Pool(kernel, stride, padding)) for t in inner.terms]
        inner.rank = inner.rank or dims + 2
        inner.nodes.append(node)
        return inner

    def _conv(self, node: fx.Node, conv: _ConvNd) -> _Affine:
        if parametrize.is_parametrized(conv) or not isinstance(conv.weight, nn.Parameter):
            raise _NotLinear(f"the weight of `{node.target}` is computed, not a parameter")
        source = node.args[0]
        if not isinstance(source, fx.Node):
            raise _NotLinear(f"`{node.target}` reads no tensor")
        affine = _Affine(source, [_Term(str(node.target))], nodes=[node])
        affine.channels, affine.rank = int(conv.out_channels), conv.weight.dim()
        return affine

    def constant(self, node: fx.Node) -> tuple[torch.Tensor, list[fx.Node]] | None:
        """The value of a node computed from parameters and buffers only (a layer scale's
        ``gamma.view(1, -1, 1, 1)``), and the nodes that compute it; ``None`` otherwise."""
        if node not in self.constants:
            self.constants[node] = self._constant(node)
        return self.constants[node]

    def _constant(self, node: fx.Node) -> tuple[torch.Tensor, list[fx.Node]] | None:
        if node.op == "get_attr":
            value = _attr(self.gm, str(node.target))
            return (value.detach(), [node]) if isinstance(value, torch.Tensor) else None
        if node.op not in ("call_function", "call_method") or not node.all_input_nodes:
            return None
        found = {}
        for n in node.all_input_nodes:
            value = self.constant(n) if len(n.users) == 1 else None
            if value is None:
                return None
            found[n] = value
        args = fx.node.map_arg(node.args, lambda n: found[n][0])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: found[n][0])
        try:
            with torch.no_grad():
                if node.op == "call_method":
                    value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                else:
                    value = node.target(*args, **kwargs)
        except Exception:
            return None
        if not isinstance(value, torch.Tensor):
            return None
        return value, [node] + [m for v in found.values() for m in v[1]]

    def _per_channel(self, value: torch.Tensor | float, branch: _Affine) -> torch.Tensor | float:
        """A factor that scales each channel of ``branch`` alike, as a vector (or number)."""
        if not isinstance(value, torch.Tensor) or value.numel() == 1:
            return float(value)
        shape = list(value.shape)
        rank, channels = branch.rank, branch.channels
        if rank is None or channels is None or len(shape) > rank:
            raise _NotLinear("a per-channel factor of unknown layout")
        shape = [1] * (rank - len(shape)) + shape
        if shape[1] != channels or any(s != 1 for i, s in enumerate(shape) if i != 1):
            raise _NotLinear(f"a factor of shape {tuple(value.shape)} is not per channel")
        return value.detach().double().cpu().reshape(-1)


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _graph_module(
    block: nn.Module, graph: fx.Graph, constants: Mapping[str, Any]
) -> fx.GraphModule:
    """The block's graph as a module. The tensors fx made while tracing (``_tensor_constant0``)
    go onto the new module; the block itself is left as it was."""
    graph._tracer_cls = None  # unpickling re-traces with it, and bnsurgery's needs a model
    for name, value in constants.items():  # GraphModule copies them from the root
        block.__dict__[name] = value
    try:
        return fx.GraphModule(block, graph, class_name=f"Collapsed{type(block).__name__}")
    finally:
        for name in constants:
            block.__dict__.pop(name, None)


def _node(graph: fx.Graph, name: str) -> fx.Node:
    for node in graph.nodes:
        if node.name == name:
            return node
    raise BnSurgeryError(f"the block has no node {name!r}")


def _first_weight(gm: nn.Module, affine: _Affine) -> torch.Tensor:
    """A tensor of the region whose dtype, device and ``requires_grad`` the new conv takes:
    its first conv's weight, or (pooled branches only) its first BN's weight or statistics."""
    if affine.convs():
        return gm.get_submodule(affine.convs()[0]).weight
    bn = gm.get_submodule(affine.bns[0]) if affine.bns else None
    if bn is None:
        raise BnSurgeryError("a region without a conv or a BN")
    return bn.weight if bn.weight is not None else bn.running_mean


def _rewire(gm: fx.GraphModule, affine: _Affine, name: str, conv: nn.Module) -> fx.Node:
    """Call ``conv`` on the region's input where the region's output was; drop the region.
    Returns the node that calls ``conv``."""
    gm.add_submodule(name, conv)
    output = affine.nodes[-1]
    with gm.graph.inserting_before(output):
        new = gm.graph.call_module(name, (affine.source,))
    output.replace_all_uses_with(new)
    for node in sorted(set(affine.nodes) | set(affine.consts), key=_position, reverse=True):
        if not node.users:
            gm.graph.erase_node(node)
    return new


def _position(node: fx.Node) -> int:
    return list(node.graph.nodes).index(node)


def _finish(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


# ------------------------------------------------------------------------------ planning


def _region_of(ex: _Expressor, bn_node: fx.Node) -> _Affine:
    """The largest linear region holding ``bn_node``: grown forward while the value has one
    user, then worked out backward from there (the last such value that is linear)."""
    node = bn_node
    best: _Affine | None = None
    stopped = ""  # why the first value beyond the region is not linear
    while True:
        try:
            affine = ex.express_region(node)
            if bn_node in affine.nodes:
                best = affine
        except _NotLinear as why:
            if best is None and node is bn_node:
                raise
            stopped = stopped or f"{node.name}: {why}"
        users = list(node.users)
        if len(users) != 1 or users[0].op == "output":
            break
        node = users[0]
    if best is None or (not best.convs() and not best.pools() and stopped):
        raise _NotLinear(stopped or "no linear region around it")
    return best


def _owned_inside(model: nn.Module, block: str, paths: Iterable[str]) -> str | None:
    """A module of the region that is also registered outside the block, or hooked."""
    modules = {p: model.get_submodule(f"{block}.{p}") for p in paths}
    for path, module in modules.items():
        for name, other in model.named_modules(remove_duplicate=False):
            if other is module and not name.startswith(block + "."):
                return f"`{block}.{path}` is also `{name}`"
        for table in ("_forward_hooks", "_forward_pre_hooks"):
            if user_hooks(module, table):
                return f"a hook on `{block}.{path}` sees a tensor the collapse removes"
    return None


def find_collapses(
    model: nn.Module, bns: Iterable[str], allowed: set[str], placed: set[str] = frozenset()
) -> tuple[list[Collapse], dict[str, str]]:
    """Regions holding the BNs ``bns`` (paths), each in the nearest enclosing block (up to
    three levels up, never the model itself) whose fx graph sums its branches; a region whose
    block sits inside another collapsed block is looked for again in the outer one (which is
    rewritten whole), so nested blocks keep theirs.

    ``allowed``: the BNs a region may absorb (those the user selected); ``placed``: BNs that
    fold without a region, whose region must then merge at least two branches to be worth
    it. Returns the collapses (one per block) and, for each BN in ``bns`` none holds, why.
    """
    traced: dict[str, tuple[fx.GraphModule, _Expressor] | str] = {}
    found: dict[str, list[tuple[Sum, set[str], str]]] = {}  # block: (sum, its BNs, seed)
    claimed: set[str] = set()
    why: dict[str, str] = {}

    def search(bn: str, within: str | None = None) -> None:
        """Find ``bn``'s region in the nearest block around it, up to three levels up
        (``within``: in that block or one around it, however far) and record it, or why
        there is none."""
        parts = bn.split(".")
        reasons: list[str] = []
        top = len(parts) - 1 if within is not None else min(_LEVELS, len(parts) - 1)
        for level in range(1, top + 1):
            block = ".".join(parts[:-level])
            if within is not None and not (within + ".").startswith(block + "."):
                continue
            reason = in_block(bn, block, ".".join(parts[-level:]))
            if reason is None:
                return
            reasons.append(reason)
        if bn not in placed:
            why[bn] = "; ".join(r for r in reasons if r) or (
                "no block around it sums branches (the model's own forward is not "
                "rewritten: sums there stay)"
            )

    def in_block(bn: str, block: str, local: str) -> str | None:
        """None when ``block`` holds ``bn``'s region (recorded); otherwise why not ("" when
        the block does not call it once, or its region is not worth it)."""
        if block not in traced:
            traced[block] = _trace(model.get_submodule(block))
        entry = traced[block]
        if isinstance(entry, str):
            return f"`{block}`: {entry}"
        gm, ex = entry
        bn_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == local]
        if len(bn_nodes) != 1:
            return ""
        try:
            affine = _region_of(ex, bn_nodes[0])
            spec = affine.spec(gm)
        except _NotLinear as no:
            return f"`{block}`: {no}"
        total = sum(1 for t in affine.terms if t.conv is None) + len(affine.convs())
        if bn in placed and total < 2:
            return ""  # one branch: its own fold does as well; a block further up may sum it
        absorbed = {f"{block}.{b}" for b in affine.bns}
        taken = absorbed & claimed
        outside = absorbed - allowed
        problem = (
            f"its region also holds {sorted(outside)[0]}, which is not selected"
            if outside
            else f"its region overlaps another at {sorted(taken)[0]}"
            if taken
            else _owned_inside(model, block, [*affine.bns, *affine.convs()])
        )
        if problem:
            return f"`{block}`: {problem}"
        sums = found.setdefault(block, [])
        name = f"collapsed{len(sums)}" if sums else "collapsed"
        while hasattr(gm, name) or any(s.name == name for s, _, _ in sums):
            name += "_"
        summed = Sum(
            affine.source.name,
            affine.nodes[-1].name,
            name,
            spec,
            tuple(affine.bns),
            tuple(affine.convs()),
            total,
            len(affine.pools()),
        )
        sums.append((summed, absorbed, bn))
        claimed.update(absorbed)
        return None

    for bn in bns:
        if bn not in claimed:
            search(bn)
    while nested := [b for b in found if any(b.startswith(o + ".") for o in found)]:
        # a region inside another collapsed block: look for it again in the outer block
        block = nested[0]
        outer = min((o for o in found if block.startswith(o + ".")), key=len)
        entries = found.pop(block)
        for _, absorbed, _ in entries:
            claimed.difference_update(absorbed)
        for _, absorbed, seed in entries:
            if seed not in claimed:
                search(seed, outer)
            for bn in absorbed - claimed:
                why.setdefault(bn, f"its block `{block}` sits inside collapsed `{outer}`")
    collapses = [Collapse(b, tuple(s for s, _, _ in sums)) for b, sums in found.items()]
    return collapses, {bn: w for bn, w in why.items() if bn not in claimed}


def _trace(block: nn.Module) -> tuple[fx.GraphModule, _Expressor] | str:
    try:
        graph, constants = fx_trace(block)
    except BnSurgeryError as exc:
        return str(exc).split(";")[0]
    gm = _graph_module(block, graph, constants)
    return gm, _Expressor(gm)


def rebuild(block: nn.Module, regions: list[Mapping[str, Any]]) -> nn.Module:
    """Replay a recorded collapse on a freshly built block (weights loaded afterwards).

    Raises:
        BnSurgeryError: the block's graph has no such region, or it makes another conv.
    """
    graph, constants = fx_trace(block)
    gm = _graph_module(block, graph, constants)
    ex = _Expressor(gm)
    renamed: dict[str, str] = {}  # an earlier region's output: the node calling its conv
    for entry in regions:
        spec = ConvSpec.from_dict(entry["conv"])
        name = str(entry["name"])
        if not _NAME.fullmatch(name):
            raise BnSurgeryError(f"bad collapsed conv name {name!r:.40}")
        try:
            affine = ex.express_region(_node(gm.graph, str(entry["output"])))
            source = renamed.get(str(entry["source"]), entry["source"])
            if affine.source is None or affine.source.name != source:
                raise _NotLinear("its region starts elsewhere")
            if affine.spec(gm) != spec:
                raise _NotLinear("its region makes another conv")
        except _NotLinear as no:
            raise BnSurgeryError(f"the recorded region {entry['output']!r:.40}: {no}") from None
        new = _rewire(gm, affine, name, spec.build(_first_weight(gm, affine)))
        renamed[str(entry["output"])] = new.name
        ex = _Expressor(gm)
    _finish(gm)
    setattr(gm, COLLAPSED, True)
    return gm.train(block.training)
