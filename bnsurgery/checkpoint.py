"""Loading models from anywhere safely, and saving them atomically.

Sources (:func:`load`):

* an architecture spec (``timm:resnet18``; see :mod:`bnsurgery.specs`), optionally with a
  state dict from ``weights``;
* a bnsurgery safetensors file: weights plus metadata naming the architecture and the surgery
  applied, rebuilt without unpickling anything;
* a plain state dict (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) with ``arch``; the usual
  wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` and ``_orig_mod.``
  prefixes) are unwrapped;
* a TorchScript archive;
* a fully pickled ``nn.Module``, only with ``trust_pickle=True``: unpickling runs code from the
  file. Every torch file is first opened with ``weights_only=True``.

Outputs (:func:`save`): ``safetensors`` (the safe format), ``pickle`` (``torch.save`` of the
module) or ``torchscript``; the format follows the suffix unless given. Writes go to a
temporary file in the same folder and are renamed into place, so a failed or interrupted
write leaves nothing behind; an existing file is only replaced with ``force=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import provenance
from .errors import BnSurgeryError, OutputError, SourceError, UnsafePickleError, UsageError
from .specs import build, is_spec, parse_spec

__all__ = [
    "FORMATS",
    "default_output",
    "load",
    "load_state_dict_into",
    "output_format",
    "read_state_dict",
    "save",
]

FORMATS = ("safetensors", "pickle", "torchscript")
_SUFFIX_FORMAT = {
    ".safetensors": "safetensors",
    ".pt": "pickle",
    ".pth": "pickle",
    ".pkl": "pickle",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".jit": "torchscript",
}
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "ema")
_META_KEY = "bnsurgery"


# ------------------------------------------------------------------------------- loading


def load(
    source: str | os.PathLike[str],
    *,
    arch: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    trust_code: bool = False,
    trust_pickle: bool | None = None,
) -> nn.Module:
    """Load a model from a spec or a file (see the module docstring), on the CPU.

    Args:
        source: a spec such as ``"timm:resnet18"`` or a path.
        arch: the architecture spec for a plain state-dict file.
        weights: a state-dict file to load into a spec's model.
        trust_pickle: allow unpickling a full ``nn.Module`` (runs code from the file).

    Returns:
        The model. It remembers its architecture, so :func:`save` can write the safe format.

    Raises:
        SourceError: missing or unreadable file, unknown architecture, weights that do not fit.
        UnsafePickleError: the file needs unpickling and ``trust_pickle`` is false.

    >>> model = load("torchvision:resnet18")
    >>> type(model).__name__
    'ResNet'
    """
    if trust_pickle is not None:  # the old name of trust_code
        trust_code = trust_code or trust_pickle
    trust_pickle = trust_code
    text = os.fspath(source)
    path = Path(text)
    if not exists(path) and is_spec(text):
        model = build(parse_spec(text))
        provenance.set_arch(model, str(parse_spec(text)))
        if weights is not None:
            load_state_dict_into(model, read_state_dict(weights, trust_pickle=trust_pickle), text)
        return model
    if weights is not None:
        raise UsageError("--weights goes with an architecture spec source, not with a file")
    _check_readable(path)
    if _is_safetensors(path):
        return _load_safetensors(path, arch)
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise SourceError(
                f"{path}: not a loadable TorchScript archive ({_short(exc)})"
            ) from exc
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    if arch is None:
        raise UsageError(
            f"{path} holds a state dict (weights only); pass --arch (for example "
            "--arch timm:resnet18) to say which architecture it belongs to"
        )
    model = build(parse_spec(arch))
    provenance.set_arch(model, str(parse_spec(arch)))
    load_state_dict_into(model, unwrap_state_dict(obj, path), arch)
    return model


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def _check_readable(path: Path) -> None:
    if not exists(path):
        raise SourceError(f"{path}: no such file (nor a timm:/torchvision:/module: spec)")
    if is_dir(path):
        raise SourceError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: is empty")
    if not os.access(path, os.R_OK):
        raise SourceError(f"{path}: is not readable")


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < 100_000_000


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; the full unpickler only when trusted."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None and not _starts_like_pickle(path):
            raise SourceError(f"{path}: not a PyTorch checkpoint (unreadable pickle data)") from exc
        if not trust_pickle:
            what = f" (it references {found.group(1)})" if found else ""
            raise UnsafePickleError(
                f"{path} holds pickled Python objects{what}; loading it would run code from the "
                "file: pass --trust-pickle only if you trust its origin, or save a state dict "
                "and use --arch"
            ) from exc
    except Exception as exc:
        raise SourceError(f"{path}: not a PyTorch checkpoint ({_short(exc)})") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SourceError(f"{path}: unpickling failed ({_short(exc)})") from exc


def _starts_like_pickle(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def unwrap_state_dict(obj: Any, where: Any = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside common checkpoint wrappers and strip DDP/compile prefixes.

    Raises:
        SourceError: no tensors found.
    """
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise SourceError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise SourceError(f"{where}: holds no tensors")
    for prefix in ("module.", "_orig_mod."):
        while state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_state_dict(
    path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or torch file (wrappers unwrapped)."""
    p = Path(path)
    _check_readable(p)
    if _is_safetensors(p):
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as exc:
            raise SourceError(f"{p}: not a valid safetensors file ({_short(exc)})") from exc
    return unwrap_state_dict(_torch_load(p, trust_pickle), p)


def load_state_dict_into(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    """Load strictly, turning any mismatch into one clear line.

    Raises:
        SourceError: shape mismatches, missing or unexpected keys (the first of each named).
    """
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise SourceError(
            f"weights do not fit {arch}: {len(mismatched)} shape mismatches, first {k} "
            f"{tuple(state[k].shape)} vs {tuple(own[k].shape)} in the model"
        )
    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]})")
        raise SourceError(f"weights do not fit {arch}: " + ", ".join(parts))


def _load_safetensors(path: Path, arch: str | None) -> nn.Module:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise SourceError(f"{path}: not a valid safetensors file ({_short(exc)})") from exc
    record: dict[str, Any] = {}
    if _META_KEY in meta:
        try:
            record = json.loads(meta[_META_KEY])
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}: corrupt bnsurgery metadata") from exc
    arch = arch or record.get("arch")
    if not arch:
        raise UsageError(
            f"{path} holds weights without an architecture; pass --arch (e.g. timm:resnet18)"
        )
    model = build(parse_spec(arch))
    provenance.replay(model, record.get("structure", []))
    state = read_state_dict(path)
    load_state_dict_into(model, state, arch)
    rec = provenance.get_record(model)
    rec["arch"] = str(parse_spec(arch))
    rec["steps"] = list(record.get("steps", []))
    return model


# -------------------------------------------------------------------------------- saving


def output_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The format to write: ``fmt`` if given, else the one the suffix names.

    Raises:
        UsageError: unknown format, or a suffix that names none.
    """
    if fmt is not None:
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMAT:
        raise UsageError(
            f"cannot tell the format from {Path(path).name!r}; use a .safetensors, .pt or .ts "
            "suffix or pass --format"
        )
    return _SUFFIX_FORMAT[suffix]


def default_output(source: str, operation: str) -> Path:
    """``<input stem>.<operation>.safetensors`` beside the input, or in the current folder
    for a spec."""
    path = Path(source)
    if exists(path) or not is_spec(source):
        stem = path.name.split(".")[0] if path.name else "model"
        return path.with_name(f"{stem}.{operation}.safetensors")
    name = parse_spec(source).name.replace("/", "_")
    return Path(f"{name}.{operation}.safetensors")


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    force: bool = False,
    arch: str | None = None,
    example_inputs: Any = None,
) -> Path:
    """Write a model atomically.

    Args:
        model: the model to save.
        path: the output file.
        format: ``safetensors``, ``pickle`` or ``torchscript``; default from the suffix.
        force: replace an existing file.
        arch: architecture spec, for models not loaded through bnsurgery (safe format).
        example_inputs: used to trace models that ``torch.jit.script`` rejects (TorchScript).

    Returns:
        The path written.

    Raises:
        UsageError: unknown format, or the safe format without a known architecture.
        OutputError: the file exists, its folder is missing or read-only, or the write failed.
    """
    out = Path(path)
    fmt = output_format(out, format)
    if fmt == "safetensors":
        record = provenance.get_record(model)
        arch = arch or record.get("arch")
        if not arch:
            raise UsageError(
                "the safetensors format records the architecture, and this model's is unknown: "
                "pass arch='timm:NAME' (or --arch), or save as .pt (pickle)"
            )
        if any(e.get("with") == "custom" for e in record["structure"]):
            raise UsageError(
                "a swap to a custom callable cannot be rebuilt from metadata; save as .pt (pickle)"
            )
        payload = {"version": 1, "arch": arch, **{k: record[k] for k in ("steps", "structure")}}
        metadata = {_META_KEY: json.dumps(payload), "format": "pt"}

        def write(tmp: str) -> None:
            from safetensors.torch import save_model

            save_model(model, tmp, metadata=metadata)

    elif fmt == "pickle":

        def write(tmp: str) -> None:
            torch.save(model, tmp)

    else:

        def write(tmp: str) -> None:
            scripted = _to_torchscript(model, example_inputs)
            # Serialise in memory, then write with Python's file I/O: torch.jit.save writing to
            # a path aborts the whole process when the disk fills up.
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer)
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())

    return atomic_write(out, write, force=force)


def _to_torchscript(model: nn.Module, example_inputs: Any) -> torch.jit.ScriptModule:
    if isinstance(model, torch.jit.ScriptModule):
        return model
    try:
        return torch.jit.script(model)
    except Exception as exc:
        if example_inputs is None:
            raise UsageError(
                f"torch.jit.script failed ({_short(exc)}); give example inputs to trace it "
                "instead (--input-size)"
            ) from exc
    from .graph import as_args, eval_mode

    with eval_mode(model), torch.no_grad():
        return torch.jit.trace(model, as_args(example_inputs), check_trace=False)


def exists(path: Path) -> bool:
    """``path.exists()``, but ``False`` where the name cannot even be looked up (too long, a
    file used as a folder), instead of an ``OSError``."""
    try:
        return path.exists()
    except OSError:
        return False


def is_dir(path: Path) -> bool:
    """``path.is_dir()``, ``False`` on any ``OSError``."""
    try:
        return path.is_dir()
    except OSError:
        return False


def atomic_write(out: Path, write: Callable[[str], None], *, force: bool = False) -> Path:
    """Call ``write(tmp_path)`` then move the result to ``out`` in one rename.

    Raises:
        OutputError: ``out`` exists (without ``force``), is a folder, its folder is missing or
            not writable, or the write failed; no partial file is left.
    """
    parent = out.parent if str(out.parent) else Path(".")
    if not is_dir(parent):
        raise OutputError(f"{out}: folder {parent} does not exist")
    if is_dir(out):
        raise OutputError(f"{out}: is a directory")
    if exists(out) and not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"{out}: cannot write in {parent} ({exc.strerror or exc})") from exc
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) create 0600: the usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"{out}: write failed ({exc.strerror or exc})") from exc
        if isinstance(exc, Exception) and not isinstance(exc, BnSurgeryError):
            # writers report a full disk or a file size limit in their own exception types
            # (torch: RuntimeError from its stream writer; safetensors: its own error)
            raise OutputError(f"{out}: write failed ({_short(exc)})") from exc
        raise
    return out
