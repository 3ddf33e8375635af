"""zstd-compressed blobs between our nodes (host/net/compress.py): the decision, the bounded
decompression, the negotiation, a hostile peer's bombs, and the bytes on a real link."""
import ctypes
import json
import logging
import os
import socket
import subprocess
import threading
import types

import msgpack
import netns as netns_mod
import pytest
import zstandard
from conftest import _require_built, sha256, wait_for, write_random
from test_net import (  # noqa: F401  (fixtures)
    MAX_MESSAGE,
    assert_quiet,
    directory,
    dropped,
    nodes,
    raw_peer,
    request,
    still_serves,
)
from textlike import text_like, write_text_like

from host.__main__ import build_settings, node_parser
from host.messages import Blob
from host.net import compress as zmod
from host.net import noise as noisemod
from host.net import peers as peersmod
from host.net.compress import CompressError, compress_blob, decompress_blob
from host.settings import defaults_from

TEXT = text_like(1 << 20)
RANDOM = os.urandom(1 << 20)


# ---- the decision --------------------------------------------------------------------------------
def test_text_is_compressed_and_comes_back_intact():
    frame = compress_blob(TEXT)
    assert frame is not None and len(frame) * 3 < len(TEXT)
    assert decompress_blob(frame, len(TEXT), MAX_MESSAGE) == TEXT


def test_incompressible_small_and_mostly_random_blobs_go_raw():
    assert compress_blob(RANDOM) is None
    assert compress_blob(TEXT[:zmod.MIN_BLOB - 1]) is None        # small: not worth a frame
    assert compress_blob(TEXT[:zmod.MIN_BLOB]) is not None         # control: the same text at the minimum
    # A text start passes the sample, but the whole barely shrinks: raw after all.
    mixed = TEXT[:zmod.SAMPLE] + RANDOM
    assert zmod.pays(mixed) and compress_blob(mixed) is None
    # The sample decides: random bytes first, text after, goes raw without compressing the whole.
    assert not zmod.pays(RANDOM[:zmod.SAMPLE] + TEXT)


def test_encode_marks_the_compressed_blob_and_undoes_it():
    km = request("a.os", "b.os", blob=Blob("text/plain", TEXT))
    raw = noisemod.encode(km)
    assert isinstance(raw, noisemod.Split) and raw.raw_size is None
    assert raw.joined() == msgpack.packb(km.to_wire())              # off: exactly today's bytes
    z = noisemod.encode(km, compress=True)
    assert isinstance(z, noisemod.Split) and z.raw_size == len(raw) and len(z) * 3 < len(raw)
    wire = msgpack.unpackb(z.joined(), raw=False)
    assert list(wire)[-2:] == ["z", "blob"] and wire["z"] == len(TEXT)
    assert noisemod.decompressed(z).joined() == raw.joined()
    rnd = noisemod.encode(request("a.os", "b.os", blob=Blob(None, RANDOM)), compress=True)
    assert isinstance(rnd, noisemod.Split) and rnd.raw_size is None  # incompressible: raw


# ---- bounded decompression -----------------------------------------------------------------------
def _with_stated_size(frame: bytes, size: int) -> bytes:
    """The frame with its header's content-size field rewritten (a liar's frame)."""
    fhd = frame[4]
    fcs_len = {0: 1 if fhd & 0x20 else 0, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    single = bool(fhd & 0x20)
    did_len = (0, 1, 2, 4)[fhd & 3]
    at = 5 + (0 if single else 1) + did_len
    value = size - 256 if fcs_len == 2 else size
    return frame[:at] + value.to_bytes(fcs_len, "little") + frame[at + fcs_len:]


def test_decompression_is_bounded():
    limit = 1 << 20
    good = zstandard.ZstdCompressor().compress(bytes(limit))
    assert decompress_blob(good, limit, limit) == bytes(limit)      # control: exactly at the limit passes
    bomb = zstandard.ZstdCompressor().compress(bytes(limit + 1))
    cases = {
        "announced over the limit": (bomb, limit + 1, "limit"),
        "frame states more than announced": (bomb, limit, "states"),
        "frame states less than it holds": (_with_stated_size(bomb, 1000), 1000, "bad zstd frame"),
        "no stated size": (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1000)), 1000,
                           "does not state"),
        "not zstd": (b"definitely not zstd", 19, "not a zstd frame"),
        "cut short": (good[:len(good) // 2], limit, "bad zstd frame"),
    }
    for what, (frame, size, expect) in cases.items():
        with pytest.raises(CompressError, match=expect):
            decompress_blob(frame, size, limit)
        assert what


def test_a_frame_inflating_past_the_ratio_is_refused_and_our_sender_never_makes_one():
    zeros = bytes(4 << 20)
    bomb = zstandard.ZstdCompressor().compress(zeros)
    assert len(bomb) * zmod.RATIO < len(zeros)
    with pytest.raises(CompressError, match="times its length"):
        decompress_blob(bomb, len(zeros), MAX_MESSAGE)
    assert compress_blob(zeros) is None                       # our sender sends it raw
    assert noisemod.encode(request("a.os", "b.os", blob=Blob(None, zeros)), compress=True).raw_size is None
    floor = bytes(zmod.RATIO_FLOOR)                           # control: up to the floor, any ratio
    frame = compress_blob(floor)
    assert frame is not None and len(frame) * zmod.RATIO < len(floor)
    assert decompress_blob(frame, len(floor), MAX_MESSAGE) == floor
    frame = compress_blob(TEXT * 4)                            # control: text well past the floor
    assert frame is not None and decompress_blob(frame, 4 * len(TEXT), MAX_MESSAGE) == TEXT * 4


# ---- negotiation and hostile peers (nodes on loopback) -------------------------------------------
@pytest.fixture
def sent(monkeypatch):
    """Bytes of encoded messages each connection wrote (the plaintext stream's payloads)."""
    record: list[int] = []
    orig = noisemod.Conn.send_payloads

    async def send_payloads(self, payloads):
        record.extend(len(p) for p in payloads)
        await orig(self, payloads)

    monkeypatch.setattr(noisemod.Conn, "send_payloads", send_payloads)
    return record


@pytest.fixture
def not_loopback(monkeypatch):
    """These nodes talk over loopback, where compressing is skipped: treat it as a real link."""
    monkeypatch.setattr(peersmod, "_is_loopback", lambda conn: False)


@pytest.mark.parametrize("a_on, b_on", [(True, True), (True, False), (False, True)])
def test_both_must_announce_it_and_messages_arrive_intact_either_way(nodes, sent, not_loopback, a_on, b_on):
    a, b = nodes("a.os", compress=a_on), nodes("b.os", compress=b_on)
    still_serves(a, b, b"connect")
    km = request("a.os", "b.os", blob=Blob("text/csv", TEXT))
    sent.clear()
    errors = a.send(km)
    assert b.recv() == km
    assert_quiet(errors, 0)
    on = a_on and b_on
    assert a.net._peers["b.os"].conn.zstd is on and b.net._peers["a.os"].conn.zstd is on
    assert (sent[0] * 3 < len(TEXT)) is on, sent


def test_nothing_is_compressed_over_loopback_though_both_take_it(nodes, sent):
    """Bytes cost nothing on loopback: the blob goes raw (with a real link, the test above, it shrinks)."""
    a, b = nodes("a.os"), nodes("b.os")
    still_serves(a, b, b"connect")
    km = request("a.os", "b.os", blob=Blob("text/csv", TEXT))
    sent.clear()
    errors = a.send(km)
    assert b.recv() == km
    assert_quiet(errors, 0)
    assert a.net._peers["b.os"].conn.zstd and b.net._peers["a.os"].conn.zstd  # negotiated all the same
    assert sent[0] >= len(TEXT), sent


def test_a_queued_compressed_message_goes_raw_if_the_connection_does_not_take_it(nodes, sent):
    a, b = nodes("a.os"), nodes("b.os")
    still_serves(a, b, b"connect")
    km = request("a.os", "b.os", blob=Blob(None, TEXT))
    payload = noisemod.encode(km, compress=True)
    assert payload.raw_size is not None
    a.net._peers["b.os"].conn.zstd = False    # as if b came back without compression meanwhile
    sent.clear()
    a.net._loop.call_soon_threadsafe(a.net._enqueue, "b.os", payload, lambda e: None)
    assert b.recv() == km
    assert sent == [payload.raw_size]


def zwire(km, frame, size) -> bytes:
    """`km` as a peer sends it with `frame` as its compressed blob of `size` bytes, length first."""
    wire = km.to_wire()
    mime = wire.pop("blob")[0]
    wire["z"] = size
    wire["blob"] = [mime, frame]
    p = msgpack.packb(wire)
    return len(p).to_bytes(4, "big") + p


@pytest.mark.parametrize("attack, expect", [
    ("over the limit", "announces"),
    ("past the ratio", "times its length"),
    ("lying size", "states"),
    ("no stated size", "does not state"),
    ("not negotiated", "did not negotiate"),
])
def test_a_peer_sending_a_bomb_is_dropped_and_the_node_serves_on(nodes, raw_peer, caplog, attack, expect):
    a, b = nodes("a.os"), nodes("b.os")
    raw = raw_peer("evil.os", b, None if attack == "not negotiated" else {"compress": ["zstd"]})

    def send(km, frame, size):
        raw.send_plain(zwire(km, frame, size))

    z = zstandard.ZstdCompressor()
    good = request("evil.os", "b.os", blob=Blob(None, TEXT))
    if attack != "not negotiated":   # control: a well-formed compressed blob arrives as it was
        send(good, z.compress(TEXT), len(TEXT))
        assert b.recv() == good
    huge = 64 << 20
    frame, size = {
        "over the limit": (z.compress(bytes(huge)), huge),
        "past the ratio": (z.compress(bytes(10 << 20)), 10 << 20),   # a few hundred bytes
        "lying size": (z.compress(bytes(huge)), 1 << 20),
        "no stated size": (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20)), 1 << 20),
        "not negotiated": (z.compress(TEXT), len(TEXT)),
    }[attack]
    with caplog.at_level(logging.WARNING, logger="host.net"):
        send(request("evil.os", "b.os", body=b"bomb", blob=Blob(None, b"")), frame, size)
        assert dropped(raw.sock)
        still_serves(a, b, b"still here")
    assert any(expect in r.getMessage() and "evil.os" in r.getMessage() for r in caplog.records)
    assert b.lost.get(timeout=10) == "evil.os"
    assert_quiet(b.inbox, 0)


BOMB = zmod.RATIO_FLOOR   # inflates to the floor: passes the ratio cap however small its frame


def bombs(count: int) -> bytes:
    """`count` messages in a row, each a frame of a few dozen bytes inflating to BOMB bytes."""
    frame = zstandard.ZstdCompressor().compress(bytes(BOMB))
    stream = b"".join(zwire(request("evil.os", "b.os", body=b"%d" % i, blob=Blob(None, b"")), frame, BOMB)
                      for i in range(count))
    assert len(stream) <= noisemod.CHUNK   # all in one Noise frame
    return stream


def test_a_frame_of_bombs_inflates_only_the_peers_share_until_its_messages_are_taken(nodes, raw_peer, monkeypatch):
    """A hundred messages in one Noise frame, each inflating to a megabyte: the node inflates only up
    to PEER_IN_FLIGHT of them, then stops reading the peer and keeps the rest of the frame; once its
    messages are taken the rest arrives, in order. Another peer is served meanwhile."""
    inflated: list[int] = []
    real = noisemod.decompress_blob
    monkeypatch.setattr(noisemod, "decompress_blob", lambda f, size, lim: inflated.append(size) or real(f, size, lim))
    b, a = nodes("b.os", hold=True), nodes("a.os")
    raw = raw_peer("evil.os", b, {"compress": ["zstd"]})
    good = request("evil.os", "b.os", body=b"good", blob=Blob(None, TEXT))
    raw.send_plain(zwire(good, compress_blob(TEXT), len(TEXT)))
    km, receipt = b.held.get(timeout=10)
    assert km == good and inflated == [len(TEXT)]                # control: a compressed message arrives
    receipt.taken()
    inflated.clear()
    count = 100
    raw.send_plain(bombs(count))
    wait_for(lambda: b.net.intake_status().get("evil.os", (0, 0))[1] >= 1, 30,  # b stopped reading evil.os
             "evil.os held", every=0.01)
    assert 0 < len(inflated) <= peersmod.PEER_IN_FLIGHT // BOMB + 1, len(inflated)
    held = [b.held.get(timeout=10) for _ in inflated]
    a.send(request("a.os", "b.os", body=b"from a"))
    km, receipt = b.held.get(timeout=10)
    assert km.message.body == b"from a"
    receipt.taken()
    for i in range(count):    # taking them one by one lets the rest of the frame through, in order
        km, receipt = held.pop(0) if held else b.held.get(timeout=30)
        assert km.message.body == b"%d" % i and km.lazy_load_blob.bytes == bytes(BOMB)
        receipt.taken()
    assert len(inflated) == count


def test_a_frame_of_bombs_taken_at_once_is_inflated_a_turn_at_a_time(nodes, raw_peer, monkeypatch):
    """Messages taken as they come never hold the peer back, so the frame's hundred megabytes are
    inflated in turns of at most INFLATE_TURN, the loop serving other connections in between."""
    before: list[int] = []
    real = noisemod.Conn._inflate

    def spy(self, wire, size):
        before.append(self.inflated)
        return real(self, wire, size)

    monkeypatch.setattr(noisemod.Conn, "_inflate", spy)
    b = nodes("b.os")
    raw = raw_peer("evil.os", b, {"compress": ["zstd"]})
    count = 100
    raw.send_plain(bombs(count))
    for i in range(count):
        km = b.recv()
        assert km.message.body == b"%d" % i and km.lazy_load_blob.bytes == bytes(BOMB)
    assert len(before) == count
    assert max(before) <= noisemod.INFLATE_TURN < max(before) + BOMB, before


# ---- same machine or not -------------------------------------------------------------------------
def _conn(sock, relayed=False):
    return types.SimpleNamespace(sock=sock, relayed=relayed)


def _pair(family, host):
    """(accepted, connecting) TCP sockets to `host` on this machine."""
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.bind((host, 0))
        srv.listen()
        c = socket.create_connection(srv.getsockname()[:2], timeout=10)
        s, _ = srv.accept()
    return s, c


def _own_addresses() -> list[str]:
    """This machine's non-loopback addresses (`hostname -I`), if any."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [a for a in out.split() if not a.startswith("fe80")]


def test_a_connection_on_this_machine_is_judged_local_over_loopback_or_its_own_address():
    pairs = [_pair(socket.AF_INET, "127.0.0.1")]
    if socket.has_ipv6:
        try:
            pairs.append(_pair(socket.AF_INET6, "::1"))
        except OSError:
            pass
    own = _own_addresses()
    for host in own:     # two nodes on one machine talking over its LAN address
        pairs.append(_pair(socket.AF_INET6 if ":" in host else socket.AF_INET, host))
    try:
        for s, c in pairs:
            assert peersmod._is_loopback(_conn(s)) and peersmod._is_loopback(_conn(c)), s
            assert not peersmod._is_loopback(_conn(s, relayed=True))   # judged by the router's socket
    finally:
        for s, c in pairs:
            s.close()
            c.close()
    assert peersmod._same_machine("::ffff:192.0.2.2", "192.0.2.2")
    assert peersmod._same_machine("fe80::1%eth0", "fe80::1%eth1")
    assert not peersmod._same_machine("192.0.2.7", "192.0.2.2")
    assert not peersmod._same_machine("not an address", "not an address")
    if not own:
        pytest.skip("no non-loopback address here: only loopback pairs were tried")


_CLONE_NEWNET = 0x40000000


def _socket_in(ns: str, family: int) -> socket.socket:
    """A TCP socket made inside network namespace `ns` (a thread enters it, makes it, and ends)."""
    got: list = []

    def run():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                got.append(OSError(ctypes.get_errno(), f"setns {ns}"))
            else:
                got.append(socket.socket(family, socket.SOCK_STREAM))
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(got[0], OSError):
        raise got[0]
    return got[0]


def test_a_connection_from_another_machine_is_judged_remote():
    """Two namespaces joined by a veth pair: the addresses differ and neither is loopback."""
    why = netns_mod._can_make_namespaces()
    if why:
        pytest.skip(f"network namespaces cannot be made: {why}")
    na, nb = f"zloop{os.getpid()}a", f"zloop{os.getpid()}b"
    ip = netns_mod.ip
    ip("netns", "add", na)
    try:
        ip("netns", "add", nb)
        ip("link", "add", "v0", "netns", na, "type", "veth", "peer", "name", "v1", "netns", nb)
        for ns, dev, addr in ((na, "v0", "10.233.0.1"), (nb, "v1", "10.233.0.2")):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        srv, c = _socket_in(na, socket.AF_INET), _socket_in(nb, socket.AF_INET)
        with srv, c:
            srv.bind(("10.233.0.1", 0))
            srv.listen()
            c.settimeout(10)
            c.connect(srv.getsockname())
            s, _ = srv.accept()
            with s:
                assert s.getpeername()[0] == "10.233.0.2"       # the link is real: the other end's address
                assert not peersmod._is_loopback(_conn(s)) and not peersmod._is_loopback(_conn(c))
    finally:
        ip("netns", "del", na, check=False)
        ip("netns", "del", nb, check=False)


def test_the_setting_turns_it_off():
    d = defaults_from({})
    assert d.compress and build_settings(node_parser(d).parse_args(["--node", "a.dev"]), d).compress
    off = defaults_from({"KINODE_COMPRESS": "0"})
    assert not build_settings(node_parser(off).parse_args(["--node", "a.dev"]), off).compress
    assert not build_settings(node_parser(d).parse_args(["--node", "a.dev", "--no-compress"]), d).compress


# ---- bytes on a real link ------------------------------------------------------------------------
DOWNLOAD = "download:file_transfer:template.os"


@pytest.fixture
def zstd_netns(tmp_path, monkeypatch):
    """tests/netns.py's namespaces, named zstd<pid>..."""
    monkeypatch.setattr(netns_mod, "PREFIX", f"zstd{os.getpid()}")
    why = netns_mod._can_make_namespaces()
    if why:
        pytest.skip(f"network namespaces cannot be made: {why}")
    _require_built()
    net = netns_mod.Netns(tmp_path)
    try:
        yield net
    finally:
        net.cleanup()


def tx_bytes(host) -> int:
    """Bytes the host has sent on its veth (eth0), as the kernel counts them."""
    out = host.ip("-s", "-j", "link", "show", "eth0").stdout
    return json.loads(out)[0]["stats64"]["tx"]["bytes"]


def test_text_moves_in_a_third_of_the_bytes_and_random_data_in_no_more(zstd_netns):
    """a (compression on) and c (off) download the same files from b (on); b's veth counts the bytes."""
    net = zstd_netns
    ha, hb, hc = net.host("a"), net.host("b"), net.host("c")
    a, b = net.node(ha, "a.dev"), net.node(hb, "b.dev")
    c = net.node(hc, "c.dev", env={"KINODE_COMPRESS": "0"})
    a.set_peers([b.entry(hb.addr4)])
    c.set_peers([b.entry(hb.addr4)])
    b.set_peers([a.entry(ha.addr4), c.entry(hc.addr4)])
    for n in (a, b, c):
        n.start()
    text_size, rnd_size = 12 << 20, 8 << 20
    digests = {"logs.txt": write_text_like(b.files / "logs.txt", text_size),
               "random.bin": write_random(b.files / "random.bin", rnd_size)}
    moved: dict = {}
    for node in (a, c):
        for name, digest in digests.items():
            before = tx_bytes(hb)
            code, lines = node.run(f"{DOWNLOAD} {name} b.dev", until=rf"{name} downloaded|error:", timeout=120)
            assert code == 0, lines
            moved[node.name, name] = tx_bytes(hb) - before
            assert sha256(node.files / name) == digest, (node.name, name)
    text_on, text_off = moved["a.dev", "logs.txt"], moved["c.dev", "logs.txt"]
    rnd_on, rnd_off = moved["a.dev", "random.bin"], moved["c.dev", "random.bin"]
    assert text_off > text_size and rnd_off > rnd_size, moved      # the bytes really crossed this link
    assert text_on * 3 < text_off, moved
    assert rnd_on < rnd_size * 1.03 + (256 << 10) and rnd_on < rnd_off * 1.02 + (256 << 10), moved
    print(f"on the veth: text {text_on} bytes compressed vs {text_off} raw; random {rnd_on} vs {rnd_off}")
