"""The memory layout of a pass over data: channels-last only where the model cannot tell.

PyTorch's CPU batch-norm kernels in training mode are much faster on channels-last tensors, so
recalibration runs 2-D convnets in that layout when the model makes no layout-sensitive call
(``x.view`` after a conv) and no data-dependent decision on a first, watched batch (itself run
in channels-last, and again in the default layout only when what it computed could differ).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .batches import map_tensors
from .errors import DataError
from .graph import DECISIONS

__all__ = ["Layout", "LayoutWatch"]


#: Tensor methods whose result or success depends on the memory layout, not only on values.
_LAYOUT_SENSITIVE = frozenset(
    {
        torch.Tensor.view,
        torch.Tensor.stride,
        torch.Tensor.is_contiguous,
        torch.Tensor.data_ptr,
        torch.Tensor.storage_offset,
        torch.Tensor.untyped_storage,
        torch.Tensor.as_strided,
        torch.as_strided,
    }
)

#: Of those, the ones that can only fail, never change a value: a ``view`` that succeeds gives
#: the same values in any layout (it fails where the strides do not allow it).
_FAIL_ONLY = frozenset({torch.Tensor.view})


class LayoutWatch(TorchFunctionMode):
    """Records the first layout-sensitive call a forward pass makes (``x.view``, strides,
    contiguity checks, raw storage) and the first data-dependent decision: a model that makes
    no such call computes the same values, and raises the same errors, in any memory format;
    one whose only such call is a ``view`` that succeeds computed the same values."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: str | None = None  # the first layout-sensitive call
        self.values_may_differ = False  # a call other than a view: values may depend on it
        self.decision: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in _LAYOUT_SENSITIVE:
            name = getattr(func, "__name__", str(func))
            if self.seen is None:
                self.seen = f"the model calls Tensor.{name}, which channels-last could break"
            self.values_may_differ |= func not in _FAIL_ONLY
        elif self.decision is None:
            name = getattr(func, "__name__", "")
            if name in DECISIONS:  # later batches may take a path this one did not
                self.decision = f"the model branches on tensor values (Tensor.{name})"
        return func(*args, **(kwargs or {}))


def channels_last(batch: Any) -> Any:
    """``batch`` with its 4-D floating tensors in channels-last format."""
    return map_tensors(
        batch,
        lambda t: (
            t.contiguous(memory_format=torch.channels_last)
            if t.dim() == 4 and t.is_floating_point()
            else t
        ),
    )


class Layout:
    """The memory format of the pass: channels-last only where nobody can tell.

    PyTorch's CPU batch-norm kernels in training mode are much faster on channels-last tensors
    (resnet50, batch 32 at 160 px: the whole pass 0.95 s against 1.26 s for the plain eval
    forward in the default layout). Only the layout changes, never a value, but user code can
    see a layout: ``x.view(x.size(0), -1)`` after a conv fails on a channels-last tensor. So by
    default (``wanted=None``, on the CPU, for a 2-D convnet whose 4-D weights are in the default
    layout) the first batch runs in channels-last under :class:`LayoutWatch`, and:

    * it made no layout-sensitive call and no data-dependent decision: the rest run in
      channels-last too;
    * it made a data-dependent decision (a later batch could take another path), or its only
      layout-sensitive calls were ``view`` calls that succeeded: its values stand, the rest run
      in the default layout;
    * it made another layout-sensitive call (strides, contiguity, raw storage), or failed after
      any layout-sensitive call: what it measured is dropped (``reset``) and it runs again in
      the default layout, as do the rest.

    ``wanted=True`` runs every batch in channels-last, ``False`` none. The model's layout is
    restored afterwards.
    """

    def __init__(self, model: nn.Module, device: torch.device, wanted: bool | None) -> None:
        tensors = [*model.parameters(), *model.buffers()]
        four = [t for t in tensors if t.dim() == 4 and t.is_floating_point()]
        usable = bool(four) and all(t.is_contiguous() for t in four)
        usable = usable and not any(t.dim() == 5 for t in tensors)
        self.model = model
        self.trial = usable and wanted is None and device.type == "cpu"
        self.active = False
        self.note: str | None = None
        self.forced = bool(usable and wanted)
        if self.forced or self.trial:
            self.model.to(memory_format=torch.channels_last)
            self.active = True

    def run(self, run: Callable[[Any], Any], batch: Any, reset: Callable[[], None]) -> None:
        """``run(batch)`` in the pass's layout (``batch`` on the device, in the layout the data
        came in); the first batch, on trial, decides the rest."""
        if not self.trial:
            with self.explained():
                run(channels_last(batch) if self.active else batch)
            return
        self.trial = False
        watch = LayoutWatch()
        try:
            with watch:
                run(channels_last(batch))
        except DataError:
            if watch.seen is None:  # the same error in any layout
                raise
            rerun = True
        else:
            rerun = watch.values_may_differ
        reason = watch.seen or watch.decision
        if reason is None:
            return
        self.restore()
        self.note = (
            f"ran in the default memory layout: {reason} (--channels-last, channels_last=True, "
            "forces channels-last)"
        )
        if rerun:
            reset()
            run(batch)

    @contextlib.contextmanager
    def explained(self) -> Any:
        """A model that fails on channels-last batches (a ``.view`` of a conv's output) is told
        so, and how to run it: the complaint alone blames the data."""
        try:
            yield
        except DataError as exc:
            text = str(exc)
            if not self.active or not any(k in text for k in ("stride", "view size")):
                raise
            if self.forced:
                raise DataError(
                    "the model fails on channels-last batches, the format --channels-last "
                    "(channels_last=True) forces: its code depends on the memory layout (a "
                    ".view of a conv's output); run without it"
                ) from exc
            raise DataError(
                "the model fails on channels-last batches, the format the pass switched to "
                "after a first batch that made no layout-sensitive call: this batch took a "
                "path that does; pass --no-channels-last (channels_last=False)"
            ) from exc

    def restore(self) -> None:
        if self.active:
            self.model.to(memory_format=torch.contiguous_format)
            self.active = False
