"""Hostile input to the command line: every case, for every command it applies to.

Each case is a test. It runs the real entry point (``bnsurgery.cli.main``; the cases marked
*subprocess* run ``python -m bnsurgery`` itself) and checks the guarantees README promises:

* the documented exit code (README, "Exit codes");
* on failure, exactly one line on stderr, and never a traceback;
* every input file byte-identical afterwards;
* no output on failure, and no partial or temporary file left behind: the folder tree is
  exactly what it was, apart from the outputs of a command that succeeded.

The counts go to the test summary (``tests/tally.py``).
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
import tempfile
from pathlib import Path

import pytest
import torch

import bnsurgery

from .hostile import (
    ARCH,
    COMMANDS,
    INTERRUPTED,
    NOTHING,
    OUTPUT,
    SOURCE,
    STATISTICS,
    UNSAFE,
    WRITERS,
    Payload,
    check,
    cli_subprocess,
    command_args,
    run_cli,
    snapshot,
)

pytestmark = pytest.mark.hostile


# ----------------------------------------------------------------------------- bad sources

BAD_SOURCES = {
    # case: (exit code, a phrase the one line must contain)
    "missing": (SOURCE, "no such file"),
    "directory": (SOURCE, "is a directory"),
    "empty": (SOURCE, "empty"),
    "random_bytes": (SOURCE, None),
    "truncated_safetensors": (SOURCE, None),
    "zip_not_checkpoint": (SOURCE, None),
    "other_architecture": (SOURCE, "missing keys (first conv1.weight)"),
    "shape_mismatch": (SOURCE, "conv1.weight"),
    "malicious_pickle": (UNSAFE, "--trust-code"),
}


def _source_path(case: str, world: dict[str, Path]) -> Path:
    if case == "missing":
        return world["in"] / "missing.safetensors"
    if case == "directory":
        return world["in"]
    return world[case]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source(case, command, world, capsys):
    expected, message = BAD_SOURCES[case]
    args = command_args(command, world, _source_path(case, world))
    if case in ("other_architecture", "shape_mismatch"):
        args += ["--arch", "tests.models:simple_cnn"]
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, args)
    check(code, err, expected, before, snapshot(world["in"], world["out"]), message=message)
    if case == "other_architecture":
        assert "unexpected keys (first fc.weight)" in err, err
    assert not world["marker"].exists(), "the pickle payload ran"


# ------------------------------------------------------------------ valid, but nothing to do

NO_BN_EXPECTED = {"inspect": 0, **{c: NOTHING for c in WRITERS}}


@pytest.mark.parametrize("command", COMMANDS)
def test_model_without_bn(command, world, capsys):
    before = snapshot(world["in"], world["out"])
    code, out, err = run_cli(capsys, command_args(command, world, world["no_bn"]))
    check(code, err, NO_BN_EXPECTED[command], before, snapshot(world["in"], world["out"]))
    if command == "inspect":
        assert "0 BatchNorm" in out or "no BatchNorm" in out, out
    else:
        assert "no BatchNorm layer" in err


# ---------------------------------------------------------------------- broken statistics

BROKEN_STATS_EXPECTED = {
    "inspect": 0,  # it reports them
    "fold": STATISTICS,
    "freeze": STATISTICS,
    "swap": STATISTICS,  # to frozen: the statistics would be kept
    "unfreeze": NOTHING,  # nothing frozen
    "recalibrate": 0,  # the cure
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", ["nan_stats", "inf_stats"])
def test_non_finite_statistics(case, command, world, capsys):
    expected = BROKEN_STATS_EXPECTED[command]
    before = snapshot(world["in"], world["out"])
    code, out, err = run_cli(capsys, command_args(command, world, world[case]))
    result = world["out"] / f"result-{command}.safetensors"
    written = (str(result),) if expected == 0 and command != "inspect" else ()
    message = "bn1: running_var is" if expected == STATISTICS else None
    check(code, err, expected, before, snapshot(world["in"], world["out"]), written, message)
    if command == "inspect":
        assert ("NaN" if case == "nan_stats" else "inf") in out, out
    if command == "recalibrate":
        fixed = bnsurgery.load(result, arch=ARCH)
        assert torch.isfinite(fixed.bn1.running_var).all()


# ---------------------------------------------------------------------------- bad outputs


def _read_only_folder(tmp: Path) -> Path:
    folder = tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:  # root ignores permissions: fall back to a read-only file system
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return folder
    os.close(fd)
    os.unlink(name)
    for candidate in ("/sys", "/proc/sys"):
        try:
            fd, name = tempfile.mkstemp(dir=candidate)
        except OSError:
            return Path(candidate)
        os.close(fd)
        os.unlink(name)
    pytest.skip("no read-only folder available to this user")


BAD_OUTPUTS = ("missing_folder", "read_only_folder", "is_the_input", "exists")


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("case", BAD_OUTPUTS)
def test_bad_output(case, command, world, tmp_path, capsys):
    source = world["frozen" if command == "unfreeze" else "model"]
    args = command_args(command, world, source)
    out_at = args.index("-o") + 1
    if case == "missing_folder":
        args[out_at] = str(world["out"] / "no" / "such" / "folder" / "m.safetensors")
        message = "does not exist"
    elif case == "read_only_folder":
        args[out_at] = str(_read_only_folder(tmp_path) / "m.safetensors")
        message = "cannot write"
    elif case == "is_the_input":
        args[out_at] = str(source)
        message = "is the input"
    else:
        Path(args[out_at]).write_bytes(b"precious")
        message = "--force"
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, args)
    check(code, err, OUTPUT, before, snapshot(world["in"], world["out"]), message=message)


@pytest.mark.parametrize("command", WRITERS)
def test_interrupted_write_leaves_nothing(command, world, capsys, monkeypatch):
    """Ctrl-C in the middle of writing the output: exit 130, no output, no temporary file."""
    from safetensors import torch as st_torch

    def half_then_interrupt(model, filename, metadata=None, force_contiguous=False):
        Path(filename).write_bytes(b"\0" * 1000)  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(st_torch, "save_model", half_then_interrupt)
    source = world["frozen" if command == "unfreeze" else "model"]
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, command_args(command, world, source))
    check(code, err, INTERRUPTED, before, snapshot(world["in"], world["out"]), message="interr")


EXPORTS = (".onnx", ".pt2")


def _export_args(world: dict[str, Path], out: Path | str) -> list[str]:
    args = command_args("fold", world, world["model"])
    args[args.index("-o") + 1] = str(out)
    return args


@pytest.mark.parametrize("suffix", EXPORTS)
@pytest.mark.parametrize("case", ["missing_folder", "read_only_folder", "exists", "is_a_folder"])
def test_bad_export_output(case, suffix, world, tmp_path, capsys):
    """A deployment artifact's output obeys the rules every output does (exit 5, one line,
    nothing written), after the export and its check, which take the longest."""
    out = world["out"] / f"m{suffix}"
    message = {"missing_folder": "does not exist", "read_only_folder": "cannot write"}.get(case)
    if case == "missing_folder":
        out = world["out"] / "no" / "such" / f"m{suffix}"
    elif case == "read_only_folder":
        out = _read_only_folder(tmp_path) / f"m{suffix}"
    elif case == "exists":
        out.write_bytes(b"precious")
        message = "--force"
    else:
        out.mkdir()
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, _export_args(world, out))
    check(code, err, OUTPUT, before, snapshot(world["in"], world["out"]), message=message)
    if case == "exists":
        assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("suffix", EXPORTS)
def test_interrupted_export_leaves_nothing(suffix, world, capsys, monkeypatch):
    """Ctrl-C while the written artifact is loaded back and checked: exit 130, no output,
    no temporary file."""
    from bnsurgery import exporting

    def interrupt(tmp, *args, **kwargs):
        assert Path(tmp).stat().st_size > 0  # the whole file is there, not yet published
        raise KeyboardInterrupt

    monkeypatch.setattr(exporting, "_check", interrupt)
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, _export_args(world, world["out"] / f"m{suffix}"))
    check(code, err, INTERRUPTED, before, snapshot(world["in"], world["out"]), message="interr")


def _limit_file_size() -> None:  # runs in the child: a real "disk full" (EFBIG) past 64 KiB
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, fmt",
    [
        *((c, f) for c in ("fold", "freeze", "swap") for f in (".safetensors", ".pt", ".ts")),
        *(("fold", f) for f in EXPORTS),  # freeze and swap write an artifact the same way
    ],
)
def test_full_disk_subprocess(command, fmt, world):
    """The OS refuses the write half way (file size limit): exit 5, nothing left behind."""
    args = command_args(command, world, "timm:resnet18")
    args[args.index("-o") + 1] = str(world["out"] / f"big{fmt}")
    args += ["--input-size", "3,32,32"] if command != "fold" else []
    args = [a if a != "3,16,16" else "3,32,32" for a in args]
    before = snapshot(world["in"], world["out"])
    result = cli_subprocess(args, preexec_fn=_limit_file_size)
    check(result.returncode, result.stderr, OUTPUT, before, snapshot(world["in"], world["out"]))
    assert "write failed" in result.stderr, result.stderr


# ------------------------------------------------------------------------ the real program

SUBPROCESS_CASES = {
    "missing": SOURCE,
    "random_bytes": SOURCE,
    "malicious_pickle": UNSAFE,
    "no_bn": NOTHING,
    "nan_stats": STATISTICS,
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_real_program_one_line(case, world):
    """``python -m bnsurgery``: what a user sees, warnings and all."""
    source = world["in"] / "missing.pt" if case == "missing" else world[case]
    before = snapshot(world["in"], world["out"])
    result = cli_subprocess(command_args("fold", world, source))
    after = snapshot(world["in"], world["out"])
    check(result.returncode, result.stderr, SUBPROCESS_CASES[case], before, after)
    assert not world["marker"].exists(), "the pickle payload ran"


def test_pickle_payload_runs_only_with_the_flag(world, capsys):
    """The control: with --trust-pickle the same file does run its payload (so the other
    tests would have seen it)."""
    args = command_args("inspect", world, world["malicious_pickle"])
    run_cli(capsys, [*args, "--trust-code"])
    assert world["marker"].exists()


def test_pickle_module_payload(world, capsys):
    """A raw pickle (not a torch zip) with a payload: refused the same way."""
    raw = world["in"] / "raw.pkl"
    raw.write_bytes(pickle.dumps(Payload(world["marker"]), protocol=4))
    before = snapshot(world["in"], world["out"])
    code, _, err = run_cli(capsys, command_args("fold", world, raw))
    check(code, err, UNSAFE, before, snapshot(world["in"], world["out"]))
    assert not world["marker"].exists()
