"""Helpers for tests, the zoo sweep and benchmarks: make random-init models non-trivial."""

from __future__ import annotations

import torch
from torch import nn

from .hooks import call_input
from .norms import iter_batchnorms
from .tree import eval_mode

__all__ = ["match_bn_to_data", "randomize_bn"]


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0, spread: float = 0.5) -> nn.Module:
    """Give every BN random running statistics and affine parameters, in place.

    Freshly built models have mean 0, variance 1, weight 1 and bias 0 in every BN, which makes
    BN the identity and hides a wrong fold. Values are drawn so the function stays well scaled:
    mean ~ N(0, spread), var ~ U(0.5, 1.5), weight ~ U(0.5, 1.5) (U(0, 0.2) where the model
    zero-initialises it, as timm does for the last BN of residual blocks), bias ~ N(0, spread).
    ``num_batches_tracked`` is set to 1 (trained).
    """
    g = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, low: float, high: float | None = None) -> None:
        shape = t.shape
        if high is None:
            value = torch.randn(shape, generator=g) * low
        else:
            value = torch.rand(shape, generator=g) * (high - low) + low
        t.copy_(value.to(t.dtype))

    for _, bn in iter_batchnorms(model):
        mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
        if isinstance(mean, torch.Tensor) and not isinstance(
            mean, nn.parameter.UninitializedBuffer
        ):
            draw(mean, spread)
            draw(var, 0.5, 1.5)
        weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
        if isinstance(weight, torch.Tensor) and not isinstance(
            weight, nn.parameter.UninitializedParameter
        ):
            zero_init = bool((weight == 0).all())
            # A zero-initialised residual BN stays small, as after training, so random-init
            # networks do not blow up (and float32 rounding with them).
            low, high = (0.0, 0.2) if zero_init else (0.5, 1.5)
            draw(weight, low, high)
            draw(bias, spread)
        tracked = getattr(bn, "num_batches_tracked", None)
        if isinstance(tracked, torch.Tensor):
            tracked.fill_(1)
    return model


@torch.no_grad()
def match_bn_to_data(model: nn.Module, args: tuple, seed: int = 0) -> nn.Module:
    """Set every BN's running statistics from the input it actually sees on ``args``, in place,
    as training leaves them: mean moved by N(0, 0.1) standard deviations, variance scaled by
    U(0.8, 1.25). Affine parameters are kept; a BN that sees only empty inputs keeps its
    statistics.

    One eval pass: a pre-hook sets each BN's statistics just before it normalises, so every BN
    after it sees inputs normalised the way the final model normalises them. A random-init
    network with :func:`randomize_bn` statistics can amplify float32 rounding a thousandfold
    (its statistics do not match its activations, layer after layer); with statistics that
    match, it behaves like a trained one.
    """
    g = torch.Generator().manual_seed(seed)
    done: set[int] = set()

    def hook(module: nn.Module, inputs: tuple, kwargs: dict) -> None:
        x = call_input(inputs, kwargs)
        if id(module) in done or not isinstance(x, torch.Tensor) or x.numel() == 0:
            return  # an empty batch has no statistics: the BN keeps its own (and a later call)
        done.add(id(module))
        mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
            return
        x = x.detach().double()
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1)
        data_var = flat.var(1, unbiased=flat.shape[1] > 1)
        data_mean = flat.mean(1)
        noise = torch.randn(c, generator=g, dtype=torch.float64)
        scale = torch.rand(c, generator=g, dtype=torch.float64) * 0.45 + 0.8
        mean.copy_((data_mean + 0.1 * noise * data_var.sqrt()).to(mean))
        var.copy_((data_var * scale).clamp_min(1e-12).to(var))

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True) for _, m in iter_batchnorms(model)
    ]
    try:
        with eval_mode(model):
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return model
