"""The process ABI: the `standard` and `blobs` host imports, and the forwarder that lets a process
call the library components it links.

Each import acts for the process whose thread calls it and reaches the node only through
`KernelApi`. Imports never let an ordinary Python exception escape (wasmtime-py keeps the last one
in a single global that other threads can overwrite): they log it and raise `WasmtimeError`, which
traps only the calling guest.
"""
from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable
from typing import Any

import blake3
from wasmtime import WasmtimeError
from wasmtime.component import Variant

from host.kernel.process import STOP, WasmProcess, current
from host.kernel.wit_values import (
    py_address,
    py_blob,
    py_cap,
    py_on_exit,
    py_pid,
    py_request,
    py_response,
    wit_address,
    wit_blob,
    wit_cap,
    wit_message,
    wit_on_exit,
    wit_pid,
    wit_send_error,
)
from host.messages import Blob, KernelMessage, Request
from host.runtime import private
from host.runtime.wasm import BLOBS, STANDARD, Runtime

log = logging.getLogger("host.kernel.standard_host")


def _proc() -> WasmProcess:
    p = getattr(current, "proc", None)
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
            p = getattr(current, "proc", None)
            if p is not None:
                private.set_epoch_deadline(store, p.kernel.compute_ticks)
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
                            [py_pid(g) for g in grant_caps], public, p.lib_paths)
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


def _take(p: WasmProcess, item) -> Variant:
    """Make a delivered inbox item the current message; return the WIT value for it."""
    if item is STOP:
        raise WasmtimeError("process was stopped")
    p.took(item)
    kind, value, pending, _ = item
    context = None if pending is None else pending.context
    if pending is not None:
        # the answer (or error) to one of its requests: the message that prompted that request is
        # prompting again, so a Response now answers it (kernel_message_to_process_receive_v0)
        p.current = pending.prompting
    if kind == "err":
        p.current_blob = value.lazy_load_blob
        return Variant("err", (wit_send_error(value), context))
    km: KernelMessage = value
    p.current_blob = km.lazy_load_blob
    p.note_given(km.message.capabilities)
    if isinstance(km.message, Request) and (km.message.expects_response is not None or km.rsvp is not None):
        p.current = km   # only a request someone awaits an answer to becomes the prompting message
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


def _send_and_await(target, request, blob: Blob | None):
    p = _proc()
    req, dest = py_request(request), py_address(target)
    # as Kinode's kernel: both are errors that end the process, not a wait
    if req.expects_response is None:
        raise WasmtimeError("send-and-await-response needs expects-response (a timeout)")
    if dest.process == p.id and dest.node in (p.address.node, "our"):
        raise WasmtimeError("send-and-await-response to itself would deadlock")
    p.kernel.send_request(p, dest, req, None, blob, awaited=True)
    item = p.await_box.get()
    if item is STOP:
        raise WasmtimeError("process was stopped")
    p.took(item)
    kind, value, pending, _ = item
    p.current = pending.prompting
    if kind == "err":
        return wit_send_error(value)  # untagged result: a Record is the error
    km: KernelMessage = value
    p.current_blob = km.lazy_load_blob
    p.note_given(km.message.capabilities)
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


def _latin1_blob(s: str | None) -> Blob | None:
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


STANDARD_IMPORTS: dict[str, Callable[..., Any]] = {
    "print-to-terminal": print_to_terminal, "set-on-exit": set_on_exit, "get-on-exit": get_on_exit,
    "get-state": get_state, "set-state": set_state, "clear-state": clear_state, "spawn": spawn,
    "save-capabilities": save_capabilities, "drop-capabilities": drop_capabilities,
    "our-capabilities": our_capabilities, "receive": receive, "get-blob": get_blob,
    "send-request": send_request, "send-requests": send_requests, "send-response": send_response,
    "send-and-await-response": send_and_await_response,
}
BLOBS_IMPORTS: dict[str, Callable[..., Any]] = {
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
        p: WasmProcess | None = getattr(current, "proc", None)
        entry = p.lib_instances.get(iface) if p is not None else None
        if p is None or entry is None:
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
            private.set_epoch_deadline(store, p.kernel.compute_ticks)
        return result
    return forward


def install_imports(runtime: Runtime) -> None:
    """Install the process ABI into `runtime` (the node does, before its kernel starts a process)."""
    runtime.install_abi({STANDARD: {k: _host(v) for k, v in STANDARD_IMPORTS.items()},
                         BLOBS: {k: _host(v) for k, v in BLOBS_IMPORTS.items()}}, library_forwarder)
