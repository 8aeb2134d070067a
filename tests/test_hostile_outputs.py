"""Hostile outputs: an output can never destroy an input, and nothing partial is left behind.

Every path a command writes (``-o``, ``--plot``) is compared with every path it reads (the
source, ``--weights``, ``--data``, ``--calibrate``, the images of a data folder, the module of a
``package.module:factory`` spec) by file identity, so a hard link, a symbolic link or another
spelling of an input is refused even with ``--force``; special files are never replaced; a
file that appears while the output is written is not clobbered; SIGTERM and SIGHUP clean up
like Ctrl-C. Each CLI case checks the exit code, the one stderr line, that every input is
byte-identical and that the folder tree holds nothing new (:func:`tests.hostile.check`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bnsurgery
from bnsurgery import checkpoint, outputs
from bnsurgery.errors import OutputError
from bnsurgery.outputs import (
    atomic_write,
    check_outputs,
    identity,
    input_identities,
    temporary_prefix,
)

from .hostile import OUTPUT, ROOT, USAGE, WRITERS, check, command_args, run_cli
from .models import SimpleCNN

pytestmark = pytest.mark.hostile

SPEC = "tests.models:simple_cnn"
SIZE = ("--input-size", "3,16,16")


def _tree(*roots: Path) -> dict[str, str]:
    """Like :func:`tests.hostile.snapshot`, but safe with special files: every entry under the
    roots (folders, links and special files included) with its digest or kind, without
    following links or opening anything but regular files."""
    found = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    found[str(path)] = "link -> " + os.readlink(path)
                else:
                    found[str(path)] = f"mode {stat.S_IFMT(st.st_mode):o}"
    return found


def _args(command: str, world: dict[str, Path], out: Path | str, source=None) -> list[str]:
    """``command_args`` with ``-o out``; fold and swap get the small input size."""
    source = world["frozen" if command == "unfreeze" else "model"] if source is None else source
    args = command_args(command, world, source)
    args[args.index("-o") + 1] = str(out)
    return args


def _run(capsys, world, args, expected, message=None, written=(), drop=()):
    """Run in-process and check every guarantee; ``drop``: entries replaced on purpose."""
    roots = (world["in"], world["out"])
    before = _tree(*roots)
    for path in drop:
        before.pop(str(path), None)
    code, out, err = run_cli(capsys, args)
    check(code, err, expected, before, _tree(*roots), tuple(map(str, written)), message)
    return out, err


def _safetensors_complete(path: Path) -> None:
    """A complete safetensors file of the small model (read without bnsurgery's loader)."""
    from safetensors.torch import load_file

    state = load_file(str(path))  # fails on a truncated file
    assert state["conv1.weight"].shape == SimpleCNN().conv1.weight.shape, sorted(state)


# ------------------------------------------------------------------ an input by another name


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("how", ["hard_link", "symlink", "other_spelling"])
@pytest.mark.parametrize("command", WRITERS)
def test_output_is_the_source_by_another_name(command, how, force, world, capsys):
    source = world["frozen" if command == "unfreeze" else "model"]
    out = world["out"] / "alias.safetensors"
    if how == "hard_link":
        os.link(source, out)
    elif how == "symlink":
        out.symlink_to(source)
    else:
        out = world["out"] / ".." / "in" / "." / source.name
    args = _args(command, world, out) + (["--force"] if force else [])
    _run(capsys, world, args, OUTPUT, message="is the input")


def test_output_is_the_data(world, capsys):
    args = [*_args("recalibrate", world, world["data"]), "--force"]
    _run(capsys, world, args, OUTPUT, message=f"is the input {world['data']}")


def test_output_is_the_calibration_data(world, capsys):
    args = ["swap", world["model"], "--to", "groupnorm", "--calibrate", world["data"]]
    args += ["-o", world["data"], "--force"]
    _run(capsys, world, args, OUTPUT, message="is the input")


def test_output_is_the_weights(world, capsys):
    weights = world["in"] / "weights.pt"
    torch.save(SimpleCNN().state_dict(), weights)
    args = ["fold", SPEC, "--weights", weights, "-o", weights, "--force", *SIZE]
    _run(capsys, world, args, OUTPUT, message=f"is the input {weights}")


@pytest.mark.parametrize("where", ["source", "arch"])
def test_output_is_the_module_of_a_spec(where, world, capsys, monkeypatch):
    module = world["in"] / "bns_hostile_nets.py"
    module.write_text("from tests.models import simple_cnn as build\n")
    monkeypatch.syspath_prepend(str(world["in"]))
    if where == "source":
        args = ["fold", "bns_hostile_nets:build", *SIZE]
    else:
        state = world["in"] / "state.pt"
        torch.save(SimpleCNN().state_dict(), state)
        args = ["fold", state, "--arch", "bns_hostile_nets:build", *SIZE]
    args += ["-o", module, "--format", "safetensors", "--force"]
    _run(capsys, world, args, OUTPUT, message="bns_hostile_nets.py")


def _image_folder(world: dict[str, Path]) -> Path:
    from PIL import Image

    folder = world["in"] / "images"
    (folder / "class_a").mkdir(parents=True)
    for i in range(3):
        colour = (40 * i, 100, 200 - 40 * i)
        Image.new("RGB", (20, 20), colour).save(folder / "class_a" / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize("option", ["-o", "--plot"])
def test_output_is_an_image_of_the_data_folder(option, world, capsys):
    folder = _image_folder(world)
    image = folder / "class_a" / "img1.png"
    args = _args("recalibrate", world, world["out"] / "m.safetensors", source=world["model"])
    args[args.index("--data") + 1] = str(folder)
    if option == "-o":
        args[args.index("-o") + 1] = str(image)
        args += ["--format", "safetensors"]
    else:
        args += ["--plot", str(image)]
    _run(capsys, world, [*args, "--force", *SIZE], OUTPUT, message=f"is the input {image}")


def test_outputs_inside_the_data_folder_are_allowed(world, capsys):
    """Only the files a folder is read from are protected, not the folder: a new output in
    it, or a file in it that is not read (not an image), may be written."""
    folder = _image_folder(world)
    out, notes = folder / "adapted.safetensors", folder / "notes.txt"
    args = _args("recalibrate", world, out, source=SPEC)
    args[args.index("--data") + 1] = str(folder)
    _run(capsys, world, [*args, *SIZE], 0, written=(out,))
    _safetensors_complete(out)
    args[args.index("-o") + 1] = str(notes)
    args += ["--format", "safetensors", "--force"]
    _run(capsys, world, [*args, *SIZE], 0, written=(out, notes), drop=(notes,))
    _safetensors_complete(notes)


# ------------------------------------------------------------------------------- --plot


def _plot_args(world, plot, source=None, out=None) -> list[str]:
    out = world["out"] / "r.safetensors" if out is None else out
    args = _args("recalibrate", world, out, source=SPEC if source is None else source)
    return [*args, "--plot", str(plot), *SIZE]


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("which", ["model", "data"])
def test_plot_is_an_input(which, force, world, capsys):
    args = _plot_args(world, world[which], source=world["model"])
    _run(capsys, world, args + (["--force"] if force else []), OUTPUT, message="is the input")


def test_plot_is_a_symlink_to_an_input(world, capsys):
    link = world["out"] / "drift.png"
    link.symlink_to(world["data"])
    args = _plot_args(world, link, source=world["model"])
    _run(capsys, world, [*args, "--force"], OUTPUT, message="is the input")


def test_plot_exists_is_checked_before_loading(world, capsys):
    """Without --force an existing plot is refused before the model is loaded: the source
    here does not even exist (exit 3 if it were loaded first)."""
    plot = world["out"] / "drift.png"
    plot.write_bytes(b"an older plot")
    args = _plot_args(world, plot, source=world["in"] / "missing.safetensors")
    _run(capsys, world, args, OUTPUT, message="--force")


def test_plot_is_the_output(world, capsys):
    out = world["out"] / "same.png"
    args = [*_plot_args(world, out, out=out), "--format", "safetensors"]
    _run(capsys, world, args, OUTPUT, message="is also the output")
    other = world["out"] / "." / "same.png"  # another spelling of the same name
    args = [*_plot_args(world, other, out=out), "--format", "safetensors", "--force"]
    _run(capsys, world, args, OUTPUT, message="is also the output")


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_plot_in_a_missing_folder_or_a_directory(force, world, capsys):
    args = _plot_args(world, world["out"] / "no" / "such" / "p.png", source=world["model"])
    _run(capsys, world, args + (["--force"] if force else []), OUTPUT, "does not exist")
    args = _plot_args(world, world["in"], source=world["model"])
    _run(capsys, world, args + (["--force"] if force else []), OUTPUT, "is a directory")


def test_plot_without_matplotlib_is_a_usage_error_before_loading(world, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    args = _plot_args(world, world["out"] / "p.png", source=world["in"] / "missing.pt")
    _run(capsys, world, args, USAGE, message="matplotlib")


def test_plot_written_and_replaced_only_with_force(world, capsys):
    plot, out = world["out"] / "drift.png", world["out"] / "r.safetensors"
    _run(capsys, world, _plot_args(world, plot), 0, written=(plot, out))
    assert plot.read_bytes().startswith(b"\x89PNG")
    plot.write_bytes(b"an older plot")
    out.unlink()
    args = [*_plot_args(world, plot), "--force"]
    _run(capsys, world, args, 0, written=(plot, out), drop=(plot,))
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_plot_is_removed_when_the_model_cannot_be_written(world, capsys, monkeypatch):
    """The plot is written first; if the model then fails, the new plot goes too."""
    from safetensors import torch as st_torch

    def disk_full(model, filename, metadata=None, force_contiguous=False):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st_torch, "save_model", disk_full)
    _run(capsys, world, _plot_args(world, world["out"] / "p.png"), OUTPUT, "No space left")


def test_drift_plot_honours_force(tmp_path):
    from bnsurgery.report import drift_plot

    model = bnsurgery.load(SPEC)
    bnsurgery.recalibrate(model, [torch.randn(4, 3, 8, 8)])
    report = bnsurgery.last_report(model)
    plot = tmp_path / "p.png"
    plot.write_bytes(b"keep")
    with pytest.raises(OutputError, match="--force"):
        drift_plot(report, str(plot))
    assert plot.read_bytes() == b"keep"
    drift_plot(report, str(plot), force=True)
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert sorted(os.listdir(tmp_path)) == ["p.png"]


# ------------------------------------------------------------------------- special targets


def _special(kind: str, path: Path, monkeypatch) -> None:
    if kind == "device":
        try:  # the same device as /dev/null, made here: /dev itself is never touched
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        except (PermissionError, OSError) as exc:
            pytest.skip(f"cannot make a device node here ({exc})")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        monkeypatch.chdir(path.parent)  # a short name: socket paths are limited to ~108 bytes
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path.name)
        server.close()  # the socket file stays
    elif kind == "symlink_to_directory":
        target = path.parent / "a-folder"
        target.mkdir()
        path.symlink_to(target)
    elif kind == "symlink_to_fifo":
        os.mkfifo(path.parent / "a-fifo")
        path.symlink_to(path.parent / "a-fifo")


SPECIALS = {
    "device": "is a device",
    "fifo": "is a FIFO",
    "directory": "is a directory",
    "socket": "is a socket",
    "symlink_to_directory": "symbolic link to a directory",
    "symlink_to_fifo": "symbolic link to a FIFO",
}


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("kind", sorted(SPECIALS))
def test_special_file_target_is_never_replaced(kind, force, world, capsys, monkeypatch):
    target = world["out"] / "special.safetensors"
    _special(kind, target, monkeypatch)
    args = _args("fold", world, target) + (["--force"] if force else [])
    _, err = _run(capsys, world, args, OUTPUT, message=SPECIALS[kind])
    assert "never replaced" in err or "directory" in err


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_special_file_as_plot_is_never_replaced(kind, world, capsys, monkeypatch):
    target = world["out"] / "p.png"
    _special(kind, target, monkeypatch)
    args = [*_plot_args(world, target, source=world["model"]), "--force"]
    _run(capsys, world, args, OUTPUT, message=SPECIALS[kind])


def test_dangling_symlink_counts_as_existing(world, capsys):
    link, target = world["out"] / "link.safetensors", world["out"] / "target.safetensors"
    link.symlink_to(target)
    args = _args("fold", world, link, source=SPEC)
    _run(capsys, world, args, OUTPUT, message="already exists")
    _run(capsys, world, [*args, "--force"], 0, written=(link,), drop=(link,))
    assert not link.is_symlink() and link.is_file()
    assert not target.exists() and not target.is_symlink(), "wrote through the link"
    _safetensors_complete(link)


def test_symlink_to_a_file_is_replaced_as_a_link(world, capsys):
    elsewhere = world["out"] / "elsewhere.bin"
    elsewhere.write_bytes(b"not ours to change")
    link = world["out"] / "link.safetensors"
    link.symlink_to(elsewhere)
    args = _args("fold", world, link, source=SPEC)
    _run(capsys, world, [*args, "--force"], 0, written=(link,), drop=(link,))
    assert not link.is_symlink()
    assert elsewhere.read_bytes() == b"not ours to change"


# ------------------------------------------------------------------------------ long names


@pytest.mark.parametrize("length", [252, 255])
def test_longest_output_names_work(length, world, capsys):
    out = world["out"] / ("m" * (length - len(".safetensors")) + ".safetensors")
    assert len(out.name) == length
    _run(capsys, world, _args("fold", world, out, source=SPEC), 0, written=(out,))
    _safetensors_complete(out)


def test_multibyte_name_temporary_fits(tmp_path):
    name = "é" * 120 + ".safetensors"  # 252 bytes, 132 characters
    assert len(os.fsencode(name)) == 252
    seen = []

    def write(tmp: str) -> None:
        seen.append(Path(tmp).name)
        Path(tmp).write_bytes(b"data")

    atomic_write(tmp_path / name, write)
    assert len(os.fsencode(seen[0])) <= 255
    assert seen[0].startswith(".é") and seen[0].endswith(".tmp")
    assert os.listdir(tmp_path) == [name]


def test_temporary_prefix():
    assert temporary_prefix("m.safetensors") == ".m.safetensors."
    for name_max in (255, 143, 20):
        prefix = temporary_prefix("x" * 300, name_max)
        assert len(prefix) + 8 + len(".tmp") == name_max
    assert temporary_prefix("é" * 200, 255).count("é") == (255 - 14) // 2
    assert temporary_prefix("abc", 5) == ".a."  # never empty


# ------------------------------------------------------------------------ no-clobber races


def _appear(out: Path, what: str):
    """A writer that, once its temporary file is complete, lets another file appear at
    ``out`` (another process winning the race)."""

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(b"ours, complete")
        if what == "file":
            out.write_bytes(b"theirs")
        elif what == "dangling":
            out.symlink_to(out.parent / "nowhere")
        elif what == "fifo":
            os.mkfifo(out)
        else:
            out.mkdir()

    return write


def _no_hard_links(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(outputs.os, "link", refuse)


PUBLISH = ["link", "renameat2", "exclusive_create"]


def _publish_by(how: str, monkeypatch) -> None:
    if how != "link":
        _no_hard_links(monkeypatch)
    if how == "renameat2" and outputs._renameat2() is None:
        pytest.skip("no renameat2 in this C library")
    if how == "exclusive_create":
        monkeypatch.setattr(outputs, "_renameat2", lambda: None)


@pytest.mark.parametrize("what", ["file", "dangling"])
@pytest.mark.parametrize("how", PUBLISH)
def test_target_appearing_while_writing_is_not_clobbered(how, what, tmp_path, monkeypatch):
    _publish_by(how, monkeypatch)
    out = tmp_path / "m.safetensors"
    with pytest.raises(OutputError, match="already exists; pass --force"):
        atomic_write(out, _appear(out, what))
    if what == "file":
        assert out.read_bytes() == b"theirs"
    else:
        assert out.is_symlink() and not out.exists()
    assert os.listdir(tmp_path) == ["m.safetensors"], "a temporary file was left"


@pytest.mark.parametrize("how", PUBLISH)
def test_publish_without_force(how, tmp_path, monkeypatch):
    _publish_by(how, monkeypatch)
    out = tmp_path / "m.bin"
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(b"complete"))
    assert out.read_bytes() == b"complete"
    assert os.listdir(tmp_path) == ["m.bin"]
    assert out.stat().st_nlink == 1


@pytest.mark.parametrize("what", ["fifo", "directory"])
def test_special_file_appearing_while_writing_is_not_replaced_with_force(what, tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.raises(OutputError, match="not a regular file"):
        atomic_write(out, _appear(out, what), force=True)
    assert stat.S_ISFIFO(os.lstat(out).st_mode) if what == "fifo" else out.is_dir()
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_target_appearing_during_a_command(world, capsys, monkeypatch):
    """The whole command: the output appears between the up-front check and the publish;
    exactly the new file is refused (exit 5), the other one is intact, no temporary file."""
    from safetensors import torch as st_torch

    out = world["out"] / "race.safetensors"
    real = st_torch.save_model

    def save_then_lose_the_race(model, filename, metadata=None, force_contiguous=False):
        real(model, filename, metadata=metadata)
        out.write_bytes(b"the other writer's complete file")

    monkeypatch.setattr(st_torch, "save_model", save_then_lose_the_race)
    args = _args("fold", world, out, source=SPEC)
    _run(capsys, world, args, OUTPUT, message="already exists", written=(out,))
    assert out.read_bytes() == b"the other writer's complete file"


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_two_writers_exactly_one_wins(world, tmp_path):
    """Two real processes write the same output without --force: one exits 0, the other 5,
    and the output is one complete file."""
    out = world["out"] / "race.safetensors"
    args = [sys.executable, "-m", "bnsurgery", *_args("fold", world, out, source=SPEC)]
    before = _tree(world["in"], world["out"])
    procs = [
        subprocess.Popen(
            args,
            env=_environment(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        results.append((p.returncode, err))
    codes = sorted(code for code, _ in results)
    assert codes == [0, OUTPUT], results
    loser = next(err for code, err in results if code == OUTPUT)
    after = _tree(world["in"], world["out"])
    check(OUTPUT, loser, OUTPUT, before, after, (str(out),), "already exists")
    _safetensors_complete(out)


# --------------------------------------------------------------------------------- signals

_SLOW_WRITER = """
import signal, sys, time
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as on a terminal, even if the tests run nohup
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from pathlib import Path
from safetensors import torch as st_torch

def half_then_wait(model, filename, metadata=None, force_contiguous=False):
    Path(filename).write_bytes(b"\\0" * 1000)  # half-written
    time.sleep(120)

st_torch.save_model = half_then_wait
from bnsurgery.cli import main
sys.exit(main(sys.argv[1:]))
"""


_SLOW_EXPORT = """
import signal, sys, time
signal.signal(signal.SIGHUP, signal.SIG_DFL)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from bnsurgery import exporting

def check_slowly(*args, **kwargs):  # the artifact written to its temporary file, not checked
    time.sleep(120)

exporting._check = check_slowly
from bnsurgery.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _signal_while_writing(script, args, signame, expected, world, tmp_path, wait=120):
    """Run ``script`` (a CLI whose write stalls once its temporary file exists) on ``args``,
    signal it there, and check it leaves nothing and says so in one line."""
    before = _tree(world["in"], world["out"])
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=_environment(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + wait
        while not any(p.name.endswith(".tmp") for p in world["out"].iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.05)
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = _tree(world["in"], world["out"])
    check(proc.returncode, err, expected, before, after, message=f"terminated ({signame})")
    assert "no output was written" in err


@pytest.mark.slow
@pytest.mark.parametrize(("suffix", "signame", "expected"), [(".onnx", "SIGTERM", 143)])
def test_signal_during_an_export_check_leaves_nothing(suffix, signame, expected, world, tmp_path):
    args = _args("fold", world, world["out"] / f"result{suffix}", source=SPEC)
    _signal_while_writing(_SLOW_EXPORT, args, signame, expected, world, tmp_path, wait=180)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "signame", "expected"), [("fold", "SIGTERM", 143), ("freeze", "SIGHUP", 129)]
)
def test_signal_during_write_leaves_nothing(command, signame, expected, world, tmp_path):
    out = world["out"] / f"result-{command}.safetensors"
    args = _args(command, world, out, source=SPEC)
    args += [] if command == "fold" else list(SIZE)
    _signal_while_writing(_SLOW_WRITER, args, signame, expected, world, tmp_path)


def test_main_restores_signal_handlers_and_keeps_ignored_ones(world, capsys, monkeypatch):
    from bnsurgery import cli
    from bnsurgery.errors import SourceError

    seen = {}

    def record(*args, **kwargs):
        seen["term"] = signal.getsignal(signal.SIGTERM)
        seen["hup"] = signal.getsignal(signal.SIGHUP)
        raise SourceError("stop here")

    monkeypatch.setattr(cli.job, "load_model", record)
    term_before = signal.getsignal(signal.SIGTERM)
    hup_before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        code, _, _ = run_cli(capsys, command_args("inspect", world, world["model"]))
        assert signal.getsignal(signal.SIGTERM) == term_before
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, hup_before)
    assert code == 3
    assert seen["term"] == cli.signals.terminate
    assert seen["hup"] == signal.SIG_IGN


def test_terminated_maps_to_its_exit_code(world, capsys, monkeypatch):
    """In-process: a signal raised in the middle of a write (the handler's exception)."""
    from safetensors import torch as st_torch

    from bnsurgery import cli

    def half_then_terminated(model, filename, metadata=None, force_contiguous=False):
        Path(filename).write_bytes(b"\0" * 1000)
        cli.signals.terminate(signal.SIGTERM, None)

    monkeypatch.setattr(st_torch, "save_model", half_then_terminated)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    args = _args("fold", world, world["out"] / "m.safetensors", source=SPEC)
    _run(capsys, world, args, 143, message="terminated (SIGTERM)")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == previous


# ---------------------------------------------------------------------- outputs.py, alone


def test_checkpoint_reexports_the_output_functions():
    assert checkpoint.atomic_write is outputs.atomic_write
    assert checkpoint.exists is outputs.exists
    assert checkpoint.is_dir is outputs.is_dir


def test_input_identities(tmp_path, monkeypatch):
    data = tmp_path / "d.pt"
    data.write_bytes(b"x")
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.JPG").write_bytes(b"jpg")
    (folder / "readme.txt").write_bytes(b"txt")
    module = tmp_path / "bns_identity_nets.py"
    module.write_text("def build():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = input_identities(
        [
            data,
            str(folder),
            "bns_identity_nets:build(x=1)",
            "timm:resnet18",
            "no_such_package_xyz.sub:f",
            "not a spec at all",
            None,
            "",
        ]
    )
    assert found == {
        identity(data): str(data),
        identity(folder / "sub" / "a.JPG"): str(folder / "sub" / "a.JPG"),
        identity(module): str(module),
    }


def test_identity(tmp_path):
    a = tmp_path / "a"
    a.write_bytes(b"x")
    (tmp_path / "hard").hardlink_to(a)
    (tmp_path / "soft").symlink_to(a)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert identity(a) == identity(tmp_path / "hard") == identity(tmp_path / "soft")
    assert identity(tmp_path / "dangling") is None
    assert identity(tmp_path / "x\0y") is None


def test_check_outputs(tmp_path):
    a = tmp_path / "a.pt"
    a.write_bytes(b"x")
    check_outputs([tmp_path / "new.pt", tmp_path / "other.png"], [a], force=False)
    check_outputs([tmp_path / "new.pt"], [str(tmp_path / "missing.pt")], force=False)
    with pytest.raises(OutputError, match="is the input"):
        check_outputs([a], [a], force=True)
    with pytest.raises(OutputError, match="already exists"):
        check_outputs([a], [], force=False)
    check_outputs([a], [], force=True)
    with pytest.raises(OutputError, match="is also the output"):
        check_outputs([tmp_path / "n.pt", tmp_path / "." / "n.pt"], [], force=True)
    (tmp_path / "hard.pt").hardlink_to(a)
    with pytest.raises(OutputError, match="same file as the output"):
        check_outputs([a, tmp_path / "hard.pt"], [], force=True)
    with pytest.raises(OutputError, match="cannot be used as an output"):
        check_outputs([tmp_path / ("x" * 300)], [], force=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_outputs([a / "under-a-file.pt"], [], force=True)
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "hard.pt"]


def test_atomic_write_cleans_up_on_base_exceptions(tmp_path):
    class Stop(BaseException):
        pass

    def interrupted(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise Stop

    with pytest.raises(Stop):
        atomic_write(tmp_path / "m.pt", interrupted)
    assert os.listdir(tmp_path) == []
