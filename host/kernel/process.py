"""One Wasm process: a Store, an instance and a thread running its `init`.

Its host imports live in host/kernel/standard_host.py and find the process through `current` (a thread-local): a
process's thread, and any library component it calls into on that thread, act as that process.
"""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol

from wasmtime import Store, WasiConfig, WasmtimeError

from host.kernel.api import KernelApi, OnExit
from host.kernel.endpoint import Pending
from host.messages import Address, Blob, Capability, KernelMessage, ProcessId, Response, SendError
from host.runtime.wasm import LoadedComponent, Runtime

log = logging.getLogger("host.kernel.process")
current = threading.local()  # .proc: the WasmProcess whose thread this is

_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b(: .*)?$")
STOP = object()  # inbox sentinel: makes receive() fail so the guest unwinds
MAX_GIVEN_CAPS = 1024  # caps received on messages, remembered so the process may save them
STDERR_LINES_KEPT = 40        # the last lines of a guest's stderr, read for a crash reason
STDERR_LINE_KEPT = 4096       # characters kept of each such line (a guest may write one without end)
# bytes of messages from other nodes waiting in one process's inboxes; a message past it holds its
# sender's connection unread until the process takes it (local senders are not held)
INBOX_NET_CAP = 32 << 20


class Receipt(Protocol):
    """What goes with a message from another node (host.net.peers.Receipt): told when it is taken."""
    size: int
    over: bool

    def taken(self) -> None: ...


class _AtCapacity(Exception):
    """The node already runs --max-processes Wasm instances."""


class ProcessHost(KernelApi, Protocol):
    """What a process's own lifecycle needs from the kernel, beyond the ABI's calls."""
    @property
    def runtime(self) -> Runtime: ...
    @property
    def compute_limit(self) -> float: ...

    def take_instances(self, n: int) -> bool: ...
    def give_back_instances(self, n: int) -> None: ...
    def process_exited(self, proc: WasmProcess, reason: str) -> None: ...


class WasmProcess:
    hears_network = True
    trusted = False

    def __init__(self, kernel: ProcessHost, pid: ProcessId, component: LoadedComponent,
                 libraries: list[LoadedComponent], wasm_path: str, capabilities: set[Capability],
                 public: bool, on_exit: OnExit, parent: ProcessId | None = None,
                 lib_paths: list[str] | None = None):
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
        # items: ("msg", KernelMessage, context, Receipt or None) or ("err", SendError, context, None)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.await_box: queue.SimpleQueue = queue.SimpleQueue()
        self.net_bytes = 0              # of messages from other nodes in the boxes (INBOX_NET_CAP)
        self.inbox_closed = False       # the process ended: what arrives now is dropped at once
        self.pending: dict[int, Pending] = {}
        self.lock = threading.Lock()
        self.current: KernelMessage | None = None   # the prompting message
        self.current_blob: Blob | None = None
        self.blob_chain: Any = None                     # BLAKE3 fed by current-blob-hash-chained
        self.thread: threading.Thread | None = None
        self.killed = False
        self.started_at = 0.0
        self.stderr_tail: list[str] = []
        self._stderr_line_open = False  # the last stderr line has had no newline yet
        self.lib_instances: dict[str, tuple[Store, Any]] = {}  # interface -> (store, instance)
        self.given: OrderedDict[Capability, None] = OrderedDict()  # caps messages brought it
        self.turns: threading.Semaphore | None = None  # taken (up to turn_wait s) before instantiating
        self.turn_wait = 0.0

    def __repr__(self) -> str:
        return f"<process {self.id}>"

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.started_at = time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"proc:{self.id}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.killed = True
        self.inbox.put(STOP)
        self.await_box.put(STOP)

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
        # a guest may write one line in several pieces (componentize-py writes an exception's type,
        # ": " and its message apart): a piece continues the last line until a newline ends it
        pieces = bytes(data).decode("utf-8", "replace").split("\n")
        ended = pieces[-1] == ""   # the last piece is the start of a line still open, or nothing
        if ended:
            pieces.pop()
        # each line keeps its head (where an exception's type is) so a guest writing without a
        # newline cannot grow the node's memory
        if self._stderr_line_open and self.stderr_tail and pieces:
            last = self.stderr_tail[-1]
            first = pieces.pop(0)
            if len(last) < STDERR_LINE_KEPT:
                self.stderr_tail[-1] = last + first[:STDERR_LINE_KEPT - len(last)]
        self._stderr_line_open = not ended
        kept = [piece[:STDERR_LINE_KEPT] for piece in pieces[-STDERR_LINES_KEPT:]]
        self.stderr_tail = (self.stderr_tail + kept)[-STDERR_LINES_KEPT:]

    def _run(self) -> None:
        current.proc = self
        rt = self.kernel.runtime
        reason = "returned"
        held = 1 + len(self.libraries)
        turns = self.turns
        turn = turns is not None and turns.acquire(timeout=self.turn_wait)
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
            if turn and turns is not None:
                turns.release()
            self.kernel.give_back_instances(held)
            current.proc = None
            self.lib_instances.clear()
            self._close_inbox()
            self.kernel.process_exited(self, reason)

    def _close_inbox(self) -> None:
        """Nobody will take what is left: free its senders."""
        with self.lock:
            self.inbox_closed = True
        for box in (self.inbox, self.await_box):
            while True:
                try:
                    item = box.get_nowait()
                except queue.Empty:
                    break
                if item is not STOP:
                    self.took(item)

    def _describe_failure(self, e: Exception) -> str:
        if self.killed:
            return "killed"
        text = str(e).strip().splitlines()
        head = text[0] if text else type(e).__name__
        if "Caused by:" in text:  # a wasmtime trap (or a host import's error): the reason follows its backtrace
            head = next((ln.strip() for ln in text[text.index("Caused by:") + 1:] if ln.strip()), head)
        if "epoch" in str(e) or "interrupt" in str(e):
            return f"trapped: used more than {self.kernel.compute_limit:g} s of compute without yielding"
        if isinstance(e, _AtCapacity) or "maximum concurrent limit" in head:  # ours, or the pool's
            return (f"could not start: the node already runs its maximum of "
                    f"{self.kernel.runtime.max_instances} Wasm instances (--max-processes)")
        log.info("%s stderr before it ended:\n%s", self.id, "\n".join(self.stderr_tail))
        # an uncaught exception: a Python guest's traceback ends with "SomeError: message"; a
        # JavaScript guest (componentize-js) prints the message, then "Stack:" and the frames
        tail = self.stderr_tail
        raised = [i for i, ln in enumerate(tail) if _EXCEPTION_LINE.match(ln)]
        raised += [i - 1 for i, ln in enumerate(tail) if ln.strip() == "Stack:" and i > 0 and tail[i - 1].strip()]
        if raised:
            return f"crashed: {tail[max(raised)].strip()}"
        return f"trapped: {head}"

    # ---- delivery (called by the kernel from any thread) -----------------------------------
    def add_pending(self, mid: int, pending: Pending) -> None:
        with self.lock:
            self.pending[mid] = pending

    def deliver(self, km: KernelMessage, receipt: Receipt | None = None) -> None:
        """Queue `km`; `receipt` (a message from another node) is told when the process takes it."""
        box, pending = self.inbox, None
        if isinstance(km.message, Response):
            with self.lock:
                p = self.pending.pop(km.id, None)
            if p is None:
                log.debug("%s: dropped response %x with no outstanding request", self.id, km.id)
                if receipt is not None:
                    receipt.taken()
                return
            self.kernel.timers.cancel(p.timer)
            box, pending = (self.await_box if p.awaited else self.inbox), p
        if receipt is not None:
            with self.lock:
                if self.inbox_closed:
                    receipt.taken()
                    return
                self.net_bytes += receipt.size
                receipt.over = self.net_bytes > INBOX_NET_CAP
        box.put(("msg", km, pending, receipt))

    def took(self, item: tuple) -> None:
        """The process took (or will never take) an inbox item: count it out."""
        receipt = item[3]
        if receipt is not None:
            with self.lock:
                self.net_bytes -= receipt.size
            receipt.taken()

    def fail(self, mid: int, kind: str) -> None:
        """Turn an outstanding request into a send-error (timeout or offline)."""
        with self.lock:
            p = self.pending.pop(mid, None)
        if p is None:
            return
        self.kernel.timers.cancel(p.timer)
        err = SendError(kind, p.target, p.request, p.blob)
        (self.await_box if p.awaited else self.inbox).put(("err", err, p, None))

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

    def note_given(self, caps: list[Capability]) -> None:
        """A message it takes in carried `caps`: it may save them (the oldest are forgotten first)."""
        for c in caps:
            self.given[c] = None
            self.given.move_to_end(c)
        while len(self.given) > MAX_GIVEN_CAPS:
            self.given.popitem(last=False)

    def was_given(self, cap: Capability) -> bool:
        return cap.normalised() in self.given
