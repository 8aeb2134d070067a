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

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .frozen import FrozenBatchNorm

__all__ = [
    "FUSABLE",
    "FusedConv1d",
    "FusedConv2d",
    "FusedConv3d",
    "FusedLinear",
    "fuse",
    "fused_into",
    "refuses",
    "unfuse",
]


class _Fused:
    """What the fused classes share: the frozen BN's map folded into the weights per call."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    fused_bn: FrozenBatchNorm  # set by fuse(); an attribute, not a registered submodule

    def fused_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.fused_bn._scale_shift(self.weight.dtype)
        weight = self.weight * scale.view(-1, *[1] * (self.weight.dim() - 1))
        bias = shift if self.bias is None else torch.addcmul(shift, self.bias, scale)
        return weight, bias

    def fused_call(self, run: Callable[..., torch.Tensor], input: torch.Tensor) -> torch.Tensor:
        """``run(input, weight, bias)`` with the scaled weight and bias; when autograd would
        keep the scaled weight for the backward pass (a copy of the layer's weight), it keeps
        the weight and scale instead and scales again there."""
        weight, bias = self.fused_weight_and_bias()
        if not (torch.is_grad_enabled() and weight.requires_grad) or torch.compiler.is_compiling():
            return run(input, weight, bias)
        scale = self.fused_bn._scale_shift(self.weight.dtype)[0].detach()
        original, shape = self.weight.detach(), (-1, *[1] * (self.weight.dim() - 1))
        key = (weight.data_ptr(), weight.shape, weight.dtype)

        def pack(t: torch.Tensor) -> Any:
            if (t.data_ptr(), t.shape, t.dtype) == key:
                return _Rescale(original, scale, shape)
            return t

        def unpack(saved: Any) -> torch.Tensor:
            return saved.make() if isinstance(saved, _Rescale) else saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return run(input, weight, bias)


class _Rescale:
    """A scaled weight autograd would have kept, as its recipe: made again when read."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.weight, self.scale, self.shape = weight, scale, shape

    def make(self) -> torch.Tensor:
        return self.weight * self.scale.view(self.shape)


class FusedConv1d(_Fused, nn.Conv1d):
    """An ``nn.Conv1d`` that computes the frozen BN after it (see the module's text)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.fused_call(self._conv_forward, input)


class FusedConv2d(_Fused, nn.Conv2d):
    """An ``nn.Conv2d`` that computes the frozen BN after it (see the module's text)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.fused_call(self._conv_forward, input)


class FusedConv3d(_Fused, nn.Conv3d):
    """An ``nn.Conv3d`` that computes the frozen BN after it (see the module's text)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.fused_call(self._conv_forward, input)


class FusedLinear(_Fused, nn.Linear):
    """An ``nn.Linear`` that computes the frozen BN after it (see the module's text)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.fused_call(F.linear, input)


#: the layer classes that fuse, exactly these (a subclass may compute its own forward:
#: timm's ``Conv2dSame`` pads first, ``StdConv2d`` standardises its weight)
FUSABLE: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: FusedConv1d,
    nn.Conv2d: FusedConv2d,
    nn.Conv3d: FusedConv3d,
    nn.Linear: FusedLinear,
}


def refuses(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``layer`` cannot compute ``bn`` (None when it can)."""
    if type(layer) not in FUSABLE:
        kind = type(layer).__name__
        if isinstance(layer, _Fused):
            return f"its layer already computes `{type(layer.fused_bn).__name__}`"
        return (
            f"its layer is a {kind}, which may compute its own forward (fused: exactly "
            "Conv1d/2d/3d and Linear)"
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
    layer.__class__ = FUSABLE[type(layer)]
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
