"""A node: its home, the runtime, the kernel and its services, the network, the packages, and the
control socket through which other shells run terminal commands on it (host/control.py).
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
from typing import TYPE_CHECKING, Optional, TextIO

from host import packages
from host.control import ControlServer, NodeCommands
from host.kernel import Kernel
from host.process import WasmProcess
from host.settings import Settings
from host.terminal import Terminal
from host.types import Address, ProcessId
from host.vfs import Vfs
from host.wasm import Runtime

if TYPE_CHECKING:
    from host import net

log = logging.getLogger("host.node")



class NodeError(Exception):
    """A start-up problem to show the user as is."""


class Node:
    def __init__(self, settings: Settings, terminal: Optional[Terminal] = None, networking: bool = True):
        self.settings = settings
        self.name = settings.name
        self.home = settings.home.absolute()
        self.port = settings.port
        self.packages_dirs = list(settings.packages)
        self.compute_limit = settings.compute_limit
        self.terminal = terminal or Terminal()
        self.networking = networking
        self.packages: dict[str, packages.Package] = {}
        self.net: Optional[net.Network] = None
        self._stop = threading.Event()
        self._lock_file: Optional[TextIO] = None
        self._control: Optional[ControlServer] = None

    # ---- start and stop --------------------------------------------------------------------
    def start(self) -> None:
        self._lock_home()
        self.runtime = Runtime(self.settings.runtime)
        self.vfs = Vfs(self.home / "vfs")
        self.kernel = Kernel(self.name, self.home, self.runtime, self.vfs, self.terminal, self.compute_limit)
        if self.networking:
            self._start_network()
        self._control = ControlServer(self.home, NodeCommands(self))
        self._control.start()
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
        from host.directory import Directory, NameTaken
        identity = net.load_or_create_identity(self.home)
        directory = Directory(self.settings.directory, peers_file=self.settings.peers)
        self.net = net.Network(self.name, identity, self.port, directory,
                               on_message=self.kernel.from_network, on_peer_lost=self.kernel.peer_lost)
        try:
            self.net.start()
        except NameTaken as e:
            raise NodeError(str(e)) from None
        except OSError as e:
            raise NodeError(f"cannot listen on port {self.port}: {e.strerror or e} "
                            f"(another node? pick another with --port)") from None
        self.kernel.net = self.net

    def request_stop(self) -> None:
        self._stop.set()

    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._control is not None:
            self._control.stop()
        if getattr(self, "kernel", None) is not None:
            self.kernel.shutdown()
        if self.net is not None:
            self.net.stop()

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
