"""Bulk work with Python's cyclic garbage collector paused.

A rules run makes hundreds of thousands of short-lived objects that reference counting frees;
the cyclic collections their allocation triggers walk every live object of a large process (a
daemon holding caches, a benchmark holding its data) and cost a fifth of the run. The collector
is process-wide; one rules run at a time uses this (a daemon runs its rules on one thread).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """The collector paused for the block, then as it was: a nested use leaves it to the outer."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
