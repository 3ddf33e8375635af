"""One Wasm process: a Store, an instance and a thread running its `init`, and the `standard` and
`blobs` host imports bound to it.

The Linker is shared by every process, so each host function finds its process through a
thread-local: a process's thread, and any library component it calls into on that thread, act as
that process. Host functions never let an ordinary Python exception escape (wasmtime-py keeps the
last one in a single global that other threads can overwrite): they log it and raise
`WasmtimeError`, which traps only the calling guest.
"""
from __future__ import annotations

import functools
import logging
import queue
import re
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import blake3
from wasmtime import Store, WasiConfig, WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import Record, Variant

from host.types import (Address, Blob, Capability, KernelMessage, ProcessId, Request, Response,
                        SendError)
from host.wasm import BLOBS, STANDARD, LoadedComponent

if TYPE_CHECKING:
    from host.kernel import Kernel

log = logging.getLogger("host.process")
_current = threading.local()

_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b(: .*)?$")
_STOP = object()  # inbox sentinel: makes receive() fail so the guest unwinds


class _AtCapacity(Exception):
    """The node already runs --max-processes Wasm instances."""


class OnExit:
    """Host form of `on-exit`: kind is none|restart|requests."""

    def __init__(self, kind: str = "none", requests: Optional[list] = None):
        self.kind = kind
        self.requests = requests or []  # [(Address, Request, Optional[Blob])]


@dataclass
class Pending:
    """A request this process sent that expects a response."""
    context: Optional[bytes]
    target: Address
    request: Request
    blob: Optional[Blob]
    timer: Any = None
    awaited: bool = False  # send-and-await-response: the answer goes to the await box


# ---- WIT value conversion ------------------------------------------------------------------------
def _rec(**fields) -> Record:
    r = Record()
    for k, v in fields.items():
        setattr(r, k.replace("_", "-"), v)
    return r


def _f(r: Any, name: str) -> Any:
    return getattr(r, name.replace("_", "-"))


def wit_pid(p: ProcessId) -> Record:
    return _rec(process_name=p.process_name, package_name=p.package_name, publisher_node=p.publisher_node)


def wit_address(a: Address) -> Record:
    return _rec(node=a.node, process=wit_pid(a.process))


def py_pid(r: Any) -> ProcessId:
    return ProcessId(_f(r, "process_name"), _f(r, "package_name"), _f(r, "publisher_node"))


def py_address(r: Any) -> Address:
    return Address(r.node, py_pid(r.process))


def wit_cap(c: Capability) -> Record:
    return _rec(issuer=wit_address(c.issuer), params=c.params)


def py_cap(r: Any) -> Capability:
    return Capability(py_address(r.issuer), r.params).normalised()


def wit_blob(b: Optional[Blob]) -> Optional[Record]:
    return None if b is None else _rec(mime=b.mime, bytes=b.bytes)


def py_blob(r: Any) -> Optional[Blob]:
    return None if r is None else Blob(r.mime, r.bytes)


def wit_request(q: Request) -> Record:
    return _rec(inherit=q.inherit, expects_response=q.expects_response, body=q.body,
                metadata=q.metadata, capabilities=[wit_cap(c) for c in q.capabilities])


def py_request(r: Any) -> Request:
    return Request(r.inherit, _f(r, "expects_response"), r.body, r.metadata,
                   [py_cap(c) for c in r.capabilities])


def wit_response(q: Response) -> Record:
    return _rec(inherit=q.inherit, body=q.body, metadata=q.metadata,
                capabilities=[wit_cap(c) for c in q.capabilities])


def py_response(r: Any) -> Response:
    return Response(r.inherit, r.body, r.metadata, [py_cap(c) for c in r.capabilities])


def wit_message(m, context: Optional[bytes] = None):
    # `message` is an untagged variant: a Record is a request, a tuple a response
    if isinstance(m, Request):
        return wit_request(m)
    return (wit_response(m), context)


def wit_send_error(e: SendError) -> Record:
    return _rec(kind=e.kind, target=wit_address(e.target), message=wit_message(e.message),
                lazy_load_blob=wit_blob(e.lazy_load_blob))


def wit_on_exit(o: OnExit) -> Variant:
    if o.kind == "requests":
        return Variant("requests", [(wit_address(a), wit_request(q), wit_blob(b)) for a, q, b in o.requests])
    return Variant(o.kind)


def py_on_exit(v: Any) -> OnExit:
    if v.tag == "requests":
        return OnExit("requests", [(py_address(a), py_request(q), py_blob(b)) for a, q, b in v.payload])
    return OnExit(v.tag)


# ---- the process ---------------------------------------------------------------------------------
class WasmProcess:
    def __init__(self, kernel: "Kernel", pid: ProcessId, component: LoadedComponent,
                 libraries: list[LoadedComponent], wasm_path: str, capabilities: set[Capability],
                 public: bool, on_exit: OnExit, parent: Optional[ProcessId] = None,
                 lib_paths: Optional[list[str]] = None):
        self.kernel = kernel
        self.id = pid
        self.address = Address(kernel.node, pid)
        self.component = component
        self.libraries = libraries
        self.lib_paths = lib_paths or []
        self.wasm_path = wasm_path
        self.capabilities = capabilities
        self.public = public
        self.on_exit = on_exit
        self.parent = parent
        self.inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self.await_box: "queue.SimpleQueue" = queue.SimpleQueue()
        self.pending: dict[int, Pending] = {}
        self.lock = threading.Lock()
        self.current: Optional[KernelMessage] = None   # the prompting message
        self.current_blob: Optional[Blob] = None
        self.blob_chain = None                          # BLAKE3 fed by current-blob-hash-chained
        self.thread: Optional[threading.Thread] = None
        self.killed = False
        self.started_at = 0.0
        self.stderr_tail: list[str] = []
        self.lib_instances: dict[str, tuple[Store, Any]] = {}  # interface -> (store, instance)
        self.contacted: set[str] = set()  # nodes this process has sent requests to

    def __repr__(self) -> str:
        return f"<process {self.id}>"

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.started_at = time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"proc:{self.id}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.killed = True
        self.inbox.put(_STOP)
        self.await_box.put(_STOP)

    def _new_store(self) -> Store:
        store = Store(self.kernel.runtime.engine)
        wasi = WasiConfig()
        wasi.stdout_custom = self._on_stdout
        wasi.stderr_custom = self._on_stderr
        store.set_wasi(wasi)
        store.set_epoch_deadline(self.kernel.compute_ticks)
        return store

    def _on_stdout(self, data) -> None:
        text = bytes(data).decode("utf-8", "replace").rstrip("\n")
        if text:
            self.kernel.terminal.process_output(self.id, text)

    def _on_stderr(self, data) -> None:
        text = bytes(data).decode("utf-8", "replace")
        self.stderr_tail = (self.stderr_tail + text.splitlines())[-40:]

    def _run(self) -> None:
        _current.proc = self
        rt = self.kernel.runtime
        reason = "returned"
        held = 1 + len(self.libraries)
        try:
            if not self.kernel.take_instances(held):
                held = 0
                raise _AtCapacity()
            store = self._new_store()
            for lib in self.libraries:
                lstore = self._new_store()
                inst = rt.instantiate(lstore, lib.component)
                for iface in lib.exports:
                    self.lib_instances[iface] = (lstore, inst)
            inst = rt.instantiate(store, self.component.component)
            init = inst.get_func(store, "init")
            if init is None:
                raise WasmtimeError("component exports no `init` function: not a process")
            init(store, str(self.address))
            init.post_return(store)
        except Exception as e:  # a trap, a guest exception, a kill: never the node's problem
            reason = self._describe_failure(e)
        finally:
            self.kernel.give_back_instances(held)
            _current.proc = None
            self.lib_instances.clear()
            self.kernel.process_exited(self, reason)

    def _describe_failure(self, e: Exception) -> str:
        if self.killed:
            return "killed"
        text = str(e).strip().splitlines()
        head = text[0] if text else type(e).__name__
        if "Caused by:" in text:   # a host import's own error says more than the backtrace's head
            head = next((ln.strip() for ln in text[text.index("Caused by:") + 1:] if ln.strip()), head)
        if "epoch" in str(e) or "interrupt" in str(e):
            return f"trapped: used more than {self.kernel.compute_limit:g} s of compute without yielding"
        if isinstance(e, _AtCapacity) or "maximum concurrent limit" in head:  # ours, or the pool's
            return (f"could not start: the node already runs its maximum of "
                    f"{self.kernel.runtime.max_instances} Wasm instances (--max-processes)")
        log.info("%s stderr before it ended:\n%s", self.id, "\n".join(self.stderr_tail))
        # a guest's uncaught Python exception: its traceback ends with "SomeError: message"
        raised = [ln for ln in self.stderr_tail if _EXCEPTION_LINE.match(ln)]
        if raised:
            return f"crashed: {raised[-1].strip()}"
        return f"trapped: {head}"

    # ---- delivery (called by the kernel from any thread) -----------------------------------
    def add_pending(self, mid: int, pending: Pending) -> None:
        with self.lock:
            self.pending[mid] = pending

    def deliver(self, km: KernelMessage) -> None:
        if isinstance(km.message, Response):
            with self.lock:
                p = self.pending.pop(km.id, None)
            if p is None:
                log.debug("%s: dropped response %x with no outstanding request", self.id, km.id)
                return
            self.kernel.timers.cancel(p.timer)
            (self.await_box if p.awaited else self.inbox).put(("msg", km, p.context))
        else:
            self.inbox.put(("msg", km, None))

    def fail(self, mid: int, kind: str) -> None:
        """Turn an outstanding request into a send-error (timeout or offline)."""
        with self.lock:
            p = self.pending.pop(mid, None)
        if p is None:
            return
        self.kernel.timers.cancel(p.timer)
        err = SendError(kind, p.target, p.request, p.blob)
        (self.await_box if p.awaited else self.inbox).put(("err", err, p.context))

    def fail_node(self, node: str, kind: str) -> None:
        with self.lock:
            ids = [mid for mid, p in self.pending.items() if p.target.node == node]
        for mid in ids:
            self.fail(mid, kind)

    def drop_pending(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, {}
        for p in pending.values():
            self.kernel.timers.cancel(p.timer)

    def has_cap(self, cap: Capability) -> bool:
        return cap.normalised() in self.capabilities


# ---- host imports ----------------------------------------------------------------------------------
def _proc() -> WasmProcess:
    p = getattr(_current, "proc", None)
    if p is None:
        raise WasmtimeError("host import called outside a process thread")
    return p


def _host(fn: Callable) -> Callable:
    """Wrap a host import: refresh the caller's compute budget and keep exceptions contained."""
    @functools.wraps(fn)
    def wrapper(store, *args):
        try:
            return fn(*args)
        except WasmtimeError:
            raise
        except Exception as e:
            log.error("host import %s failed:\n%s", fn.__name__, traceback.format_exc())
            raise WasmtimeError(f"host import {fn.__name__} failed: {e}") from None
        finally:
            p = getattr(_current, "proc", None)
            if p is not None:
                ffi.wasmtime_context_set_epoch_deadline(store._context(), p.kernel.compute_ticks)
    return wrapper


def print_to_terminal(verbosity: int, message: str) -> None:
    p = _proc()
    p.kernel.terminal.process_output(p.id, message, verbosity)


def set_on_exit(on_exit) -> None:
    _proc().on_exit = py_on_exit(on_exit)


def get_on_exit():
    return wit_on_exit(_proc().on_exit)


def get_state():
    p = _proc()
    return p.kernel.state.get(p.id)


def set_state(data: bytes) -> None:
    p = _proc()
    p.kernel.state.set(p.id, data)


def clear_state() -> None:
    p = _proc()
    p.kernel.state.clear(p.id)


def spawn(name, wasm_path, on_exit, request_caps, grant_caps, public):
    p = _proc()
    result = p.kernel.spawn(p, name, wasm_path, py_on_exit(on_exit), [py_cap(c) for c in request_caps],
                            [py_pid(g) for g in grant_caps], public)
    return result if isinstance(result, str) else wit_pid(result)  # untagged: enum str or record


def save_capabilities(caps) -> None:
    p = _proc()
    p.kernel.save_capabilities(p, [py_cap(c) for c in caps])


def drop_capabilities(caps) -> None:
    p = _proc()
    for c in caps:
        p.capabilities.discard(py_cap(c))


def our_capabilities():
    return [wit_cap(c) for c in sorted(_proc().capabilities, key=lambda c: (str(c.issuer), c.params))]


def _take(p: WasmProcess, item) -> tuple:
    """Make a delivered inbox item the current message; return the WIT value for it."""
    if item is _STOP:
        raise WasmtimeError("process was stopped")
    kind, value, context = item
    if kind == "err":
        p.current_blob = value.lazy_load_blob
        return Variant("err", (wit_send_error(value), context))
    km: KernelMessage = value
    p.current_blob = km.lazy_load_blob
    if isinstance(km.message, Request):
        p.current = km
    return Variant("ok", (wit_address(km.source), wit_message(km.message, context)))


def receive():
    p = _proc()
    return _take(p, p.inbox.get())


def get_blob():
    return wit_blob(_proc().current_blob)


def send_request(target, request, context, blob) -> None:
    p = _proc()
    p.kernel.send_request(p, py_address(target), py_request(request), context, py_blob(blob))


def send_requests(requests) -> None:
    for target, request, context, blob in requests:
        send_request(target, request, context, blob)


def send_response(response, blob) -> None:
    p = _proc()
    p.kernel.send_response(p, py_response(response), py_blob(blob))


def send_and_await_response(target, request, blob):
    return _send_and_await(target, request, py_blob(blob))


def _send_and_await(target, request, blob: Optional[Blob]):
    p = _proc()
    req, dest = py_request(request), py_address(target)
    # as Kinode's kernel: both are errors that end the process, not a wait
    if req.expects_response is None:
        raise WasmtimeError("send-and-await-response needs expects-response (a timeout)")
    if dest.process == p.id and dest.node in (p.address.node, "our"):
        raise WasmtimeError("send-and-await-response to itself would deadlock")
    p.kernel.send_request(p, dest, req, None, blob, awaited=True)
    item = p.await_box.get()
    if item is _STOP:
        raise WasmtimeError("process was stopped")
    kind, value, _context = item
    if kind == "err":
        return wit_send_error(value)  # untagged result: a Record is the error
    km: KernelMessage = value
    p.current_blob = km.lazy_load_blob
    return (wit_address(km.source), wit_message(km.message, None))


# ---- blobs extension ---------------------------------------------------------------------------------
def current_blob_len():
    b = _proc().current_blob
    return None if b is None else len(b.bytes)


def current_blob_hash():
    b = _proc().current_blob
    return None if b is None else blake3.blake3(b.bytes).hexdigest()


def current_blob_hash_chained(restart):
    p = _proc()
    b = p.current_blob
    if b is None:
        return None
    if restart or p.blob_chain is None:
        p.blob_chain = blake3.blake3()
    p.blob_chain.update(b.bytes)
    return p.blob_chain.copy().hexdigest()


def current_blob_latin1():
    b = _proc().current_blob
    return None if b is None else b.bytes.decode("latin-1")


def send_request_with_current_blob(target, request, context) -> None:
    p = _proc()
    p.kernel.send_request(p, py_address(target), py_request(request), context, p.current_blob)


def send_and_await_response_with_current_blob(target, request):
    return _send_and_await(target, request, _proc().current_blob)


def send_response_with_current_blob(response) -> None:
    p = _proc()
    p.kernel.send_response(p, py_response(response), p.current_blob)


def _latin1_blob(s: Optional[str]) -> Optional[Blob]:
    if s is None:
        return None
    try:
        return Blob(None, s.encode("latin-1"))
    except UnicodeEncodeError:
        raise WasmtimeError("latin-1 blob holds a character above U+00FF") from None


def send_request_latin1(target, request, context, blob) -> None:
    p = _proc()
    p.kernel.send_request(p, py_address(target), py_request(request), context, _latin1_blob(blob))


def send_response_latin1(response, blob) -> None:
    p = _proc()
    p.kernel.send_response(p, py_response(response), _latin1_blob(blob))


STANDARD_IMPORTS = {
    "print-to-terminal": print_to_terminal, "set-on-exit": set_on_exit, "get-on-exit": get_on_exit,
    "get-state": get_state, "set-state": set_state, "clear-state": clear_state, "spawn": spawn,
    "save-capabilities": save_capabilities, "drop-capabilities": drop_capabilities,
    "our-capabilities": our_capabilities, "receive": receive, "get-blob": get_blob,
    "send-request": send_request, "send-requests": send_requests, "send-response": send_response,
    "send-and-await-response": send_and_await_response,
}
BLOBS_IMPORTS = {
    "current-blob-len": current_blob_len, "current-blob-hash": current_blob_hash,
    "current-blob-hash-chained": current_blob_hash_chained,
    "current-blob-latin1": current_blob_latin1,
    "send-request-with-current-blob": send_request_with_current_blob,
    "send-and-await-response-with-current-blob": send_and_await_response_with_current_blob,
    "send-response-with-current-blob": send_response_with_current_blob,
    "send-request-latin1": send_request_latin1, "send-response-latin1": send_response_latin1,
}


def library_forwarder(iface: str, func: str) -> Callable:
    """Host function for an importer's `iface.func`: call the current process's library instance."""
    def forward(store, *args):
        p = getattr(_current, "proc", None)
        entry = p.lib_instances.get(iface) if p else None
        if entry is None:
            raise WasmtimeError(f"no library instance provides {iface} for this process")
        lstore, inst = entry
        # the library's store may have sat idle past its compute deadline: give it a fresh budget
        lstore.set_epoch_deadline(p.kernel.compute_ticks)
        idx = inst.get_export_index(lstore, iface)
        f = inst.get_func(lstore, inst.get_export_index(lstore, func, idx))
        try:
            result = f(lstore, *args)
            f.post_return(lstore)
        except WasmtimeError:
            raise
        except Exception as e:
            raise WasmtimeError(f"library call {iface}#{func} failed: {e}") from None
        finally:
            ffi.wasmtime_context_set_epoch_deadline(store._context(), p.kernel.compute_ticks)
        return result
    return forward


def install_imports(runtime) -> None:
    runtime.define(STANDARD, {k: _host(v) for k, v in STANDARD_IMPORTS.items()})
    runtime.define(BLOBS, {k: _host(v) for k, v in BLOBS_IMPORTS.items()})
