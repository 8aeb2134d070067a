"""The machine a command runs on: its device, its process group, its memory, its terminal.

These helpers know nothing of surgery. They turn ``--device`` into a device this machine has,
join the process group ``torchrun`` describes, tell how much memory a new allocation may take,
and show (or not) a progress bar. torch is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from ..errors import UsageError

__all__ = [
    "available_memory",
    "dtype_named",
    "gib",
    "join_process_group",
    "on_device",
    "parse_device",
    "progress_bar",
]


def parse_device(text: str | None) -> Any:
    """Read ``--device``, before any work: a device this machine has.

    Args:
        text: the option's value; None means the CPU.

    Returns:
        The ``torch.device``.

    Raises:
        UsageError: not a device, a CUDA device this machine lacks, or a kind other than cpu
            and cuda.
    """
    import torch

    if text is None:
        return torch.device("cpu")
    try:
        chosen = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {text!r} is not a device (e.g. cpu, cuda, cuda:1)") from exc
    if chosen.type == "cuda" and (
        not torch.cuda.is_available()
        or (chosen.index is not None and chosen.index >= torch.cuda.device_count())
    ):
        raise UsageError(f"--device {text}: no such CUDA device on this machine")
    if chosen.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text}: only cpu and cuda devices are supported")
    return chosen


def join_process_group() -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1).

    Returns:
        ``(rank, world)``: ``(0, 1)`` when the command runs alone.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def dtype_named(name: str | None) -> Any:
    """The torch dtype ``name`` names (``--autocast bfloat16``), or None for None."""
    import torch

    return getattr(torch, name) if name else None


@contextlib.contextmanager
def on_device(model: Any, target: Any) -> Iterator[None]:
    """Run the block with ``model`` on ``target``, and move it back to the CPU afterwards,
    whatever happened: a model is saved from the CPU, whatever ran the pass."""
    model.to(target)
    try:
        yield
    finally:
        model.to("cpu")


def available_memory() -> int | None:
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


def gib(n: int) -> str:
    """``n`` bytes in GiB, for messages: ``gib(3 * 2**29)`` is ``'1.5 GiB'``."""
    return f"{n / 2**30:.3g} GiB"


@contextlib.contextmanager
def progress_bar(label: str, length: int, show: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr while the block runs, or none when ``show`` is false.

    Yields:
        The ``progress`` callback a surgery calls once per batch (its argument, the batches
        done so far, is not needed: each call is one more).
    """
    if not show:
        yield lambda done: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield lambda done: bar.update(1)
