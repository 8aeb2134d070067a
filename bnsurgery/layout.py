"""The memory layout of a pass over data: channels-last only where the model cannot tell.

PyTorch's CPU batch-norm kernels in training mode are much faster on channels-last tensors, so
recalibration runs 2-D convnets in that layout when the model makes no layout-sensitive call
(``x.view`` after a conv) and no data-dependent decision on a first, watched batch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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


class LayoutWatch(TorchFunctionMode):
    """Records the first layout-sensitive call a forward pass makes (``x.view``, strides,
    contiguity checks, raw storage): a model that makes none computes the same values, and
    raises the same errors, in any memory format."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if self.seen is None:
            name = getattr(func, "__name__", str(func))
            if func in _LAYOUT_SENSITIVE:
                self.seen = f"the model calls Tensor.{name}, which channels-last could break"
            elif name in DECISIONS:  # later batches may take a path this one did not
                self.seen = f"the model branches on tensor values (Tensor.{name})"
        return func(*args, **(kwargs or {}))


class Layout:
    """The memory format of the pass: channels-last only where nobody can tell.

    PyTorch's CPU batch-norm kernels in training mode are much faster on channels-last tensors
    (resnet50, batch 32 at 160 px: the whole pass 0.95 s against 1.26 s for the plain eval
    forward in the default layout). Only the layout changes, never a value, but user code can
    see a layout: ``x.view(x.size(0), -1)`` after a conv fails on a channels-last tensor. So by
    default (``wanted=None``, on the CPU, for a 2-D convnet whose 4-D weights are in the default
    layout) the first batch runs in the default layout under :class:`LayoutWatch`, and the rest
    switch to channels-last only if that batch made no layout-sensitive call and no
    data-dependent decision (a later batch could take another path); ``wanted=True``
    switches from the start, ``False`` never. The model's layout is restored afterwards.
    """

    def __init__(self, model: nn.Module, device: torch.device, wanted: bool | None) -> None:
        tensors = [*model.parameters(), *model.buffers()]
        four = [t for t in tensors if t.dim() == 4 and t.is_floating_point()]
        usable = bool(four) and all(t.is_contiguous() for t in four)
        usable = usable and not any(t.dim() == 5 for t in tensors)
        self.model = model
        self.watching = usable and wanted is None and device.type == "cpu"
        self.active = False
        self.note: str | None = None
        self.forced = bool(usable and wanted)
        if self.forced:
            self._switch()

    def _switch(self) -> None:
        self.model.to(memory_format=torch.channels_last)
        self.active = True

    @contextlib.contextmanager
    def batch(self) -> Any:
        """Run one batch; the first one, when watching, decides the rest."""
        if not self.watching:
            yield
            return
        watch = LayoutWatch()
        with watch:
            yield
        self.watching = False
        if watch.seen is None:
            self._switch()
        else:
            self.note = (
                f"ran in the default memory layout: {watch.seen} (--channels-last, "
                "channels_last=True, forces it)"
            )

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
