"""What a writing command refuses before it does any work, each refusal with its exit code.

A surgery can take minutes; a command that would fail to write its result must fail first.
:func:`check_outputs` runs before the model is even loaded (a bad output costs nothing), and
:func:`require_batchnorm` and :func:`require_savable` right after it, before the surgery.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import NothingToDoError, UsageError

__all__ = ["arch_to_record", "check_outputs", "require_batchnorm", "require_savable"]


def check_outputs(
    output: Path, options: Mapping[str, Any], reads: tuple[str | None, ...], plot: str | None
) -> str:
    """Check the output format, and every output against every path the command reads.

    Args:
        output: where the model goes.
        options: the command's options: SOURCE, ``--weights``, ``--arch`` and ``--inputs`` are
            read; ``--format`` and ``--force`` apply.
        reads: the command's other inputs (its data).
        plot: a second output, or None; it needs matplotlib.

    Returns:
        The output's format: ``--format``, else the one its suffix names.

    Raises:
        UsageError: no format can be told; ``--plot`` without matplotlib.
        OutputError: an output replaces an input (compared by file identity, whatever the
            name), exists without ``--force``, or cannot be written (see
            :func:`bnsurgery.outputs.check_outputs`).
    """
    from ..checkpoint import output_format
    from ..outputs import check_outputs as refuse

    if plot:
        _require_matplotlib()
    chosen = output_format(output, options["fmt"])
    reading = (options["source"], options["weights"], options["arch"], *reads)
    outputs = [output, *([Path(plot)] if plot else [])]
    refuse(outputs, (*reading, options["inputs_file"]), force=options["force"])
    return chosen


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'bnsurgery[plot]'") from exc


def require_batchnorm(model: Any, source: str, verb: str) -> None:
    """A writing command changes an ``nn.Module`` that holds BN.

    Raises:
        UnsupportedModelError: TorchScript, which cannot be changed.
        NothingToDoError: not one BatchNorm layer.
    """
    import torch

    from ..errors import UnsupportedModelError
    from ..norms import iter_batchnorms

    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{source} is TorchScript, which cannot be changed; {verb} works on nn.Module "
            "checkpoints (inspect reads TorchScript)"
        )
    if next(iter_batchnorms(model), None) is None:
        raise NothingToDoError(
            f"{source} has no BatchNorm layer; nothing to {verb}, nothing written"
        )


def require_savable(model: Any, source: str, out: Path, chosen: str, arch: str | None) -> None:
    """A .safetensors output records the architecture, which a pickled module does not carry.

    Raises:
        UsageError: ``chosen`` is safetensors and the architecture is unknown.
    """
    if chosen == "safetensors" and not arch_to_record(model, arch):
        raise UsageError(
            f"{source} holds a pickled module whose architecture is unknown, and the "
            f"safetensors output {out} records it: pass --arch package.module:factory, or write "
            "a pickle (-o NAME.pt)"
        )


def arch_to_record(model: Any, arch: str | None) -> str | None:
    """The architecture the output records: the one the model was loaded as (``--arch`` naming
    a file's factory without options resolves to the file's options), else ``--arch``."""
    from ..provenance import get_record

    return get_record(model).get("arch") or arch
