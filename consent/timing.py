"""Bulk-pass helpers: pausing the garbage collector, and optional per-step CPU timing for benchmarks.

``gc_paused`` is real work (it roughly halves the cost of fetching a million rows).
``step`` marks the phases of an import or a verification; it records nothing unless a
benchmark (``bench/bench_consent.py``) or a test sets :data:`STEP_CPU` to a dict, and
costs one global read otherwise. The markers must sit in the code they time, so they live
in the consent package; only the collection is switched on from outside.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["STEP_CPU", "gc_paused", "step"]

# CPU seconds per step of bulk import and verification, collected only when a benchmark
# sets this to a dict (``bench/bench_consent.py`` prints them); ``None`` costs nothing.
STEP_CPU: dict[str, float] | None = None


@contextmanager
def step(name: str) -> Iterator[None]:
    """Add the CPU time of the block to ``STEP_CPU[name]`` when collection is on."""
    steps = STEP_CPU
    if steps is None:
        yield
        return
    t0 = time.process_time()
    try:
        yield
    finally:
        steps[name] = steps.get(name, 0.0) + time.process_time() - t0


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a bulk pass over many records.

    Fetching a million rows allocates millions of tuples, each of which advances the
    collector's counters; its generation scans then cost about as much as the fetch
    itself. Nothing in these passes forms reference cycles (plain tuples, lists, str and
    bytes are freed by reference counting), so pausing changes no result.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
