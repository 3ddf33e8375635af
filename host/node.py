"""A node: its home, the runtime, the kernel and its services, the network, the packages, and the
control socket through which other shells run terminal commands on it.
"""
from __future__ import annotations

import fcntl
import logging
import os
import queue
import re
import socket
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from host import packages
from host.kernel import Kernel
from host.process import WasmProcess
from host.terminal import Terminal
from host.types import Address, ProcessId
from host.vfs import Vfs
from host.wasm import MAX_INSTANCES, Runtime

log = logging.getLogger("host.node")

DEFAULT_HOME = "/tmp/kinode-fake-node"
DEFAULT_PORT = 8080
CONTROL_SOCKET = "node.sock"
DONE = "\x00done"
_ERROR_LINE = re.compile(r"^(?:[^ ]+: )?error: ")  # the node's or a package's error line  # control-socket marker: the command's script has finished


class NodeError(Exception):
    """A start-up problem to show the user as is."""


class Node:
    def __init__(self, name: str, home: Path, port: int = DEFAULT_PORT, packages_dirs: Sequence[Path] = (),
                 directory: Optional[Path] = None, peers_file: Optional[Path] = None,
                 compute_limit: float = 30.0, terminal: Optional[Terminal] = None, networking: bool = True,
                 max_processes: int = MAX_INSTANCES, net_port: int = 0, http_host: Optional[str] = "127.0.0.1"):
        self.name = name
        self.net_port = net_port      # 0: a free port, registered in the directory
        self.http_host = http_host    # None: no HTTP server
        self.max_processes = max_processes
        self.home = Path(home).absolute()
        self.port = port              # the HTTP port, as kit's
        self.packages_dirs = list(packages_dirs)
        self.directory_path = directory
        self.peers_file = peers_file
        self.compute_limit = compute_limit
        self.terminal = terminal or Terminal()
        self.networking = networking
        self.packages: dict[str, packages.Package] = {}
        self.net = None
        self._stop = threading.Event()
        self._lock_file = None
        self._control: Optional[socket.socket] = None

    # ---- start and stop --------------------------------------------------------------------
    def start(self) -> None:
        self._lock_home()
        self.runtime = Runtime(max_instances=self.max_processes)
        self.vfs = Vfs(self.home / "vfs")
        self.kernel = Kernel(self.name, self.home, self.runtime, self.vfs, self.terminal, self.compute_limit)
        if self.networking:
            self._start_network()
        if self.http_host is not None:
            self._start_http()
        self._start_control()
        for folder in self.packages_dirs:
            if not folder.is_dir():
                self.terminal.error(f"packages folder {folder} does not exist (run ./build.sh?)")
                continue
            for src in packages.find_packages(folder):
                try:
                    pkg = packages.install(self.kernel, src)
                    self.packages[str(pkg.id)] = pkg
                except Exception as e:
                    self.terminal.error(f"could not install package {src.name}: {e}")

    def _lock_home(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        f = open(self.home / ".node.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise NodeError(f"home {self.home} is in use by another running node ({holder}); "
                            f"stop it or pick another home with --home") from None
        f.seek(0)
        f.truncate()
        f.write(f"{self.name}, pid {os.getpid()}")
        f.flush()
        self._lock_file = f

    def _start_network(self) -> None:
        from host import net
        from host.directory import Directory, NameTaken, default_directory_path
        identity = net.load_or_create_identity(self.home)
        directory = Directory(self.directory_path or default_directory_path(), peers_file=self.peers_file)
        self.net = net.Network(self.name, identity, self.net_port, directory,
                               on_message=self.kernel.from_network, on_peer_lost=self.kernel.peer_lost)
        try:
            self.net.start()
        except NameTaken as e:
            raise NodeError(str(e)) from None
        except OSError as e:
            raise NodeError(f"cannot listen on port {self.net_port}: {e.strerror or e} "
                            f"(another node? pick another with --net-port)") from None
        self.kernel.net = self.net

    def _start_http(self) -> None:
        from host.http_server import HttpServerService
        self.http = HttpServerService(self.kernel, self.home, self.port, self.http_host)
        try:
            self.http.start()
        except OSError as e:
            raise NodeError(f"cannot listen on port {self.port}: {e.strerror or e} "
                            f"(another node? pick another with --port)") from None
        self.kernel.processes[self.http.id] = self.http
        self.terminal.info(f"{self.name}: web page: {self.http.login_url}")

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._control is not None:
            self._control.close()
            (self.home / CONTROL_SOCKET).unlink(missing_ok=True)
        if getattr(self, "kernel", None) is not None:
            self.kernel.shutdown()
        if self.net is not None:
            self.net.stop()
        if getattr(self, "http", None) is not None:
            self.http.stop()

    # ---- terminal actions ------------------------------------------------------------------
    def run_script(self, head: ProcessId, args: str) -> ProcessId:
        pkg = self.packages.get(f"{head.package_name}:{head.publisher_node}")
        if pkg is None:
            raise ValueError(f"no package {head.package_name}:{head.publisher_node} is installed")
        return packages.run_script(self.kernel, pkg, head.process_name, args)

    def send_message(self, target: Address, body: str) -> None:
        self.kernel.send_from_terminal(target, body.encode())

    def list_scripts(self) -> list[str]:
        return [f"{name.removesuffix('.wasm')}:{pid}" for pid, pkg in sorted(self.packages.items())
                for name in sorted(pkg.scripts)]

    def describe_processes(self) -> str:
        procs = sorted(self.kernel.processes.values(), key=lambda p: str(p.id))
        lines = [f"{len(procs)} processes:"]
        for p in procs:
            kind = "wasm" if isinstance(p, WasmProcess) else "host"
            lines.append(f"  {p.id} ({kind}{', public' if p.public else ''})")
        return "\n".join(lines)

    def describe_capabilities(self, pid: ProcessId) -> str:
        proc = self.kernel.processes.get(pid)
        if proc is None:
            raise ValueError(f"no process {pid}")
        caps = sorted(proc.capabilities, key=lambda c: (str(c.issuer), c.params))
        return "\n".join([f"{pid} holds {len(caps)} capabilities:"] + [f"  {c.issuer} {c.params}" for c in caps])

    # ---- control socket --------------------------------------------------------------------
    def _start_control(self) -> None:
        path = self.home / CONTROL_SOCKET
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        self._control = sock
        threading.Thread(target=self._accept_loop, name="control", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._control.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_control, args=(conn,), daemon=True).start()

    def _serve_control(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\n" not in data and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                return
            conn.settimeout(None)
            line = data.split(b"\n", 1)[0].decode("utf-8", "replace")
            gone = threading.Event()
            outbox: "queue.Queue[Optional[str]]" = queue.Queue(10_000)

            def send(text: str) -> None:  # called by the terminal: must not block
                if not gone.is_set():
                    try:
                        outbox.put_nowait(text)
                    except queue.Full:
                        gone.set()  # a client that stopped reading is cut off

            def pump() -> None:
                while True:
                    text = outbox.get()
                    if text is None:
                        return
                    try:
                        conn.sendall((text + "\n").encode())
                    except OSError:
                        gone.set()
                        return
            sender = threading.Thread(target=pump, daemon=True)
            sender.start()

            finished = threading.Event()
            unsubscribe = self.terminal.subscribe(send)
            script: list[Optional[ProcessId]] = [None]

            def exited(pid: ProcessId, reason: str) -> None:
                if pid == script[0]:
                    finished.set()
            self.kernel.on_exit_listener(exited)
            try:
                script[0] = self.terminal.run_line(self, line)
                if script[0] is None or script[0] not in self.kernel.processes:
                    finished.set()
                # the client decides how long to keep listening after the script ends
                while not gone.is_set() and not finished.wait(0.2):
                    pass
                send(DONE)
                while not gone.is_set():
                    try:
                        if not conn.recv(4096):
                            break
                    except OSError:
                        break
            finally:
                unsubscribe()
                self.kernel.remove_exit_listener(exited)
                outbox.put(None)
                sender.join(5)


def run_remote(home: Path, command: str, wait: float = 1.0, until: Optional[str] = None,
               timeout: float = 60.0, out=None) -> tuple[int, list[str]]:
    """Run `command` on the node whose home is `home`; collect (and print to `out`) its output.

    Output is collected until the command's script has ended and then `wait` more seconds, or, with
    `until` (a regex), until a line matches it. Returns (exit code, lines): 0 on success, 1 when an
    `error:` line was seen or `until` never matched, 2 when no node runs there.
    """
    import select
    path = Path(home) / CONTROL_SOCKET
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        msg = f"error: no node is running with home {home} (no control socket at {path})"
        if out is not None:
            print(msg, file=out)
        return 2, [msg]
    lines: list[str] = []
    pattern = re.compile(until) if until else None
    matched = False
    with sock:
        sock.sendall(command.encode() + b"\n")
        buf = b""
        deadline = time.monotonic() + timeout
        done_at: Optional[float] = None
        while True:
            now = time.monotonic()
            end = deadline if pattern else min(deadline, (done_at + wait) if done_at else deadline)
            if now >= end:
                break
            ready, _, _ = select.select([sock], [], [], end - now)
            if not ready:
                continue
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                text = raw.decode("utf-8", "replace")
                if text == DONE:
                    done_at = time.monotonic()
                    continue
                lines.append(text)
                if out is not None:
                    print(text, file=out, flush=True)
                if pattern and pattern.search(text):
                    matched = True
            if matched:
                break
    failed = any(_ERROR_LINE.search(line) for line in lines) or (pattern is not None and not matched)
    return (1 if failed else 0), lines
