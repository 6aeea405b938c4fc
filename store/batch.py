"""Bulk work with Python's cyclic garbage collector paused.

A rules run makes hundreds of thousands of short-lived objects that reference counting frees;
the cyclic collections their allocation triggers walk every live object of a large process (a
daemon holding caches, a benchmark holding its data) and cost a fifth of the run. The collector
is process-wide, so nested and concurrent uses (a CLI command inside a pass, the daemon's
threads) keep it paused until the last one ends and then restore what it was.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_resume = False  # whether the collector was on when the first pause began


@contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
