"""One thread running callbacks at deadlines (expects-response timeouts, restarts)."""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("host.timer.timers")


class Timers:
    """Cancel by handle. A cancelled entry lets go of its callback at once (it may hold a finished
    process and all its memory) and is skipped when due."""

    def __init__(self):
        self._heap: list = []
        self._entries: dict[int, list] = {}
        self._seq = itertools.count()
        self._cv = threading.Condition()
        threading.Thread(target=self._run, name="timers", daemon=True).start()

    def add(self, delay: float, fn: Callable[[], None]) -> int:
        handle = next(self._seq)
        entry = [time.monotonic() + delay, handle, fn]
        with self._cv:
            self._entries[handle] = entry
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:  # the thread sleeps until the earliest deadline: wake it only for a new one
                self._cv.notify()
        return handle

    def cancel(self, handle: int | None) -> None:
        if handle is not None:
            with self._cv:
                entry = self._entries.pop(handle, None)
                if entry is not None:
                    entry[2] = None

    def __len__(self) -> int:
        return len(self._entries)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, handle, fn = heapq.heappop(self._heap)
                self._entries.pop(handle, None)
            if fn is None:
                continue
            try:
                fn()
            except Exception:
                log.exception("timer callback failed")
