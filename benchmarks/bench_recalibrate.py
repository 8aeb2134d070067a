"""Recalibration throughput and peak memory against the plain eval forward and update_bn.

All variants walk the same batches of the same model (timm resnet50 by default, batches of 32
at 160 px, CPU):

* ``no_grad forward``: the model in eval mode under ``torch.no_grad``;
* ``no_grad forward, channels_last``: the same in channels-last format (model and batches
  converted beforehand, not timed): the fastest plain eval forward on the CPU, and the
  reference every ratio is taken against;
* ``BN batch-stats forward`` (and ``, channels_last``): the eval forward with every BN
  normalising with its batch's statistics (PyTorch's training-mode kernel, nothing
  collected): what a recalibration costs without bnsurgery's in-place normalisation;
* ``bnsurgery.recalibrate``: exact statistics (default mode), given the model and batches in
  the default format (it runs 2-D convnets in channels-last itself);
* ``bnsurgery.recalibrate, channels_last``: the same given the channels-last model and
  batches of the reference forward;
* ``torch update_bn``: ``torch.optim.swa_utils.update_bn``.

Throughput: the variants take turns (round-robin) for each repetition and the median is
reported. Peak memory: each variant runs two passes in a fresh subprocess, with every module
it uses imported beforehand, and reports the growth of its peak resident set size over what it
held before; the median of three such processes.

Run: python benchmarks/bench_recalibrate.py [--model resnet50 --batch 32 --size 160 --batches 6]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import timm
import torch
from _common import machine, peak_mb, rss_mb, run_child
from torch.optim.swa_utils import update_bn

import bnsurgery

VARIANTS = (
    "no_grad forward",
    "no_grad forward, channels_last",
    "BN batch-stats forward",
    "BN batch-stats forward, channels_last",
    "bnsurgery.recalibrate",
    "bnsurgery.recalibrate, channels_last",
    "torch update_bn",
)
REFERENCE = "no_grad forward, channels_last"


def setup(args: argparse.Namespace):
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    g = torch.Generator().manual_seed(1)
    data = [
        torch.randn(args.batch, 3, args.size, args.size, generator=g) for _ in range(args.batches)
    ]
    return model, data


def run(variant: str, model, data) -> float:
    start = time.perf_counter()
    if variant.startswith("no_grad forward"):
        with torch.no_grad():
            for batch in data:
                model(batch)
    elif variant.startswith("BN batch-stats forward"):
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.train()
        with torch.no_grad():
            for batch in data:
                model(batch)
        for m in bns:
            m.eval()
    elif variant.startswith("bnsurgery.recalibrate"):
        bnsurgery.recalibrate(model, data)
    else:
        update_bn(data, model)
        model.eval()
    return time.perf_counter() - start


def channels_last(model, data):
    """A channels-last copy of the model and the batches (for the like-for-like forward)."""
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return model, [b.contiguous(memory_format=torch.channels_last) for b in data]


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, data = setup(args)
    if args.child.endswith(", channels_last"):
        model, data = channels_last(model, data)
    import bnsurgery.recalibration  # noqa: F401  (the library's code, loaded like the model's)

    before = rss_mb()
    for _ in range(2):  # the second pass shows what the allocator keeps needing
        run(args.child, model, data)
    print(peak_mb() - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "recalibrate.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    model, data = setup(args)
    run("no_grad forward", model, data[:1])  # warm up
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    plain, cl = (model, data), channels_last(model, data)
    for _ in range(args.repeats):
        for v in VARIANTS:
            times[v].append(run(v, *(cl if v.endswith(", channels_last") else plain)))
    images = args.batch * args.batches
    rate = {v: images / statistics.median(t) for v, t in times.items()}
    common = ["--model", args.model, "--batch", str(args.batch), "--size", str(args.size)]
    common += ["--batches", str(args.batches), "--threads", str(args.threads)]
    memory = {
        v: statistics.median(run_child(__file__, ["--child", v, *common]) for _ in range(3))
        for v in VARIANTS
    }
    base_r, base_m = rate[REFERENCE], memory[REFERENCE]
    rows = [
        f"| {v} | {rate[v]:.1f} | {rate[v] / base_r:.3f} | {memory[v]:.0f} "
        f"| {memory[v] / base_m:.3f} |"
        for v in VARIANTS
    ]
    command = "python benchmarks/bench_recalibrate.py " + " ".join(sys.argv[1:])
    ours = "bnsurgery.recalibrate"
    worst_r = min(rate[v] for v in (ours, f"{ours}, channels_last")) / base_r
    worst_m = max(memory[v] for v in (ours, f"{ours}, channels_last")) / base_m
    kernel = rate["BN batch-stats forward, channels_last"] / base_r
    kernel_default = rate["BN batch-stats forward"] / rate["no_grad forward"]
    text = "\n".join(
        [
            "# Recalibration: throughput and peak memory",
            "",
            f"`{command.strip()}` on {date.today()}: {args.model}, {args.batches} batches of "
            f"{args.batch} at {args.size} px, CPU: {machine(args.threads)}. Median of "
            f"{args.repeats} round-robin passes; peak RSS growth of a fresh process over two "
            "passes, median of three processes. Ratios against the fastest plain eval "
            "forward: in channels-last format.",
            "",
            "| variant | images/s | vs forward (channels-last) | peak MB | vs forward "
            "(channels-last) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Targets: throughput at least 0.95 of the channels-last eval forward (ours, the "
            f"slower of the two inputs: {worst_r:.3f}), peak memory at most 1.05 of it (ours, "
            f"the larger: {worst_m:.3f}).",
            "",
            "A recalibration cannot be an eval forward: each BN must normalise with the "
            "statistics of the batch, which PyTorch's training-mode kernel computes in two "
            "passes over the BN's input before normalising it into a new tensor "
            f"(`BN batch-stats forward`: {kernel_default:.3f} of the eval forward in the default "
            f"format, {kernel:.3f} in channels-last). bnsurgery takes the two statistics passes "
            "from PyTorch's kernel for them (exact, in float64 from there on) and normalises "
            "with the eval-mode kernel, in place wherever the graph walk proves that nothing "
            "else reads the BN's input (a conv's output only the BN reads): on the CPU a new "
            "tensor's fresh pages cost more than the normalisation, so a pass over a convnet "
            "whose BNs all follow their conv makes fewer new tensors than the eval forward "
            "itself (its peak, set by the largest activations, stays the same). It runs 2-D "
            "convnets in channels-last format on the CPU (restored afterwards).",
            "",
        ]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    data_out = {"args": vars(args), "seconds": times, "images_per_s": rate, "peak_mb": memory}
    out.with_suffix(".json").write_text(json.dumps(data_out, indent=2))
    print(text)


if __name__ == "__main__":
    main()
