#!/usr/bin/env python
"""Deploying to ONNX: ONNX Runtime latency of bnsurgery's artifact against the model exported as
it is.

For each model (random init, random BN statistics, 224x224, float32, CPU), three ONNX Runtime
sessions, timed side by side in interleaved rounds (each round runs every variant once, in an
order that rotates):

* ``plain``: the model exported as it is (``torch.onnx.export(dynamo=True)``, whose own graph
  optimisation already fuses a Conv and the BatchNormalization after it), ONNX Runtime's graph
  optimisations off;
* ``ort``: the same file with ONNX Runtime's full optimisations (which fuse Conv+BN too);
* ``ours``: ``bnsurgery.export(model, x, "m.onnx")`` (everything that folds folded, every BN left
  lowered, by default to a 1x1 depthwise conv, ``--lower-to``; the artifact checked), ONNX
  Runtime's full optimisations.

Reported per model: medians (ms) with their interquartile range, the ratios ours/ort (target
<= 1: no slower) and ours/plain, and node counts: in each file, BatchNormalization nodes in
it, and nodes and BatchNormalization nodes after ONNX Runtime's optimisation (the graph it
runs).

    python benchmarks/bench_export.py                 # writes results/export.{md,json}, ~10 min
    python benchmarks/bench_export.py --models resnet50 --repeats 20 --out /tmp/x
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import statistics
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
from _common import machine

import bnsurgery
from bnsurgery.testing import randomize_bn

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = (
    "resnet50",
    "mobilenetv3_large_100",
    "efficientnet_b0",
    "repvgg_a2",
    "densenet121",
    "resnetv2_50",
    "levit_128s",
)
VARIANTS = ("plain", "ort", "ours")


def session(path: Path, optimise: bool, threads: int, dump: Path | None = None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimise
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if dump is not None:
        options.optimized_model_filepath = str(dump)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def nodes(path: Path) -> dict[str, Any]:
    kinds = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return {
        "nodes": sum(kinds.values()),
        "batch_norm": kinds.get("BatchNormalization", 0),
        "ops": dict(sorted(kinds.items())),
    }


def quantiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4)
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2]}


def bench(
    name: str, batch: int, repeats: int, warmup: int, threads: int, folder: Path, lower_to: str
) -> dict:
    model = timm.create_model(name, pretrained=False).eval()
    randomize_bn(model, seed=0)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    plain = folder / f"{name}.plain.onnx"
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        torch.no_grad(),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(plain), dynamo=True, external_data=False)
    ours = folder / f"{name}.ours.onnx"
    report = bnsurgery.export(model, x, ours, lower_to=lower_to)
    sessions = {
        "plain": session(plain, False, threads),
        "ort": session(plain, True, threads, folder / f"{name}.ort-optimised.onnx"),
        "ours": session(ours, True, threads, folder / f"{name}.ours-optimised.onnx"),
    }
    feed = {v: {s.get_inputs()[0].name: x.numpy()} for v, s in sessions.items()}
    reference = model(x).detach().numpy()
    errors = {}
    for v, s in sessions.items():
        out = s.run(None, feed[v])[0]
        errors[v] = float(np.abs(out - reference).max() / np.abs(reference).max())
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    import time

    for r in range(warmup + repeats):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for v in order:
            start = time.perf_counter()
            sessions[v].run(None, feed[v])
            if r >= warmup:
                times[v].append(time.perf_counter() - start)
    ratios = {
        f"ours/{o}": quantiles([a / b for a, b in zip(times["ours"], times[o], strict=True)])
        for o in ("ort", "plain")
    }
    return {
        "model": name,
        "batch": batch,
        "bn": report.bn_count,
        "folded": len(report.folded),
        "lowered": len(report.lowered),
        "files": {"plain": nodes(plain), "ours": nodes(ours)},
        "run": {
            "ort": nodes(folder / f"{name}.ort-optimised.onnx"),
            "ours": nodes(folder / f"{name}.ours-optimised.onnx"),
        },
        "ms": {v: {k: t * 1e3 for k, t in quantiles(times[v]).items()} for v in VARIANTS},
        "ratios": ratios,
        "error": errors,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# bnsurgery export vs the model exported as it is, in ONNX Runtime",
        "",
        f"Generated {meta['date']} on {meta['machine']}, onnxruntime {ort.__version__}; random "
        f"init, random BN statistics, 224x224, {meta['repeats']} interleaved rounds after "
        f"{meta['warmup']} warm-up rounds; BN left lowered: {meta['lower_to']}. Command: "
        f"`{meta['command']}`.",
        "",
        "| model | batch | BN: folded / lowered | nodes in file: plain / ours | BatchNormalization "
        "in file: plain / ours | run by ORT: nodes, BN (ort) / (ours) | ms plain / ort / ours "
        "| ours/ort (IQR) | ours/plain | err ours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = " / ".join(f"{r['ms'][v]['median']:.2f}" for v in VARIANTS)
        o, p = r["ratios"]["ours/ort"], r["ratios"]["ours/plain"]
        same = r["run"]["ort"]["ops"] == r["run"]["ours"]["ops"]
        verdict = "met" if o["median"] <= 1.0 else "same graph" if same else "MISSED"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['folded']} / {r['lowered']} "
            f"| {r['files']['plain']['nodes']} / {r['files']['ours']['nodes']} "
            f"| {r['files']['plain']['batch_norm']} / {r['files']['ours']['batch_norm']} "
            f"| {r['run']['ort']['nodes']}, {r['run']['ort']['batch_norm']} / "
            f"{r['run']['ours']['nodes']}, {r['run']['ours']['batch_norm']} | {ms} "
            f"| {o['median']:.3f} ({o['q1']:.3f} to {o['q3']:.3f}) {verdict} "
            f"| {p['median']:.3f} | {r['error']['ours']:.1e} |"
        )
    lines += [
        "",
        "*plain*: `torch.onnx.export(model, dynamo=True)` of the model as built (its own "
        "optimisation fuses a Conv and the BatchNormalization right after it), ORT "
        "optimisations off; *ort*: the same file, ORT's full optimisations; *ours*: "
        "`bnsurgery.export`, ORT's full optimisations. Ratios are medians of per-round ratios; "
        "*run by ORT*: the graph ORT runs after its optimisations (`optimized_model_filepath`), "
        "its node count and the BatchNormalization nodes left in it. *err*: max relative error "
        "of the output against the eager model. Target: ours/ort <= 1 on every model; *same "
        "graph*: above 1, but ORT runs the same operators in both (the same counts of each "
        "kind), so the ratio is this machine's noise (compare its IQR).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--lower-to", default="auto", choices=("auto", "affine", "conv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            options = (args.batch, args.repeats, args.warmup, args.threads, Path(tmp))
            rows.append(bench(name, *options, args.lower_to))
            r = rows[-1]
            print(name, {k: round(v["median"], 3) for k, v in r["ratios"].items()}, flush=True)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(args.threads),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "lower_to": args.lower_to,
        "command": "python benchmarks/bench_export.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export.md").write_text(markdown(rows, meta))
    (args.out / "export.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out / 'export.md'}")


if __name__ == "__main__":
    main()
