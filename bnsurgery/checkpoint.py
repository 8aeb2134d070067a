"""Loading models from anywhere safely, and saving them atomically.

Sources (:func:`load`):

* an architecture spec (``timm:resnet18``; see :mod:`bnsurgery.specs`), optionally with a
  state dict from ``weights``;
* a bnsurgery safetensors file: weights plus metadata naming the architecture and the surgery
  applied, rebuilt without unpickling anything;
* a plain state dict (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) with ``arch``; the usual
  wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` and ``_orig_mod.``
  prefixes) are unwrapped;
* a TorchScript archive or a fully pickled ``nn.Module``, only with ``trust_code=True``: both
  run code from the file. Every torch file is first opened with ``weights_only=True``.

What a file may cause (run code, name an architecture, replay surgery) is decided by
:mod:`bnsurgery.trust`, from the file's kind and the caller's arguments. A bnsurgery file's
architecture is built on the meta device and compared with the file's header before any
memory is allocated for it.

Outputs (:func:`save`): ``safetensors`` (the safe format), ``pickle`` (``torch.save`` of the
module) or ``torchscript``; the format follows the suffix unless given. Writes go to a
temporary file in the same folder and are renamed into place, so a failed or interrupted
write leaves nothing behind; an existing file is only replaced with ``force=True`` (see
:mod:`bnsurgery.outputs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import provenance
from .errors import SourceError, TraceError, UsageError, VerificationError, brief
from .outputs import atomic_write, exists, is_dir
from .specs import Spec, build, is_spec, parse_spec
from .trust import (
    Kind,
    Trust,
    check_zip,
    choose_arch,
    kind_of,
    recorded_steps,
    recorded_structure,
    require_code_trust,
)

__all__ = [
    "FORMATS",
    "default_output",
    "load",
    "load_state_dict_into",
    "output_format",
    "read_state_dict",
    "read_torch_file",
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
    search_cwd: bool = False,
) -> nn.Module:
    """Load a model from a spec or a file (see the module docstring), on the CPU.

    What a file may cause is decided by :mod:`bnsurgery.trust` from its kind and these
    arguments, never from the file's own contents.

    Args:
        source: a spec such as ``"timm:resnet18"`` or a path.
        arch: the architecture spec for a plain state-dict file; for a bnsurgery file it
            replaces the recorded one (naming the recorded ``package.module:factory`` allows
            the file to have that factory built).
        weights: a state-dict file to load into a spec's model.
        trust_code: allow files to run code: full pickles, TorchScript archives, and
            ``package.module:factory`` architectures recorded in a file.
        trust_pickle: the old name of ``trust_code``.
        search_cwd: import the ``package.module:factory`` that ``source`` or ``arch`` names from
            the current folder first, as ``python -m`` does (the command line sets it); never a
            factory that only a file names.

    Returns:
        The model. It remembers its architecture, so :func:`save` can write the safe format.
        A model bnsurgery builds (from a spec, a state dict or a bnsurgery file) is in eval
        mode, as a checkpoint is for inference until you call ``model.train()``; a pickled
        module keeps the mode it was saved in.

    Raises:
        SourceError: missing or unreadable file, unknown architecture, weights that do not fit.
        UnsafeCodeError: the file would run code and ``trust_code`` is false (nothing ran).
        UsageError: a bad spec, or a state dict without ``arch``.

    >>> model = load("torchvision:resnet18")
    >>> type(model).__name__
    'ResNet'
    """
    if trust_pickle is not None:
        trust_code = trust_code or trust_pickle
    trust = Trust(code=trust_code, arch=parse_spec(arch) if arch is not None else None)
    text = os.fspath(source)
    path = Path(text)
    if not exists(path) and is_spec(text):
        spec = parse_spec(text)
        model = build(spec, search_cwd=search_cwd)
        provenance.set_arch(model, str(spec))
        if weights is not None:
            state = read_state_dict(weights, trust_code=trust_code)
            load_state_dict_into(model, state, str(spec))
        return model.eval()
    if weights is not None:
        raise UsageError("--weights goes with an architecture spec source, not with a file")
    _check_readable(path)
    kind = kind_of(path)
    if kind is Kind.SAFETENSORS:
        return _load_safetensors(path, trust, search_cwd)
    if kind is Kind.TORCHSCRIPT:
        require_code_trust(trust, path, "is a TorchScript archive, and loading one runs its code")
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise SourceError(f"{path}: not a loadable TorchScript archive ({brief(exc)})") from exc
    obj = read_torch_file(path, trust, kind)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    if trust.arch is None:
        raise UsageError(
            f"{path} holds a state dict (weights only); pass --arch (for example "
            "--arch timm:resnet18) to say which architecture it belongs to"
        )
    model = build(trust.arch, search_cwd=search_cwd)
    provenance.set_arch(model, str(trust.arch))
    load_state_dict_into(model, unwrap_state_dict(obj, path), str(trust.arch))
    return model.eval()


def _check_readable(path: Path) -> None:
    if not exists(path):
        raise SourceError(f"{path}: no such file (nor a timm:/torchvision:/module: spec)")
    if is_dir(path):
        raise SourceError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise SourceError(f"{path}: is not a regular file")
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: is empty")
    if not os.access(path, os.R_OK):
        raise SourceError(f"{path}: is not readable")


def read_torch_file(path: Path, trust: Trust, kind: Kind | None = None) -> Any:
    """A torch file's contents: ``weights_only=True`` first (after :func:`~bnsurgery.trust.
    check_zip`), the full unpickler only when ``trust.code``.

    Raises:
        SourceError: not a torch file, or unreadable.
        UnsafeCodeError: it holds pickled objects beyond tensors and containers, untrusted.
    """
    kind = kind or kind_of(path)
    if kind not in (Kind.TORCH_ZIP, Kind.PICKLE):
        raise SourceError(f"{path}: not a PyTorch checkpoint (nor safetensors, nor TorchScript)")
    if kind is Kind.TORCH_ZIP:
        check_zip(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        require_code_trust(
            trust, path, f"holds pickled Python objects{what}, and unpickling them runs code"
        )
    except MemoryError as exc:
        raise SourceError(f"{path}: not a PyTorch checkpoint (it asks for {brief(exc)})") from exc
    except Exception as exc:
        raise SourceError(f"{path}: not a PyTorch checkpoint ({brief(exc)})") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SourceError(f"{path}: unpickling failed ({brief(exc)})") from exc


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
    path: str | os.PathLike[str], *, trust_code: bool = False, trust_pickle: bool | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or torch file (wrappers unwrapped).

    Raises:
        SourceError: unreadable, or not a state dict (a TorchScript archive is never loaded).
        UnsafeCodeError: pickled objects beyond tensors and ``trust_code`` is false.
    """
    p = Path(path)
    _check_readable(p)
    kind = kind_of(p)
    if kind is Kind.SAFETENSORS:
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as exc:
            raise SourceError(f"{p}: not a valid safetensors file ({brief(exc)})") from exc
    if kind is Kind.TORCHSCRIPT:
        raise SourceError(f"{p}: is a TorchScript archive, not a state dict")
    trust = Trust(code=trust_code or bool(trust_pickle))
    return unwrap_state_dict(read_torch_file(p, trust, kind), p)


def state_mismatch(
    own: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]]
) -> str | None:
    """What keeps state ``given`` (key -> shape) from loading strictly into a model whose state
    is ``own``: shape mismatches, missing or unexpected keys (the first of each named).
    ``num_batches_tracked`` may be missing."""
    mismatched = [k for k, shape in given.items() if k in own and tuple(own[k]) != tuple(shape)]
    if mismatched:
        k = mismatched[0]
        return (
            f"{len(mismatched)} shape mismatches, first {k} {tuple(given[k])} vs "
            f"{tuple(own[k])} in the model"
        )
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]})")
    return ", ".join(parts) or None


def load_state_dict_into(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    """Load strictly, turning any mismatch into one clear line.

    Raises:
        SourceError: shape mismatches, missing or unexpected keys (the first of each named).
    """
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = state_mismatch(own, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise SourceError(f"weights do not fit {arch}: {problem}")
    _take_dtypes(model, state)
    model.load_state_dict(dict(state), strict=False)


def _take_dtypes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give each floating parameter and buffer the dtype its tensor has in the file: the
    architecture is built in float32, and copying a float64 (or half) checkpoint into it would
    round it in silence (a float64 fold saved and loaded back must stay float64)."""
    for key, tensor in model.state_dict(keep_vars=True).items():
        stored = state.get(key)
        if stored is None or not (tensor.is_floating_point() and stored.is_floating_point()):
            continue
        if stored.dtype != tensor.dtype:
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.to(stored.dtype)
            else:
                owner._buffers[attr] = tensor.to(stored.dtype)


def _safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The metadata and the tensor shapes of a safetensors file, read without its data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise SourceError(f"{path}: not a valid safetensors file ({brief(exc)})") from exc
    return meta, shapes


def _record(meta: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The bnsurgery record in a safetensors file's metadata (``{}`` if it has none)."""
    if _META_KEY not in meta:
        return {}
    try:
        record = json.loads(meta[_META_KEY])
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"{path}: corrupt bnsurgery metadata (not JSON)") from exc
    if not isinstance(record, dict):
        raise SourceError(f"{path}: corrupt bnsurgery metadata (not a mapping)")
    if record.get("version", 1) != 1:
        raise SourceError(
            f"{path}: bnsurgery metadata version {record.get('version')!r:.20} is not one this "
            "version reads; upgrade bnsurgery"
        )
    return record


def _load_safetensors(path: Path, trust: Trust, search_cwd: bool = False) -> nn.Module:
    meta, shapes = _safetensors_header(path)
    record = _record(meta, path)
    spec = choose_arch(record.get("arch"), trust, path)
    if spec is None:
        raise UsageError(
            f"{path} holds weights without an architecture; pass --arch (e.g. timm:resnet18)"
        )
    structure = recorded_structure(record.get("structure"), path)
    steps = recorded_steps(record.get("steps"), path)
    # the current folder only for a factory the user named, never for one only the file names
    model = _build_fitting(spec, structure, shapes, search_cwd=search_cwd and trust.named(spec))
    load_state_dict_into(model, read_state_dict(path), str(spec))
    rec = provenance.get_record(model)
    rec["arch"] = str(spec)
    rec["steps"] = steps
    return model.eval()


def _build_fitting(
    spec: Spec,
    structure: list[dict[str, Any]],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    search_cwd: bool = False,
) -> nn.Module:
    """Build ``spec`` with ``structure`` replayed, once its state is known to fit ``shapes``.

    The architecture is first built without memory for its weights (:func:`_meta_build`) and
    its keys and shapes compared with the file's header, so a file cannot make us allocate a
    model it does not hold the weights of.

    Raises:
        SourceError: the state does not fit, or the structure does not fit the architecture.
    """
    skeleton = _meta_build(spec, structure, search_cwd)
    if skeleton is not None:
        own = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        problem = state_mismatch(own, shapes)
        if problem:
            raise SourceError(f"weights do not fit {spec}: {problem}")
    model = build(spec, search_cwd=search_cwd)
    provenance.replay(model, structure)
    return model


def _meta_build(
    spec: Spec, structure: list[dict[str, Any]], search_cwd: bool = False
) -> nn.Module | None:
    """``spec`` built with its parameters and buffers on the meta device, or ``None``.

    First with meta as the default device. Constructors that compute layer widths from tensor
    values (torchvision's RegNets) fail there; they are built on the CPU with every parameter
    and buffer moved to meta as it is registered, so memory peaks at one tensor. ``None`` only
    where both fail: the real build then says what is wrong.
    """
    for context in (lambda: torch.device("meta"), _registered_on_meta):
        try:
            with context():
                model = build(spec, search_cwd=search_cwd)
        except Exception:
            continue
        try:
            provenance.replay(model, structure)
        except SourceError:
            raise
        except Exception:
            return None
        return model
    return None


@contextlib.contextmanager
def _registered_on_meta() -> Iterator[None]:
    """Move every parameter and buffer to the meta device as it is registered (this process's
    ``nn.Module`` registration is patched meanwhile: not for use across threads)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(
                param.detach().to("meta"), requires_grad=param.requires_grad
            )

    def buffer(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent=True) -> None:
        register_buffer(self, name, tensor, persistent)
        if tensor is not None and tensor.device.type != "meta":
            self._buffers[name] = tensor.detach().to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]


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

    A TorchScript file holds ``torch.jit.script(model)`` where that works, else the model
    traced on ``example_inputs``. A traced program cannot return every Python value, so what
    the ``.ts`` file returns is the model's output made plain: a dict (``{"logits": ...}``), a
    dataclass and a Hugging Face ``ModelOutput`` become a dict of the same names in the same
    order (fields that are ``None`` left out, as ``ModelOutput`` leaves them), a namedtuple a
    tuple in the same order, a list a list; a scripted model returns what its ``forward``
    declares (a namedtuple stays one). Arguments that hold no tensor (``None`` for an optional
    input) are fixed in a traced program, which then takes the others by their names:
    ``program(pixel_values=x)``. With ``example_inputs`` the program is verified before anything
    is written: loaded back and called on them, its output must match the model's (eval mode)
    leaf by leaf within the output dtype's tolerance (:func:`bnsurgery.verify.
    default_tolerance`).

    Args:
        model: the model to save.
        path: the output file.
        format: ``safetensors``, ``pickle`` or ``torchscript``; default from the suffix.
        force: replace an existing file.
        arch: architecture spec, for models not loaded through bnsurgery (safe format).
        example_inputs: a tensor or a tuple of positional inputs (TorchScript): to trace
            models that ``torch.jit.script`` rejects, and to verify the program.

    Returns:
        The path written.

    Raises:
        UsageError: unknown format, the safe format without a known architecture, or
            TorchScript of a model that cannot be scripted, without example inputs.
        TraceError: the model cannot be traced, or the program cannot run on the inputs.
        VerificationError: the TorchScript program's output differs from the model's on the
            example inputs (tracing fixes one path through data-dependent control flow);
            nothing was written.
        OutputError: the file exists (or appears while writing), is not a regular file, its
            folder is missing or read-only, or the write failed.

    >>> import tempfile
    >>> class Net(nn.Module):
    ...     def forward(self, x):
    ...         return {"logits": x.sum(1), "features": x}
    >>> path = save(Net(), Path(tempfile.mkdtemp()) / "net.ts", example_inputs=torch.ones(2, 3))
    >>> sorted(torch.jit.load(path)(torch.ones(2, 3)))
    ['features', 'logits']
    """
    from .tree import unwrapped

    model = unwrapped(model)  # torch.compile, DataParallel: the keys load() builds
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
        program = _torchscript_bytes(model, example_inputs, out)

        def write(tmp: str) -> None:
            # Serialised in memory, written with Python's file I/O: torch.jit.save writing to
            # a path aborts the whole process when the disk fills up.
            with open(tmp, "wb") as f:
                f.write(program)

    return atomic_write(out, write, force=force)


def _torchscript_bytes(model: nn.Module, example_inputs: Any, out: Path) -> memoryview:
    """The serialised TorchScript program of ``model``, verified on ``example_inputs`` when
    there are some."""
    program, keywords = _to_torchscript(model, example_inputs)
    if example_inputs is not None:
        loaded = torch.jit.load(io.BytesIO(program))  # ours: no file's code runs here
        _verify_program(model, loaded, example_inputs, keywords, out)
    return program


def _serialised(program: torch.jit.ScriptModule) -> memoryview:
    buffer = io.BytesIO()
    torch.jit.save(program, buffer)
    return buffer.getbuffer()


def _to_torchscript(
    model: nn.Module, example_inputs: Any
) -> tuple[memoryview, dict[str, Any] | None]:
    """The serialised program, and the keyword arguments it was traced with (``None``: it
    takes the example inputs by position).

    Scripting counts as working once the program serialises: ``torch.jit.script`` accepts
    some models whose program ``torch.jit.save`` then rejects (an unannotated ``mask=None``
    parameter is typed as a tensor with an undefined default); those are traced.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return _serialised(model), None
    try:
        return _serialised(torch.jit.script(model)), None
    except Exception as exc:
        if example_inputs is None:
            raise UsageError(
                f"torch.jit.script failed ({brief(exc)}); give example inputs to trace it "
                "instead (--input-size or --inputs)"
            ) from exc
    from .tree import as_args, eval_mode

    args = as_args(example_inputs)
    keywords = None if all(map(_traceable, args)) else _tensor_keywords(model, args)
    # the output made plain as the model returns it, so the trace records that structure
    handle = model.register_forward_hook(lambda module, inputs, output: _plain_output(output))
    try:
        with eval_mode(model), torch.no_grad():
            if keywords is None:
                traced = torch.jit.trace(model, args, strict=False, check_trace=False)
            else:
                traced = torch.jit.trace(
                    model, example_kwarg_inputs=keywords, strict=False, check_trace=False
                )
            return _serialised(traced), keywords
    except Exception as exc:
        raise TraceError(
            f"{type(model).__name__} can be neither scripted nor traced for TorchScript "
            f"({brief(exc)})"
        ) from exc
    finally:
        handle.remove()


def _plain_output(value: Any) -> Any:
    """``value`` as a traced TorchScript program returns it: mappings, dataclasses and Hugging
    Face ``ModelOutput`` become dicts of the same names in the same order (``None`` fields
    left out), namedtuples tuples; tensors and everything else stay as they are.

    >>> from collections import namedtuple
    >>> _plain_output(namedtuple("Out", "logits aux")(1, {"x": 2, "y": None}))
    (1, {'x': 2})
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {k: _plain_output(v) for k, v in value.items() if v is not None}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return {k: _plain_output(v) for k, v in fields if v is not None}
    if isinstance(value, tuple):
        return tuple(_plain_output(v) for v in value)
    if isinstance(value, list):
        return [_plain_output(v) for v in value]
    return value


def _traceable(value: Any) -> bool:
    """Whether ``torch.jit.trace`` can take ``value`` as an input: tensors, and tuples, lists
    and dicts of them."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, tuple | list):
        return all(map(_traceable, value))
    if isinstance(value, Mapping):
        return all(map(_traceable, value.values()))
    return False


def _tensor_keywords(model: nn.Module, args: tuple[Any, ...]) -> dict[str, Any]:
    """The arguments that hold tensors, by the names ``forward`` gives them (the others,
    ``None`` for an optional input, are fixed in the traced program).

    Raises:
        TraceError: ``forward`` does not name as many positional parameters.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    if len(names) < len(args):
        raise TraceError(
            f"{type(model).__name__}: example inputs that hold no tensor (None) are traced by "
            "name, and forward does not name each of its positional parameters"
        )
    return {
        name: arg for name, arg in zip(names[: len(args)], args, strict=True) if _traceable(arg)
    }


def _verify_program(
    model: nn.Module,
    program: torch.jit.ScriptModule,
    example_inputs: Any,
    keywords: dict[str, Any] | None,
    out: Path,
) -> None:
    """Call the loaded ``program`` as its user will, and compare its output with the model's,
    both in eval mode, leaf by leaf; each call gets its own copy of the inputs, so a model
    that changes its input in place cannot tell them apart.

    Raises:
        TraceError: the model or the program fails on the example inputs.
        VerificationError: the outputs differ in structure or beyond the dtype's tolerance.
    """
    from torch.utils._pytree import tree_map, tree_structure

    from .tree import as_args, eval_mode
    from .verify import default_tolerance, max_relative_error

    def copied(value: Any) -> Any:
        return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)

    args = as_args(example_inputs)
    program.eval()  # the loaded copy only; the file keeps the model's flags
    with eval_mode(model), torch.no_grad():
        try:
            expected = _plain_output(model(*copied(args)))
            call = program(**copied(keywords)) if keywords is not None else program(*copied(args))
            got = _plain_output(call)
        except Exception as exc:
            raise TraceError(
                f"{out}: the TorchScript program cannot run on the example inputs ({brief(exc)})"
            ) from exc
    if tree_structure(got) != tree_structure(expected):
        raise VerificationError(
            f"{out}: the TorchScript program returns {_shape_of(got)} where the model returns "
            f"{_shape_of(expected)}; nothing written"
        )
    error, tolerance = max_relative_error(expected, got), default_tolerance(expected)
    if not error <= tolerance:
        raise VerificationError(
            f"{out}: the TorchScript program's output differs from the model's on the example "
            f"inputs (max relative error {error:.3g} > {tolerance:g}; a trace fixes one path "
            "through data-dependent control flow); nothing written"
        )


def _shape_of(value: Any) -> str:
    """A short description of an output's structure, for a message."""
    if isinstance(value, dict):
        return "a dict of " + (", ".join(map(str, value))[:120] or "nothing")
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
