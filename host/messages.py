"""The kernel's data model: messages and capabilities, mirroring `kinode:process@0.8.0` (addresses
and ids are host/kinode_types.py's, shared with the guests).

These are plain host-side values. `host.kernel.process` converts them to and from wasmtime's component
values; `to_wire`/`from_wire` give the MessagePack-ready form that `host.net.network` sends between nodes.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from host.kinode_types import Address, PackageId, ParseError, ProcessId  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Capability:
    issuer: Address
    params: str  # JSON text, compared after normalising

    @classmethod
    def make(cls, issuer: Address, params: Any) -> Capability:
        return cls(issuer, json.dumps(params, sort_keys=True, separators=(",", ":")))

    def normalised(self) -> Capability:
        try:
            return Capability.make(self.issuer, json.loads(self.params))
        except ValueError:
            return self


@dataclass
class Blob:
    mime: str | None
    bytes: bytes


@dataclass
class Request:
    inherit: bool = False
    expects_response: int | None = None
    body: bytes = b""
    metadata: str | None = None
    capabilities: list = field(default_factory=list)


@dataclass
class Response:
    inherit: bool = False
    body: bytes = b""
    metadata: str | None = None
    capabilities: list = field(default_factory=list)


Message = Request | Response


def new_request_id() -> int:
    return secrets.randbits(64)


@dataclass
class KernelMessage:
    id: int
    source: Address
    target: Address
    rsvp: Address | None
    message: Message
    lazy_load_blob: Blob | None = None

    # ---- wire form: plain lists/dicts/bytes for MessagePack --------------------------------------
    def to_wire(self) -> dict:
        m = self.message
        msg: dict[str, Any] = {
            "kind": "request" if isinstance(m, Request) else "response",
            "inherit": m.inherit,
            "body": m.body,
            "metadata": m.metadata,
            "capabilities": [[str(c.issuer), c.params] for c in m.capabilities],
        }
        if isinstance(m, Request):
            msg["expects_response"] = m.expects_response
        blob = self.lazy_load_blob
        return {
            "id": self.id,
            "source": str(self.source),
            "target": str(self.target),
            "rsvp": str(self.rsvp) if self.rsvp else None,
            "message": msg,
            "blob": None if blob is None else [blob.mime, blob.bytes],
        }

    @classmethod
    def from_wire(cls, d: dict) -> KernelMessage:
        """Parse the wire form; raises ParseError (or ValueError/TypeError/KeyError) on a bad shape."""
        try:
            m = d["message"]
            caps = [Capability(Address.parse(i), _str(p)) for i, p in m["capabilities"]]
            if m["kind"] == "request":
                er = m["expects_response"]
                if er is not None and (not isinstance(er, int) or er < 0 or er >= 2**64):
                    raise ParseError("bad expects_response")
                msg: Message = Request(bool(m["inherit"]), er, _bytes(m["body"]),
                                       _opt_str(m["metadata"]), caps)
            elif m["kind"] == "response":
                msg = Response(bool(m["inherit"]), _bytes(m["body"]), _opt_str(m["metadata"]), caps)
            else:
                raise ParseError(f"bad message kind {m['kind']!r}")
            blob = d["blob"]
            if blob is not None:
                blob = Blob(_opt_str(blob[0]), _bytes(blob[1]))
            mid = d["id"]
            if not isinstance(mid, int) or not 0 <= mid < 2**64:
                raise ParseError("bad message id")
            return cls(mid, Address.parse(_str(d["source"])), Address.parse(_str(d["target"])),
                       Address.parse(_str(d["rsvp"])) if d["rsvp"] is not None else None, msg, blob)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            if isinstance(e, ParseError):
                raise
            raise ParseError(f"malformed kernel message: {e!r}") from None


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ParseError(f"expected a string, got {type(v).__name__}")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _bytes(v: Any) -> bytes:
    if not isinstance(v, (bytes, bytearray)):
        raise ParseError(f"expected bytes, got {type(v).__name__}")
    return bytes(v)


class SendErrorKind:
    OFFLINE = "offline"
    TIMEOUT = "timeout"


@dataclass
class SendError:
    kind: str  # SendErrorKind
    target: Address
    message: Message
    lazy_load_blob: Blob | None
