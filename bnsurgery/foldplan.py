"""Planning a fold: which BN goes into which layer, found by walking the real graph.

:func:`plan_fold` walks the graph (:mod:`bnsurgery.graph`) and returns a :class:`FoldPlan`: for
every BN one :class:`FoldEdit` (which layer absorbs it, before or after it) or one skip with the
reason. The rules are about the graph only: the BN's input comes from one conv or linear used
nowhere else (producer), or its output goes only to convs or linears that never see padded
zeros (consumer: each absorbs it); no user hook, data-dependent branch or model output in
between. Nothing changes the model; :meth:`FoldEdit.apply` does, inside a
:class:`~bnsurgery.plan.Transaction`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from . import foldmath
from .errors import UsageError
from .foldedit import FoldEdit, FoldPart, FoldPlan, Owners, fold_step
from .graph import (
    AVG_POOL_ARGS,
    CONCATS,
    PERMUTES,
    POOLS,
    RESHAPES,
    Graph,
    Node,
    Trace,
    Value,
    trace,
)
from .hooks import user_hooks
from .norms import bn_stats, has_activation, iter_batchnorms, num_features
from .plan import NOT_SELECTED, Skip, select
from .regions import find_collapses
from .select import matches, patterns
from .tree import on_unwrapped

__all__ = [
    "LEFT_CLASSES",
    "PLACEMENTS",
    "FoldEdit",
    "FoldPart",
    "FoldPlan",
    "left_class",
    "plan_fold",
]

_LINEAR_KINDS = ("conv", "conv_transpose", "linear")
#: where a BN can go, in the order :func:`plan_fold` tries them
PLACEMENTS = ("producer", "consumer", "region")


#: The short list every BN a fold leaves falls in (README, "Never folded"), each with the
#: wording of the reasons that put a BN there, checked in this order (a layer that mixes
#: channels outranks a region search the symbolic walk could not trace).
LEFT_CLASSES: dict[str, tuple[str, ...]] = {
    "not selected": (NOT_SELECTED,),
    "no statistics": (
        "running statistics", "track_running_stats", "training=True", "not called in the",
        "uninitialised",
    ),
    "user hook": ("hook",),
    "precision": ("moved its layer's output", "checked only through the output"),
    "computed weight": ("computed at run time", "weight-normed", "not floating point"),
    "channels mixed": (
        "merges or splits the channel axis", "arrives at axis", "pools over channels",
        "averages over the channel axis",
    ),
    "walk limit": (
        "data-dependent", "symbolic walk", "symbolic tracing", "model's own forward",
        "pass example inputs",
    ),
    "shared tensor": (
        "is also used by", "is also a model output", "is also read by", "are also read by",
        "differ between calls", "is also `", "different layout ops", "more than once",
        "more than one piece", "also called on other tensors", "under several names",
    ),
    "not one conv": ("differ in", "do not align", "overlaps another", "changes the channel count"),
    "no layer beside it": ("comes from", "its input is a", "its output goes to", "a model output"),
}  # fmt: skip


def left_class(reason: str) -> str:
    """Which of :data:`LEFT_CLASSES` a left BN's reason falls in (``"other"``: none, a
    wording this list misses)."""
    for name, words in LEFT_CLASSES.items():
        if any(w in reason for w in words):
            return name
    return "other"


class _Reject(Exception):
    """A placement does not apply; the message is the reason."""


def _describe(node: Node) -> str:
    return f"`{node.name}`" if node.kind == "batchnorm" else f"{node.name}()"


def _is_zero_padding(attrs: dict[str, Any]) -> bool:
    if attrs.get("padding_mode", "zeros") != "zeros":
        return True  # padded values are copies of real values: still exact
    padding = attrs.get("padding", 0)
    if isinstance(padding, str):
        return padding == "valid"
    if isinstance(padding, int):
        return padding == 0
    return all(int(p) == 0 for p in padding)


def _weight_norm_of(node: Node) -> tuple[torch.Tensor, int] | None:
    """``(g, dim)`` when the layer's weight is weight norm's ``g * v / |v|`` (PyTorch's
    ``parametrizations.weight_norm`` or the older ``weight_norm`` hook), else ``None``."""
    made = node.weight_value.producer if node.weight_value is not None else None
    if made is not None and made.name == "_weight_norm" and "g" in made.attrs:  # runtime walk
        return made.attrs["g"], int(made.attrs["dim"])
    module = node.module
    if module is None:
        return None
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is not None and len(plist) == 1 and type(plist[0]).__name__ == "_WeightNorm":
        return plist.original0, int(plist[0].dim)
    for hook in module._forward_pre_hooks.values():
        if type(hook).__name__ == "WeightNorm" and getattr(hook, "name", "") == "weight":
            return module.weight_g, int(hook.dim)
    return None


def _scaled_tensor(owners: Owners, node: Node, role: str) -> tuple[torch.Tensor, str]:
    """The parameter a fold scales for ``node``'s weight, and how: ``""`` (the weight
    itself) or ``"weight_norm"`` (its ``g``, per output channel: a producer fold only)."""
    if owners.of(node.weight):
        return node.weight, ""
    norm = _weight_norm_of(node)
    if norm is None:
        raise _Reject(
            f"the weight of {node.name}() is computed at run time (weight standardisation, "
            "spectral norm, a parametrisation), not a parameter a fold can scale"
        )
    g, dim = norm
    if role != "producer" or node.kind not in ("conv", "linear") or dim != 0:
        raise _Reject(
            f"the weight of {node.name}() is weight-normed (dim {dim}); only the layer "
            "before a BN, normalised per output channel, folds into its g"
        )
    if not owners.of(g):
        raise _Reject(f"the weight norm of {node.name}() has no g parameter")
    return g, "weight_norm"


def _layer_of(
    graph: Graph, owners: Owners, layer_nodes: list[Node], allowed: set[int], role: str
) -> tuple[str, str, bool, str]:
    """Check that every call of the layer is one we fold; return (module, kind, adds_bias,
    how its weight is scaled: see :func:`_scaled_tensor`)."""
    first = layer_nodes[0]
    scaled, how = _scaled_tensor(owners, first, role)
    if any(
        _scaled_tensor(owners, n, role)[0] is not scaled or n.bias is not first.bias
        for n in layer_nodes
    ):
        raise _Reject(f"its {role} layers differ between calls")
    weight_owners = owners.of(scaled)
    if first.bias is not None and not owners.of(first.bias):
        raise _Reject(f"the bias of {first.name}() is computed at run time")
    for tensor in (scaled, first.bias):
        others = [n for n in graph.uses(tensor) if id(n) not in allowed]
        others = [  # weight norm reads g to make this layer's weight: not another use
            n
            for n in others
            if not (
                how
                and n.name == "_weight_norm"
                and all(id(c) in allowed for o in n.outputs for c in o.consumers)
            )
        ]
        if others:
            module = weight_owners[0][0] or "the model"
            raise _Reject(
                f"`{module}` is also used by {_describe(others[0])} (a layer called at "
                f"{len(graph.uses(tensor))} sites with different neighbours)"
            )
    module_name, attr = weight_owners[0]
    if how == "weight_norm":  # g lives at LAYER.parametrizations.weight.original0 or LAYER.weight_g
        module_name = module_name.removesuffix(".parametrizations.weight")
        module_name = module_name.removesuffix("parametrizations.weight")
        attr = "weight"
    adds_bias = first.bias is None
    if adds_bias:
        module = owners.modules.get(module_name)
        if attr not in ("weight", "weight_g") or not isinstance(module, _ConvNd | nn.Linear):
            raise _Reject(f"{first.name}() has no bias parameter to absorb the BN's shift")
    if not scaled.dtype.is_floating_point:
        raise _Reject(f"the weight of `{module_name}` is not floating point")
    return module_name, first.kind, adds_bias, how


def _only_for(value: Value, user: Node, site: Node, what: str) -> None:
    """``value`` flows only to ``user`` (on its way to the BN call ``site``)."""
    others = [c for c in value.consumers if c is not user]
    if others:
        raise _Reject(f"{what} is also used by {_describe(others[0])}")
    if value.is_output:
        raise _Reject(f"{what} is also a model output")
    if site.decisions > value.decisions:
        raise _Reject(f"{what} crosses {_BRANCH} before it")


def _layout_chain(value: Value, site: Node) -> tuple[Value, Node, list[Node]]:
    """Walk back from the BN's input through layout ops (:data:`~bnsurgery.graph.RESHAPES`,
    :data:`~bnsurgery.graph.PERMUTES`: a per-channel map commutes with them wherever they take
    the channel axis, which :func:`_channel_route` follows) that feed only the next step: the
    value they start from, its one user, and the ops in the order they run."""
    chain: list[Node] = []
    user = site
    while (op := value.producer) is not None and op.kind == "op":
        passes = RESHAPES | PERMUTES | POOLS
        if op.name not in passes or len(op.inputs) != 1 or "args" not in op.attrs:
            break
        _only_for(value, user, site, f"the output of {op.name}()")
        chain.insert(0, op)
        user, value = op, op.inputs[0]
    return value, user, chain


def _channel_route(prod: Node, value: Value, chain: list[Node]) -> tuple[Any, ...]:
    """Follow the layer's channel axis (the last of a linear's output, axis 1 of a conv's)
    through ``chain``; it must arrive at axis 1, where the BN normalises. Returns the chain as
    (name, args, keyword items) triples."""
    if value.shape is None:
        raise _Reject(
            f"its input comes through {chain[0].name}(), and the symbolic walk has no shapes "
            "to follow the channel axis (pass example inputs)"
        )
    axis = len(value.shape) - 1 if prod.kind == "linear" else 1
    shape = value.shape
    for op in chain:
        out = op.outputs[0].shape if len(op.outputs) == 1 else None
        if out is None:
            raise _Reject(f"{op.name}() gives no single tensor")
        axis = _moved_axis(op, axis, shape, out)
        shape = out
    if axis != 1:
        raise _Reject(
            f"the layer's channel axis arrives at axis {axis} of the BN's input through "
            f"{', '.join(o.name + '()' for o in chain)}; the BN normalises axis 1"
        )
    return tuple((op.name, op.attrs["args"], op.attrs["kwargs"]) for op in chain)


_POOL_ARGS = {
    "avg": AVG_POOL_ARGS,
    "max": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
}


def _pool_problem(op: Node) -> str | None:
    """Why a BN's affine map does not commute with this pooling call, or ``None``. (A max
    pool needs a positive scale in every channel: :func:`_producer` checks that.)"""
    kind = op.name.split("_pool")[0]
    names = ("output_size", "return_indices") if kind.startswith("adaptive") else _POOL_ARGS[kind]
    bound = _bound(op, names)
    if bound.get("return_indices"):
        return "it returns indices"
    if kind != "avg":  # max pooling (a positive scale is checked later), adaptive pooling
        return None
    padded = bound.get("padding", 0) not in (0, (0,), (0, 0), (0, 0, 0), [0, 0], None)
    if bound.get("divisor_override") is not None:
        return "it divides by a fixed divisor_override"
    if padded and bound.get("count_include_pad", True):
        return "it averages padded zeros (count_include_pad)"
    return None


def _bound(op: Node, names: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(names, op.attrs["args"], strict=False))
    bound.update(dict(op.attrs["kwargs"]))
    return bound


def _moved_axis(op: Node, axis: int, before: tuple[int, ...], after: tuple[int, ...]) -> int:
    """Where axis ``axis`` of ``op``'s input is in its output, or :class:`_Reject`."""
    if op.name == "mean":  # over axes that are not the channel's, keeping them or not
        bound = _bound(op, ("dim", "keepdim"))
        dims = bound.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or ())
        dims = [d % len(before) for d in dims]
        if not dims or axis in dims:
            raise _Reject(f"{op.name}() is in the way: it averages over the channel axis")
        return axis if bound.get("keepdim") else axis - sum(d < axis for d in dims)
    if op.name in POOLS:
        problem = _pool_problem(op)
        if axis != 1 or problem:
            raise _Reject(f"{op.name}() is in the way: {problem or 'it pools over channels'}")
        return axis
    if op.name in PERMUTES:
        given = (*op.attrs["args"], *(v for _, v in op.attrs["kwargs"]))
        dims = [d for d in given if isinstance(d, int)] or [
            d for a in given if isinstance(a, tuple | list) for d in a
        ]
        dims = [d % len(before) for d in dims]
        if op.name == "permute":
            return dims.index(axis)
        first, second = dims
        return second if axis == first else first if axis == second else axis
    # a reshape keeps each index of an axis whose leading (or trailing) sizes it keeps
    if before[: axis + 1] == after[: axis + 1]:
        return axis
    tail = len(before) - axis
    if len(after) >= tail and before[axis:] == after[len(after) - tail :]:
        return len(after) - tail
    raise _Reject(
        f"{op.name}() {tuple(before)} -> {tuple(after)} merges or splits the channel axis"
    )


def _check_linear_rank(value: Value, notes: list[str], side: str) -> None:
    """A linear layer folds a BN only on ``(N, C)`` tensors (its last axis is the channel);
    ``side`` is ``"output"`` (producer) or ``"input"`` (consumer)."""
    if value.ndim is None:
        notes.append(f"linear {side} rank not checked (symbolic walk)")
    elif value.ndim != 2:
        raise _Reject(f"the linear {side} has rank {value.ndim}; only (N, C) tensors fold")


def _absorber(
    graph: Graph, owners: Owners, bn: nn.Module, layers: list[Node], role: str
) -> tuple[str, str, bool, str]:
    """The layer every call site folds into, checked (:func:`_layer_of`) and with as many
    channels on the BN's side (its outputs for a producer, inputs for a consumer) as the BN."""
    module_name, kind, adds_bias, how = _layer_of(
        graph, owners, layers, {id(n) for n in layers}, role
    )
    groups = int(layers[0].attrs.get("groups", 1))
    count = foldmath.out_channels if role == "producer" else foldmath.in_channels
    channels = count(kind, layers[0].weight, groups)
    if channels != num_features(bn):
        side = "output" if role == "producer" else "input"
        raise _Reject(f"`{module_name}` has {channels} {side} channels, the BN {num_features(bn)}")
    return module_name, kind, adds_bias, how


#: Why a tensor that a data-dependent branch separates from its consumer does not fold: on
#: inputs that go the other way the walk never saw, it may go elsewhere.
_BRANCH = "a data-dependent Python branch (a tensor's truth value, .item(), .tolist())"


def _kept(bn: nn.Module) -> str:
    """What a producer fold leaves of a timm norm-act layer: its activation and drop."""
    if not has_activation(bn):
        return ""
    return f"act={type(bn.act).__name__}, drop={type(getattr(bn, 'drop', None)).__name__}"


def _concatenated(
    graph: Graph, owners: Owners, bn: nn.Module, site: Node, cat: Node, user: Node
) -> FoldEdit:
    """A BN after ``cat`` along its channel axis: each slice of its channels folds into the
    conv or linear that alone produces that piece (MixNet's split -> convs -> cat -> BN)."""
    data = cat.outputs[0]
    _only_for(data, user, site, "the output of cat()")
    dim = cat.attrs.get("dim")
    if dim is None:
        raise _Reject("its input comes from cat() along an axis that is not a plain int")
    if dim < 0 and data.ndim is not None:
        dim += data.ndim
    if dim != 1:
        raise _Reject(f"its input comes from cat() along axis {dim}; the BN normalises axis 1")
    parts: list[FoldPart] = []
    notes: list[str] = []
    for i, piece in enumerate(cat.inputs):
        prod = piece.producer
        if prod is None or prod.kind not in _LINEAR_KINDS:
            source = f"a {piece.origin}" if prod is None else _describe(prod)
            raise _Reject(f"piece {i} of its cat() comes from {source}, not from a conv or linear")
        if cat.inputs.count(piece) > 1:
            raise _Reject(f"cat() joins the output of {prod.name}() more than once")
        _only_for(piece, cat, site, f"the output of {prod.name}()")
        module_name, kind, adds_bias, how = _layer_of(graph, owners, [prod], {id(prod)}, "producer")
        if how:
            raise _Reject(f"`{module_name}` is weight-normed; a slice of a cat() does not fold")
        if any(p.into == module_name for p in parts):
            raise _Reject(f"`{module_name}` produces more than one piece of its cat()")
        if kind == "linear":
            _check_linear_rank(piece, notes, "output")
        start = parts[-1].stop if parts else 0
        width = foldmath.out_channels(kind, prod.weight, int(prod.attrs.get("groups", 1)))
        if piece.shape is not None and piece.shape[1] != width:
            raise _Reject(f"piece {i} of its cat() is not the output channels of {prod.name}()")
        parts.append(FoldPart(module_name, kind, start, start + width, adds_bias))
    joined = parts[-1].stop if parts else 0
    if joined != num_features(bn):
        raise _Reject(
            f"its cat() joins {joined} layer output channels, the BN has {num_features(bn)}"
        )
    return FoldEdit(
        "", " + ".join(p.into for p in parts), "producer", parts[0].layer, 1,
        any(p.adds_bias for p in parts), _kept(bn), tuple(dict.fromkeys(notes)), (), tuple(parts),
    )  # fmt: skip


def _producer(graph: Graph, owners: Owners, bn: nn.Module, sites: list[Node]) -> FoldEdit:
    producers: list[Node] = []
    notes: list[str] = []
    routes: set[tuple[Any, ...]] = set()
    for site in sites:
        data: Value | None = site.data
        if data is None:
            raise _Reject("its input is not a tensor")
        data, user, chain = _layout_chain(data, site)
        prod = data.producer
        if prod is None:
            raise _Reject(f"its input is a {data.origin}")
        if prod.kind == "op" and prod.name in CONCATS:
            if len(sites) > 1 or chain:
                where = "at several call sites" if chain == [] else "through layout ops"
                raise _Reject(f"its input comes from cat() {where}; only one direct site folds")
            return _concatenated(graph, owners, bn, site, prod, user)
        if (
            prod.kind == "op"
            and prod.name in RESHAPES | PERMUTES | POOLS
            and "args" not in prod.attrs
        ):
            raise _Reject(
                f"its input comes through {prod.name}(), which the symbolic walk cannot follow "
                "the channel axis through (pass example inputs)"
            )
        if prod.kind not in _LINEAR_KINDS:
            raise _Reject(f"its input comes from {_describe(prod)}, not from a conv or linear")
        _only_for(data, user, site, f"the output of {prod.name}()")
        if chain:
            routes.add(_channel_route(prod, data, chain))
        elif prod.kind == "linear":
            _check_linear_rank(data, notes, "output")
        producers.append(prod)
    if len(routes) > 1:
        raise _Reject("its call sites reach it through different layout ops")
    module_name, kind, adds_bias, how = _absorber(graph, owners, bn, producers, "producer")
    through = next(iter(routes), ())
    _positive_through_max(bn, through)
    return FoldEdit(
        "", module_name, "producer", kind, len(sites), adds_bias, _kept(bn),
        tuple(dict.fromkeys(notes)), through, scales=how,
    )  # fmt: skip


def _through_copy_padding(node: Node, value: Value) -> tuple[Node, Value]:
    """``node`` (a consumer of ``value``) and the value it reads, looking through an ``F.pad``
    that copies real values (reflect, replicate, circular): a per-channel affine map commutes
    with such padding, so a conv after it (padding nothing itself) can still absorb the BN."""
    if node.kind != "op" or node.name != "pad" or node.attrs.get("mode") == "constant":
        return node, value
    padded = node.outputs[0] if len(node.outputs) == 1 else None
    if padded is None or len(padded.consumers) != 1 or padded.is_output:
        return node, value
    after = padded.consumers[0]
    if after.kind == "conv" and after.data is padded and _is_zero_padding(after.attrs):
        return after, padded
    return node, value


def _passes(op: Node, value: Value) -> bool:
    """``op`` moves or averages ``value``'s channels without mixing them, replayably, on the
    same side of every data-dependent branch: a consumer fold looks through it."""
    return (
        op.kind == "op"
        and op.name in RESHAPES | PERMUTES | POOLS
        and len(op.inputs) == 1
        and len(op.outputs) == 1
        and "args" in op.attrs
        and op.decisions == value.decisions
    )


def _consumer_leaves(out: Value) -> list[tuple[list[Node], Node]]:
    """Every conv or linear (or BN module) the BN's output reaches, through layout and pooling
    ops that lead only to such layers (``(ops on the way, the layer)``, in the order the walk
    recorded the calls). A value on the way that anything else reads, or that the model
    returns, rejects."""
    leaves: list[tuple[list[Node], Node]] = []
    todo: list[tuple[Value, list[Node]]] = [(out, [])]
    while todo:
        value, chain = todo.pop(0)
        after = f" after {chain[-1].name}()" if chain else ""
        if value.is_output:
            raise _Reject(f"its output is a model output{after}")
        if not value.consumers:
            raise _Reject(f"its output goes to nothing{after}")
        for node in value.consumers:
            if _passes(node, value):
                todo.append((node.outputs[0], [*chain, node]))
                continue
            cons, fed = (node, value) if chain else _through_copy_padding(node, value)
            if cons.kind not in (*_LINEAR_KINDS, "batchnorm") or cons.data is not fed:
                users = ", ".join(_describe(c) for c in value.consumers[:3])
                one = "a conv or linear" if len(value.consumers) == 1 else "convs or linears"
                raise _Reject(f"its output goes to {users}{after}, not to {one}")
            leaves.append((chain, cons))
    return leaves


def _consumer_route(out: Value, cons: Node, chain: list[Node]) -> tuple[Any, ...]:
    """The BN's channel axis (1) followed through ``chain`` must arrive where ``cons`` reads
    its input channels (the last axis of a linear's input, axis 1 of a conv's)."""
    if out.shape is None:
        raise _Reject(
            f"its output goes through {chain[0].name}(), and the symbolic walk has no shapes "
            "to follow the channel axis (pass example inputs)"
        )
    axis, shape = 1, out.shape
    for op in chain:
        after = op.outputs[0].shape
        assert after is not None  # the runtime walk records every shape
        axis = _moved_axis(op, axis, shape, after)
        shape = after
    want = len(shape) - 1 if cons.kind == "linear" else 1
    if axis != want:
        raise _Reject(
            f"its channel axis arrives at axis {axis} of {cons.name}()'s input through "
            f"{', '.join(o.name + '()' for o in chain)}; the layer reads channels on axis {want}"
        )
    return tuple((op.name, op.attrs["args"], op.attrs["kwargs"]) for op in chain)


def _positive_through_max(bn: Any, route: tuple[Any, ...]) -> None:
    """max(s * x + t) = s * max(x) + t only where s > 0: a max pool between a BN and its
    layer needs a positive scale in every channel."""
    maxed = [op for op, _, _ in route if "max_pool" in op]
    if maxed:
        stats = bn_stats(bn) if isinstance(bn, nn.Module) else None
        if stats is None or not bool((stats.scale_shift()[0] > 0).all()):
            raise _Reject(
                f"{maxed[0]}() is in the way and the BN's scale is not positive in every channel"
            )


def _consumer(graph: Graph, owners: Owners, bn: nn.Module, sites: list[Node]) -> FoldEdit:
    """The layers after the BN: one conv or linear, or several that alone read its output
    (NextViT's BN before its attention's key and value, a BN before a pooled head and its
    distillation head), each through its own layout and pooling ops, each absorbing it all;
    a BN module among them absorbs it in its weight and bias (NextViT's block norm before the
    attention's own BatchNorm1d), planned before that BN's own fold (:func:`_into_norms`)."""
    if has_activation(bn):
        raise _Reject("an activation follows the norm inside the layer, so no layer after it can")
    notes: list[str] = []
    reached: dict[int, tuple[tuple[Any, ...], list[Node]]] = {}  # by weight: route, calls
    for i, site in enumerate(sites):
        if len(site.outputs) != 1:
            raise _Reject("its output is not a single tensor")
        out = site.outputs[0]
        here: dict[int, tuple[tuple[Any, ...], list[Node]]] = {}
        for chain, cons in _consumer_leaves(out):
            if cons.decisions > out.decisions:
                raise _Reject(f"its output crosses {_BRANCH} before {cons.name}()")
            if cons.kind == "batchnorm":
                route = _consumer_route(out, cons, chain) if chain else ()
                seen = here.setdefault(id(cons.module), (route, []))
                if seen[0] != route:
                    raise _Reject(f"it reaches {_describe(cons)} through different layout ops")
                seen[1].append(cons)
                continue
            if cons.kind == "conv_transpose":
                raise _Reject("a transposed conv after it cannot absorb it exactly")
            if cons.kind == "conv" and not _is_zero_padding(cons.attrs):
                raise _Reject(f"the conv after it pads with zeros ({cons.name}, not exact)")
            route: tuple[Any, ...] = ()
            if chain:
                route = _consumer_route(out, cons, chain)
            elif cons.kind == "linear":
                _check_linear_rank(out, notes, "input")
            seen = here.setdefault(id(cons.weight), (route, []))
            if seen[0] != route:
                raise _Reject(f"it reaches {cons.name}() through different layout ops")
            seen[1].append(cons)
        if i and {k: r for k, (r, _) in here.items()} != {k: r for k, (r, _) in reached.items()}:
            raise _Reject("its call sites reach their layers through different layout ops")
        for key, (route, calls) in here.items():
            reached.setdefault(key, (route, []))[1].extend(calls)
    parts: list[FoldPart] = []
    for route, calls in reached.values():
        _positive_through_max(bn, route)
        if calls[0].kind == "batchnorm":
            module_name = _absorbing_norm(graph, owners, bn, calls)
            parts.append(FoldPart(module_name, "batchnorm", 0, num_features(bn), False, route))
            continue
        module_name, kind, adds_bias, _ = _absorber(graph, owners, bn, calls, "consumer")
        parts.append(FoldPart(module_name, kind, 0, num_features(bn), adds_bias, route))
    notes_ = tuple(dict.fromkeys(notes))
    if len(parts) == 1:
        one = parts[0]
        return FoldEdit(
            "", one.into, "consumer", one.layer, len(sites), one.adds_bias, "", notes_,
            one.through,
        )  # fmt: skip
    return FoldEdit(
        "", " + ".join(p.into for p in parts), "consumer", parts[0].layer, len(sites),
        any(p.adds_bias for p in parts), "", notes_, (), tuple(parts),
    )  # fmt: skip


def _absorbing_norm(graph: Graph, owners: Owners, bn: nn.Module, calls: list[Node]) -> str:
    """The path of the BN module that ``bn``'s output reaches (``calls``), checked: it can
    absorb ``bn`` in its weight and bias (affine, with running statistics, as many channels)
    and this is its only call, so nothing else sees the changed affine map."""
    after = calls[0].module
    names = [n for n, m in owners.modules.items() if m is after]
    what = f"`{names[0]}`" if names else "a BN"
    if len(graph.bn_sites(after)) != len(calls):
        raise _Reject(f"its output goes to {what}, which is also called on other tensors")
    if len(names) != 1:
        raise _Reject(f"its output goes to {what}, which is registered under several names")
    if bn_stats(after) is None:
        raise _Reject(f"its output goes to {what}, which has no running statistics")
    if not all(isinstance(getattr(after, k, None), nn.Parameter) for k in ("weight", "bias")):
        raise _Reject(f"its output goes to {what}, which has no affine map to absorb it")
    if num_features(after) != num_features(bn):
        raise _Reject(f"{what} has {num_features(after)} channels, the BN {num_features(bn)}")
    return names[0]


def _hook_between(model: nn.Module, upstream: str, downstream: str) -> str | None:
    """A user hook on the way from module ``upstream`` to module ``downstream``, which a fold
    would merge into one layer: the forward hooks of ``upstream`` and of its parents that do
    not hold ``downstream``, and the pre-hooks of ``downstream`` and of its parents that do not
    hold ``upstream``. Such a hook sees, or changes, the tensor between the two, which the fold
    removes (PyTorch's ``fuse_modules`` drops these hooks; bnsurgery does not fold there).
    """
    if user_hooks(None, "_forward_hooks") or user_hooks(None, "_forward_pre_hooks"):
        return "a global module hook (register_module_forward_hook) sees every layer's tensors"
    up, down = upstream.split("."), downstream.split(".")
    shared = 0
    while shared < min(len(up), len(down)) and up[shared] == down[shared]:
        shared += 1
    sides = ((up, "_forward_hooks", "a forward hook"), (down, "_forward_pre_hooks", "a pre-hook"))
    for path, table, what in sides:
        for depth in range(len(path), shared, -1):
            name = ".".join(path[:depth])
            if user_hooks(model.get_submodule(name), table):
                return f"{what} on `{name}` sees the tensor between `{upstream}` and `{downstream}`"
    return None


def _why_not(bn: nn.Module, graph: Graph, sites: list[Node]) -> str | None:
    for key in ("running_mean", "running_var", "weight", "bias"):  # what the fold removes
        tensor = getattr(bn, key, None)
        stray = (
            [n for n in graph.uses(tensor) if n.kind != "batchnorm"] if tensor is not None else []
        )
        if stray:
            what = "statistics" if key.startswith("running") else "affine parameters"
            return f"its {what} are also read by {_describe(stray[0])} outside its own call"
    if not sites:
        return "not called in the forward pass"
    return None


def _placed(
    model: nn.Module,
    graph: Graph,
    owners: Owners,
    bn: Any,
    sites: list[Node],
    module: str,
    placements: Sequence[str],
) -> tuple[FoldEdit | None, str]:
    """The first placement that takes the BN called at ``sites`` (``module``: where it sits,
    for the hook check), or ``None`` and every placement's reason."""
    reasons: list[str] = []
    for placement in (p for p in placements if p != "region"):
        try:
            find = _producer if placement == "producer" else _consumer
            edit = find(graph, owners, bn, sites)
        except _Reject as why:
            reasons.append(f"{placement}: {why}")
            continue
        ends = [
            (p.into, module) if placement == "producer" else (module, p.into)
            for p in edit.targets()
        ]
        hooked = next(filter(None, (_hook_between(model, *e) for e in ends)), None)
        if hooked:
            reasons.append(f"{placement}: {hooked}, which folding would remove")
            continue
        return edit, ""
    return None, "; ".join(reasons)


@on_unwrapped
def plan_fold(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    placements: Sequence[str] = PLACEMENTS,
    walked: Trace | None = None,
) -> FoldPlan:
    """Plan a fold without changing anything.

    Args:
        model: the model.
        example_inputs: a tensor or tuple of positional inputs; with them the graph is walked on
            a real forward pass, without them symbolically (``torch.fx``).
        include, exclude: glob patterns on BN module names (see :func:`select_batchnorms`).
        placements: which placements to try, in order: ``"producer"``, ``"consumer"``;
            ``"region"`` (tried last, for the BNs neither placement takes) collapses a linear
            region of the BN's block (:mod:`bnsurgery.regions`) into one conv.
        walked: an existing :class:`~bnsurgery.graph.Trace` to reuse.

    Returns:
        A :class:`FoldPlan` with one edit or one skip for every BN in the model.

    Raises:
        UsageError: a pattern selects nothing, or an unknown placement.
        TraceError: the model cannot be walked.
    """
    for p in placements:
        if p not in PLACEMENTS:
            raise UsageError(f"unknown placement {p!r}; valid: {', '.join(PLACEMENTS)}")
    if walked is None:
        walked = trace(model, example_inputs)
    graph = walked.graph
    owners = Owners(model)
    chosen, skipped = select(model, include, exclude)
    edits: list[FoldEdit] = []
    unplaced: list[str] = []  # BNs no placement took (regions may)
    for name, bn in chosen:
        sites = graph.bn_sites(bn)
        reason = _why_not(bn, graph, sites)
        if reason:
            skipped.append(Skip(name, reason))
            continue
        edit, why = _placed(model, graph, owners, bn, sites, name, placements)
        if edit is None:
            skipped.append(Skip(name, why))
            unplaced.append(name)
        else:
            edits.append(dataclasses.replace(edit, bn=name))
    more, left = _functional(model, graph, owners, include, exclude, placements)
    edits += more
    skipped += left
    edits, skipped = _into_norms(edits, skipped, {name for name, _ in chosen})
    if "region" in placements:
        edits, skipped = _regions(model, graph, chosen, edits, skipped, unplaced)
    order = {name: i for i, (name, _) in enumerate(iter_batchnorms(model))}
    skipped.sort(key=lambda s: order.get(s.bn, -1))
    return FoldPlan("fold", edits, skipped, fold_step(edits, skipped), method=graph.method)


def _into_norms(
    edits: list[FoldEdit], skipped: list[Skip], selected: set[str]
) -> tuple[list[FoldEdit], list[Skip]]:
    """Edits that fold a BN into the BN after it (its weight and bias) go before that BN's
    own edit, which folds the changed map on; a BN the user did not select is not changed."""
    kept: list[FoldEdit] = []
    for e in edits:
        norms = [p.into for p in e.targets() if p.layer == "batchnorm"]
        outside = [n for n in norms if n not in selected]
        if outside:
            why = f"consumer: `{outside[0]}` would absorb it and is not selected"
            skipped.append(Skip(e.bn, why))
        else:
            kept.append(e)
    before = {  # the edits that must come before each BN's own edit
        e.bn: {x.bn for x in kept for p in x.targets() if (p.layer, p.into) == ("batchnorm", e.bn)}
        for e in kept
    }
    ordered: list[FoldEdit] = []
    done: set[str] = set()
    while len(ordered) < len(kept):  # the plan's order where nothing waits (calls run in
        e = next(e for e in kept if e.bn not in done and before[e.bn] <= done)  # an order:
        ordered.append(e)  # a BN's output never reaches a BN called before it, no cycle)
        done.add(e.bn)
    return ordered, skipped


#: ops that sum branches, and those that may scale one (names as the walks record them)
_SUMS = frozenset({"add", "add_", "iadd", "radd", "sub", "sub_", "isub", "rsub"})
_LINEAR_OPS = _SUMS | {"mul", "mul_", "imul", "rmul"}


def _roots(value: Value | None, depth: int = 8) -> set[int]:
    """The values a linear chain ending at ``value`` starts from (through BN, conv, linear,
    sums and scales): the inputs a region around it could share."""
    if value is None:
        return set()
    prod = value.producer
    if depth == 0 or prod is None:
        return {value.index}
    if prod.kind in ("batchnorm", *_LINEAR_KINDS):
        return _roots(prod.data, depth - 1)
    if prod.kind == "op" and prod.name.strip("_") in _LINEAR_OPS:
        return set().union(*(_roots(v, depth - 1) for v in prod.inputs)) or {value.index}
    return {value.index}


def _region_seeds(graph: Graph, model: nn.Module, edits: list[FoldEdit], unplaced: list[str]):
    """The BNs worth looking for a region around (tracing blocks costs): those no placement
    took, without an activation of their own, whose input or output is a sum or a scale (or
    one beyond a pooling), and those folded into a layer whose sum with another branch
    starts from the layer's own input (RepVGG's conv branches)."""

    def sites(bn: str) -> list[Node]:
        return graph.bn_sites(model.get_submodule(bn))

    def linear_neighbour(site: Node) -> bool:
        """A sum or scale next to the BN, or beyond a pooling next to it."""
        after = [c for out in site.outputs for c in out.consumers]
        after += [c for n in after if n.name in POOLS for out in n.outputs for c in out.consumers]
        before = site.data.producer if site.data is not None else None
        if before is not None and before.name in POOLS and before.inputs:
            before = before.inputs[0].producer
        return any(
            n is not None and n.kind == "op" and n.name.strip("_") in _LINEAR_OPS
            for n in (*after, before)
        )

    def summed_with_a_sibling(site: Node) -> bool:
        own = _roots(site.data)
        for out in site.outputs:
            for c in out.consumers:
                if c.kind == "op" and c.name.strip("_") in _SUMS:
                    others = [v for v in c.inputs if v is not out]
                    if any(own & _roots(v) for v in others):
                        return True
        return False

    left = [  # (a norm-act layer's activation keeps it out of every region)
        bn
        for bn in unplaced
        if not has_activation(model.get_submodule(bn))
        and any(linear_neighbour(s) for s in sites(bn))
    ]
    summed = [
        e.bn
        for e in edits
        if e.placement == "producer"
        and not e.functional
        and any(summed_with_a_sibling(s) for s in sites(e.bn))
    ]
    return left, summed


def _regions(
    model: nn.Module,
    graph: Graph,
    chosen: list[tuple[str, nn.Module]],
    edits: list[FoldEdit],
    skipped: list[Skip],
    unplaced: list[str],
) -> tuple[list[FoldEdit], list[Skip]]:
    """Collapse the linear regions that hold BNs no placement took, or BNs summed with other
    branches (RepVGG's, each folding into its own conv, still leaves convs to add up): each
    BN of such a region (its own edit then goes) becomes a region edit; the BNs still left
    get the region's reason added to theirs. Region edits come first: the block is rewritten
    as it was planned, before other edits change its modules."""
    left, summed = _region_seeds(graph, model, edits, unplaced)
    if not left and not summed:
        return edits, skipped
    collapses, why = find_collapses(
        model, [*left, *summed], {name for name, _ in chosen}, set(summed)
    )
    regional: list[FoldEdit] = []
    for c in collapses:
        layers = {f"{c.block}.{p}" for s in c.sums for p in s.layers}
        bns = {f"{c.block}.{b}" for s in c.sums for b in s.bns}
        if any(p.into in layers | bns for e in edits if e.bn not in bns for p in e.targets()):
            for s in c.sums:
                for bn in s.bns:
                    why[f"{c.block}.{bn}"] = "a BN outside its region folds into it"
            continue
        for s in c.sums:
            regional += [
                FoldEdit(f"{c.block}.{bn}", f"{c.block}.{s.name}", "region", "conv", collapse=c)
                for bn in s.bns
            ]
    claimed = {e.bn for e in regional}
    skipped = [
        Skip(s.bn, f"{s.reason}; region: {why[s.bn]}" if s.bn in why else s.reason)
        for s in skipped
        if s.bn not in claimed
    ]
    return regional + [e for e in edits if e.bn not in claimed], skipped


def _same_call(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two ``F.batch_norm`` calls with the very same tensors and options."""
    return a.keys() == b.keys() and all(
        a[k] is b[k] if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def _functional(
    model: nn.Module,
    graph: Graph,
    owners: Owners,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    placements: Sequence[str],
) -> tuple[list[FoldEdit], list[Skip]]:
    """``F.batch_norm`` calls on running statistics a module holds, each named by its running
    mean's path, folded like a BN module's calls; the call stays, made an identity."""
    paths: dict[int, str] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        paths.setdefault(id(t), name)
    calls: dict[int, list[Node]] = {}
    for node in graph.nodes:
        args = node.attrs.get("batch_norm") if node.kind == "op" else None
        if args and isinstance(args.get("running_mean"), torch.Tensor):
            calls.setdefault(id(args["running_mean"]), []).append(node)
    edits: list[FoldEdit] = []
    skipped: list[Skip] = []
    for sites in calls.values():
        args = sites[0].attrs["batch_norm"]
        keys = ("running_mean", "running_var", "weight", "bias")
        tensors = [args.get(k) for k in keys]
        name = paths.get(id(tensors[0]))
        if name is None:
            continue  # statistics made during the forward pass: not a module's BN
        if (include and not any(matches(name, p) for p in patterns(include))) or any(
            matches(name, p) for p in patterns(exclude)
        ):
            skipped.append(Skip(name, NOT_SELECTED))
            continue
        try:
            if any(not _same_call(n.attrs["batch_norm"], args) for n in sites[1:]):
                raise _Reject("its F.batch_norm calls differ in tensors or options")
            if args.get("training"):
                raise _Reject("F.batch_norm with training=True normalises with batch statistics")
            if tensors[1] is None or any(t is not None and id(t) not in paths for t in tensors):
                raise _Reject("F.batch_norm reads statistics or affine tensors made at run time")
            for t in tensors:
                stray = [n for n in graph.uses(t) if n not in sites]
                if stray:
                    raise _Reject(f"its tensors are also read by {_describe(stray[0])}")
            stand_in = SimpleNamespace(num_features=int(tensors[0].numel()))
            owner = name.rpartition(".")[0]
            edit, why = _placed(model, graph, owners, stand_in, sites, owner, placements)
            if edit is None:
                raise _Reject(why)
            eps = 1e-5 if args.get("eps") is None else float(args["eps"])
            found = tuple(paths.get(id(t), "") if t is not None else "" for t in tensors)
            edits.append(dataclasses.replace(edit, bn=name, functional=found, eps=eps))
        except _Reject as why:
            skipped.append(Skip(name, f"F.batch_norm: {why}"))
    return edits, skipped
