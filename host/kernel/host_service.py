"""The base of a process implemented by the host (the VFS, the terminal): an `Endpoint` that is
part of the node. A new service subclasses it, overrides `deliver` (and `add_pending`/`fail` if it
sends requests whose timeouts it must hear of), and is `kernel.register`ed by the node."""
from __future__ import annotations

from host.kernel.endpoint import Pending
from host.kernel.kernel import Kernel
from host.messages import Address, Blob, Capability, KernelMessage, ProcessId


class HostService:
    public = False
    hears_network = False   # peers reach the node's services only through processes
    trusted = True

    def __init__(self, kernel: Kernel, pid: ProcessId):
        self.kernel = kernel
        self.id = pid
        self.address = Address(kernel.node, pid)
        self.capabilities: set[Capability] = set()
        self.parent: ProcessId | None = None
        self.current: KernelMessage | None = None
        self.current_blob: Blob | None = None

    def __repr__(self) -> str:
        return f"<service {self.id}>"

    def deliver(self, km: KernelMessage) -> None:  # pragma: no cover - overridden
        pass

    def has_cap(self, cap: Capability) -> bool:
        return True

    def was_given(self, cap: Capability) -> bool:
        return False

    def fail(self, mid: int, kind: str) -> None:
        pass

    def fail_node(self, node: str, kind: str) -> None:
        pass

    def add_pending(self, mid: int, pending: Pending) -> None:
        pass

    def stop(self) -> None:
        pass
