"""Files from strangers: what a file may cause is decided by its kind and the user's flags.

Each case runs the real entry point and checks the guarantees (``tests/hostile.py``): the exit
code, one stderr line, no traceback, every input byte-identical, nothing new in the folders,
and, where the file carries a payload, that the marker file the payload would create does not
exist.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import bnsurgery
from bnsurgery.errors import SourceError, UnsafeCodeError

from .hostile import (
    ARCH,
    COMMANDS,
    OUTPUT,
    RESOURCE,
    SOURCE,
    UNSAFE,
    UNSUPPORTED,
    USAGE,
    check,
    command_args,
    run_cli,
    snapshot,
)

pytestmark = pytest.mark.hostile


def with_record(world: dict[str, Path], name: str, record: Any, raw: str | None = None) -> Path:
    """The world's model weights under bnsurgery metadata of our choosing."""
    path = world["in"] / name
    meta = {"bnsurgery": raw if raw is not None else json.dumps(record), "format": "pt"}
    save_file(load_file(str(world["model"])), str(path), metadata=meta)
    return path


def record_of(arch: str, **extra: Any) -> dict[str, Any]:
    return {"version": 1, "arch": arch, "steps": [], "structure": [], **extra}


def run_case(capsys, world, args, expected, message=None, written=()) -> str:
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, args)
    check(code, err, expected, before, snapshot(world["in"], world["out"]), written, message)
    assert not world["marker"].exists(), "the file's payload ran"
    return err


# ------------------------------------------------------------ architecture records that run code


def _payloads(world: dict[str, Path]) -> dict[str, str]:
    marker, out = world["marker"], world["out"]
    return {
        "subprocess": f"subprocess:run(args=['touch', {str(marker)!r}])",
        "os_system": f"os:system(command='touch {marker}')",
        "builtins_open_itself": f"builtins:open(file={str(world['in'] / 'code.safetensors')!r}, "
        "mode='w')",
        "torch_load_pickle": f"torch:load(f={str(world['malicious_pickle'])!r}, "
        "weights_only=False)",
        "sys_exit": "sys:exit(status=0)",
        "shutil_rmtree": f"shutil:rmtree(path={str(out)!r})",
    }


PAYLOADS = (
    "subprocess",
    "os_system",
    "builtins_open_itself",
    "torch_load_pickle",
    "sys_exit",
    "shutil_rmtree",
)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_recorded_callable_never_runs(payload, command, world, capsys):
    """Metadata naming any callable is refused (exit 4) before anything is imported."""
    path = with_record(world, "code.safetensors", record_of(_payloads(world)[payload]))
    args = command_args(command, world, path, name_arch=False)
    err = run_case(capsys, world, args, UNSAFE, "--trust-code")
    assert "--arch" in err


@pytest.mark.parametrize("payload", PAYLOADS)
def test_recorded_callable_never_runs_from_the_api(payload, world):
    path = with_record(world, "code.safetensors", record_of(_payloads(world)[payload]))
    before = snapshot(world["in"], world["out"])
    with pytest.raises(UnsafeCodeError):
        bnsurgery.load(path)
    assert snapshot(world["in"], world["out"]) == before
    assert not world["marker"].exists()


def test_the_users_arch_replaces_the_record_and_the_output_does_not_spread_it(world, capsys):
    """With --arch naming another factory, the record is ignored; the output records the
    user's architecture, not the file's."""
    path = with_record(world, "code.safetensors", record_of(_payloads(world)["subprocess"]))
    args = command_args("freeze", world, path)  # names tests.models:simple_cnn
    result = world["out"] / "result-freeze.safetensors"
    run_case(capsys, world, args, 0, written=(str(result),))
    from safetensors import safe_open

    with safe_open(str(result), framework="pt") as f:
        assert json.loads(f.metadata()["bnsurgery"])["arch"] == ARCH


def test_a_recorded_factory_is_built_with_trust_code(world, capsys):
    """The control: the world's own file (recording tests.models:simple_cnn) loads without
    --arch once the user allows code."""
    args = command_args("inspect", world, world["model"], name_arch=False)
    run_case(capsys, world, [*args], UNSAFE, "--arch tests.models:simple_cnn")
    run_case(capsys, world, [*args, "--trust-code"], 0)
    run_case(capsys, world, [*args, "--trust-pickle"], 0)  # the old name of the flag


def test_naming_the_factory_keeps_the_recorded_options(world, tmp_path):
    """--arch pkg.module:factory without options builds the file's recorded options."""
    model = bnsurgery.load("tests.models:simple_cnn(width=8)")
    path = bnsurgery.save(model, tmp_path / "eight.safetensors")
    loaded = bnsurgery.load(path, arch="tests.models:simple_cnn")
    assert loaded.conv1.out_channels == 8


def test_a_written_file_records_the_options_it_was_loaded_with(world, capsys):
    """--arch naming the factory alone: the output records the file's options, not the bare
    name (which would not fit the weights)."""
    path = bnsurgery.save(
        bnsurgery.load("tests.models:simple_cnn(width=8)"), world["in"] / "eight.safetensors"
    )
    args = command_args("freeze", world, path)
    result = world["out"] / "result-freeze.safetensors"
    run_case(capsys, world, args, 0, written=(str(result),))
    assert bnsurgery.load(result, arch=ARCH).conv1.out_channels == 8
    from safetensors import safe_open

    with safe_open(str(result), framework="pt") as f:
        assert json.loads(f.metadata()["bnsurgery"])["arch"] == "tests.models:simple_cnn(width=8)"


# ------------------------------------------------------- registry records: allow-listed options

REGISTRY_RECORDS = {
    "pretrained": ("timm:resnet18(pretrained=True)", "pretrained=True"),
    "pretrained_cfg_overlay": (
        "timm:resnet18(pretrained_cfg_overlay={'file': '/etc/passwd'})",
        "pretrained_cfg_overlay",
    ),
    "checkpoint_path": ("timm:resnet18(checkpoint_path='/etc/passwd')", "checkpoint_path"),
    "torchvision_weights": ("torchvision:resnet18(weights='DEFAULT')", "weights"),
    "torchvision_progress": ("torchvision:resnet18(progress=True)", "progress"),
    "too_many_classes": ("timm:resnet18(num_classes=600000)", "num_classes=600000"),
    "bool_as_count": ("timm:resnet18(num_classes=True)", "num_classes=True"),
    "unknown_model": ("timm:no_such_model_at_all", "does not list"),
    "unknown_torchvision": ("torchvision:no_such_model", "does not list"),
    "two_calls": ("timm:resnet18(num_classes=10)(num_classes=2)", "not one call"),
    "double_star": ("timm:resnet18(**{'pretrained': True})", "not a keyword argument"),
    "not_a_literal": ("timm:resnet18(num_classes=__import__('os'))", "not a literal"),
}


@pytest.mark.parametrize("command", ["inspect", "fold"])
@pytest.mark.parametrize("case", sorted(REGISTRY_RECORDS))
def test_registry_records_are_allow_listed(case, command, world, capsys):
    arch, phrase = REGISTRY_RECORDS[case]
    path = with_record(world, "registry.safetensors", record_of(arch))
    args = command_args(command, world, path, name_arch=False)
    run_case(capsys, world, args, SOURCE, phrase)


@pytest.mark.parametrize(
    "arch, head",
    [
        ("timm:resnet50(num_classes=100000)", "fc.bias"),
        # its constructor computes widths from tensor values: it cannot run on the meta device
        ("torchvision:regnet_x_400mf(num_classes=100000)", "fc.bias"),
    ],
    ids=["timm_resnet50", "torchvision_regnet"],
)
def test_a_tiny_file_cannot_make_us_build_a_huge_model(arch, head, world, capsys, monkeypatch):
    """A 200-byte file naming a model with 100,000 classes is refused after a build whose
    weights all live on the meta device, before any weights are allocated."""
    path = world["in"] / "tiny.safetensors"
    save_file(
        {head: torch.zeros(4)}, str(path), metadata={"bnsurgery": json.dumps(record_of(arch))}
    )
    assert path.stat().st_size < 300
    from bnsurgery import safemodel

    builds = []
    real_build, registration = safemodel.build, torch.nn.Module.register_parameter

    def spying_build(spec, **kwargs):
        model = real_build(spec, **kwargs)
        builds.append({t.device.type for t in [*model.parameters(), *model.buffers()]})
        return model

    monkeypatch.setattr(safemodel, "build", spying_build)
    args = command_args("inspect", world, path, name_arch=False)
    run_case(capsys, world, args, SOURCE, f"{head} (4,) vs (100000,)")
    assert builds == [{"meta"}], builds  # built once, weightless; never for real
    assert torch.nn.Module.register_parameter is registration  # the patch is undone


# --------------------------------------------------------------------- malformed metadata

MALFORMED = {
    # case: (the bnsurgery metadata as raw text, a phrase of the one line)
    "not_json": ("{", "not JSON"),
    "a_list": ("[]", "not a mapping"),
    "deep_nesting": ("[" * 100_000 + "]" * 100_000, "not JSON"),
    "arch_not_a_string": (json.dumps(record_of(ARCH) | {"arch": 3}), "arch is not a string"),
    "future_version": (json.dumps(record_of(ARCH) | {"version": 2}), "version 2"),
    "structure_not_a_list": (json.dumps(record_of(ARCH, structure={"a": 1})), "structure"),
    "unknown_edit": (
        json.dumps(record_of(ARCH, structure=[{"replace": "bn1", "with": "pickle"}])),
        "unknown edit kind",
    ),
    "swap_option_not_allowed": (
        json.dumps(
            record_of(
                ARCH,
                structure=[
                    {"replace": "bn1", "with": "swap:groupnorm", "options": {"factory": "os"}}
                ],
            )
        ),
        "option factory",
    ),
    "swap_on_a_conv": (
        json.dumps(record_of(ARCH, structure=[{"replace": "conv1", "with": "swap:groupnorm"}])),
        "does not fit",
    ),
    "edit_of_a_missing_module": (
        json.dumps(record_of(ARCH, structure=[{"replace": "nope", "with": "identity"}])),
        "does not fit",
    ),
    "edit_path_not_a_path": (
        json.dumps(record_of(ARCH, structure=[{"replace": "bn1/../x", "with": "identity"}])),
        "names no module path",
    ),
    "huge_bias": (
        json.dumps(record_of(ARCH, structure=[{"add_bias": "conv1", "channels": 10**12}])),
        "add_bias",
    ),
    "bias_that_does_not_fit": (
        json.dumps(record_of(ARCH, structure=[{"add_bias": "conv1", "channels": 1 << 20}])),
        "do not fit",
    ),
    "unknown_step": (json.dumps(record_of(ARCH, steps=[{"op": "exec"}])), "unknown step"),
    "step_with_a_strange_field": (
        json.dumps(record_of(ARCH, steps=[{"op": "freeze", "code": "x"}])),
        "field code",
    ),
    "steps_not_a_list": (json.dumps(record_of(ARCH, steps="fold")), "steps"),
}


@pytest.mark.parametrize("command", ["inspect", "fold", "freeze"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata(case, command, world, capsys):
    raw, phrase = MALFORMED[case]
    path = with_record(world, "malformed.safetensors", None, raw=raw)
    run_case(capsys, world, command_args(command, world, path), SOURCE, phrase)


# ----------------------------------------------------------------------------- TorchScript


class SideEffect(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by ``torch.jit.load``) creates a file."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        created = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8)
        self.seen = int(created.fill_(1).sum())


def _side_effecting_archive(world: dict[str, Path], name: str) -> Path:
    path = world["in"] / name
    torch.jit.script(SideEffect(str(world["marker"]))).save(str(path))
    assert not world["marker"].exists()
    return path


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", ["evil.ts", "evil.pth", "evil.pt", "evil.safetensors"])
def test_torchscript_runs_nothing_without_trust(name, command, world, capsys):
    """A TorchScript archive runs code when loaded, whatever its suffix: refused (exit 4)."""
    path = _side_effecting_archive(world, name)
    run_case(capsys, world, command_args(command, world, path), UNSAFE, "TorchScript")


def test_torchscript_payload_control(world, capsys):
    """The control: with --trust-code the archive does run (so the cases above would see it),
    and fold refuses TorchScript with its own code (8)."""
    path = _side_effecting_archive(world, "evil.ts")
    code, _, err = run_cli(capsys, [*command_args("inspect", world, path), "--trust-code"])
    assert code == 0, err
    assert world["marker"].exists()
    world["marker"].unlink()
    args = [*command_args("fold", world, path), "--trust-code"]
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, args)
    world["marker"].unlink()
    check(code, err, UNSUPPORTED, before, snapshot(world["in"], world["out"]), (), "TorchScript")


def test_torchscript_as_weights_is_never_loaded(world, capsys):
    path = _side_effecting_archive(world, "weights.pt")
    args = ["fold", ARCH, "--weights", str(path), "--input-size", "3,16,16"]
    args += ["-o", str(world["out"] / "x.safetensors"), "--trust-code"]
    run_case(capsys, world, args, SOURCE, "not a state dict")


# ------------------------------------------------------------------------- zips torch did not write


def _state_dict_zip(world: dict[str, Path], name: str) -> Path:
    path = world["in"] / name
    torch.save(load_file(str(world["model"])), path)
    return path


def _recompressed(world: dict[str, Path]) -> Path:
    plain = _state_dict_zip(world, "plain.pt")
    path = world["in"] / "deflated.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    plain.unlink()
    return path


def _central_entries(data: bytes) -> list[int]:
    """Offsets of the central directory headers of a zip."""
    found, at = [], data.find(b"PK\x01\x02")
    while at != -1:
        found.append(at)
        at = data.find(b"PK\x01\x02", at + 4)
    return found


def _size_claimed_beyond_the_file(world: dict[str, Path]) -> Path:
    path = _state_dict_zip(world, "inflated.pt")
    data = bytearray(path.read_bytes())
    for at in _central_entries(bytes(data)):
        name_length = struct.unpack_from("<H", data, at + 28)[0]
        name = bytes(data[at + 46 : at + 46 + name_length])
        if name.endswith(b"/data/0"):
            struct.pack_into("<II", data, at + 20, 2**31, 2**31)  # compressed, uncompressed
    path.write_bytes(bytes(data))
    return path


def _overlapping_members(world: dict[str, Path]) -> Path:
    """Every member's central entry points at the largest member's data: each fits in the file,
    together they claim many times its size."""
    path = _state_dict_zip(world, "overlapping.pt")
    data = bytearray(path.read_bytes())
    entries = _central_entries(bytes(data))
    largest = max(entries, key=lambda at: struct.unpack_from("<I", data, at + 24)[0])
    sizes = struct.unpack_from("<II", data, largest + 20)
    offset = struct.unpack_from("<I", data, largest + 42)[0]
    for at in entries:
        struct.pack_into("<II", data, at + 20, *sizes)
        struct.pack_into("<I", data, at + 42, offset)
    path.write_bytes(bytes(data))
    return path


ZIPS = {
    "compressed_member": (_recompressed, "compressed"),
    "member_beyond_the_file": (_size_claimed_beyond_the_file, "beyond the file"),
    "overlapping_members": (_overlapping_members, "overlapping"),
}


@pytest.mark.parametrize("command", ["inspect", "fold"])
@pytest.mark.parametrize("case", sorted(ZIPS))
def test_zips_torch_did_not_write_are_refused_before_inflating(case, command, world, capsys):
    make, phrase = ZIPS[case]
    path = make(world)
    run_case(capsys, world, command_args(command, world, path), SOURCE, phrase)


def test_a_torch_zip_is_checked_before_torch_reads_it(world, monkeypatch):
    """The zip check runs first: torch.load never sees the deflated file."""
    path = _recompressed(world)
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(SourceError, match="compressed"):
        bnsurgery.load(path, arch=ARCH)
    assert calls == []


# ------------------------------------------------------- command-line values: documented codes

BAD_VALUES = {
    # case: (command, extra arguments, exit code, a phrase of the one line)
    "batch_size_zero": ("fold", ["--batch-size", "0"], USAGE, "--batch-size"),
    "batch_size_huge": ("fold", ["--batch-size", str(10**30)], USAGE, "--batch-size"),
    "batch_size_zero_calibrate": (
        "swap",
        ["--to", "groupnorm", "--calibrate", "DATA", "--batch-size", "0"],
        USAGE,
        "--batch-size",
    ),
    "seed_overflows": ("fold", ["--seed", str(2**70)], USAGE, "--seed"),
    "seed_negative": ("fold", ["--seed", "-1"], USAGE, "--seed"),
    "input_size_huge": (
        "fold",
        ["--input-size", "3,100000,100000", "--batch-size", "4096"],
        RESOURCE,
        "example inputs",
    ),
    "input_size_not_numbers": ("fold", ["--input-size", "3,a,b"], USAGE, "--input-size"),
    "input_size_digits": ("fold", ["--input-size", "9" * 5000], USAGE, "--input-size"),
    "swap_to_a_path": ("swap", ["--to", "../x"], USAGE, "--to"),
    "tolerance_nan": ("fold", ["--tolerance", "nan"], USAGE, "--tolerance"),
    "tolerance_zero": ("fold", ["--tolerance", "0"], USAGE, "--tolerance"),
    "stages_zero": ("freeze", ["--stages", "0"], USAGE, "--stages"),
    "groups_zero": ("swap", ["--to", "groupnorm", "--groups", "0"], USAGE, "--groups"),
    "newline_in_a_choice": ("swap", ["--to", "group\nnorm"], USAGE, "--to"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_have_their_code(case, world, capsys):
    command, extra, expected, phrase = BAD_VALUES[case]
    args = command_args(command, world, world["model"])
    extra = [str(world["data"]) if a == "DATA" else a for a in extra]
    if "--to" in extra and "--to" in args:
        at = args.index("--to")
        del args[at : at + 2]
    run_case(capsys, world, [*args, *extra], expected, phrase)


def test_a_newline_in_a_path_stays_one_line(world, capsys):
    missing = world["in"] / "two\nlines.safetensors"
    run_case(capsys, world, command_args("inspect", world, missing), SOURCE, "no such file")


SPECS = {
    "double_star": ("timm:resnet18(**{'num_classes': 3})", "not a keyword argument"),
    "two_calls": ("timm:resnet18(num_classes=10)(num_classes=2)", "not one call"),
    "positional": ("timm:resnet18(10)", "positional argument"),
    "call_in_value": ("timm:resnet18(num_classes=int('3'))", "not a literal"),
    "repeated": ("timm:resnet18(num_classes=1, num_classes=2)", "given twice"),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_spec_strings_are_one_call_of_keyword_literals(case, world, capsys):
    spec, phrase = SPECS[case]
    run_case(capsys, world, ["inspect", spec], USAGE, phrase)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command(where, world, capsys):
    args = command_args("inspect", world, world["model"])
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    run_case(capsys, world, args, 0)


def test_outputs_are_checked_before_a_stranger_file_is_read(world, capsys):
    """An existing output is reported first (exit 5) even for a file that would be refused."""
    path = _side_effecting_archive(world, "evil.ts")
    args = command_args("fold", world, path)
    Path(args[args.index("-o") + 1]).write_bytes(b"precious")
    run_case(capsys, world, args, OUTPUT, "--force")


@pytest.mark.parametrize(
    "failure",
    [
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB."),
    ],
    ids=["MemoryError", "torch_allocator"],
)
def test_running_out_of_memory_is_not_an_internal_error(failure, world, capsys, monkeypatch):
    from bnsurgery import checkpoint

    def exhausted(*args, **kwargs):
        raise failure

    monkeypatch.setattr(checkpoint, "load", exhausted)
    run_case(capsys, world, command_args("fold", world, world["model"]), RESOURCE, "memory")


@pytest.mark.parametrize("role", ["source", "weights", "data", "calibrate"])
@pytest.mark.parametrize("kind", ["fifo", "directory_as_file"])
def test_inputs_that_are_not_regular_files(kind, role, world, capsys):
    """A FIFO would block a reader forever: every input is refused unless it is a regular file
    (or, for data, a folder of images)."""
    import os

    path = world["in"] / "odd"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    out = str(world["out"] / "x.safetensors")
    if role == "source":
        args = ["fold", str(path), "--arch", ARCH, "--input-size", "3,16,16", "-o", out]
    elif role == "weights":
        args = ["fold", ARCH, "--weights", str(path), "--input-size", "3,16,16", "-o", out]
    elif role == "data":
        args = [*command_args("recalibrate", world, world["model"])]
        args[args.index("--data") + 1] = str(path)
    else:
        args = command_args("swap", world, world["model"], name_arch=True)
        args[args.index("--to") + 1] = "groupnorm"
        args += ["--calibrate", str(path)]
    expected = 11 if kind == "directory_as_file" and role in ("data", "calibrate") else SOURCE
    before = snapshot(world["out"])
    code, _, err = run_cli(capsys, args)
    check(code, err, expected, before, snapshot(world["out"]))


@pytest.mark.parametrize("value", ["", "x\0y.safetensors"], ids=["empty", "nul"])
@pytest.mark.parametrize("option", ["-o", "--plot"])
def test_output_paths_that_are_not_paths(option, value, world, capsys):
    args = command_args("recalibrate", world, world["model"])
    if option == "-o":
        args[args.index("-o") + 1] = value
    else:
        args += ["--plot", value]
    run_case(capsys, world, args, USAGE, option)
