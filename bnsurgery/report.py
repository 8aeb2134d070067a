"""Rendering reports as text tables for people and JSON for scripts. No printing here."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:  # the report classes render themselves with these functions (str(report))
    from .folding import FoldReport
    from .freezing import FreezeReport
    from .plan import Plan, Report, Skip
    from .recalibration import RecalibrationReport
    from .surveying import Survey
    from .swapping import SwapReport

__all__ = [
    "drift_plot",
    "fold_text",
    "freeze_text",
    "plan_text",
    "recalibration_text",
    "report_text",
    "survey_text",
    "swap_text",
    "table",
    "to_json",
]


def to_json(data: Any) -> str:
    """JSON text of a report (anything with ``to_dict``, or plain data)."""
    if hasattr(data, "to_dict"):
        data = data.to_dict()

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], width: int | None = None) -> str:
    """A plain aligned text table that fits ``width`` columns (default: the terminal's, or
    ``$COLUMNS``, or 100): the widest columns narrow until it fits, and their cells wrap onto
    the next lines rather than being cut, so nothing said is lost.

    >>> print(table(["bn", "result"], [["a", "left: " + "x " * 6]], width=16))
    bn  result
    --  ------------
    a   left: x x x
        x x x
    """
    width = width or shutil.get_terminal_size((100, 24)).columns
    cells = [["" if v is None else " ".join(str(v).split()) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    floors = [max(12, len(h)) for h in headers]
    while sum(widths) + 2 * (len(widths) - 1) > width:
        widest = max(range(len(widths)), key=lambda i: widths[i] - floors[i])
        if widths[widest] <= floors[widest]:
            break  # as narrow as it reads well: wider than the terminal, still whole
        widths[widest] -= 1
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        parts = [  # words stay whole: a name or a number cut in two misleads
            textwrap.wrap(c, w, break_on_hyphens=False, break_long_words=False) or [""]
            for c, w in zip(row, widths, strict=True)
        ]
        for k in range(max(len(p) for p in parts)):
            cut = [
                (p[k] if k < len(p) else "").ljust(w) for p, w in zip(parts, widths, strict=True)
            ]
            lines.append("  ".join(cut).rstrip())
    return "\n".join(lines)


#: The reason every surgery gives for a BN its patterns left out (bnsurgery.plan.NOT_SELECTED).
_NOT_SELECTED = "not selected"


def _left_rows(left: Sequence[Skip], *cells: str) -> list[list[Any]]:
    """One row per BN left for a reason of its own; BNs the patterns left out are only
    counted (:func:`_left_count`), so ``--include layer1`` does not list the other layers."""
    return [[s.bn, f"left: {s.reason}", *cells] for s in left if s.reason != _NOT_SELECTED]


def _layers(n: int) -> str:
    return f"{n} BN layer" + ("" if n == 1 else "s")


def _left_count(left: Sequence[Skip]) -> str:
    unselected = sum(1 for s in left if s.reason == _NOT_SELECTED)
    return f"left {len(left)}" + (f" ({unselected} not selected)" if unselected else "")


def plan_text(plan: Plan) -> str:
    """A plan for people: what each edit will do, what is left and why."""
    rows: list[list[Any]] = [[edit.bn, str(edit)] for edit in plan.edits]
    rows += [[s.bn, f"left: {s.reason}"] for s in plan.skipped if s.reason != _NOT_SELECTED]
    lines = [table(["bn", "plan"], rows)] if rows else []
    lines.append(f"plan: {plan.operation} {_layers(len(plan.edits))}, {_left_count(plan.skipped)}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def report_text(report: Report) -> str:
    """Any surgery's report for people: the BNs changed, and those left with why."""
    rows = [[name, report.operation] for name in report.changed]
    rows += [[s.bn, f"left: {s.reason}"] for s in report.left if s.reason != _NOT_SELECTED]
    lines = [table(["bn", "result"], rows)] if rows else []
    lines.append(f"{report.operation}: {_layers(len(report.changed))}, {_left_count(report.left)}")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def fold_text(report: FoldReport) -> str:
    """A fold report for people: one line per BN, then a summary."""
    rows: list[list[Any]] = []
    for e in report.folded:
        rows.append([e.bn, "folded " + str(e).removeprefix("-> ")])
    rows += _left_rows(report.left)
    lines = [table(["bn", "result"], rows)] if rows else []
    summary = f"folded {len(report.folded)} of {_layers(report.bn_count)} ({report.method} walk)"
    summary += f", {_left_count(report.left)}" if report.left else ""
    if report.verified and report.max_rel_error is not None:
        summary += f"; verified: max relative error {report.max_rel_error:.2e}"
        summary += f" (tolerance {report.tolerance:.0e})"
    lines.append(summary)
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def survey_text(result: Survey) -> str:
    """A survey for people: one row per BN layer, then the totals and any notes."""
    rows = [
        [
            info.name,
            info.type,
            info.channels,
            f"{info.eps:g}" if info.eps is not None else "",
            "" if info.momentum is None else f"{info.momentum:g}",
            "train" if info.training else "eval",
            "yes" if info.frozen else "no",
            "ok" if info.healthy else "; ".join(info.health),
            info.fold,
        ]
        for info in result.layers
    ]
    headers = ["name", "type", "C", "eps", "momentum", "mode", "frozen", "health", "fold"]
    lines = [table(headers, rows)] if rows else []
    unhealthy = sum(1 for i in result.layers if not i.healthy)
    lines.append(
        f"{_layers(len(result.layers))}, {result.foldable} foldable, {unhealthy} with "
        f"statistics problems"
        + (f" (fold plan from a {result.fold_method} walk)" if result.fold_method else "")
    )
    if result.fold_error:
        lines.append(f"no fold plan: {result.fold_error}")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def freeze_text(report: FreezeReport) -> str:
    """A freeze or unfreeze report for people."""
    verb = "froze" if report.operation == "freeze" else "unfroze"
    fused = dict(report.fused)
    unfused = {s.bn: s.reason for s in report.unfused}
    rows = [
        [name, f"{verb}, computed inside {fused[name]}" if name in fused else verb]
        + ([f"not fused: {unfused[name]}" if name in unfused else ""] if unfused else [])
        for name in report.changed
    ] + [row + ([""] if unfused else []) for row in _left_rows(report.left)]
    head = ["bn", "result"] + (["why"] if unfused else [])
    lines = [table(head, rows)] if rows else []
    what = " (statistics only; weight and bias stay trainable)" if report.train_affine else ""
    lines.append(f"{verb} {_layers(len(report.changed))}{what}, {_left_count(report.left)}")
    if fused or unfused:
        lines.append(
            f"fused {len(fused)} into the conv or linear before them (their unnormalised "
            f"output is not kept for the backward pass); {len(unfused)} stay plain frozen"
        )
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def recalibration_text(report: RecalibrationReport) -> str:
    """Per layer: samples seen and how far the statistics moved (KL of old from new)."""
    rows = [[d.name, d.samples, f"{d.mean_kl:.4g}", f"{d.max_kl:.4g}"] for d in report.layers]
    lines = [table(["bn", "values per channel", "mean KL(old||new)", "max KL"], rows)]
    where = f" on {report.world_size} processes" if report.world_size > 1 else ""
    batches = f"{report.batches} batch" + ("" if report.batches == 1 else "es")
    done = f"recalibrated {_layers(len(report.layers))} over {batches}"
    lines.append(f"{done}{where} ({report.mode})")
    lines += [f"left {s.bn}: {s.reason}" for s in report.left if s.reason != _NOT_SELECTED]
    if any(s.reason == _NOT_SELECTED for s in report.left):
        lines.append(_left_count(report.left))
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def drift_plot(report: RecalibrationReport, path: str, *, force: bool = False) -> None:
    """A PNG bar chart of the mean per-channel KL per layer (needs matplotlib), written
    atomically (:func:`bnsurgery.outputs.atomic_write`).

    Args:
        report: the recalibration report.
        path: the PNG file to write.
        force: replace an existing file.

    Raises:
        UsageError: matplotlib is not installed.
        OutputError: the file exists (without ``force``) or cannot be written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'bnsurgery[plot]'") from exc
    from .outputs import atomic_write

    names = [d.name for d in report.layers]
    fig, ax = plt.subplots(figsize=(max(6.0, len(names) * 0.25), 4.0))
    ax.bar(range(len(names)), [d.mean_kl for d in report.layers])
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("mean KL(old || new) per channel")
    ax.set_title(f"BN statistics drift over {report.batches} batches")
    fig.tight_layout()
    from pathlib import Path

    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120), force=force)
    finally:
        plt.close(fig)


def swap_text(report: SwapReport) -> str:
    """Each BN swapped into what (with the fit error when calibrated), and what was left."""

    def fit(before: float | None, after: float | None) -> str:
        return "" if after is None else f"fit error {before:.3g} -> {after:.3g}"

    rows = [
        [s.bn, f"{s.was} -> {s.now}", s.detail, fit(s.fit_error_before, s.fit_error_after)]
        for s in report.swapped
    ]
    rows += [[s.bn, "left", s.reason, ""] for s in report.left if s.reason != _NOT_SELECTED]
    lines = [table(["bn", "swap", "detail", "repair"], rows)] if rows else []
    how = " and repaired on calibration data" if report.calibrated else ""
    lines.append(
        f"swapped {_layers(len(report.swapped))} to {report.target}{how}; "
        + _left_count(report.left)
    )
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
