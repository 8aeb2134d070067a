"""Deploying in one verified step: fold, lower every BN left, export, check the artifact.

:func:`export` writes a ``torch.export`` program (``.pt2``, saved with ``torch.export.save``)
or an ONNX model (``.onnx``, PyTorch's dynamo exporter) with no batch norm in it at all:

1. what folds is folded (:func:`bnsurgery.fold`, verified as always), on a copy: the model
   given is not changed;
2. every BN left is **lowered** to its inference-only per-channel map, ``x * scale + shift``
   (a multiply-add, or a 1x1 depthwise conv for backends that want convs: by default for
   ONNX, which ONNX Runtime runs faster), a norm-act layer's activation kept after it; every
   module in eval mode;
3. the copy is exported, the batch dimension dynamic by default;
4. **the artifact itself is checked**, not the module it came from: the written file is loaded
   back (``torch.export.load``; an ONNX Runtime session) and run on the example inputs, and on
   them with one more sample (a dynamic batch dimension), against the original eager model
   within the output dtype's tolerance; its graph must hold no ``batch_norm`` /
   ``BatchNormalization`` node. Only then is the file published (atomically, never over an
   existing file without ``force``); on any failure nothing is written.

ONNX needs the ``export`` extra (``onnx``, ``onnxscript``, ``onnxruntime``).
"""

from __future__ import annotations

import contextlib
import copy as _copy
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .checkpoint import ARTIFACT_FORMATS, suffix_format
from .errors import BnSurgeryError, UnsupportedModelError, UsageError, VerificationError, brief
from .foldplan import FoldEdit
from .frozen import FrozenBatchNorm
from .fused import unfuse
from .layers import FoldedBatchNorm, NormActRemainder
from .norms import bn_stats, has_activation, iter_batchnorms, num_features
from .outputs import atomic_write
from .plan import Report, set_report
from .tree import as_args, eval_mode, parents, unwrapped
from .verify import default_tolerance, max_relative_error, tensors_in

__all__ = [
    "Artifact",
    "ExportReport",
    "LoweredBatchNorm",
    "export",
    "cast_inputs",
    "expected_outputs",
    "export_format",
    "graph_nodes",
    "lower_batchnorms",
    "write_artifact",
]

LOWER_TO = ("affine", "conv")
#: ``lower_to="auto"``: by format. ONNX Runtime runs a 1x1 depthwise conv as it runs the
#: BatchNormalization it replaces, but a multiply-add between convs costs it layout changes
#: (densenet121: 494 nodes run instead of 248, 13% slower, measured with ``bench_export.py
#: --lower-to affine``; benchmarks/README.md)
_AUTO = {"onnx": "conv", "pt2": "affine"}


class LoweredBatchNorm(nn.Module):
    """A BN's eval-mode function and nothing else: ``act(drop(x * scale + shift))`` on the
    channel axis (1), ``scale`` and ``shift`` buffers (float64 maths, in the BN's dtype); the
    ``drop`` and ``act`` of a timm norm-act layer are kept under their names.

    For a BN that says its rank (BatchNorm2d/3d) the buffers are shaped to broadcast, so an
    exported graph holds one multiply and one add per BN and no reshape.

    >>> bn = nn.BatchNorm2d(3).eval()
    >>> x = torch.randn(2, 3, 4, 4)
    >>> torch.allclose(LoweredBatchNorm(bn)(x), bn(x))
    True
    """

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        stats = bn_stats(bn)
        if stats is None:
            raise UnsupportedModelError("a BN without running statistics cannot be lowered")
        scale, shift = stats.scale_shift()
        like = bn.running_mean
        shape = (-1, *[1] * _rank(bn))
        self.register_buffer("scale", scale.to(like.dtype, copy=True).to(like.device).view(shape))
        self.register_buffer("shift", shift.to(like.dtype, copy=True).to(like.device).view(shape))
        self.drop = getattr(bn, "drop", None) if has_activation(bn) else None
        self.act = getattr(bn, "act", None) if has_activation(bn) else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # the name BN's forward has
        scale, shift = self.scale, self.shift
        if input.dim() > scale.dim() + 1:  # a BatchNorm1d on (N, C, L)
            shape = (-1, *[1] * (input.dim() - 2))
            scale, shift = scale.view(shape), shift.view(shape)
        out = input * scale + shift
        if self.drop is not None:
            out = self.drop(out)
        return out if self.act is None else self.act(out)


def _rank(bn: nn.Module) -> int:
    """The spatial dimensions a BN says it normalises over: 2 or 3, else 0 (BatchNorm1d takes
    ``(N, C)`` or ``(N, C, L)``; SyncBatchNorm any)."""
    return next((d for d, t in ((2, nn.BatchNorm2d), (3, nn.BatchNorm3d)) if isinstance(bn, t)), 0)


def _as_conv(bn: nn.Module) -> nn.Module | None:
    """The BN's map as a 1x1 depthwise conv (its activation after it), or None where the
    module does not say how many spatial dimensions it normalises (BatchNorm1d: ``(N, C)`` or
    ``(N, C, L)``; SyncBatchNorm)."""
    dims = _rank(bn)
    if not dims:
        return None
    lowered = LoweredBatchNorm(bn)
    c = num_features(bn)
    like = bn.running_mean
    conv = (nn.Conv2d, nn.Conv3d)[dims - 2](c, c, 1, groups=c, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        conv.weight.copy_(lowered.scale.view(c, 1, *[1] * dims))
        conv.bias.copy_(lowered.shift.view(c))
    conv.requires_grad_(False)
    if lowered.act is None:
        return conv
    return nn.Sequential(conv, NormActRemainder(lowered.drop, lowered.act))


def lower_batchnorms(model: nn.Module, to: str = "affine") -> list[tuple[str, str]]:
    """Replace every BN module of ``model`` (in place) by its eval-mode function:
    :class:`LoweredBatchNorm`, or with ``to="conv"`` a 1x1 depthwise conv where the BN says
    its rank (BatchNorm2d/3d; the others become the multiply-add). Returns (name, what it
    became) for each.

    Raises:
        UsageError: ``to`` is neither ``"affine"`` nor ``"conv"``.
        UnsupportedModelError: a BN has no running statistics (it normalises each batch by
            its own: no fixed map to lower to); nothing was changed.
    """
    if to not in LOWER_TO:
        raise UsageError(f"unknown lowering {to!r}; valid: {', '.join(LOWER_TO)}")
    found = list(iter_batchnorms(model))
    for name, bn in found:
        if bn_stats(bn) is None:
            raise UnsupportedModelError(
                f"`{name or type(bn).__name__}` has no running statistics: it normalises each "
                "batch by its own, which no fixed map exports"
            )
        if not name:
            raise UnsupportedModelError("the model itself is a BN: no module holds it to lower")
    done: list[tuple[str, str]] = []
    for name, bn in found:
        if isinstance(bn, FrozenBatchNorm):
            unfuse(bn)  # a layer that computed it computes itself alone again
        new = _as_conv(bn) if to == "conv" else None
        what = "1x1 depthwise conv" if new is not None else "multiply-add"
        new = new if new is not None else LoweredBatchNorm(bn)
        for parent, child, _ in parents(model, bn):
            setattr(parent, child, new)
        done.append(
            (name, what + (f", kept act={type(bn.act).__name__}" if has_activation(bn) else ""))
        )
    return done


@dataclass
class ExportReport(Report):
    """The outcome of :func:`export`: ``folded`` edits, ``lowered`` (BN, what it became), the
    artifact's checks (``max_rel_error`` over all its outputs for each run: the example inputs
    and, with a dynamic batch, them with one more sample; ``output_errors``, each output's
    worst over the runs), the operators in its graph (``nodes``) and in the graph the same
    exporter makes of the model as given (``nodes_before``), and its ``size`` in bytes."""

    format: str = ""
    path: str = ""
    folded: list[FoldEdit] = field(default_factory=list)
    lowered: list[tuple[str, str]] = field(default_factory=list)
    bn_count: int = 0
    max_rel_error: list[float] = field(default_factory=list)
    output_errors: list[float] = field(default_factory=list)
    tolerance: float | None = None
    dynamic_batch: bool = False
    nodes: int = 0
    nodes_before: int | None = None
    size: int = 0
    dtype: str = ""

    def __str__(self) -> str:
        rows = [f"{e.bn}  {e}" for e in self.folded] + [
            f"{b}  -> lowered ({w})" for b, w in self.lowered
        ]
        tail = [
            f"{self.bn_count} BN layers: {len(self.folded)} folded, {len(self.lowered)} lowered",
            f"wrote {self.format} {self.path} ({self.size:,} bytes, "
            f"{_nodes(self.nodes, self.nodes_before)}, "
            + (f"{self.dtype}, folded in float64, " if self.dtype else "")
            + "no batch norm); loaded back and checked against the eager model: max relative "
            f"error {_errors(self.output_errors)} (tolerance {self.tolerance:g}), "
            + (
                "batch dimension dynamic (checked one larger)"
                if self.dynamic_batch
                else "batch fixed"
            ),
        ]
        return "\n".join([*rows, *self.notes, *tail])


def _nodes(after: int, before: int | None) -> str:
    return f"{after} graph nodes" + ("" if before is None else f" ({before} before)")


def _errors(per_output: list[float]) -> str:
    """Each output's error; past four outputs, the worst and how many."""
    if len(per_output) <= 4:
        text = ", ".join(f"{e:.2e}" for e in per_output)
        return text + (" per output" if len(per_output) > 1 else "")
    return f"{max(per_output):.2e} (worst of {len(per_output)} outputs)"


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    format: str | None = None,
    include: str | tuple[str, ...] | None = None,
    exclude: str | tuple[str, ...] | None = None,
    lower_to: str = "auto",
    dynamic_batch: bool = True,
    opset: int | None = None,
    dtype: torch.dtype | None = None,
    tolerance: float | None = None,
    force: bool = False,
    count_before: bool = True,
) -> ExportReport:
    """Fold, lower every BN left, export to ``path`` and check the written artifact against
    ``model`` (see the module's text). ``model`` is not changed.

    Args:
        model: the eager model.
        example_inputs: a tensor or a tuple of positional inputs (dicts allowed inside).
        path: the file to write: ``.pt2`` (``torch.export``) or ``.onnx``.
        format: ``"pt2"`` or ``"onnx"``; default from the suffix.
        include, exclude: glob patterns on BN names to fold (the others are lowered).
        lower_to: ``"affine"`` (multiply-add), ``"conv"`` (1x1 depthwise conv, for
            BatchNorm2d/3d), or ``"auto"``: conv for ONNX (ONNX Runtime runs it faster),
            multiply-add for pt2.
        dynamic_batch: export dimension 0 of the inputs that share the first input's batch
            size as dynamic (if the model fixes it, the export is retried fixed, with a note).
        opset: ONNX opset (default: the exporter's).
        dtype: ``torch.float16``, or ``torch.bfloat16`` (pt2 only): the artifact in half
            precision, folded and lowered in float64 first, then cast; checked against the
            model as it is, within the half dtype's tolerance.
        tolerance: max relative error allowed; default by the artifact's dtype.
        force: replace an existing file.
        count_before: export the model as given too (in memory) to count its graph's
            operators for the report (``nodes_before``); it costs about one more export.

    Returns:
        The :class:`ExportReport` (also :func:`bnsurgery.last_report` of ``model``).

    Raises:
        VerificationError: the folded model, or the artifact loaded back, moved beyond
            ``tolerance``, or a batch norm is left in its graph; nothing written (exit 7).
        UnsupportedModelError: the model cannot be exported (the exporter's reason), or a BN
            cannot be lowered; nothing written (exit 8).
        UsageError: an unknown format or lowering, or ONNX without its packages.
        OutputError: ``path`` exists (without ``force``) or cannot be written.

    >>> import tempfile
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    >>> out = Path(tempfile.mkdtemp()) / "m.pt2"
    >>> report = export(m, torch.randn(2, 3, 8, 8), out)
    >>> len(report.folded), report.lowered
    (1, [('3', 'multiply-add')])
    """
    from .folding import fold
    from .plan import last_report

    out = Path(path)
    fmt = export_format(out, format)
    _check_options(fmt, lower_to, dtype)
    original = unwrapped(model)
    expected = expected_outputs(original, example_inputs, dynamic_batch)
    before = (
        graph_nodes(original, example_inputs, fmt, dynamic_batch=dynamic_batch, opset=opset)
        if count_before
        else None
    )
    work = _copy.deepcopy(original)
    bn_count = len(list(iter_batchnorms(work)))
    if dtype is None:
        fold(work, example_inputs, include=include, exclude=exclude, tolerance=tolerance)
    else:  # folded (and lowered) in float64, then cast: one rounding, the cast's
        work.double()
        fold(
            work,
            cast_inputs(as_args(example_inputs), torch.float64),
            include=include,
            exclude=exclude,
        )
    folded = last_report(work)
    artifact = write_artifact(
        work, example_inputs, out, fmt, expected=expected, lower_to=lower_to,
        dynamic_batch=dynamic_batch, opset=opset, dtype=dtype, tolerance=tolerance,
        force=force, copy=False, nodes_before=before,
    )  # fmt: skip
    report = ExportReport(
        "export",
        [e.bn for e in folded.folded] + [b for b, _ in artifact.lowered],
        [],
        artifact.notes,
        format=fmt,
        path=str(out),
        folded=list(folded.folded),
        lowered=artifact.lowered,
        bn_count=bn_count,
        max_rel_error=artifact.errors,
        output_errors=artifact.output_errors,
        tolerance=artifact.tolerance,
        dynamic_batch=artifact.dynamic_batch,
        nodes=artifact.nodes,
        nodes_before=artifact.nodes_before,
        size=out.stat().st_size,
        dtype="" if dtype is None else str(dtype).replace("torch.", ""),
    )
    set_report(model, report)
    return report


def expected_outputs(model: nn.Module, example_inputs: Any, dynamic_batch: bool = True) -> list:
    """What an artifact of ``model`` must return (eval mode): on the example inputs, and with
    ``dynamic_batch`` on them with one more sample. Taken before a surgery, it holds the
    artifact to the model as it was.

    The batch dimension is a guess (dimension 0 of the tensors sized there like the first);
    where the model does not run with one more sample there (a list of ``C, H, W`` images,
    say), the list holds the first run alone, and an artifact checked against it has its
    batch fixed."""
    args = as_args(example_inputs)
    model = unwrapped(model)
    with eval_mode(model), torch.no_grad():
        expected = [model(*args)]
        if dynamic_batch and _batch_spec(args) is not None:
            with contextlib.suppress(Exception):
                expected.append(model(*_one_more(args)))
    return expected


@dataclass
class Artifact:
    """What :func:`write_artifact` wrote and checked."""

    lowered: list[tuple[str, str]]
    errors: list[float]
    output_errors: list[float]
    tolerance: float
    dynamic_batch: bool
    nodes: int
    notes: list[str]
    nodes_before: int | None = None

    def __str__(self) -> str:
        batch = "batch dynamic, checked one larger" if self.dynamic_batch else "batch fixed"
        return "; ".join(
            [
                f"{len(self.lowered)} BN lowered, {_nodes(self.nodes, self.nodes_before)}, "
                "no batch norm",
                f"loaded back: max relative error {_errors(self.output_errors)} "
                f"(tolerance {self.tolerance:g}), {batch}",
                *self.notes,
            ]
        )


def write_artifact(
    model: nn.Module,
    example_inputs: Any,
    out: Path,
    fmt: str,
    *,
    expected: list[Any] | None = None,
    lower_to: str = "auto",
    dynamic_batch: bool = True,
    opset: int | None = None,
    dtype: torch.dtype | None = None,
    tolerance: float | None = None,
    force: bool = False,
    copy: bool = True,
    nodes_before: int | None = None,
) -> Artifact:
    """Lower every BN of ``model`` (on a copy unless ``copy`` is false), export it as ``fmt``
    and publish ``out`` once the file, loaded back, reproduces ``expected`` (from
    :func:`expected_outputs`; default: the model's own, eager, eval mode) on the example
    inputs and on one more sample (``dtype``: the lowered model cast to it, and the inputs).
    ``nodes_before`` (from :func:`graph_nodes` of the model before the surgery) goes into the
    returned :class:`Artifact` as it is.

    Raises: as :func:`export`.
    """
    _check_options(fmt, lower_to, dtype)
    if example_inputs is None:
        raise UsageError(f"a {fmt} export is checked on example inputs: give them")
    model = unwrapped(model)
    references = expected or expected_outputs(model, example_inputs, dynamic_batch)
    args = as_args(example_inputs) if dtype is None else cast_inputs(as_args(example_inputs), dtype)
    notes: list[str] = []
    spec = _batch_spec(args) if dynamic_batch else None
    if spec is not None and len(references) < 2:
        spec = None
        notes.append(
            "batch dimension fixed: the model does not run with one more sample along "
            "dimension 0 of its inputs"
        )
    bigger = _one_more(args) if spec is not None else None
    work = _copy.deepcopy(model) if copy else model
    lowered = lower_batchnorms(work, _AUTO[fmt] if lower_to == "auto" else lower_to)
    _drop_folded(work)
    work.eval()
    if dtype is not None:
        work.to(dtype)
    tol = tolerance
    if tol is None:
        lowest = [torch.empty(0, dtype=dtype)] if dtype is not None else []
        tol = default_tolerance([references[0], *lowest])
    checked: dict[str, Any] = {}

    def write(tmp: str) -> None:
        nonlocal spec
        try:
            program = _exported(work, args, spec, fmt, opset)
        except _Fixed as fixed:
            notes.append(f"batch dimension fixed: the model specialises it ({fixed})")
            spec = None
            program = _exported(work, args, None, fmt, opset)
        blob = _serialised(program, fmt)
        del program
        with open(tmp, "wb") as f:
            f.write(blob)
        runs = [args] + ([bigger] if spec is not None and bigger is not None else [])
        try:
            checked.update(_check(tmp, fmt, runs, references[: len(runs)], tol, out))
        except _OtherBatchRefused as refused:  # the exporter fixed some input's batch after all
            notes.append(
                f"batch dimension fixed: the exported graph does not take another batch size "
                f"({refused})"
            )
            spec = None
            write(tmp)

    atomic_write(out, write, force=force)
    return Artifact(
        lowered, checked["errors"], checked["per_output"], tol, spec is not None,
        checked["nodes"], notes, nodes_before,
    )  # fmt: skip


def _drop_folded(model: nn.Module) -> None:
    """Every :class:`FoldedBatchNorm` (an identity that still reads as a BN to fusers that
    read tensors) replaced by ``nn.Identity``: an artifact has no such reader, and its
    tensors would be dead inputs of the exported graph."""
    for name, module in list(model.named_modules()):
        if type(module) is FoldedBatchNorm and name:
            for parent, child, _ in parents(model, module):
                setattr(parent, child, nn.Identity())


def export_format(out: Path, fmt: str | None = None) -> str:
    """``fmt`` checked, else the export format ``out``'s suffix names."""
    if fmt is None:
        fmt = suffix_format(out)
        if fmt not in ARTIFACT_FORMATS:
            raise UsageError(f"cannot tell the export format from {out.name!r}; use .pt2 or .onnx")
    if fmt not in ARTIFACT_FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; valid: pt2, onnx")
    return fmt


def _check_options(fmt: str, lower_to: str, dtype: torch.dtype | None = None) -> None:
    if fmt == "onnx":
        _need_onnx()
    if lower_to not in (*LOWER_TO, "auto"):
        raise UsageError(f"unknown lowering {lower_to!r}; valid: auto, {', '.join(LOWER_TO)}")
    if dtype not in (None, torch.float16, torch.bfloat16):
        raise UsageError(f"an artifact's dtype is float16 or bfloat16, not {dtype}")
    if fmt == "onnx" and dtype == torch.bfloat16:
        raise UsageError(
            "a bfloat16 ONNX model cannot be checked: ONNX Runtime on the CPU has no bfloat16 "
            "Conv; use float16, or a .pt2 output"
        )


def cast_inputs(args: Any, dtype: torch.dtype) -> Any:
    """``args`` with every floating tensor in ``dtype``."""
    return tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        args,
    )


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"ONNX export needs the export extra ({exc.name} is missing): "
            "pip install 'bnsurgery[export]'"
        ) from None


def _batch_spec(args: tuple[Any, ...]) -> Any:
    """``dynamic_shapes`` for ``args``: dimension 0 of every tensor whose size there is the
    first tensor's; None when there is no tensor."""
    first = next((t for t in tensors_in(args) if t.dim() > 0), None)
    if first is None:
        return None
    batch = torch.export.Dim("batch", min=1)
    size = first.shape[0]

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            return {0: batch}
        return None

    return tree_map(spec, args)


def _one_more(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` with one more sample on every dynamic batch dimension (the first repeated)."""
    size = next(t.shape[0] for t in tensors_in(args) if t.dim() > 0)

    def grow(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            return torch.cat([value, value[:1]])
        return value

    return tree_map(grow, args)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Fixed(Exception):
    """The exporter found the model specialises its batch dimension."""


class _OtherBatchRefused(Exception):
    """The artifact ran on the example inputs but not on them with one more sample."""


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines, warnings and log records: not ours to print (a failure
    is one line, the exception's)."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def _exported(model: nn.Module, args: tuple[Any, ...], spec: Any, fmt: str, opset: Any) -> Any:
    """``model`` exported as ``fmt``: a ``torch.export.ExportedProgram`` or an
    ``onnx.ModelProto``. The exporter's failure is one line (:class:`UnsupportedModelError`),
    or :class:`_Fixed` where the model specialises a dynamic batch dimension."""
    try:
        with _quiet(), torch.no_grad():
            if fmt == "pt2":
                return torch.export.export(model, args, dynamic_shapes=spec)
            onnx_program = torch.onnx.export(
                model, args, dynamo=True, dynamic_shapes=spec, opset_version=opset,
                external_data=False, verbose=False,
            )  # fmt: skip
            assert onnx_program is not None
            return onnx_program.model_proto
    except BnSurgeryError:
        raise
    except Exception as exc:
        text = exporter_reason(exc)
        if spec is not None and any(w in text for w in ("Constraint", "specializ", "batch")):
            raise _Fixed(text[:120]) from exc
        raise UnsupportedModelError(f"cannot export to {fmt}: {text}") from exc


_WHERE = (
    re.compile(r"Caused by: \((?P<where>[^)\n]+)\)"),
    re.compile(r'File "(?P<file>[^"\n]+)", line (?P<line>\d+), in (?P<fn>\w+)'),
)


def exporter_reason(exc: BaseException) -> str:
    """An exporter's failure in one line: the innermost error (the ONNX exporter wraps
    torch.export's), its first line, and where in the model's code it arose when the
    message says (``at torchvision/ops/boxes.py:86 in batched_nms``).

    >>> exporter_reason(RuntimeError("Could not guard on u0\\nCaused by: (m.py:3 in forward)"))
    'RuntimeError: Could not guard on u0 (at m.py:3 in forward)'
    """
    while exc.__cause__ is not None and "TorchExportError" in type(exc).__name__:
        exc = exc.__cause__
    message = _ANSI.sub("", str(exc))  # the ONNX exporter colours its text
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    first = first if len(first) <= 150 else first[:150] + "..."
    where = ""
    if found := _WHERE[0].search(message):
        where = found["where"]
    elif matches := list(_WHERE[1].finditer(message)):
        last = matches[-1]
        where = f"{Path(last['file']).name}:{last['line']} in {last['fn']}"
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text + (f" (at {where})" if where else "")


def _serialised(program: Any, fmt: str) -> bytes:
    """The file's bytes (written by the caller, so a full disk or a vanished folder is an
    output error, and nothing partial is left)."""
    if fmt == "onnx":
        return program.SerializeToString()
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _graph_nodes(program: Any, fmt: str) -> list[Any]:
    """The operators of an exported graph: ``call_function`` nodes of a ``torch.export``
    program; an ONNX model's nodes, those inside its functions too."""
    if fmt == "pt2":
        return [n for n in program.graph.nodes if n.op == "call_function"]
    return list(program.graph.node) + [n for f in program.functions for n in f.node]


def graph_nodes(
    model: nn.Module,
    example_inputs: Any,
    fmt: str,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> int:
    """How many operators ``model`` (eval mode, as it is: no fold, no lowering) exports to
    with ``fmt``'s exporter, counted as an artifact's are (exported in memory, nothing
    written): the "before" of an export report.

    Raises:
        UnsupportedModelError: the model cannot be exported.
    """
    _check_options(fmt, "auto")
    args = as_args(example_inputs)
    spec = _batch_spec(args) if dynamic_batch else None
    model = unwrapped(model)
    with eval_mode(model):
        try:
            program = _exported(model, args, spec, fmt, opset)
        except _Fixed:
            program = _exported(model, args, None, fmt, opset)
    return len(_graph_nodes(program, fmt))


def _check(
    tmp: str,
    fmt: str,
    runs: list[tuple[Any, ...]],
    references: list[Any],
    tol: float,
    out: Path,
) -> dict[str, Any]:
    """Load the artifact at ``tmp`` back, run it on each of ``runs`` against ``references``,
    and look for batch norm in its graph. Returns the errors and the node count."""
    if fmt == "pt2":
        with open(tmp, "rb") as f:  # a buffer: the file's name need not end in .pt2
            program = torch.export.load(io.BytesIO(f.read()))
        nodes = _graph_nodes(program, fmt)
        norms = [str(n.target) for n in nodes if "batch_norm" in str(n.target)]
        module = program.module()

        def run(args: tuple[Any, ...]) -> list[torch.Tensor]:
            with torch.no_grad():
                return tensors_in(module(*args))

    else:
        import onnx
        import onnxruntime

        nodes = _graph_nodes(onnx.load(tmp), fmt)
        norms = [n.op_type for n in nodes if n.op_type == "BatchNormalization"]
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(args: tuple[Any, ...]) -> list[torch.Tensor]:
            feed = [t.detach().cpu().numpy() for t in tensors_in(args)]
            if len(feed) != len(names):
                raise VerificationError(
                    f"{out.name}: the ONNX model takes {len(names)} inputs, the example inputs "
                    f"hold {len(feed)} tensors; nothing written"
                )
            return [
                torch.from_numpy(a) for a in session.run(None, dict(zip(names, feed, strict=True)))
            ]

    if norms:
        raise VerificationError(
            f"{out.name}: the exported graph still holds {norms[0]} ({len(norms)} in all); "
            "nothing written"
        )
    errors: list[float] = []
    per_output: list[float] = []
    for i, (args, reference) in enumerate(zip(runs, references, strict=True)):
        try:
            got = run(args)
        except BnSurgeryError:
            raise
        except Exception as exc:
            if i:  # the example inputs ran; one more sample does not
                raise _OtherBatchRefused(brief(exc, typed=True)[:160]) from exc
            raise VerificationError(
                f"{out.name}: the written artifact does not run on the example inputs "
                f"({brief(exc, typed=True)}); nothing written"
            ) from exc
        expected = tensors_in(reference)
        if len(got) != len(expected):
            raise VerificationError(
                f"{out.name}: the artifact returns {len(got)} tensors, the model "
                f"{len(expected)}; nothing written"
            )
        each = [
            max_relative_error(e, g.to(e.device, e.dtype))
            for g, e in zip(got, expected, strict=True)
        ]
        error = max(each, default=0.0)
        errors.append(error)
        per_output = [max(p) for p in zip(per_output, each, strict=True)] if per_output else each
        if not error <= tol:
            raise VerificationError(
                f"{out.name}: the artifact's output moved by {error:.3g} from the eager model's "
                f"(tolerance {tol:g}); nothing written"
            )
    return {"errors": errors, "per_output": per_output, "nodes": len(nodes)}
