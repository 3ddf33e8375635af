"""A node: its home, the runtime, the kernel and the services it registers (as Kinode's main.rs
does), the network, the packages, and the control socket through which other shells run commands.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from host import fsutil, packages
from host.kernel.kernel import Kernel
from host.kernel.service import KernelService
from host.kernel.standard_host import install_imports
from host.messages import Address, ProcessId
from host.net.directory import fingerprint
from host.net.service import NetService
from host.runtime.wasm import Runtime
from host.settings import Settings
from host.terminal.commands import Commands
from host.terminal.control import ControlServer, NodeCommands
from host.terminal.output import TerminalOutput
from host.terminal.service import TERMINAL_ID, TerminalService
from host.timer.service import TimerService
from host.vfs.service import VfsService
from host.vfs.store import Vfs

if TYPE_CHECKING:
    from host.http.server import HttpServerService
    from host.net.lan import Lan
    from host.net.network import Network

log = logging.getLogger("host.node")

ALIASES_FILE = "aliases.json"   # the terminal's aliases (`alias NAME PROCESS`), kept across restarts


class NodeError(Exception):
    """A start-up problem to show the user as is."""


class Node:
    def __init__(self, settings: Settings, terminal: TerminalOutput | None = None, networking: bool = True):
        self.settings = settings
        self.name = settings.name
        self.home = settings.home.absolute()
        self.port = settings.port
        self.packages_dirs = list(settings.packages)
        self.compute_limit = settings.compute_limit
        self.terminal = terminal or TerminalOutput()
        self.commands = Commands(self, self.terminal)
        self.networking = networking
        self.packages: dict[str, packages.Package] = {}
        self.net: Network | None = None
        self.lan: Lan | None = None   # nearby nodes and pairing, once networking started
        self._stop = threading.Event()
        self._lock_file: TextIO | None = None
        self._control: ControlServer | None = None
        self.http: HttpServerService | None = None

    # ---- start and stop --------------------------------------------------------------------
    def start(self) -> None:
        self._lock_home()
        self.runtime = Runtime(self.settings.runtime)
        install_imports(self.runtime)   # the process ABI: the node installs it, the kernel only uses it
        self.vfs = Vfs.in_home(self.home, self.settings.delta)
        self.kernel = Kernel(self.name, self.home, self.runtime, self.terminal, self.compute_limit,
                             vfs_file=self.vfs.file_path)
        self.terminal_service = TerminalService(self.kernel, self.terminal)
        self.kernel_service = KernelService(self.kernel)
        for service in (VfsService(self.kernel, self.vfs, self.settings.test_pause_after_chunks,
                                   self.settings.test_lie_after_reads), self.terminal_service, self.kernel_service,
                        TimerService(self.kernel)):
            self.kernel.register(service)
        if self.networking:
            self._start_network()
        self.net_service = NetService(self.kernel, self.net)
        self.kernel.register(self.net_service)
        if self.settings.http_host is not None:
            self._start_http()
        self._control = ControlServer(self.home, NodeCommands(self))
        self._control.start()
        for folder in self.packages_dirs:
            if not folder.is_dir():
                self.terminal.error(f"packages folder {folder} does not exist (run ./build.sh?)")
                continue
            for src in packages.find_packages(folder):
                try:
                    pkg = packages.install(self.kernel, self.vfs, src)
                    self.packages[str(pkg.id)] = pkg
                except Exception as e:
                    self.terminal.error(f"could not install package {src.name}: {e}")

    def _lock_home(self) -> None:
        try:  # a home others can change is refused before anything is read from it or written to it
            for line in fsutil.make_private_home(self.home, (Vfs.HOME_FOLDER, ".keys")):
                self.terminal.info(line)
        except fsutil.NotPrivate as e:
            raise NodeError(f"home not private: {e}") from None
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
        from host.net import network as net
        from host.net.directory import Directory, NameTaken, PeersFileError, parse_host_port
        from host.net.known import KnownPeers
        from host.net.lan import peers_file
        identity = net.load_or_create_identity(self.home)
        peers = peers_file(self.home, self.settings.peers)   # --peers, or the one pairing wrote
        directory = Directory(self.settings.directory, peers_file=peers, on_problem=self.terminal.error)
        try:
            directory.check_peers_file()
            adv_host, adv_port = parse_host_port(self.settings.advertise, None) if self.settings.advertise else (None, None)
        except (PeersFileError, ValueError) as e:
            raise NodeError(f"--advertise {e}" if not isinstance(e, PeersFileError) else str(e)) from None
        self.net = net.Network(self.name, identity, self.settings.net_port, directory,
                               on_message=self.kernel.from_network, on_peer_lost=self.kernel.peer_lost,
                               host=net.listen_addresses(self.settings.bind, peers),
                               advertise_host=adv_host, advertise_port=adv_port,
                               on_problem=lambda text: self.terminal.info(f"warning: {text}"),
                               routers=self.settings.routers, is_router=self.settings.is_router,
                               router_max_nodes=self.settings.router_max_nodes,
                               router_max_rate=self.settings.router_max_rate,
                               relay_tap=_recorder(self.settings.relay_record),
                               known=KnownPeers(self.home / ".keys" / "known_peers"),
                               dead_after=self.settings.net_timeout, compress=self.settings.compress,
                               keepalive_every=min(net.KEEPALIVE_EVERY, self.settings.net_timeout / 4))
        try:
            self.net.start()
        except NameTaken as e:
            raise NodeError(str(e)) from None
        except OSError as e:
            raise NodeError(f"cannot listen on port {self.settings.net_port}: {e.strerror or e} "
                            f"(another node? pick another with --net-port)") from None
        self.kernel.net = self.net
        self._start_lan()

    def _start_lan(self) -> None:
        """Nearby nodes and pairing (host/net/lan.py)."""
        from host.net.lan import Lan
        assert self.net is not None
        self.lan = Lan(self.net, self.home, discovery_on=self.settings.discovery,
                       advertise_given=self.settings.advertise is not None, routers=self.settings.routers,
                       say=self.terminal.info, warn=self.terminal.error)
        self.lan.start()

    def _start_http(self) -> None:
        from host.http.server import HttpServerService
        from host.net.directory import parse_host_port
        try:
            names = (parse_host_port(self.settings.advertise, None)[0],) if self.settings.advertise else ()
        except ValueError:  # reported by the network, which reads it first
            names = ()
        self.http = HttpServerService(self.kernel, self.home, self.vfs, self.port, self.settings.http_host or "127.0.0.1",
                                      self.settings.http_timeout, names=names)
        try:
            self.http.start()
        except OSError as e:
            raise NodeError(f"cannot listen on port {self.port}: {e.strerror or e} "
                            f"(another node? pick another with --port)") from None
        self.kernel.register(self.http)
        if self.lan is not None:
            self.http.pair_node = self
        self.terminal.info(f"{self.name}: web page: {self.http.login_url}")

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
        if self.lan is not None:
            self.lan.stop()
        if self.net is not None:
            self.net.stop()
        if self.http is not None:
            self.http.stop()

    # ---- terminal actions (host.terminal.commands.NodeControl) ---------------------------------------
    @property
    def node_name(self) -> str:
        return self.name

    def run_line(self, line: str) -> ProcessId | None:
        """Run a typed command line; returns the pid of the script it started, if any."""
        return self.commands.run_line(line)

    def run_script(self, head: ProcessId, args: str) -> ProcessId:
        pkg = self.packages.get(f"{head.package_name}:{head.publisher_node}")
        if pkg is None:
            raise ValueError(f"no package {head.package_name}:{head.publisher_node} is installed")
        pid = packages.start_script(self.kernel, pkg, head.process_name)
        self.terminal_service.send(Address(self.name, pid), args.encode())
        return pid

    def send_message(self, target: Address, body: str) -> None:
        self.terminal_service.send(target, body.encode())

    def send_and_await(self, target: Address, body: str, seconds: int, on_answer) -> None:
        self.terminal_service.send_and_await(target, body.encode(), seconds, on_answer)

    def process_record(self, pid: ProcessId) -> dict | None:
        return self.kernel_service.persisted_process(pid)

    def process_map(self) -> dict:
        return self.kernel_service.process_map()

    def net_peers(self) -> list:
        return self.net_service.peers()

    def net_peer(self, name: str) -> list | None:
        return self.net_service.identity(name)

    def net_diagnostics(self) -> str:
        return self.net_service.diagnostics()

    def read_vfs_file(self, path: str) -> bytes:
        """A VFS file for `cat`. The terminal is the node owner's console: like upstream's `cat`
        (which holds the VFS root capability) it may read any file, by the VFS's path rules."""
        res = self.vfs.handle(TERMINAL_ID, lambda _params: True,
                              json.dumps({"path": path, "action": "Read"}).encode(), None)
        if res.blob is None:
            raise ValueError(res.body.decode("utf-8", "replace"))
        return res.blob

    def load_aliases(self) -> dict[str, str]:
        try:
            aliases = json.loads((self.home / ALIASES_FILE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            self.terminal.error(f"aliases file {self.home / ALIASES_FILE} unreadable ({e}): no aliases")
            return {}
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            self.terminal.error(f"aliases file {self.home / ALIASES_FILE} is not a JSON object of names: no aliases")
            return {}
        return aliases

    def save_aliases(self, aliases: dict[str, str]) -> None:
        fsutil.write_atomic(self.home / ALIASES_FILE, json.dumps(aliases, indent=1, sort_keys=True).encode(),
                            fsync=True)

    def peers_entry(self) -> str:
        if self.net is None:
            raise ValueError("networking is off on this node")
        return json.dumps(self.net.entry())

    def nearby_text(self) -> str:
        return self._lan().nearby_text()

    def pair_code(self) -> tuple[str, str]:
        return self._lan().pair_code()

    def pair_join(self, code: str, target: str | None) -> None:
        """`pair CODE [TARGET]`: the code is checked now, the exchange runs in the background."""
        from host.net.pairing import code_number, parse_code
        lan = self._lan()
        code = parse_code(code)
        self.terminal.info(f"pairing with {target or f'the nearby node showing code {code_number(code)}'} ...")

        def run() -> None:
            try:
                lan.pair_join(code, target)
            except ValueError as e:
                self.terminal.error(f"pairing failed: {e}")
        threading.Thread(target=run, name="pair", daemon=True).start()

    def pair_join_wait(self, code: str, target: str | None) -> str:
        return self._lan().pair_join(code, target)

    def unpair(self, name: str) -> str:
        return self._lan().unpair(name)

    def _lan(self) -> Lan:
        if self.lan is None:
            raise ValueError("networking is off on this node")
        return self.lan

    def reload_peers(self) -> str:
        if self.net is None:
            raise ValueError("networking is off on this node")
        return self.net.directory.reload_peers()

    def forget_peer(self, name: str) -> str:
        if self.net is None or self.net.known is None:
            raise ValueError("networking is off on this node")
        if not name or " " in name:
            raise ValueError("usage: forget NODE")
        key = self.net.known.forget(name)
        if key is None:
            return f"no key remembered for {name}"
        return f"forgot key {fingerprint(key)} for {name}: the next key it connects with is remembered"

    def kill(self, pid: ProcessId) -> bool:
        return self.kernel.kill(pid)

    def list_scripts(self) -> list[str]:
        return [f"{name.removesuffix('.wasm')}:{pid}" for pid, pkg in sorted(self.packages.items())
                for name in sorted(pkg.scripts)]

    def describe_processes(self) -> str:
        procs = sorted(self.kernel.processes.values(), key=lambda p: str(p.id))
        lines = [f"{len(procs)} processes:"]
        for p in procs:
            kind = "host" if p.trusted else "wasm"
            lines.append(f"  {p.id} ({kind}{', public' if p.public else ''})")
        return "\n".join(lines)

    def describe_capabilities(self, pid: ProcessId) -> str:
        proc = self.kernel.processes.get(pid)
        if proc is None:
            raise ValueError(f"no process {pid}")
        caps = sorted(proc.capabilities, key=lambda c: (str(c.issuer), c.params))
        return "\n".join([f"{pid} holds {len(caps)} capabilities:"] + [f"  {c.issuer} {c.params}" for c in caps])


def _recorder(path: Path | None):
    """A relay tap appending every relayed byte to `path` (KINODE_RELAY_RECORD, for tests), or None."""
    if path is None:
        return None
    out = open(path, "ab", buffering=0)
    return lambda data: out.write(data)
