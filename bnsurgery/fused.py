"""A frozen BN computed inside the conv or linear layer before it (``freeze(fuse=True)``).

A frozen BN is a fixed per-channel map, ``y = x * s + t`` with ``s = weight / sqrt(var + eps)``
and ``t = bias - mean * s``. After a conv or linear layer it can run as part of that layer: the
layer computes with weights ``W * s`` and bias ``b * s + t``, made on the fly at every call from
the tensors as they are now (so a trainable BN affine, ``train_affine=True``, still learns, and
the layer's own weights get the gradients they would get through the BN). The layer's
unnormalised output is then never made, and never kept for the backward pass: that is the
memory fused freezing saves (PyTorch does the same inside ``torch.compile``, "efficient
conv-BN eval"; this works in eager mode).

Nothing is added to the model: the layer keeps its class's forward signature and its tensors,
it only becomes the ``Fused`` subclass of its class (``isinstance(layer, nn.Conv2d)`` stays
true), holding the frozen BN as a plain attribute; the frozen BN stays where it was, under its
names, and passes its input through (a timm norm-act layer's activation still runs there).
State-dict keys and values are those of a plain freeze, so a fused model saves, loads and
unfreezes like any frozen one; :func:`unfuse` puts the layer's class back.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .frozen import FrozenBatchNorm

__all__ = [
    "FusedConv1d",
    "FusedConv2d",
    "FusedConv3d",
    "FusedLinear",
    "fuse",
    "fused_class",
    "fused_into",
    "on_unfused",
    "refuses",
    "unfuse",
    "unfused",
]


class _Fused:
    """What the fused classes share: the frozen BN's map folded into the weights per call."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    fused_bn: FrozenBatchNorm  # set by fuse(); an attribute, not a registered submodule

    def __reduce_ex__(self, protocol: Any) -> Any:
        # by the class it fused, so a fused class made at run time pickles; the state (with
        # the link to its BN, which links back) comes after the object, so cycles are fine
        return _new_fused, (self.__dict__["_unfused_class"],), self.__getstate__()

    def fused_call(self, run: Callable[..., torch.Tensor], input: torch.Tensor) -> torch.Tensor:
        """``run(input, weight, bias)`` with the weight and bias scaled by the frozen BN's map;
        when autograd would keep the scaled weight for the backward pass (a copy of the
        layer's weight), it keeps the weight and scale instead and scales again there."""
        scale, shift = self.fused_bn._scale_shift(self.weight.dtype)
        shape = (-1, *[1] * (self.weight.dim() - 1))
        weight = self.weight * scale.view(shape)
        bias = shift if self.bias is None else torch.addcmul(shift, self.bias, scale)
        if not (torch.is_grad_enabled() and weight.requires_grad) or torch.compiler.is_compiling():
            return run(input, weight, bias)
        original, scale = self.weight.detach(), scale.detach()
        key = (weight.data_ptr(), weight.shape, weight.dtype)
        # hooks of the caller's (activation offloading, checkpointing, memory counters) still
        # see everything else autograd keeps: these hooks hide theirs while they are active
        outer_pack, outer_unpack = _saved_tensors_hooks() or (_same, _same)

        def pack(t: torch.Tensor) -> Any:
            if (t.data_ptr(), t.shape, t.dtype) == key:
                return _Rescale(original, scale, shape)
            return outer_pack(t)

        def unpack(saved: Any) -> torch.Tensor:
            return saved.make() if isinstance(saved, _Rescale) else outer_unpack(saved)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return run(input, weight, bias)


def _same(value: Any) -> Any:
    return value


def _saved_tensors_hooks() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """The ``saved_tensors_hooks`` in effect (pack, unpack), or None."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


class _Rescale:
    """A scaled weight autograd would have kept, as its recipe: made again when read."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.weight, self.scale, self.shape = weight, scale, shape

    def make(self) -> torch.Tensor:
        return self.weight * self.scale.view(self.shape)


def _conv_forward(self: Any, input: torch.Tensor) -> torch.Tensor:
    return self.fused_call(self._conv_forward, input)


def _linear_forward(self: Any, input: torch.Tensor) -> torch.Tensor:
    return self.fused_call(F.linear, input)


#: the layers that fuse: these, and subclasses that keep their forward (torchvision's
#: ``Conv3DSimple``); a subclass with a forward of its own is refused (timm's ``Conv2dSame``
#: pads first, ``StdConv2d`` standardises its weight)
_BASES: dict[type[nn.Module], Any] = {
    nn.Conv1d: _conv_forward,
    nn.Conv2d: _conv_forward,
    nn.Conv3d: _conv_forward,
    nn.Linear: _linear_forward,
}
_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _base(cls: type[nn.Module]) -> type[nn.Module] | None:
    """The fusable class ``cls`` is, or inherits its forward from unchanged; else None."""
    for base in _BASES:
        if issubclass(cls, base):
            same = cls.forward is base.forward
            if base is not nn.Linear:
                same = same and cls._conv_forward is base._conv_forward  # type: ignore[attr-defined]
            return base if same else None
    return None


def fused_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``cls`` that computes a frozen BN inside (one per class, made once):
    ``isinstance`` with ``cls`` holds, and its instances pickle and copy (as ``cls`` with the
    link, rebuilt on load)."""
    if cls not in _CLASSES:
        base = _base(cls)
        assert base is not None, cls
        name = f"Fused{cls.__name__}"
        _CLASSES[cls] = type(
            name,
            (_Fused, cls),
            {"forward": _BASES[base], "__module__": __name__, "__qualname__": name},
        )
    return _CLASSES[cls]


def _new_fused(cls: type[nn.Module]) -> nn.Module:
    """Unpickling and deep copying: an empty instance of ``cls``'s fused class (the state,
    the link to the BN included, follows)."""
    obj = cls.__new__(cls)
    obj.__class__ = fused_class(cls)
    return obj


FusedConv1d = fused_class(nn.Conv1d)
FusedConv2d = fused_class(nn.Conv2d)
FusedConv3d = fused_class(nn.Conv3d)
FusedLinear = fused_class(nn.Linear)


def refuses(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``layer`` cannot compute ``bn`` (None when it can)."""
    if isinstance(layer, _Fused):
        return f"its layer already computes `{type(layer.fused_bn).__name__}`"
    if _base(type(layer)) is None:
        return (
            f"its layer is a {type(layer).__name__}, which computes a forward of its own "
            "(fused: Conv1d/2d/3d, Linear and subclasses that keep their forward)"
        )
    if layer.weight.dim() and layer.weight.shape[0] != bn.num_features:
        return f"its layer has {layer.weight.shape[0]} output channels, the BN {bn.num_features}"
    return None


def fuse(layer: nn.Module, frozen: FrozenBatchNorm) -> None:
    """Make ``layer`` compute ``frozen`` (in place); ``frozen`` then passes its input through.

    Raises:
        ValueError: the layer cannot fuse (:func:`refuses` says why).
    """
    reason = refuses(layer, frozen)
    if reason is not None:
        raise ValueError(reason)
    layer.__dict__["_unfused_class"] = type(layer)
    layer.__dict__["fused_bn"] = frozen
    layer.__class__ = fused_class(type(layer))
    frozen.__dict__["_fused_into"] = layer
    frozen.fused = True


def unfuse(frozen: FrozenBatchNorm) -> None:
    """Give the frozen BN its own computation back, and the layer that computed it its class
    (in place); nothing for a BN that is not fused."""
    layer = frozen.__dict__.pop("_fused_into", None)
    if layer is None:
        return
    layer.__dict__.pop("fused_bn")
    layer.__class__ = layer.__dict__.pop("_unfused_class")
    frozen.fused = False


def fused_into(frozen: nn.Module) -> nn.Module | None:
    """The layer that computes ``frozen``, or None."""
    return frozen.__dict__.get("_fused_into")


@contextlib.contextmanager
def unfused(model: nn.Module) -> Iterator[None]:
    """Every fused layer of ``model`` computes itself alone, and its frozen BN itself, while
    inside: the other surgeries (fold, swap, recalibrate, export) see plain frozen BNs. On the
    way out each pair still in the model, the BN still frozen, is fused again; a BN folded or
    replaced meanwhile is not (its layer was given back its class)."""
    pairs = [
        (bn, fused_into(bn))
        for bn in model.modules()
        if isinstance(bn, FrozenBatchNorm) and fused_into(bn) is not None
    ]
    for bn, _ in pairs:
        unfuse(bn)
    try:
        yield
    finally:
        present = {id(m) for m in model.modules()}
        for bn, layer in pairs:
            if id(bn) in present and id(layer) in present and refuses(layer, bn) is None:
                fuse(layer, bn)


def on_unfused(surgery: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``surgery(model, ...)`` inside :func:`unfused` of ``model``."""

    @functools.wraps(surgery)
    def run(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with unfused(model):
            return surgery(model, *args, **kwargs)

    return run
