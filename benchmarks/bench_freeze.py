"""Training-step time and peak memory of frozen BN implementations, side by side.

Variants on the same model (timm resnet50 by default, batch 16, 160 px, CPU):

* ``train-mode BN``: plain BatchNorm2d in train mode (the baseline that updates statistics);
* ``bnsurgery.freeze``: our FrozenBatchNorm (a fused multiply-add when gradients flow, the
  eval-mode batch_norm kernel otherwise);
* ``torchvision FrozenBatchNorm2d``: each BN replaced by ``torchvision.ops.misc.FrozenBatchNorm2d``;
* ``timm freeze_batch_norm_2d``: ``timm.layers.freeze_batch_norm_2d`` on the model.

Step time: every variant is built once, then the variants take turns (round-robin) for each
repetition, so drift on a shared machine hits all of them alike; the median is reported.
Peak memory: each variant runs two steps in a fresh subprocess and reports its peak resident
set size (``ru_maxrss``) above what it held before the steps (CPU allocations are not tracked
by torch).

Run: python benchmarks/bench_freeze.py [--model resnet50 --batch 16 --size 160 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import timm
import torch
import torchvision
from _common import machine, peak_mb, rss_mb, run_child
from torch import nn

import bnsurgery
from bnsurgery.testing import randomize_bn

VARIANTS = (
    "train-mode BN",
    "bnsurgery.freeze",
    "torchvision FrozenBatchNorm2d",
    "timm freeze_batch_norm_2d",
)


def torchvision_frozen(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = torchvision.ops.misc.FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(module, child_name, frozen)
    return model


def build(variant: str, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(args.model, pretrained=False))
    if variant == "bnsurgery.freeze":
        bnsurgery.freeze(model)
    elif variant == "torchvision FrozenBatchNorm2d":
        model = torchvision_frozen(model)
    elif variant == "timm freeze_batch_norm_2d":
        model = timm.layers.freeze_batch_norm_2d(model)
    return model.train()


def make_step(model: nn.Module, args: argparse.Namespace):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 1000, (args.batch,), generator=torch.Generator().manual_seed(2))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def peak_rss_mb(variant: str, args: argparse.Namespace) -> float:
    """Run two steps of one variant in a fresh process; its peak RSS growth in MB."""
    return run_child(
        __file__,
        ["--child", variant, "--model", args.model, "--batch", str(args.batch),
         "--size", str(args.size), "--threads", str(args.threads)],
    )  # fmt: skip


def child(args: argparse.Namespace) -> None:
    """Peak memory of two training steps above what the process held before them."""
    torch.set_num_threads(args.threads)
    step = make_step(build(args.child, args), args)
    before = rss_mb()
    for _ in range(2):
        step()
    print(peak_mb() - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "freeze.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    steps = {v: make_step(build(v, args), args) for v in VARIANTS}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v, step in steps.items():
            times[v].append(step())
    medians = {v: statistics.median(t) for v, t in times.items()}
    memory = {v: peak_rss_mb(v, args) for v in VARIANTS}
    base_t, tv_t = medians["train-mode BN"], medians["torchvision FrozenBatchNorm2d"]
    base_m, tv_m = memory["train-mode BN"], memory["torchvision FrozenBatchNorm2d"]
    rows = [
        f"| {v} | {medians[v] * 1000:.0f} | {medians[v] / base_t:.3f} | {medians[v] / tv_t:.3f} "
        f"| {memory[v]:.0f} | {memory[v] / base_m:.3f} | {memory[v] / tv_m:.3f} |"
        for v in VARIANTS
    ]
    command = "python benchmarks/bench_freeze.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "# Frozen BN: training-step time and peak memory",
            "",
            f"`{command.strip()}` on {date.today()}: {args.model}, batch {args.batch}, "
            f"{args.size} px, CPU: {machine(args.threads)}. "
            f"Median of {args.repeats} round-robin steps after {args.warmup} warm-up rounds; "
            "peak RSS growth of a fresh process over two steps.",
            "",
            "| variant | step ms | vs train-mode | vs torchvision | step peak MB | vs train-mode "
            "| vs torchvision |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Target: bnsurgery.freeze no slower than torchvision's FrozenBatchNorm2d "
            f"(ratio {medians['bnsurgery.freeze'] / tv_t:.3f}).",
            "",
        ]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps(
            {"args": vars(args), "step_s": times, "median_s": medians, "peak_rss_mb": memory},
            indent=2,
        )
    )
    print(text)


if __name__ == "__main__":
    main()
