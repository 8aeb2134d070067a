"""The frozen BN module: always normalises with its running statistics.

:class:`FrozenBatchNorm` wraps the very tensors of the BN it replaces under the same names
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``, and ``act``/
``drop`` of timm norm-act layers), so state-dict keys do not change: a frozen checkpoint loads
into the original architecture and back. It keeps the original module object aside (not
registered), so :meth:`FrozenBatchNorm.restore` gives back exactly what was there.

Its forward is one fused eval-mode ``batch_norm`` call whatever ``self.training`` says, so
``model.train()`` cannot unfreeze it and batch size 1 works.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import UsageError

__all__ = ["FrozenBatchNorm"]


class FrozenBatchNorm(nn.Module):
    """A BN layer frozen in eval mode: statistics fixed, affine fixed unless ``train_affine``.

    With ``fused`` (set by :func:`bnsurgery.fused.fuse`) the layer before computes it, and its
    forward passes the input through (to a norm-act layer's activation).

    Args:
        bn: the ``_BatchNorm`` module to freeze (BatchNorm1d/2d/3d, SyncBatchNorm, subclasses
            such as timm's ``BatchNormAct2d``). Its tensors are shared, not copied.
        train_affine: keep ``weight`` and ``bias`` trainable (statistics stay frozen).

    Raises:
        UsageError: an uninitialised lazy BN, or a BN without running statistics.
    """

    fused: bool = False

    def __init__(self, bn: nn.Module, train_affine: bool = False) -> None:
        super().__init__()
        if not isinstance(bn, _BatchNorm):
            raise UsageError(f"cannot freeze a {type(bn).__name__}: not a BatchNorm module")
        if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer) or isinstance(
            bn.weight, nn.parameter.UninitializedParameter
        ):
            raise UsageError(
                f"cannot freeze an uninitialised {type(bn).__name__}: run one forward pass first"
            )
        if not bn.track_running_stats or bn.running_mean is None:
            raise UsageError(
                f"cannot freeze a {type(bn).__name__} without running statistics "
                "(track_running_stats=False)"
            )
        self.num_features = int(bn.num_features)
        self.eps = float(bn.eps)
        self.train_affine = bool(train_affine)

        self.has_act = any(  # a timm norm-act layer's activation or drop (norms.has_activation)
            isinstance(getattr(bn, a, None), nn.Module)
            and not isinstance(getattr(bn, a), nn.Identity)
            for a in ("act", "drop")
        )
        for name, param in bn._parameters.items():
            self._parameters[name] = param
        for name, buffer in bn._buffers.items():
            self._buffers[name] = buffer
        for name, child in bn._modules.items():
            self._modules[name] = child
        self.__dict__["_original"] = bn
        self.__dict__["_original_flags"] = {
            "training": bn.training,
            "requires_grad": {
                n: p.requires_grad for n, p in bn._parameters.items() if p is not None
            },
        }
        for param in self._parameters.values():
            if param is not None:
                param.requires_grad_(self.train_affine and param.requires_grad)
        self.training = bn.training

    def set_train_affine(self, train_affine: bool) -> None:
        """Free the affine (``True``: trainable again, as it was before the freeze) or fix it
        (``False``); the statistics stay frozen either way."""
        self.train_affine = bool(train_affine)
        was = self.__dict__["_original_flags"]["requires_grad"]
        for name, param in self._parameters.items():
            if param is not None:
                param.requires_grad_(self.train_affine and was.get(name, True))

    @property
    def original_type(self) -> type[nn.Module]:
        """The class of the BN this module froze."""
        return type(self.__dict__["_original"])

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # BN's name: bn(input=x) works
        x = input
        if self.fused:  # the layer before computed it
            pass
        elif torch.is_grad_enabled() and (x.requires_grad or self._affine_requires_grad()):
            # Training through a frozen BN: one fused multiply-add, whose backward is a single
            # multiply (eval-mode batch_norm's backward costs more on the CPU).
            scale, shift = self._scale_shift(x.dtype)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x = torch.addcmul(shift.view(shape), x, scale.view(shape))
        else:
            # Inference: the eval-mode kernel, bit for bit what the unfrozen BN computes.
            x = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        if self.has_act:
            x = self.act(self.drop(x))
        return x

    def _affine_requires_grad(self) -> bool:
        weight, bias = self.weight, self.bias
        return (weight is not None and weight.requires_grad) or (
            bias is not None and bias.requires_grad
        )

    def _scale_shift(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = x * scale + shift``, computed in at least float32 and cast to ``dtype``."""
        work = torch.promote_types(self.running_var.dtype, torch.float32)
        scale = torch.rsqrt(self.running_var.to(work) + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(work)
        shift = -self.running_mean.to(work) * scale
        if self.bias is not None:
            shift = shift + self.bias.to(work)
        return scale.to(dtype), shift.to(dtype)

    def restore(self) -> nn.Module:
        """Return the original BN module with this module's current tensors and the original
        flags (training, requires_grad, momentum and everything else it had)."""
        from .fused import unfuse

        unfuse(self)  # the layer that computed it computes itself alone again
        bn: nn.Module = self.__dict__["_original"]
        flags: dict[str, Any] = self.__dict__["_original_flags"]
        for name, param in self._parameters.items():
            if param is not None:
                param.requires_grad_(flags["requires_grad"].get(name, True))
            bn._parameters[name] = param
        for name, buffer in self._buffers.items():
            bn._buffers[name] = buffer
        for name, child in self._modules.items():
            bn._modules[name] = child
        bn.training = flags["training"]
        return bn

    def extra_repr(self) -> str:
        kind = self.original_type.__name__
        return (
            f"{self.num_features}, eps={self.eps}, frozen {kind}, train_affine={self.train_affine}"
        )
