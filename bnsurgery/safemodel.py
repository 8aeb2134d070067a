"""The safe format: a safetensors file of weights whose metadata records the architecture and
the surgery applied, so the model is rebuilt without unpickling anything.

:func:`safe_metadata` writes the record (``{"bnsurgery": "<JSON>"}``: version, ``arch``,
``steps``, ``structure``); :func:`load_safe_model` reads it back. What the record may cause is
decided by :mod:`bnsurgery.trust` (an architecture from the registries' allow-lists, surgery as
checked data). The architecture is first built on the meta device and its keys and shapes
compared with the file's header, so a small file cannot make us allocate a model it does not
hold the weights of.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import provenance
from .errors import SourceError, UsageError
from .specs import Spec, build
from .statedicts import load_state_dict_into, state_mismatch
from .tensorfiles import read_safetensors, safetensors_header
from .trust import Trust, choose_arch, recorded_steps, recorded_structure

__all__ = ["META_KEY", "load_safe_model", "safe_metadata"]

#: The metadata key of the bnsurgery record in a safetensors file.
META_KEY = "bnsurgery"


def safe_metadata(model: nn.Module, arch: str | None = None) -> dict[str, str]:
    """The safetensors metadata that lets :func:`load_safe_model` rebuild ``model``.

    Args:
        model: the model (its architecture and edits recorded by :mod:`bnsurgery.provenance`).
        arch: the architecture spec, for a model not loaded through bnsurgery.

    Raises:
        UsageError: the architecture is unknown, or a swap to a custom callable (which no
            record can rebuild) was applied.
    """
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
    return {META_KEY: json.dumps(payload), "format": "pt"}


def _record(meta: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The bnsurgery record in a safetensors file's metadata (``{}`` if it has none)."""
    if META_KEY not in meta:
        return {}
    try:
        record = json.loads(meta[META_KEY])
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


def load_safe_model(path: Path, trust: Trust, search_cwd: bool = False) -> nn.Module:
    """The model of a safetensors file: the recorded (or the user's) architecture, with the
    recorded structure replayed, once it is known to fit the file, and the weights loaded.

    Raises:
        SourceError: corrupt metadata or file, a record that may not be built, weights or
            structure that do not fit.
        UnsafeCodeError: a recorded ``package.module:factory`` the user did not allow.
        UsageError: no architecture, recorded or given.
    """
    meta, shapes = safetensors_header(path)
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
    load_state_dict_into(model, read_safetensors(path), str(spec))
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
