"""What a file may cause: decided here, by the file's kind and the user's flags, never by the
file's own words.

The rules (README, "Security model"):

* A file's kind comes from its content, never its name: a safetensors file, a PyTorch zip
  checkpoint, a TorchScript archive, a bare pickle, a NumPy array, or something else
  (:func:`kind_of`).
* Safetensors files and PyTorch zip checkpoints are data. A zip is checked to be stored the way
  ``torch.save`` stores it (no compressed member, no member larger than the file) before
  anything in it is inflated or unpickled (:func:`check_zip`); pickled data is then read with
  ``torch.load(weights_only=True)``, whose unpickler builds tensors and containers only.
* Full pickles and TorchScript archives run code from the file when loaded: only with
  ``trust_code`` (``--trust-code``; :func:`require_code_trust`).
* An architecture recorded in a file may name only registry entries, ``timm:NAME`` that timm
  lists and ``torchvision:NAME`` that torchvision lists, with constructor options from an
  allow-list, each a plain literal within bounds (never ``pretrained``, weights or anything
  that downloads). A ``package.module:factory`` record is refused unless the user names that
  same factory (``--arch``) or passes ``trust_code`` (:func:`recorded_arch`).
* Recorded surgery (the steps and structural edits a bnsurgery file carries) is data: known
  step names and edit kinds, every argument type- and range-checked
  (:func:`recorded_steps`, :func:`recorded_structure`).
"""

from __future__ import annotations

import enum
import math
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SourceError, UnsafeCodeError, UsageError
from .specs import Spec, parse_spec

__all__ = [
    "Kind",
    "Trust",
    "check_zip",
    "kind_of",
    "recorded_arch",
    "recorded_steps",
    "recorded_structure",
    "require_code_trust",
]

#: The flag (and API keyword) that lets a file run code.
FLAG = "--trust-code"


@dataclass(frozen=True)
class Trust:
    """What the user allowed, from flags and arguments only.

    Attributes:
        code: files may run code when loaded (``--trust-code`` / ``trust_code=True``).
        arch: the architecture spec the user named (``--arch`` / ``arch=``), if any; a file
            recording that same ``package.module:factory`` may have it built.
    """

    code: bool = False
    arch: Spec | None = None

    def named(self, spec: Spec) -> bool:
        """True when the user's ``arch`` names the same callable as ``spec`` (options aside)."""
        return self.arch is not None and (self.arch.namespace, self.arch.name) == (
            spec.namespace,
            spec.name,
        )


class Kind(enum.Enum):
    """What a file is, judged from its bytes."""

    SAFETENSORS = "safetensors"
    TORCH_ZIP = "PyTorch zip checkpoint"
    TORCHSCRIPT = "TorchScript archive"
    PICKLE = "pickle"
    NUMPY = "NumPy array"
    OTHER = "unknown"


def kind_of(path: Path) -> Kind:
    """The kind of the file at ``path``, from its first bytes and (for zips) member names.

    A zip holding any TorchScript member (``constants.pkl``, a ``code/`` folder) counts as
    TorchScript, whatever else it holds or its suffix says.
    """
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 10**8:
        return Kind.SAFETENSORS
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return Kind.OTHER
        torchscript = any(
            n == "constants.pkl" or n.endswith("/constants.pkl") or "/code/" in f"/{n}"
            for n in names
        )
        return Kind.TORCHSCRIPT if torchscript else Kind.TORCH_ZIP
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return Kind.PICKLE
    if head.startswith(b"\x93NUMPY"):
        return Kind.NUMPY
    return Kind.OTHER


def require_code_trust(trust: Trust, path: Path | str, why: str) -> None:
    """Raise unless the user allowed files to run code.

    Raises:
        UnsafeCodeError: ``trust.code`` is false; the message says why the file needs it.
    """
    if not trust.code:
        raise UnsafeCodeError(
            f"{path}: {why}; it was not loaded. Pass {FLAG} only if you trust its origin, or "
            "save a state dict (.safetensors) and load it with --arch"
        )


def check_zip(path: Path) -> None:
    """Refuse a zip that ``torch.save`` would not have written, before inflating anything.

    ``torch.save`` stores every member uncompressed, each once. A compressed member, a member
    whose declared size runs past the end of the file, or members whose sizes add up to more
    than the file (overlapping members) could make the reader allocate far beyond the file.

    Raises:
        SourceError: the zip is unreadable or not stored the way torch stores it.
    """
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise SourceError(f"{path}: not a readable zip checkpoint ({exc})") from exc
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise SourceError(
                f"{path}: member {info.filename!r} is compressed; torch.save stores members "
                "uncompressed, so this file was not written by torch and is refused before "
                "anything is inflated"
            )
        if info.file_size != info.compress_size or info.header_offset + info.file_size > size:
            raise SourceError(
                f"{path}: member {info.filename!r} claims {info.file_size} bytes, beyond the "
                f"file's {size}; refused before reading it"
            )
        total += info.file_size
    if total > size:
        raise SourceError(
            f"{path}: its members claim {total} bytes in a {size}-byte file (overlapping "
            "members); refused before reading them"
        )


# ---------------------------------------------------------------------- architecture records

_Check = Callable[[Any], bool]


def _int_in(low: int, high: int) -> _Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _rate(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _word(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[a-z_]{0,16}", v) is not None


def _size(v: Any) -> bool:
    side = _int_in(1, 4096)
    if isinstance(v, tuple | list):
        return 1 <= len(v) <= 3 and all(side(s) for s in v)
    return side(v)


def _flags3(v: Any) -> bool:
    return isinstance(v, tuple | list) and len(v) == 3 and all(isinstance(b, bool) for b in v)


#: The largest class count a file may record without the user naming the architecture (the
#: file's shapes are compared on a weightless build first; this bounds what a constructor may
#: be asked to do at all).
MAX_CLASSES = 100_000
_CLASSES = _int_in(0, MAX_CLASSES)

#: Constructor options an architecture record may carry, per registry, and what each may be.
OPTIONS: dict[str, dict[str, _Check]] = {
    "timm": {
        "num_classes": _CLASSES,
        "in_chans": _int_in(1, 64),
        "global_pool": _word,
        "drop_rate": _rate,
        "drop_path_rate": _rate,
        "drop_block_rate": _rate,
        "proj_drop_rate": _rate,
        "attn_drop_rate": _rate,
        "pos_drop_rate": _rate,
        "img_size": _size,
        "output_stride": _int_in(8, 64),
        "class_token": _flag,
        "qkv_bias": _flag,
        "dynamic_img_size": _flag,
        "reg_tokens": _int_in(0, 64),
    },
    "torchvision": {
        "num_classes": _CLASSES,
        "aux_logits": _flag,
        "aux_loss": _flag,
        "transform_input": _flag,
        "init_weights": _flag,
        "zero_init_residual": _flag,
        "dropout": _rate,
        "attention_dropout": _rate,
        "stochastic_depth_prob": _rate,
        "image_size": _int_in(1, 4096),
        "replace_stride_with_dilation": _flags3,
        "num_keypoints": _int_in(1, 1000),
    },
}


def _registry_has(spec: Spec) -> bool:
    if spec.namespace == "timm":
        import timm

        return bool(timm.is_model(spec.name))  # a pretrained tag (name.tag) included
    import torchvision

    return spec.name in torchvision.models.list_models()


def recorded_arch(text: Any, trust: Trust, where: Path | str) -> Spec:
    """The architecture a file records, as a spec that may be built; or an error.

    Registry entries must be listed by the registry and carry only allow-listed options
    (:data:`OPTIONS`). A ``package.module:factory`` record is built only when the user named the
    same factory (``trust.arch``) or allowed code (``trust.code``).

    Raises:
        SourceError: the record is not a string spec, names something no registry lists, or
            carries an option that is not allowed (the option is named).
        UnsafeCodeError: a factory record the user did not allow.
    """
    if not isinstance(text, str):
        raise SourceError(f"{where}: corrupt bnsurgery metadata (arch is not a string)")
    try:
        spec = parse_spec(text)
    except UsageError as exc:
        raise SourceError(f"{where}: its recorded architecture is not valid: {exc}") from exc
    if spec.namespace in OPTIONS:
        if not _registry_has(spec):
            raise SourceError(
                f"{where}: records architecture {spec.namespace}:{spec.name}, which "
                f"{spec.namespace} does not list"
            )
        allowed = OPTIONS[spec.namespace]
        for key, value in spec.kwargs.items():
            if key not in allowed or not allowed[key](value):
                raise SourceError(
                    f"{where}: records option {key}={value!r} for {spec.namespace}:{spec.name}, "
                    f"which a file may not set; if you meant it, pass --arch {str(spec)!r}"
                )
        return spec
    if trust.code or trust.named(spec):
        return spec
    raise UnsafeCodeError(
        f"{where}: records architecture {spec.namespace}:{spec.name}, which would import and "
        f"call code; it was not run. Pass --arch {spec.namespace}:{spec.name} if that is your "
        f"own factory, or {FLAG} if you trust the file"
    )


def choose_arch(recorded: Any, trust: Trust, where: Path | str) -> Spec | None:
    """The spec to build for a file: the user's ``--arch`` wins; the record's options fill in
    when the user named the same architecture without options. ``None``: neither says.

    Raises:
        SourceError, UnsafeCodeError: see :func:`recorded_arch`.
    """
    named = trust.arch
    if recorded is not None and not isinstance(recorded, str):
        raise SourceError(f"{where}: corrupt bnsurgery metadata (arch is not a string)")
    if not recorded:
        return named
    if named is not None and not (trust.named(_peek(recorded)) and not named.kwargs):
        return named
    return recorded_arch(recorded, trust, where)


def _peek(text: Any) -> Spec:
    try:
        return parse_spec(text) if isinstance(text, str) else Spec("", "")
    except UsageError:
        return Spec("", "")


# ------------------------------------------------------------------------ surgery records

_PATH = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_MAX_EDITS = 100_000


def _module_path(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 1000 and _PATH.fullmatch(value) is not None


def _optional(check: _Check) -> _Check:
    return lambda v: v is None or check(v)


def _targets() -> tuple[str, ...]:
    from .targets import ALIASES, TARGETS

    return (*TARGETS, *ALIASES)


#: Every option a recorded replacement may carry, and its check.
_OPTIONS: dict[str, _Check] = {
    "dims": lambda v: v is None or v in ("1d", "2d", "3d"),
    "force_affine": _flag,
    "groups": _int_in(1, 1 << 20),
    "train_affine": _flag,
}


_NODE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
_SIZES = ("kernel", "stride", "padding", "dilation")


def _region_problem(region: Any) -> str | None:
    """What is wrong with one recorded region of a collapse edit, or ``None``."""
    if not isinstance(region, Mapping) or set(region) != {"source", "output", "name", "conv"}:
        return "a collapsed region is not {source, output, name, conv}"
    if not all(
        isinstance(region[k], str) and _NODE.fullmatch(region[k])
        for k in ("source", "output", "name")
    ):
        return "a collapsed region names a node badly"
    conv = region["conv"]
    keys = {"dims", "in_channels", "out_channels", "groups", *_SIZES}
    if not isinstance(conv, Mapping) or set(conv) != keys or conv["dims"] not in (1, 2, 3):
        return "a collapsed region's conv is not a conv spec"
    if not all(_int_in(1, 1 << 20)(conv[k]) for k in ("in_channels", "out_channels", "groups")):
        return "a collapsed region's conv has bad channel counts"
    for key in _SIZES:
        sizes = conv[key]
        low = 0 if key == "padding" else 1
        if not isinstance(sizes, list) or len(sizes) != conv["dims"]:
            return f"a collapsed region's conv {key} is not one size per axis"
        if not all(_int_in(low, 1 << 10)(v) for v in sizes):
            return f"a collapsed region's conv {key} is out of range"
    return None


def _edit_problem(edit: Any) -> str | None:
    """What is wrong with one structural edit, or ``None``."""
    if not isinstance(edit, Mapping):
        return "an edit is not a mapping"
    keys = set(edit)
    if "collapse" in edit:
        if keys != {"collapse", "regions"} or not _module_path(edit["collapse"]):
            return f"collapse edit with keys {sorted(keys)}"
        regions = edit["regions"]
        if not isinstance(regions, list) or not 1 <= len(regions) <= 64:
            return "collapse edit without a list of regions"
        return next(filter(None, map(_region_problem, regions)), None)
    if "add_bias" in edit:
        if keys != {"add_bias", "channels"}:
            return f"add_bias edit with keys {sorted(keys)}"
        if not _module_path(edit["add_bias"]) or not _int_in(1, 1 << 24)(edit["channels"]):
            return f"add_bias edit {dict(edit)}"
        return None
    if "replace" not in edit or not _module_path(edit["replace"]):
        return f"edit {dict(edit)!r:.200} names no module path"
    kind = edit.get("with")
    # "swap:NAME" and a frozen edit's top-level train_affine: how older files record them
    name = kind.removeprefix("swap:") if isinstance(kind, str) else None
    if name not in _targets():
        return f"unknown edit kind {kind!r:.60}"
    options = edit.get("options", {})
    allowed = {"replace", "with", "options"} | ({"train_affine"} if kind == "frozen" else set())
    if not keys <= allowed or not isinstance(options, Mapping):
        return f"{kind} edit with keys {sorted(keys)}"
    if "train_affine" in edit and not _flag(edit["train_affine"]):
        return "frozen edit train_affine"
    for key, value in options.items():
        if key not in _OPTIONS or not _OPTIONS[key](value):
            return f"{kind} option {key}={value!r:.50}"
    return None


def recorded_structure(value: Any, where: Path | str) -> list[dict[str, Any]]:
    """The structural edits a file records, each checked against the known kinds.

    Raises:
        SourceError: not a list of known edits (the first bad one is described).
    """
    return _checked_records(value, "structure", _edit_problem, where)


def _checked_records(
    value: Any, name: str, problem_of: Callable[[Any], str | None], where: Path | str
) -> list[dict[str, Any]]:
    """A recorded list whose every item ``problem_of`` finds nothing wrong with (copied)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > _MAX_EDITS:
        raise SourceError(f"{where}: corrupt bnsurgery metadata ({name} is not a list)")
    for item in value:
        problem = problem_of(item)
        if problem:
            raise SourceError(f"{where}: corrupt bnsurgery metadata ({problem})")
    return [dict(item) for item in value]


def _count(v: Any) -> bool:
    return _int_in(0, 1 << 40)(v)


def _error(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool) and v >= 0)


#: Known surgery steps and their fields (a step is a summary line, replayed as data only).
STEPS: dict[str, dict[str, _Check]] = {
    "fold": {"folded": _count, "left": _count, "verified": _flag, "max_rel_error": _error},
    "freeze": {"frozen": _count, "fused": _count},
    "unfreeze": {"unfrozen": _count},
    "swap": {"to": lambda v: isinstance(v, str) and _word(v), "swapped": _count},
    "recalibrate": {"mode": lambda v: v in ("exact", "ema"), "batches": _count},
}


def recorded_steps(value: Any, where: Path | str) -> list[dict[str, Any]]:
    """The surgery steps a file records, each a known step with checked fields.

    Raises:
        SourceError: not a list of known steps (the first bad one is described).
    """
    return _checked_records(value, "steps", _step_problem, where)


def _step_problem(step: Any) -> str | None:
    """What is wrong with one recorded step, or ``None``."""
    op = step.get("op") if isinstance(step, Mapping) else None
    fields = STEPS.get(op) if isinstance(op, str) else None
    if fields is None:
        return f"unknown step {step!r:.80}"
    for key, value in step.items():
        if key == "op":
            continue
        if key not in fields or not fields[key](value):
            return f"{op} step field {key}={value!r:.50}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{op} step field {key}={value!r}"
    return None
