"""Nodes on several machines, over a real link: network namespaces joined by veth pairs and a
bridge, a node in each with only a peers file (see tests/netns.py). Needs root; skipped otherwise."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import no_workers, sha256, write_random
from netns import HTTP_PORT, Netns, netns  # noqa: F401  (the fixture)

LIST = "list_files:file_transfer:template.os"
DOWNLOAD = "download:file_transfer:template.os"






def settled_counts(node, within: float = 10.0) -> tuple[int, int]:
    """The node's (threads, sockets) once two readings half a second apart agree (a control-socket
    client just served may take a moment to be let go under load)."""
    deadline = time.monotonic() + within
    last = node.counts()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = node.counts()
        if now == last:
            return now
        last = now
    return last


def pair(net: Netns, v6: bool = False, b_bind: bool = False, env: dict | None = None):
    """Requestor a.dev and provider b.dev in two namespaces, each listing the other (by IPv4 or
    IPv6 address), their entries made by `python -m host id`. By default a node with a peers file
    listens on every address; `b_bind`: b names its two addresses with --bind; `env`: both nodes'
    extra environment."""
    ha, hb = net.host("a"), net.host("b")
    a = net.node(ha, "a.dev", env=env)
    b = net.node(hb, "b.dev", ["--bind", f"{hb.addr4},[{hb.addr6}]"] if b_bind else [], env=env)
    addr = (lambda h: f"[{h.addr6}]:8080") if v6 else (lambda h: h.addr4)
    a.set_peers([b.entry(addr(hb))])
    b.set_peers([a.entry(addr(ha))])
    return a.start(), b.start()


def test_list_files_and_a_256_mib_download_across_the_link(netns):
    a, b = pair(netns)
    (b.files / "my_file.txt").parent.mkdir(parents=True, exist_ok=True)
    (b.files / "my_file.txt").write_text("hello world\n")
    code, lines = a.run(f"{LIST} b.dev")
    assert code == 0, lines
    assert "file_transfer:template.os: my_file.txt\t\t12" in lines, lines
    digest = write_random(b.files / "big.bin", 256 << 20)
    code, lines = a.run(f"{DOWNLOAD} big.bin b.dev", until=r"big\.bin downloaded|error:", timeout=120)
    assert code == 0, lines
    assert sha256(a.files / "big.bin") == digest
    # The node's `id` command prints the entry `python -m host id` made (the same key), with the
    # address it advertises (no --advertise: the hostname).
    _, lines = b.run("id", wait=0.1)
    shown = json.loads(lines[0])
    assert shown["public_key"] == b.entry("x")["public_key"] and shown["name"] == "b.dev"
    # The connection really is over the link, to the provider's port on its veth address.
    ss = subprocess.run(["ip", "netns", "exec", b.host.ns, "ss", "-tnH", "state", "established"],
                        capture_output=True, text=True, check=True).stdout
    v4 = lambda addr: rf"\[?(::ffff:)?{re.escape(addr)}\]?"  # noqa: E731  (a dual-stack socket shows ::ffff:)
    assert re.search(rf"{v4(b.host.addr4)}:8080\s+{v4(a.host.addr4)}:\d+", ss), ss
    no_workers(a, b)


@pytest.mark.parametrize("net_timeout", [None, 4], ids=["rides-out-or-resumes", "drops-then-resumes"])
def test_link_cut_for_10_s_mid_download(netns, net_timeout):
    """With the default timeout (20 s) the connection may outlive the 10 s cut (TCP's back-off
    decides); with KINODE_NET_TIMEOUT=4 both nodes drop it during the cut, always: the download
    fails with a clear error and a second one resumes it."""
    a, b = pair(netns, env={"KINODE_NET_TIMEOUT": str(net_timeout)} if net_timeout else None)
    digest = write_random(b.files / "cut.bin", 200 << 20)
    b.host.rate_limit(400)  # about 48 MiB/s: the download lasts a few seconds, the cut lands inside it
    result: dict = {}

    def download(key: str) -> None:
        result[key] = a.run(f"{DOWNLOAD} cut.bin b.dev", until=r"cut\.bin downloaded|error:", timeout=120)
    first = threading.Thread(target=download, args=("first",))
    first.start()
    a.expect(r"cut\.bin progress: ([1-9]|[1-6]\d)%", timeout=30)
    b.host.cut()
    t_cut = time.monotonic()
    try:
        time.sleep(5)
        progress = [ln for ln in a.lines if "cut.bin progress" in ln]
        time.sleep(5)
        # nothing passes while the link is down, and nothing stands under the real name
        assert [ln for ln in a.lines if "cut.bin progress" in ln][-1:] == progress[-1:]
        assert not (a.files / "cut.bin").exists()
    finally:
        b.host.restore()
    print(f"link down for {time.monotonic() - t_cut:.1f} s")
    first.join(150)
    code, lines = result["first"]
    if net_timeout:
        assert code != 0, lines
        assert any(re.search(r"dropping connection to b\.dev .*nothing heard for \d s", ln) for ln in a.lines), \
            a.lines[-20:]
    if code != 0:  # failed: the message says why, and a second download resumes it
        assert any(re.search(r"cut\.bin.*(offline|stopped answering|no progress)", ln) for ln in lines), lines
        assert not (a.files / "cut.bin").exists()
        code, lines = a.run(f"{DOWNLOAD} cut.bin b.dev", until=r"cut\.bin downloaded|error:", timeout=120)
        assert code == 0, lines
        resumed = [ln for ln in lines if "resuming at" in ln]
        assert resumed or not net_timeout, lines
        print("the first download failed; the second resumed it:", resumed)
    else:
        print("the download finished by itself after the link came back")
    assert sha256(a.files / "cut.bin") == digest
    assert not list((a.files / ".partial").rglob("*.part"))
    no_workers(a, b)


def test_provider_moves_to_another_address_and_a_bad_peers_file_keeps_the_last_good(netns):
    a, b = pair(netns)
    (b.files / "here.txt").parent.mkdir(parents=True, exist_ok=True)
    (b.files / "here.txt").write_text("still here\n")
    good = json.loads(a.peers_file.read_text())
    code, lines = a.run(f"{LIST} b.dev")
    assert code == 0 and "file_transfer:template.os: here.txt\t\t11" in lines, lines
    # A broken edit: a clear error naming the entry; the last good entries stay in use.
    a.set_peers(good + [{"name": "c.dev", "public_key": "12ab", "host": "10.231.0.9", "port": 8080}])
    code, lines = a.run("peers-file", wait=0.1)
    assert any("entry 2 (c.dev): public_key must be 64 hex digits" in ln for ln in lines), lines
    assert any("using the last good one, 1 entries" in ln for ln in lines), lines
    code, lines = a.run(f"{LIST} b.dev")
    assert code == 0 and "file_transfer:template.os: here.txt\t\t11" in lines, lines
    # b loses its addresses and comes back on another one (IPv6 this time); a's peers file gets
    # b's new entry while a runs, and a reaches b there without a restart.
    old = b.host.addr4
    b.host.move(12)
    code, lines = a.run(f"{LIST} b.dev", timeout=30)  # the old entry: b is not there any more
    assert code == 1, lines
    a.set_peers([b.entry(f"[{b.host.addr6}]:8080")])
    t0 = time.monotonic()
    code, lines = a.run(f"{LIST} b.dev", timeout=30)
    if code:
        print("\n".join(a.lines[-15:]), "\n----\n", "\n".join(b.lines[-15:]))
    assert code == 0 and "file_transfer:template.os: here.txt\t\t11" in lines, lines
    print(f"b moved from {old} to {b.host.addr6}; a reached it there in {time.monotonic() - t0:.1f} s")
    code, lines = a.run("peers-file", wait=0.1)
    assert any(f"b.dev [{b.host.addr6}]:8080" in ln for ln in lines), lines
    assert a.alive() and b.alive()


def test_node_missing_from_the_peers_file_is_refused_and_errors_say_why(netns):
    a, b = pair(netns, b_bind=True)
    listening = subprocess.run(["ip", "netns", "exec", b.host.ns, "ss", "-tlnH"], capture_output=True, text=True,
                               check=True).stdout
    # the networking port on exactly the two bound addresses; the web page on loopback only
    assert sorted(ln.split()[3] for ln in listening.splitlines()) == sorted(
        [f"{b.host.addr4}:8080", f"[{b.host.addr6}]:8080", f"127.0.0.1:{HTTP_PORT}"]), listening
    c = netns.node(netns.host("c"), "c.dev")
    c.set_peers([b.entry(b.host.addr4),
                 {**a.entry(a.host.addr4), "name": "far.dev", "host": "10.231.0.99"}])  # nobody there
    c.start()
    (b.files / "x.txt").parent.mkdir(parents=True, exist_ok=True)
    (b.files / "x.txt").write_text("x")
    # c is not in b's peers file: b refuses it and logs why; c is told the reason
    code, lines = c.run(f"{LIST} b.dev", timeout=30)
    assert code == 1, lines
    assert any("b.dev refused the connection: c.dev is not in b.dev's node directory nor its peers file" in ln
               for ln in lines), lines
    assert any(re.search(rf"WARNING host.net.network: refused connection from {re.escape(c.host.addr4)}:\d+ claiming to be "
                         r"'c.dev': c\.dev is not in b\.dev's node directory nor its peers file", ln)
               for ln in b.lines), b.lines[-10:]
    # positive control: a, which b lists, gets through at the same time
    code, lines = a.run(f"{LIST} b.dev")
    assert code == 0 and "file_transfer:template.os: x.txt\t\t1" in lines, lines
    # a name in no directory or peers file
    code, lines = c.run(f"{LIST} nobody.dev", timeout=30)
    assert any("cannot reach nobody.dev: nobody.dev is not in the node directory" in ln
               and str(c.peers_file) in ln for ln in lines), lines
    # an address where nobody answers: the address tried
    code, lines = c.run(f"{LIST} far.dev", timeout=30)
    assert any("cannot reach far.dev: cannot connect to 10.231.0.99:8080 (peers file entry)" in ln
               for ln in lines), lines
    # a key that does not match: both fingerprints
    c.set_peers([{**b.entry(b.host.addr4), "public_key": a.entry("x")["public_key"]}])
    code, lines = c.run(f"{LIST} b.dev", timeout=30)
    key_a, key_b = a.entry("x")["public_key"][:16], b.entry("x")["public_key"][:16]
    assert any(f"key {key_b} answered, {key_a} expected" in ln for ln in lines), lines


def test_half_open_connection_is_detected_and_nothing_leaks(netns):
    a, b = pair(netns)
    write_random(b.files / "half.bin", 64 << 20)
    write_random(b.files / "warm.bin", 16 << 20)  # a first download starts the node's thread pools
    code, lines = a.run(f"{DOWNLOAD} warm.bin b.dev", until=r"warm\.bin downloaded|error:")
    assert code == 0, lines
    no_workers(a, b)
    threads0, sockets0 = settled_counts(a)
    names0 = a.thread_names()
    b.host.rate_limit(80)  # about 10 MiB/s: the download is under way when b vanishes
    a.type(f"{DOWNLOAD} half.bin b.dev")
    a.expect(r"half\.bin progress: ([1-9]|[1-5]\d)%", timeout=30)
    b.host.unplug_for_good()  # link and namespace deleted, b's process gone: a hears nothing, no FIN
    t0 = time.monotonic()
    line = a.expect(r"half\.bin.*(went offline|stopped answering|error)", timeout=40)
    took = time.monotonic() - t0
    print(f"a noticed in {took:.1f} s: {line}")
    assert "b.dev went offline during the transfer" in line, line
    assert took < 25  # the keepalive window (DEAD_AFTER 20 s) and a tick
    assert any(re.search(r"dropping connection to b\.dev .*nothing heard for 2\d s", ln) for ln in a.lines), \
        a.lines[-20:]
    no_workers(a)
    assert not (a.files / "half.bin").exists()
    # the connection's socket is gone; the threads are those of before, except that thread pools
    # which grow on demand (the VFS's write-behind pool, asyncio's executor) may have grown within
    # their bounds (a message a sends b after the loss, e.g. the worker's last word, dials again: up to 5 s)
    pools = {"vfs-write": 2, "vfs-flush": 1, "asyncio": min(32, (os.cpu_count() or 1) + 4)}

    def split(names: list[str]) -> tuple[list[str], dict[str, int]]:
        fixed = [t for t in names if t.rsplit("_", 1)[0] not in pools]
        return fixed, {p: sum(t.rsplit("_", 1)[0] == p for t in names) for p in pools}

    fixed0, _ = split(names0)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        fixed, pooled = split(a.thread_names())
        if fixed == fixed0 and a.counts()[1] == sockets0 - 1:
            break
        time.sleep(0.25)
    fixed, pooled = split(a.thread_names())
    assert (fixed, a.counts()[1]) == (fixed0, sockets0 - 1), (fixed, fixed0, a.counts(), threads0, sockets0)
    assert all(pooled[p] <= pools[p] for p in pools), pooled


def test_bind_and_advertise_errors_and_parsing(node_factory):
    from host.net.directory import parse_host_port
    from host.net.network import listen_addresses
    assert parse_host_port("[fd00:231::2]:9000", 8080) == ("fd00:231::2", 9000)
    assert parse_host_port("fd00:231::2", 8080) == ("fd00:231::2", 8080)
    assert parse_host_port("[fd00:231::2]", 8080) == ("fd00:231::2", 8080)
    assert parse_host_port("node.example:81", 8080) == ("node.example", 81)
    assert parse_host_port("10.0.0.1", None) == ("10.0.0.1", None)
    for bad in ("h:0", "h:x", "[::1", "[::1]x", ":80"):
        with pytest.raises(ValueError):
            parse_host_port(bad, 8080)
    assert listen_addresses(None, None) == ["127.0.0.1"]
    assert listen_addresses(None, Path("peers.json")) in (["::"], ["0.0.0.0"])
    assert listen_addresses(["10.0.0.1,[::1]", " fd00::1 "], None) == ["10.0.0.1", "::1", "fd00::1"]
    # an address this machine does not have, and a bad --advertise: the node says so and exits
    for args, says in ((["--bind", "192.0.2.1"], r"cannot listen on port \d+: .*\(192\.0\.2\.1:\d+\)"),
                       (["--advertise", "h:70000"], r"--advertise 'h:70000': port must be")):
        node = node_factory("x.dev", start=False, extra_args=args)
        with pytest.raises(RuntimeError) as err:
            node.start()
        assert re.search(says, str(err.value)), str(err.value)
    try:  # loopback IPv6 may be disabled in a container
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            both = "127.0.0.1,::1"
    except OSError:
        both = "127.0.0.1"
    node = node_factory("y.dev", start=False, extra_args=["--bind", both])
    node.start()
    assert node.alive()


MARKER = "PLAINTEXT-MARKER-ROUTED-3c9a"


def routed(net: Netns, record: Path):
    """a.dev on LAN 1 and b.dev on LAN 2 (no route between them); routers r1.dev and r2.dev on
    both LANs; b is indirect, reached through r1 then r2. r2 records every byte it relays."""
    ha, hb = net.host("a", lans=(1,)), net.host("b", lans=(2,))
    hr1, hr2 = net.host("r1", lans=(1, 2)), net.host("r2", lans=(1, 2))
    a = net.node(ha, "a.dev")
    b = net.node(hb, "b.dev", ["--router", "r1.dev", "--router", "r2.dev"])
    r1 = net.node(hr1, "r1.dev", ["--is-router"])
    r2 = net.node(hr2, "r2.dev", ["--is-router"], env={"KINODE_RELAY_RECORD": str(record)})
    b_entry = b.entry(None, routers=("r1.dev", "r2.dev"))
    assert set(b_entry) == {"name", "public_key", "routers"}, b_entry  # no address: reached through routers
    a.set_peers([b_entry, r1.entry(hr1.addrs4[1]), r2.entry(hr2.addrs4[1])])
    b.set_peers([a.entry(ha.addr4), r1.entry(hr1.addrs4[2]), r2.entry(hr2.addrs4[2])])
    for r in (r1, r2):
        r.set_peers([b_entry])
    starters = [threading.Thread(target=n.start) for n in (r1, r2, b, a)]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    assert all(n.alive() for n in (a, b, r1, r2))
    deadline = time.monotonic() + 30  # b keeps a connection to each router
    while not all(f"{r}:" in "\n".join(b.run("peers", wait=0.1)[1]) for r in ("r1.dev", "r2.dev")):
        assert time.monotonic() < deadline, b.lines[-20:]
        time.sleep(0.3)
    return a, b, r1, r2


def test_indirect_node_through_routers_and_the_next_router_when_one_is_killed(netns, tmp_path):
    record = tmp_path / "r2-relayed.bin"
    a, b, r1, r2 = routed(netns, record)
    # a has no route to b; it has one to the routers (the positive control)
    assert netns_route(a, b.host.addr4) is None
    assert netns_route(a, r1.host.addrs4[1]) is not None
    (b.files / "my_file.txt").parent.mkdir(parents=True, exist_ok=True)
    (b.files / "my_file.txt").write_text("hello world\n")
    code, lines = a.run(f"{LIST} b.dev")
    assert code == 0 and "file_transfer:template.os: my_file.txt\t\t12" in lines, lines
    _, lines = a.run("peer b.dev", wait=0.1)
    assert any('routing: Routers(["r1.dev", "r2.dev"])' in ln for ln in lines), lines
    digest = write_random(b.files / "big.bin", 256 << 20)
    code, lines = a.run(f"{DOWNLOAD} big.bin b.dev", until=r"big\.bin downloaded|error:", timeout=180)
    assert code == 0, lines
    assert sha256(a.files / "big.bin") == digest
    (a.files / "big.bin").unlink()
    assert not record.exists() or record.stat().st_size < 1 << 20  # so far through r1, not r2
    # r1 killed mid-transfer: the download goes on through r2 (resumed by a second download)
    # the marker between random blocks: the file does not compress, so its bytes really cross r2
    block = 4096
    marked = b"".join(MARKER.encode() + os.urandom(block) for _ in range((32 << 20) // (len(MARKER) + block)))
    (b.files / "marked.bin").write_bytes(marked)
    b.host.rate_limit(80)  # about 10 MiB/s: r1 dies while the download is under way
    result: dict = {}
    first = threading.Thread(target=lambda: result.update(first=a.run(
        f"{DOWNLOAD} marked.bin b.dev", until=r"marked\.bin downloaded|error:", timeout=120)))
    first.start()
    a.expect(r"marked\.bin progress: ([1-9]|[1-5]\d)%", timeout=60)
    r1.proc.kill()
    first.join(130)
    code, lines = result["first"]
    if code != 0:
        assert any(re.search(r"marked\.bin.*(went offline|stopped answering)", ln) for ln in lines), lines
        code, lines = a.run(f"{DOWNLOAD} marked.bin b.dev", until=r"marked\.bin downloaded|error:", timeout=120)
        assert code == 0, lines
        print("the first download failed when r1 died; the second resumed it through r2:",
              [ln for ln in lines if "resum" in ln])
    assert (a.files / "marked.bin").read_bytes() == marked
    _, lines = b.run("net_diagnostics", wait=0.1)
    assert any("our routers: r1.dev (not connected), r2.dev (connected)" in ln for ln in lines), lines
    _, lines = r2.run("net_diagnostics", wait=0.1)
    assert any("we route for 1 nodes (limit 100): b.dev" in ln for ln in lines), lines
    # what r2 relayed: the relay request in plain text (the recorder sees plain text when there is
    # some), then at least the resumed part of the file, never the marker
    relayed = record.read_bytes()
    assert b"b.dev" in relayed and len(relayed) > 4 << 20, len(relayed)
    assert MARKER.encode() not in relayed
    # a small marked file, all of it through r2
    (b.files / "marked.txt").write_bytes(marked[:1 << 20])
    before = len(relayed)
    code, lines = a.run(f"{DOWNLOAD} marked.txt b.dev", until=r"marked\.txt downloaded|error:", timeout=60)
    assert code == 0, lines
    assert (a.files / "marked.txt").read_bytes() == marked[:1 << 20]
    relayed = record.read_bytes()
    assert len(relayed) - before > 1 << 20 and MARKER.encode() not in relayed
    no_workers(a, b)


def netns_route(node, addr: str) -> str | None:
    """The route `node`'s namespace has to `addr`, or None."""
    r = node.host.ip("route", "get", addr, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def test_router_flags_bad_values_and_the_id_of_an_indirect_node(tmp_path):
    import sys
    repo = Path(__file__).resolve().parent.parent

    def host(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "host", *args], cwd=repo, capture_output=True, text=True,
                              env=dict(os.environ, **(env or {})), timeout=60)
    home = ["--home", str(tmp_path / "h"), "--directory", str(tmp_path / "d.sqlite")]
    for args, env, says in ((["--router", "x.dev"], None, "a node cannot be its own --router"),
                            (["--is-router", "--router-max-nodes", "0"], None, "--router-max-nodes must be at least 1"),
                            (["--is-router", "--router-max-rate", "-1"], None, "--router-max-rate must be 0"),
                            ([], {"KINODE_NET_TIMEOUT": "1"}, "KINODE_NET_TIMEOUT must be at least 2 seconds"),
                            ([], {"KINODE_NET_TIMEOUT": "soon"}, "KINODE_NET_TIMEOUT='soon' is not a number")):
        r = host("--node", "x.dev", *home, *args, env=env)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr)
    # an indirect node's entry: its routers and no address; with --advertise, both
    r = host("id", "--home", str(tmp_path / "h"), "--node", "x.dev", "--router", "r1.dev", "--router", "r2.dev")
    entry = json.loads(r.stdout)
    assert set(entry) == {"name", "public_key", "routers"} and entry["routers"] == ["r1.dev", "r2.dev"], r.stdout
    r = host("id", "--home", str(tmp_path / "h"), "--node", "x.dev", "--router", "r1.dev", "--advertise", "10.0.0.9:81")
    assert json.loads(r.stdout) == {**entry, "routers": ["r1.dev"], "host": "10.0.0.9", "port": 81}, r.stdout
    r = host("id", "--home", str(tmp_path / "h"), "--node", "x.dev", "--router", "x.dev")
    assert r.returncode == 2 and "a node cannot be its own --router" in r.stderr, r.stderr
    # a direct node's entry needs the port other nodes dial, never the web page's default
    r = host("id", "--home", str(tmp_path / "h"), "--node", "x.dev", "--advertise", "10.0.0.9")
    assert r.returncode == 2 and "give the port other nodes dial, the node's --net-port" in r.stderr, r.stderr
    r = host("id", "--home", str(tmp_path / "h"), "--node", "x.dev", "--advertise", "10.0.0.9", "--net-port", "9000")
    assert r.returncode == 0 and json.loads(r.stdout)["port"] == 9000, r.stdout + r.stderr
    r = host("id", "--home", str(tmp_path / "h"), "--node", "x.dev", "--advertise", "[fd00::9]:9001")
    assert r.returncode == 0 and (json.loads(r.stdout)["host"], json.loads(r.stdout)["port"]) == ("fd00::9", 9001)
