"""targets: the one registry of what replaces a BN (swap targets, the frozen BN, the fold's
leftover): when each refuses, what options it records, and what it builds."""

from __future__ import annotations

import json

import pytest
import timm.layers
import torch
import torchvision
from torch import nn

from bnsurgery.errors import UsageError
from bnsurgery.frozen import FrozenBatchNorm
from bnsurgery.layers import FoldedBatchNorm, NormAct, NormActRemainder
from bnsurgery.norms import bn_stats, is_batchnorm
from bnsurgery.targets import ALIASES, TARGETS, Target, auto_groups, build, remainder_of, target
from bnsurgery.testing import randomize_bn

C, EPS = 48, 1e-3
NAMES = sorted(TARGETS)
KINDS = ("1d", "2d", "3d", "act")

#: What swap's plan passes to ``refuses`` and ``resolve`` (swapping.plan_swap).
GIVEN = {"groups": None, "group_size": None, "dims": None, "force_affine": False, "flat": False}

#: (target, kind) -> a word of the reason it refuses; absent: it does not refuse.
REFUSED = {
    ("instancenorm", "1d"): "(N, C) vectors",
    ("batchnorm", "1d"): "already a BatchNorm",
    ("batchnorm", "2d"): "already a BatchNorm",
    ("batchnorm", "3d"): "already a BatchNorm",
}

#: What each target records with GIVEN, per kind (groupnorm's group count worked out).
RECORDED = {
    "groupnorm": {"groups": 24, "force_affine": False},
    "layernorm": {"force_affine": False},
    "instancenorm": {"force_affine": False},
    "frozen": {},
    "syncbatchnorm": {},
    "batchnorm": {},
    "identity": {},
}

#: The class each target builds, per kind ("plain": BatchNorm1d/2d/3d).
BUILT = {
    ("groupnorm", "plain"): "GroupNorm",
    ("groupnorm", "act"): "GroupNormAct",
    ("layernorm", "plain"): "ChannelLayerNorm",
    ("layernorm", "act"): "LayerNormAct2d",
    ("instancenorm", "1d"): "InstanceNorm1d",
    ("instancenorm", "2d"): "InstanceNorm2d",
    ("instancenorm", "3d"): "InstanceNorm3d",
    ("instancenorm", "act"): "NormAct",
    ("frozen", "plain"): "FrozenBatchNorm",
    ("frozen", "act"): "FrozenBatchNorm",
    ("syncbatchnorm", "plain"): "SyncBatchNorm",
    ("syncbatchnorm", "act"): "SyncBatchNormAct",
    ("batchnorm", "act"): "BatchNormAct2d",
    ("identity", "plain"): "FoldedBatchNorm",
    ("identity", "act"): "NormActRemainder",
}

#: Every (target, kind) that builds: all but batchnorm on a plain BN (instance norm on a
#: BatchNorm1d with dims='1d').
PAIRS = [(n, k) for n in NAMES for k in KINDS if n != "batchnorm" or k == "act"]


def make_bn(kind: str, seed: int = 0, random: bool = True) -> nn.Module:
    """A float64 BN of ``kind`` with random statistics and affine, eps 1e-3, in eval mode."""
    bn = {
        "1d": lambda: nn.BatchNorm1d(C, eps=EPS),
        "2d": lambda: nn.BatchNorm2d(C, eps=EPS),
        "3d": lambda: nn.BatchNorm3d(C, eps=EPS),
        "act": lambda: timm.layers.BatchNormAct2d(C, eps=EPS, act_layer=nn.SiLU),
    }[kind]()
    return (randomize_bn(bn, seed) if random else bn).double().eval()


def given_for(name: str, kind: str) -> dict:
    return {**GIVEN, "dims": "1d"} if (name, kind) == ("instancenorm", "1d") else dict(GIVEN)


def built_class(name: str, kind: str) -> str:
    return BUILT.get((name, kind)) or BUILT[name, "plain"]


def tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def the_norm(module: nn.Module) -> nn.Module:
    return module.norm if isinstance(module, NormAct) else module


# ---- refuses -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_refuses_gives_a_reason_or_none(name, kind):
    reason = TARGETS[name].refuses(make_bn(kind), GIVEN)
    if (name, kind) in REFUSED:
        assert isinstance(reason, str) and REFUSED[name, kind] in reason
    else:
        assert reason is None


def test_instance_norm_takes_a_batchnorm1d_told_it_sees_sequences():
    entry, bn = TARGETS["instancenorm"], make_bn("1d")
    assert "dims='1d'" in entry.refuses(bn, GIVEN)
    assert entry.refuses(bn, {**GIVEN, "dims": "1d"}) is None
    assert entry.resolve(bn, {**GIVEN, "dims": "1d"}) == {"dims": "1d", "force_affine": False}


def test_syncbatchnorm_refuses_a_syncbatchnorm_and_a_bn_without_a_counterpart():
    refuses = TARGETS["syncbatchnorm"].refuses
    assert refuses(nn.SyncBatchNorm(4), GIVEN) == "already a SyncBatchNorm"
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(4)
    assert refuses(frozen, GIVEN) == "FrozenBatchNorm2d has no SyncBatchNorm counterpart"


def test_batchnorm_refuses_only_the_plain_classes():
    refuses = TARGETS["batchnorm"].refuses
    for bn in (nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4)):
        assert refuses(bn, GIVEN) == "already a BatchNorm"
    for bn in (
        nn.SyncBatchNorm(4),
        FrozenBatchNorm(nn.BatchNorm2d(4)),
        torchvision.ops.misc.FrozenBatchNorm2d(4),
        timm.layers.BatchNormAct2d(4),
    ):
        assert refuses(bn, GIVEN) is None, type(bn).__name__


def test_frozen_refuses_a_frozen_bn_and_one_without_statistics():
    refuses = TARGETS["frozen"].refuses
    assert refuses(FrozenBatchNorm(nn.BatchNorm2d(4)), {}) == "already frozen by bnsurgery"
    tv = torchvision.ops.misc.FrozenBatchNorm2d(4)
    assert refuses(tv, {}) == "already frozen (FrozenBatchNorm2d)"
    timm_frozen = timm.layers.FrozenBatchNormAct2d(4)
    assert refuses(timm_frozen, {}) == "already frozen (FrozenBatchNormAct2d)"
    reason = refuses(nn.BatchNorm2d(4, track_running_stats=False), {})
    assert isinstance(reason, str) and "track_running_stats=False" in reason
    assert "lazy" in refuses(nn.LazyBatchNorm2d(), {})
    assert refuses(nn.BatchNorm2d(4), {}) is None


# ---- resolve and build ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), PAIRS)
def test_resolve_records_only_json_able_options(name, kind):
    entry, bn = TARGETS[name], make_bn(kind)
    given = given_for(name, kind)
    assert entry.refuses(bn, given) is None
    recorded = entry.resolve(bn, {**given, "unrelated": object()})
    expected = dict(RECORDED[name])
    if name == "groupnorm" and kind == "1d":
        expected["groups"] = 3  # (N, C) vectors: groups of at least 16 channels
    if (name, kind) == ("instancenorm", "1d"):
        expected["dims"] = "1d"
    assert recorded == expected
    assert json.loads(json.dumps(recorded)) == recorded


@pytest.mark.parametrize(("name", "kind"), PAIRS)
def test_build_carries_dtype_affine_activation_and_requires_grad(name, kind):
    entry, bn = TARGETS[name], make_bn(kind)
    given = given_for(name, kind)
    assert entry.refuses(bn, given) is None
    bn.weight.requires_grad_(False)  # bias stays trainable: each flag carried on its own
    weight, bias = bn.weight.detach().clone(), bn.bias.detach().clone()
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)

    new = entry.build(bn, entry.resolve(bn, given))

    assert type(new).__name__ == built_class(name, kind)
    assert not is_batchnorm(new) or name in ("frozen", "syncbatchnorm", "batchnorm")
    floats = [t for t in tensors(new) if t.is_floating_point()]
    assert floats or (name, kind) == ("identity", "act")  # a remainder of SiLU holds nothing
    assert all(t.dtype == torch.float64 and t.device == bn.bias.device for t in floats)
    if kind == "act":
        assert new.act is act and new.drop is drop
    if name == "identity":
        return  # nothing of the BN's is left: test_identity_*
    norm = the_norm(new)
    assert norm.eps == EPS
    assert torch.equal(norm.weight.detach().reshape(-1), weight)
    assert torch.equal(norm.bias.detach().reshape(-1), bias)
    if name == "frozen":  # statistics and affine fixed (train_affine=False)
        assert (norm.weight.requires_grad, norm.bias.requires_grad) == (False, False)
    else:
        assert (norm.weight.requires_grad, norm.bias.requires_grad) == (False, True)


def test_frozen_with_train_affine_carries_requires_grad():
    bn = make_bn("2d")
    bn.weight.requires_grad_(False)
    entry = TARGETS["frozen"]
    recorded = entry.resolve(bn, {"train_affine": True})
    assert recorded == {"train_affine": True}
    new = entry.build(bn, recorded)
    assert (new.weight.requires_grad, new.bias.requires_grad) == (False, True)


@pytest.mark.parametrize("name", ["frozen", "syncbatchnorm", "batchnorm"])
def test_targets_that_keep_the_statistics_compute_what_the_bn_did(name):
    bn = make_bn("act")
    x = torch.randn(3, C, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(x)
        new = build(name, bn, TARGETS[name].resolve(bn, GIVEN)).eval()
        assert torch.equal(new(x), expected)
    assert new.running_mean is bn.running_mean and new.running_var is bn.running_var


@pytest.mark.parametrize("name", ["groupnorm", "layernorm", "instancenorm"])
def test_a_bn_without_affine_gets_a_norm_without_one_unless_forced(name):
    bn = nn.BatchNorm2d(8, affine=False).double()
    entry = TARGETS[name]
    plain = the_norm(entry.build(bn, entry.resolve(bn, GIVEN)))
    assert plain.weight is None and plain.bias is None
    forced = the_norm(entry.build(bn, entry.resolve(bn, {**GIVEN, "force_affine": True})))
    assert torch.equal(forced.weight.detach().reshape(-1), torch.ones(8, dtype=torch.float64))
    assert torch.equal(forced.bias.detach().reshape(-1), torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize(("name", "kind"), PAIRS)
def test_recorded_options_replay_through_json(name, kind):
    """A checkpoint records the options as JSON and rebuilds on a fresh architecture."""
    entry, bn = TARGETS[name], make_bn(kind)
    given = given_for(name, kind)
    assert entry.refuses(bn, given) is None
    made = entry.build(bn, entry.resolve(bn, given))
    replayed = build(name, make_bn(kind), json.loads(json.dumps(entry.resolve(bn, given))))
    assert type(replayed) is type(made)
    state, again = made.state_dict(), replayed.state_dict()
    assert list(again) == list(state)
    assert all(again[k].shape == state[k].shape for k in state)
    assert all(again[k].dtype == state[k].dtype for k in state)


@pytest.mark.parametrize(("name", "kind"), PAIRS)
def test_build_keeps_the_bns_device(name, kind):
    """On the meta device, as a checkpoint's skeleton is built and replayed (safemodel)."""
    with torch.device("meta"):
        bn = make_bn(kind, random=False)
    assert bn.weight.device.type == "meta"
    new = build(name, bn, TARGETS[name].resolve(bn, given_for(name, kind)))
    assert tensors(new) or (name, kind) == ("identity", "act")
    assert all(t.device.type == "meta" for t in tensors(new))
    assert all(t.dtype == torch.float64 for t in tensors(new) if t.is_floating_point())


# ---- the registry --------------------------------------------------------------------------


def test_the_registry_and_its_flags():
    assert NAMES == [
        "batchnorm", "frozen", "groupnorm", "identity", "instancenorm", "layernorm",
        "syncbatchnorm",
    ]  # fmt: skip
    assert all(isinstance(t, Target) for t in TARGETS.values())
    assert {n for n, t in TARGETS.items() if t.fits} == {"groupnorm", "layernorm", "instancenorm"}
    assert {n for n, t in TARGETS.items() if t.keeps_statistics} == {"frozen"}


def test_an_unknown_target_lists_the_valid_names():
    with pytest.raises(UsageError, match="unknown target 'nope'") as caught:
        target("nope")
    assert str(caught.value).endswith("valid: " + ", ".join(TARGETS))
    with pytest.raises(UsageError, match="unknown target 'nope'"):
        build("nope", nn.BatchNorm2d(4), {})


@pytest.mark.parametrize(
    "module", [nn.GroupNorm(2, 4), nn.InstanceNorm2d(4), nn.Conv2d(4, 4, 1), nn.Identity()]
)
def test_build_refuses_a_module_that_is_no_bn(module):
    with pytest.raises(UsageError, match=f"cannot replace a {type(module).__name__} by frozen"):
        build("frozen", module, {})


def test_aliases_name_entries_of_the_registry():
    assert ALIASES == {"norm_act_remainder": "identity"}
    assert target("norm_act_remainder") is TARGETS["identity"]
    assert not set(ALIASES) & set(TARGETS)
    assert all(target(name) is TARGETS[name] for name in TARGETS)
    bn = make_bn("act")
    left = build("norm_act_remainder", bn, {})  # as an older checkpoint records it
    assert isinstance(left, NormActRemainder) and left.act is bn.act


# ---- group counts --------------------------------------------------------------------------


def test_auto_groups():
    assert (auto_groups(72), auto_groups(64), auto_groups(7), auto_groups(5, min_group_size=2)) == (
        24,
        32,
        7,
        1,
    )
    assert auto_groups(1) == 1 and auto_groups(97) == 1  # a prime above 32: one group
    assert auto_groups(64, preferred=8) == 8 and auto_groups(48, preferred=5) == 4
    assert [auto_groups(c, min_group_size=16) for c in (8, 16, 32, 48, 64, 96, 1024)] == [
        1, 1, 2, 3, 4, 6, 32,
    ]  # fmt: skip
    assert auto_groups(6, min_group_size=2) == 3 and auto_groups(6, min_group_size=4) == 1


@pytest.mark.parametrize("min_group_size", [1, 2, 16])
def test_auto_groups_is_the_largest_count_with_groups_large_enough(min_group_size):
    for channels in range(1, 300):
        g = auto_groups(channels, min_group_size=min_group_size)
        fits = [h for h in range(1, 33) if channels % h == 0 and channels // h >= min_group_size]
        assert g == max(fits, default=1), channels


@pytest.mark.parametrize(
    ("options", "groups"),
    [
        ({}, 24),
        ({"groups": 4}, 4),
        ({"groups": 48}, 48),
        ({"group_size": 8}, 6),
        ({"flat": True}, 3),
    ],
)
def test_groupnorm_resolves_the_group_count(options, groups):
    bn = make_bn("2d")
    recorded = TARGETS["groupnorm"].resolve(bn, {**GIVEN, **options})
    assert recorded == {"groups": groups, "force_affine": False}
    assert build("groupnorm", bn, recorded).num_groups == groups


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"groups": 4, "group_size": 12}, "give groups or group_size, not both"),
        ({"groups": 5}, "groups=5 does not divide 48 channels"),
        ({"groups": 96}, "groups=96 does not divide 48 channels"),
        ({"groups": 0}, "groups=0 does not divide 48 channels"),
        ({"groups": -4}, "groups=-4 does not divide 48 channels"),
        ({"group_size": 5}, "group_size=5 does not divide 48 channels"),
        ({"group_size": 0}, "group_size=0 does not divide 48 channels"),
        ({"group_size": -8}, "group_size=-8 does not divide 48 channels"),
    ],
)
def test_groupnorm_refuses_bad_group_options(options, message):
    with pytest.raises(UsageError) as caught:
        TARGETS["groupnorm"].resolve(make_bn("2d"), {**GIVEN, **options})
    assert str(caught.value) == message


@pytest.mark.parametrize("channels", [16, 24, 32, 48, 64, 96, 128, 256, 512, 2048])
def test_groupnorm_on_flat_inputs_groups_at_least_16_channels(channels):
    resolve = TARGETS["groupnorm"].resolve
    for bn, given in (
        (nn.BatchNorm2d(channels), {**GIVEN, "flat": True}),
        (nn.BatchNorm1d(channels), GIVEN),  # a BatchNorm1d may see (N, C) vectors
    ):
        groups = resolve(bn, given)["groups"]
        assert channels % groups == 0 and channels // groups >= 16, (type(bn), groups)


# ---- identity: the fold's leftover ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_identity_leaves_a_folded_bn_reading_as_an_exact_identity(kind):
    bn = make_bn(kind)
    left = build("identity", bn, {})
    assert type(left) is FoldedBatchNorm and left.eps == EPS and left.num_features == C
    assert left.running_var.dtype == torch.float64
    assert bool((left.running_var + left.eps == 1).all())
    assert torch.equal(left.running_mean, torch.zeros(C, dtype=torch.float64))
    x = torch.randn(2, C, 3)
    assert left(x) is x


def test_identity_leaves_the_activation_of_a_norm_act_layer():
    bn = make_bn("act")
    left = build("identity", bn, {})
    assert type(left) is NormActRemainder and left.act is bn.act and left.drop is bn.drop
    x = torch.randn(2, C, 3, 3, dtype=torch.float64)
    expected = torch.nn.functional.silu(x)  # before the in-place SiLU timm made
    assert torch.equal(left(x), expected)


def test_a_norm_act_leaves_its_activation():
    bn = timm.layers.BatchNormAct2d(3, act_layer=nn.ReLU)
    left = remainder_of(bn)
    assert isinstance(left, NormActRemainder) and left.act is bn.act


@pytest.mark.parametrize(
    "make", [lambda: nn.BatchNorm2d(3, track_running_stats=False), nn.LazyBatchNorm2d]
)
def test_a_bn_without_statistics_has_no_fixed_map(make):
    module = make()
    assert bn_stats(module) is None
    assert type(remainder_of(module)) is nn.Identity


# ---- batchnorm: back from a frozen or synchronised BN --------------------------------------


def test_batchnorm_restores_a_bnsurgery_frozen_bn_as_it_was():
    bn = make_bn("2d")
    assert build("batchnorm", build("frozen", bn, {}), {}) is bn
    assert bn.weight.requires_grad and bn.bias.requires_grad


def test_batchnorm_makes_a_buffer_only_frozen_bn_trainable_again():
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(4)
    randomize_bn(frozen, 3)
    frozen = frozen.double()
    new = build("batchnorm", frozen, {})
    assert type(new) is nn.BatchNorm2d and new.eps == frozen.eps
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(new, key).detach(), getattr(frozen, key)), key
        assert getattr(new, key).dtype == torch.float64
    assert new.weight.requires_grad and new.bias.requires_grad


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("1d", nn.BatchNorm1d), ("3d", nn.BatchNorm3d), ("act", timm.layers.BatchNormAct2d)],
)
def test_a_syncbatchnorm_swapped_back_is_the_class_it_came_from(kind, cls):
    bn = make_bn(kind)
    sync = build("syncbatchnorm", bn, {})
    back = build("batchnorm", sync, {})
    assert type(back) is cls and back.weight is bn.weight and back.running_var is bn.running_var
    assert back.eps == EPS and back.training is False
    if kind == "act":
        assert back.act is bn.act
