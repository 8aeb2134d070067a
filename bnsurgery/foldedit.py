"""A fold's edits: one BN folded into one layer (or several, or a collapsed region), as a
value that applies itself inside a :class:`~bnsurgery.plan.Transaction`.

:class:`FoldEdit` says what :func:`~bnsurgery.foldplan.plan_fold` decided for one BN; its
:meth:`~FoldEdit.weights` are the layer's new weights (float64 maths in
:mod:`bnsurgery.foldmath`), its :meth:`~FoldEdit.apply` writes them, adds a zero bias where the
layer has none, and puts the BN's remainder in its place (or rewrites a block whose linear
regions collapse, or makes an ``F.batch_norm`` call an identity). :class:`FoldPlan` is the plan
of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from . import foldmath
from .hooks import carry_hooks
from .norms import BNStats, bn_stats, stats_of
from .plan import Plan, Skip, Transaction
from .regions import COLLAPSED, Collapse
from .targets import remainder_of
from .tree import parents

__all__ = [
    "FoldEdit",
    "FoldPart",
    "FoldPlan",
    "Owners",
    "fold_step",
    "identity_value",
    "replay",
    "tensor_at",
    "weight_norm_g",
]


@dataclass(frozen=True)
class FoldPart:
    """One of several layers a BN folds into: the layer that absorbs channels ``start:stop``
    of a BN whose input is a concatenation of several layers' outputs (producer), or one of
    the layers that read a BN's output (consumer: every channel), each through its own
    layout ops (``through``, as :attr:`FoldEdit.through`)."""

    into: str
    layer: str  # "conv", "conv_transpose", "linear", or "batchnorm" (a consumer's BN)
    start: int
    stop: int
    adds_bias: bool = False
    through: tuple[tuple[str, tuple[Any, ...], tuple[tuple[str, Any], ...]], ...] = ()


@dataclass(frozen=True)
class FoldEdit:
    """One BN folded into one layer, or (``parts``) into the layers whose outputs a
    concatenation joins, each its own slice of the BN's channels."""

    bn: str
    into: str
    placement: str  # "producer" (the layer before) or "consumer" (the layer after)
    layer: str  # "conv", "conv_transpose" or "linear"
    sites: int = 1
    adds_bias: bool = False
    keeps: str = ""  # what is left in the BN's place, e.g. "act=SiLU"
    notes: tuple[str, ...] = ()
    #: layout ops between the layer and the BN, in the order they run, as (name, args,
    #: keyword items), e.g. (("flatten", (0, 1), ()),): they move the channel axis to where
    #: the BN reads it
    through: tuple[tuple[str, tuple[Any, ...], tuple[tuple[str, Any], ...]], ...] = ()
    #: for a BN after a concatenation: the layer each slice of its channels folds into; for
    #: a BN whose output several layers read: each of them (``into`` then names them all)
    parts: tuple[FoldPart, ...] = ()
    #: for a BN in a linear region of its block (``placement == "region"``): every region of
    #: that block, collapsed together (``into`` names the region's new conv)
    collapse: Collapse | None = None
    #: ``"weight_norm"``: the layer's weight is weight norm's ``g * v / |v|`` and the fold
    #: scales ``g`` (the parametrisation stays)
    scales: str = ""
    #: for an ``F.batch_norm`` call on tensors a module holds (``bn`` is its running mean's
    #: path): the paths of its running mean, running variance, weight and bias ("" for none),
    #: and its eps; the fold makes the call an identity
    functional: tuple[str, str, str, str] = ()
    eps: float = 0.0

    def __str__(self) -> str:
        if self.collapse is not None:
            region = next(s for s in self.collapse.sums if self.into.endswith("." + s.name))
            k = "x".join(map(str, region.conv.kernel))
            merged = ", ".join(f"`{p}`" for p in (*region.layers, *region.bns))
            if region.pools:
                merged += f", {region.pools} average pooling{'s' if region.pools > 1 else ''}"
            return (
                f"-> collapsed into {self.into} (region: {region.branches} branches, {merged} "
                f"into one {k} conv, groups {region.conv.groups})"
            )
        details = [self.placement, self.layer]
        if self.parts and self.placement == "consumer":
            each = (
                p.into
                + (" (a BN, in its weight and bias)" if p.layer == "batchnorm" else "")
                + (f" through {_ops(p.through)}" if p.through else "")
                for p in self.parts
            )
            head = f"-> into each of {', '.join(each)}"
        elif self.parts:
            slices = ", ".join(f"[{p.start}:{p.stop}] {p.into}" for p in self.parts)
            head = f"-> per slice after cat() into {slices}"
        else:
            head = f"-> into {self.into}"
            details += [f"through {_ops(self.through)}"] if self.through else []
            details += ["into its weight norm's g"] if self.scales else []
            details += ["F.batch_norm left as an identity"] if self.functional else []
        if self.adds_bias:
            added = sum(p.adds_bias for p in self.parts)
            details.append(f"bias added to {added}" if self.parts else "bias added")
        details += [f"kept {self.keeps}"] if self.keeps else []
        details += [f"{self.sites} call sites"] if self.sites > 1 else []
        return f"{head} ({', '.join(details)})" + (
            "; " + "; ".join(self.notes) if self.notes else ""
        )

    def indirect(self) -> str | None:
        """Why the BN does not read its layer's whole output directly at one call site (what
        a layer computing the BN at run time, or a BN normalising that output in place,
        needs), or ``None`` when it does."""
        if self.sites != 1:
            return f"it is called at {self.sites} sites"
        if self.through or self.parts or self.collapse is not None or self.functional:
            return "it reads its layer's output through layout ops or in slices"
        return None

    def targets(self) -> tuple[FoldPart, ...]:
        """Every layer this BN folds into, with its slice of the BN's channels."""
        if self.parts:
            return self.parts
        return (FoldPart(self.into, self.layer, 0, -1, self.adds_bias, self.through),)

    def holder(self, model: nn.Module) -> Any:
        """What holds the BN's tensors as ``running_mean``, ``running_var``, ``weight`` and
        ``bias``: the BN module, or for an ``F.batch_norm`` call a namespace of its tensors."""
        if not self.functional:
            return model.get_submodule(self.bn)
        keys = ("running_mean", "running_var", "weight", "bias")
        return SimpleNamespace(
            **{k: tensor_at(model, p) for k, p in zip(keys, self.functional, strict=True)}
        )

    def stats(self, model: nn.Module) -> BNStats | None:
        """The BN's eval-mode function (of an ``F.batch_norm`` call: from its tensors)."""
        if not self.functional:
            return bn_stats(model.get_submodule(self.bn))
        mean, var, weight, bias = (tensor_at(model, p) for p in self.functional)
        assert mean is not None and var is not None  # plans hold calls with statistics
        return stats_of(mean, var, weight, bias, self.eps)

    def weights(
        self,
        model: nn.Module,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        part: FoldPart | None = None,
    ) -> tuple[nn.Parameter, nn.Parameter]:
        """The layer's ``weight`` and ``bias`` with this BN (its ``part`` slice, for a BN
        after a concatenation) folded in (float64 maths, cast back to each tensor's dtype and
        device)."""
        stats = self.stats(model)
        if stats is None:  # plans only hold BNs with statistics
            raise ValueError(f"{self.bn} has no running statistics to fold")
        scale, shift = stats.scale_shift()
        part = part or self.targets()[0]
        if part.stop >= 0:
            scale, shift = scale[part.start : part.stop], shift[part.start : part.stop]
        layer = model.get_submodule(part.into)
        if part.layer == "batchnorm":  # a BN after this one absorbs it in its affine map
            after = bn_stats(layer)
            assert after is not None and bias is not None  # plans hold affine BNs with stats
            new_w, new_b = foldmath.fold_into_norm(
                weight.detach().double().cpu(),
                bias.detach().double().cpu(),
                after.mean,
                after.var,
                after.eps,
                scale,
                shift,
            )
            return _param(new_w, weight), _param(new_b, bias)
        maths = foldmath.fold_producer if self.placement == "producer" else foldmath.fold_consumer
        new_w, new_b = maths(
            part.layer,
            weight.detach().double().cpu(),
            None if bias is None else bias.detach().double().cpu(),
            scale,
            shift,
            int(getattr(layer, "groups", 1)),
        )
        return _param(new_w, weight), _param(new_b, weight if bias is None else bias)

    def scaled_g(self, model: nn.Module, g: torch.Tensor) -> nn.Parameter:
        """Weight norm's ``g`` with the BN's scale folded in (``scales == "weight_norm"``)."""
        stats = self.stats(model)  # a BN module's, or an F.batch_norm call's
        assert stats is not None  # plans only hold BNs with statistics
        scale = stats.scale_shift()[0].view(-1, *[1] * (g.dim() - 1))
        return _param(g.detach().double().cpu() * scale, g)

    def apply(self, model: nn.Module, txn: Transaction) -> None:
        """Fold: new weights into every attribute that holds the layer's (tied ones too), a
        zero bias first where the layer has none, and the BN's remainder in its place. A
        region's BN: its block rewritten with every region as one conv (once per block)."""
        if self.collapse is not None:
            block = model.get_submodule(self.collapse.block)
            if not getattr(block, COLLAPSED, False):
                new = carry_hooks(block, self.collapse.rewritten(block))
                for parent, child, _ in parents(model, block):
                    txn.set(parent, child, new)
                txn.add_record(self.collapse.record())
            return
        bn = model.get_submodule(self.bn) if not self.functional else None
        owners = Owners(model)
        for part in self.targets():
            layer = model.get_submodule(part.into)
            weight: torch.Tensor = layer.weight
            bias: torch.Tensor | None = layer.bias
            new_w, new_b = self.weights(model, weight, bias, part)
            if self.scales == "weight_norm":  # g * s: weight norm then makes W * s
                weight = weight_norm_g(layer)[1]
                new_w = self.scaled_g(model, weight)
            for module_name, attr in owners.of(weight):
                txn.set(model.get_submodule(module_name), attr, new_w)
            if bias is None:
                txn.set(layer, "bias", new_b)
                txn.add_record({"add_bias": part.into, "channels": int(new_b.numel())})
            else:
                for module_name, attr in owners.of(bias):
                    txn.set(model.get_submodule(module_name), attr, new_b)
        if self.functional:  # the call stays, as an identity: mean 0, variance 1 - eps, ...
            for path, value in zip(self.functional, _IDENTITY, strict=True):
                tensor = tensor_at(model, path)
                if tensor is not None:
                    txn.copy(tensor, identity_value(tensor, value, self.eps))
            return
        txn.replace(bn, carry_hooks(bn, remainder_of(bn)), {"with": "identity"})


@dataclass
class FoldPlan(Plan):
    """A :class:`~bnsurgery.plan.Plan` of :class:`FoldEdit` s; ``method`` says how the graph
    was walked (``"runtime"`` or ``"symbolic"``)."""

    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **super().to_dict()}

    def without(self, reasons: Mapping[str, str]) -> FoldPlan:
        """As :meth:`Plan.without`, with the recorded step's counts of folded and left BN; a
        BN left from a collapsed block leaves every BN of that block's regions."""
        reasons = dict(reasons)
        blocks = {e.collapse.block: e.bn for e in self.edits if e.collapse and e.bn in reasons}
        for e in self.edits:
            if e.collapse and e.collapse.block in blocks and e.bn not in reasons:
                reasons[e.bn] = f"its region's block is left with {blocks[e.collapse.block]}"
        plan = super().without(reasons)
        return dataclasses.replace(plan, step=fold_step(plan.edits, plan.skipped))


def fold_step(edits: list[FoldEdit], skipped: list[Skip]) -> dict[str, Any]:
    return {"op": "fold", "folded": len(edits), "left": len(skipped)}


#: the values that make ``F.batch_norm`` an identity: mean, variance (see
#: :func:`identity_value`), weight, bias
_IDENTITY = (0.0, None, 1.0, 0.0)


def identity_value(tensor: torch.Tensor, value: float | None, eps: float) -> torch.Tensor:
    """``value`` everywhere; for the variance (``None``) the largest ``v <= 1 - eps`` in the
    tensor's dtype with ``v + eps == 1`` exactly there, so ``1 / sqrt(v + eps)`` is 1."""
    if value is not None:
        return torch.full_like(tensor, value)
    one = torch.ones((), dtype=tensor.dtype)
    v = (one - eps).to(tensor.dtype)
    for _ in range(64):
        if (v + eps).to(tensor.dtype) == one:
            break
        v = torch.nextafter(v, one if (v + eps) < one else -one)
    return torch.full_like(tensor, float(v))


def tensor_at(model: nn.Module, path: str) -> torch.Tensor | None:
    if not path:
        return None
    owner, _, attr = path.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _ops(through: tuple[tuple[str, tuple, tuple], ...]) -> str:
    return ", ".join(op + "()" for op, _, _ in through)


def replay(x: torch.Tensor, through: tuple[tuple[str, tuple, tuple], ...]) -> torch.Tensor:
    """Run the recorded layout and pooling ops of a :class:`FoldEdit` on ``x``."""
    for op, args, kwargs in through:
        fn = getattr(torch.Tensor, op, None) or getattr(torch.nn.functional, op)
        x = fn(x, *args, **dict(kwargs))
    return x


def weight_norm_g(layer: nn.Module) -> tuple[str, torch.Tensor]:
    """Weight norm's ``g`` of a layer (either PyTorch API) and its path in the layer."""
    plist = getattr(getattr(layer, "parametrizations", None), "weight", None)
    if plist is not None:
        return "parametrizations.weight.original0", plist.original0
    return "weight_g", layer.weight_g


def _param(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(dtype=like.dtype, device=like.device), like.requires_grad)


class Owners:
    """Which module attributes hold each parameter (a tied parameter has several)."""

    def __init__(self, model: nn.Module) -> None:
        self.by_id: dict[int, list[tuple[str, str]]] = {}
        for full, p in model.named_parameters(remove_duplicate=False):
            module_name, _, attr = full.rpartition(".")
            self.by_id.setdefault(id(p), []).append((module_name, attr))
        self.modules = dict(model.named_modules(remove_duplicate=False))

    def of(self, tensor: torch.Tensor | None) -> list[tuple[str, str]]:
        return self.by_id.get(id(tensor), []) if tensor is not None else []
