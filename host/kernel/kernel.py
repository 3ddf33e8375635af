"""The kernel: the process table, message routing, request ids and expects-response timers,
capabilities, spawn and on-exit.

Messages are routed on the sender's thread: every endpoint's `deliver` must not block (a process
queues the message, a host service answers inline); a remote target goes to `net`, which has its
own loop. Host services are registered by the node; the kernel knows them only as `Endpoint`s.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from host.kernel.api import OnExit, OutputApi
from host.kernel.endpoint import Endpoint, Pending
from host.kernel.process import Receipt, WasmProcess
from host.kernel.state import StateStore
from host.messages import (
    Address,
    Blob,
    Capability,
    KernelMessage,
    ProcessId,
    Request,
    Response,
    SendErrorKind,
    new_request_id,
)
from host.runtime.fastconv import MAX_LIST_BYTES
from host.runtime.wasm import EPOCH_TICK, LoadedComponent, MissingInterface, Runtime
from host.timer.timers import Timers

__all__ = ["Kernel", "Timers", "StateStore", "messaging_cap", "KERNEL_ID"]

log = logging.getLogger("host.kernel.kernel")

KERNEL_ID = ProcessId("kernel", "distro", "sys")
MAX_TIMEOUT = 7 * 24 * 3600
RESTART_LIMIT = 5         # restarts within RESTART_WINDOW before the kernel gives up
RESTART_WINDOW = 30.0
MAX_EXPORTED_CAPS = 4096  # our caps remembered as given to peers (the oldest are forgotten first)


def messaging_cap(target: Address) -> Capability:
    return Capability.make(target, "messaging")


class Transport(Protocol):
    """The network, as the kernel uses it: `on_error(reason)` if the message cannot be delivered."""

    def send(self, km: KernelMessage, on_error: Callable[[str], None]) -> None: ...


# Terminal scripts running at once. Each is a Wasm instance of several MB; a burst of commands (50
# `download`s from a shell loop) would otherwise instantiate them all together. Scripts are short:
# one that finds no turn within SCRIPT_WAIT seconds runs anyway, so a long one never blocks the rest.
SCRIPTS_AT_ONCE = 4
SCRIPT_WAIT = 10.0


class Kernel:
    def __init__(self, node: str, home: Path, runtime: Runtime, terminal: OutputApi, compute_limit: float = 30.0,
                 vfs_file: Callable[[str], Path] | None = None):
        """`runtime` has the process ABI installed (standard_host.install_imports) before a process
        starts; `vfs_file` finds a VFS path's file on disk (Vfs.file_path), for a process's wasm."""
        self.node = node
        self.vfs_file = vfs_file
        self.home = home
        self.runtime = runtime
        self.terminal = terminal
        self.net: Transport | None = None  # set by the node once networking is up
        self.compute_limit = compute_limit
        self.compute_ticks = max(1, int(compute_limit / EPOCH_TICK))
        self.timers = Timers()
        self.state = StateStore(home / "state")
        self.processes: dict[ProcessId, Endpoint] = {}
        self.lock = threading.RLock()
        self._grants: dict[ProcessId, set[Capability]] = {}  # caps waiting for a process to start
        self._restarts: dict[ProcessId, list[float]] = {}
        self._component_memo: dict[tuple, LoadedComponent] = {}
        self._memo_locks: dict[tuple, threading.Lock] = {}
        self._exit_listeners: list[Callable[[ProcessId, str], None]] = []
        self._instances = 0          # live Wasm instances: processes and the libraries they link
        self.script_turns = threading.BoundedSemaphore(SCRIPTS_AT_ONCE)
        self._network_cap = Capability.make(self.kernel_address, "network")
        # caps issued here that left on a message to a peer: upstream signs such caps and takes them
        # back only with a valid signature, which only the peer it went to holds; our wire carries
        # none, so the kernel remembers each (peer node, cap) it sent
        self._exported: OrderedDict[tuple[str, Capability], None] = OrderedDict()

    def register(self, endpoint: Endpoint) -> None:
        """Route messages for `endpoint.id` to `endpoint` (a host service) from now on."""
        with self.lock:
            if endpoint.id in self.processes:
                raise ValueError(f"a process named {endpoint.id} is already running")
            self.processes[endpoint.id] = endpoint

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
        return self._network_cap

    def on_exit_listener(self, fn: Callable[[ProcessId, str], None]) -> None:
        self._exit_listeners.append(fn)

    def remove_exit_listener(self, fn: Callable[[ProcessId, str], None]) -> None:
        if fn in self._exit_listeners:
            self._exit_listeners.remove(fn)

    # ---- starting processes ----------------------------------------------------------------
    def load_vfs_wasm(self, wasm_path: str) -> LoadedComponent:
        """Load a component from a VFS path like `pkg:pub/pkg/x.wasm`; raises OSError/ValueError."""
        if self.vfs_file is None:
            raise ValueError(f"this kernel has no VFS to load {wasm_path!r} from")
        path = self.vfs_file(wasm_path)
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        comp = self._component_memo.get(key)
        if comp is None:
            # one reader per file: a burst of first starts (20 scripts) would otherwise each read and
            # hash the whole wasm (~18 MB) at once, and the freed copies stay in the malloc heap
            with self._memo_locks.setdefault(key, threading.Lock()):
                comp = self._component_memo.get(key)
                if comp is None:
                    comp = self._component_memo[key] = self.runtime.load(path.read_bytes())
        return comp

    def start_process(self, pid: ProcessId, wasm_path: str, capabilities: set[Capability], public: bool,
                      on_exit: OnExit, lib_paths: Sequence[str] = (), parent: ProcessId | None = None,
                      script: bool = False) -> WasmProcess:
        """Load and start a process; raises MissingInterface, OSError or ValueError with a clear text.
        A `script` waits for one of SCRIPTS_AT_ONCE turns before it is instantiated."""
        self.runtime.require_abi()
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
            self.runtime.define_forwarders(lib)
        caps = {c.normalised() for c in capabilities}
        proc = WasmProcess(self, pid, comp, libs, wasm_path, caps, public, on_exit, parent, list(lib_paths))
        if script:
            proc.turns, proc.turn_wait = self.script_turns, SCRIPT_WAIT
        with self.lock:
            if pid in self.processes:
                raise ValueError(f"a process named {pid} is already running")
            proc.capabilities |= self._grants.pop(pid, set())
            self.processes[pid] = proc
        proc.start()
        return proc

    def initialize_process(self, src: Endpoint, pid: ProcessId, wasm: bytes, wasm_path: str,
                           caps: list[Capability], public: bool, on_exit: OnExit) -> WasmProcess:
        """Upstream's KernelCommand::InitializeProcess (kernel/mod.rs): make a process from `wasm`,
        ready but not running until `run_process`; messages sent to it meanwhile wait in its inbox.
        It gets those of `caps` the sender holds and a messaging cap to itself; the sender gets one
        to it. Raises MissingInterface or ValueError with a clear text."""
        self.runtime.require_abi()
        comp = self.runtime.load(wasm)
        self.runtime.check_links(comp, [], f"process {pid}", [])
        kept = {c.normalised() for c in caps if src.trusted or src.has_cap(c)}
        kept.add(messaging_cap(Address(self.node, pid)))
        proc = WasmProcess(self, pid, comp, [], wasm_path.lstrip("/"), kept, public, on_exit, src.id, [])
        with self.lock:
            if pid in self.processes:
                raise ValueError(f"a process named {pid} is already running")
            proc.capabilities |= self._grants.pop(pid, set())
            self.processes[pid] = proc
        if not src.trusted:
            src.capabilities.add(messaging_cap(Address(self.node, pid)))
        return proc

    def run_process(self, pid: ProcessId) -> bool:
        """Upstream's KernelCommand::RunProcess: start an initialized process; one already running
        is sent the request `run` from the kernel, as upstream does. False if there is no such process."""
        proc = self.processes.get(pid)
        if not isinstance(proc, WasmProcess):
            return False
        if proc.thread is None:
            proc.start()
        else:
            proc.deliver(KernelMessage(new_request_id(), self.kernel_address, proc.address, None,
                                       Request(body=b"run"), None))
        return True

    def drop_caps(self, holder: ProcessId, caps: list[Capability]) -> None:
        with self.lock:
            proc = self.processes.get(holder)
            gone = {c.normalised() for c in caps}
            if proc is not None:
                proc.capabilities -= gone
            if holder in self._grants:
                self._grants[holder] -= gone

    def grant(self, holder: ProcessId, cap: Capability) -> None:
        with self.lock:
            proc = self.processes.get(holder)
            if proc is not None:
                proc.capabilities.add(cap.normalised())
            else:
                self._grants.setdefault(holder, set()).add(cap.normalised())

    def spawn(self, parent: Endpoint, name: str | None, wasm_path: str, on_exit: OnExit,
              request_caps: list[Capability], grant_to: list[ProcessId], public: bool,
              lib_paths: list[str]) -> ProcessId | str:
        """The `spawn` import: returns a ProcessId or the spawn-error name."""
        pid = ProcessId(name or str(secrets.randbits(64)), parent.id.package_name, parent.id.publisher_node)
        if pid in self.processes:
            return "name-taken"
        # as upstream's spawn (kernel/standard_host.rs): the child gets what the parent may pass on,
        # plus messaging caps to itself and to its parent; the parent gets one to the child
        caps = set(self.filter_caps(parent, request_caps))
        child = Address(self.node, pid)
        caps |= {messaging_cap(child), messaging_cap(parent.address)}
        try:
            self.start_process(pid, wasm_path.lstrip("/"), caps, public, on_exit, lib_paths, parent.id)
        except MissingInterface as e:
            self.terminal.error(f"spawn by {parent.id} failed: {e}")
            return "no-file-at-path"
        except (OSError, ValueError) as e:
            self.terminal.error(f"spawn by {parent.id} failed: {wasm_path}: {e}")
            return "no-file-at-path"
        for g in grant_to:
            self.grant(g, messaging_cap(child))
        self.grant(parent.id, messaging_cap(child))
        return pid

    def filter_caps(self, src: Endpoint, caps: list[Capability]) -> list[Capability]:
        """Upstream's FilterCaps (kernel/mod.rs): of the caps a process attaches or passes on, keep
        those it issued itself and those it holds; the rest are silently left out."""
        kept = []
        for c in caps:
            c = c.normalised()
            if (c.issuer == src.address or src.has_cap(c)) and c not in kept:
                kept.append(c)
        return kept

    def save_capabilities(self, holder: Endpoint, caps: list[Capability]) -> None:
        """Upstream saves whatever it is given; here a process keeps only caps it could already
        exercise or pass on: ones it holds, issued, or was given on a message."""
        for c in caps:
            c = c.normalised()
            if holder.has_cap(c) or c.issuer == holder.address or holder.was_given(c):
                holder.capabilities.add(c)
            else:
                log.info("%s may not save %s: never given to it", holder.id, c)

    def kill(self, pid: ProcessId) -> bool:
        proc = self.processes.get(pid)
        if proc is None or proc.trusted:  # the node's own services are not the user's to stop
            return False
        proc.stop()
        if isinstance(proc, WasmProcess) and proc.thread is None:
            self.process_exited(proc, "killed")   # initialized, never run: no thread will report it
        return True

    def process_exited(self, proc: WasmProcess, reason: str) -> None:
        with self.lock:
            if self.processes.get(proc.id) is proc:
                del self.processes[proc.id]
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
                # as upstream: nobody is left to hear an answer; attached caps are filtered here too
                req.expects_response = None
                req.capabilities = self.filter_caps(proc, req.capabilities)
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
    def send_request(self, src: Endpoint, target: Address, req: Request, context: bytes | None,
                     blob: Blob | None, awaited: bool = False) -> None:
        if target.node == "our":  # before it is kept as a pending request's (and SendError's) target
            target = Address(self.node, target.process)
        if req.capabilities:
            req.capabilities = self.filter_caps(src, req.capabilities)
        prompting = src.current
        # as upstream's send_request_v0: `inherit` takes the prompting message's id and rsvp, if
        # there is one, and the last blob received either way
        if req.inherit and prompting is not None:
            mid, rsvp = prompting.id, prompting.rsvp
        else:
            mid, rsvp = new_request_id(), None
        if req.inherit and blob is None:
            blob = src.current_blob
        if req.expects_response is not None:
            rsvp = src.address
            pending = Pending(context, target, req, blob, awaited=awaited, prompting=src.current)
            src.add_pending(mid, pending)
            timeout = min(max(int(req.expects_response), 0), MAX_TIMEOUT)
            pending.timer = self.timers.add(timeout, lambda: src.fail(mid, SendErrorKind.TIMEOUT))
        self.route(KernelMessage(mid, src.address, target, rsvp, req, blob), src)

    def send_response(self, src: Endpoint, resp: Response, blob: Blob | None) -> None:
        prompting = src.current
        if prompting is None:
            # as upstream (kernel/standard_host_v0.rs send_response_v0): no request to answer
            log.info("%s sent a Response with no prompting message: dropped", src.id)
            return
        # the answer goes to the prompting message's rsvp, else to its source (send_response_v0)
        target = prompting.rsvp if prompting.rsvp is not None else prompting.source
        if resp.inherit and blob is None:
            blob = src.current_blob
        if resp.capabilities:
            resp.capabilities = self.filter_caps(src, resp.capabilities)
        self.route(KernelMessage(prompting.id, src.address, target, None, resp, blob), src)

    def may_message(self, src: Endpoint, dest: Endpoint, is_request: bool = True) -> bool:
        """Upstream's check (kernel/mod.rs), for requests and responses alike: the target is public
        or the source holds a messaging cap to it. Parent and child hold such caps from spawn.
        The node's services message anyone and hear the answers to their own requests."""
        if dest.public or src.trusted or src is dest or (dest.trusted and not is_request):
            return True
        return src.has_cap(messaging_cap(dest.address))

    def _note_exported(self, km: KernelMessage) -> None:
        """Remember our node's caps that a message takes to a peer (upstream signs them for it)."""
        with self.lock:
            for c in km.message.capabilities:
                if c.issuer.node == self.node:
                    key = (km.target.node, c.normalised())
                    self._exported[key] = None
                    self._exported.move_to_end(key)
            while len(self._exported) > MAX_EXPORTED_CAPS:
                self._exported.popitem(last=False)

    def route(self, km: KernelMessage, src: Endpoint) -> None:
        if km.target.node == "our":  # Kinode's alias for this node (process_lib sends to our@vfs:distro:sys)
            km.target = Address(self.node, km.target.process)
        is_request = isinstance(km.message, Request)
        kind = "request" if is_request else "response"
        # as upstream, a refused response is dropped (its requester times out); a refused request
        # fails at once with timeout
        refuse = (lambda: src.fail(km.id, SendErrorKind.TIMEOUT)) if is_request else (lambda: None)
        if km.target.node != self.node:
            if not src.has_cap(self._network_cap):
                self.terminal.error(f"{src.id} has no network capability: {kind} to {km.target} refused")
                refuse()
                return
            if self.net is None:
                if is_request:
                    src.fail(km.id, SendErrorKind.OFFLINE)
                return
            self._note_exported(km)

            def offline(reason: str, mid=km.id) -> None:
                log.info("message to %s failed: %s", km.target, reason)
                if is_request:
                    src.fail(mid, SendErrorKind.OFFLINE)
            self.net.send(km, offline)
            return
        dest = self.processes.get(km.target.process)
        if dest is None:
            log.info("no process %s: message from %s dropped", km.target.process, km.source)
            refuse()
            return
        if not self.may_message(src, dest, is_request):
            self.terminal.error(f"{src.id} may not message {dest.id} (no messaging capability): {kind} refused")
            refuse()
            return
        dest.deliver(km)

    def from_network(self, km: KernelMessage, receipt: Receipt | None = None) -> None:
        """A message from a peer whose identity `host.net.network` has verified. As upstream, any process
        holding the network capability hears it, public or not; requests and responses alike.
        `receipt` is told when the message is taken or dropped (the peer's share of our memory)."""
        dest = self.processes.get(km.target.process)
        if dest is None or not dest.hears_network:
            log.info("message from %s to missing or local-only process %s dropped", km.source, km.target)
            _taken(receipt)
            return
        kind = "request" if isinstance(km.message, Request) else "response"
        if not dest.has_cap(self._network_cap):
            log.warning("%s has no network capability: %s from %s dropped", dest.id, kind, km.source)
            _taken(receipt)
            return
        if len(km.message.body) > MAX_LIST_BYTES:
            # the process could not take it (it would trap): a peer could stop any process so
            log.warning("%s from %s to %s dropped: its body of %d bytes is over the %d a process can take "
                        "(large data goes in the blob)", kind, km.source, dest.id, len(km.message.body),
                        MAX_LIST_BYTES)
            _taken(receipt)
            return
        if km.message.capabilities:
            # a peer may hand us back only our caps we gave out to it (upstream: only those we
            # signed, and only the peer we sent one to holds its signature)
            caps = [c.normalised() for c in km.message.capabilities]
            peer = km.source.node
            with self.lock:
                km.message.capabilities = [c for c in caps
                                           if c.issuer.node != self.node or (peer, c) in self._exported]
        if isinstance(dest, WasmProcess):
            dest.deliver(km, receipt)
        else:  # the node's own services handle it at once
            dest.deliver(km)
            _taken(receipt)

    def peer_lost(self, node: str) -> None:
        for proc in list(self.processes.values()):
            proc.fail_node(node, SendErrorKind.OFFLINE)

    def shutdown(self) -> None:
        for proc in list(self.processes.values()):
            proc.stop()


def _taken(receipt: Receipt | None) -> None:
    if receipt is not None:
        receipt.taken()
