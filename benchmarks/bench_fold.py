"""Benchmark ``bnsurgery.fold``: CPU inference latency after folding, and the cost of folding.

Two parts, run together so their figures come from the same conditions:

latency
    For each model and batch size, four variants of the same random-init timm model (BN
    statistics randomised with :func:`bnsurgery.testing.randomize_bn`), eval mode,
    ``torch.no_grad``, float32, 224x224:

    * ``original``: the model as built;
    * ``folded``: ``bnsurgery.fold`` on a deepcopy;
    * ``identity``: the lower bound, a deepcopy with every BN module replaced by what fold
      leaves in its place (``bnsurgery.norms.remainder_of``: ``nn.Identity``, or the activation
      and drop of a timm norm-act layer). It computes a different function; it is the fastest
      any BN folding could make the model;
    * ``identity+bias``: the identity bound plus the bias that the fold gives each conv that
      had none (timm convs before a BN have ``bias=False``). A fold must apply the BN's shift
      somewhere, so this is the bound for a fold that leaves no other overhead: the folded
      model differs from it only in weight values (and in any BN the fold left).

    The variants run interleaved, one forward each per round, in orders where each variant
    follows every other equally often (so drift on a shared machine, and the slowdown a model
    sees right after a different model ran, hit all of them alike); the rounds are split into
    blocks, each on fresh deepcopies after a warm-up (so no variant is stuck with an unlucky
    memory layout). Per variant the
    median time is reported; the ratios are medians of the per-round ratios (paired), with
    their interquartile range as a noise figure.

fold-memory
    How much fold grows the process at its peak, against one ``torch.no_grad`` forward pass
    on the same input, each in a fresh process (glibc set as in :mod:`_common`, the peak
    reset by the kernel just before the measured call). Fold keeps the old weights of the
    layers it folds into until the output is verified, so it should need about one forward
    pass plus those weights; ``efficientnet_b4`` at 320 px is a case where the final output
    moves beyond tolerance on random weights and the layer-by-layer check runs.

fold-time
    ``bnsurgery.fold(model, x)`` (x: batch 1 at 224, trace + fold + verification) against
    ``torch.fx.experimental.optimization.fuse`` on the same model, each on a fresh deepcopy
    (the copy is not timed), median of a few runs, and how many BN each removes.

Writes ``fold.md`` and ``fold.json`` in ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from _common import MALLOC_ENV, high_water_mb, reset_peak, rss_mb
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

import bnsurgery
from bnsurgery.errors import VerificationError
from bnsurgery.norms import is_batchnorm
from bnsurgery.targets import remainder_of
from bnsurgery.testing import randomize_bn
from bnsurgery.verify import max_relative_error

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = (
    "resnet50",
    "mobilenetv3_large_100",
    "efficientnet_b0",
    "regnety_016",
    "densenet121",
)
VARIANTS = ("original", "folded", "identity", "identity+bias")
COMPARED = ("original", "identity", "identity+bias")  # folded / each of these
TARGET = 1.01  # folded / identity bound
MEMORY_CASES = (  # model, batch, size
    ("resnet50", 16, 224),
    ("mobilenetv3_large_100", 16, 224),
    ("efficientnet_b4", 2, 320),
)


# ----------------------------------------------------------------------------- helpers


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in _csv(text)]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p25": _quantile(values, 0.25),
        "p75": _quantile(values, 0.75),
        "min": min(values),
        "n": len(values),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _command() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    python = Path(sys.executable)
    try:
        python_text = str(python.relative_to(ROOT))
    except ValueError:
        python_text = "python"
    return shlex.join([python_text, script_text, *sys.argv[1:]])


def build(name: str, seed: int) -> nn.Module:
    """A random-init timm model with randomised BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    randomize_bn(model, seed)
    return model.eval()


def identity_bound(model: nn.Module) -> nn.Module:
    """A deepcopy with every BN module replaced by what a fold leaves in its place."""
    bound = copy.deepcopy(model)
    slots = [
        (parent, child_name, child)
        for _, parent in bound.named_modules(remove_duplicate=False)
        for child_name, child in parent._modules.items()
        if child is not None and is_batchnorm(child)
    ]
    for parent, child_name, child in slots:
        setattr(parent, child_name, remainder_of(child))
    return bound


def bias_bound(bound: nn.Module, folded: nn.Module) -> nn.Module:
    """The identity bound plus a copy of every bias the fold added (where the bound has none)."""
    out = copy.deepcopy(bound)
    folded_modules = dict(folded.named_modules())
    for name, module in out.named_modules():
        source = folded_modules.get(name)
        if (
            isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)
            and module.bias is None
            and source is not None
            and isinstance(getattr(source, "bias", None), torch.Tensor)
        ):
            module.bias = nn.Parameter(
                source.bias.detach().clone(), requires_grad=source.bias.requires_grad
            )
    return out


def _bn_modules(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_batchnorm(m))


def _type_counts(model: nn.Module) -> Counter[str]:
    return Counter(type(m).__name__ for m in model.modules())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


# ----------------------------------------------------------------------------- latency


def fold_copy(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:
    """Fold a deepcopy, verified in float32.

    A random-init model can be so ill-conditioned in float32 that the unchanged model does not
    reproduce its own output to 1e-4 (regnety_016 did, float32 vs float64 differing by ~0.2,
    before ``randomize_bn`` kept zero-initialised residual BN small). Float32 verification then
    cannot pass whatever the fold does, so the fold is done on a float64 copy, verified there
    (tolerance 1e-9), and cast back to float32: the fold maths is float64 either way, so the
    float32 weights are the same. The result says when this happened.
    """
    info: dict[str, Any] = {"verified_in": "float32"}
    try:
        folded = bnsurgery.fold(copy.deepcopy(model), x)
    except VerificationError as exc:
        reference64 = copy.deepcopy(model).double()
        with torch.no_grad():
            noise = max_relative_error(reference64(x.double()), model(x))
        folded = bnsurgery.fold(reference64, x.double())
        info = {
            "verified_in": "float64",
            "float32_failure": _first_line(exc),
            "float32_vs_float64_unfolded": noise,
        }
    report = bnsurgery.last_report(folded)
    folded = folded.float()  # no-op for a float32 fold
    left = Counter(s.reason for s in report.left)
    info.update(
        bn_count=report.bn_count,
        bn_folded=len(report.folded),
        bn_left=len(report.left),
        bias_added=sum(1 for e in report.folded if e.adds_bias),
        max_rel_error=report.max_rel_error,
        left_reasons=dict(left.most_common()),
    )
    return folded, info


def structure_diff(folded: nn.Module, bound: nn.Module) -> dict[str, int]:
    """Module types that differ in count between the folded model and the identity bound."""
    a, b = _type_counts(folded), _type_counts(bound)
    return {k: a[k] - b[k] for k in sorted(set(a) | set(b)) if a[k] != b[k]}


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` variants in which each variant runs right after every other equally often
    (a Williams design: ``n`` orders for even ``n``, ``2n`` for odd).

    The order matters: a model runs measurably slower right after another model than right after
    itself or a similar one (caches, allocator state). With a plain rotation every variant always
    follows the same one (mobilenetv3 batch 1: folded, always run after the original, measured 3%
    slower than the identity bound; 0.3% with balanced orders).
    """
    first: list[int] = []
    low, high = 0, n - 1
    for i in range(n):
        if i % 2 == 0:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    rows = [[(v + shift) % n for v in first] for shift in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


@torch.no_grad()
def time_round_robin(
    models: dict[str, nn.Module], x: torch.Tensor, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per forward, ``repeats`` samples per variant, interleaved in balanced orders."""
    names = list(models)
    orders = [[names[i] for i in row] for row in balanced_orders(len(names))]
    for r in range(warmup):
        for name in orders[r % len(orders)]:
            models[name](x)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for name in orders[r % len(orders)]:
                start = time.perf_counter()
                models[name](x)
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def _paired(times: dict[str, list[float]], other: str) -> list[float]:
    return [f / o for f, o in zip(times["folded"], times[other], strict=True)]


def time_in_blocks(
    variants: dict[str, nn.Module],
    x: torch.Tensor,
    warmup: int,
    repeats: int,
    blocks: int,
    compared: tuple[str, ...] = COMPARED,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Split the rounds into blocks, each on fresh deepcopies of every variant.

    A given copy of a model can run a percent or two faster or slower than another copy of the
    same model (where its tensors landed in memory), which no interleaving averages out; fresh
    copies per block do. Returns all samples and, per ratio, the median of each block.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    per_block: dict[str, list[float]] = {f"folded/{o}": [] for o in compared}
    sizes = [repeats // blocks + (1 if i < repeats % blocks else 0) for i in range(blocks)]
    for size in sizes:
        if size == 0:
            continue
        copies = {k: copy.deepcopy(v) for k, v in variants.items()} if blocks > 1 else variants
        block = time_round_robin(copies, x, warmup, size)
        del copies
        for name, values in block.items():
            times[name] += values
        for other in compared:
            per_block[f"folded/{other}"].append(statistics.median(_paired(block, other)))
    return times, per_block


def bench_latency(
    name: str, batches: list[int], warmup: int, repeats: int, blocks: int, seed: int
) -> list[dict[str, Any]]:
    model = build(name, seed)
    x1 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    folded, info = fold_copy(model, x1)
    bound = identity_bound(model)
    diff = structure_diff(folded, bound)
    variants = {
        "original": model,
        "folded": folded,
        "identity": bound,
        "identity+bias": bias_bound(bound, folded),
    }
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed + batch))
        load_before = _loadavg()
        times, per_block = time_in_blocks(variants, x, warmup, repeats, blocks)
        load_after = _loadavg()
        per_round = {f"folded/{other}": _paired(times, other) for other in COMPARED}
        row = {
            "model": name,
            "batch": batch,
            "ms": {v: {k: s * 1e3 for k, s in _summary(times[v]).items()} for v in VARIANTS},
            "ratios": {k: _summary(v) for k, v in per_round.items()},
            "ratios_per_block": per_block,
            "bn": info,
            "structure_diff_folded_minus_identity": diff,
            "load1_before_after": [v[0] if v else None for v in (load_before, load_after)],
        }
        row["ratios_of_minima"] = {
            f"folded/{other}": min(times["folded"]) / min(times[other]) for other in COMPARED
        }
        for v in row["ms"].values():
            v["n"] = int(v["n"])
        for v in row["ratios"].values():
            v["n"] = int(v["n"])
        rows.append(row)
        times_text = "  ".join(f"{v} {row['ms'][v]['median']:.1f}" for v in VARIANTS)
        ratio_text = "  ".join(
            f"/{o} {row['ratios'][f'folded/{o}']['median']:.3f}" for o in COMPARED
        )
        print(f"  {name:<22} b{batch:<2} ms: {times_text}   folded: {ratio_text}", flush=True)
    return rows


# ----------------------------------------------------------------------------- fold time


_BN_FUNCTIONS = (F.batch_norm, torch.batch_norm)


def _bn_ops(gm: torch.fx.GraphModule) -> int:
    """BN operations in an fx graph: calls of BN modules and functional batch_norm calls."""
    modules = dict(gm.named_modules())
    count = 0
    for node in gm.graph.nodes:
        is_module = node.op == "call_module" and is_batchnorm(modules[node.target])
        is_function = node.op == "call_function" and node.target in _BN_FUNCTIONS
        count += is_module or is_function
    return count


def bench_fold_time(name: str, runs: int, seed: int) -> dict[str, Any]:
    model = build(name, seed)
    x1 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = model(x1)
    row: dict[str, Any] = {"model": name, "bn_modules": _bn_modules(model), "dtype": "float32"}
    try:  # untimed first run: first-call overheads, and does float32 verification pass?
        bnsurgery.fold(copy.deepcopy(model), x1)
    except VerificationError as exc:  # see fold_copy: time both methods in float64 instead
        model, x1 = model.double(), x1.double()
        with torch.no_grad():
            reference = model(x1)
        row.update(dtype="float64", float32_failure=_first_line(exc))

    ours: list[float] = []
    report = None
    for _ in range(runs):
        work = copy.deepcopy(model)
        gc.collect()
        start = time.perf_counter()
        bnsurgery.fold(work, x1)
        ours.append(time.perf_counter() - start)
        report = bnsurgery.last_report(work)
    assert report is not None
    row["bnsurgery"] = {
        "seconds": _summary(ours),
        "bn_total": report.bn_count,
        "bn_removed": len(report.folded),
        "max_rel_error": report.max_rel_error,
        "verified": report.verified,
    }

    fx_row: dict[str, Any]
    try:
        bn_before = _bn_ops(torch.fx.symbolic_trace(copy.deepcopy(model)))
    except Exception as exc:  # fx cannot trace every model
        fx_row = {"status": "untraceable", "error": _first_line(exc)}
    else:
        fx_times: list[float] = []
        fused = None
        try:
            fx_fuse(copy.deepcopy(model), inplace=True)  # untimed first run
            for _ in range(runs):
                work = copy.deepcopy(model)
                gc.collect()
                start = time.perf_counter()
                fused = fx_fuse(work, inplace=True)
                fx_times.append(time.perf_counter() - start)
            assert fused is not None
            with torch.no_grad():
                error = max_relative_error(reference, fused(x1))
            fx_row = {
                "status": "ok",
                "seconds": _summary(fx_times),
                "bn_total": bn_before,
                "bn_removed": bn_before - _bn_ops(fused),
                "max_rel_error": error,
            }
        except Exception as exc:
            fx_row = {"status": "failed", "error": _first_line(exc)}
    row["fx_fuse"] = fx_row
    ours_s = row["bnsurgery"]["seconds"]["median"]
    fx_text = (
        f"{fx_row['seconds']['median']:.3f} s, {fx_row['bn_removed']}/{fx_row['bn_total']}"
        if fx_row["status"] == "ok"
        else fx_row["status"]
    )
    print(
        f"  {name:<24} bnsurgery {ours_s:.3f} s, {len(report.folded)}/"
        f"{report.bn_count}   fx fuse {fx_text}",
        flush=True,
    )
    return row


def memory_child(kind: str, name: str, batch: int, size: int, seed: int) -> None:
    """In a fresh process: peak growth of one forward pass or of fold, as JSON on stdout."""
    model = build(name, seed)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    out: dict[str, Any] = {
        "weights_mb": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    }
    gc.collect()
    before = rss_mb()
    reset_peak()
    if kind == "forward":
        with torch.no_grad():
            model(x)
    else:
        bnsurgery.fold(model, x)
        report = bnsurgery.last_report(model)
        assert report is not None
        out["folded"] = len(report.folded)
        out["layer_check"] = bool(report.notes)
    out["growth_mb"] = high_water_mb() - before
    print(json.dumps(out))


def bench_fold_memory(name: str, batch: int, size: int, seed: int) -> dict[str, Any]:
    def child(kind: str) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--memory-child", kind, name, str(batch), str(size)]
        done = subprocess.run(
            [*cmd, "--seed", str(seed)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **MALLOC_ENV},
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    forward, fold = child("forward"), child("fold")
    row = {
        "model": name,
        "batch": batch,
        "size": size,
        "weights_mb": fold["weights_mb"],
        "forward_mb": forward["growth_mb"],
        "fold_mb": fold["growth_mb"],
        "folded": fold["folded"],
        "layer_check": fold["layer_check"],
    }
    print(
        f"  {name:<24} batch {batch} {size} px: forward +{row['forward_mb']:.0f} MB, fold "
        f"+{row['fold_mb']:.0f} MB (weights {row['weights_mb']:.0f} MB)",
        flush=True,
    )
    return row


# ----------------------------------------------------------------------------- output


def _fmt_err(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def _secs(summary: dict[str, float]) -> str:
    return f"{summary['median']:.3f} ({summary['min']:.3f})"


def _iqr(summary: dict[str, float], digits: int = 3) -> str:
    return f"{summary['p25']:.{digits}f} to {summary['p75']:.{digits}f}"


def _target(row: dict[str, Any]) -> str:
    if row["ratios"]["folded/identity"]["median"] <= TARGET:
        return "met"
    if row["bn"]["bn_left"]:
        return "BN left"
    if row["ratios"]["folded/identity+bias"]["median"] <= TARGET:
        return "bias"
    return "MISSED"


def render_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# bnsurgery fold benchmark",
        "",
        "Generated by `benchmarks/bench_fold.py` (see `benchmarks/README.md`) with:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| date | {meta['date']} |",
        f"| torch / timm | {meta['torch']} / {meta['timm']} |",
        f"| python | {meta['python']} |",
        f"| CPU | {meta['cpu']} ({meta['logical_cpus']} logical CPUs) |",
        f"| torch threads | {meta['threads']} |",
        f"| OpenMP/MKL environment | {meta['omp_env'] or 'none set'} |",
        f"| load average at start / end | {meta['loadavg_start']} / {meta['loadavg_end']} |",
        f"| wall time | {meta['wall_seconds']:.0f} s |",
        "",
        "Models are timm architectures with random weights (no download) and randomised BN "
        "statistics, eval mode, `torch.no_grad`, float32, 224x224.",
        "",
    ]
    loads = [v[0] for v in (meta["loadavg_start"], meta["loadavg_end"]) if v]
    if loads and max(loads) > meta["threads"] + 0.5:
        lines += [
            f"**Noise warning**: the 1-minute load average reached {max(loads):.1f} on "
            f"{meta['logical_cpus']} logical CPUs, so other processes competed for the CPU; "
            "compare the IQRs below before trusting differences of a few percent.",
            "",
        ]
    latency = result.get("latency", [])
    if latency:
        settings = result["settings"]
        lines += [
            "## Inference latency (CPU)",
            "",
            f"ms per batch: median of {settings['repeats']} rounds in {settings['blocks']} "
            "blocks, each block on fresh deepcopies of every variant and starting with "
            f"{settings['warmup']} untimed rounds; each round runs every variant once, in "
            "orders where each variant follows every other equally often. `identity` is the "
            "lower bound: every BN replaced by `nn.Identity` (or the activation/drop a timm "
            "norm-act layer keeps). "
            "`identity+bias` is that bound plus the conv biases the fold adds (the BN shift has "
            "to go somewhere): the bound for a fold with no other overhead. Ratios: median of "
            "the per-round (paired) ratios, with their interquartile range (IQR) as a noise "
            "figure. 'From minima': the same three ratios from each variant's fastest round, a "
            "cross-check robust to interference from other processes. "
            f"Target: folded/identity ≤ {TARGET:.2f}. Column 'target': `met`; `bias` when "
            "missed but folded/(identity+bias) meets it, i.e. the gap is the conv biases a fold "
            "must add; `BN left` when some BN cannot be folded, so the bound is out of reach; "
            "`MISSED` otherwise.",
            "",
            "| model | batch | original ms | folded ms | identity ms | identity+bias ms "
            "| folded/original (IQR) | folded/identity (IQR) | folded/(identity+bias) (IQR) "
            "| from minima: f/o, f/i, f/(i+b) | BN folded/total | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in latency:
            ms, ratios, mins = row["ms"], row["ratios"], row["ratios_of_minima"]
            cells = [row["model"], str(row["batch"])]
            cells += [f"{ms[v]['median']:.1f}" for v in VARIANTS]
            cells += [
                f"{ratios[f'folded/{o}']['median']:.3f} ({_iqr(ratios[f'folded/{o}'])})"
                for o in COMPARED
            ]
            cells.append(", ".join(f"{mins[f'folded/{o}']:.3f}" for o in COMPARED))
            cells.append(f"{row['bn']['bn_folded']}/{row['bn']['bn_count']}")
            cells.append(_target(row))
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Noise figures: each variant's spread (ms, 25th to 75th percentile), the range of "
            "folded/identity over the blocks (each block's median), and the 1-minute load "
            "average before and after each measurement:",
            "",
            "| model | batch | "
            + " | ".join(VARIANTS)
            + " | folded/identity per block | load avg before / after |",
            "|---|---:|" + "---:|" * len(VARIANTS) + "---:|---:|",
        ]
        for row in latency:
            ms = row["ms"]
            blocks = row["ratios_per_block"]["folded/identity"]
            loads = " / ".join("?" if v is None else f"{v:.2f}" for v in row["load1_before_after"])
            lines.append(
                f"| {row['model']} | {row['batch']} | "
                + " | ".join(_iqr(ms[v], 1) for v in VARIANTS)
                + f" | {min(blocks):.3f} to {max(blocks):.3f} | {loads} |"
            )
        lines += ["", "### Folded model vs identity bound: what differs", ""]
        seen = set()
        for row in latency:
            if row["model"] in seen:
                continue
            seen.add(row["model"])
            bn = row["bn"]
            diff = row["structure_diff_folded_minus_identity"]
            diff_text = ", ".join(f"{k} {v:+d}" for k, v in diff.items()) or "none"
            text = (
                f"- **{row['model']}**: {bn['bn_folded']}/{bn['bn_count']} BN folded "
                f"(max rel. error {_fmt_err(bn['max_rel_error'])}), {bn['bias_added']} conv "
                f"biases added; module types, folded minus identity: {diff_text}."
            )
            if bn["verified_in"] != "float32":
                text += (
                    f" Verified in float64: the float32 fold failed verification "
                    f"({bn['float32_failure']}), but the unfolded model itself differs from its "
                    f"float64 copy by {bn['float32_vs_float64_unfolded']:.2g} in float32 "
                    "(random-init ill-conditioning, not the fold)."
                )
            if bn["left_reasons"]:
                reasons = "; ".join(f"{n} x {r}" for r, n in bn["left_reasons"].items())
                text += f" BN left: {reasons}."
            lines.append(text)
        lines.append("")
    fold_time = result.get("fold_time", [])
    if fold_time:
        settings = result["settings"]
        lines += [
            "## Fold time",
            "",
            f"Seconds per fold, median (and minimum) of {settings['fold_runs']} runs after one "
            "untimed run, each on a fresh deepcopy "
            "(copy not timed). `bnsurgery.fold(model, x)` with x of batch 1 at 224: a traced "
            "forward pass, the fold, and a verifying forward pass. "
            "`torch.fx.experimental.optimization.fuse(model, inplace=True)`: symbolic trace and "
            "fusion of `nn.Conv/Linear` + `nn.BatchNorm` module pairs, no verification. "
            "BN removed counts BN modules for bnsurgery and BN operations in the fx graph for "
            "fx (timm norm-act layers are traced through, so fx sees `F.batch_norm` calls it "
            "does not fuse). Max rel. error is against the original on x.",
            "",
            "| model | dtype | bnsurgery s (min) | BN removed | max rel. error | fx fuse s (min) "
            "| BN removed | max rel. error |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in fold_time:
            ours, fx = row["bnsurgery"], row["fx_fuse"]
            if fx["status"] == "ok":
                fx_cells = (
                    f"{_secs(fx['seconds'])} | {fx['bn_removed']}/{fx['bn_total']} "
                    f"| {_fmt_err(fx['max_rel_error'])}"
                )
            else:
                fx_cells = f"{fx['status']} | - | -"
            lines.append(
                f"| {row['model']} | {row['dtype']} | {_secs(ours['seconds'])} "
                f"| {ours['bn_removed']}/{ours['bn_total']} | {_fmt_err(ours['max_rel_error'])} "
                f"| {fx_cells} |"
            )
        f64 = [row["model"] for row in fold_time if row["dtype"] != "float32"]
        if f64:
            lines += [
                "",
                f"float64 rows ({', '.join(f64)}): float32 verification fails because the "
                "random-init float32 model is ill-conditioned (see the latency notes), so both "
                "methods were timed on a float64 copy.",
            ]
        errors = [
            f"- {row['model']}: {row['fx_fuse']['error']}"
            for row in fold_time
            if row["fx_fuse"]["status"] != "ok"
        ]
        if errors:
            lines += ["", "fx failures:", "", *errors]
        lines.append("")
    memory = result.get("fold_memory", [])
    if memory:
        lines += [
            "## Fold memory",
            "",
            "Peak growth of the process during one `torch.no_grad` forward pass and during "
            "`bnsurgery.fold(model, x)` (trace, fold, verification), each in a fresh process "
            "with the peak reset just before the call (`/proc/self/clear_refs`), glibc set "
            "for reproducible RSS (`benchmarks/_common.py`). Fold keeps the old weights of "
            "the layers it folds into until the output is verified, so it needs about a "
            "forward pass plus those weights. *Layer check*: the final output moved beyond "
            "tolerance (random weights amplify rounding) and every folded layer was "
            "recomputed on its own input.",
            "",
            "| model | input | weights MB | forward MB | fold MB | fold / (forward + weights) "
            "| BN folded | layer check |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for row in memory:
            ratio = row["fold_mb"] / (row["forward_mb"] + row["weights_mb"])
            lines.append(
                f"| {row['model']} | {row['batch']}x3x{row['size']}x{row['size']} "
                f"| {row['weights_mb']:.0f} | {row['forward_mb']:.0f} | {row['fold_mb']:.0f} "
                f"| {ratio:.2f} | {row['folded']} | {'yes' if row['layer_check'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--models",
        type=_csv,
        default=list(DEFAULT_MODELS),
        help="comma-separated timm model names (default: %(default)s)",
    )
    parser.add_argument(
        "--batches", type=_ints, default=[1, 8], help="comma-separated batch sizes (default 1,8)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=48,
        help="timed rounds per model and batch, each running every variant once (default 48)",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=4,
        help="split the rounds into this many blocks, each on fresh deepcopies (default 4)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed rounds starting each block (default 2)"
    )
    parser.add_argument(
        "--fold-runs", type=int, default=5, help="fold-time runs per model and method (default 5)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--parts",
        type=_csv,
        default=["latency", "fold-time", "fold-memory"],
        help="which parts to run: latency, fold-time, fold-memory (default all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory-child",
        nargs=4,
        metavar=("KIND", "MODEL", "BATCH", "SIZE"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="directory for fold.md and fold.json (default benchmarks/results)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.parts) - {"latency", "fold-time", "fold-memory"}
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    if min(args.repeats, args.blocks, args.fold_runs, args.threads) < 1:
        parser.error("--repeats, --blocks, --fold-runs and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        kind, name, batch, size = args.memory_child
        memory_child(kind, name, int(batch), int(size), args.seed)
        return 0
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "command": _command(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "bnsurgery": bnsurgery.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "KMP_"))},
        "loadavg_start": _loadavg(),
    }
    print(
        f"torch {meta['torch']}, timm {meta['timm']}, {meta['cpu']}, "
        f"{meta['threads']} threads, load {meta['loadavg_start']}",
        flush=True,
    )
    result: dict[str, Any] = {
        "meta": meta,
        "settings": {
            "models": args.models,
            "batches": args.batches,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "blocks": args.blocks,
            "fold_runs": args.fold_runs,
            "seed": args.seed,
            "parts": args.parts,
        },
        "latency": [],
        "fold_time": [],
        "fold_memory": [],
        "errors": [],
    }
    if "latency" in args.parts:
        print("latency (ms per batch, medians)", flush=True)
        for name in args.models:
            try:
                result["latency"] += bench_latency(
                    name, args.batches, args.warmup, args.repeats, args.blocks, args.seed
                )
            except Exception as exc:
                traceback.print_exc()
                result["errors"].append({"part": "latency", "model": name, "error": repr(exc)})
    if "fold-time" in args.parts:
        print("fold time (median seconds, BN removed/total)", flush=True)
        for name in args.models:
            try:
                result["fold_time"].append(bench_fold_time(name, args.fold_runs, args.seed))
            except Exception as exc:
                traceback.print_exc()
                result["errors"].append({"part": "fold-time", "model": name, "error": repr(exc)})
    if "fold-memory" in args.parts:
        print("fold memory (peak growth)", flush=True)
        for name, batch, size in MEMORY_CASES:
            try:
                result["fold_memory"].append(bench_fold_memory(name, batch, size, args.seed))
            except Exception as exc:
                traceback.print_exc()
                result["errors"].append({"part": "fold-memory", "model": name, "error": repr(exc)})
    meta["loadavg_end"] = _loadavg()
    meta["wall_seconds"] = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fold.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fold.md").write_text(render_markdown(result))
    print(f"wrote {args.out / 'fold.md'} and {args.out / 'fold.json'}", flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
