"""SIGTERM and SIGHUP end a command the way Ctrl-C does: nothing written, one line, an exit code.

While a command runs, either signal raises :class:`Terminated` wherever the program is. It is a
``BaseException``, so it unwinds through every ``finally`` (temporary files are removed, a new
plot is discarded) and no ``except Exception`` swallows it. :func:`bnsurgery.cli.main` turns it
into its exit code, the shell's 128 + the signal number: 143 for SIGTERM, 129 for SIGHUP.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["EXIT_SIGNAL_BASE", "Terminated", "signals_terminate", "terminate"]

#: The exit code of a command ended by a signal is this + the signal number.
EXIT_SIGNAL_BASE = 128
_TERMINATING = ("SIGTERM", "SIGHUP")


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the program is: it unwinds like Ctrl-C.

    Attributes:
        signum: the signal's number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal."""
        return EXIT_SIGNAL_BASE + self.signum

    @property
    def message(self) -> str:
        """The one line that says so."""
        return f"terminated ({signal.Signals(self.signum).name}); no output was written"


def terminate(signum: int, frame: object) -> None:
    """The handler: ignore further signals (they must not interrupt the clean-up), then raise
    :class:`Terminated`."""
    for name in _TERMINATING:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def signals_terminate() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated`; afterwards the previous
    handlers are back.

    A signal that is ignored (as under ``nohup``) stays ignored. Only the main thread may set
    handlers: in any other the block runs with the handlers as they are.
    """
    previous = _catch()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _catch() -> dict[int, Any]:
    """Install :func:`terminate` for each signal not ignored; return the handlers replaced."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for name in _TERMINATING:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        handler = signal.getsignal(signum)
        if handler == signal.SIG_IGN:
            continue
        try:
            signal.signal(signum, terminate)
        except (ValueError, OSError):
            continue
        previous[signum] = handler
    return previous
