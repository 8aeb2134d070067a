"""Per-channel moments of what each BN sees, merged exactly: recalibration's statistics.

:class:`Moments` keeps a per-channel count, mean and sum of squared deviations, merged with
Chan's parallel algorithm in float64 (uneven batches weighted by element count);
:func:`collecting_forward` is the forward a BN runs during an exact pass (normalising with the
batch statistics, as in training, and adding them to its moments); :func:`gather` merges every
rank's moments under ``torch.distributed``; :func:`counting` counts what a BN sees in an EMA
pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .hooks import call_input
from .norms import eps_of, has_activation

__all__ = ["Moments", "collecting_forward", "counting", "gather"]


class Moments:
    """Per-channel count, mean and M2 (sum of squared deviations), merged in float64."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.batches = 0
        self.empty = 0  # calls on empty batches (counted, nothing to merge)

    def add(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        mean, m2 = mean.double(), m2.double()
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean.clone(), m2.clone()
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * (count / total)
        self.m2 += m2 + delta.square() * (self.count * count / total)
        self.count = total


def collecting_forward(moments: Moments, in_place: bool = False) -> Callable[..., torch.Tensor]:
    """The BN's forward during an exact pass. ``in_place``: the BN's input is a tensor nobody
    else reads (a graph walk proved it), which it normalises in place: no new tensor, whose
    fresh pages cost a CPU more than the normalisation itself."""

    def forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:  # bn(input=x) works
        x, eps = input, eps_of(self)  # a frozen BN of Hugging Face's has no eps attribute
        if x.numel() == 0:  # an empty batch (a detection head without detections) adds nothing
            moments.empty += 1
            out = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, eps
            )
            return self.act(self.drop(out)) if has_activation(self) else out
        count = x.numel() // max(x.shape[1], 1)
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            out, mean, var = batch_normalised(x, self.weight, self.bias, eps, in_place=in_place)
        else:
            out, mean, var = _batch_normalised_elsewhere(x, self.weight, self.bias, eps)
        moments.add(count, mean, var * count)
        moments.batches += 1
        if has_activation(self):
            out = self.act(self.drop(out))
        return out

    return forward


def batch_normalised(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` (float32 or float64) normalised with its own batch statistics, as a BN in train
    mode does, and those statistics (mean, biased variance) in float64.

    The statistics come from PyTorch's kernel for them (two passes over ``x``: exact, also
    where the variance is far below ``eps``, which a variance read back from the training
    kernel's ``1/sqrt(var + eps)`` is not); the normalisation from its eval-mode kernel with
    them, into a new tensor or, ``in_place``, into ``x`` itself: no new tensor, whose fresh
    pages cost a CPU more than the normalisation does.
    """
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    if in_place:
        out = torch.ops.aten.native_batch_norm.out(
            x, weight, bias, mean, var, False, 0.0, eps,
            out=x, save_mean=x.new_empty(0), save_invstd=x.new_empty(0),
        )[0]  # fmt: skip
    else:
        out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    return out, mean.double(), var.double()


def _batch_normalised_elsewhere(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`batch_normalised` for half-precision inputs and other devices: the training
    kernel normalises and returns the statistics (fused into one kernel on GPUs); those it
    cannot give exactly are computed again from the input in float64."""
    out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    var = invstd.double().pow(-2) - eps
    mean = mean.double()
    if invstd.dtype not in (torch.float32, torch.float64):
        # half-precision inputs get half-precision statistics from the kernel (bfloat16:
        # ~3 significant digits)
        small = torch.ones_like(var, dtype=torch.bool)
    else:
        small = var < 100 * eps  # var + eps lost var's digits where var << eps
    redo = small.nonzero().flatten()  # no bool(): the layout watch counts those as the
    if redo.numel():  # model's data-dependent branches
        dims = [0, *range(2, x.dim())]
        exact_var, exact_mean = torch.var_mean(x[:, redo].double(), dim=dims, correction=0)
        var[redo], mean[redo] = exact_var, exact_mean
    return out, mean, var


def gather(moments: Moments, channels: int, device: torch.device) -> Moments:
    """Merge every rank's moments, in rank order, identically on all ranks."""
    import torch.distributed as dist

    local = torch.zeros(2 + 2 * channels, dtype=torch.float64, device=device)
    if moments.mean is not None and moments.m2 is not None:
        local[0], local[1] = moments.count, moments.batches
        local[2 : 2 + channels] = moments.mean
        local[2 + channels :] = moments.m2
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    merged = Moments()
    for part in parts:
        part = part.cpu()
        if part[0] > 0:
            merged.add(int(part[0]), part[2 : 2 + channels], part[2 + channels :])
            merged.batches += int(part[1])
    return merged


def counting(moments: Moments) -> Callable[..., None]:
    """A pre-hook counting the values per channel a BN sees (EMA mode's ``samples``)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = call_input(args, kwargs)
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1]:
            moments.count += x.numel() // x.shape[1]
            moments.batches += 1

    return hook
