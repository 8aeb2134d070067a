"""fold: merge BatchNorm into the layer before it (or, where exact, the layer after it).

Three steps, each usable alone:

1. :func:`plan_fold` walks the graph (:mod:`bnsurgery.graph`) and returns a :class:`FoldPlan`:
   which BN goes into which layer, and for every other BN the reason it is left.
2. :func:`bnsurgery.plan.apply` (``bnsurgery.apply``) applies any plan: each
   :class:`~bnsurgery.foldplan.FoldEdit` rewrites its layer's weights (float64 maths in
   :mod:`bnsurgery.foldmath`) and replaces the BN by an identity
   (:class:`~bnsurgery.layers.FoldedBatchNorm`, or the activation and drop of a timm norm-act
   layer), as one transaction that can be rolled back.
3. :func:`fold` does both, then verifies the output on the example inputs and rolls everything
   back if it moved beyond tolerance.

Conventions shared by every bnsurgery surgery: the model is changed **in place** and returned,
so ``bnsurgery.fold(model, x)`` works with or without reassignment; ``copy.deepcopy`` first to
keep the original. Folding always uses **eval semantics** (running statistics), also for a model
in train mode: the report says so in ``was_training`` and every module keeps its mode flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedModelError, VerificationError
from .foldcheck import unit_changes
from .foldplan import PLACEMENTS, FoldEdit, FoldPlan, left_class, plan_fold
from .fused import on_unfused
from .graph import trace
from .hooks import has_hooks, user_hooks_suspended
from .norms import check_finite, is_batchnorm
from .plan import Report, Transaction, begin, set_report
from .report import fold_text
from .tree import as_args, eval_mode, on_unwrapped
from .verify import default_tolerance, max_relative_error, tensors_in

__all__ = ["FoldEdit", "FoldPlan", "FoldReport", "fold", "plan_fold"]


@dataclass
class FoldReport(Report):
    """The outcome of :func:`fold`: ``folded`` edits (``changed`` names their BNs), ``left``
    skips, and how the fold was checked."""

    folded: list[FoldEdit] = field(default_factory=list)
    method: str = ""
    bn_count: int = 0
    verified: bool = False
    max_rel_error: float | None = None
    tolerance: float | None = None
    was_training: bool = False

    def __str__(self) -> str:  # a short table for people; to_dict() for scripts
        return fold_text(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bn_count": self.bn_count,
            "folded_count": len(self.folded),
            "method": self.method,
            "verified": self.verified,
            "max_rel_error": self.max_rel_error,
            "tolerance": self.tolerance,
            "was_training": self.was_training,
            "notes": list(self.notes),
            "folded": [asdict(e) for e in self.folded],
            "left": [{**s.to_dict(), "class": left_class(s.reason)} for s in self.left],
        }


def _verified(
    model: nn.Module,
    plan: FoldPlan,
    reference: Any,
    args: tuple[Any, ...],
    tol: float,
    leave_failing: bool,
    notes: list[str],
) -> tuple[FoldPlan, float, Transaction]:
    """Apply ``plan`` and check the model's output against ``reference``; return the plan that
    stands, its error, and its transaction, open (the caller commits it).

    When the output moved beyond ``tol``, each folded unit is recomputed on its own input
    (:func:`~bnsurgery.foldcheck.unit_changes`). Units that moved beyond ``tol`` themselves (in
    low precision, a BN whose statistics make the folded weights round badly) are left
    unfolded with the reason, when ``leave_failing``, and the rest is folded and checked again;
    otherwise the model is left unchanged and :class:`VerificationError` raised. When every
    unit is within ``tol``, the output moved because the network amplified rounding, or
    discrete post-processing (NMS, top-k) flipped on it: the fold stands, with a note.
    """
    for _ in range(4):
        txn = begin(model, plan)
        if not plan.edits:
            return plan, 0.0, txn
        try:
            with eval_mode(model), torch.no_grad(), user_hooks_suspended(model):
                error = max_relative_error(reference, model(*args))
        except BaseException:
            txn.rollback()
            raise
        if error <= tol:
            return plan, error, txn
        txn.rollback()
        changes = unit_changes(model, plan, args)
        failing = {bn: moved for bn, moved in changes.items() if not moved <= tol}
        if not failing:
            txn = begin(model, plan)
            worst = max(changes.values())
            notes.append(
                f"the final output moved by {error:.3g} (float rounding amplified by the "
                "network, or flipped by discrete post-processing such as NMS or top-k); every "
                f"folded layer, recomputed on the very input it saw, matches within {worst:.3g}"
            )
            return plan, worst, txn
        worst = max(failing.values())
        if not leave_failing:
            raise VerificationError(
                f"folding changed the output by {error:.3g} (max relative error, tolerance "
                f"{tol:.3g}; {worst:.3g} at the folded layers); the model was left unchanged"
            )
        dtype = _output_dtype(reference)
        plan = plan.without(
            {
                bn: (
                    f"folding it moved its layer's output by {moved:.3g} in {dtype} (tolerance "
                    f"{tol:.3g}): its statistics round badly into the folded weights at this "
                    "precision"
                    if math.isfinite(moved)
                    else "the model's output moved, and this fold (into a layer written as a "
                    "functional call, or one its unit check did not see run) is checked only "
                    "through the output"
                )
                for bn, moved in failing.items()
            },
        )
        notes.append(
            f"the output moved by {error:.3g} with every fold applied; {len(failing)} BN left "
            "unfolded because folding them moved their own layer's output beyond tolerance"
        )
    raise VerificationError(
        f"folding did not converge to a verified result (tolerance {tol:.3g}); the model was "
        "left unchanged"
    )


def _output_dtype(output: Any) -> str:
    dtypes = [t.dtype for t in tensors_in(output)]
    floats = [d for d in dtypes if d.is_floating_point]
    return str(floats[0]).replace("torch.", "") if floats else "its dtype"


@on_unwrapped
@on_unfused
def fold(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    placements: Sequence[str] = PLACEMENTS,
    verify: bool = True,
    tolerance: float | None = None,
) -> nn.Module:
    """Fold BatchNorm layers into neighbouring conv / linear layers, in place.

    Each BN whose input comes only from a conv, transposed conv or linear layer (any groups,
    dilation, stride, padding mode, with or without bias) is folded into that layer; otherwise,
    if its output goes only to linear layers or convs that never see padded zeros, into each of
    them, or into a BN module among them that then folds on (also through layout ops such as
    ``flatten``/``transpose`` and pooling on either side, and a BN after ``torch.cat`` slice
    by slice into each piece's layer). Branches of a block
    that add up to one conv (RepVGG, MobileOne, FastViT) collapse into it, the block rewritten
    (:mod:`bnsurgery.regions`). Every other BN is left, with a reason in the report. Arithmetic
    is float64, cast back to each layer's dtype.

    Args:
        model: the model, changed in place. Folding uses eval semantics whatever its mode.
        example_inputs: a tensor or tuple of positional inputs (dicts allowed inside). With them
            the graph is walked on a real forward pass and the result is verified; without, the
            walk is symbolic (``torch.fx``) and nothing is verified.
        include, exclude: glob patterns on BN names to restrict the fold.
        placements: placements to try, in order.
        verify: compare outputs before and after (needs ``example_inputs``).
        tolerance: allowed max relative error; default by output dtype (fp32: 1e-4).

    Memory: beyond the model and one forward pass, the new weights of the layers it folds
    into; the old ones are kept until the output is verified, so a failed fold is undone
    exactly. The layer-by-layer check (when the final output moved) streams: one activation
    and one layer more.

    Returns:
        The same model object, folded. :func:`bnsurgery.last_report` gives the :class:`FoldReport`.

    Raises:
        VerificationError: outputs moved beyond ``tolerance``; the model was left unchanged.
        StatisticsError: a BN to fold has NaN/infinite statistics; nothing was changed.
        TraceError: the model cannot be walked.
        UnsupportedModelError: TorchScript models.

    >>> import bnsurgery
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    >>> m = fold(m, torch.randn(1, 3, 8, 8))
    >>> report = bnsurgery.last_report(m)
    >>> type(m[1]).__name__, report.bn_count, len(report.folded)
    ('FoldedBatchNorm', 1, 1)
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError("TorchScript modules cannot be folded; fold the eager model")
    was_training = any(m.training for _, m in model.named_modules() if is_batchnorm(m))
    walked = trace(model, example_inputs)
    plan = plan_fold(model, include=include, exclude=exclude, placements=placements, walked=walked)
    check_finite(((e.bn, e.holder(model)) for e in plan.edits), "fold")
    notes = []
    if was_training:
        notes.append("model was in train mode: folded with eval semantics (running statistics)")
    error: float | None = None
    tol: float | None = None
    checked = verify and example_inputs is not None and bool(plan.edits)
    if checked:
        tol = default_tolerance(walked.output) if tolerance is None else tolerance
        plan, error, txn = _verified(
            model, plan, walked.output, as_args(example_inputs), tol, tolerance is None, notes
        )
    else:
        txn = begin(model, plan)
        if plan.edits and example_inputs is None:
            notes.append("not verified: no example inputs")
    hooked = [
        e.bn
        for e in plan.edits
        if not e.collapse and not e.functional and has_hooks(model.get_submodule(e.bn))
    ]
    if hooked:
        notes.append(
            f"hooks of {', '.join(hooked)} fire on the module that replaced each BN, on the "
            "same outer tensor (its output, for a BN folded into the layer before; its input, "
            "for one folded into the layer after); the other argument is the folded value"
        )
    if plan.edits and callable(getattr(model, "fuse_model", None)):
        notes.append(
            "this model's own fuse_model() (torchvision's quantizable models) fuses conv, BN and "
            "ReLU by module type and refuses a folded BN: call it instead of fold, not after"
        )
    report = FoldReport(
        "fold",
        [e.bn for e in plan.edits],
        plan.skipped,
        notes,
        folded=plan.edits,
        method=plan.method,
        bn_count=len(plan.edits) + len(plan.skipped),
        verified=checked,
        max_rel_error=error,
        tolerance=tol,
        was_training=was_training,
    )
    set_report(model, report)
    txn.commit({**plan.step, "verified": checked, "max_rel_error": error})
    return model
