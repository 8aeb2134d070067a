"""The modules bnsurgery puts into a model in place of a BN.

Each keeps the calling convention of the BN it replaces (``forward(input)``, so ``bn(input=x)``
works) and, where the BN was a timm norm-act layer, its ``drop`` and ``act`` under the same
names. :class:`~bnsurgery.frozen.FrozenBatchNorm` has a module of its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .norms import eps_of

__all__ = [
    "ChannelLayerNorm",
    "FoldedBatchNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "NormAct",
    "NormActRemainder",
]


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dimension (dim 1) at every position, for any rank: (N, C),
    (N, C, L), (N, C, H, W), (N, C, D, H, W). As ConvNeXt normalises conv features."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, **kw: Any):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kw)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` (called positionally or as ``input=``, like BN) and return it in
        the layout it came in: a contiguous input gives a contiguous output, so the ``.view``
        user code does after the norm it replaced keeps working."""
        if input.dim() == 2:
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        normed = F.layer_norm(
            input.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return torch.empty_like(input, dtype=normed.dtype).copy_(normed.movedim(-1, 1))


class NormAct(nn.Module):
    """A norm followed by the drop and activation of the timm norm-act layer it replaced
    (``norm`` → ``drop`` → ``act``), for targets timm has no norm-act class for."""

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # BN's name: bn(input=x) works
        return self.act(self.drop(self.norm(input)))


class _EmptyBatchPasses:
    """Instance norm that passes an empty batch through, as the BN it replaces did: PyTorch's
    affine instance norm raises on a ``(0, C, ...)`` input (a detection head without
    detections)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input.clone() if input.numel() == 0 else super().forward(input)  # type: ignore[misc]


class InstanceNorm1d(_EmptyBatchPasses, nn.InstanceNorm1d):
    """``nn.InstanceNorm1d`` that passes an empty batch through."""


class InstanceNorm2d(_EmptyBatchPasses, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` that passes an empty batch through."""


class InstanceNorm3d(_EmptyBatchPasses, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that passes an empty batch through."""


class NormActRemainder(nn.Module):
    """What is left of a timm norm-act layer once its normalisation is folded away.

    Applies ``drop`` then ``act`` exactly as the norm-act layer did after normalising, and keeps
    them under the same attribute names so state-dict keys such as ``bn1.act.weight`` (PReLU)
    stay where they were.
    """

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # the name BN's forward has
        return self.act(self.drop(input))


class FoldedBatchNorm(nn.Identity):
    """What is left of a plain BN once it is folded into a neighbouring layer: the identity.

    To code that fuses BN layers itself by reading their tensors (ultralytics' ``fuse()``, run
    by every ``YOLO.predict``; mmcv's and hand-written ``fuse_conv_and_bn``) it also reads as
    a BN whose function is the identity: weight 1, bias 0, mean 0, and a variance with
    ``running_var + eps == 1`` exactly in its dtype, so such a fuser folds it into nothing
    rather than crashing on a missing ``running_mean``. These tensors are non-persistent
    buffers: the state dict is ``nn.Identity``'s (empty), and the forward never reads them.
    Type-exact fusers (``torch.ao.quantization.fuse_modules``, torchvision's ``fuse_model``)
    still refuse it: run those instead of fold.

    >>> left = FoldedBatchNorm(nn.BatchNorm2d(3))
    >>> bool((left.running_var + left.eps == 1).all()), len(left.state_dict())
    (True, 0)
    """

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        like = bn.running_mean
        self.num_features = like.numel()
        self.eps = eps_of(bn)
        factory = {"dtype": like.dtype, "device": like.device}
        var = torch.full((self.num_features,), 1.0 - self.eps, **factory)
        for _ in range(0 if like.is_meta else 4):  # the value whose sum with eps is exactly 1
            total = var + self.eps
            if bool((total == 1).all()):
                break
            var = torch.nextafter(var, torch.where(total > 1, 0.0, 2.0).to(var))
        for name, value in (
            ("weight", torch.ones_like(var)),
            ("bias", torch.zeros_like(var)),
            ("running_mean", torch.zeros_like(var)),
            ("running_var", var),
        ):
            self.register_buffer(name, value, persistent=False)

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded"
