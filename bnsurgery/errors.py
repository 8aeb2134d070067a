"""The exception hierarchy.

Every error the library raises on purpose is a :class:`BnSurgeryError`. Each subclass carries
the exit code the command line maps it to, so the CLI turns errors into exit codes in one
place and the codes are stable and documented (README, "Exit codes").
"""

from __future__ import annotations

__all__ = [
    "BnSurgeryError",
    "UsageError",
    "SourceError",
    "UnsafeCodeError",
    "UnsafePickleError",
    "OutputError",
    "TraceError",
    "VerificationError",
    "UnsupportedModelError",
    "NothingToDoError",
    "StatisticsError",
    "DataError",
    "ResourceError",
    "brief",
]


class BnSurgeryError(Exception):
    """Base class of every error bnsurgery raises on purpose."""

    exit_code: int = 1


class UsageError(BnSurgeryError):
    """An argument or option is invalid (bad pattern, unknown name, missing input size)."""

    exit_code = 2


class SourceError(BnSurgeryError):
    """A model source cannot be loaded: missing file, corrupt checkpoint, wrong architecture."""

    exit_code = 3


class UnsafeCodeError(SourceError):
    """Loading a file would run code from it (a pickled object, a TorchScript archive, or an
    architecture record that names a ``package.module:factory``), and the user did not allow
    it (``--trust-code``, or ``--arch`` naming that same factory). Nothing from the file ran."""

    exit_code = 4


#: The name this error had while pickles were the only kind of file that could run code.
UnsafePickleError = UnsafeCodeError


class OutputError(BnSurgeryError):
    """An output cannot be written: it exists, its folder is missing or read-only, or the
    write failed. Nothing partial is left behind."""

    exit_code = 5


class TraceError(BnSurgeryError):
    """The model cannot be traced or run on the example inputs."""

    exit_code = 6


class VerificationError(BnSurgeryError):
    """A surgery changed the model's output beyond tolerance; the model was left unchanged."""

    exit_code = 7


class UnsupportedModelError(BnSurgeryError):
    """The model is of a kind this operation cannot work on (for example TorchScript)."""

    exit_code = 8


class NothingToDoError(BnSurgeryError):
    """The command has nothing to do (no BatchNorm layer, nothing foldable, nothing frozen), so
    nothing was written. Raised by the command line; the library returns an empty report."""

    exit_code = 9


class StatisticsError(BnSurgeryError):
    """BN running statistics are not finite (NaN or infinite): folding or freezing them would
    ship a broken model. Recalibrate those layers first."""

    exit_code = 10


class DataError(BnSurgeryError):
    """Data given to a surgery (``--data``, ``--calibrate``) cannot be used: non-finite values,
    statistics that overflow the model's dtype, or batches whose shape or channel count do not
    fit the model. Raised before the model changes; the file is named."""

    exit_code = 11


class ResourceError(BnSurgeryError):
    """A requested size cannot be served: example inputs or a batch larger than the machine's
    memory, or an allocation the operating system refused. Nothing was written."""

    exit_code = 12


def brief(exc: BaseException, *, typed: bool = False) -> str:
    """An exception in one short line for an error message: its text with whitespace folded,
    cut at 200 characters (``typed``: after its class name); the class name if it has none.

    >>> brief(ValueError("bad\\n  value")), brief(KeyError(), typed=True)
    ('bad value', 'KeyError')
    """
    text = " ".join(str(exc).split())
    text = (text[:200] + "...") if len(text) > 200 else text
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if typed else text
