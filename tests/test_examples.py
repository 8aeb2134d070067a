"""The runnable examples in examples/ run, on scikit-learn's bundled digits, and say what
README says they show."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("finetune_frozen_bn.py", "with bnsurgery.freeze : shifted-domain accuracy"),
        ("recalibrate_domain_shift.py", "after recalibrate:"),
        ("swap_to_groupnorm.py", "GroupNorm, repaired"),
    ],
)
def test_example_runs(script, expected, tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout, done.stdout[-2000:]


@pytest.mark.slow
def test_fused_freeze_example_saves_memory_at_the_same_accuracy(tmp_path):
    import re

    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune_fused_freeze.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=True,
    )
    found = re.search(r"keeps ([\d.]+) of .* accuracy ([\d.]+) against ([\d.]+)", done.stdout)
    assert found, done.stdout
    ratio, fused, plain = (float(g) for g in found.groups())
    assert ratio < 0.75 and fused == plain and fused > 0.9
