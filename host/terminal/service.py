"""`terminal:terminal:sys`: the sender of what users type (scripts' arguments, `m` requests); the
answers it gets are printed, or given to the command that awaits them (`m -a`, `hi`)."""
from __future__ import annotations

import threading
from collections.abc import Callable

from host.kernel.api import OutputApi
from host.kernel.endpoint import Pending
from host.kernel.host_service import HostService
from host.kernel.kernel import Kernel
from host.messages import Address, KernelMessage, ProcessId, Request, Response, new_request_id

# what an awaiting command is told: the response's body, or None and the SendError kind
OnAnswer = Callable[[bytes | None, str | None], None]

TERMINAL_ID = ProcessId("terminal", "terminal", "sys")


class TerminalService(HostService):
    public = True         # scripts started by the terminal may answer it
    hears_network = True  # answers to `m`/`hi` sent to other nodes (their requests are dropped)

    def __init__(self, kernel: Kernel, output: OutputApi):
        super().__init__(kernel, TERMINAL_ID)
        self.output = output
        self._awaiting: dict[int, tuple[Pending, OnAnswer]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()   # hands `_next_answer` to the kernel's add_pending call
        self._next_answer: OnAnswer | None = None

    def deliver(self, km: KernelMessage) -> None:
        if isinstance(km.message, Response):
            with self._lock:
                waiting = self._awaiting.pop(km.id, None)
            if waiting is not None:
                self.kernel.timers.cancel(waiting[0].timer)
                waiting[1](km.message.body, None)
                return
        if km.source.node != self.kernel.node:
            return  # other nodes may not print on our terminal (`hi` goes to net:distro:sys)
        body = km.message.body.decode("utf-8", "replace")
        if body:
            self.output.process_output(km.source.process, body)

    def send(self, target: Address, body: bytes) -> None:
        """Send `body` to `target` as a request from the terminal."""
        km = KernelMessage(new_request_id(), self.address, target, None, Request(body=body), None)
        self.kernel.route(km, self)

    def send_and_await(self, target: Address, body: bytes, seconds: int, on_answer: OnAnswer) -> None:
        """Send `body` expecting a response within `seconds`; `on_answer` gets it or the SendError."""
        with self._send_lock:
            self._next_answer = on_answer
            try:
                self.kernel.send_request(self, target, Request(expects_response=seconds, body=body), None, None)
            finally:
                self._next_answer = None

    # the kernel's hooks for requests that expect a response
    def add_pending(self, mid: int, pending: Pending) -> None:
        with self._lock:
            if self._next_answer is not None:
                self._awaiting[mid] = (pending, self._next_answer)

    def fail(self, mid: int, kind: str) -> None:
        with self._lock:
            waiting = self._awaiting.pop(mid, None)
        if waiting is not None:
            self.kernel.timers.cancel(waiting[0].timer)
            waiting[1](None, kind)

    def fail_node(self, node: str, kind: str) -> None:
        with self._lock:
            lost = [mid for mid, (p, _) in self._awaiting.items() if p.target.node == node]
        for mid in lost:
            self.fail(mid, kind)
