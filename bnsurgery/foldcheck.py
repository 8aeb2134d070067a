"""Checking a fold layer by layer: each folded unit recomputed on the very input it saw.

When a folded model's output moves beyond tolerance, :func:`unit_changes` tells a fold that is
wrong at some layer from rounding the network amplified (or discrete post-processing, NMS and
top-k, flipping on it), without keeping more than one activation and one layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from .batches import map_tensors
from .foldedit import FoldEdit, FoldPart, FoldPlan, replay, weight_norm_g
from .hooks import user_hooks_suspended
from .norms import is_batchnorm
from .regions import Collapse
from .targets import remainder_of
from .tree import eval_mode
from .verify import max_relative_error

__all__ = ["unit_changes"]


def unit_changes(model: nn.Module, plan: FoldPlan, args: tuple[Any, ...]) -> dict[str, float]:
    """For each folded BN, how much its folded unit's output moved, each call recomputed on the
    very input it saw (largest relative change; ``inf`` where it cannot be recomputed).

    A unit is one conv or linear layer with the BN folded into it from before (consumer fold)
    and the one folded into it from after (producer fold), either or both: it turns
    ``bn_after(layer(bn_before(x)))`` into ``remainder(layer'(x))`` (the layer may be a BN
    that absorbs the one before it in its weight and bias; a BN written as an
    ``F.batch_norm`` call is seen at that call; a weight-normed layer is run with its ``g``
    scaled, as the fold leaves it; a BN folded into several layers after it counts the worst
    of them); or the layers whose outputs a concatenation joins before a BN, each with its
    slice; or a block whose linear regions collapse, rewritten and run on its input.
    Recomputing each unit on its recorded input keeps data-dependent parts elsewhere in the
    model (proposal selection, NMS) and the network's amplification of rounding out of the
    comparison.

    One eval forward pass of the unfolded model, streamed: a hook keeps a unit's input only
    until the unit's output appears, and the folded weights of one layer exist only while
    that layer is recomputed. Memory stays at one activation and one layer beyond the forward
    pass itself, whatever the model's size. The model is not changed.
    """
    changes = {e.bn: math.inf for e in plan.edits}
    units: dict[str, list[tuple[FoldEdit, FoldPart]]] = {}
    joined = [e for e in plan.edits if e.parts and e.placement == "producer"]
    for e in plan.edits:  # plan order: the order _apply folds them in, so the same rounding
        if not (e in joined or e.collapse):
            for part in e.targets():
                units.setdefault(part.into, []).append((e, part))
    handles = []
    busy: list[bool] = []  # non-empty while a hook recomputes a layer
    results: list[tuple[list[FoldEdit], list[torch.Tensor], dict[str, Any]]] = []
    calls: dict[int, list[Callable[[torch.Tensor, torch.Tensor], None]]] = {}  # F.batch_norm

    def watch(name: str, folds: list[tuple[FoldEdit, FoldPart]]) -> None:
        """One layer with the BN before it (consumer) and the one after it (producer) folded
        in, from the input of the first to the output of the last: a BN module's hooks, the
        layer's, or (for an ``F.batch_norm`` call) the call seen by :class:`_Calls`."""
        layer = model.get_submodule(name)
        edits = [e for e, _ in folds]
        first = next((f for f in folds if f[0].placement == "consumer"), None)
        last = next((f for f in folds if f[0].placement == "producer"), None)
        after = None  # what the fold leaves of the BN after the layer (F.batch_norm: nothing)
        if last and not last[0].functional:
            after = remainder_of(model.get_submodule(last[0].bn))
        pending: list[torch.Tensor] = []
        state = {"worst": 0.0, "calls": 0, "broken": False}

        def enter(x: Any) -> None:
            if busy:
                return
            if isinstance(x, torch.Tensor):
                pending.append(x.detach().clone())
            else:
                state["broken"] = True

        def leave(expected: Any) -> None:
            if busy:
                return
            if not pending or not isinstance(expected, torch.Tensor):
                state["broken"] = True
                return
            x = pending.pop(0)
            weight, bias = layer.weight, layer.bias
            for e, part in folds:
                weight, bias = e.weights(model, weight, bias, part)
            params = {"weight": weight, "bias": bias}
            if last and last[0].scales == "weight_norm":  # as applied: g scaled, norm kept
                path, g = weight_norm_g(layer)
                params = {path: last[0].scaled_g(model, g), "bias": bias}
            busy.append(True)  # the recomputation calls the layer: its hooks stand aside
            try:
                x = replay(x, first[1].through if first else ())  # from the BN to the layer
                got = torch.func.functional_call(layer, params, (x,))
                got = replay(got, last[1].through if last else ())  # from the layer to the BN
                if after is not None:
                    got = after(got)
            finally:
                busy.pop()
            state["worst"] = max(state["worst"], max_relative_error(expected, got))
            state["calls"] += 1

        def seen(edit: FoldEdit, use: Callable[[Any], None], side: int) -> None:
            """``use`` the input (``side`` 0) or output (1) of the edit's BN."""
            if edit.functional:
                key = id(edit.holder(model).running_mean)
                calls.setdefault(key, []).append(lambda i, o: use((i, o)[side]))
            elif side == 0:
                module = model.get_submodule(edit.bn)
                handles.append(module.register_forward_pre_hook(lambda m, a: use(_first(a))))
            else:
                module = model.get_submodule(edit.bn)
                handles.append(module.register_forward_hook(lambda m, a, out: use(out)))

        if first:
            seen(first[0], enter, 0)
        else:
            handles.append(layer.register_forward_pre_hook(lambda m, a: enter(_first(a))))
        if last:
            seen(last[0], leave, 1)
        else:
            handles.append(layer.register_forward_hook(lambda m, a, out: leave(out)))
        results.append((edits, pending, state))

    def watch_joined(edit: FoldEdit) -> None:
        """A BN after a concatenation: its layers recomputed with their slices folded in,
        joined, against the BN's output."""
        layers = [model.get_submodule(p.into) for p in edit.parts]
        seen: list[list[torch.Tensor]] = [[] for _ in layers]
        state = {"worst": 0.0, "calls": 0, "broken": False}
        after = remainder_of(model.get_submodule(edit.bn))

        def enter(i: int):
            def hook(module: nn.Module, inputs: tuple) -> None:
                if not busy and inputs and isinstance(inputs[0], torch.Tensor):
                    seen[i].append(inputs[0].detach().clone())
                elif not busy:
                    state["broken"] = True

            return hook

        def leave(module: nn.Module, inputs: tuple, expected: Any) -> None:
            if busy:
                return
            if not all(seen) or not isinstance(expected, torch.Tensor):
                state["broken"] = True
                return
            busy.append(True)
            try:
                pieces = []
                for part, layer, xs in zip(edit.parts, layers, seen, strict=True):
                    weight, bias = edit.weights(model, layer.weight, layer.bias, part)
                    pieces.append(
                        torch.func.functional_call(
                            layer, {"weight": weight, "bias": bias}, xs.pop(0)
                        )
                    )
                got = after(torch.cat(pieces, 1))
            finally:
                busy.pop()
            state["worst"] = max(state["worst"], max_relative_error(expected, got))
            state["calls"] += 1

        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(enter(i)))
        handles.append(model.get_submodule(edit.bn).register_forward_hook(leave))
        results.append(([edit], seen[0] if seen else [], state))

    def watch_block(collapse: Collapse, edits: list[FoldEdit]) -> None:
        """A block whose linear regions collapse: rewritten on the spot (one block's weights
        at a time) and run on the very input the block saw, against its output."""
        block = model.get_submodule(collapse.block)
        pending: list[tuple[tuple, dict]] = []
        state = {"worst": 0.0, "calls": 0, "broken": False}

        def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not busy:
                pending.append(map_tensors((args, kwargs), lambda t: t.detach().clone()))

        def leave(module: nn.Module, args: tuple, kwargs: dict, expected: Any) -> None:
            if busy:
                return
            if not pending:
                state["broken"] = True
                return
            saved_args, saved_kwargs = pending.pop(0)
            busy.append(True)
            try:
                got = collapse.rewritten(block)(*saved_args, **saved_kwargs)
            finally:
                busy.pop()
            state["worst"] = max(state["worst"], max_relative_error(expected, got))
            state["calls"] += 1

        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(block.register_forward_hook(leave, with_kwargs=True))
        results.append((edits, pending, state))

    with user_hooks_suspended(model):  # first: the hooks watch() registers are ours
        for name, folds in units.items():
            layer = model.get_submodule(name)
            if isinstance(layer, _ConvNd | nn.Linear) or is_batchnorm(layer):  # a BN after a BN
                watch(name, folds)
        shared = set(units)
        for edit in joined:
            layers = [model.get_submodule(p.into) for p in edit.parts]
            if shared.isdisjoint(p.into for p in edit.parts) and all(
                isinstance(m, _ConvNd | nn.Linear) for m in layers
            ):
                watch_joined(edit)
        collapsed: dict[str, list[FoldEdit]] = {}
        for e in plan.edits:
            if e.collapse is not None:
                collapsed.setdefault(e.collapse.block, []).append(e)
        for edits in collapsed.values():
            watch_block(edits[0].collapse, edits)
        try:
            watching = _Calls(calls, busy) if calls else contextlib.nullcontext()
            with eval_mode(model), torch.no_grad(), watching:  # the mode costs every op
                model(*args)
        finally:
            for h in handles:
                h.remove()
    measured: dict[str, float] = {}  # a BN folded into several layers: the worst of them
    for edits, pending, state in results:
        seen = bool(state["calls"]) and not pending and not state["broken"]
        for e in edits:
            measured[e.bn] = max(measured.get(e.bn, 0.0), state["worst"] if seen else math.inf)
    changes.update(measured)
    return changes


def _first(inputs: tuple) -> Any:
    return inputs[0] if inputs else None


class _Calls(TorchFunctionMode):
    """Shows each ``F.batch_norm`` call on watched running statistics (by the running mean's
    id) to its watchers, as ``(input, output)``, unless a recomputation is under way."""

    def __init__(self, calls: dict[int, list[Callable]], busy: list[bool]) -> None:
        super().__init__()
        self.calls, self.busy = calls, busy

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.batch_norm and self.calls and not self.busy:
            mean = args[1] if len(args) > 1 else kwargs.get("running_mean")
            for watcher in self.calls.get(id(mean), ()):
                watcher(args[0] if args else kwargs.get("input"), out)
        return out
