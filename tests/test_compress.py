"""zstd-compressed blobs between our nodes (host/net/compress.py): the decision, the bounded
decompression, the negotiation, a hostile peer's bombs, and the bytes on a real link."""
import json
import logging
import os

import msgpack
import netns as netns_mod
import pytest
import zstandard
from conftest import _require_built, sha256, write_random
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


@pytest.mark.parametrize("attack, expect", [
    ("over the limit", "announces"),
    ("lying size", "states"),
    ("no stated size", "does not state"),
    ("not negotiated", "did not negotiate"),
])
def test_a_peer_sending_a_bomb_is_dropped_and_the_node_serves_on(nodes, raw_peer, caplog, attack, expect):
    a, b = nodes("a.os"), nodes("b.os")
    raw = raw_peer("evil.os", b, None if attack == "not negotiated" else {"compress": ["zstd"]})

    def send(km, frame, size):
        wire = km.to_wire()
        mime = wire.pop("blob")[0]
        wire["z"] = size
        wire["blob"] = [mime, frame]
        p = msgpack.packb(wire)
        raw.send_plain(len(p).to_bytes(4, "big") + p)

    z = zstandard.ZstdCompressor()
    good = request("evil.os", "b.os", blob=Blob(None, TEXT))
    if attack != "not negotiated":   # control: a well-formed compressed blob arrives as it was
        send(good, z.compress(TEXT), len(TEXT))
        assert b.recv() == good
    huge = 64 << 20
    frame, size = {
        "over the limit": (z.compress(bytes(huge)), huge),
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
