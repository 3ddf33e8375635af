"""`terminal:terminal:sys`: the sender of what users type (scripts' arguments, `m` requests); the
answers it gets are printed."""
from __future__ import annotations

from host.kernel import Kernel
from host.kernel_api import OutputApi
from host.service import HostService
from host.types import Address, KernelMessage, ProcessId, Request, new_request_id

TERMINAL_ID = ProcessId("terminal", "terminal", "sys")


class TerminalService(HostService):
    public = True  # scripts started by the terminal may answer it

    def __init__(self, kernel: Kernel, output: OutputApi):
        super().__init__(kernel, TERMINAL_ID)
        self.output = output

    def deliver(self, km: KernelMessage) -> None:
        body = km.message.body.decode("utf-8", "replace")
        if body:
            self.output.process_output(km.source.process, body)

    def send(self, target: Address, body: bytes) -> None:
        """Send `body` to `target` as a request from the terminal."""
        km = KernelMessage(new_request_id(), self.address, target, None, Request(body=body), None)
        self.kernel.route(km, self)
