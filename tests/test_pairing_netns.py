"""Two machines pair in one step (issue 25): nodes in network namespaces on one bridge, with no
peers files, find each other on the LAN (mDNS) and pair with a short code (SPAKE2); then files
pass both ways. Wrong codes, a spent code and a forged mDNS record get nothing. Needs root."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import netns as netns_mod
import pytest
from conftest import REPO, _require_built, sha256, write_random
from netns import Host, Netns, NetnsNode
from test_pairing import mdns_sockets

LIST = "list_files:file_transfer:template.os"
DOWNLOAD = "download:file_transfer:template.os"
DISCOVERY_DEADLINE = 30.0   # seconds to see each other nearby (well under 5 on a quiet machine)


@pytest.fixture
def pairnet(tmp_path, monkeypatch):
    why = netns_mod._can_make_namespaces()
    if why:
        pytest.skip(f"network namespaces cannot be made: {why}")
    _require_built()
    monkeypatch.setattr(netns_mod, "PREFIX", f"pair{os.getpid()}")
    net = Netns(tmp_path)
    try:
        yield net
    finally:
        net.cleanup()


def lan_node(net: Netns, host: Host, name: str, extra: list[str] | None = None) -> NetnsNode:
    """A node listening on its LAN address, with no peers file (pairing makes HOME/peers.json)."""
    node = net.node(host, name, ["--bind", host.addr4, *(extra or [])])
    node.peers_file.unlink()
    at = node.extra_args.index("--peers")
    del node.extra_args[at:at + 2]
    node.peers_file = node.home / "peers.json"
    return node.start()


def nearby(node: NetnsNode) -> list[str]:
    _, lines = node.run("nearby", wait=0.1)
    return lines


def wait_nearby(node: NetnsNode, pattern: str, deadline: float = DISCOVERY_DEADLINE) -> str:
    rx = re.compile(pattern)
    end = time.monotonic() + deadline
    while True:
        lines = nearby(node)
        hit = next((ln for ln in lines if rx.search(ln)), None)
        if hit is not None:
            return hit
        assert time.monotonic() < end, f"{node.name}: nothing nearby matches {pattern!r}: {lines}"
        time.sleep(0.3)


def show_code(node: NetnsNode) -> str:
    _, lines = node.run("pair", until=r"pairing code: ")
    return next(ln for ln in lines if "pairing code: " in ln).split("pairing code: ")[1].strip()


def join(node: NetnsNode, command: str) -> list[str]:
    code, lines = node.run(command, until=r"paired with|pairing failed", timeout=60)
    assert code == 0, lines
    return lines


def wrong(code: str) -> str:
    """The same number (so the node showing the code is found by it) with other words."""
    number, w1, w2 = code.split("-")
    return f"{number}-{'ocean' if w1 != 'ocean' else 'river'}-{w2}"


def key_of(node: NetnsNode) -> str:
    out = subprocess.run([sys.executable, "-m", "host", "id", "--home", str(node.home), "--node", node.name,
                          "--advertise", f"{node.host.addr4}:8080"], cwd=REPO, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)["public_key"]


def test_two_machines_find_each_other_and_pair_with_a_code(pairnet):
    ha, hb, hc = pairnet.host("a"), pairnet.host("b"), pairnet.host("c")
    a, b = lan_node(pairnet, ha, "a.dev"), lan_node(pairnet, hb, "b.dev")
    key_a, key_b = key_of(a), key_of(b)

    # Nearby: each sees the other (name, address, fingerprint), not paired yet.
    t0 = time.monotonic()
    seen_b = wait_nearby(a, rf"b\.dev\s+{re.escape(hb.addr4)}:8080\s+key {key_b[:16]}\s+not paired")
    wait_nearby(b, rf"a\.dev\s+{re.escape(ha.addr4)}:8080\s+key {key_a[:16]}\s+not paired")
    print(f"nearby both ways after {time.monotonic() - t0:.1f} s: {seen_b.strip()}")
    assert mdns_sockets(a.proc.pid) > 0   # the control for test_a_node_on_loopback_only_announces_nothing

    # Wrong codes fail on both sides; after three the code is dead, even when typed right.
    code = show_code(a)
    assert re.fullmatch(r"[1-9]\d?-[a-z]+-[a-z]+", code), code
    wait_nearby(b, rf"a\.dev .*shows code {code.split('-')[0]}\b")
    for i in (1, 2, 3):
        lines = join(b, f"pair {wrong(code)}")
        assert any("pairing failed: wrong pairing code" in ln for ln in lines), lines
        a.expect(rf"pairing with {re.escape(hb.addr4)} failed: wrong pairing code \(try {i} of 3\)")
    lines = join(b, f"pair {code} {ha.addr4}:8080")
    assert any("pairing failed" in ln and "stopped working after 3 wrong tries" in ln for ln in lines), lines
    a.expect(r"pairing request from .* refused: .*stopped working")
    assert not a.peers_file.exists() and not b.peers_file.exists()
    code, lines = b.run(f"{LIST} a.dev", until=r"error|not in|refused|offline|template\.os:", timeout=30)
    assert not any(ln.startswith("file_transfer:template.os: ") for ln in lines), lines

    # The right code: both sides pin each other, found by the code's number on the LAN.
    code = show_code(a)
    t0 = time.monotonic()
    lines = join(b, f"pair {code}")
    assert any(re.search(rf"paired with a\.dev \(key {key_a[:16]}\) at {re.escape(ha.addr4)}:8080", ln)
               for ln in lines), lines
    a.expect(rf"paired with b\.dev \(key {key_b[:16]}\) at {re.escape(hb.addr4)}:8080; pinned in ")
    print(f"paired in {time.monotonic() - t0:.2f} s")
    assert json.loads(a.peers_file.read_text()) == [
        {"name": "b.dev", "public_key": key_b, "host": hb.addr4, "port": 8080}]
    assert json.loads(b.peers_file.read_text()) == [
        {"name": "a.dev", "public_key": key_a, "host": ha.addr4, "port": 8080}]
    wait_nearby(a, r"b\.dev .* paired")

    # Files both ways: a listing and a 64 MiB download.
    for src, dst in ((a, b), (b, a)):
        (src.files / "hello.txt").parent.mkdir(parents=True, exist_ok=True)
        (src.files / "hello.txt").write_text(f"from {src.name}\n")
        digest = write_random(src.files / "big.bin", 64 << 20)
        rc, lines = dst.run(f"{LIST} {src.name}")
        assert rc == 0 and f"file_transfer:template.os: hello.txt\t\t{len(src.name) + 6}" in lines, lines
        t0 = time.monotonic()
        rc, lines = dst.run(f"{DOWNLOAD} big.bin {src.name}", until=r"big\.bin downloaded|error:", timeout=60)
        print(f"64 MiB {src.name} -> {dst.name} in {time.monotonic() - t0:.1f} s")
        assert rc == 0 and sha256(dst.files / "big.bin") == digest, lines
        (dst.files / "big.bin").unlink()

    # A third machine: a node that calls itself b.dev (its own key) announces itself, cannot use the
    # spent code, and does not get a.dev's files; the real b.dev still does.
    (pairnet.tmp / "forger").mkdir()
    forger = NetnsNode(hc, "b.dev", pairnet.tmp / "forger" / "b.dev", ["--bind", hc.addr4])
    pairnet.nodes.append(forger)
    forger.start()
    key_f = key_of(forger)
    assert key_f != key_b
    hit = wait_nearby(a, rf"b\.dev\s+{re.escape(hc.addr4)}:8080\s+key {key_f[:16]}\s+NOT the key pinned")
    print("forged record shown as:", hit.strip())
    lines = join(forger, f"pair {code} {ha.addr4}:8080")
    assert any("pairing failed" in ln and "already used" in ln for ln in lines), lines
    forger.set_peers([{"name": "a.dev", "public_key": key_a, "host": ha.addr4, "port": 8080}])
    _, lines = forger.run(f"{LIST} a.dev", until=r"error|refused|offline|template\.os:", timeout=30)
    assert not any(ln.startswith("file_transfer:template.os: hello.txt") for ln in lines), lines
    a.expect(r"refused connection from .* claiming to be 'b\.dev': key does not match")
    rc, lines = b.run(f"{LIST} a.dev")
    assert rc == 0 and "file_transfer:template.os: hello.txt\t\t11" in lines, lines
    assert json.loads(a.peers_file.read_text())[0]["public_key"] == key_b

    # The pairing outlives a restart: a, started again without --bind, reads HOME/peers.json and so
    # listens beyond loopback (as with a --peers file); b reaches it at once.
    a.stop()
    at = a.extra_args.index("--bind")
    del a.extra_args[at:at + 2]
    assert "--bind" not in a.extra_args and "--peers" not in a.extra_args
    a.start()
    rc, lines = b.run(f"{LIST} a.dev")
    assert rc == 0 and "file_transfer:template.os: hello.txt\t\t11" in lines, lines


def test_a_node_behind_nat_pairs_through_its_router(pairnet):
    """b.dev on LAN 2 is reached only through r.dev (on both LANs); a.dev on LAN 1 knows r.dev
    (and nothing of b). b shows a code; a types it naming b and the router; then a gets b's files."""
    ha, hb, hr = pairnet.host("a", lans=(1,)), pairnet.host("b", lans=(2,)), pairnet.host("r", lans=(1, 2))
    r = pairnet.node(hr, "r.dev", ["--is-router"])
    b = pairnet.node(hb, "b.dev", ["--router", "r.dev", "--bind", hb.addr4])
    a = pairnet.node(ha, "a.dev", ["--bind", ha.addr4])
    b_entry = b.entry(None, routers=("r.dev",))
    r.set_peers([b_entry])                       # the router and its indirect node know each other
    b.set_peers([r.entry(hr.addrs4[2])])
    a.set_peers([r.entry(hr.addrs4[1])])         # a knows the router only
    t0 = time.monotonic()
    for n in (r, b, a):
        n.start()
    print(f"started in {time.monotonic() - t0:.1f} s")
    deadline = time.monotonic() + 30             # b keeps a connection to its router
    while "r.dev:" not in "\n".join(b.run("peers", wait=0.1)[1]):
        assert time.monotonic() < deadline, b.lines[-20:]
        time.sleep(0.3)
    rc, lines = a.run(f"{LIST} b.dev", until=r"error|template\.os:", timeout=30)
    assert not any("hello.txt" in ln for ln in lines), lines   # a cannot reach b before pairing

    print(f"b connected to its router after {time.monotonic() - t0:.1f} s")
    t0 = time.monotonic()
    _, lines = b.run("pair", until=r"on the other node type: ")
    how = next(ln for ln in lines if "on the other node type: " in ln)
    command = re.search(r"type: (pair \S+ b\.dev via r\.dev)", how).group(1)
    lines = join(a, command)
    assert any(re.search(r"paired with b\.dev \(key [0-9a-f]{16}\) at via r\.dev; pinned in ", ln) for ln in lines), \
        lines
    print(f"paired through the router in {time.monotonic() - t0:.1f} s")
    b.expect(rf"paired with a\.dev \(key [0-9a-f]{{16}}\) at {re.escape(ha.addr4)}:8080; pinned in ")
    pinned = {e["name"]: e for e in json.loads(a.peers_file.read_text())}
    assert pinned["b.dev"] == b_entry, pinned

    (b.files / "hello.txt").parent.mkdir(parents=True, exist_ok=True)
    (b.files / "hello.txt").write_text("behind nat\n")
    digest = write_random(b.files / "four.bin", 4 << 20)
    rc, lines = a.run(f"{LIST} b.dev")
    assert rc == 0 and "file_transfer:template.os: hello.txt\t\t11" in lines, lines
    rc, lines = a.run(f"{DOWNLOAD} four.bin b.dev", until=r"four\.bin downloaded|error:", timeout=60)
    assert rc == 0 and sha256(a.files / "four.bin") == digest, lines
