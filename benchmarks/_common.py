"""Helpers shared by the benchmarks: memory of a fresh process, machine description."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
from pathlib import Path

import timm
import torch


def rss_mb() -> float:
    """Current resident set size of this process, in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, args: list[str]) -> float:
    """Run ``script --child ...`` in a fresh process; it prints one number last."""
    out = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {threads} threads, torch {torch.__version__}, timm {timm.__version__}"
