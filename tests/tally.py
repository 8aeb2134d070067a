"""Counts the robustness suites report in the test summary (see ``conftest.py``).

Tests add to :data:`counts` at the point where they check something, so the summary says how
much was actually checked in this run: generated architectures per surgery, hostile CLI cases,
and the failures those suites look for (tracebacks, modified inputs, partial outputs), which
must stay at zero.
"""

from __future__ import annotations

from collections import Counter

counts: Counter[str] = Counter()
_seen: dict[str, set[str]] = {}

# generated architectures each property must check in a full run (the CI default)
MINIMUM_GENERATED = 200
SURGERIES = ("fold", "freeze", "fused freeze", "swap", "recalibrate", "save/load")
FAILURES = ("tracebacks seen", "inputs modified", "partial outputs")


def add(key: str, n: int = 1) -> None:
    counts[key] += n


def add_unique(key: str, item: object) -> None:
    """Count ``item`` under ``key`` once, however often it is checked (hypothesis replays
    examples while it shrinks a failure)."""
    seen = _seen.setdefault(key, set())
    text = repr(item)
    if text not in seen:
        seen.add(text)
        counts[key] += 1
