"""Every surgery on Hugging Face ``transformers`` families and on torchvision's Mask R-CNN.

Users bring these models as they come: built from a config object, called as
``model(pixel_values=x)`` (an audio model: ``input_values``) and returning a ``ModelOutput``
dataclass (Mask R-CNN: a list of images in, a list of detection dicts out). The families cover
BN after convs, BatchNorm1d on flattened tokens (N * L, C), on pooled features (N, C) and on
sequences (N, C, L), a pooled (N, C, 1, 1) branch, BN a model builds and never calls (DPT),
Hugging Face's own frozen BN (DETR) and detection heads fed empty batches (Mask R-CNN without
detections). Each is built small from its config with random weights (nothing is downloaded)
and prepared so that a wrong result shows:

* conv and linear weights are redrawn variance-preserving, N(0, 1/fan_in): with the
  ``initializer_range=0.02`` init most of these models use, activations shrink about
  a hundredfold per layer and changing an early BN does not move the output by one ulp;
* every BN gets a random affine map (``randomize_bn``) and running statistics close to those
  of the data it sees (``match_bn_to_data``), as after training;
* dropout and stochastic depth are off (in the configs, and p=0 where a module hard-codes it),
  so train mode differs from eval mode only where a BN normalises with batch statistics.

``test_every_bn_reaches_what_is_compared`` proves it: moving any one BN's statistics moves what
the tests compare (the model's outputs, and the outputs of submodules whose result the model
does not return, such as DPT's auxiliary head) by far more than any tolerance used here.

Then each family goes through the public API: fold (close in float32, exact in float64),
freeze (the same eval output, train output equal to eval output, a train step at batch size 1
that leaves the statistics alone), unfreeze (exactly the original), swap to groupnorm and
layernorm (with and without calibration) and to frozen (exact), recalibrate (against
first-principles moments, in float64) and survey; each followed by a train-mode forward and a
save/load round trip. A model built from a config object has no importable name, so the files
name the factory below, ``tests.test_families:family(name='resnet')``, and loading names that
factory again (``arch="tests.test_families:family"``), as the README says for
``package.module:factory`` architectures.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnsurgery
from bnsurgery.testing import match_bn_to_data, randomize_bn

transformers = pytest.importorskip("transformers")
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d  # noqa: E402

pytestmark = pytest.mark.families

SEED = 0
DETR_EPS = 1e-5  # DetrFrozenBatchNorm2d hard-codes its epsilon in forward()
FACTORY = "tests.test_families:family"


# ------------------------------------------------------------------------------ families


@dataclass(frozen=True)
class Family:
    """One architecture as a user builds and calls it."""

    build: Callable[[], nn.Module]
    sample: tuple[int, ...] = (3, 32, 32)  # the shape of one input
    key: str = "pixel_values"  # the keyword users pass the inputs by
    watch: tuple[str, ...] = ()  # submodules whose output is compared too (the model drops it)
    uncalled: tuple[str, ...] = ()  # BNs the model builds and never calls
    detection: bool = False  # torchvision detection: a list of images, targets in train mode
    weights_from: str | None = None  # the same architecture deployed otherwise: its weights


_RESNET = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
_MOBILEVIT = {
    "patch_size": 2,
    "hidden_sizes": [16, 24, 32],
    "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 40],
    "num_attention_heads": 2,
    "hidden_dropout_prob": 0.0,
    "classifier_dropout_prob": 0.0,
    "num_labels": 3,
}


def _resnet() -> nn.Module:
    config = transformers.ResNetConfig(**_RESNET, layer_type="bottleneck", num_labels=3)
    return transformers.ResNetForImageClassification(config)


def _regnet() -> nn.Module:
    config = transformers.RegNetConfig(**_RESNET, groups_width=4, layer_type="y", num_labels=3)
    return transformers.RegNetForImageClassification(config)


def _mobilenet_v1() -> nn.Module:
    config = transformers.MobileNetV1Config(
        depth_multiplier=0.25, min_depth=4, image_size=32, classifier_dropout_prob=0.0,
        num_labels=3,
    )  # fmt: skip
    return transformers.MobileNetV1ForImageClassification(config)


def _mobilenet_v2() -> nn.Module:
    config = transformers.MobileNetV2Config(
        depth_multiplier=0.25, min_depth=4, image_size=32, classifier_dropout_prob=0.0,
        num_labels=3,
    )  # fmt: skip
    return transformers.MobileNetV2ForImageClassification(config)


def _mobilevit() -> nn.Module:
    config = transformers.MobileViTConfig(image_size=32, **_MOBILEVIT)
    return transformers.MobileViTForImageClassification(config)


def _mobilevit_segmentation() -> nn.Module:
    """DeepLabV3 head: its ASPP pooling branch normalises (N, C, 1, 1)."""
    config = transformers.MobileViTConfig(
        image_size=64, aspp_out_channels=16, aspp_dropout_prob=0.0, **_MOBILEVIT
    )
    return transformers.MobileViTForSemanticSegmentation(config)


def _efficientnet() -> nn.Module:
    config = transformers.EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
        hidden_dim=320,  # must equal round_filters(config, 1280) for the top BN
        dropout_rate=0.0, drop_connect_rate=0.0, num_labels=3,
    )  # fmt: skip
    return transformers.EfficientNetForImageClassification(config)


def _levit() -> nn.Module:
    """BatchNorm1d on the flattened tokens (N * L, C) and on the pooled features (N, C)."""
    config = transformers.LevitConfig(
        image_size=64, patch_size=16, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2],
        depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=3,
    )  # fmt: skip
    return transformers.LevitForImageClassification(config)


def _dpt() -> nn.Module:
    """BN in the fusion residuals, the segmentation head and the auxiliary head; the first
    fusion layer builds a residual layer (with two BNs) that it never calls."""
    config = transformers.DPTConfig(
        image_size=64, patch_size=16, hidden_size=16, num_hidden_layers=4,
        num_attention_heads=2, intermediate_size=32, backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, head_hidden_size=8,
        use_batch_norm_in_fusion_residual=True, semantic_classifier_dropout=0.0, num_labels=3,
    )  # fmt: skip
    return transformers.DPTForSemanticSegmentation(config)


def _cvt() -> nn.Module:
    """BN in every convolutional query, key and value projection. The base model: the
    classifier reads only the class token, which no query projection of the last stage
    reaches. CvT indexes its drop-path rates by stage, so stage i needs more than i layers."""
    config = transformers.CvtConfig(
        embed_dim=[8, 16, 24], num_heads=[1, 2, 2], depth=[1, 2, 3],
        drop_path_rate=[0.0, 0.0, 0.0],
    )  # fmt: skip
    return transformers.CvtModel(config)


def _detr() -> nn.Module:
    """DETR turns its backbone's BatchNorm2d into DetrFrozenBatchNorm2d."""
    backbone = transformers.ResNetConfig(**_RESNET, out_features=["stage2"])
    config = transformers.DetrConfig(
        backbone_config=backbone, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
        decoder_attention_heads=2, num_queries=5, dropout=0.0, num_labels=3,
    )  # fmt: skip
    return transformers.DetrForObjectDetection(config)


def _wav2vec2_conformer() -> nn.Module:
    """Audio: the conformer's convolution module normalises (N, C, L) with BatchNorm1d."""
    config = transformers.Wav2Vec2ConformerConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, conv_depthwise_kernel_size=3, vocab_size=8,
        position_embeddings_type="relative", hidden_dropout=0.0, activation_dropout=0.0,
        attention_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
        mask_time_prob=0.0,
    )  # fmt: skip
    return transformers.Wav2Vec2ConformerForCTC(config)


def _mask_rcnn(version: str, detections: bool) -> Callable[[], nn.Module]:
    """Mask R-CNN at 64 px with few proposals. A score threshold of 1 lets no box through, so
    the mask head gets empty batches; 0 keeps one detection per image."""
    builder = {
        "v1": torchvision.models.detection.maskrcnn_resnet50_fpn,
        "v2": torchvision.models.detection.maskrcnn_resnet50_fpn_v2,  # BN in both heads
    }[version]

    def build() -> nn.Module:
        return builder(
            weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64,
            rpn_pre_nms_top_n_test=20, rpn_post_nms_top_n_test=5, rpn_pre_nms_top_n_train=20,
            rpn_post_nms_top_n_train=10, box_batch_size_per_image=8, box_detections_per_img=1,
            box_score_thresh=0.0 if detections else 1.0,
        )  # fmt: skip

    return build


_DPT_UNCALLED = tuple(f"neck.fusion_stage.layers.0.residual_layer1.batch_norm{i}" for i in (1, 2))

FAMILIES: dict[str, Family] = {
    "resnet": Family(_resnet),
    "regnet": Family(_regnet),
    "mobilenet_v1": Family(_mobilenet_v1),
    "mobilenet_v2": Family(_mobilenet_v2),
    "mobilevit": Family(_mobilevit),
    "efficientnet": Family(_efficientnet),
    "levit": Family(_levit, sample=(3, 64, 64)),
    "dpt": Family(_dpt, sample=(3, 64, 64), watch=("auxiliary_head",), uncalled=_DPT_UNCALLED),
    "cvt": Family(_cvt),
    "detr": Family(_detr),
    "mobilevit_segmentation": Family(_mobilevit_segmentation, sample=(3, 64, 64)),
    "wav2vec2_conformer": Family(_wav2vec2_conformer, sample=(400,), key="input_values"),
    "mask_rcnn": Family(
        _mask_rcnn("v1", True), sample=(3, 64, 64), watch=("backbone",), detection=True
    ),
    # recalibration only: the mask head without detections, and heads with BN
    "mask_rcnn_no_detections": Family(
        _mask_rcnn("v1", False), sample=(3, 64, 64), detection=True, weights_from="mask_rcnn"
    ),
    "mask_rcnn_v2": Family(_mask_rcnn("v2", True), sample=(3, 64, 64), detection=True),
    "mask_rcnn_v2_no_detections": Family(
        _mask_rcnn("v2", False), sample=(3, 64, 64), detection=True, weights_from="mask_rcnn_v2"
    ),
}
SURGERY = [name for name in FAMILIES if not name.startswith("mask_rcnn_")]


def family(name: str) -> nn.Module:
    """The factory that saved files name, ``tests.test_families:family(name='resnet')``.

    Dropout modules that ignore the config (DPT's auxiliary head hard-codes p=0.1) get p=0.
    """
    model = FAMILIES[name].build()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


# ------------------------------------------------------------------------- preparation


@torch.no_grad()
def _lively(model: nn.Module, seed: int) -> nn.Module:
    """Redraw conv and linear weights N(0, 1/fan_in) and biases N(0, 0.1), in place."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            weight = module.weight
            weight.copy_(torch.randn(weight.shape, generator=g) / math.sqrt(weight[0].numel()))
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
    return model


def inputs(fam: Family, n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` samples (images, or audio); detection models take pixels in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *fam.sample, generator=g)
    return (x.sigmoid() if fam.detection else x).to(dtype)


def example(fam: Family, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return inputs(fam, 2, seed=1, dtype=dtype)


@functools.cache
def _prepared(name: str) -> nn.Module:
    fam = FAMILIES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = family(name).eval()
    if fam.weights_from is not None:  # a head fed no data gets no statistics from data
        model.load_state_dict(_prepared(fam.weights_from).state_dict())
        return model
    _lively(model, SEED)
    randomize_bn(model, SEED)
    # statistics from more images than a test feeds: the last stages of these small models
    # see 1x1 maps, and a variance over two values can be nearly zero (then the model
    # amplifies float32 rounding a millionfold)
    return match_bn_to_data(model, positional(fam, inputs(fam, 8, seed=4)), SEED)


def prepared(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh copy of the prepared model, in eval mode."""
    return copy.deepcopy(_prepared(name)).to(dtype)


# ----------------------------------------------------------------- calling and comparing


def positional(fam: Family, x: torch.Tensor) -> tuple[Any, ...]:
    """The example inputs of fold and survey: positional arguments (``pixel_values`` is the
    first parameter of every Hugging Face vision model, ``input_values`` of audio models)."""
    return (list(x),) if fam.detection else (x,)


def call(model: nn.Module, fam: Family, x: torch.Tensor) -> Any:
    """Call the model as its users do."""
    return model(list(x)) if fam.detection else model(**{fam.key: x})


def batch(fam: Family, x: torch.Tensor) -> Any:
    """A data batch as users feed recalibrate and swap: ``{"pixel_values": x}`` (fed as keyword
    arguments), or a list of images."""
    return list(x) if fam.detection else {fam.key: x}


def feed(fam: Family) -> Callable[[nn.Module, Any], Any] | None:
    """``forward=`` for a detection model (the default feeds a list's first element)."""
    return (lambda model, images: model(images)) if fam.detection else None


def data(fam: Family, dtype: torch.dtype = torch.float32) -> list[Any]:
    """Two batches of uneven size (3 and 2 images; 2 and 1 for the costlier Mask R-CNN)."""
    first, second = (2, 1) if fam.detection else (3, 2)
    return [batch(fam, inputs(fam, first, 2, dtype)), batch(fam, inputs(fam, second, 3, dtype))]


def flat(value: Any) -> list[torch.Tensor]:
    """Every tensor in a model output: ``ModelOutput`` fields (it is a mapping), detection
    dicts, lists and tuples, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in flat(v)]
    return []


def observe(model: nn.Module, fam: Family, x: torch.Tensor) -> list[torch.Tensor]:
    """What the tests compare: every tensor the model returns, then the outputs of the
    family's watched submodules, from one forward pass."""
    seen: list[Any] = []
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, args, out: seen.append(out))
        for name in fam.watch
    ]
    try:
        with torch.no_grad():
            out = call(model, fam, x)
    finally:
        for handle in handles:
            handle.remove()
    return flat(out) + flat(seen)


def features(model: nn.Module, fam: Family, x: torch.Tensor) -> list[torch.Tensor]:
    """A detection model's backbone (with FPN) outputs on the transformed images: what train
    mode and eval mode share (in train mode the model itself returns losses)."""
    with torch.no_grad():
        return flat(model.backbone(model.transform(list(x))[0].tensors))


def error(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """Largest ``max|a - b| / max|a|`` over the tensors; ``inf`` when a shape or an integer
    tensor (detection labels) differs."""
    assert len(reference) == len(candidate)
    worst = 0.0
    for a, b in zip(reference, candidate, strict=True):
        if a.shape != b.shape:
            return math.inf
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return math.inf
            continue
        if a.numel():
            a, b = a.double(), b.double()
            scale = float(a.abs().max())
            worst = max(worst, float((a - b).abs().max()) / max(scale, 1e-300))
    return worst


def assert_same(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> None:
    assert len(reference) == len(candidate)
    for i, (a, b) in enumerate(zip(reference, candidate, strict=True)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output tensor {i} differs"


def is_bn(module: nn.Module) -> bool:
    """BatchNorm as these models hold it, known here without bnsurgery's help."""
    return isinstance(module, _BatchNorm | DetrFrozenBatchNorm2d)


def bn_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_bn(module)]


def native_names(model: nn.Module) -> list[str]:
    """The BNs bnsurgery can freeze: all but those the model already froze (DETR's)."""
    return [
        n for n, m in model.named_modules() if is_bn(m) and not isinstance(m, DetrFrozenBatchNorm2d)
    ]


def called_bns(model: nn.Module, fam: Family, x: torch.Tensor) -> set[str]:
    called: set[str] = set()
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: called.add(n))
        for n in bn_names(model)
    ]
    try:
        observe(model, fam, x)
    finally:
        for handle in handles:
            handle.remove()
    return called


def targets(fam: Family, n: int) -> list[dict[str, torch.Tensor]]:
    """One box and its mask per image, for a detection model in train mode."""
    s = fam.sample[-1]
    mask = torch.zeros(1, s, s, dtype=torch.uint8)
    mask[:, s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1
    box = torch.tensor([[s / 4, s / 4, 3 * s / 4, 3 * s / 4]])
    return [{"boxes": box, "labels": torch.tensor([1]), "masks": mask} for _ in range(n)]


def train_loss(model: nn.Module, fam: Family, x: torch.Tensor) -> torch.Tensor:
    """A loss from a train-mode forward pass: the detection losses, or the mean square of
    every floating output."""
    model.train()
    if fam.detection:
        return sum(model(list(x), targets(fam, len(x))).values())
    outputs = [t for t in flat(call(model, fam, x)) if t.is_floating_point()]
    return sum(t.square().mean() for t in outputs)


def runs_in_train_mode(model: nn.Module, fam: Family, x: torch.Tensor) -> None:
    """A train-mode forward pass gives finite values; the model goes back to eval mode."""
    with torch.no_grad():
        loss = train_loss(model, fam, x)
    model.eval()
    assert torch.isfinite(loss), float(loss)


def round_trip(model: nn.Module, name: str, x: torch.Tensor, tmp_path) -> nn.Module:
    """Save with ``bnsurgery.save`` and load with ``bnsurgery.load``: the same modules, and
    bit-for-bit the same outputs."""
    fam = FAMILIES[name]
    model.eval()
    path = bnsurgery.save(model, tmp_path / f"{name}.safetensors", arch=f"{FACTORY}(name={name!r})")
    loaded = bnsurgery.load(path, arch=FACTORY)  # the file's recorded options are used
    assert not loaded.training
    assert modules(loaded) == modules(model)
    assert_same(observe(model, fam, x), observe(loaded, fam, x))
    return loaded


def modules(model: nn.Module) -> list[tuple[str, str, bool]]:
    """Each module's name, class name and training flag (by name: ``weight_norm`` makes a
    class per instance, ``ParametrizedConv1d``)."""
    return [(n, type(m).__name__, m.training) for n, m in model.named_modules()]


def bn_state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of the named modules."""
    return {
        f"{n}.{k}": t.detach().clone()
        for n in names
        for k, t in [
            *model.get_submodule(n).named_parameters(recurse=False),
            *model.get_submodule(n).named_buffers(recurse=False),
        ]
    }


# -------------------------------------------------------------------------------- tests


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny, so a second intra-op thread buys nothing; on two CPU cores
    shared with other processes its spin-waiting made forward passes 10 to 100 times slower
    (mobilenet_v2: 9 ms with one thread, 0.1 to 1 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _forget_prepared_models():
    """The prepared models (four Mask R-CNNs among them) are kept while this module runs."""
    yield
    _prepared.cache_clear()


@pytest.mark.parametrize("name", SURGERY)
def test_every_bn_reaches_what_is_compared(name):
    """Moving one BN's statistics (mean by half a standard deviation, variance by 2.25x) moves
    what the tests compare by more than 1e-2: a wrong fold, freeze or swap of any BN shows."""
    fam = FAMILIES[name]
    model = prepared(name)
    x = example(fam)
    called = called_bns(model, fam, x)
    assert set(bn_names(model)) - called == set(fam.uncalled)
    x = x[:1]  # one image is enough, and the check runs one forward pass per BN
    if fam.detection:  # every BN is in the backbone, whose output is compared: check there
        assert all(n.startswith("backbone.") for n in called) and "backbone" in fam.watch
        x = x[..., ::2, ::2]  # at half size: Mask R-CNN costs the most

        def look() -> list[torch.Tensor]:
            with torch.no_grad():
                return flat(model.backbone(x))
    else:

        def look() -> list[torch.Tensor]:
            return observe(model, fam, x)

    reference = look()
    for n in sorted(called):
        bn = model.get_submodule(n)
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        with torch.no_grad():
            bn.running_mean.add_(0.5 * var.sqrt())
            bn.running_var.mul_(2.25)
        moved = error(reference, look())
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        assert moved > 1e-2, f"{n}: its statistics move the output by only {moved:.2g}"


def fold_tolerance(model: nn.Module, fam: Family, x: torch.Tensor) -> float:
    """How close a fold must come: 1e-10 in float64; in float32, 1e-5 or four times the
    model's own rounding noise (its float32 output against its float64 output), whichever is
    larger: folding rounds every folded weight once, so it cannot beat that. The noise must be
    small, so the tolerance (at most 1e-3) stays ten times below what any BN moves the output
    by (over 1e-2)."""
    if x.dtype == torch.float64:
        return 1e-10
    wide = copy.deepcopy(model).double()
    noise = error(observe(wide, fam, x.double()), observe(model, fam, x))
    assert noise <= 2.5e-4, f"the model's own float32 rounding noise is {noise:.2g}"
    return max(1e-5, 4 * noise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", SURGERY)
def test_fold(name, dtype, tmp_path):
    fam = FAMILIES[name]
    model = prepared(name, dtype)
    x = example(fam, dtype)
    original = copy.deepcopy(model)
    tolerance = fold_tolerance(original, fam, x)
    names = bn_names(model)
    bnsurgery.fold(model, positional(fam, x))
    report = bnsurgery.last_report(model)
    folded = [e.bn for e in report.folded]
    left = {s.bn: s.reason for s in report.left}
    assert folded and report.verified and report.bn_count == len(names)
    assert sorted(folded + list(left)) == sorted(names)
    assert set(bn_names(model)) == set(left)  # the BNs still there are those reported left
    assert all(left.values())
    for n in fam.uncalled:
        assert "not called" in left[n]
    err = error(observe(original, fam, x), observe(model, fam, x))
    assert err <= tolerance, f"max relative error {err:.3g} > {tolerance:.3g}"
    if dtype == torch.float32:  # float64 files: see test_a_float64_model_loads_back_in_float64
        round_trip(model, name, x, tmp_path)
    runs_in_train_mode(model, fam, x)


#: one format each, taking turns (test_export.py runs both on every model it has)
EXPORTS = [
    (name, "pt2" if FAMILIES[name].detection else ("onnx", "pt2")[i % 2])  # pt2 refuses faster
    for i, name in enumerate(SURGERY)
]


@pytest.mark.parametrize("name, fmt", EXPORTS, ids=[f"{n}-{f}" for n, f in EXPORTS])
def test_export(name, fmt, tmp_path):
    """Each family deploys in one step: every BN folded or lowered, none in the artifact, and
    the file, read back here by its own runtime, returns what ``model(pixel_values=x)`` does
    (a ``ModelOutput``'s tensors, in order), at the example's batch size and another. A
    detector with data-dependent post-processing is refused in one line saying where."""
    from torch.utils._pytree import tree_leaves

    from bnsurgery.errors import UnsupportedModelError

    from .test_export import batch_norm_nodes, run_artifact

    fam = FAMILIES[name]
    model, x = prepared(name), example(fam)
    path = tmp_path / f"m.{fmt}"
    if fam.detection:
        with pytest.raises(UnsupportedModelError, match=r"data-dependent .*\(at torchvision/"):
            bnsurgery.export(model, positional(fam, x), path, count_before=False)
        assert not path.exists()
        return
    report = bnsurgery.export(model, positional(fam, x), path, count_before=False)
    assert report.bn_count == len(report.folded) + len(report.lowered) == len(bn_names(model))
    assert not batch_norm_nodes(path)
    tolerance = max(report.tolerance, fold_tolerance(model, fam, x))
    for sample in (x, inputs(fam, 3, seed=5)):
        with torch.no_grad():
            want = [t for t in tree_leaves(call(model, fam, sample)) if t is not None]
        got = run_artifact(path, sample)
        assert error(want, got) <= tolerance


def test_a_float64_model_loads_back_in_float64(tmp_path):
    """A float64 fold saved with bnsurgery.save holds float64 tensors; bnsurgery.load must not
    round them into a float32 build of the architecture."""
    fam = FAMILIES["resnet"]
    x = example(fam, torch.float64)
    model = bnsurgery.fold(prepared("resnet", torch.float64), positional(fam, x))
    path = bnsurgery.save(model, tmp_path / "f64.safetensors", arch=f"{FACTORY}(name='resnet')")
    loaded = bnsurgery.load(path, arch=FACTORY)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert_same(observe(model, fam, x), observe(loaded, fam, x))


FREEZES = [*((name, False) for name in SURGERY), ("levit", True), ("mobilevit_segmentation", True)]


@pytest.mark.parametrize(
    "name, train_affine", FREEZES, ids=[n + ("-affine_trained" * a) for n, a in FREEZES]
)
def test_freeze(name, train_affine, tmp_path):
    fam = FAMILIES[name]
    model = prepared(name)
    x = example(fam)
    names, native = bn_names(model), native_names(model)
    before = observe(model, fam, x)
    bnsurgery.freeze(model, train_affine=train_affine)
    report = bnsurgery.last_report(model)
    assert report.changed == native
    assert {n for n, _ in report.left} == set(names) - set(native)  # the model's own frozen BN
    assert all(
        isinstance(model.get_submodule(n), bnsurgery.FrozenBatchNorm | DetrFrozenBatchNorm2d)
        for n in names
    )
    assert_same(before, observe(model, fam, x))
    model.train()  # frozen BN ignores it: train-mode output is the eval output
    if fam.detection:
        eval_features = features(model.eval(), fam, x)
        assert_same(eval_features, features(model.train(), fam, x))
    else:
        assert_same(before, observe(model, fam, x))

    # one fine-tuning step at batch size 1
    statistics = {k: v for k, v in bn_state(model, names).items() if "running" in k}
    affine = {k: v for k, v in bn_state(model, names).items() if k.endswith(("weight", "bias"))}
    others = {
        k: p.detach().clone()
        for k, p in model.named_parameters()
        if p.requires_grad and k not in affine
    }
    train_loss(model, fam, x[:1]).backward()
    torch.optim.SGD(bnsurgery.trainable_parameters(model), lr=1e-3).step()
    after = bn_state(model, names)
    for key, value in statistics.items():
        assert torch.equal(after[key], value), key
    affine_moved = [k for k, v in affine.items() if not torch.equal(after[k], v)]
    native_affine = [k for k in affine if k.rsplit(".", 1)[0] in native]
    assert set(affine_moved) <= set(native_affine)
    assert bool(affine_moved) is (train_affine and bool(native)), affine_moved
    trained = dict(model.named_parameters())
    assert any(not torch.equal(trained[k], v) for k, v in others.items())

    loaded = round_trip(model, name, x, tmp_path)
    runs_in_train_mode(loaded, fam, x)


@pytest.mark.parametrize("name", SURGERY)
def test_unfreeze_gives_back_exactly_the_original(name, tmp_path):
    fam = FAMILIES[name]
    original = prepared(name)
    model = copy.deepcopy(original)
    x = example(fam)
    bnsurgery.unfreeze(bnsurgery.freeze(model))
    assert bnsurgery.last_report(model).changed == native_names(original)
    assert modules(model) == modules(original)
    state, reference = model.state_dict(), original.state_dict()
    assert list(state) == list(reference)
    for key, value in reference.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == [
        (n, p.requires_grad) for n, p in original.named_parameters()
    ]
    assert_same(observe(original, fam, x), observe(model, fam, x))
    round_trip(model, name, x, tmp_path)
    runs_in_train_mode(model, fam, x)  # BN in train mode again, at batch size 2


SWAPS = {
    "groupnorm": ("groupnorm", False),
    "groupnorm_calibrated": ("groupnorm", True),
    "layernorm": ("layernorm", False),
    "layernorm_calibrated": ("layernorm", True),
    "frozen": ("frozen", False),
}
_SWAPPED_TYPE = {
    "groupnorm": nn.GroupNorm,
    "layernorm": nn.LayerNorm,
    "frozen": bnsurgery.FrozenBatchNorm,
}


@pytest.mark.parametrize("swap", list(SWAPS))
@pytest.mark.parametrize("name", SURGERY)
def test_swap(name, swap, tmp_path):
    target, calibrated = SWAPS[swap]
    fam = FAMILIES[name]
    original, model = prepared(name), prepared(name)
    x = example(fam)
    names = bn_names(model)
    before = observe(model, fam, x)
    options = {"calibrate": data(fam), "forward": feed(fam)} if calibrated else {}
    bnsurgery.swap(model, target, **options)
    report = bnsurgery.last_report(model)
    left = dict(report.left)
    if target == "frozen":  # the model's own frozen BN stays
        assert set(left) == set(names) - set(native_names(original))
    else:
        assert not left
    assert [s.bn for s in report.swapped] == [n for n in names if n not in left]
    for s in report.swapped:
        new, bn = model.get_submodule(s.bn), original.get_submodule(s.bn)
        assert isinstance(new, _SWAPPED_TYPE[target]), s
        if not calibrated:  # each BN's scale and shift are kept
            assert torch.equal(new.weight.reshape(-1), bn.weight.reshape(-1)), s.bn
            assert torch.equal(new.bias.reshape(-1), bn.bias.reshape(-1)), s.bn
    assert not [n for n in bn_names(model) if n not in left]
    after = observe(model, fam, x)
    if target == "frozen":
        assert_same(before, after)
    assert all(torch.isfinite(t).all() for t in after if t.is_floating_point())
    if calibrated:
        for s in report.swapped:
            if s.bn in fam.uncalled:  # no data reaches it: nothing to fit
                assert s.fit_error_after is None, s
                continue
            assert s.fit_error_before is not None and s.fit_error_after is not None, s
            assert s.fit_error_after <= s.fit_error_before * (1 + 1e-6) + 1e-7, s
    round_trip(model, name, x, tmp_path)
    runs_in_train_mode(model, fam, x)


@pytest.mark.parametrize("name", SURGERY)
def test_survey_lists_every_bn_with_the_fold_plan_and_changes_nothing(name):
    fam = FAMILIES[name]
    model = prepared(name)
    x = example(fam)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = observe(model, fam, x)
    result = bnsurgery.survey(model, positional(fam, x))
    assert [layer.name for layer in result.layers] == bn_names(model)
    plan = bnsurgery.plan_fold(model, positional(fam, x))
    expected = {e.bn: f"into {e.into} ({e.placement})" for e in plan.edits}
    expected.update({s.bn: f"left: {s.reason}" for s in plan.skipped})
    assert {layer.name: layer.fold for layer in result.layers} == expected
    frozen = set(bn_names(model)) - set(native_names(model))
    for layer in result.layers:
        # a dead channel (ReLU6 that never fires) leaves a variance near zero: said, and only that
        near_zero = int((model.get_submodule(layer.name).running_var.abs() < 1e-6).sum())
        expected_health = (f"running var near zero in {near_zero} channels",) if near_zero else ()
        assert layer.health == expected_health, layer.name
        assert layer.frozen is (layer.name in frozen), layer.name
        assert layer.eps is not None and layer.channels
    for n in fam.uncalled:
        assert "not called" in expected[n]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert_same(before, observe(model, fam, x))


@pytest.mark.parametrize("name", SURGERY)
def test_inspect_command(name, capsys):
    """``bnsurgery inspect`` on the factory spec, as a user types it."""
    from bnsurgery.cli import main

    fam = FAMILIES[name]
    spec = f"{FACTORY}(name={name!r})"
    size = ",".join(map(str, fam.sample))
    code = main(["inspect", spec, "--input-size", size, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    layers = json.loads(captured.out)["layers"]
    assert [layer["name"] for layer in layers] == bn_names(family(name))


# --------------------------------------------------------------------- recalibration


def batch_moments(
    model: nn.Module, fam: Family, batches: list[Any], *, batch_statistics: bool = True
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, int], set[str]]:
    """First-principles statistics of every BN's input over ``batches``, on ``model``
    (changed: use a copy).

    The pass recalibrate promises: every module in eval mode, every BN normalising with the
    statistics of the batch at hand, as in training. So each BN's input comes from
    predecessors that normalised with batch statistics, not with their running statistics
    (old or new). Forward hooks replace each BN's output by that normalisation, written out
    here, and record exactly the values it normalised: per channel, over every dimension but
    the second, in float64. ``batch_statistics=False`` keeps the eval outputs instead (the
    pass recalibrate must not run).

    Returns:
        Per BN that saw values: (mean, unbiased variance) over all batches; per BN, the number
        of non-empty calls; the BNs that only saw empty batches.
    """
    seen: dict[str, list[torch.Tensor]] = {}
    empty: set[str] = set()

    def hook(name: str) -> Callable[..., torch.Tensor | None]:
        def normalise(module, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            if x.numel() == 0:
                empty.add(name)
                return None
            c = x.shape[1]
            values = x.detach().transpose(0, 1).reshape(c, -1).double()
            seen.setdefault(name, []).append(values)
            if not batch_statistics:
                return None
            shape = (1, c) + (1,) * (x.dim() - 2)
            mean, var = values.mean(1), values.var(1, correction=0)
            eps = DETR_EPS if isinstance(module, DetrFrozenBatchNorm2d) else module.eps
            y = (x.double() - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
            if module.weight is not None:
                y = y * module.weight.double().view(shape) + module.bias.double().view(shape)
            return y.to(x.dtype)

        return normalise

    handles = [
        model.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True)
        for n in bn_names(model)
    ]
    try:
        with torch.no_grad():
            for b in batches:
                if fam.detection:
                    model(b)
                else:
                    model(**b)
    finally:
        for handle in handles:
            handle.remove()
    moments = {}
    for name, parts in seen.items():
        values = torch.cat(parts, 1)
        moments[name] = (values.mean(1), values.var(1, correction=1))
    return moments, {n: len(p) for n, p in seen.items()}, empty - set(seen)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_recalibrate_stores_first_principles_moments(name, tmp_path):
    """In float64, the stored mean and variance of every BN are the exact mean and unbiased
    variance of the values it normalised in the pass (see ``batch_moments``), to 1e-10; a BN
    no data reaches keeps its statistics and is reported; nothing else changes."""
    fam = FAMILIES[name]
    model = prepared(name, torch.float64)
    batches = data(fam, torch.float64)
    names = bn_names(model)
    moments, calls, only_empty = batch_moments(copy.deepcopy(model), fam, batches)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]

    bnsurgery.recalibrate(model, batches, forward=feed(fam))

    report = bnsurgery.last_report(model)
    assert report.batches == len(batches)
    assert [layer.name for layer in report.layers] == [n for n in names if n in moments]
    left = dict(report.left)
    assert set(left) == set(names) - set(moments)
    assert set(fam.uncalled) <= set(left)
    for n, reason in left.items():
        assert ("saw only empty batches" if n in only_empty else "not called") in reason, n
    if fam.detection:
        detections = observe(model, fam, example(fam, torch.float64))
        assert bool(detections[0].numel()) is not name.endswith("no_detections")
    for n, (mean, var) in moments.items():
        bn = model.get_submodule(n)
        assert _relative(bn.running_mean, mean) <= 1e-10, (n, _relative(bn.running_mean, mean))
        assert _relative(bn.running_var, var) <= 1e-10, (n, _relative(bn.running_var, var))
        tracked = getattr(bn, "num_batches_tracked", None)
        if tracked is not None:
            assert int(tracked) == calls[n], n
    stats = {f"{n}.{k}" for n in moments for k in ("running_mean", "running_var")}
    stats |= {f"{n}.num_batches_tracked" for n in moments}
    for key, value in model.state_dict().items():
        if key not in stats:
            assert torch.equal(value, state[key]), key
    assert [m.training for m in model.modules()] == flags

    # the test can tell: where a BN comes after another, its input differs when the one before
    # normalises with its running statistics
    if len(moments) > 1:
        naive, _, _ = batch_moments(
            copy.deepcopy(prepared(name, torch.float64)), fam, batches, batch_statistics=False
        )
        assert max(_relative(naive[n][0], m[0]) for n, m in moments.items()) > 1e-6

    if name in SURGERY:  # the other Mask R-CNN variants are the same architecture
        x = example(fam)
        model.float()  # the file round trip in float32 (float64: see the test for it)
        round_trip(model, name, x, tmp_path)
        runs_in_train_mode(model, fam, x)
