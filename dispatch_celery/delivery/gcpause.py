"""Python's cyclic garbage collector, paused while an attempt runs.

An attempt allocates several container objects per event (the parsed entry, the bodies'
JSON, the record) and keeps all of them alive until the batch is committed, so the
collector's generation-0 passes (every 700 allocations) keep finding survivors, promote
them, and the older passes then walk every object of the worker again. Reference counting
frees all of it once the attempt ends: an attempt makes no reference cycles of its own
(an exception's traceback may, and the collector reclaims those after the pause). Measured
with ``python benchmarks/workercost.py``: the collector took ~15 % of an attempt's CPU.

The pause nests and is shared by the threads of a ``--pool threads`` worker: the collector
is re-enabled when the last concurrent attempt ends, and only if it was enabled before
(a caller that disabled it keeps it disabled). When attempts overlap without a gap for
long, a generation-0 pass still runs every ``_COLLECT_EVERY`` attempts, so garbage cycles
cannot pile up.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

_COLLECT_EVERY = 64


class _Pause:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0  # attempts running now
        self.resume = False  # whether the collector was enabled when the first one began
        self.ended = 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self.lock:
            if self.depth == 0:
                self.resume = gc.isenabled()
                gc.disable()
            self.depth += 1
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                self.ended += 1
                if self.depth == 0:
                    if self.resume:
                        gc.enable()
                elif self.resume and self.ended % _COLLECT_EVERY == 0:
                    gc.collect(0)


_pause = _Pause()


def paused() -> AbstractContextManager[None]:
    """The collector disabled for the duration (re-entrant, thread-safe)."""
    return _pause.paused()
