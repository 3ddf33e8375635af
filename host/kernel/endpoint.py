"""What the kernel sees of anything it routes messages to: a Wasm process or a host service.

The kernel tells endpoints apart only by these flags, never by their classes, so a new service is
a class with these members and one `kernel.register(...)` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from host.messages import Address, Blob, Capability, KernelMessage, ProcessId, Request


@dataclass
class Pending:
    """A request an endpoint sent that expects a response."""
    context: bytes | None
    target: Address
    request: Request
    blob: Blob | None
    timer: Any = None
    awaited: bool = False  # send-and-await-response: the answer goes to the await box
    # the sender's prompting message when it sent this request, made prompting again when the
    # answer or error comes back (upstream's ProcessContext, kernel/standard_host_v0.rs send_request_v0)
    prompting: KernelMessage | None = None


class Endpoint(Protocol):
    id: ProcessId
    address: Address
    public: bool            # any local process may message it without a capability
    hears_network: bool     # requests from other nodes may reach it (given the network capability)
    trusted: bool           # part of the node: messages any process, holds every capability, cannot be killed
    parent: ProcessId | None
    capabilities: set[Capability]
    current: KernelMessage | None   # the request it is handling (for inherit and responses)
    current_blob: Blob | None

    def deliver(self, km: KernelMessage) -> None:
        """Take a message; called on the sender's thread, so it must not block."""

    def fail(self, mid: int, kind: str) -> None:
        """Turn its outstanding request `mid` into a send-error of `kind`."""

    def fail_node(self, node: str, kind: str) -> None:
        """Fail its outstanding requests to `node` (the peer is gone)."""

    def add_pending(self, mid: int, pending: Pending) -> None:
        """Remember a request that expects a response."""

    def has_cap(self, cap: Capability) -> bool: ...

    def was_given(self, cap: Capability) -> bool:
        """Whether a message it received carried `cap` (so it may save it)."""

    def stop(self) -> None:
        """The node is shutting down (or, unless trusted, the user killed it)."""
