"""What counts as a BatchNorm layer, and how to read it as a per-channel affine map.

bnsurgery works on every module that normalises with per-channel running statistics:
``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, lazy BN once initialised, their subclasses
(timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``), and the frozen variants that keep the
statistics as buffers (torchvision's and timm's ``FrozenBatchNorm2d``, timm's
``FrozenBatchNormAct2d``, detectron2's, and Hugging Face's ``*FrozenBatchNorm2d``, whose epsilon
is read off their forward: :func:`is_frozen_batchnorm`).
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .frozen import FrozenBatchNorm

__all__ = [
    "BNStats",
    "bn_stats",
    "stats_of",
    "eps_of",
    "has_statistics",
    "bad_statistics",
    "check_finite",
    "unusable",
    "has_activation",
    "is_batchnorm",
    "is_frozen_batchnorm",
    "iter_batchnorms",
    "num_features",
]


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """True for frozen BN modules that keep weight, bias and statistics as buffers.

    Recognised by shape and behaviour rather than by import, so torchvision's, timm's,
    detectron2's and Hugging Face's classes (``DetrFrozenBatchNorm2d``, ``RTDetrFrozenBatchNorm2d``
    and their kind) all qualify: a class whose name holds ``Frozen`` and ``BatchNorm``, with the
    four buffers, and either an ``eps`` attribute or (with no parameters and no submodules) a
    forward that computes the BN formula with an epsilon of its own (found by :func:`eps_of`).
    """
    name = type(module).__name__
    if not ("Frozen" in name and "BatchNorm" in name):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    if not all(k in buffers for k in ("weight", "bias", "running_mean", "running_var")):
        return False
    if hasattr(module, "eps"):
        return True
    if next(module.parameters(recurse=False), None) is not None or next(module.children(), None):
        return False  # only a plain buffers-and-forward module is probed
    return _probed_eps(module) is not None


def eps_of(module: nn.Module) -> float:
    """The epsilon a BN module adds to the variance: its ``eps`` attribute, or, for frozen BN
    classes that hard-code it in their forward (Hugging Face's), the value their forward uses.

    >>> eps_of(nn.BatchNorm2d(3, eps=1e-3))
    0.001
    """
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = _probed_eps(module)
        if eps is None:
            raise TypeError(f"{type(module).__name__} is not a BN module with a known epsilon")
    return float(eps)


#: Epsilons found by running a module's forward, per module (a class may take it as an
#: argument under another name): ``None`` when its forward is not the BN formula.
_PROBED: weakref.WeakKeyDictionary[nn.Module, float | None] = weakref.WeakKeyDictionary()


def _probed_eps(module: nn.Module) -> float | None:
    """The epsilon of a frozen BN's forward, found on a float64 copy of it, or ``None`` when its
    forward is not ``(x - mean) / sqrt(var + eps) * weight + bias`` per channel.

    With mean 0, variance 0, weight 1 and bias 0, an input of ones gives ``1 / sqrt(eps)``; the
    value is then checked on random statistics and inputs against ``F.batch_norm``.
    """
    if module in _PROBED:
        return _PROBED[module]
    eps = None
    with contextlib.suppress(Exception):  # a forward that fails on the probe is not a BN's
        eps = _probe(module)
    _PROBED[module] = eps
    return eps


def _probe(module: nn.Module) -> float | None:
    c = module.running_mean.numel()
    probe = copy.copy(module)  # a shallow copy with buffers of its own: the module is untouched
    probe._buffers = dict(module._buffers)
    probe._forward_pre_hooks, probe._forward_hooks = OrderedDict(), OrderedDict()

    def run(mean, var, weight, bias, x) -> torch.Tensor:
        keys = ("running_mean", "running_var", "weight", "bias")
        probe._buffers.update(zip(keys, (mean, var, weight, bias), strict=True))
        with torch.no_grad():
            return probe.forward(x)

    f64 = {"dtype": torch.float64}
    ones, zeros = torch.ones(c, **f64), torch.zeros(c, **f64)
    for shape in ((1, c, 1, 1), (1, c)):  # 2-d frozen BN, then 1-d
        with contextlib.suppress(Exception):
            out = run(zeros, zeros, ones, zeros, torch.ones(shape, **f64))
            break
    else:
        return None
    if out.shape != shape or not bool(torch.isfinite(out).all()) or bool((out <= 0).any()):
        return None
    eps = float(f"{float(out.reshape(-1)[0]) ** -2:.12g}")  # 1e-5 exactly, not 1.0000000000002e-5
    g = torch.Generator().manual_seed(0)
    stats = [torch.randn(c, generator=g, **f64) for _ in range(4)]
    stats[1] = stats[1].abs() + 0.5
    x = torch.randn((2, *shape[1:]), generator=g, **f64)
    expected = F.batch_norm(x, *stats, False, 0.0, eps)
    return eps if torch.allclose(run(*stats, x), expected, rtol=1e-9, atol=1e-12) else None


def is_batchnorm(module: nn.Module) -> bool:
    """True for every BatchNorm-like module bnsurgery works on (see the module docstring)."""
    return isinstance(module, _BatchNorm | FrozenBatchNorm) or is_frozen_batchnorm(module)


def iter_batchnorms(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every BN module, each module once, in registration order."""
    for name, module in model.named_modules():
        if is_batchnorm(module):
            yield name, module


def num_features(module: nn.Module) -> int:
    """Channel count of a BN module (also for frozen variants without ``num_features``)."""
    if hasattr(module, "num_features"):
        return int(module.num_features)
    return int(module.running_mean.numel())


def has_activation(module: nn.Module) -> bool:
    """True when a norm-act module applies a non-identity activation or drop after the norm."""
    for attr in ("act", "drop"):
        sub = getattr(module, attr, None)
        if isinstance(sub, nn.Module) and not isinstance(sub, nn.Identity):
            return True
    return False


@dataclass(frozen=True)
class BNStats:
    """The eval-mode function of a BN layer: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    All tensors are float64 on the CPU, so arithmetic on them keeps full precision whatever the
    model's dtype.
    """

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scale, shift)`` with ``y = x * scale + shift`` per channel."""
        scale = self.weight / torch.sqrt(self.var + self.eps)
        return scale, self.bias - self.mean * scale


def has_statistics(module: nn.Module) -> bool:
    """True when a BN module normalises with running statistics it holds (read nothing, so it
    works on the meta device too).

    A BN with ``track_running_stats=False`` normalises with batch statistics even in eval mode,
    so it is not a fixed affine map; an uninitialised lazy BN has no statistics yet.
    """
    mean = getattr(module, "running_mean", None)
    var = getattr(module, "running_var", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return False
    if isinstance(module, _BatchNorm) and not module.track_running_stats:
        return False
    return not isinstance(mean, nn.parameter.UninitializedBuffer)


def bn_stats(module: nn.Module) -> BNStats | None:
    """Read a BN module's eval-mode statistics, or ``None`` if it has no running statistics
    (:func:`has_statistics`)."""
    if not has_statistics(module):
        return None
    return stats_of(
        module.running_mean,
        module.running_var,
        getattr(module, "weight", None),
        getattr(module, "bias", None),
        eps_of(module),
    )


def stats_of(
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> BNStats:
    """:class:`BNStats` from a BN's tensors (a BN module's, or an ``F.batch_norm`` call's),
    float64 on the CPU; no weight or bias counts as 1 and 0."""
    c = mean.numel()

    def as64(t: torch.Tensor | None, default: float) -> torch.Tensor:
        if t is None:
            return torch.full((c,), default, dtype=torch.float64)
        return t.detach().to(device="cpu", dtype=torch.float64).reshape(c).clone()

    return BNStats(as64(mean, 0.0), as64(var, 1.0), as64(weight, 1.0), as64(bias, 0.0), eps)


def bad_statistics(module: nn.Module) -> str | None:
    """What is wrong with a BN's running statistics, or ``None``."""
    for key in ("running_mean", "running_var", "weight", "bias"):
        t = getattr(module, key, None)
        if not isinstance(t, torch.Tensor) or isinstance(t, nn.parameter.UninitializedBuffer):
            continue
        if isinstance(t, nn.parameter.UninitializedParameter) or not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            kinds = [k for k, f in (("NaN", torch.isnan), ("inf", torch.isinf)) if bool(f(t).any())]
            return f"{key} is {'/'.join(kinds)} in {int(bad.sum())} of {t.numel()} channels"
        if key == "running_var" and bool((t < 0).any()):
            return f"running_var is negative in {int((t < 0).sum())} of {t.numel()} channels"
    return None


def unusable(module: nn.Module, *, statistics: bool = True) -> str | None:
    """Why no surgery can work on this BN, or ``None``: the one policy every surgery's plan and
    ``inspect`` apply (the BN is then skipped with this reason, never an error).

    Args:
        module: a BN module.
        statistics: the surgery needs running statistics (fold, freeze, recalibrate, a
            calibrated swap); a swap to another norm does not.

    >>> unusable(nn.LazyBatchNorm2d())
    'an uninitialised lazy BN (run one forward pass first)'
    >>> unusable(nn.BatchNorm2d(3, track_running_stats=False)) is None
    False
    """
    lazy = (nn.parameter.UninitializedBuffer, nn.parameter.UninitializedParameter)
    if any(isinstance(getattr(module, k, None), lazy) for k in ("running_mean", "weight")):
        return "an uninitialised lazy BN (run one forward pass first)"
    if statistics and not has_statistics(module):
        return (
            "no running statistics (track_running_stats=False): it normalises with batch statistics"
        )
    return None


def check_finite(named: Iterable[tuple[str, nn.Module]], operation: str) -> None:
    """Refuse BN layers whose statistics or affine values are NaN, infinite or (variance)
    negative: an operation built on them would turn a broken layer into a broken model.

    Raises:
        StatisticsError: naming the first such layer and how many there are.
    """
    from .errors import StatisticsError

    bad = [(name, problem) for name, m in named if (problem := bad_statistics(m)) is not None]
    if bad:
        name, problem = bad[0]
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        raise StatisticsError(
            f"cannot {operation}: {name}: {problem}{more}; recalibrate them first "
            "(bnsurgery.recalibrate, or `bnsurgery recalibrate`)"
        )
