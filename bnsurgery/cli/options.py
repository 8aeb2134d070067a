"""The options of the command line: their definitions, and the callbacks that check them.

This module only declares. Each decorator adds a group of click options to a command, with the
names, help texts and defaults the README documents; each callback checks one value as click
reads it, so a bad one stops the command before any work. Nothing here imports torch:
``bnsurgery --help`` reads every definition in this file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from ..errors import UsageError

__all__ = [
    "MAX_BATCH",
    "MAX_WORKERS",
    "PATH",
    "SWAP_TARGETS",
    "debug_option",
    "dry_run",
    "not_empty",
    "not_nan",
    "output_options",
    "parse_size",
    "source_options",
    "workers_option",
]

F = TypeVar("F", bound=Callable[..., Any])

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
#: More reader processes than this is a typo, not a machine.
MAX_WORKERS = 256


def parse_size(text: str | None) -> tuple[int, ...] | None:
    """Read ``--input-size``: positive integers separated by commas or ``x``.

    Args:
        text: the option's value, or None when it was not given.

    Returns:
        The per-sample size, or None for None.

    Raises:
        UsageError: anything but positive integers.

    >>> parse_size("3x224x224")
    (3, 224, 224)
    """
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


class _Path(click.Path):
    """``click.Path`` that refuses a NUL character (click's own would raise ``ValueError``
    from ``os.stat``) as a usage error."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, str) and "\0" in value:
            self.fail("a path cannot hold a NUL character", param, ctx)
        return super().convert(value, param, ctx)


#: The type of every option that names a file.
PATH = _Path()


def not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Callback: refuse an empty path (it would name the current folder)."""
    if value is not None and not value.strip():
        raise click.BadParameter("an empty path", ctx=ctx, param=param)
    return value


def not_nan(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Callback: refuse NaN, which passes every ``FloatRange`` comparison."""
    if value is not None and math.isnan(value):
        raise click.BadParameter("nan is not a number", ctx=ctx, param=param)
    return value


def _one_kind_of_inputs(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """--input-size and --inputs each say what the example inputs are: one of them at most
    (checked by whichever click processes second)."""
    other = "input_size" if param.name == "inputs_file" else "inputs_file"
    if value is not None and ctx.params.get(other) is not None:
        raise click.UsageError("--inputs and --input-size both give the example inputs; pass one")
    return value


def _read_inputs(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """--inputs, read and checked as it is parsed, before any work starts. The value the
    command receives is the file's ``ExampleInputs`` (path-like: it names the file)."""
    value = _one_kind_of_inputs(ctx, param, not_empty(ctx, param, value))
    if value is None:
        return None
    from ..datasets import read_example_inputs

    return read_example_inputs(value, trust_code=bool(ctx.params.get("trust_code")))


def _remember_dry_run(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    ctx.meta["bnsurgery.dry_run"] = value
    return value


def dry_run() -> bool:
    """Whether ``--dry-run`` was given: the command runs, reports and writes nothing."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get("bnsurgery.dry_run"))


def _apply(func: F, options: Sequence[Callable[[Any], Any]]) -> F:
    """Decorate ``func`` with ``options``, the first listed shown first in ``--help``."""
    for option in reversed(options):
        func = option(func)
    return func


#: ``--debug`` is accepted before or after the command name. main() reads it from the raw
#: arguments, because it must also apply to errors raised while click parses them.
debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, help="Show full tracebacks and warnings."
)


def source_options(batch_default: int = 2) -> Callable[[F], F]:
    """The options of every command: SOURCE and how to load it, and the example inputs.

    Args:
        batch_default: the default ``--batch-size`` (32 where data is read in batches).

    Returns:
        A decorator adding SOURCE, --arch, --weights, --trust-code, --input-size, --inputs,
        --batch-size, --seed and --debug.
    """
    options = [
        click.argument("source"),
        click.option("--arch", help="Architecture spec for a state-dict file, e.g. timm:resnet18."),
        click.option("--weights", type=PATH, help="State dict to load into a spec's model."),
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
            type=PATH,
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
        debug_option,
    ]
    return lambda func: _apply(func, options)


def output_options(func: F) -> F:
    """The options of every command that writes a model: where and how, which BN layers, the
    report's form, and --dry-run (remembered in the click context: see :func:`dry_run`)."""
    return _apply(
        func,
        [
            click.option(
                "-o",
                "--output",
                type=PATH,
                callback=not_empty,
                help="Output file (default: beside the input).",
            ),
            click.option(
                "--format",
                "fmt",
                type=click.Choice(["safetensors", "pickle", "torchscript", "pt2", "onnx"]),
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
                help="Do all of it, print the report, and write nothing (the model is only in "
                "memory).",
            ),
        ],
    )


#: ``--workers`` of the commands that read a folder of images.
workers_option = click.option(
    "--workers",
    type=click.IntRange(0, MAX_WORKERS),
    default=0,
    show_default=True,
    help="Processes that read and preprocess a folder of images (a torch DataLoader's "
    "num_workers; 0 reads them in this process); same batches either way. No effect on a "
    "tensor file, which is read once.",
)
