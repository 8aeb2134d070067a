"""swap: replace BatchNorm by another norm, keeping what the pretrained net learned.

:func:`plan_swap` decides, for every BN, the replacement from the one registry
(:data:`bnsurgery.targets.TARGETS`) or the reason it is left; :func:`swap` applies the plan as
one transaction. The new module carries the BN's affine parameters, eps, dtype, device and
``requires_grad``; timm norm-act layers become the matching norm-act layer with the very same
activation and drop modules.

``swap(..., calibrate=data)`` repairs the swap, which no other tool does: each new norm's
per-channel scale and shift are set by least squares so that, on the input it sees through the
new norms before it, its output matches the eval-mode output of the BN it replaces. One pass
over the data does it (each norm refitted at each batch before it runs; ``schedule=
"sequential"`` is the exact, quadratic-cost order), keeping only per-channel moments. The
report gives the fit error per layer before and after.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .batches import default_forward, map_tensors, run_batch, to_device
from .edits import Replace
from .errors import TraceError, UsageError, brief
from .fused import on_unfused
from .hooks import call_input, user_hooks_suspended
from .norms import check_finite, iter_batchnorms
from .plan import Plan, Report, Skip, begin, select, set_report
from .report import swap_text
from .swapfit import SCHEDULES
from .swapfit import calibrate as fit_norms
from .targets import TARGETS
from .tree import as_args, device_of, eval_mode, on_unwrapped

__all__ = ["SCHEDULES", "SwapReport", "Swapped", "plan_swap", "swap"]


@dataclass(frozen=True)
class Swapped:
    """One BN replaced; fit errors are relative RMS errors against the BN's eval output on the
    calibration data, with the BN's own scale and shift (before) and the fitted ones (after)."""

    bn: str
    was: str
    now: str
    detail: str = ""
    fit_error_before: float | None = None
    fit_error_after: float | None = None


@dataclass
class SwapReport(Report):
    """What :func:`swap` did: each BN swapped into what, and what was left and why."""

    target: str = ""
    swapped: list[Swapped] = field(default_factory=list)
    calibrated: bool = False

    def __str__(self) -> str:  # a short table for people; to_dict() for scripts
        return swap_text(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "calibrated": self.calibrated,
            "swapped": [asdict(s) for s in self.swapped],
            "left": [Skip(*s).to_dict() for s in self.left],
            "notes": list(self.notes),
        }


@on_unfused
def plan_swap(
    model: nn.Module,
    to: str | Callable[[nn.Module], nn.Module] = "groupnorm",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    groups: int | None = None,
    group_size: int | None = None,
    dims: str | None = None,
    calibrated: bool = False,
    flat: Iterable[str] = (),
) -> Plan:
    """Plan :func:`swap` without changing anything: one :class:`~bnsurgery.plan.Replace` per BN
    swapped, with the options a checkpoint records (group counts worked out), or a skip.

    Args:
        flat: names of BNs that see one value per channel and sample (a group norm there
            groups at least 16 channels); :func:`swap` finds them on example inputs.
        calibrated: the swap will be calibrated (affine forced, running statistics needed).
        Others as for :func:`swap`.

    Raises:
        UsageError: an unknown target, bad group options or ``dims``, a pattern that selects
            nothing.
    """
    if dims is not None and dims not in ("1d", "2d", "3d"):
        raise UsageError("dims must be one of 1d, 2d, 3d")
    name = to if isinstance(to, str) else getattr(to, "__name__", "callable")
    if isinstance(to, str):
        if to not in TARGETS:
            raise UsageError(f"unknown swap target {to!r}; valid: {', '.join(TARGETS)}")
        entry = TARGETS[to]
    elif not callable(to):
        raise UsageError("to must be a target name or a callable")
    if calibrated and not (isinstance(to, str) and TARGETS[to].fits):
        fittable = ", ".join(n for n, t in TARGETS.items() if t.fits)
        raise UsageError(f"calibration fits scale and shift; valid with: {fittable}")
    chosen, skipped = select(model, include, exclude, statistics=calibrated)
    flat = set(flat)
    opts = {"groups": groups, "group_size": group_size, "dims": dims, "force_affine": calibrated}
    edits: list[Any] = []
    for bn_name, bn in chosen:
        if not isinstance(to, str):
            edits.append(Replace(bn_name, "custom", factory=to))
            continue
        given = {**opts, "flat": bn_name in flat}
        reason = entry.refuses(bn, given)
        if reason is not None:
            skipped.append(Skip(bn_name, reason))
            continue
        edits.append(Replace(bn_name, to, entry.resolve(bn, given)))
    return Plan("swap", edits, skipped, {"op": "swap", "to": name, "swapped": len(edits)})


@on_unwrapped
@on_unfused
def swap(
    model: nn.Module,
    to: str | Callable[[nn.Module], nn.Module] = "groupnorm",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    groups: int | None = None,
    group_size: int | None = None,
    dims: str | None = None,
    calibrate: Iterable[Any] | None = None,
    calibrate_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    schedule: str = "online",
    progress: Callable[[int], None] | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Replace BN layers by another norm, in place.

    Args:
        model: the model; changed in place and returned.
        to: a name from :data:`TARGETS` (``groupnorm``, ``layernorm``, ``instancenorm``,
            ``frozen``, ``syncbatchnorm``, ``batchnorm``, ``identity``) or a callable that takes
            the BN and returns a module.
        include, exclude: glob patterns on BN names.
        groups, group_size: for ``groupnorm``: a group count, or channels per group; default
            the largest count up to 32 that divides the channels.
        dims: for ``batchnorm`` from SyncBatchNorm built elsewhere: ``"1d"``, ``"2d"``, ``"3d"``;
            for ``instancenorm``, ``"1d"`` says BatchNorm1d layers see (N, C, L) inputs.
        calibrate: batches (as for :func:`bnsurgery.recalibrate`); fit each new norm's scale
            and shift by least squares to the eval output of the BN it replaces, on the input
            it sees through the new norms before it (``groupnorm``, ``layernorm`` and
            ``instancenorm`` only).
        calibrate_batches: use at most this many calibration batches.
        forward: ``forward(model, batch)`` for calibration batches.
        schedule: how the fits see each other. ``"online"`` (default): one pass over the
            data, batches streamed; at its first call in each batch a norm is refitted on
            all it has seen so far before it runs, so the norms after it see the fit as it
            stands. ``"sequential"``: exact, norm by norm in forward order, each fitted on
            all the data through the final fits before it; it runs the data once per norm,
            so its cost grows with the square of the depth. On resnet50 (CPU) the online
            calibrated swap to group norm takes 1.3 times a plain forward pass over the same
            data and the sequential one 40 times; online fit errors exceed the exact ones by
            at most 0.003 per norm on the models measured (``benchmarks/results/swap.md``;
            fitting all norms at once from one pass, even refined over 3 more, was far
            worse). With the data as one batch, online is exact.
        progress: called after each batch the model runs with the number run so far (the
            batch count for ``"online"``, batches times new norms for ``"sequential"``).
        example_inputs: a tensor or tuple of positional inputs (else the first calibration
            batch): one eval pass tells which BNs see one value per channel and sample (after
            global pooling), where ``groupnorm`` then groups at least 16 channels, as for
            BatchNorm1d; a group of one value normalises to nothing.

    Returns:
        The model; :func:`bnsurgery.last_report` gives a :class:`SwapReport`.

    Raises:
        UsageError: an unknown target (the valid ones are listed), bad group options, or a
            pattern that selects nothing.
        DataError: a calibration batch holds NaN or infinite values, the model cannot run on
            it (its shape is named), or a fitted scale or shift is not finite in the norm's
            dtype (the layer is named). The model is left exactly as it was: every BN is put
            back. A new norm the data never reaches, or only with empty batches, keeps the
            BN's scale and shift, and the report's notes say so.

    >>> net = swap(nn.Sequential(nn.Conv2d(3, 72, 3), nn.BatchNorm2d(72)), "groupnorm")
    >>> type(net[1]).__name__, net[1].num_groups
    ('GroupNorm', 24)
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    fit = calibrate is not None
    flat: set[str] = set()
    if to == "groupnorm" and (example_inputs is not None or calibrate is not None):
        if example_inputs is None:
            first, calibrate = _peek(calibrate)
            feed = forward or default_forward
            probe = None if first is None else functools.partial(_batch_pass, feed, first)
        else:
            probe = functools.partial(_example_pass, args=as_args(example_inputs))
        if probe is not None:
            flat = _one_value_per_channel(model, probe)
    plan = plan_swap(
        model, to, include, exclude, groups=groups, group_size=group_size, dims=dims,
        calibrated=fit, flat=flat,
    )  # fmt: skip
    if fit or (isinstance(to, str) and TARGETS[to].keeps_statistics):
        what = f"swap to {plan.step['to']}" + (" with calibration" if fit else "")
        check_finite(((e.bn, model.get_submodule(e.bn)) for e in plan.edits), what)
    bns = {e.bn: model.get_submodule(e.bn) for e in plan.edits}
    txn = begin(model, plan)  # all or nothing: a failing edit or fit puts every BN back
    report = SwapReport(
        "swap", [e.bn for e in plan.edits], list(plan.skipped), target=plan.step["to"]
    )
    report.calibrated = fit
    try:
        errors: dict[str, tuple[float, float]] = {}
        if fit and plan.edits:
            placed = [(n, bns[n], model.get_submodule(n)) for n in report.changed]
            errors, report.notes = fit_norms(
                model,
                placed,
                calibrate,
                limit=max(calibrate_batches, 0) if calibrate_batches else None,
                schedule=schedule,
                feed=forward or default_forward,
                progress=progress,
            )
    except BaseException:
        txn.rollback()
        raise
    txn.commit(plan.step)
    for name in report.changed:
        new = model.get_submodule(name)
        detail = f"groups={new.num_groups}" if isinstance(new, nn.GroupNorm) else ""
        before, after = errors.get(name, (None, None))
        was = type(bns[name]).__name__
        report.swapped.append(Swapped(name, was, type(new).__name__, detail, before, after))
    set_report(model, report)
    return model


def _peek(data: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    """The first batch of ``data`` and ``data`` whole again (a generator is not consumed)."""
    if isinstance(data, list | tuple):
        return (data[0] if data else None), data
    it = iter(data)
    first = next(it, None)
    return first, (it if first is None else itertools.chain([first], it))


def _batch_pass(feed: Callable[[nn.Module, Any], Any], batch: Any, model: nn.Module) -> None:
    """Run the model on the first sample of a calibration batch (the shapes each BN sees are
    all the probe needs: a whole batch would cost a quarter or more of a calibrated swap), or
    on the whole batch where one sample does not run."""
    device = device_of(model)
    try:
        first = map_tensors(batch, lambda t: t[:1] if t.dim() else t)  # every tensor's first row
        run_batch(feed, model, to_device(first, device))
    except Exception:  # a batch whose tensors are not all batch-major: the whole batch
        run_batch(feed, model, to_device(batch, device))


def _example_pass(model: nn.Module, args: tuple[Any, ...]) -> None:
    try:
        model(*args)
    except Exception as exc:
        raise TraceError(f"the forward pass on the example inputs failed: {brief(exc)}") from exc


def _one_value_per_channel(model: nn.Module, probe: Callable[[nn.Module], Any]) -> set[str]:
    """The BNs (by name) whose every non-empty input has one value per channel and sample
    ((N, C) or (N, C, 1, 1)), in one eval pass of ``probe`` without the user's hooks."""
    bns = dict(iter_batchnorms(model))
    seen: dict[int, bool] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = call_input(args, kwargs)
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.numel():
            one = x.numel() == x.shape[0] * x.shape[1]
            seen[id(module)] = seen.get(id(module), True) and one

    with user_hooks_suspended(model), eval_mode(model), torch.no_grad():
        handles = [bn.register_forward_pre_hook(hook, with_kwargs=True) for bn in bns.values()]
        try:
            probe(model)
        finally:
            for h in handles:
                h.remove()
    return {name for name, bn in bns.items() if seen.get(id(bn), False)}
