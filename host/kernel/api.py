"""The calls the process ABI (host/kernel/standard_host.py, host/kernel/process.py) makes on the kernel, and nothing more.

The kernel satisfies these Protocols structurally; the ABI never imports the kernel.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from host.kernel.endpoint import Endpoint
from host.messages import Address, Blob, Capability, ProcessId, Request, Response


class OnExit:
    """Host form of `on-exit`: kind is none|restart|requests."""

    def __init__(self, kind: str = "none", requests: list | None = None):
        self.kind = kind
        self.requests = requests or []  # [(Address, Request, Optional[Blob])]


class OutputApi(Protocol):
    """Where process output and the node's messages go (the terminal)."""

    def process_output(self, pid: ProcessId, text: str, verbosity: int = 0) -> None: ...
    def info(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...


class TimerApi(Protocol):
    def add(self, delay: float, fn: Callable[[], None]) -> int: ...
    def cancel(self, handle: int | None) -> None: ...


class StateApi(Protocol):
    def get(self, pid: ProcessId) -> bytes | None: ...
    def set(self, pid: ProcessId, data: bytes) -> None: ...
    def clear(self, pid: ProcessId) -> None: ...


class KernelApi(Protocol):
    @property
    def node(self) -> str: ...
    @property
    def compute_ticks(self) -> int:
        """A guest's compute budget between host calls, in epoch ticks."""
    @property
    def terminal(self) -> OutputApi: ...
    @property
    def timers(self) -> TimerApi: ...
    @property
    def state(self) -> StateApi: ...

    def send_request(self, src: Endpoint, target: Address, req: Request, context: bytes | None,
                     blob: Blob | None, awaited: bool = False) -> None: ...

    def send_response(self, src: Endpoint, resp: Response, blob: Blob | None) -> None: ...

    def spawn(self, parent: Endpoint, name: str | None, wasm_path: str, on_exit: OnExit,
              request_caps: list[Capability], grant_to: list[ProcessId], public: bool,
              lib_paths: list[str]) -> ProcessId | str:
        """A ProcessId, or the spawn-error name."""

    def save_capabilities(self, holder: Endpoint, caps: list[Capability]) -> None: ...
