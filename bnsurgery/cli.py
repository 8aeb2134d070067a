"""The command line: each command parses, makes one library call, saves and renders.

Errors become exit codes here and only here (see README, "Exit codes"). Diagnostics go to
stderr, data (tables, JSON) to stdout. torch is imported only when a command runs, so
``bnsurgery --help`` is fast.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import click

from .errors import BnSurgeryError, NothingToDoError, ResourceError, UsageError

__all__ = ["cli", "main"]

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
#: SIGTERM and SIGHUP end a command like Ctrl-C (nothing written); the exit code is the shell's
#: 128 + the signal number: 143 for SIGTERM, 129 for SIGHUP.
EXIT_SIGNAL_BASE = 128
_TERMINATING = ("SIGTERM", "SIGHUP")
#: The ``--to`` names; the same as ``bnsurgery.swapping.TARGETS`` (a test holds them equal),
#: kept here so that ``--help`` does not import torch.
SWAP_TARGETS = (
    "groupnorm",
    "layernorm",
    "instancenorm",
    "frozen",
    "syncbatchnorm",
    "batchnorm",
    "identity",
)
MAX_BATCH = 2**20  # far beyond any machine's memory for a real model; bigger is a typo


#: ``--debug`` is accepted before or after the command name. main() reads it from the raw
#: arguments, because it must also apply to errors raised while click parses them.
_debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, help="Show full tracebacks and warnings."
)


def _parse_size(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        size = tuple(int(p) for p in parts if p)
    except ValueError:
        size = ()
    if not size or any(s <= 0 for s in size):
        raise UsageError(f"--input-size {text!r}: expected positive integers like 3,224,224")
    return size


def _source_options(func: Any, batch_default: int = 2) -> Any:
    options = [
        click.argument("source"),
        click.option("--arch", help="Architecture spec for a state-dict file, e.g. timm:resnet18."),
        click.option("--weights", type=_PATH, help="State dict to load into a spec's model."),
        click.option(
            "--trust-code",
            "--trust-pickle",
            "trust_code",
            is_flag=True,
            is_eager=True,  # known when --inputs is read, wherever it stands
            help="Allow the files you name to run code when loaded: full pickles, TorchScript, "
            "and package.module:factory architectures recorded in a file. Only for files you "
            "trust. (--trust-pickle is the old name.)",
        ),
        click.option(
            "--input-size",
            callback=_one_kind_of_inputs,
            help="Per-sample input size, e.g. 3,224,224 (default: from timm's config, or "
            "torchvision's for image classifiers).",
        ),
        click.option(
            "--inputs",
            "inputs_file",
            type=_PATH,
            callback=_read_inputs,
            help="Example inputs from a tensor file, instead of --input-size (several inputs, "
            "integer ones, keywords): .safetensors (keys are keyword arguments, or 0, 1, ... "
            "positional ones), .npy (one tensor), .pt (a tensor, a tuple or list of "
            "positional inputs, or a dict of keyword inputs). Used as they are (--batch-size "
            "and --seed do not apply), floating tensors cast to the model's dtype.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(1, MAX_BATCH),
            default=batch_default,
            show_default=True,
            help="Batch size.",
        ),
        click.option(
            "--seed",
            type=click.IntRange(0, 2**64 - 1),
            default=0,
            show_default=True,
            help="Seed of the example inputs.",
        ),
        _debug_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _one_kind_of_inputs(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """--input-size and --inputs each say what the example inputs are: one of them at most
    (checked by whichever click processes second)."""
    other = "input_size" if param.name == "inputs_file" else "inputs_file"
    if value is not None and ctx.params.get(other) is not None:
        raise click.UsageError("--inputs and --input-size both give the example inputs; pass one")
    return value


def _read_inputs(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """--inputs, read and checked as it is parsed, before any work starts."""
    value = _one_kind_of_inputs(ctx, param, _not_empty(ctx, param, value))
    if value is None:
        return None
    from .datasets import read_example_inputs

    return read_example_inputs(value, trust_code=bool(ctx.params.get("trust_code")))


def _load(source: str, arch: str | None, weights: str | None, trust_code: bool):
    from .checkpoint import load

    # specs the user types import from the current folder, as under python -m
    return load(source, arch=arch, weights=weights, trust_code=trust_code, search_cwd=True)


def _example_inputs(
    model,
    source: str,
    arch: str | None,
    size_text: str | None,
    batch: int,
    seed: int,
    given: Any = None,
    *,
    required: bool,
):
    """The inputs of ``given`` (``--inputs``) as positional arguments of the model, or seeded
    random inputs of the model's dtype, or None when the size is unknown."""
    import torch

    from .checkpoint import exists
    from .specs import default_input_size, is_spec

    if given is not None:
        from .datasets import example_arguments

        return example_arguments(model, given)
    size = _parse_size(size_text)
    if size is None:
        spec = source if is_spec(source) and not exists(Path(source)) else arch
        size = default_input_size(spec, model)
    if size is None:
        if required:
            raise UsageError(
                "cannot tell the model's input size; pass --input-size (e.g. 3,224,224)"
            )
        return None
    if batch < 1:
        raise UsageError("--batch-size must be at least 1")
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    count = batch * math.prod(size)
    needed = count * (4 + dtype.itemsize)  # drawn in float32, then cast
    available = _available_memory()
    if available is not None and needed > available:
        raise ResourceError(
            f"example inputs of {batch} x {'x'.join(map(str, size))} need {_gib(needed)} "
            f"before the model even runs, and {_gib(available)} is available; lower "
            "--batch-size or --input-size"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *size), generator=generator).to(dtype)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), if known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _not_nan(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and math.isnan(value):
        raise click.BadParameter("nan is not a number", ctx=ctx, param=param)
    return value


class _Path(click.Path):
    """``click.Path`` that refuses a NUL character (click's own would raise ``ValueError``
    from ``os.stat``) as a usage error."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, str) and "\0" in value:
            self.fail("a path cannot hold a NUL character", param, ctx)
        return super().convert(value, param, ctx)


_PATH = _Path()


def _not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise click.BadParameter("an empty path", ctx=ctx, param=param)
    return value


def _check_output(
    out: Path,
    fmt: str | None,
    force: bool,
    inputs: tuple[str | None, ...],
    plot: str | None = None,
) -> str:
    """Before any work: the output format, and every output of the command (``out``, and
    ``plot``) against every path it reads (``inputs``: source, weights, arch, data), by file
    identity (see :func:`bnsurgery.outputs.check_outputs`). Returns the output format."""
    from .checkpoint import output_format
    from .outputs import check_outputs

    chosen = output_format(out, fmt)
    check_outputs([out, *([Path(plot)] if plot else [])], inputs, force=force)
    return chosen


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnsurgery")
@_debug_option
def cli() -> None:
    """BatchNorm surgery on pretrained PyTorch networks.

    SOURCE is an architecture spec (timm:NAME, torchvision:NAME, package.module:factory; random
    init) or a checkpoint file (.safetensors, .pt, .pth, .bin, TorchScript).
    """


def _remember_dry_run(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    ctx.meta["bnsurgery.dry_run"] = value
    return value


def _dry_run() -> bool:
    """Whether ``--dry-run`` was given: the command runs, reports and writes nothing."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get("bnsurgery.dry_run"))


def _output_options(func: Any) -> Any:
    options = [
        click.option(
            "-o",
            "--output",
            type=_PATH,
            callback=_not_empty,
            help="Output file (default: beside the input).",
        ),
        click.option(
            "--format",
            "fmt",
            type=click.Choice(["safetensors", "pickle", "torchscript"]),
            help="Output format (default: from the output's suffix).",
        ),
        click.option("--force", is_flag=True, help="Replace an existing output file."),
        click.option(
            "--include", multiple=True, help="Only BN layers matching this glob (repeatable)."
        ),
        click.option(
            "--exclude", multiple=True, help="Skip BN layers matching this glob (repeatable)."
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
        click.option(
            "--dry-run",
            is_flag=True,
            expose_value=False,
            callback=_remember_dry_run,
            help="Do all of it, print the report, and write nothing (the model is only in memory).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


#: More reader processes than this is a typo, not a machine.
MAX_WORKERS = 256

_workers_option = click.option(
    "--workers",
    type=click.IntRange(0, MAX_WORKERS),
    default=0,
    show_default=True,
    help="Processes that read and preprocess a folder of images (a torch DataLoader's "
    "num_workers; 0 reads them in this process); same batches either way. No effect on a "
    "tensor file, which is read once.",
)


@cli.command("inspect")
@_source_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_command(
    source, arch, weights, trust_code, input_size, inputs_file, batch_size, seed, as_json
):
    """Survey the BN layers of SOURCE: state, statistics health and the fold plan."""
    import torch

    from .report import survey_text, to_json
    from .surveying import survey

    model = _load(source, arch, weights, trust_code)
    inputs = None
    if not isinstance(model, torch.jit.ScriptModule):
        inputs = _example_inputs(
            model, source, arch, input_size, batch_size, seed, inputs_file, required=False
        )
    result = survey(model, inputs)
    click.echo(to_json(result) if as_json else survey_text(result))


@cli.command("fold")
@_source_options
@_output_options
@click.option(
    "--tolerance",
    type=click.FloatRange(0, 1, min_open=True),
    callback=_not_nan,
    help="Max relative output error (default by dtype).",
)
def fold_command(
    source, arch, weights, trust_code, input_size, inputs_file, batch_size, seed,
    output, fmt, force, include, exclude, tolerance, as_json,
):  # fmt: skip
    """Fold BN layers of SOURCE into neighbouring conv/linear layers, verified on example
    inputs, and write the folded model."""
    from .folding import fold
    from .provenance import last_report
    from .report import fold_text, to_json

    model = _open(
        "fold", "folded", source, arch, weights, trust_code, output, fmt, force, (inputs_file,)
    )
    inputs = _example_inputs(
        model, source, arch, input_size, batch_size, seed, inputs_file, required=True
    )
    fold(model, inputs, include=include or None, exclude=exclude or None, tolerance=tolerance)
    report = last_report(model)
    assert report is not None
    click.echo(to_json(report) if as_json else fold_text(report))
    if not report.folded:
        raise NothingToDoError("no BN layer can be folded (reasons above); nothing written")
    _write(model, source, output, fmt, force, arch, "folded", inputs=inputs)


def _require_batchnorm(model: Any, source: str, verb: str) -> None:
    import torch

    from .errors import UnsupportedModelError
    from .norms import iter_batchnorms

    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{source} is TorchScript, which cannot be changed; {verb} works on nn.Module "
            "checkpoints (inspect reads TorchScript)"
        )
    if next(iter_batchnorms(model), None) is None:
        raise NothingToDoError(
            f"{source} has no BatchNorm layer; nothing to {verb}, nothing written"
        )


def _open(
    verb: str,
    operation: str,
    source: str,
    arch: str | None,
    weights: str | None,
    trust_code: bool,
    output: str | None,
    fmt: str | None,
    force: bool,
    reads: tuple[str | None, ...] = (),
    plot: str | None = None,
    check: bool = True,
) -> Any:
    """What every writing command does first: check its outputs against everything it reads
    (before any work; ``check=False`` on the ranks that write nothing), then load the model,
    which must be an ``nn.Module`` holding BN and, for a .safetensors output, have a known
    architecture. Returns the model."""
    from .checkpoint import default_output

    out = Path(output) if output else default_output(source, operation)
    if check:
        if plot:
            _require_matplotlib()
        _check_output(out, fmt, force, (source, weights, arch, *reads), plot=plot)
    model = _load(source, arch, weights, trust_code)
    _require_batchnorm(model, source, verb)
    if check:
        _require_savable(model, source, out, fmt, arch)
    return model


def _device(text: str | None) -> Any:
    """``--device``, checked before any work: a device this machine has."""
    import torch

    if text is None:
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {text!r} is not a device (e.g. cpu, cuda, cuda:1)") from exc
    if device.type == "cuda" and (
        not torch.cuda.is_available()
        or (device.index is not None and device.index >= torch.cuda.device_count())
    ):
        raise UsageError(f"--device {text}: no such CUDA device on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text}: only cpu and cuda devices are supported")
    return device


def _require_savable(model: Any, source: str, out: Path, fmt: str | None, arch: str | None):
    """Before the surgery: a .safetensors output records the architecture, which a pickled
    module does not carry."""
    from .checkpoint import output_format

    if output_format(out, fmt) == "safetensors" and not _arch_to_record(model, arch):
        raise UsageError(
            f"{source} holds a pickled module whose architecture is unknown, and the "
            f"safetensors output {out} records it: pass --arch package.module:factory, or write "
            "a pickle (-o NAME.pt)"
        )


def _arch_to_record(model: Any, arch: str | None) -> str | None:
    """The architecture the output records: the one the model was loaded as (``--arch`` naming
    a file's factory without options resolves to the file's options), else ``--arch``."""
    from .provenance import get_record

    return get_record(model).get("arch") or arch


def _write(model, source, output, fmt, force, arch, operation, inputs=None, sizes=None) -> None:
    """Save, tracing with example inputs where TorchScript is asked for and scripting fails.

    ``sizes``: ``(input_size, batch_size, seed[, inputs_file])`` to make those inputs when
    none are given.
    """
    from .checkpoint import default_output, output_format, save

    out = Path(output) if output else default_output(source, operation)
    if _dry_run():
        click.echo(f"dry run: would write {out}; nothing written", err=True)
        return
    if inputs is None and sizes is not None and output_format(out, fmt) == "torchscript":
        inputs = _example_inputs(model, source, arch, *sizes, required=False)
    save(
        model,
        out,
        format=fmt,
        force=force,
        arch=_arch_to_record(model, arch),
        example_inputs=inputs,
    )
    click.echo(f"wrote {out}", err=True)


@cli.command("freeze")
@_source_options
@_output_options
@click.option(
    "--stats-only", is_flag=True, help="Freeze statistics only; keep weight and bias trainable."
)
@click.option(
    "--stages",
    type=click.IntRange(1, None),
    help="Only BN layers in the first N stages (1 = the stem).",
)
def freeze_command(
    source, arch, weights, trust_code, input_size, inputs_file, batch_size, seed,
    output, fmt, force, include, exclude, as_json, stats_only, stages,
):  # fmt: skip
    """Freeze BN layers of SOURCE (statistics, and affine unless --stats-only) and write a
    checkpoint that loads back frozen."""
    from .freezing import freeze
    from .provenance import last_report
    from .report import freeze_text, to_json

    model = _open(
        "freeze", "frozen", source, arch, weights, trust_code, output, fmt, force, (inputs_file,)
    )
    freeze(model, include or None, exclude or None, stages=stages, train_affine=stats_only)
    report = last_report(model)
    click.echo(to_json(report) if as_json else freeze_text(report))
    if not report.changed:
        raise NothingToDoError("no BN layer to freeze (reasons above); nothing written")
    sizes = (input_size, batch_size, seed, inputs_file)
    _write(model, source, output, fmt, force, arch, "frozen", sizes=sizes)


@cli.command("unfreeze")
@_source_options
@_output_options
def unfreeze_command(
    source, arch, weights, trust_code, input_size, inputs_file, batch_size, seed,
    output, fmt, force, include, exclude, as_json,
):  # fmt: skip
    """Undo a freeze: restore the original BN layers of SOURCE and write the model."""
    from .freezing import unfreeze
    from .provenance import last_report
    from .report import freeze_text, to_json

    reads = (inputs_file,)
    model = _open(
        "unfreeze", "unfrozen", source, arch, weights, trust_code, output, fmt, force, reads
    )
    unfreeze(model, include or None, exclude or None)
    report = last_report(model)
    if not report.changed:
        raise NothingToDoError("no layer frozen by bnsurgery; nothing to unfreeze, nothing written")
    click.echo(to_json(report) if as_json else freeze_text(report))
    sizes = (input_size, batch_size, seed, inputs_file)
    _write(model, source, output, fmt, force, arch, "unfrozen", sizes=sizes)


@cli.command("swap")
@(lambda f: _source_options(f, batch_default=32))
@_output_options
@click.option(
    "--to", "target", required=True, type=click.Choice(SWAP_TARGETS), help="The new norm."
)
@click.option(
    "--groups",
    type=click.IntRange(1, None),
    help="GroupNorm group count (default: up to 32, dividing C).",
)
@click.option("--group-size", type=click.IntRange(1, None), help="GroupNorm channels per group.")
@click.option(
    "--dims", type=click.Choice(["1d", "2d", "3d"]), help="For --to batchnorm from SyncBatchNorm."
)
@click.option(
    "--calibrate",
    "calibrate_path",
    type=_PATH,
    help="Fit each new norm's scale and shift to the BN's output on this data: a folder of "
    "images (resized, cropped and normalised with the model's timm data config), or a tensor file "
    "(.pt, .npy, .safetensors) of float samples (N, C, ...) preprocessed as the model expects.",
)
@click.option("--batches", type=click.IntRange(1, None), help="Use at most N calibration batches.")
@click.option("--quiet", is_flag=True, help="No progress bar (with --calibrate).")
@_workers_option
def swap_command(
    source, arch, weights, trust_code, input_size, batch_size, seed,
    output, fmt, force, include, exclude, as_json, target, groups, group_size, dims,
    calibrate_path, batches, quiet, inputs_file, workers,
):  # fmt: skip
    """Replace BN layers of SOURCE by another norm (keeping their scale and shift, activations
    of norm-act layers, and optionally repairing the fit on data) and write the model."""
    from .datasets import batches_from_path
    from .provenance import last_report
    from .report import swap_text, to_json
    from .swapping import swap

    model = _open(
        "swap", target, source, arch, weights, trust_code, output, fmt, force,
        (calibrate_path, inputs_file),
    )  # fmt: skip
    data, total = None, 0
    with _DataFile(calibrate_path):
        if calibrate_path:
            data, total = batches_from_path(
                calibrate_path, model, batch_size=batch_size, input_size=_parse_size(input_size),
                workers=workers,
            )  # fmt: skip
    total = min(total, batches) if batches is not None else total
    example = None  # which BNs see one value per channel: where groups must be wider
    if target == "groupnorm" and data is None:
        example = _example_inputs(
            model, source, arch, input_size, 2, seed, inputs_file, required=False
        )
    show = data is not None and not quiet and sys.stderr.isatty()
    with (
        click.progressbar(length=total, label="calibrating", file=sys.stderr)
        if show
        else _NoBar() as bar,
        _DataFile(calibrate_path),
    ):
        swap(
            model,
            target,
            include or None,
            exclude or None,
            groups=groups,
            group_size=group_size,
            dims=dims,
            calibrate=data,
            calibrate_batches=batches,
            progress=lambda done: bar.update(1),
            example_inputs=example,
        )
    report = last_report(model)
    click.echo(to_json(report) if as_json else swap_text(report))
    if not report.swapped:
        raise NothingToDoError("no BN layer swapped (reasons above); nothing written")
    sizes = (input_size, batch_size, seed, inputs_file)
    _write(model, source, output, fmt, force, arch, target, sizes=sizes)


class _DataFile:
    """Names the data file in a :class:`DataError` raised while it is read or consumed: the
    library does not know the file. An error that already names it passes unchanged."""

    def __init__(self, path: str | None) -> None:
        self.path = str(Path(path)) if path else None

    def __enter__(self) -> _DataFile:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        from .errors import DataError

        if self.path and isinstance(exc, DataError) and not str(exc).startswith(self.path):
            raise DataError(f"{self.path}: {exc}") from exc


def _distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); return (rank, world)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


@cli.command("recalibrate")
@(lambda f: _source_options(f, batch_default=32))
@_output_options
@click.option(
    "--data",
    "data_path",
    required=True,
    type=_PATH,
    help="A folder of images (class subfolders optional; resized, cropped and normalised with the "
    "model's timm data config or --input-size), or a tensor file (.pt, .npy, .safetensors) of "
    "float samples (N, C, ...) preprocessed as the model expects, fed as they are.",
)
@click.option(
    "--batches", type=click.IntRange(1, None), help="Use at most N batches (per process)."
)
@click.option("--mode", type=click.Choice(["exact", "ema"]), default="exact", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--plot",
    type=_PATH,
    callback=_not_empty,
    help="Also write a PNG of the drift per layer.",
)
@click.option(
    "--channels-last/--no-channels-last",
    default=None,
    help="Run the pass in channels-last memory format (faster on the CPU). Default: on the "
    "CPU, once the first batch shows the model makes no layout-sensitive call (x.view).",
)
@click.option(
    "--momentum",
    type=click.FloatRange(0, 1, min_open=True),
    callback=_not_nan,
    help="With --mode ema: each BN's momentum during the pass (default: its own).",
)
@click.option(
    "--autocast",
    type=click.Choice(["bfloat16", "float16"]),
    help="Run the pass under torch.autocast with this dtype (statistics merge in float64).",
)
@click.option("--device", help="Run the pass on this device, e.g. cuda or cuda:1 (default: cpu).")
@_workers_option
def recalibrate_command(
    source, arch, weights, trust_code, input_size, inputs_file, batch_size, seed,
    output, fmt, force, include, exclude, as_json, data_path, batches, mode, quiet, plot,
    channels_last, momentum, autocast, device, workers,
):  # fmt: skip
    """Recompute BN running statistics of SOURCE over data (exact population statistics) and
    write the model. Works under `torchrun --nproc-per-node N -m bnsurgery recalibrate ...`."""
    import torch

    from .datasets import batches_from_path
    from .provenance import last_report
    from .recalibration import recalibrate
    from .report import drift_plot, recalibration_text, to_json

    if momentum is not None and mode != "ema":
        raise UsageError("--momentum goes with --mode ema (exact statistics use no momentum)")
    target = _device(device)
    rank, world = _distributed()
    model = _open(
        "recalibrate",
        "recalibrated",
        source,
        arch,
        weights,
        trust_code,
        output,
        fmt,
        force,
        (data_path, inputs_file),
        plot=plot,
        check=rank == 0,
    )
    with _DataFile(data_path):
        data, total = batches_from_path(
            data_path,
            model,
            batch_size=batch_size,
            input_size=_parse_size(input_size),
            rank=rank,
            world=world,
            workers=workers,
        )
    total = min(total, batches) if batches is not None else total
    show = not quiet and rank == 0 and sys.stderr.isatty()
    with (
        click.progressbar(length=total, label="recalibrating", file=sys.stderr)
        if show
        else _NoBar() as bar,
        _DataFile(data_path),
    ):
        model.to(target)
        try:
            recalibrate(
                model,
                data,
                include=include or None,
                exclude=exclude or None,
                num_batches=batches,
                mode=mode,
                momentum=momentum,
                autocast=getattr(torch, autocast) if autocast else None,
                device=target,
                progress=lambda done: bar.update(1),
                channels_last=channels_last,
            )
        finally:
            model.to("cpu")  # saved from the CPU, whatever ran the pass
    if rank != 0:
        return
    report = last_report(model)
    if batches is not None and report.batches < batches:
        report.notes.append(f"--batches {batches}: the data held {report.batches}, all used")
    click.echo(to_json(report) if as_json else recalibration_text(report))
    if not report.layers:
        raise NothingToDoError("no BN layer saw enough data (reasons above); nothing written")
    plotted = None
    if plot and _dry_run():
        click.echo(f"dry run: would write {plot}; nothing written", err=True)
        plot = None
    if plot:
        from .outputs import identity

        new = not os.path.lexists(plot)
        drift_plot(report, plot, force=force)
        plotted = identity(plot) if new else None
    try:
        _write(
            model,
            source,
            output,
            fmt,
            force,
            arch,
            "recalibrated",
            sizes=(input_size, batch_size, seed, inputs_file),
        )
    except BaseException:
        _discard(plot, plotted)  # the plot alone would be half the output
        raise
    if plot:
        click.echo(f"wrote {plot}", err=True)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'bnsurgery[plot]'") from exc


def _discard(path: str | None, written: tuple[int, int] | None) -> None:
    """Remove ``path`` if it is still the new file this command wrote (identity ``written``)."""
    from .outputs import identity

    if path is None or written is None or identity(path) != written:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the program is: it unwinds like Ctrl-C, so every
    temporary file is removed on the way out (a ``BaseException``: no ``except Exception``
    swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    for name in _TERMINATING:  # a second signal must not interrupt the clean-up
        with contextlib.suppress(AttributeError, ValueError, OSError):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise _Terminated(signum)


def _catch_signals() -> dict[int, Any]:
    """Turn SIGTERM and SIGHUP into :class:`_Terminated` while a command runs; a signal that is
    ignored (``nohup``) stays ignored. Returns the handlers to put back."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous  # only the main thread may set handlers
    for name in _TERMINATING:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        handler = signal.getsignal(signum)
        if handler == signal.SIG_IGN:
            continue
        try:
            signal.signal(signum, _terminate)
        except (ValueError, OSError):
            continue
        previous[signum] = handler
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        with contextlib.suppress(ValueError, OSError, TypeError):
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the CLI and map every failure to one line and an exit code.

    SIGTERM and SIGHUP end a command like Ctrl-C: nothing written, one line, exit 128 + the
    signal number; the previous handlers are back when this returns."""
    previous = _catch_signals()
    try:
        return _main(argv)
    except _Terminated as exc:  # raised outside _main's own handlers (while reporting)
        return _report_terminated(exc)
    finally:
        _restore_signals(previous)


def _report_terminated(exc: _Terminated) -> int:
    click.echo(
        f"error: terminated ({signal.Signals(exc.signum).name}); no output was written", err=True
    )
    return EXIT_SIGNAL_BASE + exc.signum


def _main(argv: list[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in (args[: args.index("--")] if "--" in args else args)
    if not debug:
        warnings.filterwarnings("ignore")
    try:
        result = cli.main(args=args, prog_name="bnsurgery", standalone_mode=False)
        return int(result) if isinstance(result, int) else 0
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt
        click.echo("error: interrupted; no output was written", err=True)
        return EXIT_INTERRUPTED
    except _Terminated as exc:
        return _report_terminated(exc)
    except click.ClickException as exc:
        _say("error", exc.format_message())
        return exc.exit_code
    except NothingToDoError as exc:
        _say("nothing to do", str(exc))
        return exc.exit_code
    except BnSurgeryError as exc:
        if debug:
            raise
        _say("error", str(exc))
        return exc.exit_code
    except MemoryError as exc:
        if debug:
            raise
        _say("error", f"out of memory ({exc or 'an allocation failed'}); nothing was written")
        return ResourceError.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted; no output was written", err=True)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        text = " ".join(str(exc).split())
        if isinstance(exc, RuntimeError) and _OUT_OF_MEMORY.search(text):
            _say("error", f"out of memory ({text[:200]}); nothing was written")
            return ResourceError.exit_code
        _say(
            "internal error",
            f"{type(exc).__name__}: {text[:300]} (rerun with --debug for details)",
        )
        return EXIT_INTERNAL


#: How torch's allocators report an allocation they could not make.
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|not enough memory|out of memory", re.I)


def _say(prefix: str, text: str) -> None:
    """One diagnostic line on stderr, whatever the text holds (newlines from paths included)."""
    folded = " ".join(text.split())
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in folded)
    click.echo(f"{prefix}: {shown}", err=True)
