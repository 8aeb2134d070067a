"""The click group ``bnsurgery`` and its six commands, each one surgery in the same shape.

Every command that writes reads alike: resolve SOURCE and the options once
(:func:`~bnsurgery.cli.job.open_job`), run one library surgery on ``job.model``, then
:meth:`~bnsurgery.cli.job.Job.finish`: render the report, stop when there was nothing to do,
save (or, under ``--dry-run``, say what would be written). Options shared by several commands
arrive in ``**options`` and go to the job untouched; a command names only its own.

torch and the library are imported inside each command, so ``bnsurgery --help`` is fast.
"""

from __future__ import annotations

from typing import Any

import click

from ..errors import UsageError
from .job import open_job
from .options import (
    PATH,
    SWAP_TARGETS,
    debug_option,
    not_empty,
    not_nan,
    output_options,
    source_options,
    workers_option,
)
from .runtime import dtype_named, join_process_group, on_device, parse_device

__all__ = ["cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnsurgery")
@debug_option
def cli() -> None:
    """BatchNorm surgery on pretrained PyTorch networks.

    SOURCE is an architecture spec (timm:NAME, torchvision:NAME, package.module:factory; random
    init) or a checkpoint file (.safetensors, .pt, .pth, .bin, TorchScript).
    """


@cli.command("inspect")
@source_options()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_command(**options: Any) -> None:
    """Survey the BN layers of SOURCE: state, statistics health and the fold plan."""
    from ..surveying import survey

    job = open_job(options)
    inputs = None if job.scripted else job.example_inputs(required=False)
    job.render(survey(job.model, inputs))


@cli.command("fold")
@source_options()
@output_options
@click.option(
    "--tolerance",
    type=click.FloatRange(0, 1, min_open=True),
    callback=not_nan,
    help="Max relative output error (default by dtype).",
)
@click.option(
    "--lower-to",
    type=click.Choice(["auto", "affine", "conv"]),
    default="auto",
    show_default=True,
    help="pt2/ONNX output: what a BN left becomes: multiply-add, 1x1 depthwise conv, or auto "
    "(conv for ONNX, multiply-add for pt2).",
)
@click.option("--opset", type=click.IntRange(7, None), help="ONNX output: the opset.")
@click.option(
    "--fixed-batch", is_flag=True, help="pt2/ONNX output: the batch dimension not dynamic."
)
@click.option(
    "--dtype",
    "dtype_name",
    type=click.Choice(["float16", "bfloat16"]),
    help="pt2/ONNX output: cast to this dtype, folded in float64 first (bfloat16: pt2 only).",
)
def fold_command(
    tolerance: float | None,
    lower_to: str,
    opset: int | None,
    fixed_batch: bool,
    dtype_name: str | None,
    **options: Any,
) -> None:
    """Fold BN layers of SOURCE into neighbouring conv/linear layers, verified on example
    inputs, and write the folded model. A .pt2 (torch.export) or .onnx output also lowers
    every BN left to its per-channel map, and is loaded back and checked against SOURCE's
    model before it is written."""
    from ..exporting import cast_inputs, expected_outputs, graph_nodes
    from ..folding import fold
    from ..plan import last_report

    job = open_job(options, "fold", "folded")
    if dtype_name and not job.exports:
        raise UsageError("--dtype is for a .pt2 or .onnx output")
    inputs = job.example_inputs(required=True)
    folding = inputs
    if job.exports and job.writer and not job.dry_run:
        job.expected = expected_outputs(job.model, inputs, not fixed_batch)
        job.export_options = {"lower_to": lower_to, "dynamic_batch": not fixed_batch}
        job.export_options.update(opset=opset, tolerance=tolerance, dtype=dtype_named(dtype_name))
        assert job.output_format is not None
        job.export_options["nodes_before"] = graph_nodes(
            job.model, inputs, job.output_format, dynamic_batch=not fixed_batch, opset=opset
        )
    if dtype_name:  # folded in float64, cast once when the artifact is written
        folding = cast_inputs(inputs, dtype_named("float64"))
        job.model.double()
    fold(job.model, folding, include=job.include, exclude=job.exclude, tolerance=tolerance)
    nothing = "no BN layer can be folded (reasons above); nothing written"
    job.finish(last_report(job.model), nothing=nothing, inputs=inputs)


@cli.command("freeze")
@source_options()
@output_options
@click.option(
    "--stats-only", is_flag=True, help="Freeze statistics only; keep weight and bias trainable."
)
@click.option(
    "--stages",
    type=click.IntRange(1, None),
    help="Only BN layers in the first N stages (1 = the stem).",
)
@click.option(
    "--fuse",
    is_flag=True,
    help="Say which frozen BN the conv or linear before it can compute while training "
    "(freeze(fuse=True) in Python); the file records the freeze, as without it.",
)
def freeze_command(stats_only: bool, stages: int | None, fuse: bool, **options: Any) -> None:
    """Freeze BN layers of SOURCE (statistics, and affine unless --stats-only) and write a
    checkpoint that loads back frozen."""
    from ..freezing import freeze
    from ..plan import last_report

    job = open_job(options, "freeze", "frozen")
    inputs = job.example_inputs(required=False) if fuse else None
    freeze(
        job.model, job.include, job.exclude, stages=stages, train_affine=stats_only,
        fuse=fuse, example_inputs=inputs,
    )  # fmt: skip
    nothing = "no BN layer to freeze (reasons above); nothing written"
    job.finish(last_report(job.model), nothing=nothing)


@cli.command("unfreeze")
@source_options()
@output_options
def unfreeze_command(**options: Any) -> None:
    """Undo a freeze: restore the original BN layers of SOURCE and write the model."""
    from ..freezing import unfreeze
    from ..plan import last_report

    job = open_job(options, "unfreeze", "unfrozen")
    unfreeze(job.model, job.include, job.exclude)
    nothing = "no layer frozen by bnsurgery; nothing to unfreeze, nothing written"
    job.finish(last_report(job.model), nothing=nothing)


@cli.command("swap")
@source_options(batch_default=32)
@output_options
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
    type=PATH,
    help="Fit each new norm's scale and shift to the BN's output on this data: a folder of "
    "images (resized, cropped and normalised with the model's timm data config), or a tensor file "
    "(.pt, .npy, .safetensors) of float samples (N, C, ...) preprocessed as the model expects.",
)
@click.option("--batches", type=click.IntRange(1, None), help="Use at most N calibration batches.")
@click.option("--quiet", is_flag=True, help="No progress bar (with --calibrate).")
@workers_option
def swap_command(
    target: str, groups: int | None, group_size: int | None, dims: str | None,
    calibrate_path: str | None, batches: int | None, quiet: bool, workers: int, **options: Any,
) -> None:  # fmt: skip
    """Replace BN layers of SOURCE by another norm (keeping their scale and shift, activations
    of norm-act layers, and optionally repairing the fit on data) and write the model."""
    from ..plan import last_report
    from ..swapping import swap

    job = open_job(options, "swap", target, reads=(calibrate_path,))
    data = job.read_data(calibrate_path or None, batches, workers)  # an empty path: no data
    example = None  # which BNs see one value per channel: where groups must be wider
    if target == "groupnorm" and data.batches is None:
        example = job.example_inputs(required=False, batch_size=2)
    with job.progress("calibrating", data, quiet) as tick:
        swap(
            job.model, target, job.include, job.exclude, groups=groups, group_size=group_size,
            dims=dims, calibrate=data.batches, calibrate_batches=batches, progress=tick,
            example_inputs=example,
        )  # fmt: skip
    nothing = "no BN layer swapped (reasons above); nothing written"
    job.finish(last_report(job.model), nothing=nothing)


@cli.command("recalibrate")
@source_options(batch_default=32)
@output_options
@click.option(
    "--data",
    "data_path",
    required=True,
    type=PATH,
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
    type=PATH,
    callback=not_empty,
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
    callback=not_nan,
    help="With --mode ema: each BN's momentum during the pass (default: its own).",
)
@click.option(
    "--autocast",
    type=click.Choice(["bfloat16", "float16"]),
    help="Run the pass under torch.autocast with this dtype (statistics merge in float64).",
)
@click.option("--device", help="Run the pass on this device, e.g. cuda or cuda:1 (default: cpu).")
@workers_option
def recalibrate_command(
    data_path: str, batches: int | None, mode: str, quiet: bool, plot: str | None,
    channels_last: bool | None, momentum: float | None, autocast: str | None,
    device: str | None, workers: int, **options: Any,
) -> None:  # fmt: skip
    """Recompute BN running statistics of SOURCE over data (exact population statistics) and
    write the model. Works under `torchrun --nproc-per-node N -m bnsurgery recalibrate ...`."""
    from ..plan import last_report
    from ..recalibration import recalibrate
    from ..report import drift_plot

    if momentum is not None and mode != "ema":
        raise UsageError("--momentum goes with --mode ema (exact statistics use no momentum)")
    target = parse_device(device)
    rank, world = join_process_group()
    job = open_job(
        options, "recalibrate", "recalibrated", reads=(data_path,), plot=plot, writer=rank == 0
    )
    data = job.read_data(data_path, batches, workers, rank=rank, world=world)
    with job.progress("recalibrating", data, quiet) as tick, on_device(job.model, target):
        recalibrate(
            job.model, data.batches, include=job.include, exclude=job.exclude,
            num_batches=batches, mode=mode, momentum=momentum, device=target, progress=tick,
            autocast=dtype_named(autocast), channels_last=channels_last,
        )  # fmt: skip
    report = last_report(job.model)
    if batches is not None and report.batches < batches:
        report.notes.append(f"--batches {batches}: the data held {report.batches}, all used")
    nothing = "no BN layer saw enough data (reasons above); nothing written"
    job.finish(report, nothing=nothing, draw=drift_plot)
