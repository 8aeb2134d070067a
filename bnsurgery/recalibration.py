"""recalibrate: recompute BN running statistics exactly over data (precise BN, AdaBN).

During the pass every module is in eval mode (dropout and stochastic depth off) and gradients
are off. Each selected BN normalises with the statistics of the current batch, as in training,
so the pass does not depend on the stale running statistics, and records the per-channel count,
mean and sum of squared deviations of its input. Batches are merged with Chan's parallel
algorithm in float64, so uneven batch sizes are weighted by element count, and the result is
the exact population mean and the unbiased variance of each BN's input over all the data.
Under ``torch.distributed`` the per-rank moments are gathered and merged in rank order on every
rank, so all ranks end with identical statistics, equal to one process over the union of the
shards.

Every module's training flag and forward are restored afterwards, also when a batch raises;
the running statistics are only written once the whole pass has succeeded.

Data is checked before it changes anything (:class:`~bnsurgery.errors.DataError`): every batch
must hold only finite values, checked as it is produced and before the model sees it; a batch
the model cannot run on (wrong channel count or layout) is reported with its shape; and the new
statistics must be finite in each BN's dtype. On any of these the model is left as it was.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from . import provenance
from .errors import BnSurgeryError, DataError, UsageError
from .graph import DECISIONS
from .norms import eps_of, has_activation
from .report import recalibration_text
from .select import select_batchnorms
from .tree import eval_mode, on_unwrapped, unwrapped

__all__ = ["LayerDrift", "RecalibrationReport", "default_forward", "gaussian_kl", "recalibrate"]


@dataclass(frozen=True)
class LayerDrift:
    """How far one BN's statistics moved: per-channel KL(old || new), averaged, and the
    largest single-channel value."""

    name: str
    samples: int
    mean_kl: float
    max_kl: float


@dataclass
class RecalibrationReport:
    """What :func:`recalibrate` did."""

    mode: str
    batches: int
    layers: list[LayerDrift]
    world_size: int = 1
    notes: list[str] = field(default_factory=list)
    #: BN layers whose statistics were kept, and why (not called, fewer than 2 values)
    left: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:  # a short table for people; to_dict() for scripts
        return recalibration_text(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "batches": self.batches,
            "world_size": self.world_size,
            "notes": list(self.notes),
            "layers": [asdict(layer) for layer in self.layers],
            "left": [{"bn": n, "reason": r} for n, r in self.left],
        }


def gaussian_kl(
    mean0: torch.Tensor, var0: torch.Tensor, mean1: torch.Tensor, var1: torch.Tensor
) -> torch.Tensor:
    """Per-channel KL divergence of N(mean0, var0) from N(mean1, var1), in float64."""
    m0, m1 = mean0.double().cpu(), mean1.double().cpu()
    v0, v1 = var0.double().cpu().clamp_min(1e-12), var1.double().cpu().clamp_min(1e-12)
    return 0.5 * (torch.log(v1 / v0) + (v0 + (m0 - m1) ** 2) / v1 - 1.0)


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


def _to(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, Mapping):
        return {k: _to(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to(v, device, channels_last) for v in batch)
    return batch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a batch (a tensor, or tensors in tuples, lists and dicts), in order."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, tuple | list):
        for value in batch:
            yield from _tensors(value)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


class _DataCheck:
    """Checks each batch before the model sees it, and remembers the largest magnitude seen
    (to say which values made statistics overflow)."""

    def __init__(self) -> None:
        self.largest = 0.0

    def batch(self, batch: Any, index: int) -> None:
        """Raise :class:`DataError` if a floating tensor of the batch holds NaN or infinity.

        One reduction per tensor (min and max together; both propagate NaN); the counts and the
        first bad sample are only computed for a bad batch. Batches and samples count from 0.
        """
        for t in _tensors(batch):
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


def _run(feed: Callable[[nn.Module, Any], Any], model: nn.Module, batch: Any) -> Any:
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
    first = next(_tensors(batch), None)
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


class _LayoutWatch(TorchFunctionMode):
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


class _Layout:
    """The memory format of the pass: channels-last only where nobody can tell.

    PyTorch's CPU batch-norm kernels in training mode are much faster on channels-last tensors
    (resnet50, batch 32 at 160 px: the whole pass 0.95 s against 1.26 s for the plain eval
    forward in the default layout). Only the layout changes, never a value, but user code can
    see a layout: ``x.view(x.size(0), -1)`` after a conv fails on a channels-last tensor. So by
    default (``wanted=None``, on the CPU, for a 2-D convnet whose 4-D weights are in the default
    layout) the first batch runs in the default layout under :class:`_LayoutWatch`, and the rest
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
        watch = _LayoutWatch()
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


class _Moments:
    """Per-channel count, mean and M2 (sum of squared deviations), merged in float64."""

    def __init__(self) -> None:
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


def _collecting_forward(moments: _Moments) -> Callable[..., torch.Tensor]:
    def forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:  # bn(input=x) works
        x, eps = input, eps_of(self)  # a frozen BN of Hugging Face's has no eps attribute
        if x.numel() == 0:  # an empty batch (a detection head without detections) adds nothing
            moments.empty += 1
            out = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, eps
            )
            return self.act(self.drop(out)) if has_activation(self) else out
        # One fused kernel normalises with the batch statistics and returns them.
        out, mean, invstd = torch.native_batch_norm(
            x, self.weight, self.bias, None, None, True, 0.0, eps
        )
        var = invstd.double().pow(-2) - eps
        mean = mean.double()
        if invstd.dtype not in (torch.float32, torch.float64):
            # half-precision inputs get half-precision statistics from the kernel (bfloat16:
            # ~3 significant digits): recompute them from the input in float64
            small = torch.ones_like(var, dtype=torch.bool)
        else:
            small = var < 100 * eps
        redo = small.nonzero().flatten()  # no bool(): the layout watch counts those as the
        if redo.numel():  # model's data-dependent branches
            # var + eps loses var's digits when var << eps: recompute those channels directly.
            dims = [0, *range(2, x.dim())]
            exact_var, exact_mean = torch.var_mean(x[:, redo].double(), dim=dims, correction=0)
            var[redo], mean[redo] = exact_var, exact_mean
        count = x.numel() // max(x.shape[1], 1)
        moments.add(count, mean.detach(), var.detach() * count)
        moments.batches += 1
        if has_activation(self):
            out = self.act(self.drop(out))
        return out

    return forward


def _gather(moments: _Moments, channels: int, device: torch.device) -> _Moments:
    """Merge every rank's moments, in rank order, identically on all ranks."""
    import torch.distributed as dist

    local = torch.zeros(2 + 2 * channels, dtype=torch.float64, device=device)
    if moments.mean is not None and moments.m2 is not None:
        local[0], local[1] = moments.count, moments.batches
        local[2 : 2 + channels] = moments.mean
        local[2 + channels :] = moments.m2
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    merged = _Moments()
    for part in parts:
        part = part.cpu()
        if part[0] > 0:
            merged.add(int(part[0]), part[2 : 2 + channels], part[2 + channels :])
            merged.batches += int(part[1])
    return merged


def _check_ema(
    chosen: list[tuple[str, nn.Module]],
    old: dict[str, dict[str, torch.Tensor]],
    check: _DataCheck,
) -> None:
    """After the momentum updates: a running statistic that was finite must still be."""
    for name, bn in chosen:
        for key in ("running_mean", "running_var"):
            now, before = getattr(bn, key, None), old[name].get(key)
            if not isinstance(now, torch.Tensor) or before is None:
                continue
            broken = ~torch.isfinite(now) & torch.isfinite(before)
            if bool(broken.any()):
                raise check.overflow(
                    name, "BN statistics", now.dtype, bool(now[broken].isnan().any())
                )


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@on_unwrapped
def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    autocast: torch.dtype | None = None,
    mode: str = "exact",
    momentum: float | None = None,
    progress: Callable[[int], None] | None = None,
    channels_last: bool | None = None,
) -> nn.Module:
    """Recompute the running statistics of the selected BN layers over ``data``, in place.

    Args:
        model: the model; its parameters, flags and mode are left as they were.
        data: an iterable or DataLoader of batches (tensors, tuples/lists, dicts).
        include, exclude: glob patterns on BN names.
        num_batches: stop after this many batches (per process).
        device: where batches go (default: the model's parameters' device).
        forward: ``forward(model, batch)``; default :func:`default_forward`.
        autocast: run the pass under ``torch.autocast`` with this dtype.
        mode: ``"exact"`` (population statistics) or ``"ema"`` (the usual momentum updates,
            BN in train mode, everything else in eval mode).
        momentum: for ``"ema"``: override each BN's momentum during the pass.
        progress: called with the number of batches done after each batch.
        channels_last: run the pass in channels-last memory format (2-D convnets; the model's
            layout is restored afterwards). Default: on the CPU, where it is much faster, once
            the first batch has shown that the model makes no layout-sensitive call such as
            ``x.view`` (the report notes it when it does).

    Returns:
        The model. :func:`bnsurgery.last_report` gives a :class:`RecalibrationReport`; a BN
        the data never reached, or that saw fewer than 2 values per channel (empty batches
        count none), keeps its statistics and is listed in ``report.left`` with the reason.

    Raises:
        UsageError: no data, an unknown mode, or a selection without BN layers with statistics.
        DataError: a batch holds NaN or infinite values, the model cannot run on a batch (its
            shape is named), or the new statistics are not finite in a BN's dtype (the layer is
            named). The model is left exactly as it was.

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    >>> batches = [torch.randn(4, 1, 8, 8), torch.randn(2, 1, 8, 8)]
    >>> net = recalibrate(net, batches)
    >>> provenance.last_report(net).batches
    2
    """
    if mode not in ("exact", "ema"):
        raise UsageError(f"unknown mode {mode!r}; valid: exact, ema")
    chosen = [
        (name, bn)
        for name, bn in select_batchnorms(model, include, exclude)
        if isinstance(getattr(bn, "running_mean", None), torch.Tensor)
        and not isinstance(bn.running_mean, nn.parameter.UninitializedBuffer)
    ]
    if not chosen:
        raise UsageError("no BatchNorm layer with running statistics to recalibrate")
    feed = forward or default_forward
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    moments = {name: _Moments() for name, _ in chosen}
    old = {name: {k: b.clone() for k, b in bn.named_buffers(recurse=False)} for name, bn in chosen}
    saved_momentum = {name: getattr(bn, "momentum", None) for name, bn in chosen}
    batches = 0
    check = _DataCheck()
    cast = (
        torch.autocast(device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    layout = _Layout(model, device, channels_last)
    with eval_mode(model), torch.no_grad():
        try:
            for name, bn in chosen:
                if mode == "exact":
                    bn.forward = types.MethodType(_collecting_forward(moments[name]), bn)
                else:
                    bn.train()
                    if momentum is not None:
                        bn.momentum = momentum
            limit = None if num_batches is None else max(num_batches, 0)
            for batch in itertools.islice(data, limit):  # no batch beyond num_batches
                moved = _to(batch, device, layout.active)
                check.batch(moved, batches)
                with cast, layout.batch(), layout.explained():
                    _run(feed, model, moved)
                batches += 1
                if progress is not None:
                    progress(batches)
            if mode == "ema":
                _check_ema(chosen, old, check)
        except BaseException:
            if mode == "ema":  # put back what the momentum updates changed
                for name, bn in chosen:
                    for key, buffer in bn.named_buffers(recurse=False):
                        buffer.copy_(old[name][key])
            raise
        finally:
            layout.restore()
            for name, bn in chosen:
                bn.__dict__.pop("forward", None)
                if mode == "ema":
                    bn.momentum = saved_momentum[name]
    if batches == 0:
        raise UsageError("the data yielded no batch")
    world = _world()
    new: dict[str, tuple[torch.Tensor, torch.Tensor, _Moments]] = {}
    left: list[tuple[str, str]] = []
    if mode == "exact":  # every layer's statistics, checked, before any is written
        for name, bn in chosen:
            stats = moments[name]
            if world > 1:
                stats = _gather(stats, bn.running_mean.numel(), bn.running_mean.device)
            if stats.mean is None or stats.m2 is None:
                seen = "saw only empty batches" if moments[name].empty else "not called"
                left.append((name, f"{seen} on this data: its statistics are kept"))
                continue
            if stats.count < 2:
                left.append(
                    (
                        name,
                        f"saw {stats.count} value per channel, fewer than the 2 a variance "
                        "needs: its statistics are kept",
                    )
                )
                continue
            mean = stats.mean.to(bn.running_mean)
            var = (stats.m2 / (stats.count - 1)).to(bn.running_var)
            if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
                nan = bool(torch.isnan(stats.mean).any() or torch.isnan(stats.m2).any())
                raise check.overflow(name, "BN statistics", bn.running_var.dtype, nan)
            new[name] = (mean, var, stats)
    layers = []
    for name, bn in chosen:
        if mode == "exact":
            if name not in new:
                continue
            mean, var, stats = new[name]
            with torch.no_grad():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                tracked = getattr(bn, "num_batches_tracked", None)
                if isinstance(tracked, torch.Tensor):
                    tracked.fill_(stats.batches)
            samples = stats.count
        else:
            samples = 0
        before = old[name]
        kl = gaussian_kl(
            before["running_mean"], before["running_var"], bn.running_mean, bn.running_var
        )
        kl = kl[torch.isfinite(kl)]
        layers.append(
            LayerDrift(
                name,
                samples,
                float(kl.mean()) if kl.numel() else math.nan,
                float(kl.max()) if kl.numel() else math.nan,
            )
        )
    report = RecalibrationReport(mode, batches, layers, world, left=left)
    if layout.note:
        report.notes.append(layout.note)
    provenance.record_step(model, {"op": "recalibrate", "mode": mode, "batches": batches}, [])
    provenance.set_report(model, report)
    return model
