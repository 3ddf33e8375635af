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
    timers.add(3.0, at("late", last=True))   # the thread now sleeps until 3 s...
    timers.add(0.5, at("middle"))            # ...and must wake for this earlier deadline
    timers.add(6.0, at("after"))             # (not waited for)
    timers.add(0.2, at("early"))
    assert done.wait(30)
    assert [name for name, _ in fired] == ["early", "middle", "late"]
    when = {name: t - t0 for name, t in fired}
    # never early; and `middle` fired long before the deadline the thread was sleeping towards
    # (the margins are seconds, so a busy machine's scheduling delays cannot fail this)
    assert when["early"] >= 0.2 and when["middle"] >= 0.5 and when["late"] >= 3.0
    assert when["middle"] < 2.5, when


def test_a_cancelled_timer_never_fires():
    timers = Timers()
    fired, done, at = _recorder()
    handle = timers.add(1.0, at("cancelled"))  # cancelled long before it is due
    timers.add(1.5, at("kept", last=True))
    timers.cancel(handle)
    assert done.wait(30)
    assert [name for name, _ in fired] == ["kept"]
    assert len(timers) == 0
