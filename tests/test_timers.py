"""The kernel's timer thread: request timeouts and process timers depend on it firing on time."""
from __future__ import annotations

import threading
import time

from host.kernel.kernel import Timers


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


def test_the_timer_service_bounds_active_timers_per_process_and_in_all(tmp_path):
    """A process past its bound of active timers, or any past the node's, is refused with an error
    and a timeout at once; other processes keep setting timers, and a popped timer frees its slot."""
    import json

    from host.kernel.kernel import Kernel
    from host.messages import Address, KernelMessage, ProcessId, Request, SendErrorKind
    from host.runtime.wasm import Runtime
    from host.settings import runtime_from_environment
    from host.timer.service import TimerService

    class Terminal:
        def __init__(self) -> None:
            self.errors: list[str] = []

        def process_output(self, pid, text, verbosity=0) -> None: ...
        def info(self, text) -> None: ...

        def error(self, text) -> None:
            self.errors.append(text)

    class Setter:
        public = hears_network = trusted = False
        parent = current = current_blob = None

        def __init__(self, name: str) -> None:
            self.id = ProcessId(name, "timers", "test.os")
            self.address = Address("fake.dev", self.id)
            self.popped: list[int] = []
            self.failed: list[tuple[int, str]] = []
            self.got = threading.Event()

        def deliver(self, km) -> None:
            self.popped.append(km.id)
            self.got.set()

        def fail(self, mid: int, kind: str) -> None:
            self.failed.append((mid, kind))

        def has_cap(self, cap) -> bool:
            return False

        def fail_node(self, node, kind) -> None: ...
        def add_pending(self, mid, pending) -> None: ...
        def stop(self) -> None: ...

    terminal = Terminal()
    kernel = Kernel("fake.dev", tmp_path, Runtime(runtime_from_environment()), terminal)
    service = TimerService(kernel, per_process=3, total=5)
    kernel.register(service)
    greedy, other = Setter("greedy"), Setter("other")
    kernel.register(greedy)
    kernel.register(other)
    mid = iter(range(1, 1000))

    def set_timer(who: Setter, millis: int) -> int:
        m = next(mid)
        body = json.dumps({"SetTimer": millis}).encode()
        kernel.route(KernelMessage(m, who.address, service.address, None, Request(False, 60, body, None, [])), who)
        return m

    hour = 3600 * 1000
    first = [set_timer(greedy, hour) for _ in range(2)]
    short = set_timer(greedy, 200)
    refused = set_timer(greedy, hour)
    assert greedy.failed == [(refused, SendErrorKind.TIMEOUT)] and len(terminal.errors) == 1
    assert "3 active timers" in terminal.errors[0] and first[0] not in dict(greedy.failed)
    # a popped timer frees its slot: greedy sets one more once its short one has popped
    assert greedy.got.wait(30) and greedy.popped == [short]
    set_timer(greedy, hour)
    assert len(greedy.failed) == 1 and service.active == 3
    # control: another process still sets timers, up to the node's bound of 5 in all
    kept = [set_timer(other, hour) for _ in range(2)]
    over = set_timer(other, hour)
    assert other.failed == [(over, SendErrorKind.TIMEOUT)] and kept[0] not in dict(other.failed)
    assert "5 active timers" in terminal.errors[-1] and service.active == 5
    again = set_timer(other, 0)          # answered at once, counts nothing
    assert other.popped == [again] and len(other.failed) == 1
