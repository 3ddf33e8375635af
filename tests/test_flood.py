"""A peer cannot take a node's memory: its messages wait in the node only up to a share, then the
node stops reading its socket; other peers are served meanwhile (bench/flood.py is the full size)."""
from __future__ import annotations

import os

from conftest import peak_rss_bytes, sha256, wait_for
from flooder import Flooder

FLOOD_COUNT = 100
FLOOD_SIZE = 8 << 20
DOWNLOAD = 32 << 20
RSS_LIMIT = 300 << 20


def refusals(node, peer: str) -> int:
    return sum(f"refused ListFiles from {peer}" in ln for ln in node.lines)


def test_a_flood_from_a_peer_not_allowed_keeps_memory_bounded_and_a_download_completes(node_factory, tmp_path):
    server, client = node_factory("server.dev"), node_factory("client.dev")
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
    # the node held the flooder back (it stopped reading it), and said so
    assert any("flood.dev" in ln and "not reading from it" in ln for ln in server.lines), server.lines[-20:]
    assert server.run("ps", wait=0.1)[0] == 0
