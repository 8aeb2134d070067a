"""fold: merge BatchNorm into the layer before it (or, where exact, the layer after it).

Three steps, each usable alone:

1. :func:`plan_fold` walks the graph (:mod:`bnsurgery.graph`) and returns a :class:`FoldPlan`:
   which BN goes into which layer, and for every other BN the reason it is left.
2. :func:`apply_plan` rewrites the weights (float64 maths in :mod:`bnsurgery.foldmath`) and
   replaces each folded BN by an identity (:class:`~bnsurgery.norms.FoldedBatchNorm`, or the
   activation and drop of a timm norm-act layer), as one transaction that can be rolled back.
3. :func:`fold` does both, then verifies the output on the example inputs and rolls everything
   back if it moved beyond tolerance.

Conventions shared by every bnsurgery surgery: the model is changed **in place** and returned,
so ``bnsurgery.fold(model, x)`` works with or without reassignment; ``copy.deepcopy`` first to
keep the original. Folding always uses **eval semantics** (running statistics), also for a model
in train mode: the report says so in ``was_training`` and every module keeps its mode flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from . import foldmath, provenance
from .errors import UnsupportedModelError, VerificationError
from .graph import Graph, Node, Trace, Value, trace
from .hooks import carry_hooks, has_hooks, user_hooks, user_hooks_suspended
from .norms import bn_stats, check_finite, has_activation, is_batchnorm, num_features, remainder_of
from .report import fold_text
from .select import select_batchnorms
from .tree import as_args, eval_mode, on_unwrapped
from .verify import default_tolerance, max_relative_error, tensors_in

__all__ = [
    "FoldEdit",
    "FoldPlan",
    "FoldReport",
    "Skip",
    "apply_plan",
    "fold",
    "plan_fold",
]

_LINEAR_KINDS = ("conv", "conv_transpose", "linear")


@dataclass(frozen=True)
class FoldEdit:
    """One BN folded into one layer."""

    bn: str
    into: str
    placement: str  # "producer" (the layer before) or "consumer" (the layer after)
    layer: str  # "conv", "conv_transpose" or "linear"
    sites: int = 1
    adds_bias: bool = False
    keeps: str = ""  # what is left in the BN's place, e.g. "act=SiLU"
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Skip:
    """One BN left in place, and why."""

    bn: str
    reason: str


@dataclass
class FoldPlan:
    """What :func:`apply_plan` would do: edits, and skips with reasons. A plain value."""

    edits: list[FoldEdit]
    skipped: list[Skip]
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "edits": [asdict(e) for e in self.edits],
            "skipped": [asdict(s) for s in self.skipped],
        }


@dataclass
class FoldReport:
    """The outcome of :func:`fold`."""

    folded: list[FoldEdit]
    left: list[Skip]
    method: str
    bn_count: int
    verified: bool
    max_rel_error: float | None
    tolerance: float | None
    was_training: bool
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:  # a short table for people; to_dict() for scripts
        return fold_text(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bn_count": self.bn_count,
            "folded_count": len(self.folded),
            "method": self.method,
            "verified": self.verified,
            "max_rel_error": self.max_rel_error,
            "tolerance": self.tolerance,
            "was_training": self.was_training,
            "notes": list(self.notes),
            "folded": [asdict(e) for e in self.folded],
            "left": [asdict(s) for s in self.left],
        }


# ----------------------------------------------------------------------------- planning


class _Owners:
    """Which module attributes hold each parameter (a tied parameter has several)."""

    def __init__(self, model: nn.Module) -> None:
        self.by_id: dict[int, list[tuple[str, str]]] = {}
        for full, p in model.named_parameters(remove_duplicate=False):
            module_name, _, attr = full.rpartition(".")
            self.by_id.setdefault(id(p), []).append((module_name, attr))
        self.modules = dict(model.named_modules(remove_duplicate=False))

    def of(self, tensor: torch.Tensor | None) -> list[tuple[str, str]]:
        return self.by_id.get(id(tensor), []) if tensor is not None else []


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


def _layer_of(
    graph: Graph, owners: _Owners, layer_nodes: list[Node], allowed: set[int], role: str
) -> tuple[str, str, bool]:
    """Check that every call of the layer is one we fold; return (module, kind, adds_bias)."""
    first = layer_nodes[0]
    if any(n.weight is not first.weight or n.bias is not first.bias for n in layer_nodes):
        raise _Reject(f"its {role} layers differ between calls")
    weight_owners = owners.of(first.weight)
    if not weight_owners:
        raise _Reject(
            f"the weight of {first.name}() is computed at run time (for example weight "
            "standardisation), not a parameter"
        )
    if first.bias is not None and not owners.of(first.bias):
        raise _Reject(f"the bias of {first.name}() is computed at run time")
    for tensor in (first.weight, first.bias):
        others = [n for n in graph.uses(tensor) if id(n) not in allowed]
        if others:
            module = weight_owners[0][0] or "the model"
            raise _Reject(
                f"`{module}` is also used by {_describe(others[0])} (a layer called at "
                f"{len(graph.uses(tensor))} sites with different neighbours)"
            )
    module_name, attr = weight_owners[0]
    adds_bias = first.bias is None
    if adds_bias:
        module = owners.modules.get(module_name)
        if attr != "weight" or not isinstance(module, _ConvNd | nn.Linear):
            raise _Reject(f"{first.name}() has no bias parameter to absorb the BN's shift")
    if not first.weight.dtype.is_floating_point:
        raise _Reject(f"the weight of `{module_name}` is not floating point")
    return module_name, first.kind, adds_bias


#: Why a tensor that a data-dependent branch separates from its consumer does not fold: on
#: inputs that go the other way the walk never saw, it may go elsewhere.
_BRANCH = "a data-dependent Python branch (a tensor's truth value, .item(), .tolist())"


def _producer(graph: Graph, owners: _Owners, bn: nn.Module, sites: list[Node]) -> FoldEdit:
    producers: list[Node] = []
    notes: list[str] = []
    for site in sites:
        data: Value | None = site.data
        if data is None:
            raise _Reject("its input is not a tensor")
        prod = data.producer
        if prod is None:
            raise _Reject(f"its input is a {data.origin}")
        if prod.kind not in _LINEAR_KINDS:
            raise _Reject(f"its input comes from {_describe(prod)}, not from a conv or linear")
        others = [c for c in data.consumers if c is not site]
        if others:
            raise _Reject(f"the output of {prod.name}() is also used by {_describe(others[0])}")
        if data.is_output:
            raise _Reject(f"the output of {prod.name}() is also a model output")
        if site.decisions > data.decisions:
            raise _Reject(f"the output of {prod.name}() crosses {_BRANCH} before it")
        if prod.kind == "linear":
            if data.ndim is None:
                notes.append("linear output rank not checked (symbolic walk)")
            elif data.ndim != 2:
                raise _Reject(f"linear output has rank {data.ndim}; only (N, C) inputs fold")
        producers.append(prod)
    module_name, kind, adds_bias = _layer_of(
        graph, owners, producers, {id(n) for n in producers}, "producer"
    )
    groups = int(producers[0].attrs.get("groups", 1))
    channels = foldmath.out_channels(kind, producers[0].weight, groups)
    if channels != num_features(bn):
        raise _Reject(f"`{module_name}` has {channels} output channels, the BN {num_features(bn)}")
    keeps = ""
    if has_activation(bn):
        keeps = f"act={type(bn.act).__name__}, drop={type(getattr(bn, 'drop', None)).__name__}"
    return FoldEdit(
        "", module_name, "producer", kind, len(sites), adds_bias, keeps, tuple(dict.fromkeys(notes))
    )


def _through_copy_padding(value: Value) -> tuple[Node, Value]:
    """The single consumer of ``value`` and the value it reads, looking through an ``F.pad``
    that copies real values (reflect, replicate, circular): a per-channel affine map commutes
    with such padding, so a conv after it (padding nothing itself) can still absorb the BN."""
    node = value.consumers[0]
    if node.kind != "op" or node.name != "pad" or node.attrs.get("mode") == "constant":
        return node, value
    padded = node.outputs[0] if len(node.outputs) == 1 else None
    if padded is None or len(padded.consumers) != 1 or padded.is_output:
        return node, value
    after = padded.consumers[0]
    if after.kind == "conv" and after.data is padded and _is_zero_padding(after.attrs):
        return after, padded
    return node, value


def _consumer(graph: Graph, owners: _Owners, bn: nn.Module, sites: list[Node]) -> FoldEdit:
    if has_activation(bn):
        raise _Reject("an activation follows the norm inside the layer, so no layer after it can")
    consumers: list[Node] = []
    notes: list[str] = []
    for site in sites:
        if len(site.outputs) != 1:
            raise _Reject("its output is not a single tensor")
        out = site.outputs[0]
        if out.is_output:
            raise _Reject("its output is a model output")
        if len(out.consumers) != 1:
            users = ", ".join(_describe(c) for c in out.consumers[:3]) or "nothing"
            raise _Reject(f"its output goes to {users}, not to one conv or linear")
        cons, fed = _through_copy_padding(out)
        if cons.kind not in _LINEAR_KINDS or cons.data is not fed:
            raise _Reject(f"its output goes to {_describe(cons)}, not to a conv or linear")
        if cons.decisions > out.decisions:
            raise _Reject(f"its output crosses {_BRANCH} before {cons.name}()")
        if cons.kind == "conv_transpose":
            raise _Reject("a transposed conv after it cannot absorb it exactly")
        if cons.kind == "conv" and not _is_zero_padding(cons.attrs):
            raise _Reject(f"the conv after it pads with zeros ({cons.name}, not exact)")
        if cons.kind == "linear":
            if out.ndim is None:
                notes.append("linear input rank not checked (symbolic walk)")
            elif out.ndim != 2:
                raise _Reject(f"the linear after it sees rank {out.ndim}, not (N, C)")
        consumers.append(cons)
    module_name, kind, adds_bias = _layer_of(
        graph, owners, consumers, {id(n) for n in consumers}, "consumer"
    )
    groups = int(consumers[0].attrs.get("groups", 1))
    channels = foldmath.in_channels(kind, consumers[0].weight, groups)
    if channels != num_features(bn):
        raise _Reject(f"`{module_name}` has {channels} input channels, the BN {num_features(bn)}")
    return FoldEdit(
        "", module_name, "consumer", kind, len(sites), adds_bias, "", tuple(dict.fromkeys(notes))
    )


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
    if isinstance(getattr(bn, "running_mean", None), nn.parameter.UninitializedBuffer):
        return "an uninitialised lazy BN (run one forward pass first)"
    if bn_stats(bn) is None:
        return "track_running_stats=False: it normalises with batch statistics, not a fixed map"
    stray = [n for n in graph.uses(bn.running_mean) if n.kind != "batchnorm"]
    if stray:
        return f"its statistics are also read by {_describe(stray[0])} outside its own call"
    if not sites:
        return "not called in the forward pass"
    return None


@on_unwrapped
def plan_fold(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    placements: Sequence[str] = ("producer", "consumer"),
    walked: Trace | None = None,
) -> FoldPlan:
    """Plan a fold without changing anything.

    Args:
        model: the model.
        example_inputs: a tensor or tuple of positional inputs; with them the graph is walked on
            a real forward pass, without them symbolically (``torch.fx``).
        include, exclude: glob patterns on BN module names (see :func:`select_batchnorms`).
        placements: which placements to try, in order: ``"producer"``, ``"consumer"``.
        walked: an existing :class:`~bnsurgery.graph.Trace` to reuse.

    Returns:
        A :class:`FoldPlan` with one edit or one skip for every BN in the model.

    Raises:
        UsageError: a pattern selects nothing, or an unknown placement.
        TraceError: the model cannot be walked.
    """
    for p in placements:
        if p not in ("producer", "consumer"):
            from .errors import UsageError

            raise UsageError(f"unknown placement {p!r}; valid: producer, consumer")
    if walked is None:
        walked = trace(model, example_inputs)
    graph = walked.graph
    owners = _Owners(model)
    chosen = {id(m) for _, m in select_batchnorms(model, include, exclude)}
    edits: list[FoldEdit] = []
    skipped: list[Skip] = []
    for name, bn in model.named_modules():
        if not is_batchnorm(bn):
            continue
        if id(bn) not in chosen:
            skipped.append(Skip(name, "not selected"))
            continue
        if not name:
            skipped.append(Skip(name, "the model itself is a BN layer"))
            continue
        sites = graph.bn_sites(bn)
        reason = _why_not(bn, graph, sites)
        if reason:
            skipped.append(Skip(name, reason))
            continue
        reasons: list[str] = []
        for placement in placements:
            try:
                find = _producer if placement == "producer" else _consumer
                edit = find(graph, owners, bn, sites)
            except _Reject as why:
                reasons.append(f"{placement}: {why}")
                continue
            ends = (edit.into, name) if placement == "producer" else (name, edit.into)
            hooked = _hook_between(model, *ends)
            if hooked:
                reasons.append(f"{placement}: {hooked}, which folding would remove")
                continue
            edits.append(FoldEdit(name, *list(asdict(edit).values())[1:]))
            break
        else:
            skipped.append(Skip(name, "; ".join(reasons)))
    return FoldPlan(edits, skipped, graph.method)


# ----------------------------------------------------------------------------- applying


class _Transaction:
    """Attribute assignments that can be undone in reverse order."""

    def __init__(self) -> None:
        self.undo: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, attr: str, value: Any) -> None:
        self.undo.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def rollback(self) -> None:
        for obj, attr, old in reversed(self.undo):
            setattr(obj, attr, old)
        self.undo.clear()


def _param(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(dtype=like.dtype, device=like.device), like.requires_grad)


def _folded_weights(
    model: nn.Module, edit: FoldEdit, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[nn.Parameter, nn.Parameter]:
    """``edit``'s layer weight and bias with its BN folded in (float64 maths, cast back)."""
    stats = bn_stats(model.get_submodule(edit.bn))
    assert stats is not None  # planned edits only have BNs with statistics
    scale, shift = stats.scale_shift()
    layer = model.get_submodule(edit.into)
    maths = foldmath.fold_producer if edit.placement == "producer" else foldmath.fold_consumer
    new_w, new_b = maths(
        edit.layer,
        weight.detach().double().cpu(),
        None if bias is None else bias.detach().double().cpu(),
        scale,
        shift,
        int(getattr(layer, "groups", 1)),
    )
    return _param(new_w, weight), _param(new_b, weight if bias is None else bias)


def _apply_edit(
    model: nn.Module, edit: FoldEdit, txn: _Transaction, structure: list[dict[str, Any]]
) -> None:
    bn = model.get_submodule(edit.bn)
    layer = model.get_submodule(edit.into)
    weight: torch.Tensor = layer.weight
    bias: torch.Tensor | None = layer.bias
    new_w, new_b = _folded_weights(model, edit, weight, bias)
    owners = _Owners(model)
    for module_name, attr in owners.of(weight):
        txn.set(model.get_submodule(module_name), attr, new_w)
    if bias is None:
        txn.set(layer, "bias", new_b)
        structure.append({"add_bias": edit.into, "channels": int(new_b.numel())})
    else:
        for module_name, attr in owners.of(bias):
            txn.set(model.get_submodule(module_name), attr, new_b)
    replacement = carry_hooks(bn, remainder_of(bn))
    for parent, child_name, path in provenance.parents(model, bn):
        txn.set(parent, child_name, replacement)
        structure.append({"replace": path, "with": provenance.structure_kind(replacement)})


def _apply(model: nn.Module, plan: FoldPlan) -> tuple[_Transaction, list[dict[str, Any]]]:
    txn = _Transaction()
    structure: list[dict[str, Any]] = []
    try:
        for edit in plan.edits:
            _apply_edit(model, edit, txn, structure)
    except BaseException:
        txn.rollback()
        raise
    return txn, structure


def apply_plan(model: nn.Module, plan: FoldPlan) -> nn.Module:
    """Apply a :class:`FoldPlan` in place, without verification; return the model."""
    _, structure = _apply(model, plan)
    provenance.record_step(model, _step(plan), structure)
    return model


def _unit_changes(model: nn.Module, plan: FoldPlan, args: tuple[Any, ...]) -> dict[str, float]:
    """For each folded BN, how much its folded unit's output moved, each call recomputed on the
    very input it saw (largest relative change; ``inf`` where it cannot be recomputed).

    A unit is one conv or linear layer with the BN folded into it from before (consumer fold)
    and the one folded into it from after (producer fold), either or both: it turns
    ``bn_after(layer(bn_before(x)))`` into ``remainder(layer'(x))``. Recomputing each unit on
    its recorded input keeps data-dependent parts elsewhere in the model (proposal selection,
    NMS) and the network's amplification of rounding out of the comparison.

    One eval forward pass of the unfolded model, streamed: a hook keeps a unit's input only
    until the unit's output appears, and the folded weights of one layer exist only while
    that layer is recomputed. Memory stays at one activation and one layer beyond the forward
    pass itself, whatever the model's size. The model is not changed.
    """
    changes = {e.bn: math.inf for e in plan.edits}
    units: dict[str, list[FoldEdit]] = {}
    for e in plan.edits:  # plan order: the order _apply folds them in, so the same rounding
        units.setdefault(e.into, []).append(e)
    handles = []
    busy: list[bool] = []  # non-empty while a hook recomputes a layer
    results: list[tuple[list[FoldEdit], list[torch.Tensor], dict[str, Any]]] = []

    def watch(name: str, edits: list[FoldEdit]) -> None:
        layer = model.get_submodule(name)
        first = next((e for e in edits if e.placement == "consumer"), None)
        last = next((e for e in edits if e.placement == "producer"), None)
        entry = model.get_submodule(first.bn) if first else layer
        exit_ = model.get_submodule(last.bn) if last else layer
        after = remainder_of(exit_) if last else None  # what the fold leaves of that BN
        pending: list[torch.Tensor] = []
        state = {"worst": 0.0, "calls": 0, "broken": False}

        def enter(module: nn.Module, inputs: tuple) -> None:
            if busy:
                return
            if inputs and isinstance(inputs[0], torch.Tensor):
                pending.append(inputs[0].detach().clone())
            else:
                state["broken"] = True

        def leave(module: nn.Module, inputs: tuple, expected: Any) -> None:
            if busy:
                return
            if not pending or not isinstance(expected, torch.Tensor):
                state["broken"] = True
                return
            x = pending.pop(0)
            weight, bias = layer.weight, layer.bias
            for e in edits:
                weight, bias = _folded_weights(model, e, weight, bias)
            busy.append(True)  # the recomputation calls the layer: its hooks stand aside
            try:
                got = torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))
                if after is not None:
                    got = after(got)
            finally:
                busy.pop()
            state["worst"] = max(state["worst"], max_relative_error(expected, got))
            state["calls"] += 1

        handles.append(entry.register_forward_pre_hook(enter))
        handles.append(exit_.register_forward_hook(leave))
        results.append((edits, pending, state))

    with user_hooks_suspended(model):  # first: the hooks watch() registers are ours
        for name, edits in units.items():
            if isinstance(model.get_submodule(name), _ConvNd | nn.Linear):
                watch(name, edits)
        try:
            with eval_mode(model), torch.no_grad():
                model(*args)
        finally:
            for h in handles:
                h.remove()
    for edits, pending, state in results:
        if state["calls"] and not pending and not state["broken"]:
            for e in edits:
                changes[e.bn] = state["worst"]
    return changes


def _without(plan: FoldPlan, reasons: dict[str, str]) -> FoldPlan:
    """The plan with the edits of these BNs turned into skips with these reasons."""
    return FoldPlan(
        [e for e in plan.edits if e.bn not in reasons],
        [*plan.skipped, *(Skip(bn, why) for bn, why in reasons.items())],
        plan.method,
    )


def _step(plan: FoldPlan) -> dict[str, Any]:
    return {"op": "fold", "folded": len(plan.edits), "left": len(plan.skipped)}


def _verified(
    model: nn.Module,
    plan: FoldPlan,
    reference: Any,
    args: tuple[Any, ...],
    tol: float,
    leave_failing: bool,
    notes: list[str],
) -> tuple[FoldPlan, float, list[dict[str, Any]]]:
    """Apply ``plan`` and check the model's output against ``reference``.

    When the output moved beyond ``tol``, each folded unit is recomputed on its own input
    (:func:`_unit_changes`). Units that moved beyond ``tol`` themselves (in low precision, a BN
    whose statistics make the folded weights round badly) are left unfolded with the reason,
    when ``leave_failing``, and the rest is folded and checked again; otherwise the model is
    left unchanged and :class:`VerificationError` raised. When every unit is within ``tol``,
    the output moved because the network amplified rounding, or discrete post-processing (NMS,
    top-k) flipped on it: the fold stands, with a note.
    """
    for _ in range(4):
        txn, structure = _apply(model, plan)
        if not plan.edits:
            return plan, 0.0, structure
        try:
            with eval_mode(model), torch.no_grad(), user_hooks_suspended(model):
                error = max_relative_error(reference, model(*args))
        except BaseException:
            txn.rollback()
            raise
        if error <= tol:
            return plan, error, structure
        txn.rollback()
        changes = _unit_changes(model, plan, args)
        failing = {bn: moved for bn, moved in changes.items() if not moved <= tol}
        if not failing:
            _, structure = _apply(model, plan)
            worst = max(changes.values())
            notes.append(
                f"the final output moved by {error:.3g} (float rounding amplified by the "
                "network, or flipped by discrete post-processing such as NMS or top-k); every "
                f"folded layer, recomputed on the very input it saw, matches within {worst:.3g}"
            )
            return plan, worst, structure
        worst = max(failing.values())
        if not leave_failing:
            raise VerificationError(
                f"folding changed the output by {error:.3g} (max relative error, tolerance "
                f"{tol:.3g}; {worst:.3g} at the folded layers); the model was left unchanged"
            )
        dtype = _output_dtype(reference)
        plan = _without(
            plan,
            {
                bn: (
                    f"folding it moved its layer's output by {moved:.3g} in {dtype} (tolerance "
                    f"{tol:.3g}): its statistics round badly into the folded weights at this "
                    "precision"
                    if math.isfinite(moved)
                    else "the model's output moved and its folded layer is a functional call "
                    "that cannot be checked on its own"
                )
                for bn, moved in failing.items()
            },
        )
        notes.append(
            f"the output moved by {error:.3g} with every fold applied; {len(failing)} BN left "
            "unfolded because folding them moved their own layer's output beyond tolerance"
        )
    raise VerificationError(
        f"folding did not converge to a verified result (tolerance {tol:.3g}); the model was "
        "left unchanged"
    )


def _output_dtype(output: Any) -> str:
    dtypes = [t.dtype for t in tensors_in(output)]
    floats = [d for d in dtypes if d.is_floating_point]
    return str(floats[0]).replace("torch.", "") if floats else "its dtype"


@on_unwrapped
def fold(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    placements: Sequence[str] = ("producer", "consumer"),
    verify: bool = True,
    tolerance: float | None = None,
) -> nn.Module:
    """Fold BatchNorm layers into neighbouring conv / linear layers, in place.

    Each BN whose input comes only from a conv, transposed conv or linear layer (any groups,
    dilation, stride, padding mode, with or without bias) is folded into that layer; otherwise,
    if its output goes only to a linear layer or to a conv that never sees padded zeros, into
    that one. Every other BN is left, with a reason in the report. Arithmetic is float64, cast
    back to each layer's dtype.

    Args:
        model: the model, changed in place. Folding uses eval semantics whatever its mode.
        example_inputs: a tensor or tuple of positional inputs (dicts allowed inside). With them
            the graph is walked on a real forward pass and the result is verified; without, the
            walk is symbolic (``torch.fx``) and nothing is verified.
        include, exclude: glob patterns on BN names to restrict the fold.
        placements: placements to try, in order.
        verify: compare outputs before and after (needs ``example_inputs``).
        tolerance: allowed max relative error; default by output dtype (fp32: 1e-4).

    Memory: beyond the model and one forward pass, the new weights of the layers it folds
    into; the old ones are kept until the output is verified, so a failed fold is undone
    exactly. The layer-by-layer check (when the final output moved) streams: one activation
    and one layer more.

    Returns:
        The same model object, folded. :func:`bnsurgery.last_report` gives the :class:`FoldReport`.

    Raises:
        VerificationError: outputs moved beyond ``tolerance``; the model was left unchanged.
        StatisticsError: a BN to fold has NaN/infinite statistics; nothing was changed.
        TraceError: the model cannot be walked.
        UnsupportedModelError: TorchScript models.

    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    >>> m = fold(m, torch.randn(1, 3, 8, 8))
    >>> report = provenance.last_report(m)
    >>> type(m[1]).__name__, report.bn_count, len(report.folded)
    ('FoldedBatchNorm', 1, 1)
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError("TorchScript modules cannot be folded; fold the eager model")
    was_training = any(m.training for _, m in model.named_modules() if is_batchnorm(m))
    walked = trace(model, example_inputs)
    plan = plan_fold(model, include=include, exclude=exclude, placements=placements, walked=walked)
    check_finite(((e.bn, model.get_submodule(e.bn)) for e in plan.edits), "fold")
    notes = []
    if was_training:
        notes.append("model was in train mode: folded with eval semantics (running statistics)")
    error: float | None = None
    tol: float | None = None
    checked = verify and example_inputs is not None and bool(plan.edits)
    if checked:
        tol = default_tolerance(walked.output) if tolerance is None else tolerance
        plan, error, structure = _verified(
            model, plan, walked.output, as_args(example_inputs), tol, tolerance is None, notes
        )
    else:
        _, structure = _apply(model, plan)
        if plan.edits and example_inputs is None:
            notes.append("not verified: no example inputs")
    hooked = [e.bn for e in plan.edits if has_hooks(model.get_submodule(e.bn))]
    if hooked:
        notes.append(
            f"hooks of {', '.join(hooked)} fire on the module that replaced each BN, on the "
            "same outer tensor (its output, for a BN folded into the layer before; its input, "
            "for one folded into the layer after); the other argument is the folded value"
        )
    if plan.edits and callable(getattr(model, "fuse_model", None)):
        notes.append(
            "this model's own fuse_model() (torchvision's quantizable models) fuses conv, BN and "
            "ReLU by module type and refuses a folded BN: call it instead of fold, not after"
        )
    report = FoldReport(
        folded=plan.edits,
        left=plan.skipped,
        method=plan.method,
        bn_count=len(plan.edits) + len(plan.skipped),
        verified=checked,
        max_rel_error=error,
        tolerance=tol,
        was_training=was_training,
        notes=notes,
    )
    provenance.set_report(model, report)
    step = {**_step(plan), "verified": checked, "max_rel_error": error}
    provenance.record_step(model, step, structure)
    return model
