"""Helpers shared by the benchmarks: memory of a fresh process, machine description."""

from __future__ import annotations

import os
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


# glibc malloc keeps freed memory in per-thread arenas and returns it at its own pace, so the
# peak RSS of one run scattered by +-50% from run to run (measured here). With one arena and
# every allocation above 64 KiB served by mmap (and unmapped when freed), the resident set
# follows the live tensors and the peak is the same to 0.1 MB in every run.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(script: str, args: list[str]) -> float:
    """Run ``script --child ...`` in a fresh process; it prints one number last."""
    out = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **MALLOC_ENV},
    )
    return float(out.stdout.strip().splitlines()[-1])


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {threads} threads, torch {torch.__version__}, timm {timm.__version__}"


def reset_peak() -> None:
    """Start a new peak: the kernel sets this process's high-water RSS to its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def high_water_mb() -> float:
    """Peak resident set size since the process started or :func:`reset_peak`, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
