"""The shared harness of the hostile-input suites (``tests/test_hostile*.py``).

Every case runs the real entry point (``bnsurgery.cli.main``, or ``python -m bnsurgery`` in a
subprocess) and :func:`check` asserts the guarantees README promises: the documented exit code,
one stderr line and no traceback, every input byte-identical, nothing new or partial in the
folder tree. The counts go to the test summary (``tests/tally.py``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import bnsurgery
from bnsurgery.cli import main

from . import tally
from .models import SimpleCNN, SimpleMLP

ROOT = Path(__file__).resolve().parents[1]
USAGE, SOURCE, UNSAFE, OUTPUT, TRACE, UNSUPPORTED, NOTHING, STATISTICS = 2, 3, 4, 5, 6, 8, 9, 10
DATA, RESOURCE, INTERRUPTED = 11, 12, 130
WRITERS = ("fold", "freeze", "unfreeze", "swap", "recalibrate")
COMMANDS = ("inspect", *WRITERS)


class Payload:
    """Unpickling this would create a file: the proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ------------------------------------------------------------------------------- the world


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    from bnsurgery.testing import randomize_bn

    return randomize_bn(model).eval()


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """Inputs in ``in/`` (a valid model, a frozen one, data, and every kind of bad file), and
    an empty ``out/``."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    torch.manual_seed(0)
    model = bnsurgery.load("tests.models:simple_cnn")
    _randomized(model)
    files = {"in": src, "out": out, "marker": tmp_path / "pwned"}
    files["model"] = bnsurgery.save(model, src / "model.safetensors")
    files["frozen"] = bnsurgery.save(bnsurgery.freeze(model), src / "frozen.safetensors")
    torch.save(torch.randn(8, 3, 16, 16), src / "data.pt")
    files["data"] = src / "data.pt"

    (src / "empty.pt").write_bytes(b"")
    files["empty"] = src / "empty.pt"
    files["random_bytes"] = src / "garbage.pt"
    files["random_bytes"].write_bytes(bytes((i * 167 + 13) % 256 for i in range(4096)))
    data = files["model"].read_bytes()
    files["truncated_safetensors"] = src / "cut.safetensors"
    files["truncated_safetensors"].write_bytes(data[: len(data) // 2])
    files["zip_not_checkpoint"] = src / "notes.pt"
    with zipfile.ZipFile(files["zip_not_checkpoint"], "w") as z:
        z.writestr("notes/data.txt", "not a checkpoint")
    files["other_architecture"] = src / "mlp.pt"
    torch.save(SimpleMLP().state_dict(), files["other_architecture"])
    state = SimpleCNN().state_dict()
    state["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    files["shape_mismatch"] = src / "wrong_shapes.pt"
    torch.save(state, files["shape_mismatch"])
    files["no_bn"] = bnsurgery.save(
        bnsurgery.load("tests.models:no_bn_net"), src / "no_bn.safetensors"
    )
    for case, value in (("nan_stats", float("nan")), ("inf_stats", float("inf"))):
        broken = bnsurgery.load(files["model"], arch=ARCH)
        broken.bn1.running_var[3] = value
        files[case] = bnsurgery.save(broken, src / f"{case}.safetensors")
    files["malicious_pickle"] = src / "model.pt"
    torch.save({"state_dict": SimpleCNN().state_dict(), "x": Payload(files["marker"])},
               files["malicious_pickle"])  # fmt: skip
    return files


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots, with its digest (hidden and temporary files included)."""
    found = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


#: The factory the world's files record; a file may have it built only when the user names it.
ARCH = "tests.models:simple_cnn"


def command_args(
    command: str, world: dict[str, Path], source: Path | str, *, name_arch: bool = True
) -> list[str]:
    """A complete, valid invocation of ``command`` on ``source``, writing into ``out/``.

    For a file source, ``--arch`` names the factory the world's file records, as its owner
    would (``name_arch=False`` leaves it out).
    """
    args = [command, str(source)]
    if name_arch and isinstance(source, Path):
        args += ["--arch", "tests.models:no_bn_net" if source == world.get("no_bn") else ARCH]
    if command == "inspect":
        return [*args, "--input-size", "3,16,16"]
    args += ["-o", str(world["out"] / f"result-{command}.safetensors")]
    if command == "fold":
        args += ["--input-size", "3,16,16"]
    elif command == "swap":
        args += ["--to", "frozen"]
    elif command == "recalibrate":
        args += ["--data", str(world["data"]), "--batch-size", "3", "--quiet"]
    return args


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check(
    code: int,
    err: str,
    expected: int,
    before: dict[str, str],
    after: dict[str, str],
    written: tuple[str, ...] = (),
    message: str | None = None,
) -> None:
    """The guarantees, counted as they are checked."""
    tally.add("hostile cases")
    if "Traceback" in err:
        tally.add("tracebacks seen")
    changed = [p for p in before if p in after and before[p] != after[p]]
    gone = [p for p in before if p not in after]
    if changed or gone:
        tally.add("inputs modified")
    new = sorted(set(after) - set(before) - set(written))
    if new:
        tally.add("partial outputs")
    assert "Traceback" not in err, err
    assert code == expected, f"exit {code}, expected {expected}: {err}"
    assert not changed and not gone, (changed, gone)
    assert not new, f"left behind: {new}"
    if expected != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"stderr is not one line: {err!r}"
        prefix = "nothing to do: " if expected == NOTHING else "error: "
        assert lines[0].startswith(prefix), lines[0]
        if message:
            assert message in lines[0], lines[0]


def cli_subprocess(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "bnsurgery", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        **kwargs,
    )
