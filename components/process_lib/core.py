"""Addresses, messages, builders and process management for Python guests."""
from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from componentize_py_types import Err
from wit_world.imports import standard as wit

# the host's own ids and parsing rules: build.sh stages host/kinode_types.py as host.kinode_types
from host.kinode_types import Address, PackageId, ParseError, ProcessId, check_file_name  # noqa: F401

try:  # the host extension is optional: guests built without it use `standard` only
    from wit_world.imports import blobs as _blobs
except ImportError:  # pragma: no cover - depends on the world the component was built against
    _blobs = None
HAS_BLOBS = _blobs is not None  # built against a `-ext` world, so the blob extension is there

_OUR: Address | None = None


# ---- identities ----------------------------------------------------------------------------------
def to_wit_pid(p: ProcessId) -> wit.ProcessId:
    return wit.ProcessId(p.process_name, p.package_name, p.publisher_node)


def to_wit_address(a: Address) -> wit.Address:
    return wit.Address(a.node, to_wit_pid(a.process))


def from_wit_pid(p: Any) -> ProcessId:
    return ProcessId(p.process_name, p.package_name, p.publisher_node)


def from_wit_address(a: Any) -> Address:
    return Address(a.node, from_wit_pid(a.process))


def our() -> Address:
    if _OUR is None:
        raise RuntimeError("process_lib.run() has not been called")
    return _OUR


@dataclass(frozen=True)
class Capability:
    issuer: Address
    params: str

    def to_wit(self) -> wit.Capability:
        return wit.Capability(to_wit_address(self.issuer), self.params)

    @classmethod
    def from_wit(cls, c: Any) -> Capability:
        return cls(from_wit_address(c.issuer), c.params)


@dataclass
class Blob:
    mime: str | None
    bytes: bytes


# ---- messages ----------------------------------------------------------------------------------
@dataclass
class Message:
    source: Address
    is_request: bool
    body: bytes
    metadata: str | None = None
    expects_response: int | None = None
    context: bytes | None = None
    capabilities: list = field(default_factory=list)

    def json(self) -> Any:
        """The body parsed as JSON; raises ValueError with the reason."""
        return json.loads(self.body)

    def meta(self) -> dict:
        """The metadata parsed as a JSON object ({} when absent or not an object)."""
        try:
            m = json.loads(self.metadata) if self.metadata else {}
        except ValueError:
            return {}
        return m if isinstance(m, dict) else {}


class SendError(Exception):
    """A request failed: `kind` is "offline" or "timeout"; `context` is the sender's context."""

    def __init__(self, kind: str, target: Address, body: bytes, context: bytes | None,
                 metadata: str | None = None):
        super().__init__(f"{kind}: request to {target} got no response")
        self.kind = kind
        self.target = target
        self.body = body
        self.context = context
        self.metadata = metadata


class SpawnError(Exception):
    pass


def _from_wit_message(source: Any, msg: Any) -> Message:
    src = from_wit_address(source)
    if isinstance(msg, wit.Message_Request):
        r = msg.value
        return Message(src, True, r.body, r.metadata, r.expects_response, None,
                       [Capability.from_wit(c) for c in r.capabilities])
    resp, context = msg.value
    return Message(src, False, resp.body, resp.metadata, None, context,
                   [Capability.from_wit(c) for c in resp.capabilities])


def _send_error(e: Any, context: bytes | None) -> SendError:
    kind = "offline" if e.kind == wit.SendErrorKind.OFFLINE else "timeout"
    m = e.message
    body = m.value.body if isinstance(m, wit.Message_Request) else m.value[0].body
    meta = m.value.metadata if isinstance(m, wit.Message_Request) else m.value[0].metadata
    return SendError(kind, from_wit_address(e.target), body, context, meta)


def await_message() -> Message:
    """Block until the next message; a failed request of ours raises SendError."""
    try:
        source, msg = wit.receive()
    except Err as e:
        err, context = e.value
        raise _send_error(err, context) from None
    return _from_wit_message(source, msg)


def _encode_body(body: Any) -> bytes:
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    return json.dumps(body, separators=(",", ":")).encode()


class _Builder:
    def __init__(self):
        self._body = b""
        self._metadata: str | None = None
        self._inherit = False
        self._caps: list = []
        self._blob: bytes | None = None
        self._blob_mime: str | None = None
        self._forward_blob = False

    def body(self, body: Any):
        """bytes as they are; anything else as JSON (a str becomes a JSON string, e.g. "ListFiles")."""
        self._body = _encode_body(body)
        return self

    def metadata(self, metadata: str | dict | None):
        self._metadata = json.dumps(metadata, separators=(",", ":")) if isinstance(metadata, dict) else metadata
        return self

    def inherit(self, inherit: bool = True):
        self._inherit = inherit
        return self

    def capabilities(self, caps: list):
        self._caps = list(caps)
        return self

    def blob_bytes(self, data: bytes, mime: str | None = None):
        self._blob, self._blob_mime, self._forward_blob = bytes(data), mime, False
        return self

    def forward_current_blob(self):
        """Carry the blob of the message being handled; with the host extension its bytes never
        enter this process."""
        self._forward_blob = True
        self._blob = None
        return self

    def _wit_blob(self) -> wit.LazyLoadBlob | None:
        if self._forward_blob:
            b = get_blob()
            return None if b is None else wit.LazyLoadBlob(b.mime, b.bytes)
        if self._blob is None:
            return None
        return wit.LazyLoadBlob(self._blob_mime, self._blob)


class Request(_Builder):
    def __init__(self, target: Address | None = None):
        super().__init__()
        self._target = target
        self._expects: int | None = None
        self._context: bytes | None = None

    @classmethod
    def to(cls, target: Address | str) -> Request:
        return cls(Address.parse(target) if isinstance(target, str) else target)

    def target(self, target: Address | str) -> Request:
        self._target = Address.parse(target) if isinstance(target, str) else target
        return self

    def expects_response(self, timeout_secs: int) -> Request:
        self._expects = int(timeout_secs)
        return self

    def context(self, context: bytes | Any) -> Request:
        self._context = _encode_body(context)
        return self

    def _wit(self) -> wit.Request:
        return wit.Request(self._inherit, self._expects, self._body, self._metadata,
                           [c.to_wit() for c in self._caps])

    def send(self) -> None:
        if self._target is None:
            raise ValueError("request has no target")
        target = to_wit_address(self._target)
        if _blobs is not None and self._forward_blob:
            _blobs.send_request_with_current_blob(target, self._wit(), self._context)
        elif _blobs is not None and self._blob is not None and self._blob_mime is None:
            _blobs.send_request_latin1(target, self._wit(), self._context, self._blob.decode("latin-1"))
        else:
            wit.send_request(target, self._wit(), self._context, self._wit_blob())

    def send_and_await_response(self, timeout_secs: int | None = None) -> Message:
        """Send and wait for the answer; raises SendError on timeout or an unreachable target."""
        if timeout_secs is not None:
            self._expects = int(timeout_secs)
        if self._expects is None:
            self._expects = 60
        if self._target is None:
            raise ValueError("request has no target")
        target = to_wit_address(self._target)
        try:
            if _blobs is not None and self._forward_blob:
                source, msg = _blobs.send_and_await_response_with_current_blob(target, self._wit())
            else:
                source, msg = wit.send_and_await_response(target, self._wit(), self._wit_blob())
        except Err as e:
            raise _send_error(e.value, None) from None
        return _from_wit_message(source, msg)


class Response(_Builder):
    def _wit(self) -> wit.Response:
        return wit.Response(self._inherit, self._body, self._metadata, [c.to_wit() for c in self._caps])

    def send(self) -> None:
        if _blobs is not None and self._forward_blob:
            _blobs.send_response_with_current_blob(self._wit())
        elif _blobs is not None and self._blob is not None and self._blob_mime is None:
            _blobs.send_response_latin1(self._wit(), self._blob.decode("latin-1"))
        else:
            wit.send_response(self._wit(), self._wit_blob())


def ask(target: Address, body: Any, timeout: int = 5, who: str | None = None) -> Any:
    """Send a request, wait for the answer and parse its JSON body. Raises ValueError with a
    readable reason ("WHO did not answer (offline)") on failure: what scripts want."""
    try:
        answer = Request.to(target).body(body).send_and_await_response(timeout)
    except SendError as e:
        raise ValueError(f"{who or target} did not answer ({e.kind})") from None
    try:
        return answer.json()
    except ValueError:
        raise ValueError(f"{who or target} sent a malformed answer") from None


def sibling(our_address: Address, process_name: str, node: str | None = None) -> Address:
    """The address of a process of our own package, on our node or on `node`."""
    p = our_address.process
    return Address(node or our_address.node, ProcessId(process_name, p.package_name, p.publisher_node))


# ---- blobs -------------------------------------------------------------------------------------
def get_blob() -> Blob | None:
    """The blob of the message being handled (or of the last awaited response)."""
    if _blobs is not None:
        data = _blobs.current_blob_latin1()
        return None if data is None else Blob(None, data.encode("latin-1"))
    b = wit.get_blob()
    return None if b is None else Blob(b.mime, b.bytes)


def current_blob_len() -> int | None:
    if _blobs is not None:
        return _blobs.current_blob_len()
    b = wit.get_blob()
    return None if b is None else len(b.bytes)


def current_blob_hash() -> str | None:
    """Hex BLAKE3 of the current blob (computed by the host when it can)."""
    if _blobs is not None:
        return _blobs.current_blob_hash()
    raise RuntimeError("current_blob_hash needs the kinode-py:host-ext/blobs host extension")


def current_blob_hash_chained(restart: bool = False) -> str | None:
    """Feed the current blob to this process's running BLAKE3 (emptied first if `restart`) and
    return the hex digest of all fed since; None, feeding nothing, if there is no blob."""
    if _blobs is not None:
        return _blobs.current_blob_hash_chained(restart)
    raise RuntimeError("current_blob_hash_chained needs the kinode-py:host-ext/blobs host extension")


# ---- process management ------------------------------------------------------------------------
class OnExit:
    """What the kernel does when this process ends: NONE, RESTART, or a list of (target, body)
    requests to send on its behalf."""
    NONE = "none"
    RESTART = "restart"

    @staticmethod
    def to_wit(kind):
        if isinstance(kind, list):
            return wit.OnExit_Requests([(to_wit_address(target), wit.Request(False, None, _encode_body(body), None, []),
                                         None) for target, body in kind])
        return wit.OnExit_Restart() if kind == OnExit.RESTART else wit.OnExit_None_()


def set_on_exit(kind) -> None:
    """`OnExit.NONE`, `OnExit.RESTART`, or a list of (Address, body) requests."""
    wit.set_on_exit(OnExit.to_wit(kind))


def spawn(name: str | None, wasm_path: str, on_exit: str = OnExit.NONE,
          request_capabilities: list | None = None, grant_capabilities: list | None = None,
          public: bool = False) -> ProcessId:
    try:
        pid = wit.spawn(name, wasm_path, OnExit.to_wit(on_exit),
                        [c.to_wit() for c in (request_capabilities or [])],
                        [to_wit_pid(p) for p in (grant_capabilities or [])], public)
    except Err as e:
        raise SpawnError(f"spawn of {wasm_path} failed: {e.value.name.lower()}") from None
    return from_wit_pid(pid)


def our_capabilities() -> list:
    return [Capability.from_wit(c) for c in wit.our_capabilities()]


def get_state() -> bytes | None:
    return wit.get_state()


def set_state(data: bytes) -> None:
    wit.set_state(data)


def clear_state() -> None:
    wit.clear_state()


def print_to_terminal(verbosity: int, message: str) -> None:
    wit.print_to_terminal(verbosity, message)


def println(message: str) -> None:
    wit.print_to_terminal(0, message)


# ---- entry points ------------------------------------------------------------------------------
def run(main: Callable[[Address], None], our_text: str) -> None:
    """Call `main(our)`: the body of a world's `init`."""
    global _OUR
    _OUR = Address.parse(our_text)
    main(_OUR)


def script(fn: Callable[[Address, str], str | None], our_text: str) -> None:
    """A terminal script: take the argument line the terminal sends, run `fn(our, args)`, and print
    what it returns."""
    global _OUR
    _OUR = Address.parse(our_text)
    msg = await_message()
    args = msg.body.decode("utf-8", "replace")
    try:
        out = fn(_OUR, args)
    except Exception as e:  # a script reports its failure and ends cleanly
        println(f"error: {e}")
        print_to_terminal(2, traceback.format_exc())
        return
    if out:
        println(out)
