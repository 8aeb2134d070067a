"""The command line: ``bnsurgery`` runs :func:`main`, the one place where errors become exit codes.

:func:`main` runs the click group :data:`cli` and maps every failure to one line on stderr and
a documented exit code (README, "Exit codes"). Diagnostics go to stderr, data (tables, JSON)
to stdout. torch is imported only when a command runs, so ``bnsurgery --help`` is fast.

One job per module:

* :mod:`.options`: the options, and the callbacks that check them as click reads them;
* :mod:`.commands`: the click group and its six commands, each one surgery in one shape;
* :mod:`.job`: one command's run: SOURCE resolved once, example inputs, data, report, save;
* :mod:`.checks`: what a writing command refuses before any work;
* :mod:`.runtime`: the machine: device, process group, memory, progress bar;
* :mod:`.signals`: SIGTERM and SIGHUP, which end a command like Ctrl-C.
"""

from __future__ import annotations

import re
import sys
import warnings

import click

from ..errors import BnSurgeryError, NothingToDoError, ResourceError
from .commands import cli
from .options import SWAP_TARGETS as SWAP_TARGETS
from .signals import Terminated, signals_terminate

__all__ = ["cli", "main"]

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
#: How torch's allocators report an allocation they could not make.
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|not enough memory|out of memory", re.I)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the CLI and map every failure to one line and an exit code.

    Args:
        argv: the arguments, without the program's name (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0, a documented error's code, 70 for an internal error, 130 when
        interrupted, 128 + the signal number for SIGTERM and SIGHUP (nothing written; the
        previous handlers are back when this returns).
    """
    with signals_terminate():
        try:
            return _main(argv)
        except Terminated as exc:  # raised outside _main's own handlers (while reporting)
            return _report_terminated(exc)


def _report_terminated(exc: Terminated) -> int:
    click.echo(f"error: {exc.message}", err=True)
    return exc.exit_code


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
    except Terminated as exc:
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


def _say(prefix: str, text: str) -> None:
    """One diagnostic line on stderr, whatever the text holds (newlines from paths included)."""
    folded = " ".join(text.split())
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in folded)
    click.echo(f"{prefix}: {shown}", err=True)
