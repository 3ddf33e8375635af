"""A peer cannot take a node's memory: its messages wait in the node only up to a share, then the
node stops reading its socket; other peers are served meanwhile (bench/flood.py is the full size)."""
from __future__ import annotations

import os
import re
import select
import socket
import threading

from conftest import evict_compiled, peak_rss_bytes, sha256, wait_for
from flooder import Flooder

FLOOD_COUNT = 100
FLOOD_SIZE = 8 << 20
DOWNLOAD = 32 << 20
RSS_LIMIT = 300 << 20


def refusals(node, peer: str) -> int:
    return sum(f"refused ListFiles from {peer}" in ln for ln in node.lines)


def test_a_flood_from_a_peer_not_allowed_keeps_memory_bounded_and_a_download_completes(node_factory, tmp_path):
    evict_compiled()  # the node's memory, not how recently its components were compiled
    # -v: the node says when it stops reading a peer (back-pressure, logged at INFO)
    server, client = node_factory("server.dev", extra_args=["-v"]), node_factory("client.dev")
    server.files.mkdir(parents=True, exist_ok=True)
    src = server.files / "big.bin"
    src.write_bytes(os.urandom(DOWNLOAD))
    code, lines = server.run("allow:file_transfer:template.os client.dev")
    assert code == 0, lines
    flooder = Flooder("flood.dev", tmp_path / "flood.dev", tmp_path / "directory.sqlite", server.net_port)
    try:
        sender = flooder.flood("server.dev", FLOOD_COUNT, FLOOD_SIZE)
        # the flood is under way (some refused) before the download starts
        wait_for(lambda: refusals(server, "flood.dev") >= 3, 60, "the first flood messages refused")
        code, lines = client.run("download:file_transfer:template.os big.bin server.dev",
                                 until=r"big\.bin downloaded|error:", timeout=240)
        assert code == 0, lines
        assert sha256(client.files / "big.bin") == sha256(src)
        # positive control: the whole flood arrived and was refused, message by message
        wait_for(lambda: refusals(server, "flood.dev") >= FLOOD_COUNT, 240, "every flood message refused")
        sender.join(30)
        assert flooder.sent == FLOOD_COUNT
    finally:
        flooder.close()
    peak = peak_rss_bytes(server)
    print(f"server's peak RSS {peak >> 20} MiB")
    assert peak < RSS_LIMIT, f"server's peak RSS {peak >> 20} MiB"
    # the node held the flooder back (it stopped reading it), and says so
    assert any("flood.dev" in ln and "not reading from it" in ln for ln in server.lines), server.lines[-20:]
    code, lines = server.run("net_diagnostics")
    held = [re.search(r"flood\.dev: .* left unread (\d+) times", ln) for ln in lines]
    assert code == 0 and any(m and int(m.group(1)) > 0 for m in held), lines
    assert server.run("ps", wait=0.1)[0] == 0


class IdleConnections:
    """`count` TCP connections from `source_ip` that never speak, each re-opened once the node
    closes it (as an attacker keeps a node's unauthenticated slots full)."""

    def __init__(self, source_ip: str, port: int, count: int):
        self.source_ip, self.port, self.count = source_ip, port, count
        self.opened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self) -> socket.socket | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((self.source_ip, 0))
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            return None
        self.opened += 1
        return s

    def _run(self) -> None:
        socks = [s for s in (self._open() for _ in range(self.count)) if s is not None]
        while not self.stop.is_set():
            readable, _, _ = select.select(socks, [], [], 0.2)
            for s in readable:          # closed by the node (or reset): open another
                try:
                    data = s.recv(1)
                except OSError:
                    data = b""
                if not data:
                    socks.remove(s)
                    s.close()
            while len(socks) < self.count and not self.stop.is_set():
                s = self._open()
                if s is None:
                    break
                socks.append(s)
        for s in socks:
            s.close()


def test_idle_connections_from_one_address_leave_room_for_another(node_factory):
    server, client = node_factory("server.dev"), node_factory("client.dev")
    server.files.mkdir(parents=True, exist_ok=True)
    src = server.files / "f.bin"
    src.write_bytes(os.urandom(4 << 20))
    flood = IdleConnections("127.0.0.2", server.net_port, 300)
    try:
        # the flood arrived: the node turns 127.0.0.2's connections away past its share
        wait_for(lambda: any("dropping connection from 127.0.0.2" in ln for ln in server.lines), 60,
                 "the node refusing 127.0.0.2's surplus")
        code, lines = client.run("list_files:file_transfer:template.os server.dev", timeout=60)
        assert code == 0 and any("f.bin" in ln for ln in lines), lines
        code, lines = client.run("download:file_transfer:template.os f.bin server.dev",
                                 until=r"f\.bin downloaded|error:", timeout=120)
        assert code == 0, lines
        assert sha256(client.files / "f.bin") == sha256(src)
        assert flood.opened > 300   # it kept re-opening all along
        assert any("127.0.0.2 has 16 unauthenticated connections already" in ln for ln in server.lines)
        code, lines = server.run("net_diagnostics")
        turned = [re.search(r"unauthenticated connections: \d+ .*; (\d+) turned away", ln) for ln in lines]
        assert code == 0 and any(m and int(m.group(1)) > 0 for m in turned), lines
    finally:
        flood.stop.set()
        flood.thread.join(10)
