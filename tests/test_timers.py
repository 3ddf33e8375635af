"""The kernel's timer thread: request timeouts and process timers depend on it firing on time."""
from __future__ import annotations

import threading
import time

from host.kernel import Timers


def _recorder():
    fired: list[tuple[str, float]] = []
    done = threading.Event()

    def at(name: str, last: bool = False):
        def fn():
            fired.append((name, time.monotonic()))
            if last:
                done.set()
        return fn
    return fired, done, at


def test_timers_fire_in_deadline_order_whatever_the_order_they_were_added():
    timers = Timers()
    fired, done, at = _recorder()
    t0 = time.monotonic()
    timers.add(0.6, at("late", last=True))   # the thread now sleeps until 0.6 s...
    timers.add(0.3, at("middle"))            # ...and must wake for this earlier deadline
    timers.add(0.9, at("after"))             # (not waited for)
    timers.add(0.1, at("early"))
    assert done.wait(5)
    assert [name for name, _ in fired] == ["early", "middle", "late"]
    when = {name: t - t0 for name, t in fired}
    assert 0.1 <= when["early"] < 0.3 and 0.3 <= when["middle"] < 0.5 and 0.6 <= when["late"] < 0.8


def test_a_cancelled_timer_never_fires():
    timers = Timers()
    fired, done, at = _recorder()
    handle = timers.add(0.1, at("cancelled"))
    timers.add(0.3, at("kept", last=True))
    timers.cancel(handle)
    assert done.wait(5)
    assert [name for name, _ in fired] == ["kept"]
    assert len(timers) == 0
