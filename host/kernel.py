"""The kernel: the process table, message routing, request ids and expects-response timers,
capabilities, spawn and on-exit.

Messages are routed on the sender's thread: a local target's inbox is a thread-safe queue, a host
service (the VFS) answers inline, and a remote target goes to `host.net`, which has its own loop.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Union
from urllib.parse import quote

from host.process import OnExit, Pending, WasmProcess, install_imports, library_forwarder
from host.types import (Address, Blob, Capability, KernelMessage, ProcessId, Request, Response,
                        SendErrorKind, new_request_id)
from host.wasm import EPOCH_TICK, LoadedComponent, MissingInterface, Runtime

log = logging.getLogger("host.kernel")

KERNEL_ID = ProcessId("kernel", "distro", "sys")
VFS_ID = ProcessId("vfs", "distro", "sys")
TERMINAL_ID = ProcessId("terminal", "terminal", "sys")
MAX_TIMEOUT = 7 * 24 * 3600
RESTART_LIMIT = 5         # restarts within RESTART_WINDOW before the kernel gives up
RESTART_WINDOW = 30.0


def messaging_cap(target: Address) -> Capability:
    return Capability.make(target, "messaging")


class Timers:
    """One thread running callbacks at deadlines; cancel by handle. A cancelled entry lets go of its
    callback at once (it may hold a finished process and all its memory) and is skipped when due."""

    def __init__(self):
        self._heap: list = []
        self._entries: dict[int, list] = {}
        self._seq = itertools.count()
        self._cv = threading.Condition()
        threading.Thread(target=self._run, name="timers", daemon=True).start()

    def add(self, delay: float, fn: Callable[[], None]) -> int:
        handle = next(self._seq)
        entry = [time.monotonic() + delay, handle, fn]
        with self._cv:
            self._entries[handle] = entry
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:  # the thread sleeps until the earliest deadline: wake it only for a new one
                self._cv.notify()
        return handle

    def cancel(self, handle: Optional[int]) -> None:
        if handle is not None:
            with self._cv:
                entry = self._entries.pop(handle, None)
                if entry is not None:
                    entry[2] = None

    def __len__(self) -> int:
        return len(self._entries)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, handle, fn = heapq.heappop(self._heap)
                self._entries.pop(handle, None)
            if fn is None:
                continue
            try:
                fn()
            except Exception:
                log.exception("timer callback failed")


class StateStore:
    """get/set/clear-state, one file per process under HOME/state, written atomically."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, pid: ProcessId) -> Path:
        return self.root / quote(str(pid), safe="")

    def get(self, pid: ProcessId) -> Optional[bytes]:
        try:
            return self._path(pid).read_bytes()
        except FileNotFoundError:
            return None

    def set(self, pid: ProcessId, data: bytes) -> None:
        path = self._path(pid)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def clear(self, pid: ProcessId) -> None:
        self._path(pid).unlink(missing_ok=True)


class Service:
    """A process implemented by the host (the VFS, the terminal)."""
    public = False

    def __init__(self, kernel: "Kernel", pid: ProcessId):
        self.kernel = kernel
        self.id = pid
        self.address = Address(kernel.node, pid)
        self.capabilities: set[Capability] = set()
        self.parent = None
        self.current = None
        self.current_blob = None

    def deliver(self, km: KernelMessage) -> None:  # pragma: no cover - overridden
        pass

    def has_cap(self, cap: Capability) -> bool:
        return True

    def fail(self, mid: int, kind: str) -> None:
        pass

    def add_pending(self, mid, pending) -> None:
        pass


class VfsService(Service):
    def __init__(self, kernel: "Kernel", vfs):
        super().__init__(kernel, VFS_ID)
        self.vfs = vfs

    def deliver(self, km: KernelMessage) -> None:
        if not isinstance(km.message, Request):
            return
        src = self.kernel.processes.get(km.source.process)
        if km.source.node != self.kernel.node or src is None:
            log.warning("vfs: refused a request from %s", km.source)
            return

        def has_cap(params: dict) -> bool:
            return src.has_cap(Capability.make(self.address, params))

        blob = km.lazy_load_blob.bytes if km.lazy_load_blob else None
        res = self.vfs.handle(km.source.process, has_cap, km.message.body, blob)
        for params in res.grant:
            src.capabilities.add(Capability.make(self.address, params))
        if km.rsvp is not None:
            out = Blob(res.mime, res.blob) if res.blob is not None else None
            self.kernel.route(KernelMessage(km.id, self.address, km.rsvp, None, Response(body=res.body), out), self)


class TerminalService(Service):
    """Scripts are started by the terminal and may answer it; answers are printed."""
    public = True

    def deliver(self, km: KernelMessage) -> None:
        body = km.message.body.decode("utf-8", "replace")
        if body:
            self.kernel.terminal.process_output(km.source.process, body)


class Kernel:
    def __init__(self, node: str, home: Path, runtime: Runtime, vfs, terminal, compute_limit: float = 30.0):
        self.node = node
        self.home = home
        self.runtime = runtime
        self.terminal = terminal
        self.vfs = vfs
        self.net = None  # set by the node once networking is up
        self.compute_limit = compute_limit
        self.compute_ticks = max(1, int(compute_limit / EPOCH_TICK))
        self.timers = Timers()
        self.state = StateStore(home / "state")
        self.processes: dict[ProcessId, Union[WasmProcess, Service]] = {}
        self.lock = threading.RLock()
        self._grants: dict[ProcessId, set[Capability]] = {}  # caps waiting for a process to start
        self._restarts: dict[ProcessId, list[float]] = {}
        self._component_memo: dict[tuple, LoadedComponent] = {}
        self._exit_listeners: list[Callable[[ProcessId, str], None]] = []
        self._instances = 0          # live Wasm instances: processes and the libraries they link
        install_imports(runtime)
        for svc in (VfsService(self, vfs), TerminalService(self, TERMINAL_ID)):
            self.processes[svc.id] = svc

    def take_instances(self, n: int) -> bool:
        """Count `n` more live instances, unless that would pass the node's --max-processes."""
        with self.lock:
            if self._instances + n > self.runtime.max_instances:
                return False
            self._instances += n
            return True

    def give_back_instances(self, n: int) -> None:
        with self.lock:
            self._instances -= n

    @property
    def kernel_address(self) -> Address:
        return Address(self.node, KERNEL_ID)

    def network_cap(self) -> Capability:
        return Capability.make(self.kernel_address, "network")

    def on_exit_listener(self, fn: Callable[[ProcessId, str], None]) -> None:
        self._exit_listeners.append(fn)

    def remove_exit_listener(self, fn: Callable[[ProcessId, str], None]) -> None:
        if fn in self._exit_listeners:
            self._exit_listeners.remove(fn)

    # ---- starting processes ----------------------------------------------------------------
    def load_vfs_wasm(self, wasm_path: str) -> LoadedComponent:
        """Load a component from a VFS path like `pkg:pub/pkg/x.wasm`; raises OSError/ValueError."""
        rel = wasm_path.lstrip("/")
        parts = rel.split("/")
        if len(parts) < 3 or any(p in ("", ".", "..") for p in parts) or "\\" in rel or "\0" in rel:
            raise ValueError(f"not a VFS file path: {wasm_path!r}")
        root = (self.home / "vfs").resolve()
        path = (root / rel).resolve()
        if root not in path.parents:
            raise ValueError(f"{wasm_path!r} leads outside the VFS")
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        comp = self._component_memo.get(key)
        if comp is None:
            comp = self._component_memo[key] = self.runtime.load(path.read_bytes())
        return comp

    def start_process(self, pid: ProcessId, wasm_path: str, capabilities: set[Capability], public: bool,
                      on_exit: OnExit, lib_paths: list[str] = (), parent: Optional[ProcessId] = None
                      ) -> WasmProcess:
        """Load and start a process; raises MissingInterface, OSError or ValueError with a clear text."""
        comp = self.load_vfs_wasm(wasm_path)
        libs, absent = [], []
        for path in lib_paths:
            try:
                libs.append(self.load_vfs_wasm(path))
            except OSError:
                absent.append(path)
        libs = [lib for lib in libs if set(lib.exports) & comp.needs]
        self.runtime.check_links(comp, libs, f"process {pid}", absent)
        for lib in libs:
            self.runtime.define_forwarders(lib, library_forwarder)
        caps = {c.normalised() for c in capabilities}
        proc = WasmProcess(self, pid, comp, libs, wasm_path, caps, public, on_exit, parent, list(lib_paths))
        with self.lock:
            if pid in self.processes:
                raise ValueError(f"a process named {pid} is already running")
            proc.capabilities |= self._grants.pop(pid, set())
            self.processes[pid] = proc
        proc.start()
        return proc

    def grant(self, holder: ProcessId, cap: Capability) -> None:
        with self.lock:
            proc = self.processes.get(holder)
            if proc is not None:
                proc.capabilities.add(cap.normalised())
            else:
                self._grants.setdefault(holder, set()).add(cap.normalised())

    def spawn(self, parent: WasmProcess, name: Optional[str], wasm_path: str, on_exit: OnExit,
              request_caps: list[Capability], grant_to: list[ProcessId], public: bool):
        """The `spawn` import: returns a ProcessId or the spawn-error name."""
        pid = ProcessId(name or str(secrets.randbits(64)), parent.id.package_name, parent.id.publisher_node)
        if pid in self.processes:
            return "name-taken"
        caps = {c for c in request_caps if parent.has_cap(c)}
        try:
            self.start_process(pid, wasm_path.lstrip("/"), caps, public, on_exit, parent.lib_paths, parent.id)
        except MissingInterface as e:
            self.terminal.error(f"spawn by {parent.id} failed: {e}")
            return "no-file-at-path"
        except (OSError, ValueError) as e:
            self.terminal.error(f"spawn by {parent.id} failed: {wasm_path}: {e}")
            return "no-file-at-path"
        for g in grant_to:
            self.grant(g, messaging_cap(Address(self.node, pid)))
        return pid

    def save_capabilities(self, proc: WasmProcess, caps: list[Capability]) -> None:
        # a process may only keep capabilities it could already exercise: ones it holds or issued
        for c in caps:
            if proc.has_cap(c) or c.issuer == proc.address:
                proc.capabilities.add(c.normalised())

    def kill(self, pid: ProcessId) -> bool:
        proc = self.processes.get(pid)
        if isinstance(proc, WasmProcess):
            proc.stop()
            return True
        return False

    def process_exited(self, proc: WasmProcess, reason: str) -> None:
        with self.lock:
            if self.processes.get(proc.id) is proc:
                del self.processes[proc.id]
        self.vfs.forget(proc.id)
        proc.drop_pending()  # its timers would keep the finished process (and its memory) alive
        if reason not in ("returned", "killed"):
            self.terminal.error(f"{proc.id} {reason}")
        log.info("%s exited: %s", proc.id, reason)
        for fn in self._exit_listeners:
            fn(proc.id, reason)
        if proc.killed or proc.on_exit.kind != "restart":
            self._revoke_issued_by(proc.address)
        if proc.killed:
            return
        if proc.on_exit.kind == "restart":
            now = time.monotonic()
            recent = [t for t in self._restarts.get(proc.id, []) if now - t < RESTART_WINDOW] + [now]
            self._restarts[proc.id] = recent
            if len(recent) > RESTART_LIMIT:
                self.terminal.error(f"{proc.id} exited {len(recent)} times in {RESTART_WINDOW:.0f} s; not restarting it")
                return
            delay = 0.2 * 2 ** (len(recent) - 1)
            self.timers.add(delay, lambda: self._restart(proc))
        elif proc.on_exit.kind == "requests":
            for target, req, blob in proc.on_exit.requests:
                km = KernelMessage(new_request_id(), proc.address, target, None, req, blob)
                self.route(km, proc)

    def _revoke_issued_by(self, issuer: Address) -> None:
        """A process that is gone for good: capabilities to it are dead weight (every script run
        grants file_transfer one; kept, they would be copied into every worker it spawns)."""
        with self.lock:
            holders = list(self.processes.values())
            for caps in self._grants.values():
                caps -= {c for c in caps if c.issuer == issuer}
        for holder in holders:
            stale = {c for c in holder.capabilities if c.issuer == issuer}
            if stale:
                holder.capabilities -= stale

    def _restart(self, proc: WasmProcess) -> None:
        try:
            self.start_process(proc.id, proc.wasm_path, proc.capabilities, proc.public, proc.on_exit,
                               proc.lib_paths, proc.parent)
            log.info("restarted %s", proc.id)
        except Exception as e:
            self.terminal.error(f"could not restart {proc.id}: {e}")

    # ---- messaging -------------------------------------------------------------------------
    def send_request(self, src, target: Address, req: Request, context: Optional[bytes],
                     blob: Optional[Blob], awaited: bool = False) -> None:
        if target.node == "our":  # before it is kept as a pending request's (and SendError's) target
            target = Address(self.node, target.process)
        prompting = src.current
        if req.inherit and prompting is not None:
            mid, rsvp = prompting.id, prompting.rsvp
            if blob is None:
                blob = src.current_blob
        else:
            mid, rsvp = new_request_id(), None
        if req.expects_response is not None:
            rsvp = src.address
            pending = Pending(context, target, req, blob, awaited=awaited)
            src.add_pending(mid, pending)
            timeout = min(max(int(req.expects_response), 0), MAX_TIMEOUT)
            pending.timer = self.timers.add(timeout, lambda: src.fail(mid, SendErrorKind.TIMEOUT))
        self.route(KernelMessage(mid, src.address, target, rsvp, req, blob), src)

    def send_response(self, src, resp: Response, blob: Optional[Blob]) -> None:
        prompting = src.current
        if prompting is None or prompting.rsvp is None:
            return  # nothing asked for an answer: dropped, as in Kinode
        if resp.inherit and blob is None:
            blob = src.current_blob
        self.route(KernelMessage(prompting.id, src.address, prompting.rsvp, None, resp, blob), src)

    def may_message(self, src, dest) -> bool:
        if dest.public or isinstance(src, Service) or src is dest:
            return True
        if dest.parent == src.id or src.parent == dest.id:
            return True
        return src.has_cap(messaging_cap(dest.address))

    def route(self, km: KernelMessage, src) -> None:
        if km.target.node == "our":  # Kinode's alias for this node (process_lib sends to our@vfs:distro:sys)
            km.target = Address(self.node, km.target.process)
        is_request = isinstance(km.message, Request)
        if km.target.node != self.node:
            if is_request and not src.has_cap(self.network_cap()):
                self.terminal.error(f"{src.id} has no network capability: request to {km.target} refused")
                src.fail(km.id, SendErrorKind.TIMEOUT)   # Kinode reports a refused send as a timeout
                return
            if self.net is None:
                src.fail(km.id, SendErrorKind.OFFLINE)
                return
            if is_request and hasattr(src, "contacted"):
                src.contacted.add(km.target.node)  # it may now hear back from that node

            def offline(reason: str, mid=km.id) -> None:
                log.info("message to %s failed: %s", km.target, reason)
                src.fail(mid, SendErrorKind.OFFLINE)
            self.net.send(km, offline)
            return
        dest = self.processes.get(km.target.process)
        if dest is None:
            log.info("no process %s: message from %s dropped", km.target.process, km.source)
            src.fail(km.id, SendErrorKind.TIMEOUT)
            return
        if is_request and not self.may_message(src, dest):
            self.terminal.error(f"{src.id} may not message {dest.id} (no messaging capability)")
            src.fail(km.id, SendErrorKind.TIMEOUT)
            return
        dest.deliver(km)

    def from_network(self, km: KernelMessage) -> None:
        """A message from a peer whose identity `host.net` has verified."""
        dest = self.processes.get(km.target.process)
        if dest is None or isinstance(dest, Service):
            log.info("message from %s to missing or local-only process %s dropped", km.source, km.target)
            return
        if isinstance(km.message, Request):
            if not dest.has_cap(self.network_cap()):
                log.warning("%s has no network capability: request from %s dropped", dest.id, km.source)
                return
            if not dest.public and km.source.node not in dest.contacted:
                # a private process hears only from nodes it has itself sent requests to
                log.warning("%s is not public: unsolicited request from %s dropped", dest.id, km.source)
                return
        dest.deliver(km)

    def peer_lost(self, node: str) -> None:
        for proc in list(self.processes.values()):
            if isinstance(proc, WasmProcess):
                proc.fail_node(node, SendErrorKind.OFFLINE)

    def send_from_terminal(self, target: Address, body: bytes) -> None:
        term = self.processes[TERMINAL_ID]
        km = KernelMessage(new_request_id(), term.address, target, None, Request(body=body), None)
        self.route(km, term)

    def shutdown(self) -> None:
        for proc in list(self.processes.values()):
            if isinstance(proc, WasmProcess):
                proc.killed = True
                proc.stop()
