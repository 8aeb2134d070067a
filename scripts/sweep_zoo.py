#!/usr/bin/env python
"""Sweep bnsurgery's fold over every BatchNorm model in timm and torchvision.

Every architecture in ``timm.list_models()`` and ``torchvision.models.list_models()`` (names
prefixed ``timm:`` / ``torchvision:``; nothing deduplicated) is built with random weights
(nothing is downloaded). Models without a BN module are recognised from a build on the meta
device and skipped before anything runs; they are not counted. Every other model gets random BN
statistics (``bnsurgery.testing.randomize_bn``), eval mode and a small batch of 2, and then:

* the reference output; a deep copy folded with ``bnsurgery.fold`` on the same inputs, timed;
* the max relative error ``max|a - b| / max|a|`` over float outputs, computed here rather than
  taken from the fold report;
* where our fold raised a ``VerificationError`` or the error exceeds 1e-5: the fold again
  without verification (to measure the float32 error), and the whole check in float64. An
  exact fold is ~1e-12 in float64; a large float64 error points at a fold bug, a small one at
  float32 rounding amplified by the random-init network or at discrete post-processing
  (detection NMS) flipping on rounding noise;
* how many BN layers ``torch.fx.experimental.optimization.fuse`` folds (or "untraceable");
* the reasons for every BN left, aggregated with counts.

A model whose weights would not fit three times in half the worker's memory limit is folded in
place instead of on a copy, and rebuilt from the same seed (checked bit for bit against the
reference) for the steps after; a check whose weights alone would not fit is recorded as
skipped with what it needs.

Inputs: timm models at their ``pretrained_cfg`` input size scaled down to a shorter side of 96
(or the model's minimum), falling back to the native size when a small input fails (fixed-size
models go straight to it); torchvision classifiers at 96x96, else their native crop; detection
models a list of two 3xHxW images (R-CNN/RetinaNet/FCOS built with a 256 pixel transform);
video models N,3,T,H,W; RAFT two images and 2 flow updates.

Each model runs in a worker process with a time limit and a memory limit; a hang, a crash or a
memory blow-up kills that worker and is recorded for that model alone, then a fresh worker goes
on. Workers are also replaced every ``--recycle`` models so memory stays bounded. Results are
appended to a JSONL side file after every model (``--resume`` skips the models in it) and the
Markdown report is rewritten from it after every model.

Examples::

    python scripts/sweep_zoo.py --limit 15
    python scripts/sweep_zoo.py --filter 'timm:mobilenet*' --filter 'torchvision:*rcnn*'
    python scripts/sweep_zoo.py --resume                  # the full sweep, hours; restartable
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import fnmatch
import gc
import json
import math
import os
import re
import select
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.measure import leaves, max_rel_error  # noqa: E402  (measured independently of bnsurgery)

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "zoo_sweep.md"
TOLERANCE = 1e-5
SMALL_SIDE = 96

# statuses: "ok" and "over_tolerance" are about our fold; "fold_error" means it raised;
# "setup_error" means the model itself could not be built or run (not a fold problem)
STATUSES = (
    "ok",
    "over_tolerance",
    "fold_error",
    "setup_error",
    "timeout",
    "crashed",
    "memory",
)


# =============================================================================== worker


def _is_bn(module: Any) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    name = type(module).__name__
    return isinstance(module, _BatchNorm) or (name.startswith("Frozen") and "BatchNorm" in name)


def _bn_count(model: Any) -> int:
    return sum(1 for m in model.modules() if _is_bn(m))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def _rows(ref: dict[str, Any], d: dict[str, Any], keys: list[str], count: int) -> Any:
    """One row per detection: the given keys, each scaled by its largest value in ``ref``."""
    import torch

    cols = []
    for k in keys:
        scale = max(ref[k].double().abs().max().item(), 1e-30)
        cols.append(d[k].double().reshape(count, -1) / scale)
    return torch.cat(cols, dim=1)


def detection_error(reference: Any, candidate: Any) -> float:
    """Like :func:`max_rel_error` for detection outputs (a list of dicts of per-detection
    tensors), but blind to the order of detections: every detection is matched to its nearest
    one on the other side (boxes, scores, labels, keypoints, each scaled by its own largest
    value), both ways, and the error of matched pairs is measured per key as usual.

    Random-init detectors give many near-tied scores (1e-17 apart), so top-k and NMS permute
    equal detections on rounding noise even in float64; the set of detections is what must
    match. A different number of detections is inf.
    """
    import torch

    if not (isinstance(reference, list) and isinstance(candidate, list)):
        return max_rel_error(reference, candidate)
    if len(reference) != len(candidate):
        return math.inf
    worst = 0.0
    for a, b in zip(reference, candidate, strict=True):
        if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
            return math.inf
        if any(a[k].shape != b[k].shape for k in a):
            return math.inf
        count = len(a["scores"]) if "scores" in a else 0
        if count == 0:
            continue
        match_keys = [k for k in ("boxes", "scores", "labels", "keypoints") if k in a]

        ra, rb = _rows(a, a, match_keys, count), _rows(a, b, match_keys, count)
        ab = torch.cdist(ra, rb, p=math.inf).argmin(dim=1)  # a's nearest in b
        ba = torch.cdist(rb, ra, p=math.inf).argmin(dim=1)  # b's nearest in a
        for k in a:
            if not a[k].dtype.is_floating_point:
                if not (torch.equal(a[k], b[k][ab]) and torch.equal(b[k], a[k][ba])):
                    return math.inf
                continue
            x, y = a[k].double(), b[k].double()
            scale = max(x.abs().max().item(), 1e-30)
            diff = max((x - y[ab]).abs().max().item(), (y - x[ba]).abs().max().item())
            worst = max(worst, diff / scale)
    return worst


def _float_numel(value: Any) -> int:
    return sum(
        x.numel()
        for x in leaves(value)
        if hasattr(x, "dtype") and getattr(x.dtype, "is_floating_point", False)
    )


class _Categories:
    """Which torchvision models are detection, segmentation, video or optical flow."""

    def __init__(self) -> None:
        import torchvision.models as tvm

        def names(module: Any) -> set[str]:
            return set(tvm.list_models(module=module))

        self.detection = names(tvm.detection)
        self.segmentation = names(tvm.segmentation)
        self.video = names(tvm.video)
        self.flow = names(tvm.optical_flow)

    def of(self, name: str) -> str:
        ns, _, bare = name.partition(":")
        if ns == "timm":
            return "timm"
        for category in ("detection", "segmentation", "video", "flow"):
            if bare in getattr(self, category):
                return category
        return "classification"


def _build(name: str, category: str, extra: dict[str, Any]) -> Any:
    ns, _, bare = name.partition(":")
    if ns == "timm":
        import timm

        return timm.create_model(bare, pretrained=False, **extra)
    import inspect

    import torchvision

    builder = torchvision.models.get_model_builder(bare)
    kwargs = dict(extra)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # never download a backbone
    return builder(weights=None, **kwargs)


def _build_kwargs(name: str, category: str) -> list[dict[str, Any]]:
    """Model kwargs to try in order (smaller detection transforms keep CPU time down)."""
    bare = name.partition(":")[2]
    if category != "detection":
        return [{}]
    # score thresholds 0: a random-init detector keeps no box at the default thresholds,
    # and comparing two empty outputs proves nothing
    if bare.startswith("ssd"):
        return [{"score_thresh": 0.0}, {}]
    if "rcnn" in bare:
        keep: dict[str, Any] = {"box_score_thresh": 0.0}
    else:
        keep = {"score_thresh": 0.0}
    return [{"min_size": 256, "max_size": 256, **keep}, keep, {}]


def _round32(value: float) -> int:
    return max(32, math.ceil(value / 32.0) * 32)


def _input_candidates(name: str, category: str, model: Any) -> list[tuple[str, Any]]:
    """(description, factory(dtype) -> positional args) to try in order."""
    import torch

    def images(c: int, h: int, w: int) -> tuple[str, Any]:
        def make(dtype: torch.dtype) -> tuple[Any, ...]:
            g = torch.Generator().manual_seed(0)
            return (torch.randn(2, c, h, w, generator=g).to(dtype),)

        return f"2x{c}x{h}x{w}", make

    def image_list(h: int, w: int) -> tuple[str, Any]:
        def make(dtype: torch.dtype) -> tuple[Any, ...]:
            g = torch.Generator().manual_seed(0)
            return ([torch.rand(3, h, w, generator=g).to(dtype) for _ in range(2)],)

        return f"[3x{h}x{w}]*2", make

    def video(t: int, s: int) -> tuple[str, Any]:
        def make(dtype: torch.dtype) -> tuple[Any, ...]:
            g = torch.Generator().manual_seed(0)
            return (torch.randn(2, 3, t, s, s, generator=g).to(dtype),)

        return f"2x3x{t}x{s}x{s}", make

    def image_pair(s: int) -> tuple[str, Any]:
        def make(dtype: torch.dtype) -> tuple[Any, ...]:
            g = torch.Generator().manual_seed(0)
            a, b = (torch.rand(2, 3, s, s, generator=g).to(dtype) * 2 - 1 for _ in range(2))
            return (a, b, 2)  # RAFT: image1, image2, num_flow_updates

        return f"2x3x{s}x{s} pair, 2 updates", make

    if category == "timm":
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        try:
            from timm.data import resolve_data_config

            native = tuple(resolve_data_config({}, model=model)["input_size"])
        except Exception:
            native = tuple(cfg.get("input_size") or (3, 224, 224))
        c, h, w = (int(v) for v in native)
        found = [images(c, h, w)]
        if not cfg.get("fixed_input_size", False):
            side = SMALL_SIDE
            minimum = cfg.get("min_input_size")
            if minimum:
                side = max(side, *(int(v) for v in minimum[1:]))
            scale = side / min(h, w)
            if scale < 1:
                found.insert(0, images(c, _round32(h * scale), _round32(w * scale)))
        return found
    if category == "detection":
        return [image_list(160, 160), image_list(320, 320)]
    if category == "segmentation":
        return [images(3, SMALL_SIDE, SMALL_SIDE), images(3, 224, 224)]
    if category == "video":
        return [video(4, 64), video(16, 112), video(16, 224)]
    if category == "flow":
        return [image_pair(128), image_pair(224)]
    found = [images(3, SMALL_SIDE, SMALL_SIDE)]
    try:
        import torchvision

        weights = torchvision.models.get_model_weights(name.partition(":")[2]).DEFAULT
        crop = list(weights.transforms().crop_size)
        found.append(images(3, int(crop[0]), int(crop[-1])))
    except Exception:
        pass
    found.append(images(3, 224, 224))
    return found


_NAMED = re.compile(r"`[^`]*`")
_CALL = re.compile(r"\b[\w.]+\.(\w+)\(\)")  # module path calls: features.3.conv() -> conv()


def short_reason(reason: str) -> str:
    """A reason without module names, so equal reasons aggregate across layers."""
    text = _NAMED.sub("`…`", reason)
    text = _CALL.sub(r"\1()", text)
    return re.sub(r"\b\d+\b", "N", text)


def _fx_folded(
    model: Any, args: tuple[Any, ...], reference: Any, copy_first: bool = True
) -> tuple[Any, Any]:
    """(BN layers torch.fx's fuse folds, its max relative error), or ("untraceable", None).

    Without ``copy_first`` the trace shares the model's modules; fuse replaces them in the
    traced module's own containers with fused copies, so the model keeps its values.
    """
    import torch
    from torch import fx
    from torch.fx.experimental.optimization import fuse

    def bn_targets(gm: Any) -> set[str]:
        modules = dict(gm.named_modules())
        return {
            str(n.target)
            for n in gm.graph.nodes
            if n.op == "call_module" and _is_bn(modules.get(str(n.target)))
        }

    try:
        traced = fx.symbolic_trace(copy.deepcopy(model) if copy_first else model)
    except Exception:
        return "untraceable", None
    before = bn_targets(traced)
    try:
        fused = fuse(traced, inplace=True, no_trace=True)
    except Exception as exc:
        return f"fuse failed: {_one_line(exc)}", None
    folded = len(before - bn_targets(fused))
    try:
        with torch.no_grad():
            error = max_rel_error(reference, fused(*args))
    except Exception:
        error = None
    return folded, error


def _as_float64(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.double() if value.dtype.is_floating_point else value
    if isinstance(value, dict):
        return {k: _as_float64(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_as_float64(v) for v in value)
    return value


ULP_SEEDS = 3


def _ulp_step(model: Any, seed: int, back: bool = False) -> None:
    """Move every floating parameter one ulp, each element up or down at random (``seed``);
    ``back`` undoes it exactly (``nextafter`` is its own inverse on finite values)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.dtype.is_floating_point:
                continue
            up = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.bool)
            if back:
                up = ~up
            inf = torch.tensor(math.inf, dtype=p.dtype)
            p.copy_(torch.nextafter(p, torch.where(up, inf, -inf)))


def ulp_noise(model: Any, args: Any, reference: Any, compare: Any) -> float:
    """How far the output moves when every parameter moves one ulp (largest of
    ``ULP_SEEDS`` random directions): the least any rounding of the weights can cost, which
    a fold cannot avoid (it rounds the folded weights once). The model is restored exactly."""
    import torch

    worst = 0.0
    with torch.no_grad():
        for seed in range(ULP_SEEDS):
            _ulp_step(model, seed)
            try:
                worst = max(worst, compare(reference, model(*args)))
            finally:
                _ulp_step(model, seed, back=True)
        restored = compare(reference, model(*args))
    if restored != 0.0:
        raise RuntimeError(f"one-ulp perturbation not undone exactly ({restored:.3g})")
    return worst


def _float64_check(model: Any, make_args: Any, reference32: Any, compare: Any) -> dict[str, Any]:
    """Fold in float64 and measure the error (~1e-12 when the fold itself is exact), and
    the unfolded model's own float32 rounding noise (its float32 output against float64) and
    its float64 one-ulp weight noise (:func:`ulp_noise`).

    Changes ``model`` (to float64, folded) to keep memory at one copy of the model.
    """
    import torch

    import bnsurgery

    out: dict[str, Any] = {}
    try:
        model.double()
        args = make_args(torch.float64)
        with torch.no_grad():
            reference = model(*args)
        out["noise32"] = compare(reference, _as_float64(reference32))
        out["ulp64"] = ulp_noise(model, args, reference, compare)
        bnsurgery.fold(model, args, verify=False)
        with torch.no_grad():
            out["f64_err"] = compare(reference, model(*args))
    except Exception as exc:
        out["f64_error"] = _one_line(exc)
    return out


def _data_statistics_check(
    model: Any, args: Any, compare: Any, copy_first: bool = True
) -> dict[str, Any]:
    """The fold's float32 error when every BN's statistics match the data it sees
    (``bnsurgery.testing.match_bn_to_data``) instead of being random: closer to what a trained
    model of this architecture would see (random weights can still amplify rounding)."""
    import torch

    import bnsurgery
    from bnsurgery.testing import match_bn_to_data

    out: dict[str, Any] = {}
    try:
        calibrated = match_bn_to_data(copy.deepcopy(model) if copy_first else model, args)
        with torch.no_grad():
            reference = calibrated(*args)
        bnsurgery.fold(calibrated, args)
        with torch.no_grad():
            out["data_err"] = compare(reference, calibrated(*args))
    except Exception as exc:
        out["data_error"] = _one_line(exc)
    return out


def _weights_mb(model: Any) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def run_one(name: str, category: str, send: Any, budget_mb: float = math.inf) -> dict[str, Any]:
    """Everything for one model; ``send`` reports progress (phase and partial results).

    ``budget_mb`` is the worker's memory limit. A model whose weights are too large for three
    copies in half of it (the original, a working copy, the fold's new weights) is folded in
    place and rebuilt (same seed: checked bit for bit) for the steps that need it unfolded;
    a check that cannot fit at all is recorded as skipped, with what it would need.
    """
    import torch

    import bnsurgery
    from bnsurgery.errors import VerificationError
    from bnsurgery.testing import randomize_bn

    record: dict[str, Any] = {"name": name, "category": category}

    def phase(text: str) -> None:
        send({"phase": text})

    # 1. BN present? Build on the meta device first: nothing is allocated or initialised.
    phase("meta build")
    meta_count = None
    for extra in _build_kwargs(name, category):
        try:
            with torch.device("meta"):
                meta_count = _bn_count(_build(name, category, extra))
            break
        except Exception:
            continue
    if meta_count == 0:
        return {**record, "status": "no_bn"}

    # 2. Real build with random init, random BN statistics, eval mode.
    phase("build")
    model, build_error, kwargs = None, None, {}
    for extra in _build_kwargs(name, category):
        try:
            torch.manual_seed(0)
            model, kwargs = _build(name, category, extra), extra
            if extra:
                record["kwargs"] = extra
            break
        except Exception as exc:
            build_error = _one_line(exc)
    if model is None:
        return {**record, "status": "setup_error", "error": f"build: {build_error}"}

    def prepared(model: Any) -> Any:
        randomize_bn(model, 0)
        return model.eval()

    def rebuild() -> Any:
        torch.manual_seed(0)
        return prepared(_build(name, category, kwargs))

    record["bn"] = _bn_count(model)
    record["params"] = sum(p.numel() for p in model.parameters())
    if record["bn"] == 0:
        return {**record, "status": "no_bn"}
    model = prepared(model)
    weights_mb = _weights_mb(model)
    in_place = 3 * weights_mb > budget_mb / 2
    if in_place:
        record["in_place"] = True
    send({"update": record})

    # 3. The first input the model runs on.
    phase("reference forward")
    make_args = reference = None
    failures = []
    for description, make in _input_candidates(name, category, model):
        try:
            args = make(torch.float32)
            with torch.no_grad():
                reference = model(*args)
            make_args, record["input"] = make, description
            break
        except Exception as exc:
            failures.append(f"{description}: {_one_line(exc)}")
            gc.collect()
    if make_args is None:
        return {**record, "status": "setup_error", "error": "forward: " + " | ".join(failures)}
    args = make_args(torch.float32)
    send({"update": record})

    # 4. Our fold, on a copy (on the model itself when a copy does not fit).
    phase("fold")
    work = model if in_place else copy.deepcopy(model)
    start = time.perf_counter()
    try:
        bnsurgery.fold(work, args)
        record["fold_s"] = round(time.perf_counter() - start, 3)
    except Exception as exc:
        record["fold_s"] = round(time.perf_counter() - start, 3)
        record["error"] = _one_line(exc)
        record["status"] = "fold_error"
        if not isinstance(exc, VerificationError):
            record["traceback"] = traceback.format_exc()[-2000:]
            return record
        phase("fold without verification")
        work = model if in_place else copy.deepcopy(model)  # a failed fold changes nothing
        try:
            bnsurgery.fold(work, args, verify=False)
        except Exception as again:
            record["error"] += f"; without verification: {_one_line(again)}"
            return record
    report = bnsurgery.last_report(work)
    if report is not None:
        record["folded"] = len(report.folded)
        record["left"] = len(report.left)
        record["left_in_model"] = _bn_count(work)
        reasons = Counter(short_reason(s.reason) for s in report.left)
        record["reasons"] = dict(reasons.most_common())
        if report.notes:
            record["fold_notes"] = list(report.notes)
    phase("compare")
    compare = detection_error if category == "detection" else max_rel_error
    with torch.no_grad():
        record["err"] = compare(reference, work(*args))
    if _float_numel(reference) == 0:
        record["note"] = "the output has no floating values: the comparison proves nothing"
    record.setdefault("status", "ok" if record["err"] <= TOLERANCE else "over_tolerance")
    del work
    if in_place:
        phase("rebuild")
        del model
        gc.collect()
        model = rebuild()
        with torch.no_grad():
            same = compare(reference, model(*args))
        if same != 0.0:
            record["limit"] = f"rebuilt model differs from the first build by {same:.3g}"
            return record
    gc.collect()
    send({"update": record})

    # 5. Baseline: torch.fx conv-BN fusion.
    phase("fx fuse")
    record["fx"], record["fx_err"] = _fx_folded(model, args, reference, copy_first=not in_place)
    send({"update": record})

    # 6. Anything that failed verification or exceeded the tolerance, again with BN statistics
    #    that match the data (a well-conditioned network, like a trained one), then in float64.
    if record["status"] != "ok":

        def fits(check: str, copies: float) -> bool:
            need = copies * weights_mb
            if need <= 0.9 * budget_mb:
                return True
            record[f"{check}_error"] = (
                f"skipped: needs about {need / 1024:.1f} GiB for weights alone, over the "
                f"worker's {budget_mb / 1024:.1f} GiB"
            )
            return False

        phase("one-ulp weight noise")
        try:
            record["ulp32"] = ulp_noise(model, args, reference, compare)
        except Exception as exc:
            record["ulp32_error"] = _one_line(exc)
        send({"update": record})
        if fits("data", 2 if in_place else 3):
            phase("statistics from data")
            record.update(_data_statistics_check(model, args, compare, copy_first=not in_place))
            if in_place:
                del model
                gc.collect()
                model = rebuild()
        if fits("f64", 4):
            phase("float64 check")
            record.update(_float64_check(model, make_args, reference, compare))
    return record


def worker_main(threads: int, budget_mb: float, run: Any = None) -> None:
    """Read model names on stdin, write JSON messages on the original stdout; each model is
    ``run(name, category, send, budget_mb)`` (default :func:`run_one`)."""
    run = run or run_one
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a model prints goes to stderr, not into the protocol
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    categories = _Categories()

    def send(message: dict[str, Any]) -> None:
        proto.write(json.dumps(message, default=str) + "\n")
        proto.flush()

    send({"ready": True})
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        try:
            result = run(name, categories.of(name), send, budget_mb)
        except Exception as exc:
            result = {
                "name": name,
                "status": "setup_error",
                "error": f"sweep: {_one_line(exc)}",
                "traceback": traceback.format_exc()[-2000:],
            }
        gc.collect()
        send({"result": result, "rss_mb": _rss_mb(os.getpid())})


# =============================================================================== parent


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Worker:
    """One worker process (``script --worker``, this one by default); ``run`` one model with
    a time and memory limit."""

    def __init__(
        self, threads: int, verbose: bool, max_rss_gb: float, script: Path | None = None
    ) -> None:
        cmd = [
            sys.executable,
            str(script or Path(__file__).resolve()),
            "--worker",
            "--threads",
            str(threads),
            "--max-rss-gb",
            str(max_rss_gb),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if verbose else subprocess.DEVNULL,
            cwd=ROOT,
            text=False,
        )
        self.buffer = b""
        self.done = 0
        self._wait_for(lambda m: m.get("ready"), timeout=300, max_rss_mb=math.inf)

    def _messages(self, timeout: float) -> list[dict[str, Any]] | None:
        """Messages that arrive within ``timeout``; None at end of file."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        out = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def _wait_for(self, done: Any, timeout: float, max_rss_mb: float, on: Any = None) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Limit("timeout", f"over the {timeout:g}s limit")
            messages = self._messages(min(1.0, remaining))
            if messages is None:
                code = self.proc.wait()
                raise _Limit("crashed", f"worker died with exit code {code}")
            for message in messages:
                if done(message):
                    return message
                if on is not None:
                    on(message)
            rss = _rss_mb(self.proc.pid)
            if rss > max_rss_mb:
                raise _Limit("memory", f"worker RSS {rss / 1024:.1f} GiB over the limit")

    def run(self, name: str, timeout: float, max_rss_mb: float) -> tuple[dict[str, Any], float]:
        assert self.proc.stdin is not None
        self.done += 1
        partial: dict[str, Any] = {"name": name}
        current = {"phase": "start"}

        def on(message: dict[str, Any]) -> None:
            if "phase" in message:
                current["phase"] = message["phase"]
            if "update" in message:
                partial.update(message["update"])

        self.proc.stdin.write(name.encode() + b"\n")
        self.proc.stdin.flush()
        try:
            message = self._wait_for(lambda m: "result" in m, timeout, max_rss_mb, on)
        except _Limit as limit:
            self.kill()
            detail = f"{limit.status}: {limit.detail} (during {current['phase']})"
            if "status" in partial:  # the fold itself finished; a later step hit the limit
                partial["limit"] = detail
            else:
                partial.update(status=limit.status, error=detail)
            return partial, math.inf
        return message["result"], float(message.get("rss_mb", 0.0))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by its handle
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class _Limit(Exception):
    def __init__(self, status: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def all_models() -> list[str]:
    import timm
    import torchvision

    names = [f"timm:{n}" for n in timm.list_models()]
    return names + [f"torchvision:{n}" for n in torchvision.models.list_models()]


def selected(names: list[str], patterns: list[str] | None) -> list[str]:
    """Names matching any glob, tried on ``ns:name`` and on the bare name."""
    if not patterns:
        return names
    return [
        n
        for n in names
        if any(
            fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n.partition(":")[2], p)
            for p in patterns
        )
    ]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


# ----------------------------------------------------------------------------- Markdown


def _fmt_err(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return "inf" if math.isinf(value) else f"{value:.1e}"


def _cell(text: Any, width: int = 0) -> str:
    text = "" if text is None else str(text)
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def _fx_more(r: dict[str, Any]) -> bool:
    return isinstance(r.get("fx"), int) and r["fx"] > r.get("folded", 0)


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _exact64(r: dict[str, Any]) -> bool:
    """The float64 fold is exact: within 1e-9, or within twice what moving every parameter
    one ulp does to this float64 model (a model can amplify float64 rounding too)."""
    f64, ulp64 = r.get("f64_err"), r.get("ulp64")
    return _num(f64) and f64 <= max(1e-9, 2 * ulp64 if _num(ulp64) else 0.0)


def _within_ulp32(r: dict[str, Any]) -> bool:
    """The float32 fold moved the output no more than twice what moving every parameter one
    ulp does (finite: for detection outputs that flip under any rounding it says nothing)."""
    ulp32 = r.get("ulp32")
    return _num(ulp32) and math.isfinite(ulp32) and r["err"] <= max(TOLERANCE, 2 * ulp32)


#: the families fold's linear regions, layout ops and concatenations were built for (issue 14)
FAMILIES = ("repvgg", "mobileone", "repghost", "fastvit", "repvit", "levit", "mixnet", "ghostnetv2")


def _coverage(swept: list[dict[str, Any]]) -> list[str]:
    """BN folded overall, the BN left by class, and the BN left in :data:`FAMILIES`."""
    from bnsurgery.foldplan import left_class

    def left_by_class(rows: list[dict[str, Any]]) -> Counter[str]:
        classes: Counter[str] = Counter()
        for r in rows:
            for reason, n in (r.get("reasons") or {}).items():
                classes[left_class(reason)] += int(n)
        return classes

    total = sum(int(r.get("bn") or 0) for r in swept)
    folded = sum(int(r.get("folded") or 0) for r in swept)
    classes = left_by_class(swept)
    lines = [
        f"- BN folded: **{folded:,} of {total:,} ({100 * folded / max(total, 1):.1f}%)**; "
        'BN left by class (README, "Never folded"): '
        + (", ".join(f"{k} {v:,}" for k, v in classes.most_common()) or "none")
    ]
    parts = []
    for family in FAMILIES:
        rows = [
            r for r in swept
            if re.match(rf"timm:(tf_)?{family}", r["name"]) and r.get("status") != "setup_error"
        ]  # fmt: skip
        bn = sum(int(r.get("bn") or 0) for r in rows)
        left = sum(int(r.get("bn") or 0) - int(r.get("folded") or 0) for r in rows)
        why = left_by_class(rows)
        parts.append(
            f"{family} {left} of {bn:,} in {len(rows)} models"
            + (f" ({', '.join(f'{k} {v}' for k, v in why.most_common())})" if why else "")
        )
    lines.append(
        "- BN left in the multi-branch, layout and concatenation families: " + "; ".join(parts)
    )
    return lines


def _carried(swept: list[dict[str, Any]]) -> list[str]:
    """Rows kept from an earlier run rather than rerun (a record with ``carried_over``)."""
    kept = [r for r in swept if r.get("carried_over")]
    if not kept:
        return []
    lines = []
    for when in sorted({str(r["carried_over"]) for r in kept}):
        names = [r["name"] for r in kept if str(r["carried_over"]) == when]
        listed = f" ({', '.join(names)})" if len(names) <= 20 else ""
        lines.append(
            f"- carried over from the run of {when}, not rerun (every BN folded then, which the "
            f"later changes to fold, widening where a BN may go, cannot move): {len(names)}"
            f"{listed}"
        )
    return lines


def render(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    swept = [r for r in records if r.get("status") != "no_bn"]
    skipped = len(records) - len(swept)
    by = Counter(r.get("status") for r in swept)
    measured = [r for r in swept if isinstance(r.get("err"), int | float)]
    worst = max(measured, key=lambda r: r["err"], default=None)
    fold_errors = [r for r in swept if r.get("status") == "fold_error"]
    over = [r for r in swept if r.get("status") == "over_tolerance"]
    fx_more = [r for r in swept if _fx_more(r)]
    exact64 = [
        r
        for r in fold_errors + over
        if isinstance(r.get("f64_err"), float) and r["f64_err"] <= TOLERANCE
    ]
    data_ok = [
        r
        for r in fold_errors + over
        if isinstance(r.get("data_err"), float) and r["data_err"] <= TOLERANCE
    ]
    data_checked = [r for r in fold_errors + over if "data_err" in r or "data_error" in r]
    exact = [r for r in over if _exact64(r)]
    not_exact = [
        f"{r['name']} ({_fmt_err(r.get('f64_err')) or _cell(r.get('f64_error'), 60)})"
        for r in over
        if not _exact64(r)
    ]
    plain = [r for r in over if r.get("category") != "detection"]
    within = [r for r in plain if _within_ulp32(r)]
    beyond = [
        f"{r['name']} ({r['err'] / r['ulp32']:.1f}x)" if _num(r.get("ulp32")) else r["name"]
        for r in plain
        if not _within_ulp32(r)
    ]
    detection = [r for r in over if r.get("category") == "detection"]
    lines = [
        "# bnsurgery fold: zoo sweep",
        "",
        f"Generated {meta['when']} with torch {meta['torch']}, timm {meta['timm']}, "
        f"torchvision {meta['torchvision']}; random init, `randomize_bn(seed=0)`, eval, batch 2, "
        f"float32, {meta['threads']} thread(s) per worker. Rows accumulate in the side file over "
        f"runs with `--resume` (and `--redo`); last command: `{meta['command']}`.",
        "",
        f"- models with BN swept: **{len(swept)}** "
        f"(timm {sum(r['name'].startswith('timm:') for r in swept)}, torchvision "
        f"{sum(r['name'].startswith('torchvision:') for r in swept)}); skipped without BN: "
        f"{skipped}",
        "- status: " + ", ".join(f"{s} {by[s]}" for s in STATUSES if by[s]),
        f"- our fold raised: **{len(fold_errors)}**"
        + (f" ({', '.join(r['name'] for r in fold_errors)})" if fold_errors else ""),
        f"- over {TOLERANCE:g} without raising: **{len(over)}**"
        + (f" ({', '.join(r['name'] for r in over)})" if over else ""),
        f"- of those two, passing the same {TOLERANCE:g} check in float64: {len(exact64)} "
        f"(float32 rounding amplified by the random-init network, compare *f32 noise*, or "
        f"discrete post-processing flipping on it; a wrong fold is off by far more)",
        f"- of those over {TOLERANCE:g}, the fold exact in float64 (within 1e-9, or within "
        "twice the model's float64 *ulp noise*: what moving every parameter by one ulp does "
        f"to its output): **{len(exact)} of {len(over)}**"
        + (f"; not: {', '.join(not_exact)}" if not_exact else ""),
        f"- of those over {TOLERANCE:g} (detection aside), the float32 error within twice the "
        f"model's float32 *ulp noise* (rounding each folded weight once costs the same "
        f"kind of error): {len(within)} of {len(plain)}"
        + (f"; beyond (err / ulp noise): {', '.join(beyond)}" if beyond else ""),
        f"- detection models over {TOLERANCE:g}: {len(detection)}; NMS and top-k flip on "
        "any rounding (their ulp noise is up to inf), so fold checks each folded layer on "
        "its own input (the *fold note*)",
        f"- of those two, checked again with BN statistics that match the data (a "
        f"well-conditioned network, like a trained one): {len(data_checked)}, of which within "
        f"{TOLERANCE:g} in float32: {len(data_ok)} (column *data err*)",
        "- max relative error overall: **"
        + (f"{_fmt_err(worst['err'])}** ({worst['name']})" if worst else "n/a**"),
        f"- models where fx fuse folds more BN than bnsurgery: **{len(fx_more)}**"
        + (f" ({', '.join(r['name'] for r in fx_more)})" if fx_more else ""),
        *_coverage(swept),
        *_carried(swept),
        "",
        "Columns: *err* is max\\|a-b\\|/max\\|a\\| over float outputs measured by the sweep "
        "(for a fold that failed verification, of the fold redone without verification; for "
        "detection models blind to the order of detections, see `detection_error`); "
        "*ulp noise* the largest change of the unfolded model's output when every parameter "
        f"moves one ulp up or down at random ({ULP_SEEDS} draws; the fold rounds each folded "
        "weight once, so it cannot promise less), *f64 err* and *f64 ulp* the same in "
        "float64, *f32 noise* the unfolded model's own float32 "
        "output against its float64 output, and *data err* the float32 check with BN "
        "statistics matched to the data, all five only when *err* > 1e-5 or the fold raised; "
        "*fx* the BN count `torch.fx.experimental.optimization.fuse` folds.",
        "",
        "| model | status | input | BN | folded | left | err | ulp noise | f64 err | f64 ulp "
        "| f32 noise | data err | fx | fold s | left: reasons | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(swept, key=lambda r: r["name"]):
        reasons = "; ".join(f"{n}x {_cell(k, 160)}" for k, n in (r.get("reasons") or {}).items())
        f64 = _fmt_err(r.get("f64_err")) or _cell(r.get("f64_error"), 60)
        notes = [str(r[k]) for k in ("error", "limit", "note") if r.get(k)]
        if r.get("in_place"):
            notes.append("folded in place and rebuilt for the later checks (no room for a copy)")
        notes += [f"fold note: {n}" for n in r.get("fold_notes") or []]
        error = "; ".join(notes)
        lines.append(
            "| "
            + " | ".join(
                [
                    _cell(r["name"]),
                    _cell(r.get("status")),
                    _cell(r.get("input")),
                    _cell(r.get("bn")),
                    _cell(r.get("folded")),
                    _cell(r.get("left")),
                    _fmt_err(r.get("err")),
                    _fmt_err(r.get("ulp32")) or _cell(r.get("ulp32_error"), 60),
                    f64,
                    _fmt_err(r.get("ulp64")),
                    _fmt_err(r.get("noise32")),
                    _fmt_err(r.get("data_err")) or _cell(r.get("data_error"), 60),
                    _cell(r.get("fx"), 40),
                    _cell(r.get("fold_s")),
                    _cell(reasons, 400),
                    _cell(error, 240),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # shards write the same report
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------- main


def parse_shard(text: str, resume: bool) -> tuple[int, int] | None:
    """``--shard K/N`` as (K, N); None, with the reason on stderr, when it is malformed or
    N > 1 without ``--resume`` (the shards share one side file, which a fresh start empties)."""
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match[1]) < int(match[2]):
        print(f"--shard must be K/N with 0 <= K < N, got {text!r}", file=sys.stderr)
        return None
    shard, shards = int(match[1]), int(match[2])
    if shards > 1 and not resume:
        print("--shard needs --resume (shards share the side file)", file=sys.stderr)
        return None
    return shard, shards


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--filter",
        action="append",
        metavar="GLOB",
        help="only models matching this glob (on 'ns:name' or the bare name); repeatable",
    )
    parser.add_argument("--limit", type=int, help="stop after N models with BN")
    parser.add_argument(
        "--timeout-per-model", type=float, default=300.0, help="seconds (default 300)"
    )
    parser.add_argument(
        "--max-rss-gb", type=float, default=12.0, help="worker memory limit (default 12)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report path")
    parser.add_argument("--jsonl", type=Path, help="side file (default: --out with .jsonl)")
    parser.add_argument(
        "--resume", action="store_true", help="append, skipping models in the side file"
    )
    parser.add_argument(
        "--redo",
        action="append",
        choices=STATUSES,
        metavar="STATUS",
        help="with --resume: run again the models whose record has this status (their old "
        "records are dropped from the side file); repeatable",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument(
        "--shard",
        default="0/1",
        help="K/N: take every N-th model from the K-th (0-based), so N processes sharing one "
        "--out (and side file) split the sweep between them (default 0/1)",
    )
    parser.add_argument("--recycle", type=int, default=25, help="new worker after this many models")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the Markdown report from the side file, run nothing",
    )
    parser.add_argument("--verbose", action="store_true", help="show worker stderr")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.threads, args.max_rss_gb * 1024)
        return 0
    warnings.filterwarnings("ignore")
    import timm
    import torch
    import torchvision

    out: Path = args.out
    jsonl: Path = args.jsonl or out.with_suffix(".jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "threads": args.threads,
        "command": " ".join(["scripts/sweep_zoo.py", *(argv or sys.argv[1:])]),
    }
    if args.report_only:
        write_atomic(out, render(read_jsonl(jsonl), meta))
        print(f"wrote {out}", flush=True)
        return 0
    sharding = parse_shard(args.shard, args.resume)
    if sharding is None:
        return 2
    shard, shards = sharding
    if args.redo and not args.resume:
        print("--redo needs --resume", file=sys.stderr)
        return 2
    records = read_jsonl(jsonl) if args.resume else []
    if args.redo:
        redo = [r["name"] for r in records if r.get("status") in args.redo]
        redo_names = set(selected(redo, args.filter))
        records = [r for r in records if r.get("name") not in redo_names]
        write_atomic(jsonl, "".join(json.dumps(r, default=str) + "\n" for r in records))
    if not args.resume:
        jsonl.write_text("")
    seen = {r.get("name") for r in records}
    todo = [
        n
        for i, n in enumerate(selected(all_models(), args.filter))
        if i % shards == shard and n not in seen
    ]
    print(f"{len(todo)} candidate models ({len(seen)} already in {jsonl})", flush=True)
    max_rss_mb = args.max_rss_gb * 1024
    worker: Worker | None = None
    counted = 0
    try:
        for name in todo:
            if args.limit is not None and counted >= args.limit:
                break
            if worker is None or worker.proc.poll() is not None or worker.done >= args.recycle:
                if worker is not None:
                    worker.close()
                worker = Worker(args.threads, args.verbose, args.max_rss_gb)
            start = time.monotonic()
            record, rss = worker.run(name, args.timeout_per_model, max_rss_mb)
            record["total_s"] = round(time.monotonic() - start, 1)
            if rss > max_rss_mb / 2:
                worker.close()  # memory kept by the allocator: start the next one fresh
                worker = None
            with jsonl.open("a") as f:  # one short append per record: shards interleave lines
                f.write(json.dumps(record, default=str) + "\n")
            records = read_jsonl(jsonl) if shards > 1 else [*records, record]
            if record.get("status") == "no_bn":
                continue
            counted += 1
            print(
                f"[{counted}] {name}: {record.get('status')} bn={record.get('bn')} "
                f"folded={record.get('folded')} err={_fmt_err(record.get('err'))} "
                f"fx={record.get('fx')} {record['total_s']}s"
                + (f" -- {record['error'][:160]}" if record.get("error") else ""),
                flush=True,
            )
            write_atomic(out, render(records, meta))
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to go on", file=sys.stderr)
        return 130
    finally:
        if worker is not None:
            worker.kill()
        write_atomic(out, render(read_jsonl(jsonl), meta))
    print(f"wrote {out} and {jsonl}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
