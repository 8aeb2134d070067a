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
the running statistics are only written once the whole pass has succeeded. On the CPU a BN
whose input only it reads (the graph walk proves it: :func:`_normalised_in_place`) normalises
that input in place, instead of into a new tensor.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .batches import DataCheck, default_forward, map_tensors, run_batch, to_device
from .edits import SetStatistics
from .errors import UsageError
from .fused import on_unfused
from .layout import Layout
from .moments import Moments, collecting_forward, counting, gather
from .plan import Plan, Report, Skip, apply, select, set_report
from .report import recalibration_text
from .tree import device_of, eval_mode, on_unwrapped, unwrapped

__all__ = [
    "LayerDrift",
    "RecalibrationPlan",
    "RecalibrationReport",
    "gaussian_kl",
    "plan_recalibrate",
    "recalibrate",
]


@dataclass(frozen=True)
class LayerDrift:
    """How far one BN's statistics moved: per-channel KL(old || new), averaged, and the
    largest single-channel value."""

    name: str
    samples: int
    mean_kl: float
    max_kl: float


@dataclass
class RecalibrationReport(Report):
    """What :func:`recalibrate` did: per layer how far its statistics moved (``layers``), and
    the BN layers whose statistics were kept, with why (``left``: not selected, not called,
    fewer than 2 values)."""

    mode: str = "exact"
    batches: int = 0
    layers: list[LayerDrift] = field(default_factory=list)
    world_size: int = 1

    def __str__(self) -> str:  # a short table for people; to_dict() for scripts
        return recalibration_text(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "batches": self.batches,
            "world_size": self.world_size,
            "notes": list(self.notes),
            "layers": [asdict(layer) for layer in self.layers],
            "left": [Skip(*s).to_dict() for s in self.left],
        }


def gaussian_kl(
    mean0: torch.Tensor, var0: torch.Tensor, mean1: torch.Tensor, var1: torch.Tensor
) -> torch.Tensor:
    """Per-channel KL divergence of N(mean0, var0) from N(mean1, var1), in float64."""
    m0, m1 = mean0.double().cpu(), mean1.double().cpu()
    v0, v1 = var0.double().cpu().clamp_min(1e-12), var1.double().cpu().clamp_min(1e-12)
    return 0.5 * (torch.log(v1 / v0) + (v0 + (m0 - m1) ** 2) / v1 - 1.0)


def _check_ema(
    chosen: list[tuple[str, nn.Module]],
    old: dict[str, dict[str, torch.Tensor]],
    check: DataCheck,
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
@on_unfused
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
        forward: ``forward(model, batch)``; default :func:`default_forward`. On the CPU it is
            called once more, on the first two samples of the first batch, for the graph walk
            that finds the BNs that may normalise in place (user hooks off).
        autocast: run the pass under ``torch.autocast`` with this dtype.
        mode: ``"exact"`` (population statistics) or ``"ema"`` (the usual momentum updates,
            BN in train mode, everything else in eval mode).
        momentum: for ``"ema"``: override each BN's momentum during the pass.
        progress: called with the number of batches done after each batch.
        channels_last: run the pass in channels-last memory format (2-D convnets; the model's
            layout is restored afterwards). Default: on the CPU, where it is much faster, the
            first batch runs in it on trial and the rest follow if that batch made no
            layout-sensitive call such as ``x.view`` and no data-dependent branch (else the
            report notes why, and the first batch runs again in the default layout where what
            it computed could differ).

    Returns:
        The model. :func:`bnsurgery.last_report` gives a :class:`RecalibrationReport`; a BN
        the data never reached, or that saw fewer than 2 values per channel (empty batches
        count none), keeps its statistics and is listed in ``report.left`` with the reason.

    Raises:
        UsageError: no data, an unknown mode, or a pattern that selects nothing.
        DataError: a batch holds NaN or infinite values, the model cannot run on a batch (its
            shape is named), or the new statistics are not finite in a BN's dtype (the layer is
            named). The model is left exactly as it was.

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    >>> batches = [torch.randn(4, 1, 8, 8), torch.randn(2, 1, 8, 8)]
    >>> net = recalibrate(net, batches)
    >>> import bnsurgery
    >>> bnsurgery.last_report(net).batches
    2
    """
    plan = plan_recalibrate(
        model,
        data,
        include=include,
        exclude=exclude,
        num_batches=num_batches,
        device=device,
        forward=forward,
        autocast=autocast,
        mode=mode,
        momentum=momentum,
        progress=progress,
        channels_last=channels_last,
    )
    applied = apply(model, plan)
    layers = [LayerDrift(e.bn, e.samples, e.mean_kl, e.max_kl) for e in plan.edits]
    report = RecalibrationReport(
        "recalibrate",
        applied.changed,
        applied.left,
        applied.notes,
        mode=mode,
        batches=plan.batches,
        layers=layers,
        world_size=plan.world_size,
    )
    set_report(model, report)
    return model


@dataclass
class RecalibrationPlan(Plan):
    """A :class:`~bnsurgery.plan.Plan` of :class:`~bnsurgery.plan.SetStatistics` edits: the
    statistics the data gave, before any is written."""

    mode: str = "exact"
    batches: int = 0
    world_size: int = 1


@on_unfused
def plan_recalibrate(
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
) -> RecalibrationPlan:
    """Run the data through the model and plan the new statistics, without writing any.

    Arguments as for :func:`recalibrate`. The model's statistics, flags, forward methods and
    memory layout are as they were afterwards, also when a batch raises. A model without a BN
    to recalibrate gives an empty plan and reads no data.

    Raises:
        As :func:`recalibrate`.
    """
    if mode not in ("exact", "ema"):
        raise UsageError(f"unknown mode {mode!r}; valid: exact, ema")
    chosen, skipped = select(model, include, exclude)
    step = {"op": "recalibrate", "mode": mode, "batches": 0}
    if not chosen:
        return RecalibrationPlan("recalibrate", [], skipped, step, mode=mode)
    feed = forward or default_forward
    device = torch.device(device) if device is not None else device_of(model)
    moments = {name: Moments() for name, _ in chosen}
    old = {name: {k: b.clone() for k, b in bn.named_buffers(recurse=False)} for name, bn in chosen}
    saved_momentum = {name: getattr(bn, "momentum", None) for name, bn in chosen}
    batches = 0
    check = DataCheck()
    cast = (
        torch.autocast(device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    layout = Layout(model, device, channels_last)
    handles = []
    ema: dict[str, dict[str, torch.Tensor]] = {}
    with eval_mode(model), torch.no_grad():
        try:

            def install(first: Any) -> None:
                in_place = (
                    _normalised_in_place(model, chosen, first, feed, device)
                    if mode == "exact"
                    else set()
                )
                for name, bn in chosen:
                    if mode == "exact":
                        collect = collecting_forward(moments[name], in_place=name in in_place)
                        bn.forward = types.MethodType(collect, bn)
                    else:
                        bn.train()
                        if momentum is not None:
                            bn.momentum = momentum
                        handles.append(
                            bn.register_forward_pre_hook(counting(moments[name]), with_kwargs=True)
                        )

            def run(batch: Any) -> None:
                with cast:
                    run_batch(feed, model, batch)

            def reset() -> None:  # forget a first batch that runs again in another layout
                for name, bn in chosen:
                    moments[name].reset()
                    for key, buffer in bn.named_buffers(recurse=False):
                        buffer.copy_(old[name][key])

            limit = None if num_batches is None else max(num_batches, 0)
            for batch in itertools.islice(data, limit):  # no batch beyond num_batches
                moved = to_device(batch, device)
                check.batch(moved, batches)
                if batches == 0:
                    install(moved)
                layout.run(run, moved, reset)
                batches += 1
                if progress is not None:
                    progress(batches)
            if mode == "ema":
                _check_ema(chosen, old, check)
                ema = {
                    name: {k: b.clone() for k, b in bn.named_buffers(recurse=False)}
                    for name, bn in chosen
                }
        finally:
            for handle in handles:
                handle.remove()
            if mode == "ema":  # the pass only measures: the buffers go back until apply
                for name, bn in chosen:
                    for key, buffer in bn.named_buffers(recurse=False):
                        buffer.copy_(old[name][key])
            layout.restore()
            for name, bn in chosen:
                bn.__dict__.pop("forward", None)
                if mode == "ema":
                    bn.momentum = saved_momentum[name]
    if batches == 0:
        raise UsageError("the data yielded no batch")
    world = _world()
    edits: list[SetStatistics] = []
    for name, bn in chosen:
        stats = moments[name]
        if mode == "ema":
            mean, var = ema[name]["running_mean"], ema[name]["running_var"]
            tracked = ema[name].get("num_batches_tracked")
            count = int(tracked) if tracked is not None and tracked.dim() == 0 else None
            edits.append(_edit(name, old[name], mean, var, count, stats.count))
            continue
        if world > 1:
            stats = gather(stats, bn.running_mean.numel(), bn.running_mean.device)
        if stats.mean is None or stats.m2 is None:
            seen = "saw only empty batches" if moments[name].empty else "not called"
            skipped.append(Skip(name, f"{seen} on this data: its statistics are kept"))
            continue
        if stats.count < 2:
            skipped.append(
                Skip(
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
        edits.append(_edit(name, old[name], mean, var, stats.batches, stats.count))
    step["batches"] = batches
    notes = [layout.note] if layout.note else []
    return RecalibrationPlan(
        "recalibrate", edits, skipped, step, notes, mode=mode, batches=batches, world_size=world
    )


def _normalised_in_place(
    model: nn.Module,
    chosen: list[tuple[str, nn.Module]],
    batch: Any,
    feed: Callable[[nn.Module, Any], Any],
    device: torch.device,
) -> set[str]:
    """The BNs that may normalise their input in place during an exact pass on the CPU (see
    :func:`~bnsurgery.moments.collecting_forward`): those a fold could fold into the layer
    before them (the graph walk, through the pass's own ``feed``, on the first two samples of
    every tensor of the first batch), which proves the layer's output is read by that BN
    alone, called once, directly, seen by no user hook and not an output; on a model that
    makes no data-dependent decision, so that every batch takes the path walked. Empty where
    the walk fails (the pass then runs as it would without it) and for a model a wrapper runs
    (``torch.compile``, DDP: the walk would not see inside)."""
    from .errors import BnSurgeryError
    from .foldplan import plan_fold
    from .graph import trace

    if device.type != "cpu" or unwrapped(model) is not model:
        return set()
    two = map_tensors(batch, lambda t: t[:2] if t.dim() else t)
    try:
        walked = trace(model, two, feed=feed)
        if any(node.decisions for node in walked.graph.nodes):
            return set()
        names = [name for name, _ in chosen]
        fold = plan_fold(model, include=names, placements=("producer",), walked=walked)
    except BnSurgeryError:  # the pass itself says what is wrong with the batch
        return set()
    return {e.bn for e in fold.edits if e.indirect() is None}


def _edit(
    name: str,
    old: dict[str, torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    batches: int | None,
    samples: int,
) -> SetStatistics:
    """The new statistics of one BN, with their drift from the old ones."""
    kl = gaussian_kl(old["running_mean"], old["running_var"], mean, var)
    kl = kl[torch.isfinite(kl)]
    return SetStatistics(
        name,
        mean,
        var,
        batches,
        samples,
        float(kl.mean()) if kl.numel() else math.nan,
        float(kl.max()) if kl.numel() else math.nan,
    )
