"""Batches: how a batch reaches the model, and the checks it passes first.

Shared by every pass over data (recalibrate, swap's calibration): :func:`default_forward` feeds
a tensor, a tuple or a dict; :func:`to_device` moves a batch; :class:`DataCheck` refuses NaN
and infinity before the model sees them; :func:`run_batch` turns a model's complaint about a
batch it cannot take into a :class:`~bnsurgery.errors.DataError` naming the batch's shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import BnSurgeryError, DataError, UsageError
from .tree import unwrapped

__all__ = ["DataCheck", "default_forward", "map_tensors", "run_batch", "tensors_of", "to_device"]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feed a batch: a tensor as is, the first element of a tuple or list, a dict as keyword
    arguments."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        return model(batch[0])
    raise UsageError(f"cannot feed a batch of type {type(batch).__name__}; pass forward=")


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it (tensors in tuples, lists and dicts,
    nested; everything else as it is)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` on ``device`` (its memory layout: :func:`bnsurgery.layout.channels_last`)."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def tensors_of(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a batch (a tensor, or tensors in tuples, lists and dicts), in order."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from tensors_of(value)
    elif isinstance(batch, tuple | list):
        for value in batch:
            yield from tensors_of(value)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


class DataCheck:
    """Checks each batch before the model sees it, and remembers the largest magnitude seen
    (to say which values made statistics overflow)."""

    def __init__(self) -> None:
        self.largest = 0.0

    def batch(self, batch: Any, index: int) -> None:
        """Raise :class:`DataError` if a floating tensor of the batch holds NaN or infinity.

        One reduction per tensor (min and max together; both propagate NaN); the counts and the
        first bad sample are only computed for a bad batch. Batches and samples count from 0.
        """
        for t in tensors_of(batch):
            if not t.is_floating_point() or t.numel() == 0:
                continue
            lo, hi = (float(v) for v in torch.aminmax(t.detach()))
            if math.isfinite(lo) and math.isfinite(hi):
                self.largest = max(self.largest, -lo, hi)
                continue
            nan = int(torch.isnan(t).sum())
            inf = int(torch.isinf(t).sum())
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1))
            first = int(bad.any(1).nonzero()[0, 0])
            found = " and ".join(
                text
                for n, text in (
                    (inf, _plural(inf, "infinite value")),
                    (nan, _plural(nan, "NaN value")),
                )
                if n
            )
            raise DataError(
                f"batch {index} holds {found} (first at sample {first}); clean the data"
            )

    def overflow(self, name: str, what: str, dtype: torch.dtype, nan: bool) -> DataError:
        """The error for statistics (or fitted parameters) that are not finite in ``dtype``."""
        kind = str(dtype).removeprefix("torch.")
        if nan:
            return DataError(
                f"{what} come out NaN at {name} on this data (values up to {self.largest:.3g})"
            )
        return DataError(f"values up to {self.largest:.3g} make {what} overflow {kind} at {name}")


#: Errors a model raises on an input it cannot take (a wrong shape, channel count, layout or
#: dtype); memory errors and bnsurgery's own errors are not about the data.
_MISFIT = (RuntimeError, ValueError, IndexError, TypeError, AssertionError)


def run_batch(feed: Callable[[nn.Module, Any], Any], model: nn.Module, batch: Any) -> Any:
    """``feed(model, batch)``, on the module a ``torch.compile``/``DataParallel`` wrapper runs
    (eagerly: these passes rely on hooks, which a compiled graph skips); an error of the model
    on this batch becomes a :class:`DataError` naming the batch's shape and the model's
    complaint."""
    try:
        return feed(unwrapped(model), batch)
    except (BnSurgeryError, torch.cuda.OutOfMemoryError):
        raise
    except _MISFIT as exc:
        text = str(exc).lower()
        if "out of memory" in text or "can't allocate memory" in text:
            raise  # the machine's limit, not the data's shape
        raise _misfit(model, batch, exc) from exc


def _misfit(model: nn.Module, batch: Any, exc: BaseException) -> DataError:
    first = next(tensors_of(batch), None)
    what = f"batches of shape {tuple(first.shape)}" if first is not None else "batches"
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    shape = tuple(first.shape) if first is not None else ()
    expects = getattr(conv, "in_channels", None)
    if expects is not None and len(shape) >= 3 and shape[1] != expects:
        hint = ""
        if shape[-1] == expects:
            hint = " (this looks like channels-last (N, H, W, C) data; permute to (N, C, H, W))"
        return DataError(
            f"{what} do not fit the model: it expects {expects} channels in dimension 1{hint}"
        )
    lines = str(exc).strip().splitlines()
    complaint = lines[0][:300] if lines else ""
    return DataError(f"{what} do not fit the model: {type(exc).__name__}: {complaint}")
