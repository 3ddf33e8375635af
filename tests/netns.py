"""Network namespaces joined by a real link, with a node in each: the `netns` fixture.

Each test gets its own namespaces (named after this process, so parallel runs do not clash): a hub
namespace holding a bridge per LAN, and one namespace per host joined to the bridge of each of its
LANs by a veth pair, with addresses 10.231.L.N/24 and fd00:231:L::N/64 of its own (LAN 0 by
default; a host on two LANs has no forwarding between them, so hosts on LANs 1 and 2 have no route
to each other, only to a host on both). Nodes run inside with `ip netns exec`, each with its
own home, directory database and peers file (no shared directory). Everything (processes,
namespaces and with them the links) is removed afterwards, also when the test fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from conftest import REPO, NodeProc, _require_built

SUBNET4, SUBNET6 = "10.231.0", "fd00:231:"
PREFIX = f"kpy{os.getpid()}"   # namespace names of this test run
PORT = 8080                    # the networking port; every namespace has its own ports
HTTP_PORT = 8081               # the web page (--port), beside the networking port (--net-port PORT)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _can_make_namespaces() -> str | None:
    """None if namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"{PREFIX}probe"
    r = ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def _has_netem() -> bool:
    probe = f"{PREFIX}netem"
    ip("netns", "add", probe)
    try:
        ip("-n", probe, "link", "set", "lo", "up")
        r = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                           capture_output=True, text=True) if shutil.which("tc") else None
        return r is not None and r.returncode == 0
    finally:
        ip("netns", "del", probe, check=False)


def lan_addrs(lan: int, index: int) -> tuple[str, str]:
    """Host `index`'s IPv4 and IPv6 addresses on LAN `lan` (LAN 0: 10.231.0.N, fd00:231::N)."""
    return f"10.231.{lan}.{index}", (f"fd00:231:{lan}::{index}" if lan else f"{SUBNET6}:{index}")


class Host:
    """One namespace on the bridge(s): `addr4`, `addr6` on its first LAN (`addrs4[lan]` on each);
    the hub side of its first link is `port`, its own side `eth0` (then eth1, ...)."""

    def __init__(self, net: Netns, name: str, index: int, lans: tuple[int, ...] = (0,)):
        self.net, self.name, self.index, self.lans = net, name, index, lans
        self.ns = f"{PREFIX}{net.tag}{index}"
        self.port = f"p{index}"
        self.addrs4 = {lan: lan_addrs(lan, index)[0] for lan in lans}
        self.addr4, self.addr6 = lan_addrs(lans[0], index)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return ip("-n", self.ns, *args, check=check)

    def cut(self) -> None:
        """Unplug the cable at the hub: the host keeps its address, nothing passes."""
        ip("-n", self.net.hub, "link", "set", self.port, "down")

    def restore(self) -> None:
        ip("-n", self.net.hub, "link", "set", self.port, "up")

    def unplug_for_good(self) -> None:
        """Delete the link (both ends) and the namespace: the host is gone without a FIN or RST."""
        ip("-n", self.net.hub, "link", "del", self.port, check=False)
        for node in self.net.nodes:
            if node.host is self:
                node.kill()
        ip("netns", "del", self.ns, check=False)

    def rate_limit(self, mbit: int) -> None:
        """Limit what this host sends, so a transfer lasts long enough to be interrupted."""
        subprocess.run(["tc", "-n", self.ns, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate",
                        f"{mbit}mbit", "burst", "256kb", "latency", "100ms"], check=True, capture_output=True)

    def move(self, new_index: int) -> None:
        """Lose both addresses and come back on new ones."""
        self.ip("addr", "flush", "dev", "eth0", "scope", "global")
        self.addr4, self.addr6 = lan_addrs(self.lans[0], new_index)
        self.ip("addr", "add", f"{self.addr4}/24", "dev", "eth0")
        self.ip("addr", "add", f"{self.addr6}/64", "dev", "eth0", "nodad")


class NetnsNode(NodeProc):
    """A node running inside a namespace, with its own directory and peers file."""

    def __init__(self, host: Host, name: str, home: Path, extra_args: list[str], env_extra: dict | None = None):
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
        env.pop("KINODE_DIRECTORY", None)
        self.host = host
        self.peers_file = home.parent / f"{name}.peers.json"
        self.peers_file.write_text("[]")
        super().__init__(name, home, PORT, env,
                         ["--directory", str(home.parent / f"{name}.directory.sqlite"),
                          "--peers", str(self.peers_file), *extra_args])

    def entry(self, advertise: str | None, routers: tuple[str, ...] = ()) -> dict:
        """This node's peers entry from `python -m host id` (run in the root namespace); an
        indirect node's names its routers."""
        args = ["--advertise", advertise, "--net-port", str(self.port)] if advertise else []
        args += [a for r in routers for a in ("--router", r)]
        out = subprocess.run([sys.executable, "-m", "host", "id", "--home", str(self.home), "--node", self.name,
                              *args], cwd=REPO, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    def set_peers(self, entries: list[dict]) -> None:
        """Replace the peers file as an editor would (write a new file, rename it over the old one)."""
        tmp = self.peers_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, self.peers_file)

    def start(self, timeout: float = 60) -> NetnsNode:
        cmd = ["ip", "netns", "exec", self.host.ns, sys.executable, "-m", "host", "--node", self.name,
               "--home", str(self.home), "--net-port", str(self.port), "--port", str(HTTP_PORT), *self.extra_args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        first = len(self.lines)
        while not any("ready in" in ln for ln in self.lines[first:]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)
                raise RuntimeError(f"{self.name} failed to start:\n" + "\n".join(self.lines[first:]))
            time.sleep(0.02)
        while not self._new.empty():
            self._new.get_nowait()
        return self

    def thread_names(self) -> list[str]:
        pid = self.proc.pid
        names = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
            except OSError:
                pass
        return sorted(names)

    def counts(self) -> tuple[int, int]:
        """(threads, open sockets) of the node's OS process."""
        pid = self.proc.pid
        threads = len(os.listdir(f"/proc/{pid}/task"))
        sockets = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
        return threads, sockets


class Netns:
    """Namespaces on one bridge, and the nodes in them."""
    _count = 0

    def __init__(self, tmp: Path):
        Netns._count += 1
        self.tag = chr(ord("a") + Netns._count % 26)
        self.tmp = tmp
        self.hub = f"{PREFIX}{self.tag}hub"
        self.hosts: list[Host] = []
        self.nodes: list[NetnsNode] = []
        self.netem = _has_netem()
        ip("netns", "add", self.hub)
        self.bridges: set[int] = set()

    def _bridge(self, lan: int) -> str:
        if lan not in self.bridges:
            ip("-n", self.hub, "link", "add", f"br{lan}", "type", "bridge")
            ip("-n", self.hub, "link", "set", f"br{lan}", "up")
            self.bridges.add(lan)
        return f"br{lan}"

    def host(self, name: str, lans: tuple[int, ...] = (0,)) -> Host:
        h = Host(self, name, len(self.hosts) + 2, lans)
        self.hosts.append(h)
        ip("netns", "add", h.ns)
        h.ip("link", "set", "lo", "up")
        for i, lan in enumerate(lans):
            dev, port = f"eth{i}", h.port if i == 0 else f"{h.port}l{lan}"
            ip("link", "add", dev, "netns", h.ns, "type", "veth", "peer", "name", port, "netns", self.hub)
            ip("-n", self.hub, "link", "set", port, "master", self._bridge(lan), "up")
            addr4, addr6 = lan_addrs(lan, h.index)
            h.ip("addr", "add", f"{addr4}/24", "dev", dev)
            h.ip("addr", "add", f"{addr6}/64", "dev", dev, "nodad")
            h.ip("link", "set", dev, "up")
            if self.netem:  # delay and a little loss on what the hub sends to this host
                subprocess.run(["tc", "-n", self.hub, "qdisc", "add", "dev", port, "root", "netem",
                                "delay", "1ms", "loss", "0.01%"], check=True, capture_output=True)
        return h

    def node(self, host: Host, name: str, extra_args: list[str] | None = None, start: bool = False,
             env: dict | None = None) -> NetnsNode:
        node = NetnsNode(host, name, self.tmp / name, extra_args or [], env)
        self.nodes.append(node)
        return node.start() if start else node

    def cleanup(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)  # a stopped node must be able to exit
            node.stop()
        for h in self.hosts:
            ip("netns", "del", h.ns, check=False)
        ip("netns", "del", self.hub, check=False)


def _remove_stale_namespaces() -> None:
    """Namespaces left by an earlier run that was killed before its clean-up (its pid is gone)."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(r"(kpy(\d+)[a-z]\S*)", line)
        if m and not m.group(1).startswith(PREFIX) and not Path(f"/proc/{m.group(2)}").exists():
            ip("netns", "del", m.group(1), check=False)


@pytest.fixture
def netns(tmp_path):
    why = _can_make_namespaces()
    if why:
        pytest.skip(f"network namespaces cannot be made: {why}")
    _require_built()
    _remove_stale_namespaces()
    net = Netns(tmp_path)
    if not net.netem:
        warnings.warn("sch_netem is not in this kernel: the namespace links run without added delay or loss",
                      stacklevel=2)
    try:
        yield net
    finally:
        net.cleanup()
