"""Training-step time and peak memory of frozen BN implementations, side by side.

Variants on the same model (timm resnet50 by default, batch 16, 160 px, CPU):

* ``train-mode BN``: plain BatchNorm2d in train mode (the baseline that updates statistics);
* ``torchvision FrozenBatchNorm2d``: each BN replaced by ``torchvision.ops.misc.FrozenBatchNorm2d``
  (its affine is fixed: buffers; a timm norm-act layer keeps its activation after it);
* ``timm freeze_batch_norm_2d``: ``timm.layers.freeze_batch_norm_2d`` on the model;
* ``bnsurgery.freeze``: our FrozenBatchNorm (a fused multiply-add when gradients flow, the
  eval-mode batch_norm kernel otherwise), affine fixed;
* ``bnsurgery.freeze fuse``: the same, each BN computed inside its conv (``fuse=True``);
* ``... train_affine``: both again with the BN weight and bias trainable (statistics frozen:
  the detectron2/mmdetection fine-tuning setting);
* ``bound: no BN``: the model folded (``bnsurgery.fold``): convs with a bias, no BN at all,
  what no frozen BN can beat.

Memory, two ways: the activations autograd keeps for the backward pass (``saved MB``: every
distinct storage a ``saved_tensors_hooks`` pack sees in one forward, parameters excluded,
since they are resident anyway): exact and the same on every machine; and the peak resident
set size over a whole step (activations, gradients, workspaces) in a fresh process, above
what it held after a first step (weights, optimizer state, loaded kernels).

Step time: every variant is built once, then the variants take turns (round-robin) for each
repetition, so drift on a shared machine hits all of them alike; the median is reported.
Peak memory: each variant runs two steps in a fresh subprocess and reports its peak resident
set size (``ru_maxrss``) above what it held before the steps (CPU allocations are not tracked
by torch).

Run: python benchmarks/bench_freeze.py [--model resnet50 --batch 16 --size 160 --repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import timm
import torch
import torchvision
from _common import high_water_mb, machine, reset_peak, rss_mb, run_child
from torch import nn

import bnsurgery
from bnsurgery.testing import randomize_bn

VARIANTS = (
    "train-mode BN",
    "torchvision FrozenBatchNorm2d",
    "timm freeze_batch_norm_2d",
    "bnsurgery.freeze",
    "bnsurgery.freeze fuse",
    "bnsurgery.freeze train_affine",
    "bnsurgery.freeze train_affine fuse",
    "bound: no BN",
)


def torchvision_frozen(model: nn.Module) -> nn.Module:
    """Each BatchNorm2d replaced by torchvision's FrozenBatchNorm2d; a timm norm-act layer
    (BatchNormAct2d) by FrozenBatchNorm2d followed by its own dropout and activation."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) not in (nn.BatchNorm2d, timm.layers.BatchNormAct2d):
                continue
            frozen = torchvision.ops.misc.FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            if isinstance(child, timm.layers.BatchNormAct2d):
                frozen = nn.Sequential(frozen, child.drop, child.act)
            setattr(module, child_name, frozen)
    return model


def build(variant: str, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(args.model, pretrained=False))
    if variant.startswith("bnsurgery.freeze"):
        fuse = variant.endswith(" fuse")
        example = torch.randn(2, 3, args.size, args.size) if fuse else None
        bnsurgery.freeze(
            model, train_affine="train_affine" in variant, fuse=fuse, example_inputs=example
        )
    elif variant == "bound: no BN":
        bnsurgery.fold(model.eval(), torch.randn(2, 3, args.size, args.size))
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


def saved_mb(model: nn.Module, args: argparse.Namespace) -> float:
    """What autograd keeps for the backward pass of one forward, parameters excluded, MB."""
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.train()(x)
    del out
    return sum(seen.values()) / 2**20


def peak_rss_mb(variant: str, args: argparse.Namespace) -> float:
    """Run two steps of one variant in a fresh process; its peak RSS growth in MB."""
    return run_child(
        __file__,
        ["--child", variant, "--model", args.model, "--batch", str(args.batch),
         "--size", str(args.size), "--threads", str(args.threads)],
    )  # fmt: skip


def child(args: argparse.Namespace) -> None:
    """Peak memory of a training step above what the process held before it, after a first
    step (which loads kernels and libraries and makes the optimizer's state: gigabytes of
    resident memory that are the same for every variant)."""
    torch.set_num_threads(args.threads)
    step = make_step(build(args.child, args), args)
    step()
    gc.collect()
    before = rss_mb()
    reset_peak()
    step()
    print(high_water_mb() - before)


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
    saved = {v: saved_mb(build(v, args), args) for v in VARIANTS}
    memory = {v: peak_rss_mb(v, args) for v in VARIANTS}
    tv = "torchvision FrozenBatchNorm2d"
    rows = [
        f"| {v} | {medians[v] * 1000:.0f} | {medians[v] / medians[tv]:.3f} "
        f"| {saved[v]:.0f} | {saved[v] / saved[tv]:.3f} "
        f"| {memory[v]:.0f} | {memory[v] / memory[tv]:.3f} |"
        for v in VARIANTS
    ]
    fused, plain = "bnsurgery.freeze train_affine fuse", "bnsurgery.freeze train_affine"
    command = "python benchmarks/bench_freeze.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "# Frozen BN: training-step time and peak memory",
            "",
            f"`{command.strip()}` on {date.today()}: {args.model}, batch {args.batch}, "
            f"{args.size} px, CPU: {machine(args.threads)}. "
            f"Median of {args.repeats} round-robin steps after {args.warmup} warm-up rounds; "
            "saved MB: activations autograd keeps for the backward pass (parameters "
            "excluded); peak MB: peak RSS growth over a training step, in a fresh process after "
            "a first step.",
            "",
            "| variant | step ms | vs torchvision | saved MB | vs torchvision | peak MB "
            "| vs torchvision |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Fused with a trainable affine against unfused with one: saved "
            f"{saved[fused] / saved[plain]:.3f}, peak {memory[fused] / memory[plain]:.3f}, "
            f"step {medians[fused] / medians[plain]:.3f}. Fused with the affine fixed against "
            f"torchvision's (fixed too): saved {saved['bnsurgery.freeze fuse'] / saved[tv]:.3f}, "
            f"peak {memory['bnsurgery.freeze fuse'] / memory[tv]:.3f}, step "
            f"{medians['bnsurgery.freeze fuse'] / medians[tv]:.3f}.",
            "",
            "Where the memory goes: a frozen BN with a fixed affine is a multiply-add by "
            "constants, which keeps nothing for the backward pass, so a model with such BNs "
            "keeps what the same model without any BN keeps (`bound: no BN`: saved "
            f"{saved['bound: no BN'] / saved[tv]:.3f}, peak "
            f"{memory['bound: no BN'] / memory[tv]:.3f} of torchvision's): with the affine "
            "fixed there is nothing left for fusing to save. A trainable affine needs each "
            "BN's input for its gradient, the conv's whole output, kept by the unfused freeze "
            f"({saved[plain] / saved[tv]:.3f} of torchvision's); fused, the affine's gradient "
            "comes through the conv's weight instead, and a model with trainable BN affines "
            "keeps what a fully frozen one keeps.",
            "",
        ]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "step_s": times,
                "median_s": medians,
                "saved_mb": saved,
                "peak_rss_mb": memory,
            },
            indent=2,
        )
    )
    print(text)


if __name__ == "__main__":
    main()
