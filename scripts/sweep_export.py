#!/usr/bin/env python
"""Sweep ``bnsurgery.export`` over BatchNorm models of timm and torchvision, to ONNX and pt2.

Which models: the three smallest (by parameter count) of every family that has BN, from the
fold sweep's side file (``benchmarks/results/zoo_sweep.jsonl``: every timm and torchvision
model, whether it has BN, its size). A family is a timm module (``timm.list_modules()``:
``resnet``, ``efficientnet``, ...) or the torchvision module that builds the model
(``resnet``, ``mobilenetv3``, ``faster_rcnn``, ...). ``--filter`` picks models by name instead.

Each model is built as the fold sweep builds it (random init, random BN statistics, eval mode;
its first input that runs, batch 2, images scaled down to 96 pixels), in a worker process with
a time and memory limit (``sweep_zoo.Worker``). Then, for each format:

* ``bnsurgery.export(model, inputs, file)`` with its defaults (dynamic batch; BN left lowered
  to a 1x1 depthwise conv for ONNX, a multiply-add for pt2), timed; what it folded and
  lowered, the operators before (the same exporter on the model as given) and after, the file
  size, its own check's error;
* then **checked here, independently of bnsurgery's own check**: the written file loaded
  back (``torch.export.load``; ``onnx.load`` and an ONNX Runtime session), its BN nodes
  counted (``batch_norm`` targets; ``BatchNormalization`` ops), and run on new inputs (the
  example inputs with noise added and, where the batch is dynamic, one sample more) against
  the eager model, ``max|a - b| / max|a|`` per output (``tests.measure``) within the report's
  tolerance.

A format's status: ``ok`` (written, zero BN nodes, within tolerance here too), ``unsupported``
(exit 8: the exporter's one-line reason, or a BN that cannot be lowered), ``verification``
(exit 7: the artifact moved or kept a BN), ``error`` (anything else: a bug of ours), or
``rounding`` (written, 0 BN nodes, but on the new inputs the artifact moved beyond the
tolerance by no more than ten times what the eager model's own float32 rounding moves it,
measured against the model in float64: a random-init network that amplifies rounding, as the
fold sweep's float64 checks show for such models), or ``check_failed`` (export said yes and the
independent check here says no: a bug of ours too).

Examples::

    python scripts/sweep_export.py --limit 5
    python scripts/sweep_export.py --filter 'timm:resnet18' --out /tmp/x.md
    python scripts/sweep_export.py --resume                  # the whole sweep; restartable
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import functools
import gc
import json
import math
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import sweep_zoo as zoo  # noqa: E402  (builds, inputs and workers as the fold sweep has them)
from torch.utils._pytree import tree_leaves, tree_map  # noqa: E402

from tests.measure import max_rel_error  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "export_sweep.md"
FOLD_SWEEP = ROOT / "benchmarks" / "results" / "zoo_sweep.jsonl"
FORMATS = ("onnx", "pt2")
PER_FAMILY = 3


# =============================================================================== selection


@functools.cache
def _timm_modules() -> dict[str, str]:
    import timm

    return {n: m for m in timm.list_modules() for n in timm.list_models(module=m)}


def family(name: str) -> str:
    """``timm.<module>`` or ``torchvision.<module>`` of a model name."""
    ns, _, bare = name.partition(":")
    if ns == "timm":
        return "timm." + _timm_modules().get(bare, "?")
    import torchvision

    return "torchvision." + torchvision.models.get_model_builder(bare).__module__.rsplit(".")[-1]


def chosen(per_family: int = PER_FAMILY) -> list[str]:
    """The ``per_family`` smallest BN models of each family, by the fold sweep's record."""
    families: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for record in zoo.read_jsonl(FOLD_SWEEP):
        if record.get("status") in (None, "no_bn") or not record.get("bn"):
            continue
        families[family(record["name"])].append((int(record.get("params") or 0), record["name"]))
    return [n for fam in sorted(families) for _, n in sorted(families[fam])[:per_family]]


# =============================================================================== worker


def _bn_nodes(path: Path, fmt: str) -> int:
    """BN nodes in the written file, counted by its own loader."""
    if fmt == "pt2":
        import torch

        graph = torch.export.load(str(path)).graph
        return sum("batch_norm" in str(n.target) for n in graph.nodes)
    import onnx

    model = onnx.load(str(path))
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return sum(n.op_type == "BatchNormalization" for n in nodes)


def _fresh(args: tuple[Any, ...], grow: bool) -> tuple[Any, ...]:
    """New inputs like ``args``: noise added to every float tensor, and with ``grow`` one
    sample more on every tensor whose first dimension is the batch (the first tensor's)."""
    import torch

    tensors = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.dim() > 0]
    batch = tensors[0].shape[0] if tensors else None
    g = torch.Generator().manual_seed(1)

    def new(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        t = t + 0.1 * torch.randn(t.shape, generator=g).to(t.dtype)
        if grow and t.dim() > 0 and t.shape[0] == batch:
            t = torch.cat([t, t[:1]])
        return t

    return tree_map(new, args)


def _run_artifact(path: Path, fmt: str, args: tuple[Any, ...]) -> list[Any]:
    import torch

    if fmt == "pt2":
        with torch.no_grad():
            return list(tree_leaves(torch.export.load(str(path)).module()(*args)))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = [t.numpy() for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
    return [torch.from_numpy(a) for a in session.run(None, dict(zip(names, feed, strict=True)))]


def export_one(model: Any, args: tuple[Any, ...], fmt: str, folder: Path) -> dict[str, Any]:
    """Export ``model`` as ``fmt`` and check the file here; the format's record."""
    import torch

    import bnsurgery
    from bnsurgery.errors import UnsupportedModelError, VerificationError

    path = folder / f"model.{fmt}"
    start = time.perf_counter()
    try:
        report = bnsurgery.export(model, args, path, force=True)
    except (UnsupportedModelError, VerificationError) as exc:
        status = "unsupported" if isinstance(exc, UnsupportedModelError) else "verification"
        return {"status": status, "error": zoo._one_line(exc), "s": _since(start)}
    except Exception as exc:
        return {
            "status": "error",
            "error": zoo._one_line(exc),
            "traceback": traceback.format_exc()[-2000:],
            "s": _since(start),
        }
    record: dict[str, Any] = {
        "s": _since(start),
        "folded": len(report.folded),
        "lowered": len(report.lowered),
        "nodes_before": report.nodes_before,
        "nodes": report.nodes,
        "size": report.size,
        "err": max(report.max_rel_error),
        "tolerance": report.tolerance,
        "dynamic_batch": report.dynamic_batch,
    }
    if report.notes:
        record["notes"] = list(report.notes)
    try:  # the independent check
        record["bn_nodes"] = _bn_nodes(path, fmt)
        fresh = _fresh(args, grow=report.dynamic_batch)
        with torch.no_grad():
            want = model(*fresh)
        got = _run_artifact(path, fmt, fresh)
        want_leaves = [t for t in tree_leaves(want) if isinstance(t, torch.Tensor)]
        record["check_err"] = max_rel_error(want_leaves, got)
        record["check_batch"] = int(next(t for t in tree_leaves(fresh) if t.dim() > 0).shape[0])
    except Exception as exc:
        record.update(status="check_failed", error=f"independent check: {zoo._one_line(exc)}")
        return record
    good = record["bn_nodes"] == 0 and record["check_err"] <= report.tolerance
    record["status"] = "ok" if good else "check_failed"
    if not good and record["bn_nodes"] == 0:
        # the eager model's own float32 rounding on these inputs (against it in float64): an
        # ill-conditioned random-init network amplifies any rounding, a fold's included
        record["noise32"] = _float32_noise(model, fresh, want)
        if record["check_err"] <= 10 * record["noise32"]:
            record["status"] = "rounding"
            record["error"] = (
                f"error {record['check_err']:.2g} on new inputs (tolerance "
                f"{report.tolerance:g}); the eager model's own float32 rounding: "
                f"{record['noise32']:.2g}"
            )
            return record
    if record["status"] != "ok":
        record["error"] = (
            f"independent check: {record['bn_nodes']} BN nodes, "
            f"error {record['check_err']:.3g} on new inputs"
        )
    return record


def _float32_noise(model: Any, args: tuple[Any, ...], want32: Any) -> float:
    """``max|a - b| / max|a|`` of the model in float32 (``want32``) against it in float64."""
    import copy

    import torch

    wide = copy.deepcopy(model).double()
    cast = tree_map(
        lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, args
    )
    with torch.no_grad():
        want64 = wide(*cast)
    return max_rel_error(
        [t for t in tree_leaves(want64) if isinstance(t, torch.Tensor)],
        [t.double() for t in tree_leaves(want32) if isinstance(t, torch.Tensor)],
    )


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)


def run_one(name: str, category: str, send: Any, budget_mb: float = math.inf) -> dict[str, Any]:
    """Build ``name`` as the fold sweep does and export it to every format."""
    import torch

    from bnsurgery.testing import randomize_bn

    record: dict[str, Any] = {"name": name, "category": category, "family": family(name)}
    send({"phase": "build"})
    model, kwargs, failure = None, {}, ""
    for extra in zoo._build_kwargs(name, category):
        try:
            torch.manual_seed(0)
            model, kwargs = zoo._build(name, category, extra), extra
            break
        except Exception as exc:
            failure = zoo._one_line(exc)
    if model is None:
        return {**record, "status": "setup_error", "error": f"build: {failure}"}
    if kwargs:
        record["kwargs"] = kwargs
    record["bn"] = zoo._bn_count(model)
    record["params"] = sum(p.numel() for p in model.parameters())
    if record["bn"] == 0:
        return {**record, "status": "no_bn"}
    randomize_bn(model, 0)
    model.eval()
    send({"phase": "reference forward"})
    args = None
    for description, make in zoo._input_candidates(name, category, model):
        try:
            candidate = make(torch.float32)
            with torch.no_grad():
                model(*candidate)
            args, record["input"] = candidate, description
            break
        except Exception:
            gc.collect()
    if args is None:
        return {**record, "status": "setup_error", "error": "no input runs the model"}
    send({"update": record})
    with tempfile.TemporaryDirectory(prefix="bnsurgery-export-sweep-") as folder:
        for fmt in FORMATS:
            send({"phase": f"export {fmt}"})
            record[fmt] = export_one(model, args, fmt, Path(folder))
            send({"update": record})
            gc.collect()
    statuses = {record[f]["status"] for f in FORMATS}
    record["status"] = "ok" if statuses == {"ok"} else "/".join(sorted(statuses - {"ok"}))
    return record


# =============================================================================== Markdown


def _err(value: Any) -> str:
    return "" if value is None else f"{value:.1e}"


def _counts(records: list[dict[str, Any]], fmt: str) -> collections.Counter[str]:
    return collections.Counter(
        (r.get(fmt) or {}).get("status") or r.get("status", "?") for r in records
    )


def _reason(text: str) -> str:
    """An exporter's reason with names and numbers taken out, to group equal reasons."""
    text = re.sub(r"^\w+Error: cannot export to \w+: ", "", text or "")
    return zoo.short_reason(text)[:240]


def render(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    swept = [r for r in records if r.get("status") != "no_bn"]
    lines = [
        "# Export sweep",
        "",
        f"`{meta['command']}` on {meta['when']}: torch {meta['torch']}, timm {meta['timm']}, "
        f"torchvision {meta['torchvision']}, onnx {meta['onnx']}, onnxruntime "
        f"{meta['onnxruntime']}. The three smallest BN models of each family (timm module, "
        "torchvision module), random weights and BN statistics, batch 2, "
        "`bnsurgery.export` with its defaults; then each written file loaded back by its own "
        "runtime here, its BN nodes counted and its outputs compared with the eager model on "
        "new inputs (a sample more where the batch is dynamic). How: "
        "`scripts/sweep_export.py`'s docstring.",
        "",
        f"**{len(swept)} models**, {len({r.get('family') for r in swept})} families.",
        "",
        "| format | ok: written, 0 BN nodes, checked | rounding: written, 0 BN nodes, within "
        "10x the model's own float32 noise | unsupported (exit 8) | verification (exit 7) | "
        "error / check failed (ours) | other |",
        "|---|---|---|---|---|---|---|",
    ]
    for fmt in FORMATS:
        c = _counts(swept, fmt)
        ours = c["error"] + c["check_failed"]
        known = c["ok"] + c["rounding"] + c["unsupported"] + c["verification"] + ours
        lines.append(
            f"| {fmt} | {c['ok']} | {c['rounding']} | {c['unsupported']} | {c['verification']} "
            f"| {ours} | {sum(c.values()) - known} |"
        )
    for fmt in FORMATS:
        done = [r[fmt] for r in swept if (r.get(fmt) or {}).get("status") == "ok"]
        if not done:
            continue
        folded = sum(d["folded"] for d in done)
        lowered = sum(d["lowered"] for d in done)
        worst = max(d["check_err"] for d in done)
        fixed = sum(not d["dynamic_batch"] for d in done)
        lines += [
            "",
            f"{fmt}: {folded + lowered} BN layers in the {len(done)} files written, "
            f"{folded} folded and {lowered} lowered, 0 BN nodes left; worst error on new "
            f"inputs {worst:.1e}; {len(done) - fixed} with a dynamic batch (checked a "
            f"sample larger), {fixed} fixed by the model; operators "
            f"{sum(d['nodes_before'] for d in done):,} before, "
            f"{sum(d['nodes'] for d in done):,} after.",
        ]
    failed = [(r, f) for r in swept for f in FORMATS if (r.get(f) or {}).get("status") != "ok"]
    if failed:
        lines += ["", "## Not ok, by status and reason (rounding: written, see above)", ""]
        reasons: dict[str, list[str]] = collections.defaultdict(list)
        for r, f in failed:
            part = r.get(f) or {}
            status = part.get("status") or r.get("status", "?")
            text = part.get("error") or r.get("error", "")
            reasons[f"{status}: {_reason(text)}"].append(f"{r['name']} ({f})")
        for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- {len(names)} x `{reason}` — {', '.join(names)}")
    lines += [
        "",
        "## Every model",
        "",
        "BN: layers in the model; folded / lowered by the export; nodes: operators before "
        "(the same exporter on the model as given) → after; err: the artifact on new inputs "
        "here; s: the export's seconds.",
        "",
        "| model | family | BN | onnx folded/lowered | onnx nodes | onnx err | onnx s | "
        "pt2 folded/lowered | pt2 nodes | pt2 err | pt2 s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(swept, key=lambda r: (r.get("family", ""), r["name"])):
        cells = [f"`{r['name']}`", r.get("family", ""), str(r.get("bn", ""))]
        for fmt in FORMATS:
            d = r.get(fmt) or {}
            if d.get("status") in ("ok", "rounding", "check_failed") and "nodes" in d:
                cells += [
                    f"{d['folded']}/{d['lowered']}",
                    f"{d['nodes_before']}→{d['nodes']}",
                    _err(d.get("check_err")),
                    str(d["s"]),
                ]
            else:
                cells += ["", "", "", str(d.get("s", ""))]
        cells.append(r.get("status", "?"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# =============================================================================== main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", action="append", metavar="GLOB", help="models by glob")
    parser.add_argument("--per-family", type=int, default=PER_FAMILY)
    parser.add_argument("--limit", type=int, help="stop after N models")
    parser.add_argument("--timeout-per-model", type=float, default=600.0)
    parser.add_argument("--max-rss-gb", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--resume", action="store_true", help="skip models in the side file")
    parser.add_argument("--shard", default="0/1", help="K/N: every N-th model from the K-th")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        zoo.worker_main(args.threads, args.max_rss_gb * 1024, run=run_one)
        return 0
    warnings.filterwarnings("ignore")
    import onnx
    import onnxruntime
    import timm
    import torch
    import torchvision

    jsonl = args.out.with_suffix(".jsonl")
    meta = {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "command": " ".join(["scripts/sweep_export.py", *(argv or sys.argv[1:])]),
    }
    if args.report_only:
        meta["command"] = "scripts/sweep_export.py (this report re-rendered from its side file)"
        zoo.write_atomic(args.out, render(zoo.read_jsonl(jsonl), meta))
        return 0
    sharding = zoo.parse_shard(args.shard, args.resume)
    if sharding is None:
        return 2
    shard, shards = sharding
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        jsonl.write_text("")
    names = zoo.selected(zoo.all_models(), args.filter) if args.filter else chosen(args.per_family)
    seen = {r.get("name") for r in zoo.read_jsonl(jsonl)}
    todo = [n for i, n in enumerate(names) if i % shards == shard and n not in seen]
    if args.limit is not None:
        todo = todo[: args.limit]
    print(f"{len(todo)} models to export ({len(seen)} already in {jsonl})", flush=True)
    script = Path(__file__).resolve()
    worker: zoo.Worker | None = None
    try:
        for i, name in enumerate(todo, 1):
            if worker is None or worker.proc.poll() is not None or worker.done >= 10:
                if worker is not None:
                    worker.close()
                worker = zoo.Worker(args.threads, args.verbose, args.max_rss_gb, script=script)
            start = time.monotonic()
            record, _ = worker.run(name, args.timeout_per_model, args.max_rss_gb * 1024)
            record["total_s"] = round(time.monotonic() - start, 1)
            with jsonl.open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")
            print(
                f"[{i}/{len(todo)}] {name}: {record.get('status')} {record['total_s']}s"
                + (f" -- {record['error'][:150]}" if record.get("error") else ""),
                flush=True,
            )
            zoo.write_atomic(args.out, render(zoo.read_jsonl(jsonl), meta))
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to go on", file=sys.stderr)
        return 130
    finally:
        if worker is not None:
            worker.kill()
    zoo.write_atomic(args.out, render(zoo.read_jsonl(jsonl), meta))
    print(f"wrote {args.out} and {jsonl}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
