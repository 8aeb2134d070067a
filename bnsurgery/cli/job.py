"""One run of a command, from its options to its output: the shape every surgery shares.

A command builds one :class:`Job` from its options with :func:`open_job`, runs one library
surgery on ``job.model``, and ends with :meth:`Job.finish`, which renders the report, stops when
there was nothing to do, and saves (under ``--dry-run``, says what it would have written)::

    job = open_job(options, "freeze", "frozen")
    freeze(job.model, job.include, job.exclude)
    job.finish(last_report(job.model), nothing="...; nothing written")

Everything a run decides, it decides here and once: which architecture spec SOURCE names, where
the output goes and in which format, whether every file written may be written (checked before
any work), which example inputs the model is called with, and how its data is read.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..errors import DataError, NothingToDoError, ResourceError, UsageError
from .checks import arch_to_record, check_outputs, require_batchnorm, require_savable
from .options import dry_run, parse_size
from .runtime import available_memory, gib, progress_bar

__all__ = ["Data", "Job", "open_job"]


@dataclass
class Data:
    """The batches a command reads (``--data``, ``--calibrate``) in this process.

    Attributes:
        path: the file or folder, named in the errors raised while it is read; None: no data.
        batches: an iterator of input batches; None when there is no data.
        total: how many batches the pass will use: the progress bar's length.
    """

    path: str | None = None
    batches: Iterator[Any] | None = None
    total: int = 0


@dataclass
class Job:
    """What a command works on, resolved once from its options by :func:`open_job`.

    Attributes:
        source: SOURCE as typed: an architecture spec or a file.
        arch: ``--arch``; the output records it when the model carries no architecture.
        spec: the architecture spec SOURCE was built from: SOURCE itself when it is a spec (and
            no file has that name), else ``--arch``. It tells the default input size.
        model: the loaded model, which the surgery changes in place.
        size_text: ``--input-size`` as typed (see :attr:`input_size`).
        given_inputs: ``--inputs``, already read (``bnsurgery.datasets.ExampleInputs``).
        batch_size: ``--batch-size``, of drawn example inputs and of data batches.
        seed: ``--seed`` of drawn example inputs.
        include: ``--include`` globs, None for every BN layer.
        exclude: ``--exclude`` globs, None for none.
        as_json: ``--json``: the report as JSON instead of a table.
        output: where the model is written (``-o``, else beside the input); None for inspect.
        output_format: the output's format (``--format``, else from its suffix); None where
            this process writes nothing.
        force: ``--force``: existing outputs may be replaced.
        plot: a second output written with the model (recalibrate's ``--plot``), or None.
        writer: false on the ranks of a distributed run other than 0: they print and write
            nothing.
        dry_run: ``--dry-run``: everything but the writing.
        expected: for a pt2 or ONNX output, what the artifact must reproduce
            (``bnsurgery.exporting.expected_outputs`` of the model before the surgery); None:
            the model's own after it.
        export_options: for a pt2 or ONNX output, ``lower_to``, ``dynamic_batch``, ``opset``,
            ``nodes_before`` (keywords of ``bnsurgery.exporting.write_artifact``).
    """

    source: str
    arch: str | None
    spec: str | None
    model: Any
    size_text: str | None = None
    given_inputs: Any = None
    batch_size: int = 2
    seed: int = 0
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    as_json: bool = False
    output: Path | None = None
    output_format: str | None = None
    force: bool = False
    plot: str | None = None
    writer: bool = True
    dry_run: bool = False
    expected: Any = None
    export_options: dict[str, Any] = field(default_factory=dict)

    @property
    def exports(self) -> bool:
        """Whether the output is a deployment artifact (pt2, ONNX): every BN lowered in it."""
        from ..checkpoint import ARTIFACT_FORMATS

        return self.output_format in ARTIFACT_FORMATS

    @property
    def scripted(self) -> bool:
        """Whether the model is TorchScript: inspect reads it, and nothing can change it."""
        import torch

        return isinstance(self.model, torch.jit.ScriptModule)

    @property
    def input_size(self) -> tuple[int, ...] | None:
        """``--input-size``, parsed when the run first needs it (a run that never does, such as
        a freeze to .safetensors, ignores it). Raises UsageError when it is not a size."""
        return parse_size(self.size_text)

    def example_inputs(self, *, required: bool, batch_size: int | None = None) -> Any:
        """The inputs the model is called with: to verify a fold, walk the graph, or trace.

        ``--inputs`` gives them, as the model's positional arguments with floating tensors cast
        to its dtype. Else they are drawn: seeded normal values of the model's dtype, of shape
        ``(batch, *size)``, the size ``--input-size`` or else the one the architecture takes.

        Args:
            required: raise when the size is unknown, instead of returning None.
            batch_size: the batch instead of ``--batch-size``.

        Returns:
            A tuple of positional arguments (``--inputs``), a tensor, or None.

        Raises:
            UsageError: a bad ``--input-size``; an unknown size, where ``required``.
            ResourceError: the drawn inputs alone would not fit in the memory available.
            DataError: ``--inputs`` does not fit the model's ``forward``.
        """
        import torch

        from ..specs import default_input_size

        if self.given_inputs is not None:
            from ..datasets import example_arguments

            return example_arguments(self.model, self.given_inputs)
        size = self.input_size
        if size is None:
            size = default_input_size(self.spec, self.model)
        if size is None:
            if required:
                raise UsageError(
                    "cannot tell the model's input size; pass --input-size (e.g. 3,224,224)"
                )
            return None
        batch = batch_size or self.batch_size
        floats = (p.dtype for p in self.model.parameters() if p.dtype.is_floating_point)
        dtype = next(floats, torch.float32)
        needed = batch * math.prod(size) * (4 + dtype.itemsize)  # drawn in float32, then cast
        available = available_memory()
        if available is not None and needed > available:
            raise ResourceError(
                f"example inputs of {batch} x {'x'.join(map(str, size))} need {gib(needed)} "
                f"before the model even runs, and {gib(available)} is available; lower "
                "--batch-size or --input-size"
            )
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn((batch, *size), generator=generator).to(dtype)

    def read_data(
        self, path: str | None, limit: int | None, workers: int, *, rank: int = 0, world: int = 1
    ) -> Data:
        """Open ``path`` as batches of ``--batch-size`` for this process.

        Args:
            path: a folder of images (preprocessed with the model's data config, or to
                ``--input-size``) or a tensor file of samples; None for no data.
            limit: ``--batches``: the pass uses at most this many.
            workers: ``--workers``: processes that read a folder's images.
            rank: this process's place in a distributed run of ``world`` processes: it reads
                every ``world``-th batch from the ``rank``-th on.
            world: how many processes share the data.

        Raises:
            SourceError, UnsafeCodeError, DataError: as
                :func:`bnsurgery.datasets.batches_from_path`; a DataError names the file.
        """
        from ..datasets import batches_from_path

        if path is None:
            return Data()
        with _naming(path):
            batches, total = batches_from_path(
                path,
                self.model,
                batch_size=self.batch_size,
                input_size=self.input_size,
                rank=rank,
                world=world,
                workers=workers,
            )
        return Data(path, batches, total if limit is None else min(total, limit))

    @contextlib.contextmanager
    def progress(self, label: str, data: Data, quiet: bool) -> Iterator[Callable[[int], None]]:
        """The pass over ``data`` runs in this block: with a progress bar on a terminal (not
        with ``quiet``, nor without data, nor on the ranks that print nothing), and a DataError
        raised while the batches are consumed names the file.

        Yields:
            The ``progress`` callback to hand the surgery.
        """
        show = data.batches is not None and not quiet and self.writer and sys.stderr.isatty()
        with progress_bar(label, data.total, show) as tick, _naming(data.path):
            yield tick

    def render(self, report: Any) -> None:
        """Print ``report`` on stdout: its table (``str(report)``), or JSON with ``--json``."""
        from ..report import to_json

        click.echo(to_json(report) if self.as_json else str(report))

    def finish(
        self,
        report: Any,
        *,
        nothing: str,
        inputs: Any = None,
        draw: Callable[..., None] | None = None,
    ) -> None:
        """End a writing command, the same way for every one: render the report, stop when
        there was nothing to do, save. The ranks that do not write skip all three.

        Args:
            report: the surgery's report (a :class:`bnsurgery.Report`: ``changed`` names the
                BN layers it changed).
            nothing: the message when it changed none.
            inputs: the example inputs the surgery ran on, for a TorchScript output that is
                traced (see :meth:`save`).
            draw: ``draw(report, path, force=...)`` writes :attr:`plot`
                (``bnsurgery.report.drift_plot``); needed when the job has a plot.

        Raises:
            NothingToDoError: the report changed no BN layer; nothing was written (exit code 9).
        """
        if not self.writer:
            return
        self.render(report)
        if not report.changed and not self.exports:  # an artifact lowers what is left
            raise NothingToDoError(nothing)
        plot = None if draw is None else lambda path: draw(report, path, force=self.force)
        self.save(inputs, plot=plot)

    def save(self, inputs: Any = None, *, plot: Callable[[str], None] | None = None) -> None:
        """Write the plot (if any) and then the model; under ``--dry-run``, only say which.

        The plot is half the output: when the model cannot be written, a plot this run has
        just created is removed again.

        Args:
            inputs: inputs to trace the model on, where a TorchScript output is asked for and
                scripting fails; drawn from the options (when they can be) if None.
            plot: writes the plot to the path it is given; needed when the job has a plot.
        """
        from ..checkpoint import save
        from ..exporting import write_artifact
        from ..outputs import identity

        if self.dry_run:
            for path in (self.plot, self.output):
                if path:
                    click.echo(f"dry run: would write {path}; nothing written", err=True)
            return
        created = None
        if self.plot:
            assert plot is not None, "a job with a plot is saved with the function that draws it"
            new = not os.path.lexists(self.plot)
            plot(self.plot)
            created = identity(self.plot) if new else None
        checked = ""
        try:
            if inputs is None and (self.exports or self.output_format == "torchscript"):
                inputs = self.example_inputs(required=self.exports)
            if self.exports:
                assert self.output is not None and self.output_format is not None
                artifact = write_artifact(
                    self.model, inputs, self.output, self.output_format,
                    expected=self.expected, force=self.force, **self.export_options,
                )  # fmt: skip
                checked = f" ({artifact})"
            else:
                save(
                    self.model,
                    self.output,
                    format=self.output_format,
                    force=self.force,
                    arch=arch_to_record(self.model, self.arch),
                    example_inputs=inputs,
                )
        except BaseException:
            _discard(self.plot, created)
            raise
        click.echo(f"wrote {self.output}{checked}", err=True)
        if self.plot:
            click.echo(f"wrote {self.plot}", err=True)


def open_job(
    options: dict[str, Any],
    verb: str | None = None,
    operation: str | None = None,
    *,
    reads: tuple[str | None, ...] = (),
    plot: str | None = None,
    writer: bool = True,
) -> Job:
    """Resolve a command's options into its :class:`Job`: check everything, then load.

    For a command that writes (``verb`` given), in this order: the output's path; the output's
    format, and every output checked against every path the command reads, before any work
    (``--dry-run`` or not); the model loaded, which must be an ``nn.Module`` holding BN and,
    for a .safetensors output, have a known architecture. Without ``verb`` (inspect) the model
    is loaded as it is, TorchScript included.

    Args:
        options: the options click passed the command: at least those of
            :func:`~bnsurgery.cli.options.source_options`, and of
            :func:`~bnsurgery.cli.options.output_options` for a command that writes.
        verb: the writing command's name, for messages ("nothing to fold").
        operation: names the default output, ``<input stem>.<operation>.safetensors``
            (default: ``verb``).
        reads: the other paths the command reads (its data), which no output may replace.
        plot: a second output (recalibrate's ``--plot``); needs matplotlib.
        writer: false on the ranks of a distributed run other than 0: they check no output.

    Raises:
        UsageError, OutputError: a bad output, refused before the model is loaded.
        SourceError, UnsafeCodeError: the model cannot be loaded (as
            :func:`bnsurgery.load`).
        UnsupportedModelError: TorchScript, for a command that writes.
        NothingToDoError: no BN layer, for a command that writes.
    """
    from ..checkpoint import default_output, exists
    from ..specs import is_spec

    source, arch = options["source"], options["arch"]
    output, chosen = None, None
    if verb is not None:
        output = Path(options["output"] or default_output(source, operation or verb))
        if writer:
            chosen = check_outputs(output, options, reads, plot)
    model = load_model(source, arch, options["weights"], options["trust_code"])
    if verb is not None:
        require_batchnorm(model, source, verb)
        if writer:
            require_savable(model, source, output, chosen, arch)
    return Job(
        source=source,
        arch=arch,
        spec=source if is_spec(source) and not exists(Path(source)) else arch,
        model=model,
        size_text=options["input_size"],
        given_inputs=options["inputs_file"],
        batch_size=options["batch_size"],
        seed=options["seed"],
        include=tuple(options.get("include", ())) or None,
        exclude=tuple(options.get("exclude", ())) or None,
        as_json=options["as_json"],
        output=output,
        output_format=chosen,
        force=options.get("force", False),
        plot=plot,
        writer=writer,
        dry_run=dry_run(),
    )


def load_model(source: str, arch: str | None, weights: str | None, trust_code: bool) -> Any:
    """Load SOURCE as :func:`bnsurgery.load` does; the specs a user types import from the
    current folder, as under ``python -m``."""
    from ..checkpoint import load

    return load(source, arch=arch, weights=weights, trust_code=trust_code, search_cwd=True)


@contextlib.contextmanager
def _naming(path: str | None) -> Iterator[None]:
    """Name the data file in a DataError raised in the block: the library does not know the
    file. An error that already names it passes unchanged."""
    shown = str(Path(path)) if path else None
    try:
        yield
    except DataError as exc:
        if shown and not str(exc).startswith(shown):
            raise DataError(f"{shown}: {exc}") from exc
        raise


def _discard(path: str | None, created: tuple[int, int] | None) -> None:
    """Remove ``path`` if it is still the new file this run created (identity ``created``)."""
    from ..outputs import identity

    if path is None or created is None or identity(path) != created:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)
