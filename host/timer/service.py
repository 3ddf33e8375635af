"""`timer:distro:sys`: Kinode's timer. A local request with body `{"SetTimer": MILLISECONDS}` (serde
JSON of upstream's `TimerAction`) is answered, once that time has passed, by a Response with an
empty body (to the request's rsvp, else its source), which carries the sender's context as any
response does. `"Debug"` prints the number of active timers. Public, as upstream; unlike upstream,
timers are not kept across a restart of the node, and their number is bounded per process and in
all: a request past the bound is refused (its requester gets a timeout at once) with an error."""
from __future__ import annotations

import json
import logging
import threading
from collections import Counter

from host.kernel.host_service import HostService
from host.kernel.kernel import Kernel
from host.messages import KernelMessage, ProcessId, Request, Response, SendErrorKind

log = logging.getLogger("host.timer.service")

TIMER_ID = ProcessId("timer", "distro", "sys")
MAX_MILLIS = 7 * 24 * 3600 * 1000  # as the kernel's longest expects-response timeout
# upstream keeps any number; a bound keeps one process from filling the node's memory
MAX_TIMERS_PER_PROCESS = 10_000
MAX_TIMERS = 100_000


class TimerService(HostService):
    public = True

    def __init__(self, kernel: Kernel, per_process: int = MAX_TIMERS_PER_PROCESS, total: int = MAX_TIMERS):
        super().__init__(kernel, TIMER_ID)
        self.active = 0
        self.per_process = per_process
        self.total = total
        self._by_process: Counter[ProcessId] = Counter()  # active timers each process has set
        self._lock = threading.Lock()  # requests arrive on senders' threads, timers pop on another

    def deliver(self, km: KernelMessage) -> None:
        if not isinstance(km.message, Request):
            return
        if km.source.node != self.kernel.node:  # upstream ignores other nodes' timers
            log.warning("timer: refused a request from %s", km.source)
            return
        try:
            action = json.loads(km.message.body)
        except ValueError:
            action = None
        if action == "Debug":
            self.kernel.terminal.info(f"timer service active timers ({self.active})")
            return
        millis = action.get("SetTimer") if isinstance(action, dict) and len(action) == 1 else None
        if not isinstance(millis, int) or isinstance(millis, bool) or not 0 <= millis <= MAX_MILLIS:
            self.kernel.terminal.error(f"timer: request from {km.source} has an invalid body "
                                       f"(expected {{\"SetTimer\": MILLISECONDS}}): {km.message.body[:80]!r}")
            return
        answer = KernelMessage(km.id, self.address, km.rsvp or km.source, None, Response(), None)
        if millis == 0:
            self.kernel.route(answer, self)
            return
        setter = km.source.process
        with self._lock:
            full = (f"{setter} already has {self.per_process} active timers"
                    if self._by_process[setter] >= self.per_process else
                    f"the node already has {self.total} active timers" if self.active >= self.total else None)
            if full is None:
                self.active += 1
                self._by_process[setter] += 1
        if full is not None:
            self.kernel.terminal.error(f"timer: request from {km.source} refused: {full}")
            requester = self.kernel.processes.get(setter)
            if requester is not None:
                requester.fail(km.id, SendErrorKind.TIMEOUT)
            return

        def pop() -> None:
            with self._lock:
                self.active -= 1
                self._by_process[setter] -= 1
                if self._by_process[setter] <= 0:
                    del self._by_process[setter]
            self.kernel.route(answer, self)
        self.kernel.timers.add(millis / 1000, pop)
