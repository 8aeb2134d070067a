#!/usr/bin/env python
"""Re-parameterised models: bnsurgery's fold against timm's own ``reparameterize_model``.

On multi-branch models (RepVGG, MobileOne, FastViT) and LeViT (layout ops, no
re-parameterisation of its own), four variants of one random-init model with random BN
statistics, timed side by side in balanced interleaved orders, in blocks each on fresh
deepcopies of every variant (``bench_fold``'s method: a copy can run a percent or two faster
or slower than another copy of the same model, wherever its tensors landed):

* ``original``: as built;
* ``folded``: ``bnsurgery.fold(model, x)`` (linear regions collapsed, BN folded);
* ``timm``: ``timm.utils.reparameterize_model`` (the model's own ``reparameterize()``), where the
  model has one;
* ``identity``: the lower bound of keeping the structure, every BN replaced by what a fold
  leaves (not the same function).

Reported per model: the ratios folded/timm (target <= 1.01) and folded/identity, medians with
their interquartile range and the range of the blocks' medians, and for each variant its conv
and BN count and its output's relative error against the original.

    python benchmarks/bench_reparam.py                  # writes results/reparam.{md,json}, ~10 min
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
from pathlib import Path

import torch
from _common import machine
from bench_fold import _summary, build, identity_bound, time_in_blocks
from timm.utils import reparameterize_model
from torch import nn

import bnsurgery
from bnsurgery.norms import is_batchnorm
from bnsurgery.verify import max_relative_error

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("repvgg_a2", "mobileone_s1", "fastvit_t8", "levit_128s")
TARGET = 1.01


def counts(model: nn.Module) -> dict[str, int]:
    return {
        "conv": sum(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in model.modules()),
        "bn": sum(is_batchnorm(m) for m in model.modules()),
    }


@torch.no_grad()
def bench(name: str, batch: int, warmup: int, repeats: int, blocks: int, seed: int) -> dict:
    model = build(name, seed)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    reference = model(x)
    variants = {"original": model, "folded": bnsurgery.fold(copy.deepcopy(model), x)}
    if any(callable(getattr(m, "reparameterize", None)) for m in model.modules()):
        variants["timm"] = reparameterize_model(copy.deepcopy(model))
    variants["identity"] = identity_bound(model)
    report = bnsurgery.last_report(variants["folded"])
    compared = tuple(o for o in ("timm", "identity", "original") if o in variants)
    times, per_block = time_in_blocks(variants, x, warmup, repeats, blocks, compared)
    row = {
        "model": name,
        "batch": batch,
        "bn_folded": len(report.folded),
        "bn_count": report.bn_count,
        "variants": {
            v: {
                **counts(m),
                "ms": {k: t * 1e3 for k, t in _summary(times[v]).items()},
                "error": max_relative_error(reference, m(x)) if v != "original" else 0.0,
            }
            for v, m in variants.items()
        },
        "ratios": {
            f"folded/{o}": _summary([f / t for f, t in zip(times["folded"], times[o], strict=True)])
            for o in compared
        },
        "ratios_per_block": per_block,
    }
    text = "  ".join(f"{o} {r['median']:.3f}" for o, r in row["ratios"].items())
    print(f"  {name:<14} b{batch}  {text}", flush=True)
    return row


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        "# bnsurgery fold vs timm's reparameterize_model",
        "",
        header,
        "",
        "| model | batch | BN folded | convs: folded / timm / original | BN left: timm | "
        "folded/timm (IQR) | folded/timm, blocks | folded/identity (IQR) | folded/original | "
        "err folded | err timm |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = r["variants"]
        t = v.get("timm")
        ratio = r["ratios"]

        def cell(key: str, ratio: dict = ratio) -> str:
            s = ratio.get(key)
            return f"{s['median']:.3f} ({s['p25']:.3f} to {s['p75']:.3f})" if s else "(none)"

        met = ""
        if "folded/timm" in ratio:
            met = " met" if ratio["folded/timm"]["median"] <= TARGET else " MISSED"
        convs = f"{v['folded']['conv']} / {t['conv'] if t else '-'} / {v['original']['conv']}"
        spread = r["ratios_per_block"].get("folded/timm")
        spread_cell = f"{min(spread):.3f} to {max(spread):.3f}" if spread else "-"
        cells = [
            r["model"], str(r["batch"]), f"{r['bn_folded']} of {r['bn_count']}", convs,
            str(t["bn"]) if t else "-", cell("folded/timm") + met, spread_cell,
            cell("folded/identity"),
            f"{ratio['folded/original']['median']:.3f}", f"{v['folded']['error']:.1e}",
            f"{t['error']:.1e}" if t else "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios are medians over interleaved rounds (balanced orders), in blocks each on fresh "
        "deepcopies of every variant; IQR in brackets; *blocks*: the range of the blocks' "
        "medians. *timm*: "
        "`timm.utils.reparameterize_model` (LeViT has none). *identity*: every BN replaced by "
        "what a fold leaves, the structure kept (a lower bound of the unchanged structure, not "
        "the same function; the collapsed models beat it). *err*: max relative error of the "
        f"output against the original model (float32). Target: folded/timm <= {TARGET}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=48)
    parser.add_argument(
        "--repeats-b1", type=int, default=192, help="rounds at batch 1 (fast, and noisier)"
    )
    parser.add_argument("--blocks", type=int, default=4, help="fresh deepcopies per block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [
        bench(
            name,
            int(b),
            args.warmup,
            args.repeats_b1 if int(b) == 1 else args.repeats,
            args.blocks,
            args.seed,
        )
        for name in args.models.split(",")
        for b in args.batches.split(",")
    ]
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"Generated {when} on {machine(args.threads)}; random init, random BN statistics, "
        f"224x224, {args.repeats} interleaved rounds per variant ({args.repeats_b1} at batch "
        f"1) in {args.blocks} blocks."
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reparam.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "reparam.md").write_text(markdown(rows, header))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
