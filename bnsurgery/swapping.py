"""swap: replace BatchNorm by another norm, keeping what the pretrained net learned.

Every target is built the same way, from the BN it replaces, through one registry
(:data:`TARGETS`): the new module carries the BN's affine parameters, eps, dtype, device and
``requires_grad``; timm norm-act layers become the matching norm-act layer with the very same
activation and drop modules.

``swap(..., calibrate=data)`` repairs the swap, which no other tool does: layer by layer in
forward order, through the layers already swapped, each new norm's per-channel scale and shift
are set by least squares so that on the calibration data its output matches the eval-mode
output of the BN it replaces. The report gives the fit error per layer before and after.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import provenance
from .errors import UsageError
from .frozen import FrozenBatchNorm
from .graph import eval_mode
from .norms import (
    bn_stats,
    call_input,
    carry_hooks,
    check_finite,
    eps_of,
    has_activation,
    is_batchnorm,
    is_frozen_batchnorm,
    num_features,
    remainder_of,
)
from .recalibration import _DataCheck, _run, _to, default_forward
from .select import select_batchnorms

__all__ = ["TARGETS", "ChannelLayerNorm", "SwapReport", "auto_groups", "swap"]


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dimension (dim 1) at every position, for any rank: (N, C),
    (N, C, L), (N, C, H, W), (N, C, D, H, W). As ConvNeXt normalises conv features."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, **kw: Any):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kw)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` (called positionally or as ``input=``, like BN) and return it in
        the layout it came in: a contiguous input gives a contiguous output, so the ``.view``
        user code does after the norm it replaced keeps working."""
        if input.dim() == 2:
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        normed = F.layer_norm(
            input.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return torch.empty_like(input, dtype=normed.dtype).copy_(normed.movedim(-1, 1))


class NormAct(nn.Module):
    """A norm followed by the drop and activation of the timm norm-act layer it replaced
    (``norm`` → ``drop`` → ``act``), for targets timm has no norm-act class for."""

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # BN's name: bn(input=x) works
        return self.act(self.drop(self.norm(input)))


def auto_groups(channels: int, preferred: int = 32, min_group_size: int = 1) -> int:
    """The largest group count at most ``preferred`` that divides ``channels`` into groups of
    at least ``min_group_size`` channels (1 group if none does).

    >>> auto_groups(72), auto_groups(64), auto_groups(7), auto_groups(5, min_group_size=2)
    (24, 32, 7, 1)
    """
    fits = [
        g
        for g in range(1, min(preferred, channels) + 1)
        if channels % g == 0 and channels // g >= min_group_size
    ]
    return max(fits, default=1)


def _groups(bn: nn.Module, groups: int | None, group_size: int | None) -> int:
    c = num_features(bn)
    if groups is not None and group_size is not None:
        raise UsageError("give groups or group_size, not both")
    if groups is not None:
        if groups < 1 or c % groups:
            raise UsageError(f"groups={groups} does not divide {c} channels")
        return groups
    if group_size is not None:
        if group_size < 1 or c % group_size:
            raise UsageError(f"group_size={group_size} does not divide {c} channels")
        return c // group_size
    # BatchNorm1d often sees (N, C) vectors: a group there must hold enough values to normalise.
    return auto_groups(c, min_group_size=16 if isinstance(bn, nn.BatchNorm1d) else 1)


def _carry(new: nn.Module, bn: nn.Module, affine: bool) -> nn.Module:
    """Give ``new`` the BN's affine parameters (values, requires_grad), dtype and device."""
    weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
    like = next(
        (t for t in (weight, getattr(bn, "running_mean", None)) if isinstance(t, torch.Tensor)),
        None,
    )
    if like is not None:
        new.to(device=like.device, dtype=like.dtype)
    if affine and isinstance(getattr(new, "weight", None), nn.Parameter):
        with torch.no_grad():
            if isinstance(weight, torch.Tensor):
                new.weight.copy_(weight.detach().reshape(new.weight.shape))
                new.weight.requires_grad_(weight.requires_grad)
            if isinstance(bias, torch.Tensor) and isinstance(
                getattr(new, "bias", None), torch.Tensor
            ):
                new.bias.copy_(bias.detach().reshape(new.bias.shape))
                new.bias.requires_grad_(bias.requires_grad)
    return new


def _affine(bn: nn.Module, force: bool) -> bool:
    return force or isinstance(getattr(bn, "weight", None), torch.Tensor)


def _with_act(norm: nn.Module, bn: nn.Module) -> nn.Module:
    if not has_activation(bn):
        return norm
    return NormAct(norm, getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))


def _groupnorm(bn: nn.Module, opts: dict[str, Any]) -> nn.Module:
    g = _groups(bn, opts.get("groups"), opts.get("group_size"))
    affine = _affine(bn, opts.get("force_affine", False))
    if has_activation(bn):
        from timm.layers import GroupNormAct

        new = GroupNormAct(num_features(bn), g, eps=eps_of(bn), affine=affine, apply_act=False)
        new.drop, new.act = bn.drop, bn.act
        return _carry(new, bn, affine)
    return _carry(nn.GroupNorm(g, num_features(bn), eps=eps_of(bn), affine=affine), bn, affine)


def _layernorm(bn: nn.Module, opts: dict[str, Any]) -> nn.Module:
    affine = _affine(bn, opts.get("force_affine", False))
    if has_activation(bn):
        from timm.layers import LayerNormAct2d

        new = LayerNormAct2d(num_features(bn), eps=eps_of(bn), affine=affine, apply_act=False)
        new.drop, new.act = bn.drop, bn.act
        return _carry(new, bn, affine)
    return _carry(ChannelLayerNorm(num_features(bn), eps=eps_of(bn), affine=affine), bn, affine)


def _instancenorm(bn: nn.Module, opts: dict[str, Any]) -> nn.Module:
    if isinstance(bn, nn.BatchNorm1d) and opts.get("dims") != "1d":
        # On (N, C) vectors InstanceNorm1d would read C as the length: silently wrong.
        raise _Leave(
            "a BatchNorm1d may see (N, C) vectors, which instance norm cannot take; "
            "pass dims='1d' if it sees (N, C, L)"
        )
    dims = {nn.BatchNorm1d: 1, nn.BatchNorm3d: 3}
    d = next((v for cls, v in dims.items() if isinstance(bn, cls)), 2)
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[d]
    affine = _affine(bn, opts.get("force_affine", False))
    new = _carry(cls(num_features(bn), eps=eps_of(bn), affine=affine), bn, affine)
    return _with_act(new, bn)


def _frozen(bn: nn.Module, opts: dict[str, Any]) -> nn.Module:
    if isinstance(bn, FrozenBatchNorm) or is_frozen_batchnorm(bn):
        raise _Leave("already frozen")
    if bn_stats(bn) is None:
        raise _Leave("no running statistics (track_running_stats=False) to freeze")
    return FrozenBatchNorm(bn)


def _syncbatchnorm(bn: nn.Module, opts: dict[str, Any]) -> nn.Module:
    if isinstance(bn, nn.SyncBatchNorm):
        raise _Leave("already a SyncBatchNorm")
    if not isinstance(bn, _BatchNorm):
        raise _Leave(f"{type(bn).__name__} has no SyncBatchNorm counterpart")
    if has_activation(bn):
        from timm.layers.norm_act import SyncBatchNormAct

        new: nn.Module = SyncBatchNormAct(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats
        )
        new.drop, new.act = bn.drop, bn.act
    else:
        new = nn.SyncBatchNorm(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats
        )
    _share_state(new, bn)
    new.__dict__["_bnsurgery_from"] = f"{type(bn).__module__}.{type(bn).__qualname__}"
    return new


def _share_state(new: nn.Module, bn: nn.Module) -> None:
    """Give ``new`` the very parameter and buffer tensors of ``bn`` (state kept exactly)."""
    for name, param in bn._parameters.items():
        new._parameters[name] = param
    for name, buffer in bn._buffers.items():
        new._buffers[name] = buffer
    new.training = bn.training


_BN_CLASSES = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}


def _batchnorm(bn: nn.Module, opts: dict[str, Any]) -> nn.Module:
    if isinstance(bn, FrozenBatchNorm):
        return bn.restore()
    if type(bn) in _BN_CLASSES.values():
        raise _Leave("already a BatchNorm")
    origin = bn.__dict__.get("_bnsurgery_from", "")
    dims = opts.get("dims") or next(
        (k for k in _BN_CLASSES if origin.endswith(f"BatchNorm{k}")), "2d"
    )
    if has_activation(bn) or "BatchNormAct2d" in origin:
        from timm.layers import BatchNormAct2d

        new: nn.Module = BatchNormAct2d(num_features(bn), eps=eps_of(bn), apply_act=False)
        new.drop, new.act = getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity())
    else:
        new = _BN_CLASSES[dims](num_features(bn), eps=eps_of(bn))
    if isinstance(bn, _BatchNorm):  # SyncBatchNorm and friends: same state, exactly
        new.momentum, new.affine, new.track_running_stats = (
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
        )
        for name in ("weight", "bias"):
            if name not in bn._parameters or bn._parameters[name] is None:
                new._parameters[name] = None
        _share_state(new, bn)
        return new
    # a buffer-only frozen BN (torchvision/timm FrozenBatchNorm2d): trainable again
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(bn, name))
    return new.to(bn.running_mean.device, bn.running_mean.dtype).train(bn.training)


def _identity(bn: nn.Module, opts: dict[str, Any]) -> nn.Module:
    return remainder_of(bn)


class _Leave(Exception):
    """This target does not apply to this BN; the message is the reason."""


#: Swap targets: name -> builder(bn, options) -> module.
TARGETS: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module]] = {
    "groupnorm": _groupnorm,
    "layernorm": _layernorm,
    "instancenorm": _instancenorm,
    "frozen": _frozen,
    "syncbatchnorm": _syncbatchnorm,
    "batchnorm": _batchnorm,
    "identity": _identity,
}
_FITTABLE = ("groupnorm", "layernorm", "instancenorm")


@dataclass(frozen=True)
class Swapped:
    """One BN replaced; fit errors are relative RMS errors against the BN's eval output on the
    calibration data, with the BN's own scale and shift (before) and the fitted ones (after)."""

    bn: str
    was: str
    now: str
    detail: str = ""
    fit_error_before: float | None = None
    fit_error_after: float | None = None


@dataclass
class SwapReport:
    """What :func:`swap` did: each BN swapped into what, and what was left and why."""

    target: str
    swapped: list[Swapped]
    left: list[tuple[str, str]]
    calibrated: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "calibrated": self.calibrated,
            "swapped": [asdict(s) for s in self.swapped],
            "left": [{"bn": n, "reason": r} for n, r in self.left],
            "notes": list(self.notes),
        }


def _normalized(new: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The new norm's output before its affine map (and before any activation)."""
    norm = new.norm if isinstance(new, NormAct) else new
    if isinstance(norm, nn.GroupNorm):
        return F.group_norm(x, norm.num_groups, None, None, norm.eps)
    if isinstance(norm, nn.LayerNorm):
        moved = x if x.dim() == 2 else x.movedim(1, -1)
        out = F.layer_norm(moved, norm.normalized_shape, None, None, norm.eps)
        return out if x.dim() == 2 else out.movedim(-1, 1)
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm):
        return F.instance_norm(x, eps=norm.eps)
    raise TypeError(type(norm).__name__)


class _StopForward(Exception):
    pass


def _fit(
    model: nn.Module,
    order: list[tuple[str, nn.Module, nn.Module]],
    data: Iterable[Any],
    feed: Callable[[nn.Module, Any], Any],
    device: torch.device,
    num_batches: int | None,
    check: _DataCheck | None = None,
) -> dict[str, tuple[float, float]]:
    """Least-squares scale and shift per channel for each new norm, in forward order.

    Raises:
        DataError: the model cannot run on a batch, or a fitted scale or shift is not finite in
            the norm's dtype (nothing is written into that norm).
    """
    check = check or _DataCheck()
    errors: dict[str, tuple[float, float]] = {}
    batches = list(data) if not isinstance(data, list | tuple) else data
    if num_batches is not None:
        batches = batches[:num_batches]
    if not batches:
        raise UsageError("calibration data yielded no batch")
    for name, bn, new in order:
        sums: dict[str, torch.Tensor] = {}

        def hook(
            module: nn.Module, args: tuple, kwargs: dict, bn: nn.Module = bn, sums: dict = sums
        ) -> None:
            x = call_input(args, kwargs)
            z = _normalized(module, x).double()
            y = F.batch_norm(
                x, bn.running_mean, bn.running_var, getattr(bn, "weight", None),
                getattr(bn, "bias", None), False, 0.0, eps_of(bn),
            ).double()  # fmt: skip
            dims = [0, *range(2, x.dim())]
            for key, value in (
                ("n", torch.full((x.shape[1],), x.numel() / x.shape[1], dtype=torch.float64)),
                ("z", z.sum(dims)),
                ("y", y.sum(dims)),
                ("zz", (z * z).sum(dims)),
                ("zy", (z * y).sum(dims)),
                ("yy", (y * y).sum(dims)),
            ):
                sums[key] = sums.get(key, 0) + value.cpu()
            raise _StopForward

        handle = new.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in batches:
                with contextlib.suppress(_StopForward):
                    _run(feed, model, _to(batch, device))
        finally:
            handle.remove()
        if not sums:
            continue  # not called in the forward pass: keeps the carried scale and shift
        n, sz, sy, szz, szy = (sums[k] for k in ("n", "z", "y", "zz", "zy"))
        var_z = szz / n - (sz / n) ** 2
        cov = szy / n - (sz / n) * (sy / n)
        scale = torch.where(var_z > 1e-12, cov / var_z.clamp_min(1e-12), torch.ones_like(var_z))
        shift = sy / n - scale * sz / n
        target = new.norm if isinstance(new, NormAct) else new
        before_a = target.weight.detach().double().cpu().reshape(-1)
        before_b = target.bias.detach().double().cpu().reshape(-1)

        new_a = scale.reshape(target.weight.shape).to(target.weight)
        new_b = shift.reshape(target.bias.shape).to(target.bias)
        if not (bool(torch.isfinite(new_a).all()) and bool(torch.isfinite(new_b).all())):
            nan = bool(torch.isnan(scale).any() or torch.isnan(shift).any())
            raise check.overflow(name, "the fitted scale and shift", new_a.dtype, nan)
        errors[name] = (_rel_error(sums, before_a, before_b), _rel_error(sums, scale, shift))
        with torch.no_grad():
            target.weight.copy_(new_a)
            target.bias.copy_(new_b)
    return errors


def _rel_error(sums: dict[str, torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> float:
    """sqrt(residual / total sum of squares) of ``a * z + b`` against ``y``, from the sums."""
    n, sz, sy, szz, szy, syy = (sums[k] for k in ("n", "z", "y", "zz", "zy", "yy"))
    residual = syy - 2 * a * szy - 2 * b * sy + a * a * szz + 2 * a * b * sz + n * b * b
    total = syy - sy * sy / n
    return math.sqrt(max(float(residual.sum()), 0.0) / max(float(total.sum()), 1e-30))


def _forward_order(
    model: nn.Module, modules: list[nn.Module], batch: Any, feed, device
) -> list[int]:
    seen: list[int] = []
    ids = {id(m): i for i, m in enumerate(modules)}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args: seen.append(ids[id(mod)]) if ids[id(mod)] not in seen else None
        )
        for m in modules
    ]
    try:
        _run(feed, model, _to(batch, device))
    finally:
        for h in handles:
            h.remove()
    return seen + [i for i in range(len(modules)) if i not in seen]


def swap(
    model: nn.Module,
    to: str | Callable[[nn.Module], nn.Module] = "groupnorm",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    groups: int | None = None,
    group_size: int | None = None,
    dims: str | None = None,
    calibrate: Iterable[Any] | None = None,
    calibrate_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Replace BN layers by another norm, in place.

    Args:
        model: the model; changed in place and returned.
        to: a name from :data:`TARGETS` (``groupnorm``, ``layernorm``, ``instancenorm``,
            ``frozen``, ``syncbatchnorm``, ``batchnorm``, ``identity``) or a callable that takes
            the BN and returns a module.
        include, exclude: glob patterns on BN names.
        groups, group_size: for ``groupnorm``: a group count, or channels per group; default
            the largest count up to 32 that divides the channels.
        dims: for ``batchnorm`` from SyncBatchNorm built elsewhere: ``"1d"``, ``"2d"``, ``"3d"``;
            for ``instancenorm``, ``"1d"`` says BatchNorm1d layers see (N, C, L) inputs.
        calibrate: batches (as for :func:`bnsurgery.recalibrate`); fit each new norm's scale
            and shift to the replaced BN's eval output, layer by layer in forward order.
        calibrate_batches: use at most this many calibration batches.
        forward: ``forward(model, batch)`` for calibration batches.

    Returns:
        The model; :func:`bnsurgery.last_report` gives a :class:`SwapReport`.

    Raises:
        UsageError: an unknown target (the valid ones are listed), bad group options, or a
            pattern that selects nothing.
        DataError: a calibration batch holds NaN or infinite values, the model cannot run on
            it (its shape is named), or a fitted scale or shift is not finite in the norm's
            dtype (the layer is named). The model is left exactly as it was: every BN is put
            back.

    >>> net = swap(nn.Sequential(nn.Conv2d(3, 72, 3), nn.BatchNorm2d(72)), "groupnorm")
    >>> type(net[1]).__name__, net[1].num_groups
    ('GroupNorm', 24)
    """
    if isinstance(to, str):
        if to not in TARGETS:
            raise UsageError(f"unknown swap target {to!r}; valid: {', '.join(TARGETS)}")
        build = TARGETS[to]
        target_name = to
    elif callable(to):

        def build(bn: nn.Module, opts: dict[str, Any]) -> nn.Module:
            return to(bn)

        target_name = getattr(to, "__name__", "callable")
    else:
        raise UsageError("to must be a target name or a callable")
    if dims is not None and dims not in _BN_CLASSES:
        raise UsageError(f"dims must be one of {', '.join(_BN_CLASSES)}")
    fit = calibrate is not None
    if fit and target_name not in _FITTABLE:
        raise UsageError(f"calibration fits scale and shift; valid with: {', '.join(_FITTABLE)}")
    opts = {"groups": groups, "group_size": group_size, "dims": dims, "force_affine": fit}
    chosen = select_batchnorms(model, include, exclude)
    if fit or target_name in _KEEPS_STATISTICS:  # these carry the statistics into the model
        check_finite(chosen, "swap to " + target_name + (" with calibration" if fit else ""))
    swapped: list[Swapped] = []
    left: list[tuple[str, str]] = []
    placed: list[tuple[str, nn.Module, nn.Module]] = []
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    structure: list[dict[str, Any]] = []
    try:  # all or nothing: a BN that cannot be swapped puts back every one swapped before it
        for name, bn in chosen:
            if isinstance(getattr(bn, "running_mean", None), nn.parameter.UninitializedBuffer):
                raise UsageError(f"{name}: an uninitialised lazy BN; run one forward pass first")
            if fit and not isinstance(getattr(bn, "running_var", None), torch.Tensor):
                left.append((name, "no running statistics to calibrate against"))
                continue
            try:
                new = build(bn, opts)
            except _Leave as why:
                left.append((name, str(why)))
                continue
            if not isinstance(new, nn.Module):
                raise UsageError(f"the swap callable returned a {type(new).__name__} for {name}")
            if new is not bn:
                carry_hooks(bn, new)
            parents = provenance.parents(model, bn)
            if not parents:
                left.append((name, "the model itself is the BN"))
                continue
            for parent, child_name, path in parents:
                setattr(parent, child_name, new)
                undo.append((parent, child_name, bn))
                if isinstance(to, str):
                    structure.append(
                        {"replace": path, "with": f"swap:{to}", "options": _replay_opts(new, opts)}
                    )
                else:
                    structure.append({"replace": path, "with": "custom"})
            detail = f"groups={new.num_groups}" if isinstance(new, nn.GroupNorm) else ""
            swapped.append(Swapped(name, type(bn).__name__, type(new).__name__, detail))
            placed.append((name, bn, new))
    except BaseException:
        for parent, child_name, bn in reversed(undo):
            setattr(parent, child_name, bn)
        raise
    report = SwapReport(target_name, swapped, left, calibrated=fit)
    if fit and placed:
        feed = forward or default_forward
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        check = _DataCheck()
        try:
            batches = []
            limit = max(calibrate_batches, 0) if calibrate_batches else None
            for batch in itertools.islice(calibrate, limit):
                check.batch(batch, len(batches))  # as each batch is produced
                batches.append(batch)
            if not batches:
                raise UsageError("calibration data yielded no batch")
            with eval_mode(model), torch.no_grad():
                news = [new for _, _, new in placed]
                order = _forward_order(model, news, batches[0], feed, device)
                errors = _fit(model, [placed[i] for i in order], batches, feed, device, None, check)
        except BaseException:  # nothing changed: every BN goes back where it was
            for parent, child_name, bn in reversed(undo):
                setattr(parent, child_name, bn)
            raise
        report.swapped = [
            Swapped(s.bn, s.was, s.now, s.detail, *errors.get(s.bn, (None, None))) for s in swapped
        ]
    provenance.record_step(
        model, {"op": "swap", "to": target_name, "swapped": len(swapped)}, structure
    )
    provenance.set_report(model, report)
    return model


_KEEPS_STATISTICS = ("frozen",)


def _replay_opts(new: nn.Module, opts: dict[str, Any]) -> dict[str, Any]:
    out = {"dims": opts.get("dims"), "force_affine": opts.get("force_affine", False)}
    norm = new.norm if isinstance(new, NormAct) else new
    if isinstance(norm, nn.GroupNorm):
        out["groups"] = norm.num_groups
    return out


def rebuild(old: nn.Module, target: str, options: dict[str, Any]) -> nn.Module:
    """Rebuild a swapped module from the BN of a fresh architecture (checkpoint replay)."""
    if not is_batchnorm(old):
        raise UsageError(f"cannot replay swap:{target} on a {type(old).__name__}")
    return TARGETS[target](old, {"groups": None, "group_size": None, **options})
