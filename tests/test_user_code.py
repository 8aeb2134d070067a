"""Models as people write them: a BN called by keyword (``bn(input=x)``) and a ``.view`` right
after the norm. Every surgery must leave a model that runs, in eval and in train mode, after
saving and loading, and fold must fold what it folds in timm's models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import bnsurgery
from bnsurgery.targets import TARGETS

from .conftest import assert_same_function, output, prepared
from .models import KeywordTutorial

X = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
BACKEND = "eager"  # dynamo as torch.compile runs it, without a C++ build


def model() -> KeywordTutorial:
    return prepared(KeywordTutorial())


def runs(net: torch.nn.Module) -> None:
    """A forward pass in eval mode, one train step at batch size 2, and eval again."""
    net.eval()
    assert torch.isfinite(output(net, X)).all()
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    out = net(X[:2])
    out.square().mean().backward()
    if trainable:
        torch.optim.SGD(trainable, lr=1e-3).step()
    net.eval()
    assert torch.isfinite(output(net, X)).all()


def test_fold_folds_keyword_calls():
    net = model()
    reference = copy.deepcopy(net)
    bnsurgery.fold(net, X)
    report = bnsurgery.last_report(net)
    assert sorted(e.bn for e in report.folded) == ["bn", "bn1d"], report.left
    assert_same_function(reference, net, (X,))
    runs(net)


def test_the_graph_walk_sees_a_keyword_call_as_the_bn_input():
    plan = bnsurgery.plan_fold(model(), X)
    assert not plan.skipped, plan.skipped


@pytest.mark.parametrize("train_affine", [False, True])
def test_freeze_keyword_calls(train_affine):
    net = model()
    reference = copy.deepcopy(net)
    bnsurgery.freeze(net, train_affine=train_affine)
    assert torch.equal(output(net, X), output(reference, X))
    runs(net)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_swap_keyword_calls_and_view_after_the_norm(target):
    net = model()
    bnsurgery.swap(net, target)  # instancenorm leaves the BatchNorm1d on (N, C), with a reason
    if target == "syncbatchnorm":  # trains only inside a process group
        assert torch.isfinite(output(net.eval(), X)).all()
        return
    runs(net)


@pytest.mark.parametrize("target", ["groupnorm", "layernorm"])
def test_swap_calibrated_on_keyword_calls(target):
    net = model()
    bnsurgery.swap(net, target, calibrate=[X, X[:3]])
    report = bnsurgery.last_report(net)
    assert {s.bn for s in report.swapped} == {"bn", "bn1d"}
    assert all(s.fit_error_after is not None for s in report.swapped), report.swapped
    runs(net)


def test_layernorm_returns_the_layout_it_was_given():
    from bnsurgery.layers import ChannelLayerNorm

    norm = ChannelLayerNorm(8)
    x = torch.randn(2, 8, 3, 3)
    assert norm(x).is_contiguous()
    channels_last = x.contiguous(memory_format=torch.channels_last)
    y = norm(input=channels_last)
    assert y.stride() == channels_last.stride()
    assert torch.equal(y, norm(x))


def test_recalibrate_keyword_calls_first_principles():
    """The default pass: the model flattens with .view, so it stays in the default layout."""
    net = model()
    bnsurgery.recalibrate(net, [X, X[:3], X[1:]])
    assert "Tensor.view" in " ".join(bnsurgery.last_report(net).notes)
    assert all(p.is_contiguous() for p in net.parameters())
    data = torch.cat([X, X[:3], X[1:]])
    with torch.no_grad():
        conv = net.conv(data)
    dims = (0, 2, 3)
    assert torch.allclose(net.bn.running_mean, conv.mean(dims), atol=1e-5)
    assert torch.allclose(net.bn.running_var, conv.var(dims), rtol=1e-4)
    runs(net)


def test_save_and_load_after_each_surgery(tmp_path):
    for name, surgery in {
        "fold": lambda n: bnsurgery.fold(n, X),
        "freeze": bnsurgery.freeze,
        "swap": lambda n: bnsurgery.swap(n, "layernorm"),
    }.items():
        net = model()
        bnsurgery.save(
            surgery(net), tmp_path / f"{name}.safetensors", arch="tests.models:keyword_tutorial"
        )
        loaded = bnsurgery.load(
            tmp_path / f"{name}.safetensors", arch="tests.models:keyword_tutorial"
        )
        assert torch.equal(output(loaded.eval(), X), output(net.eval(), X)), name
        runs(loaded)


def _layouts_seen_by(net: torch.nn.Module, batches: list[torch.Tensor], **kwargs) -> list[bool]:
    """Whether the BN input was channels-last, batch by batch (read after the pass: a check
    during it would itself be a layout-sensitive call)."""
    inputs: list[torch.Tensor] = []
    handle = net.bn1.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    try:
        bnsurgery.recalibrate(net, batches, **kwargs)
    finally:
        handle.remove()
    return [x.is_contiguous(memory_format=torch.channels_last) for x in inputs]


def test_recalibrate_uses_channels_last_only_after_a_layout_blind_first_batch():
    from .models import SimpleCNN

    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    net = prepared(SimpleCNN())
    assert _layouts_seen_by(net, batches) == [True, True, True]  # the first one on trial
    assert bnsurgery.last_report(net).notes == []
    assert all(p.is_contiguous() for p in net.parameters())  # restored
    net = prepared(SimpleCNN())
    assert _layouts_seen_by(net, batches, channels_last=True) == [True, True, True]
    net = prepared(SimpleCNN())
    assert _layouts_seen_by(net, batches, channels_last=False) == [False, False, False]


class LayoutReader(torch.nn.Module):
    """Conv -> BN -> conv -> BN, and a head that reads the layout in one of the ways user code
    does: ``view`` (fails on channels-last), ``stride`` or ``is_contiguous`` (decide a path),
    or a data-dependent branch (``item``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6)
        self.conv2, self.bn2 = torch.nn.Conv2d(6, 5, 3), torch.nn.BatchNorm2d(5)

    def forward(self, x):
        y = self.bn1(self.conv1(x)).relu()
        if self.how == "stride" and y.stride()[1] == 1:  # channels-last: another value
            y = y * 2
        if self.how == "is_contiguous" and not y.is_contiguous():
            y = y * 2
        if self.how == "item" and y.mean().item() > 1e9:
            y = y * 2
        y = self.bn2(self.conv2(y))
        if self.how == "view":
            return y.view(y.shape[0], -1)
        return y.flatten(1)


@pytest.mark.parametrize("how", ["view", "stride", "is_contiguous", "item"])
def test_a_first_batch_that_reads_the_layout_leaves_the_statistics_of_the_default_layout(how):
    """The first batch runs in channels-last on trial. A model that reads the layout gets the
    statistics of a pass in the default layout all the same: the first batch runs again in
    the default layout where what it computed could differ (a failing view, a stride or
    contiguity test), and keeps its values where they cannot (a data-dependent branch only
    keeps the rest of the batches in the default layout); the report says why."""
    torch.manual_seed(0)
    net = prepared(LayoutReader(how))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 3, 9, 9, generator=g) * 2 + 1 for n in (4, 3, 5)]
    plain = bnsurgery.recalibrate(copy.deepcopy(net), batches, channels_last=False)
    bnsurgery.recalibrate(net, batches)
    note = " ".join(bnsurgery.last_report(net).notes)
    assert "default memory layout" in note and f"Tensor.{how}" in note, note
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert all(p.is_contiguous() for p in net.parameters())
    with torch.no_grad():  # and what it measured is what a pass in the default layout sees
        h = torch.cat(batches)
        first = net.conv1(h)
    torch.testing.assert_close(net.bn1.running_mean, first.mean((0, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(net.bn1.running_var, first.var((0, 2, 3)), rtol=1e-4, atol=0)
    seen = _layouts_seen_by(prepared(LayoutReader(how)), batches)
    again = how != "item"  # the first batch ran again in the default layout
    assert seen == [True] + [False] * (len(batches) - 1 + again), seen


def test_models_bnsurgery_builds_are_in_eval_mode(tmp_path):
    """Nobody chose a mode for a model built from a spec, a state dict or a bnsurgery file:
    it comes back in eval mode. A pickled module keeps the mode it was saved in."""
    spec = "tests.models:keyword_tutorial"
    assert not bnsurgery.load(spec).training
    net = bnsurgery.load(spec)
    torch.save(net.state_dict(), tmp_path / "state.pt")
    assert not bnsurgery.load(tmp_path / "state.pt", arch=spec).training
    bnsurgery.save(net, tmp_path / "m.safetensors")
    assert not bnsurgery.load(tmp_path / "m.safetensors", arch=spec).training
    torch.save(net.train(), tmp_path / "full.pt")
    pickled = bnsurgery.load(tmp_path / "full.pt", trust_code=True)
    assert pickled.training and all(m.training for m in pickled.modules())


def test_cli_outputs_run_in_eval_mode(tmp_path, capsys):
    """A TorchScript output of a model with Dropout gives the same output twice, and fold does
    not report a train mode nobody chose."""
    from bnsurgery.cli import main

    out = tmp_path / "frozen.ts"
    spec = "tests.models:keyword_tutorial"
    assert main(["freeze", spec, "--input-size", "3,4,4", "-o", str(out)]) == 0
    scripted = bnsurgery.load(out, trust_code=True)
    assert torch.equal(scripted(X), scripted(X))
    code = main(["fold", spec, "--input-size", "3,4,4", "-o", str(tmp_path / "f.safetensors")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "train mode" not in captured.out + captured.err


class Branchy(torch.nn.Module):
    """A BN on a branch the data never takes, and a head that sees empty batches."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.unused = torch.nn.BatchNorm2d(4)  # built, never called (as in Hugging Face DPT)
        self.head = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        keep = y.mean((1, 2, 3)) > 1e9  # no sample qualifies: the head sees (0, C, H, W)
        return y, self.head(y[keep])


def test_recalibrate_skips_uncalled_and_empty_fed_bns_and_changes_nothing_else():
    net = prepared(Branchy())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [torch.randn(3, 3, 5, 5) for _ in range(2)]
    bnsurgery.recalibrate(net, batches)
    report = bnsurgery.last_report(net)
    assert [d.name for d in report.layers] == ["bn"]
    reasons = dict(report.left)
    assert "not called" in reasons["unused"]
    assert "saw only empty batches" in reasons["head"]
    for key in ("unused.running_mean", "unused.running_var", "head.running_var"):
        assert torch.equal(net.state_dict()[key], before[key]), key
    with torch.no_grad():
        conv = net.conv(torch.cat(batches))
    assert torch.allclose(net.bn.running_mean, conv.mean((0, 2, 3)), atol=1e-5)


def test_recalibrate_says_when_a_bn_saw_one_value_per_channel():
    net = prepared(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    before = net[1].running_var.clone()
    bnsurgery.recalibrate(net, [torch.randn(1, 3)])
    report = bnsurgery.last_report(net)
    assert report.layers == [] and "saw 1 value" in dict(report.left)["1"]
    assert torch.equal(net[1].running_var, before)


def test_the_command_imports_typed_specs_from_the_current_folder(tmp_path, monkeypatch, capsys):
    """bnsurgery fold mynets:build works from the folder that holds mynets.py, as python -m
    does; a file that records a factory of that folder does not get it imported without the
    user naming it."""
    import sys

    from bnsurgery.cli import main

    (tmp_path / "mynets_here.py").write_text(
        "from tests.models import KeywordTutorial\n\ndef build():\n    return KeywordTutorial()\n"
    )
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    out = tmp_path / "net.safetensors"
    args = ["fold", "mynets_here:build", "--input-size", "3,4,4", "-o", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    assert sys.path == path_before
    sys.modules.pop("mynets_here", None)
    assert main(["inspect", str(out)]) == 4  # the file names the factory: refused
    sys.modules.pop("mynets_here", None)
    assert main(["inspect", str(out), "--trust-code"]) == 3  # allowed, but not from here
    assert "mynets_here" in capsys.readouterr().err
    sys.modules.pop("mynets_here", None)
    assert main(["inspect", str(out), "--arch", "mynets_here:build"]) == 0
    sys.modules.pop("mynets_here", None)


@pytest.mark.parametrize("surgery", ["fold", "freeze", "swap_layernorm", "swap_frozen"])
def test_hooks_on_a_bn_keep_firing_and_their_handles_still_remove_them(surgery):
    net = model()
    calls: list[str] = []
    # a pre-hook of a BN folded into the conv before it would sit between the two: fold
    # leaves such a BN (next test); its forward hook sees the same output after the fold
    pre = None
    if surgery != "fold":
        pre = net.bn.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    post = net.bn.register_forward_hook(lambda m, args, out: calls.append("post"))
    apply = {
        "fold": lambda n: bnsurgery.fold(n, X),
        "freeze": bnsurgery.freeze,
        "swap_layernorm": lambda n: bnsurgery.swap(n, "layernorm"),
        "swap_frozen": lambda n: bnsurgery.swap(n, "frozen"),
    }[surgery]
    apply(net)
    assert calls == []  # the surgery's own passes fire no user hook
    assert type(net.bn) is not torch.nn.BatchNorm2d
    output(net, X)
    assert calls == (["post"] if pre is None else ["pre", "post"]), calls
    if surgery == "fold":
        assert any("hooks of bn" in n for n in bnsurgery.last_report(net).notes)
    for handle in (pre, post):
        if handle is not None:
            handle.remove()
    calls.clear()
    output(net, X)
    assert calls == []


class Doubler:
    """A user hook that changes what its module returns (a forward hook) or receives (a
    pre-hook), and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module, args, out=None):
        self.calls += 1
        if isinstance(out, dict):  # a pre-hook with keyword arguments: bn(input=x)
            return args, {k: 2 * v for k, v in out.items()}
        return 2 * out if out is not None else (2 * args[0],)


@pytest.mark.parametrize(
    ("where", "kind"),
    [("conv", "forward"), ("bn", "pre"), ("", "forward_of_a_parent")],
)
def test_fold_leaves_a_bn_with_a_hook_between_it_and_its_layer(where, kind):
    net = model()
    if kind == "forward_of_a_parent":  # conv inside a block whose output a hook changes
        net.conv = torch.nn.Sequential(net.conv)
        where = "conv"
    hook = Doubler()
    module = net.get_submodule(where)
    if kind == "pre":
        module.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        module.register_forward_hook(hook)
    reference = copy.deepcopy(net)
    bnsurgery.fold(net, X)
    assert hook.calls == 0
    left = {s.bn: s.reason for s in bnsurgery.last_report(net).left}
    assert "bn" in left and "hook" in left["bn"], left
    assert isinstance(net.bn, torch.nn.BatchNorm2d)
    assert_same_function(reference, net, (X,))  # with the hook, as the user runs it
    assert hook.calls == 1


def test_internal_passes_keep_torchs_own_hooks_and_put_the_users_back_in_order():
    from bnsurgery.hooks import user_hooks_suspended

    conv = torch.nn.Conv2d(3, 3, 1)
    first = conv.register_forward_pre_hook(lambda *a: None)
    conv = torch.nn.utils.weight_norm(conv)  # computes its weight in a torch pre-hook
    conv.register_forward_pre_hook(lambda *a: None)
    before = list(conv._forward_pre_hooks.items())
    with torch.no_grad():
        conv.weight_g.mul_(3)  # only the torch hook makes the weight follow
    with user_hooks_suspended(conv):
        assert [type(h).__name__ for h in conv._forward_pre_hooks.values()] == ["WeightNorm"]
        out = conv(X[:1])
    assert list(conv._forward_pre_hooks.items()) == before
    assert torch.allclose(out, conv(X[:1]))
    first.remove()
    assert len(conv._forward_pre_hooks) == 2


def test_fold_and_inspect_fire_no_user_hook():
    net = model()
    reference = copy.deepcopy(net)
    calls: list[str] = []

    def observe(*args):
        calls.append("hook")

    # hooks outside each conv-BN pair: the folds happen and the hooks fire as before
    handles = [net.register_forward_hook(observe), net.conv.register_forward_pre_hook(observe)]
    handles += [net.get_submodule(n).register_forward_hook(observe) for n in ("bn", "bn1d")]
    try:
        bnsurgery.survey(net, X)
        bnsurgery.fold(net, X)
        assert calls == []
        assert [e.bn for e in bnsurgery.last_report(net).folded] == ["bn", "bn1d"]
        assert_same_function(reference, net, (X,))
        assert calls == ["hook"] * 4
    finally:
        for h in handles:
            h.remove()


def test_a_global_module_hook_fires_not_in_fold_and_keeps_every_bn():
    net, calls = model(), []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: calls.append(1))
    try:
        bnsurgery.fold(net, X)
        assert calls == []
        assert all("global module hook" in s.reason for s in bnsurgery.last_report(net).left)
        assert not bnsurgery.last_report(net).folded
    finally:
        handle.remove()


def test_unfreeze_gives_back_the_bn_with_its_hooks():
    net = model()
    calls: list[str] = []
    net.bn.register_forward_hook(lambda m, args, out: calls.append("post"))
    bnsurgery.unfreeze(bnsurgery.freeze(net))
    assert type(net.bn) is torch.nn.BatchNorm2d
    output(net, X)
    assert calls == ["post"]


def _wrapped(net: torch.nn.Module, how: str) -> torch.nn.Module:
    if how == "compiled":
        wrapped = torch.compile(net, backend=BACKEND)
        output(wrapped, X)  # compiled before the surgery adds its hooks
        return wrapped
    return torch.nn.DataParallel(net)


@pytest.mark.parametrize("how", ["compiled", "data_parallel"])
def test_swap_repair_on_a_wrapped_model_fits(how):
    net = model()
    wrapped = _wrapped(net, how)
    bnsurgery.swap(wrapped, "groupnorm", calibrate=[X, X[:3]])
    report = bnsurgery.last_report(wrapped)
    assert report.swapped and all(s.fit_error_after is not None for s in report.swapped)


@pytest.mark.parametrize("how", ["compiled", "data_parallel"])
def test_recalibrate_on_a_wrapped_model(how):
    net = model()
    wrapped = _wrapped(net, how)
    bnsurgery.recalibrate(wrapped, [X, X[:3]])
    with torch.no_grad():
        conv = net.conv(torch.cat([X, X[:3]]))
    assert torch.allclose(net.bn.running_mean, conv.mean((0, 2, 3)), atol=1e-5)


@pytest.mark.parametrize("how", ["compiled", "data_parallel"])
def test_save_of_a_wrapped_model_loads_back(how, tmp_path):
    net = bnsurgery.load("tests.models:keyword_tutorial")
    path = bnsurgery.save(_wrapped(net, how), tmp_path / "wrapped.safetensors")
    loaded = bnsurgery.load(path, arch="tests.models:keyword_tutorial")
    assert torch.equal(output(loaded, X), output(net.eval(), X))


@pytest.mark.parametrize("how", ["compiled", "data_parallel"])
@pytest.mark.parametrize("surgery", ["fold", "freeze", "recalibrate", "survey"])
def test_a_surgery_on_a_wrapped_model_works_on_the_model_inside(how, surgery, tmp_path):
    net = prepared(bnsurgery.load("tests.models:keyword_tutorial"))
    reference = copy.deepcopy(net)
    wrapped = _wrapped(net, how)
    if surgery == "survey":  # names as the model has them, not _orig_mod.bn or module.bn
        assert [i.name for i in bnsurgery.survey(wrapped, X).layers] == ["bn", "bn1d"]
        return
    result = {
        "fold": lambda w: bnsurgery.fold(w, X),
        "freeze": bnsurgery.freeze,
        "recalibrate": lambda w: bnsurgery.recalibrate(w, [X, X[:3]]),
    }[surgery](wrapped)
    assert result is wrapped
    report = bnsurgery.last_report(wrapped)
    assert report is bnsurgery.last_report(net)
    names = [getattr(e, "bn", e) for e in getattr(report, "folded", None) or []]
    assert all(not str(n).startswith(("_orig_mod", "module")) for n in names)
    path = bnsurgery.save(wrapped, tmp_path / "m.safetensors")
    loaded = bnsurgery.load(path, arch="tests.models:keyword_tutorial")
    assert type(loaded.bn) is type(net.bn)
    assert torch.allclose(output(loaded, X), output(net.eval(), X), atol=1e-6)
    if surgery != "recalibrate":
        assert_same_function(reference, loaded, (X,))


@pytest.mark.parametrize("first", [False, True])
def test_a_second_freeze_changes_whether_the_affine_trains(first, tmp_path):
    """README: freeze everything, then freeze(..., train_affine=True) on some layers frees
    their affine (statistics stay frozen); saved and loaded, the choice holds."""
    net = model()
    bnsurgery.freeze(net, train_affine=first)
    bnsurgery.freeze(net, include="bn1d", train_affine=not first)
    assert bnsurgery.last_report(net).changed == ["bn1d"]
    assert net.bn1d.weight.requires_grad is (not first)
    assert net.bn.weight.requires_grad is first
    path = bnsurgery.save(net, tmp_path / "f.safetensors", arch="tests.models:keyword_tutorial")
    loaded = bnsurgery.load(path, arch="tests.models:keyword_tutorial")
    assert loaded.bn1d.weight.requires_grad is (not first)
    assert loaded.bn.weight.requires_grad is first
    stats = net.bn1d.running_mean.clone()
    runs(net)
    assert torch.equal(net.bn1d.running_mean, stats)


def test_a_pickled_source_without_arch_is_refused_before_the_work(tmp_path, capsys):
    """A .safetensors output records the architecture; a pickled module has none: said before
    the surgery runs (no fold report printed), in the command line's words. A pickle output
    works."""
    from bnsurgery.cli import main

    torch.save(model(), tmp_path / "full.pt")
    args = ["fold", str(tmp_path / "full.pt"), "--trust-code", "--input-size", "3,4,4"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # the fold did not run
    err = captured.err
    assert "--arch" in err and "-o NAME.pt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "full.folded.safetensors").exists()
    assert main([*args, "-o", str(tmp_path / "folded.pt")]) == 0


@pytest.mark.parametrize(
    "extra, code, phrase",
    [
        (["--momentum", "0.5"], 2, "--momentum goes with --mode ema"),
        (["--mode", "ema", "--momentum", "0.5"], 0, "wrote"),
        (["--autocast", "bfloat16"], 0, "wrote"),
        (["--batches", "50"], 0, "the data held 3, all used"),
        (["--device", "xyz"], 2, "not a device"),
        (["--no-channels-last"], 0, "wrote"),
        (["--channels-last"], 11, "depends on the memory layout (a .view"),  # forced on .view
    ],
)
def test_recalibrate_options(extra, code, phrase, tmp_path, capsys):
    from bnsurgery.cli import main

    torch.save(torch.randn(6, 3, 4, 4), tmp_path / "d.pt")
    args = ["recalibrate", "tests.models:keyword_tutorial", "--data", str(tmp_path / "d.pt")]
    args += ["--batch-size", "2", "-o", str(tmp_path / "r.safetensors"), *extra]
    assert main(args) == code
    captured = capsys.readouterr()
    assert phrase in captured.out + captured.err


@pytest.mark.parametrize("how", ["groups_that_do_not_divide_a_later_bn", "factory_that_fails"])
def test_swap_is_all_or_nothing(how):
    """A BN that cannot be swapped puts back every one swapped before it."""
    from bnsurgery.errors import UsageError

    net = prepared(
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 10, 1), torch.nn.BatchNorm2d(10), torch.nn.Conv2d(10, 16, 1),
            torch.nn.BatchNorm2d(16),
        )
    )  # fmt: skip
    before = [type(m) for m in net.modules()]
    calls = []

    def factory(bn):
        calls.append(bn)
        if len(calls) == 2:
            raise RuntimeError("this factory cannot build the second one")
        return torch.nn.GroupNorm(1, bn.num_features)

    if how == "factory_that_fails":
        with pytest.raises(RuntimeError):
            bnsurgery.swap(net, factory)
    else:
        with pytest.raises(UsageError, match="does not divide 16"):
            bnsurgery.swap(net, "groupnorm", groups=5)
    assert [type(m) for m in net.modules()] == before


class HubFrozenBatchNorm2d(torch.nn.Module):
    """Hugging Face's ``DetrFrozenBatchNorm2d`` as transformers writes it: buffers only, no
    ``eps`` attribute, the epsilon hard-coded in the forward (``RTDetr...`` and others alike)."""

    def __init__(self, n: int, epsilon: float = 1e-5) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.epsilon = epsilon

    def forward(self, x):
        weight = self.weight.reshape(1, -1, 1, 1)
        bias = self.bias.reshape(1, -1, 1, 1)
        running_var = self.running_var.reshape(1, -1, 1, 1)
        running_mean = self.running_mean.reshape(1, -1, 1, 1)
        scale = weight * (running_var + self.epsilon).rsqrt()
        return x * scale + (bias - running_mean * scale)


class NotAFrozenBatchNorm2d(HubFrozenBatchNorm2d):
    """Named like a frozen BN, with its buffers, but its forward is something else."""

    def forward(self, x):
        return x * self.weight.reshape(1, -1, 1, 1).abs().sqrt()


class HubBackbone(torch.nn.Module):
    def __init__(self, norm=HubFrozenBatchNorm2d) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = norm(6)
        self.head = torch.nn.Linear(6 * 16, 4)

    def forward(self, pixel_values):
        x = torch.relu(self.bn(self.conv(pixel_values)))
        return self.head(x.view(x.size(0), -1))


@pytest.mark.parametrize("epsilon", [1e-5, 1e-3, 0.1])
def test_hugging_face_frozen_bn_is_a_bn_with_its_own_epsilon(epsilon):
    from bnsurgery.norms import bn_stats, eps_of, is_batchnorm

    bn = HubFrozenBatchNorm2d(4, epsilon)
    assert is_batchnorm(bn) and eps_of(bn) == epsilon
    assert bn_stats(bn).eps == epsilon
    assert not is_batchnorm(NotAFrozenBatchNorm2d(4))
    meta = HubFrozenBatchNorm2d(4, epsilon).to("meta")  # how load builds models: no values
    assert is_batchnorm(meta) and eps_of(meta) == epsilon


def test_every_surgery_on_hugging_face_frozen_bn(tmp_path):
    net = prepared(HubBackbone())
    fold_net = copy.deepcopy(net)
    bnsurgery.fold(fold_net, X)
    assert [e.bn for e in bnsurgery.last_report(fold_net).folded] == ["bn"]
    assert isinstance(fold_net.bn, torch.nn.Identity)
    assert_same_function(net, fold_net, (X,))

    frozen = bnsurgery.freeze(copy.deepcopy(net))
    assert isinstance(frozen.bn, HubFrozenBatchNorm2d)  # already frozen: left, with its reason
    assert "already frozen" in dict(bnsurgery.last_report(frozen).left)["bn"]

    trainable = bnsurgery.swap(copy.deepcopy(net), "batchnorm")
    assert type(trainable.bn) is torch.nn.BatchNorm2d and trainable.bn.eps == 1e-5
    assert_same_function(net, trainable, (X,), tol=1e-6)
    runs(trainable)

    grouped = bnsurgery.swap(copy.deepcopy(net), "groupnorm", calibrate=[X])
    assert isinstance(grouped.bn, torch.nn.GroupNorm)
    runs(grouped)

    info = {b.name: b for b in bnsurgery.survey(net, X).layers}
    assert set(info) == {"bn"} and info["bn"].eps == 1e-5


class YoloConv(torch.nn.Module):
    """ultralytics' ``Conv`` as it is written: conv, ``bn`` and act, and the fused forward its
    model's ``fuse()`` switches to after folding ``bn`` itself by reading its tensors."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c2)
        self.act = torch.nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


def yolo_fuse(model: torch.nn.Module) -> torch.nn.Module:
    """ultralytics' ``BaseModel.fuse``: every Conv that still has a ``bn`` gets it folded in."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    for m in model.modules():
        if isinstance(m, YoloConv) and hasattr(m, "bn"):
            bn = m.bn
            m.conv.weight, m.conv.bias = fuse_conv_bn_weights(
                m.conv.weight, m.conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                bn.bias,
            )  # fmt: skip
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


def test_a_models_own_bn_fuser_still_runs_after_fold():
    net = prepared(torch.nn.Sequential(YoloConv(3, 8), YoloConv(8, 4)))
    reference = copy.deepcopy(net)
    bnsurgery.fold(net, X)
    assert len(bnsurgery.last_report(net).folded) == 2
    assert_same_function(reference, net, (X,))
    folded_twice = yolo_fuse(copy.deepcopy(net))  # what YOLO.predict does before predicting
    assert not any(hasattr(m, "bn") for m in folded_twice.modules() if isinstance(m, YoloConv))
    assert torch.equal(output(folded_twice, X), output(net, X))  # the leftover is an exact 1


def test_fold_tells_that_torchvisions_fuse_model_cannot_follow():
    from torchvision.models import quantization

    net = prepared(quantization.resnet18(weights=None, quantize=False))
    x = torch.randn(1, 3, 32, 32)
    bnsurgery.fold(net, x)
    assert any("fuse_model()" in n for n in bnsurgery.last_report(net).notes)


@pytest.mark.parametrize("surgery", ["fold", "freeze", "swap_frozen", "swap_groupnorm"])
def test_a_hook_the_architecture_registers_fires_after_save_and_load(surgery, tmp_path):
    spec = "tests.models:hooked_in_init"
    net = prepared(bnsurgery.load(spec))
    {
        "fold": lambda n: bnsurgery.fold(n, X),
        "freeze": bnsurgery.freeze,
        "swap_frozen": lambda n: bnsurgery.swap(n, "frozen"),
        "swap_groupnorm": lambda n: bnsurgery.swap(n, "groupnorm"),
    }[surgery](net)
    loaded = bnsurgery.load(bnsurgery.save(net, tmp_path / "m.safetensors"), arch=spec)
    assert type(loaded.bn) is type(net.bn)
    before = loaded.shift.calls
    torch.testing.assert_close(output(loaded, X), output(net.eval(), X))
    assert loaded.shift.calls == before + 1


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    features: torch.Tensor


class DataclassOut(torch.nn.Module):
    """Returns a dataclass holding the conv's output itself: the BN after it cannot fold
    into that conv without changing ``features``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        pre = self.conv(x)
        return Out(logits=self.bn(pre).mean((2, 3)), features=pre)


@pytest.mark.parametrize("verify", [True, False])
def test_a_dataclass_output_is_an_output(verify):
    net = prepared(DataclassOut())
    reference = copy.deepcopy(net)
    bnsurgery.fold(net, X, verify=verify)
    left = dict((s.bn, s.reason) for s in bnsurgery.last_report(net).left)
    assert "model output" in left["bn"]
    got, expected = output(net, X), output(reference, X)
    assert torch.equal(got.features, expected.features) and torch.equal(got.logits, expected.logits)


class BranchAfterBN(torch.nn.Module):
    """The BN's output goes to one of two 1x1 convs, chosen by the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.a, self.b = torch.nn.Conv2d(3, 2, 1), torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.bn(torch.relu(self.stem(x)))
        return self.a(y) if x.mean() > 0 else self.b(y)


class BranchBeforeBN(torch.nn.Module):
    """The conv's output is normalised or not, chosen by the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) if x.mean() > 0 else y


@pytest.mark.parametrize("cls", [BranchAfterBN, BranchBeforeBN])
def test_fold_does_not_cross_a_data_dependent_branch(cls):
    net = prepared(cls()).double()
    reference = copy.deepcopy(net)
    up = torch.randn(2, 3, 4, 4, dtype=torch.float64) + 1
    bnsurgery.fold(net, up)
    left = {s.bn: s.reason for s in bnsurgery.last_report(net).left}
    assert "data-dependent Python branch" in left["bn"], left
    for x in (up, up - 2):  # both ways through the branch: the same function
        assert_same_function(reference, net, (x,), tol=1e-12)


def test_a_branch_elsewhere_does_not_stop_a_fold():
    net = prepared(BranchAfterBN())
    net.bn = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))
    prepared(net)
    bnsurgery.fold(net, X[:, :3])
    assert [e.bn for e in bnsurgery.last_report(net).folded] == ["bn.1"]


class FlattensTwoWays(torch.nn.Module):
    """Flattens with .flatten on some inputs and with .view on others (only .view fails on a
    channels-last tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 16, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = y.flatten(1) if x.mean() > 0 else y.view(y.size(0), -1)
        return self.fc(y)


def test_recalibrate_stays_in_the_default_layout_for_a_model_that_branches_on_values():
    net = prepared(FlattensTwoWays())
    batches = [torch.randn(4, 3, 4, 4) + 1, torch.randn(4, 3, 4, 4) - 1]
    bnsurgery.recalibrate(net, batches)
    notes = bnsurgery.last_report(net).notes
    assert any("branches on tensor values (Tensor.__bool__)" in n for n in notes), notes


class PooledHead(torch.nn.Module):
    """A BatchNorm2d after global pooling: it sees one value per channel and sample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.head_bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        y = self.head_bn(self.pool(torch.relu(self.bn(self.conv(x)))))
        return self.fc(y.view(y.size(0), -1))


@pytest.mark.parametrize("how", ["example_inputs", "calibrate", "cli"])
def test_groupnorm_after_global_pooling_groups_enough_channels(how, tmp_path):
    net = prepared(PooledHead())
    if how == "cli":
        from bnsurgery.cli import main

        src = bnsurgery.save(
            net, tmp_path / "n.safetensors", arch="tests.test_user_code:PooledHead"
        )
        out = tmp_path / "g.safetensors"
        spec = ["--arch", "tests.test_user_code:PooledHead", "--input-size", "3,4,4"]
        assert main(["swap", str(src), *spec, "--to", "groupnorm", "-o", str(out)]) == 0
        net = bnsurgery.load(out, arch="tests.test_user_code:PooledHead")
    elif how == "example_inputs":
        bnsurgery.swap(net, "groupnorm", example_inputs=X)
    else:
        bnsurgery.swap(net, "groupnorm", calibrate=iter([X, X]))  # a generator: not consumed
        assert bnsurgery.last_report(net).calibrated
    assert net.bn.num_groups == 8  # spatial input: up to 32 groups, one channel each
    assert net.head_bn.num_groups == 1  # (N, C, 1, 1): at least 16 channels, or all of them
    net.train()
    net(X[:1]).sum().backward()  # batch size 1 trains


def test_a_swap_probe_that_fails_is_one_clear_error():
    from bnsurgery.errors import TraceError

    with pytest.raises(TraceError, match="example inputs failed"):
        bnsurgery.swap(prepared(PooledHead()), "groupnorm", example_inputs=torch.randn(1, 5, 4, 4))


def test_swap_to_instancenorm_passes_empty_batches_and_pickles(tmp_path):
    net = bnsurgery.swap(prepared(Branchy()), "instancenorm")
    for m in net.modules():
        if isinstance(m, torch.nn.InstanceNorm2d):
            assert m(torch.randn(0, m.num_features, 3, 3)).shape[0] == 0
    with torch.no_grad():
        y, head = net.eval()(X)
    assert head.shape[0] == 0 and torch.isfinite(y).all()
    net.train()(X[:2])[0].sum().backward()
    torch.save(net, tmp_path / "n.pt")
    assert type(torch.load(tmp_path / "n.pt", weights_only=False).bn) is type(net.bn)
