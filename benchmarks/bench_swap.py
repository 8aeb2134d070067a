"""Calibrated swap against a plain forward pass, and what each calibration schedule costs in
fit quality.

``bnsurgery.swap(model, to, calibrate=data)`` replaces every BN by another norm and fits each new
norm's per-channel scale and shift by least squares so that, on the input it sees, its output
matches the eval output of the BN it replaced. How the fits see each other is the *schedule*.

Speed (one process, CPU, timm resnet50 by default, 2 batches of 32 at 160 px): the variants take
turns (round-robin) for each repetition, so drift on a shared machine hits all of them alike,
and the median is reported:

* ``no_grad forward``: the BN model in eval mode under ``torch.no_grad`` (the reference);
* ``swapped forward, TARGET``: the same pass through the model swapped without calibration
  (what the new norm itself costs);
* ``swap + calibrate, TARGET``: ``bnsurgery.swap(copy, TARGET, calibrate=batches)`` with the
  default (online) schedule, on a deepcopy made beforehand (not timed).

The exact ``sequential`` schedule is timed once, after the round-robin (it runs the data once
per norm); ``--no-sequential`` skips it.

Quality (the same kind of model and data, per model in ``--quality-models``): every schedule
on a fresh copy, then the relative error of the swapped model's output against the BN model's
(Frobenius norm of the difference over the norm of the reference, all samples) on the
calibration data and on held-out data drawn the same way, and the fit error of every new norm
on its own input in the final model (the relative RMS error of its output against the BN's
eval output on that input; mean and max over norms). Schedules:

* ``uncalibrated``: the swap alone (each norm carries the BN's scale and shift);
* ``exact (one batch)``: the online schedule on all calibration data as one batch: each norm is
  fitted on all the data before the forward goes on, which is the exact sequential fit in one
  pass (the ``exact check`` line compares it with ``schedule="sequential"``);
* ``online`` (the default): batches streamed, each norm refitted at each batch before it runs;
* ``online, batches of 2``: the same data cut into batches of 2 (early fits from little data);
* ``jacobi P``: one pass fitting every norm at once from the same forward (each norm sees
  inputs produced by the not-yet-fitted norms before it), then P refinement passes, each
  refitting all norms given the previous pass' fits.

Models are built with random weights; ``randomize_bn`` gives every BN random statistics and
``match_bn_to_data`` then sets them from a separate batch of the same kind of data, as training
leaves them (otherwise a BN's statistics have nothing to do with its input and no swap can
approach it). Inputs are standard normal images.

Run: python benchmarks/bench_swap.py [--model resnet50 --batch 32 --size 160 --batches 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import timm
import torch
from _common import machine
from torch import nn

import bnsurgery
from bnsurgery.batches import DataCheck as _DataCheck
from bnsurgery.hooks import call_input
from bnsurgery.norms import iter_batchnorms
from bnsurgery.swapfit import _Fit
from bnsurgery.testing import match_bn_to_data, randomize_bn


def images(count: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False)).eval()
    return match_bn_to_data(model, (images(16, size, seed=99),))


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


# ---- speed -------------------------------------------------------------------------------


def forward(model: nn.Module, data: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in data:
            model(batch)


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def speed(args: argparse.Namespace) -> dict:
    model = build(args.model, args.size)
    data = [images(args.batch, args.size, seed=1 + i) for i in range(args.batches)]
    swapped = {to: bnsurgery.swap(copy.deepcopy(model), to) for to in args.targets}
    forward(model, data[:1])  # warm up
    variants = ["no_grad forward"]
    variants += [f"swapped forward, {to}" for to in args.targets]
    variants += [f"swap + calibrate, {to}" for to in args.targets]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            to = v.rsplit(", ", 1)[-1]
            if v == "no_grad forward":
                times[v].append(timed(lambda: forward(model, data)))
            elif v.startswith("swapped forward"):
                times[v].append(timed(lambda to=to: forward(swapped[to], data)))
            else:
                fresh = copy.deepcopy(model)
                times[v].append(timed(lambda f=fresh, to=to: bnsurgery.swap(f, to, calibrate=data)))
    seconds = {v: statistics.median(t) for v, t in times.items()}
    if args.sequential:
        fresh = copy.deepcopy(model)
        to = args.targets[0]
        seconds[f"swap + calibrate, {to}, sequential (1 run)"] = timed(
            lambda: bnsurgery.swap(fresh, to, calibrate=data, schedule="sequential")
        )
    return {"times": times, "seconds": seconds}


# ---- quality -----------------------------------------------------------------------------


def placed(original: nn.Module, swapped: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, BN of the original, new norm of the swapped model) for every swapped BN."""
    modules = dict(swapped.named_modules())
    return [(name, bn, modules[name]) for name, bn in iter_batchnorms(original)]


def collect(
    pairs: list[tuple[str, nn.Module, nn.Module]], model: nn.Module, data: list[torch.Tensor]
) -> list[_Fit]:
    """Every norm's fit moments over ``data`` with the scales and shifts as they are (first
    call per batch, as the library's schedules fit)."""
    fits = [_Fit(name, bn, new) for name, bn, new in pairs]
    by_id = {id(f.new): f for f in fits}
    called: set[int] = set()

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(module) not in called:
            called.add(id(module))
            by_id[id(module)].add(call_input(args, kwargs))

    handles = [f.new.register_forward_pre_hook(hook, with_kwargs=True) for f in fits]
    try:
        with torch.no_grad():
            for batch in data:
                called.clear()
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return fits


def jacobi(original: nn.Module, to: str, data: list[torch.Tensor], passes: int) -> nn.Module:
    swapped = bnsurgery.swap(copy.deepcopy(original), to)
    pairs = placed(original, swapped)
    for _ in range(passes + 1):
        fits = collect(pairs, swapped, data)
        for fit in fits:  # all at once, after the pass
            if fit.count:
                fit.write(_DataCheck())
    return swapped


def schedules(to: str, data: list[torch.Tensor]) -> dict[str, Callable[[nn.Module], nn.Module]]:
    def swap(**kw: object) -> Callable[[nn.Module], nn.Module]:
        return lambda m: bnsurgery.swap(copy.deepcopy(m), to, **kw)

    pairs = list(torch.cat(data).split(2))
    return {
        "uncalibrated": swap(),
        "exact (one batch)": swap(calibrate=[torch.cat(data)]),
        "online (default)": swap(calibrate=data),
        "online, batches of 2": swap(calibrate=pairs),
        **{f"jacobi {p}": (lambda m, p=p: jacobi(m, to, data, p)) for p in range(4)},
    }


def relative(model: nn.Module, reference: torch.Tensor, data: list[torch.Tensor]) -> float:
    with torch.no_grad():
        out = torch.cat([model(b) for b in data])
    return float((out - reference).norm() / reference.norm())


def quality(name: str, to: str, args: argparse.Namespace) -> dict:
    model = build(name, args.quality_size)
    size, batch, count = args.quality_size, args.quality_batch, args.quality_batches
    calib = [images(batch, size, seed=1000 + i) for i in range(count)]
    held = [images(batch, size, seed=2000 + i) for i in range(count)]
    with torch.no_grad():
        ref_calib = torch.cat([model(b) for b in calib])
        ref_held = torch.cat([model(b) for b in held])
    rows, exact_errors = [], None
    for label, run in schedules(to, calib).items():
        start = time.perf_counter()
        swapped = run(model)
        seconds = time.perf_counter() - start
        fits = collect(placed(model, swapped), swapped, calib)
        errors = {f.name: f.errors()[1] for f in fits if f.count}
        if label.startswith("exact"):
            exact_errors = errors
        excess = max(errors[k] - exact_errors[k] for k in errors) if exact_errors else None
        rows.append(
            {
                "schedule": label,
                "seconds": seconds,
                "output_error_calibration": relative(swapped, ref_calib, calib),
                "output_error_held_out": relative(swapped, ref_held, held),
                "fit_error_mean": statistics.mean(errors.values()),
                "fit_error_max": max(errors.values()),
                "fit_error_excess_max": excess,
            }
        )
        print(name, to, rows[-1], file=sys.stderr)
    return {"model": name, "target": to, "rows": rows}


def exact_check(args: argparse.Namespace) -> dict:
    """The sequential schedule against the online schedule on one batch: the same fits."""
    name, to = args.quality_models[0], args.targets[0]
    model = build(name, args.check_size)
    data = [images(args.check_batch, args.check_size, seed=3000 + i) for i in range(2)]
    sequential = bnsurgery.swap(copy.deepcopy(model), to, calibrate=data, schedule="sequential")
    one = bnsurgery.swap(copy.deepcopy(model), to, calibrate=[torch.cat(data)])
    diff = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        for a, b in zip(sequential.parameters(), one.parameters(), strict=True)
    )
    return {"model": name, "target": to, "size": args.check_size, "max_param_rel_diff": diff}


# ---- report ------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}" if value >= 1e-3 else f"{value:.1e}"


def render(args: argparse.Namespace, result: dict) -> str:
    base = result["speed"]["seconds"]["no_grad forward"]
    images_n = args.batch * args.batches
    speed_rows = [
        f"| {v} | {s:.2f} | {s / base:.2f} |" for v, s in result["speed"]["seconds"].items()
    ]
    default = result["speed"]["seconds"][f"swap + calibrate, {args.targets[0]}"] / base
    quality_lines = []
    for block in result["quality"]:
        quality_lines += [
            "",
            f"**{block['model']} → {block['target']}** ({args.quality_batches} batches of "
            f"{args.quality_batch} at {args.quality_size} px; held-out: as many again)",
            "",
            "| schedule | seconds | output error, calibration | output error, held-out "
            "| fit error mean | fit error max | excess over exact, max |",
            "|---|---|---|---|---|---|---|",
        ]
        quality_lines += [
            f"| {r['schedule']} | {r['seconds']:.1f} | {fmt(r['output_error_calibration'])} "
            f"| {fmt(r['output_error_held_out'])} | {fmt(r['fit_error_mean'])} "
            f"| {fmt(r['fit_error_max'])} | {fmt(r['fit_error_excess_max'])} |"
            for r in block["rows"]
        ]
    check = result["exact_check"]
    command = "python benchmarks/bench_swap.py " + " ".join(sys.argv[1:])
    return "\n".join(
        [
            "# Calibrated swap: speed and schedule quality",
            "",
            f"`{command.strip()}` on {date.today()}: CPU: {machine(args.threads)}. "
            f"Load average at start {result['loadavg_start']}, end {result['loadavg_end']} "
            f"(the machine has {args.cpus} CPUs; other work on it slows every variant alike, "
            "the ratios are what matter).",
            "",
            f"## Speed: {args.model}, {args.batches} batches of {args.batch} at {args.size} px "
            f"({images_n} images)",
            "",
            f"Median of {args.repeats} round-robin repetitions (seconds for all the data); the "
            "sequential schedule once.",
            "",
            "| variant | seconds | vs forward |",
            "|---|---|---|",
            *speed_rows,
            "",
            f"Target: a calibrated swap at most 3 times the plain forward pass. Ours "
            f"(`{args.targets[0]}`, default schedule): {default:.2f}.",
            "",
            "## Schedule quality",
            "",
            "Output error: relative error of the swapped model's output against the BN model's. "
            "Fit error: each new norm's relative RMS error against the BN's eval output on its "
            "own input in the final model; excess: how much larger than with the exact fit "
            "(the largest over norms). Seconds: the swap with its calibration, on a machine "
            "shared with other work.",
            *quality_lines,
            "",
            f"Exact check: on {check['model']} → {check['target']} (2 batches at "
            f'{check["size"]} px), `schedule="sequential"` and the online schedule on the same '
            f"data as one batch give parameters that differ by at most "
            f"{check['max_param_rel_diff']:.1e} (relative): the same fit, up to rounding.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", default="groupnorm,layernorm")
    parser.add_argument("--no-sequential", dest="sequential", action="store_false")
    parser.add_argument(
        "--quality-models", default="resnet50,mobilenetv3_large_100,efficientnet_b0"
    )
    parser.add_argument("--quality-size", type=int, default=128)
    parser.add_argument("--quality-batch", type=int, default=16)
    parser.add_argument("--quality-batches", type=int, default=4)
    parser.add_argument("--check-size", type=int, default=64)
    parser.add_argument("--check-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "swap.md"))
    args = parser.parse_args()
    args.targets = args.targets.split(",")
    args.quality_models = args.quality_models.split(",")
    args.cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads)
    result: dict = {"loadavg_start": loadavg()}
    result["speed"] = speed(args)
    print(result["speed"]["seconds"], file=sys.stderr)
    result["quality"] = [
        quality(name, to, args)
        for name in args.quality_models
        for to in (args.targets if name == args.quality_models[0] else args.targets[:1])
    ]
    result["exact_check"] = exact_check(args)
    result["loadavg_end"] = loadavg()
    text = render(args, result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), **result}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
