"""fold on real architectures: timm and torchvision models with random weights.

Every model is built with random init (nothing is downloaded), given random BN statistics with
``randomize_bn`` (a fresh BN is the identity, which would hide a wrong fold) and put in eval
mode. A deep copy is folded on the example inputs, and then, independently of bnsurgery's own
verification:

(a) the folded copy computes the same function: max relative error ``max|a - b| / max|a|``
    over every floating output tensor at most 1e-5;
(b) something was folded, and every BN module still in the copy is one the report lists as
    left (the counts are equal, and the report accounts for every BN of the original);
(c) every BN left has a non-empty reason;
(d) the original model was not touched: its state dict is bit-for-bit the same.

For a few models, ``torch.fx.experimental.optimization.fuse`` is the baseline: it must not fold
more BN layers than bnsurgery does.

Most models run in float32, as they are deployed. A few random-init networks are so badly
conditioned in float32 that the *unfolded* model's own float32 rounding noise (its float32
output against its float64 output) is already near or above 1e-5: activations reach 1e2..1e3
and float32 rounding is amplified through the depth, so no fold, exact or not, can be shown to
be within 1e-5 in float32. Those run in float64 (``F64`` below, with the measured noise), where
the fold's own verification is also stricter (1e-9); a wrong fold still moves the output by
orders of magnitude more than 1e-5 in either precision.

Inputs are small (64x64, batch 2; the minimum where a model needs more), so the whole module
runs in about a minute on two CPU cores.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import timm
import timm.layers
import torch
import torchvision
from torch import fx, nn
from torch.fx.experimental.optimization import fuse
from torch.nn.modules.batchnorm import _BatchNorm

import bnsurgery
from bnsurgery.testing import randomize_bn

from .measure import leaves, max_rel_error

pytestmark = pytest.mark.zoo

TOLERANCE = 1e-5
SEED = 0


# ------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One architecture: how to build it, its input, and the dtype it is checked in."""

    build: Callable[[], nn.Module]
    inputs: Callable[[torch.dtype], tuple[Any, ...]]
    dtype: torch.dtype = torch.float32


def _image(size: int = 64) -> Callable[[torch.dtype], tuple[Any, ...]]:
    def make(dtype: torch.dtype) -> tuple[Any, ...]:
        g = torch.Generator().manual_seed(SEED)
        return (torch.randn(2, 3, size, size, generator=g).to(dtype),)

    return make


def _image_list(size: int) -> Callable[[torch.dtype], tuple[Any, ...]]:
    """Detection models take a list of 3xHxW images in [0, 1]."""

    def make(dtype: torch.dtype) -> tuple[Any, ...]:
        g = torch.Generator().manual_seed(SEED)
        return ([torch.rand(3, size, size, generator=g).to(dtype) for _ in range(2)],)

    return make


def _video(frames: int, size: int) -> Callable[[torch.dtype], tuple[Any, ...]]:
    def make(dtype: torch.dtype) -> tuple[Any, ...]:
        g = torch.Generator().manual_seed(SEED)
        return (torch.randn(2, 3, frames, size, size, generator=g).to(dtype),)

    return make


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        builder = torchvision.models.get_model_builder(name)
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs.setdefault("weights_backbone", None)  # never download a backbone
        return builder(weights=None, **kwargs)

    return make


def _timm_frozen(name: str) -> Callable[[], nn.Module]:
    """A timm model with every BN (and BN-act) swapped for timm's frozen variants."""
    return lambda: timm.layers.freeze_batch_norm_2d(timm.create_model(name, pretrained=False))


F64 = torch.float64

#: id -> case. Comments on F64 cases give the unfolded model's float32-vs-float64 output
#: difference (max relative error) at the test's input, measured with SEED = 0.
CASES: dict[str, Case] = {
    # timm: residual, bottleneck, grouped, split-attention, selective-kernel, multi-scale
    "timm:resnet18": Case(_timm("resnet18"), _image()),
    "timm:resnet26d": Case(_timm("resnet26d"), _image()),
    "timm:seresnext26d_32x4d": Case(_timm("seresnext26d_32x4d"), _image()),
    "timm:resnest14d": Case(_timm("resnest14d"), _image()),
    "timm:skresnet18": Case(_timm("skresnet18"), _image()),
    "timm:res2net50_14w_8s": Case(_timm("res2net50_14w_8s"), _image()),
    "timm:tresnet_m": Case(_timm("tresnet_m"), _image()),
    # timm: mobile / NAS families, BatchNormAct2d with the activation kept after the fold
    "timm:mobilenetv2_050": Case(_timm("mobilenetv2_050"), _image()),
    "timm:mobilenetv3_small_050": Case(_timm("mobilenetv3_small_050"), _image()),
    "timm:mobilenetv4_conv_small": Case(_timm("mobilenetv4_conv_small"), _image()),
    "timm:efficientnet_b0": Case(_timm("efficientnet_b0"), _image()),
    "timm:tf_efficientnetv2_b0": Case(_timm("tf_efficientnetv2_b0"), _image(), F64),  # 3.7e-5
    "timm:mnasnet_050": Case(_timm("mnasnet_050"), _image()),
    "timm:mixnet_s": Case(_timm("mixnet_s"), _image()),
    "timm:tinynet_e": Case(_timm("tinynet_e"), _image()),
    "timm:fbnetv3_b": Case(_timm("fbnetv3_b"), _image(), F64),  # 1.0e-2
    "timm:lcnet_050": Case(_timm("lcnet_050"), _image()),
    "timm:rexnet_100": Case(_timm("rexnet_100"), _image()),
    "timm:ghostnet_100": Case(_timm("ghostnet_100"), _image()),
    "timm:ghostnetv2_100": Case(_timm("ghostnetv2_100"), _image()),
    "timm:repghostnet_050": Case(_timm("repghostnet_050"), _image()),
    "timm:hardcorenas_a": Case(_timm("hardcorenas_a"), _image()),
    # timm: RegNet, CSP / Darknet, VoVNet, DLA, DPN, DenseNet, HRNet, SelecSLS, Xception
    "timm:regnety_002": Case(_timm("regnety_002"), _image()),
    "timm:regnety_016": Case(_timm("regnety_016"), _image(), F64),  # 1.1e-4
    "timm:cspdarknet53": Case(_timm("cspdarknet53"), _image()),
    "timm:cspresnet50": Case(_timm("cspresnet50"), _image()),
    "timm:cs3darknet_focus_s": Case(_timm("cs3darknet_focus_s"), _image()),
    "timm:ese_vovnet19b_dw": Case(_timm("ese_vovnet19b_dw"), _image()),
    "timm:dla34": Case(_timm("dla34"), _image()),
    "timm:dpn68": Case(_timm("dpn68"), _image()),
    "timm:densenet121": Case(_timm("densenet121"), _image()),
    "timm:hrnet_w18_small": Case(_timm("hrnet_w18_small"), _image()),
    "timm:selecsls42b": Case(_timm("selecsls42b"), _image()),
    "timm:xception41": Case(_timm("xception41"), _image()),
    "timm:gernet_s": Case(_timm("gernet_s"), _image()),
    "timm:hgnetv2_b0": Case(_timm("hgnetv2_b0"), _image()),
    # timm: re-parameterisable and hybrid conv/attention models
    "timm:repvgg_a0": Case(_timm("repvgg_a0"), _image()),
    "timm:mobileone_s0": Case(_timm("mobileone_s0"), _image()),
    "timm:repvit_m1": Case(_timm("repvit_m1"), _image()),
    "timm:fastvit_t8": Case(_timm("fastvit_t8"), _image()),
    "timm:efficientvit_b0": Case(_timm("efficientvit_b0"), _image()),
    "timm:mobilevit_xxs": Case(_timm("mobilevit_xxs"), _image()),
    "timm:starnet_s1": Case(_timm("starnet_s1"), _image()),
    "timm:inception_next_atto": Case(_timm("inception_next_atto"), _image()),
    # timm frozen BN: FrozenBatchNorm2d and FrozenBatchNormAct2d
    "timm:mobilenetv3_small_050+frozen": Case(_timm_frozen("mobilenetv3_small_050"), _image()),
    "timm:resnet18+frozen": Case(_timm_frozen("resnet18"), _image()),
    # torchvision classification
    "torchvision:resnet18": Case(_tv("resnet18"), _image()),
    "torchvision:resnet18+frozen": Case(
        _tv("resnet18", norm_layer=torchvision.ops.FrozenBatchNorm2d), _image()
    ),
    "torchvision:resnext50_32x4d": Case(_tv("resnext50_32x4d"), _image()),
    "torchvision:wide_resnet50_2": Case(_tv("wide_resnet50_2"), _image()),
    "torchvision:densenet121": Case(_tv("densenet121"), _image()),
    "torchvision:mobilenet_v2": Case(_tv("mobilenet_v2"), _image()),
    "torchvision:mobilenet_v3_small": Case(_tv("mobilenet_v3_small"), _image()),
    "torchvision:efficientnet_b0": Case(_tv("efficientnet_b0"), _image()),
    "torchvision:efficientnet_v2_s": Case(_tv("efficientnet_v2_s"), _image()),
    "torchvision:regnet_y_400mf": Case(_tv("regnet_y_400mf"), _image()),
    "torchvision:regnet_x_400mf": Case(_tv("regnet_x_400mf"), _image()),
    "torchvision:shufflenet_v2_x0_5": Case(_tv("shufflenet_v2_x0_5"), _image()),
    "torchvision:mnasnet0_5": Case(_tv("mnasnet0_5"), _image()),
    "torchvision:googlenet": Case(_tv("googlenet"), _image()),
    "torchvision:inception_v3": Case(_tv("inception_v3"), _image(75)),  # 75x75 is its minimum
    "torchvision:vgg11_bn": Case(_tv("vgg11_bn"), _image()),
    "torchvision:quantized_mobilenet_v2": Case(_tv("quantized_mobilenet_v2"), _image()),
    # torchvision segmentation (dict outputs), detection (list inputs and outputs), video (3D)
    "torchvision:lraspp_mobilenet_v3_large": Case(_tv("lraspp_mobilenet_v3_large"), _image()),
    "torchvision:deeplabv3_mobilenet_v3_large": Case(_tv("deeplabv3_mobilenet_v3_large"), _image()),
    "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn": Case(
        # float64 so that NMS and top-k keep exactly the same boxes; every box is kept
        _tv("fasterrcnn_mobilenet_v3_large_320_fpn", box_score_thresh=0.0),
        _image_list(128),
        F64,
    ),
    "torchvision:r3d_18": Case(_tv("r3d_18"), _video(4, 32)),
    "torchvision:r2plus1d_18": Case(_tv("r2plus1d_18"), _video(4, 32)),
}

#: cases compared with torch.fx's conv-BN fusion (all trace symbolically)
FX_CASES = [
    "torchvision:resnet18",
    "timm:resnet18",
    "torchvision:densenet121",
    "torchvision:googlenet",
    "torchvision:regnet_y_400mf",
    "torchvision:mobilenet_v3_small",
    "torchvision:shufflenet_v2_x0_5",
    "timm:dla34",
]


# ----------------------------------------------------------------------------- helpers


def _is_bn(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, _BatchNorm) or (name.startswith("Frozen") and "BatchNorm" in name)


def _bn_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if _is_bn(m))


def _prepared(case: Case) -> nn.Module:
    torch.manual_seed(SEED)
    model = case.build()
    randomize_bn(model, SEED)
    return model.to(case.dtype).eval()


def _run(model: nn.Module, args: tuple[Any, ...]) -> Any:
    with torch.no_grad():
        return model(*args)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------- tests


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these inputs are too small to gain from more, and on a busy
    two-core machine two spinning OpenMP threads made the module 4-8x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(CASES))
def test_fold_real_architecture(name):
    case = CASES[name]
    model = _prepared(case)
    args = case.inputs(case.dtype)
    bn_before = _bn_count(model)
    assert bn_before > 0, "zoo cases must have BN layers"
    reference = _run(model, args)
    floats = [t for t in leaves(reference) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert floats and all(t.isfinite().all() for t in floats), "the reference must be finite"
    state = _snapshot(model)

    folded = bnsurgery.fold(copy.deepcopy(model), args)
    report = bnsurgery.last_report(folded)
    assert report is not None

    # (a) same function, measured here rather than trusted from the report
    error = max_rel_error(reference, _run(folded, args))
    assert error <= TOLERANCE, f"max relative error {error:.3g} > {TOLERANCE}"

    # (b) something folded; the BN modules left are exactly the ones the report lists
    assert len(report.folded) > 0
    assert _bn_count(folded) == len(report.left)
    assert report.bn_count == bn_before == len(report.folded) + len(report.left)
    remaining = {n for n, m in folded.named_modules() if _is_bn(m)}
    assert remaining == {s.bn for s in report.left}

    # (c) every BN left says why
    assert all(isinstance(s.reason, str) and s.reason.strip() for s in report.left)

    # (d) the fold worked on the copy: the original is bit-for-bit unchanged
    after = model.state_dict()
    assert after.keys() == state.keys()
    changed = [k for k, v in state.items() if not torch.equal(v, after[k])]
    assert not changed, f"the original model changed: {changed[:5]}"
    assert _bn_count(model) == bn_before


def _bn_call_targets(graph_module: fx.GraphModule) -> set[str]:
    modules = dict(graph_module.named_modules())
    return {
        str(n.target)
        for n in graph_module.graph.nodes
        if n.op == "call_module" and _is_bn(modules[str(n.target)])
    }


@pytest.mark.parametrize("name", FX_CASES)
def test_fx_fuse_folds_no_more_than_we_do(name):
    case = CASES[name]
    model = _prepared(case)
    args = case.inputs(case.dtype)
    try:
        traced = fx.symbolic_trace(copy.deepcopy(model))
        fused = fuse(model, inplace=False)
    except Exception as exc:  # the baseline cannot trace it: nothing to compare
        pytest.skip(f"torch.fx cannot trace {name}: {type(exc).__name__}")
    fx_folded = len(_bn_call_targets(traced) - _bn_call_targets(fused))
    fx_left = _bn_count(model) - fx_folded

    folded = bnsurgery.fold(copy.deepcopy(model), args)
    ours_left = _bn_count(folded)
    assert ours_left <= fx_left, f"fx fuse leaves {fx_left} BN, bnsurgery {ours_left}"
    assert max_rel_error(_run(model, args), _run(fused, args)) <= TOLERANCE


# ------------------------------------------------------- freeze and swap on the same zoo set


@pytest.mark.parametrize("name", list(CASES))
def test_freeze_round_trip_and_train_mode_on_real_architecture(name):
    """freeze: each frozen BN's train-mode output equals its eval output on the inputs it
    really sees; the model's eval output is unchanged; unfreeze restores the state exactly."""
    case = CASES[name]
    model = _prepared(case)
    args = case.inputs(case.dtype)
    original = _snapshot(model)
    reference = _run(model, args)
    bnsurgery.freeze(model)
    assert max_rel_error(reference, _run(model, args)) == 0.0
    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, a, out: seen.append((mod, a[0].clone(), out.clone())))
        for m in model.modules()
        if isinstance(m, bnsurgery.FrozenBatchNorm)
    ]
    for m in model.modules():  # only the frozen BN in train mode: aux heads and detector
        if isinstance(m, bnsurgery.FrozenBatchNorm):  # losses stay out of the way
            m.train()
    _run(model, args)
    assert seen or not hooks  # none when the model only had torchvision/timm frozen BN
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for module, inp, out in seen:
            assert module.training
            assert torch.equal(module.eval()(inp), out)
    bnsurgery.unfreeze(model)
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], v) for k, v in original.items())


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n].dtype == torch.float32][:40])
def test_swap_to_groupnorm_and_frozen_on_real_architecture(name):
    """swap: to groupnorm no BN is left and output shapes hold; to frozen the eval output is
    identical."""
    case = CASES[name]
    model = _prepared(case)
    args = case.inputs(case.dtype)
    reference = _run(model, args)
    frozen = bnsurgery.swap(copy.deepcopy(model), "frozen")
    assert max_rel_error(reference, _run(frozen, args)) == 0.0
    if isinstance(args[0], list):
        return  # detection outputs vary in length with the norm: shapes are not comparable
    swapped = bnsurgery.swap(copy.deepcopy(model), "groupnorm")
    assert _bn_count(swapped) == sum(
        1 for m in swapped.modules() if type(m).__name__.startswith("Frozen")
    )
    out = _run(swapped, args)
    ref_shapes = [t.shape for t in leaves(reference) if isinstance(t, torch.Tensor)]
    assert [t.shape for t in leaves(out) if isinstance(t, torch.Tensor)] == ref_shapes


#: the zoo's fused freeze: classification, mobile and grouped, dense, dual-path, video
FUSED_CASES = [
    "timm:resnet18",
    "timm:seresnext26d_32x4d",
    "timm:mobilenetv3_small_050",
    "timm:efficientnet_b0",
    "timm:regnety_002",
    "timm:densenet121",
    "timm:dpn68",
    "timm:repvgg_a0",
    "timm:hrnet_w18_small",
    "torchvision:resnet18",
    "torchvision:mobilenet_v2",
    "torchvision:googlenet",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:r3d_18",
]


@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_freeze_has_the_gradients_of_a_plain_freeze(name):
    """freeze(fuse=True, train_affine=True) against a plain freeze, in float64, on one
    training step: the same outputs and the same gradient for every parameter; frozen BNs
    fused, each of the others with a reason."""
    case = CASES[name]
    model = _prepared(case).double()
    args = case.inputs(torch.float64)
    plain = bnsurgery.freeze(copy.deepcopy(model), train_affine=True)
    fused = bnsurgery.freeze(
        copy.deepcopy(model), train_affine=True, fuse=True, example_inputs=args
    )
    report = bnsurgery.last_report(fused)
    assert report.fused and all(s.reason for s in report.unfused)  # densenet121: 59 of 121
    outputs = []
    for m in (plain, fused):
        torch.manual_seed(0)  # the same dropout masks
        out = m.train()(*args)
        sum(t.square().mean() for t in leaves(out) if isinstance(t, torch.Tensor)).backward()
        outputs.append(out)
    assert max_rel_error(*[tuple(leaves(o)) for o in outputs]) < 1e-10
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    scale = max(float(g.abs().max()) for g in grads.values())
    for n, q in fused.named_parameters():
        assert (q.grad is None) == (n not in grads), n
        if n in grads:
            assert float((grads[n] - q.grad).abs().max()) <= 1e-9 * scale, n
