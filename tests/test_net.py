"""The network service: real nodes on loopback ports, plus raw sockets playing hostile peers."""
import logging
import os
import queue
import random
import socket
import stat
import threading
import time

import msgpack
import pytest
from noise.connection import Keypair, NoiseConnection

from host.messages import Address, Blob, Capability, KernelMessage, ProcessId, Request, Response, new_request_id
from host.net import noise as noisemod
from host.net import relay as relaymod
from host.net.directory import Directory, NameTaken
from host.net.network import MAX_MESSAGE, Network, load_or_create_identity

PROC = ProcessId.parse("chat:chat:template.os")


class Node:
    """A Network plus the queues its callbacks fill."""

    def __init__(self, name, home, directory, port=0, **kw):
        self.name = name
        self.home = home
        self.inbox = queue.Queue()
        self.lost = queue.Queue()
        self.identity = load_or_create_identity(home)
        self.held = queue.Queue()   # (message, receipt) when `hold`: the test takes them itself
        self.hold = kw.pop("hold", False)
        self.net = Network(name, self.identity, port, directory, self._on_message, self.lost.put,
                           **kw)

    def _on_message(self, km, receipt):
        if self.hold:
            self.held.put((km, receipt))
            return
        receipt.taken()
        self.inbox.put(km)

    def start(self):
        self.net.start()
        return self

    def stop(self):
        self.net.stop()

    def send(self, km):
        """Send and return a queue that receives the error, if any."""
        errors = queue.Queue()
        self.net.send(km, errors.put)
        return errors

    def recv(self, timeout=10.0):
        return self.inbox.get(timeout=timeout)


def addr(node, proc=PROC):
    return Address(node, proc)


def request(src, dst, body=b"hello", blob=None, **kw):
    return KernelMessage(new_request_id(), addr(src), addr(dst), None, Request(body=body, **kw),
                         blob)


@pytest.fixture
def directory(tmp_path):
    return Directory(tmp_path / "directory.sqlite")


@pytest.fixture
def nodes(tmp_path, directory):
    made = []

    def make(name, start=True, home=None, **kw):
        n = Node(name, home or tmp_path / name, kw.pop("directory", directory), **kw)
        made.append(n)
        return n.start() if start else n

    yield make
    for n in made:
        n.stop()


@pytest.fixture
def pair(nodes):
    return nodes("a.os"), nodes("b.os")


def assert_quiet(q, wait=0.2):
    with pytest.raises(queue.Empty):
        q.get(timeout=wait)


# ---- identity ------------------------------------------------------------------------------------
def test_identity_persists_with_private_modes(tmp_path):
    home = tmp_path / "home"
    ident = load_or_create_identity(home)
    assert len(ident.private) == 32 and len(ident.public) == 32
    key_file = home / ".keys" / "networking.key"
    assert key_file.read_bytes() == ident.private
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / ".keys").stat().st_mode) == 0o700
    assert load_or_create_identity(home) == ident
    assert ident.private.hex() not in repr(ident)
    assert load_or_create_identity(tmp_path / "other").public != ident.public


# ---- delivery ------------------------------------------------------------------------------------
def test_round_trip_preserves_every_field(pair):
    a, b = pair
    blob = os.urandom(1 << 20)
    km = KernelMessage(
        2**64 - 1, addr("a.os"), addr("b.os", ProcessId.parse("vfs:distro:sys")),
        addr("a.os", ProcessId.parse("terminal:terminal:sys")),
        Request(inherit=True, expects_response=30, body=b"\x00\xffbody", metadata='{"offset": 7}',
                capabilities=[Capability.make(addr("a.os"), {"root": True}),
                              Capability(addr("b.os"), '"x"')]),
        Blob("application/octet-stream", blob))
    errors = a.send(km)
    got = b.recv()
    assert got == km
    assert got.lazy_load_blob.bytes == blob
    reply = KernelMessage(km.id, addr("b.os"), addr("a.os"), None,
                          Response(inherit=False, body=b"ok", metadata=None,
                                   capabilities=[Capability.make(addr("b.os"), ["read"])]),
                          Blob(None, b""))
    b.send(reply)
    assert a.recv() == reply
    assert_quiet(errors, 0)
    # One connection serves both directions.
    assert a.net.connected_peers() == ["b.os"] and b.net.connected_peers() == ["a.os"]
    ca, cb = a.net._peers["b.os"].conn, b.net._peers["a.os"].conn
    assert ca.sock.getsockname() == cb.sock.getpeername()


def test_order_is_kept(pair):
    a, b = pair
    sent = [request("a.os", "b.os", body=str(i).encode()) for i in range(2000)]
    failures = []  # (a callback raising on the network thread would go unseen: collect, then assert)
    for km in sent:
        a.net.send(km, failures.append)
    got = [b.recv() for _ in sent]
    assert [k.id for k in got] == [k.id for k in sent]
    assert failures == []


def test_loopback_to_own_node(nodes):
    a = nodes("a.os")
    km = request("a.os", "a.os")
    a.send(km)
    assert a.recv() == km


def test_simultaneous_dial_keeps_one_connection(nodes):
    for i in range(5):
        a, b = nodes(f"a{i}.os"), nodes(f"b{i}.os")
        go = threading.Barrier(2)
        failures = []

        def fire(src, dst, go=go, failures=failures):
            go.wait()
            src.net.send(request(src.name, dst.name), failures.append)

        threads = [threading.Thread(target=fire, args=(a, b)), threading.Thread(target=fire, args=(b, a))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert b.recv().source.node == a.name
        assert a.recv().source.node == b.name
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ca, cb = a.net._peers[b.name].conn, b.net._peers[a.name].conn
            if ca and cb and ca.sock.getsockname() == cb.sock.getpeername():
                break
            time.sleep(0.01)
        else:
            pytest.fail("the two nodes did not settle on one connection")
        assert ca.dialled != cb.dialled  # (if both dialled, a's wins; if b won the race, only b's)
        assert_quiet(a.lost, 0)
        assert_quiet(b.lost, 0)
        a.send(request(a.name, b.name, body=b"again"))
        assert b.recv().message.body == b"again"
        assert failures == []
        a.stop()
        b.stop()


class SlowDirectory(Directory):
    """Lookups take a while, so two nodes sending at once are both mid-dial when they meet."""

    def lookup(self, name):
        time.sleep(0.1)
        return super().lookup(name)


def test_both_dialling_keeps_the_first_names_connection(nodes, tmp_path):
    slow = SlowDirectory(tmp_path / "directory.sqlite")
    a, b = nodes("a.os", directory=slow), nodes("b.os", directory=slow)
    failures = []
    a.net.send(request("a.os", "b.os"), failures.append)
    b.net.send(request("b.os", "a.os"), failures.append)
    assert a.recv().source.node == "b.os" and b.recv().source.node == "a.os"
    assert failures == []
    ca, cb = a.net._peers["b.os"].conn, b.net._peers["a.os"].conn
    assert ca.sock.getsockname() == cb.sock.getpeername()
    assert ca.dialled and not cb.dialled
    assert_quiet(a.lost, 0.1)
    assert_quiet(b.lost, 0)


# ---- failures at the sender ----------------------------------------------------------------------
def test_unknown_node_is_offline_promptly(nodes):
    a = nodes("a.os")
    t0 = time.monotonic()
    err = a.send(request("a.os", "ghost.os")).get(timeout=10)
    assert err.startswith("offline:") and "ghost.os" in err
    # at once: well before the 5 s a dial may take (ms here; the bound is loose for a busy machine)
    assert time.monotonic() - t0 < 3


def test_stopped_or_dead_node_is_offline(nodes, directory):
    a = nodes("a.os")
    b = nodes("b.os")
    b.stop()
    err = a.send(request("a.os", "b.os")).get(timeout=10)
    assert err.startswith("offline:")
    # Registered and marked online, but nothing listens there (a crashed node).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    directory.register("dead.os", os.urandom(32), "127.0.0.1", dead_port)
    err = a.send(request("a.os", "dead.os")).get(timeout=10)
    assert err.startswith("offline:") and "cannot connect" in err


def test_too_large_refused_at_sender_connection_stays(pair):
    a, b = pair
    a.send(request("a.os", "b.os"))
    b.recv()
    conn = a.net._peers["b.os"].conn
    big = request("a.os", "b.os", blob=Blob(None, bytes(MAX_MESSAGE)))
    size = len(msgpack.packb(big.to_wire()))
    err = a.send(big).get(timeout=10)
    assert err == f"message too large: {size} bytes > 10485800"
    # A message just under the limit goes through, on the same connection.
    fits = request("a.os", "b.os", body=b"", blob=Blob(None, b""))
    room = MAX_MESSAGE - len(msgpack.packb(fits.to_wire())) - 8
    fits.lazy_load_blob = Blob(None, os.urandom(room))
    assert len(msgpack.packb(fits.to_wire())) <= MAX_MESSAGE
    errors = a.send(fits)
    assert b.recv(timeout=5) == fits
    assert_quiet(errors, 0)
    assert a.net._peers["b.os"].conn is conn
    assert_quiet(a.lost, 0)


# ---- peers coming and going ----------------------------------------------------------------------
def test_peer_lost_and_redial_after_restart(nodes, tmp_path):
    a, b = nodes("a.os"), nodes("b.os")
    a.send(request("a.os", "b.os"))
    b.recv()
    b.stop()
    assert a.lost.get(timeout=10) == "b.os"
    assert a.net.connected_peers() == []
    b2 = nodes("b.os", home=tmp_path / "b.os")  # same identity, new port
    assert b2.identity == b.identity
    km = request("a.os", "b.os", body=b"after restart")
    errors = a.send(km)
    assert b2.recv() == km
    assert_quiet(errors, 0)
    b2.send(request("b.os", "a.os", body=b"back"))
    assert a.recv().message.body == b"back"


def test_restarted_peer_replaces_stale_connection(nodes, tmp_path):
    """A peer that comes back before we noticed it left still gets through (new instance wins)."""
    a, b = nodes("a.os"), nodes("b.os")
    a.send(request("a.os", "b.os"))
    b.recv()
    old = b.net._peers["a.os"].conn
    # Simulate b not yet having seen a's old connection go: a restarts "silently" by keeping its
    # socket open in the old Network object while a new one with the same identity dials b.
    a2 = Node("a.os", tmp_path / "a.os", b.net.directory).start()
    try:
        a2.send(request("a.os", "b.os", body=b"from the new a"))
        assert b.recv().message.body == b"from the new a"
        assert old.closed
        assert b.lost.get(timeout=10) == "a.os"
    finally:
        a2.stop()


def test_peers_file_edit_just_before_a_send_is_used_by_that_send(nodes, tmp_path):
    """A user edits a peer's entry and at once runs a command: even if the periodic check ran a
    moment before the edit, that message dials the new entry, not the old connection."""
    import json

    def write_peers(path, *entries):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(list(entries)))
        os.replace(tmp, path)

    def own(name):  # a directory of one's own, with a peers file: as on separate machines
        return Directory(tmp_path / f"{name}.sqlite", tmp_path / f"{name}.peers.json")

    a = nodes("a.os", directory=own("a"))
    b_old = nodes("b.os", home=tmp_path / "b.os", directory=own("b_old"))   # b where it was
    b_new = nodes("b.os", home=tmp_path / "b.os", directory=own("b_new"))   # b where it moved
    write_peers(tmp_path / "b_old.peers.json", a.net.entry())
    write_peers(tmp_path / "b_new.peers.json", a.net.entry())
    write_peers(tmp_path / "a.peers.json", b_old.net.entry())
    # positive control: the first entry is used
    a.send(request("a.os", "b.os", body=b"to the old place"))
    assert b_old.recv().message.body == b"to the old place"
    # the periodic check runs (on the network's loop), then the entry changes, then a message
    checked = threading.Event()

    def check():
        a.net._peers_checked = float("-inf")
        a.net._check_peers()
        checked.set()
    a.net._loop.call_soon_threadsafe(check)
    assert checked.wait(5)
    write_peers(tmp_path / "a.peers.json", b_new.net.entry())
    errors = a.send(request("a.os", "b.os", body=b"to the new place"))
    assert b_new.recv().message.body == b"to the new place"
    assert_quiet(errors, 0)
    with pytest.raises(queue.Empty):
        b_old.inbox.get(timeout=0.5)


def test_registers_heartbeats_and_unregisters(nodes, directory):
    a = nodes("a.os", heartbeat_every=0.05)
    rec = directory.lookup("a.os")
    assert (rec.public_key, rec.host, rec.port, rec.online) == (
        a.identity.public, "127.0.0.1", a.net.port, True)

    def last_seen():
        with directory._connect() as db:
            return db.execute("SELECT last_seen FROM nodes WHERE name = 'a.os'").fetchone()[0]

    first = last_seen()
    deadline = time.monotonic() + 10
    while last_seen() == first and time.monotonic() < deadline:
        time.sleep(0.02)
    assert last_seen() > first
    a.stop()
    assert not directory.lookup("a.os").online


def test_name_taken_and_port_clash_at_start(nodes, tmp_path):
    a = nodes("a.os")
    impostor = Node("a.os", tmp_path / "impostor", a.net.directory)
    with pytest.raises(NameTaken):
        impostor.net.start()
    with pytest.raises(OSError):
        Node("c.os", tmp_path / "c.os", a.net.directory, port=a.net.port).net.start()
    # The impostor's failed start released its port.
    port = impostor.net.port
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# ---- authentication ------------------------------------------------------------------------------
def test_node_posing_as_another_name_is_refused(nodes, tmp_path, caplog):
    a, b = nodes("a.os"), nodes("b.os")
    # The impostor has its own directory where it registered "a.os" with its own key, and where
    # b's real record is; b checks the claim against the real directory and refuses.
    fake_dir = Directory(tmp_path / "fake.sqlite")
    fake_dir.register("b.os", b.identity.public, "127.0.0.1", b.net.port)
    impostor = nodes("a.os", home=tmp_path / "impostor", directory=fake_dir)
    assert impostor.identity.public != a.identity.public
    with caplog.at_level(logging.WARNING, logger="host.net"):
        err = impostor.send(request("a.os", "b.os", body=b"forged")).get(timeout=10)
    assert err.startswith("offline:")
    assert_quiet(b.inbox)
    assert any("claiming to be 'a.os'" in r.getMessage() and "key does not match" in r.getMessage()
               for r in caplog.records)
    # The real a.os still gets through.
    a.send(request("a.os", "b.os", body=b"real"))
    assert b.recv().message.body == b"real"


def test_dialler_checks_name_and_key(nodes, tmp_path, caplog):
    a, c = nodes("a.os"), nodes("c.os")
    # An impostor "a.os" (own key, registered only in its own directory) listens too.
    fake = nodes("a.os", home=tmp_path / "fake-a", directory=Directory(tmp_path / "fake.sqlite"))
    # d's directory sends "x.os" to c's port (c answers as c.os) and "a.os" to the impostor's
    # port, with a's real key, which the impostor cannot prove.
    odd_dir = Directory(tmp_path / "odd.sqlite")
    odd_dir.register("x.os", c.identity.public, "127.0.0.1", c.net.port)
    odd_dir.register("a.os", a.identity.public, "127.0.0.1", fake.net.port)
    d = nodes("d.os", directory=odd_dir)
    with caplog.at_level(logging.WARNING, logger="host.net"):
        err1 = d.send(request("d.os", "x.os")).get(timeout=10)
        err2 = d.send(request("d.os", "a.os")).get(timeout=10)
    assert err1.startswith("offline:") and "claims to be 'c.os'" in err1
    assert err2.startswith("offline:") and "did not prove the key" in err2
    msgs = [r.getMessage() for r in caplog.records]
    assert any("claims to be 'c.os'" in m for m in msgs)
    assert any("dialled a.os" in m and "key does not match" in m for m in msgs)
    assert_quiet(c.inbox)
    assert_quiet(fake.inbox, 0)
    assert_quiet(a.inbox, 0)


# ---- hostile sockets -----------------------------------------------------------------------------
class RawPeer:
    """A hand-driven Noise initiator, to send what a well-behaved node never would."""

    def __init__(self, name, identity, port, hello_extra=None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.noise = NoiseConnection.from_name(noisemod.NOISE_PROTOCOL)
        self.noise.set_keypair_from_private_bytes(Keypair.STATIC, identity.private)
        self.noise.set_prologue(noisemod.PROLOGUE)
        self.noise.set_as_initiator()
        self.noise.start_handshake()
        self.frame(self.noise.write_message())
        self.noise.read_message(self.read_frame())
        hello = msgpack.packb({"v": 1, "name": name, "instance": os.urandom(16), **(hello_extra or {})})
        self.frame(self.noise.write_message(hello))
        reply = msgpack.unpackb(self.noise.decrypt(self.read_frame()))
        assert reply["accept"], reply

    def frame(self, data):
        self.sock.sendall(len(data).to_bytes(2, "big") + bytes(data))

    def read_frame(self):
        size = int.from_bytes(self._exact(2), "big")
        return self._exact(size)

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def send_plain(self, data):
        for i in range(0, len(data), noisemod.CHUNK):
            self.frame(self.noise.encrypt(data[i:i + noisemod.CHUNK]))

    def send_km(self, km):
        payload = msgpack.packb(km.to_wire())
        self.send_plain(len(payload).to_bytes(4, "big") + payload)


@pytest.fixture
def raw_peer(directory, tmp_path):
    """Make a RawPeer registered in the directory under ``name``; closed after the test."""
    made = []

    def make(name, node, hello_extra=None):
        ident = load_or_create_identity(tmp_path / name)
        directory.register(name, ident.public, "127.0.0.1", 1)
        made.append(RawPeer(name, ident, node.net.port, hello_extra))
        return made[-1]

    yield make
    for r in made:
        r.sock.close()


def dropped(sock, timeout=10.0):
    """True if the other side closes ``sock`` within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def still_serves(a, b, body):
    a.send(request("a.os", "b.os", body=body))
    assert b.recv().message.body == body


def test_unauthenticated_garbage_is_dropped(nodes, caplog):
    a = nodes("a.os")
    b = nodes("b.os", handshake_timeout=0.5)
    still_serves(a, b, b"before")
    with caplog.at_level(logging.WARNING, logger="host.net"):
        cases = {
            "text": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "short noise message": b"\x00\x05hello",
            "oversized handshake frame": b"\xff\xff" + os.urandom(1000),
        }
        for what, data in cases.items():
            s = socket.create_connection(("127.0.0.1", b.net.port))
            s.sendall(data)
            assert dropped(s), what
            s.close()
            still_serves(a, b, what.encode())
        # Half a handshake: a valid first message, then silence until the timeout.
        s = socket.create_connection(("127.0.0.1", b.net.port))
        n = NoiseConnection.from_name(noisemod.NOISE_PROTOCOL)
        n.set_keypair_from_private_bytes(Keypair.STATIC, os.urandom(32))
        n.set_prologue(noisemod.PROLOGUE)
        n.set_as_initiator()
        n.start_handshake()
        m1 = n.write_message()
        s.sendall(len(m1).to_bytes(2, "big") + m1)
        still_serves(a, b, b"during half handshake")
        assert dropped(s)
        s.close()
        # Connect and close at once.
        socket.create_connection(("127.0.0.1", b.net.port)).close()
        still_serves(a, b, b"after")

        def count():
            return sum("dropping unauthenticated connection" in r.getMessage()
                       for r in caplog.records if r.name == "host.net.network")

        deadline = time.monotonic() + 10
        while count() < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    msgs = [r.getMessage() for r in caplog.records if r.name == "host.net.network"]
    assert count() == 5
    assert any("timed out" in m for m in msgs)
    assert_quiet(b.lost, 0)


@pytest.mark.parametrize("attack, expect", [
    ("oversized declared length", "declared message length"),
    ("undecodable msgpack", "undecodable MessagePack"),
    ("not a kernel message", "bad kernel message"),
    ("not a map", "not a map"),
    ("bad ciphertext", "decryption failed"),
])
def test_authenticated_peer_breaking_protocol_is_dropped(nodes, raw_peer, caplog, attack, expect):
    a, b = nodes("a.os"), nodes("b.os")
    raw = raw_peer("evil.os", b)
    good = request("evil.os", "b.os", body=b"fine")
    raw.send_km(good)
    assert b.recv() == good
    with caplog.at_level(logging.WARNING, logger="host.net"):
        if attack == "oversized declared length":
            raw.send_plain((MAX_MESSAGE + 1).to_bytes(4, "big") + b"\x80")
        elif attack == "undecodable msgpack":
            raw.send_plain(b"\x00\x00\x00\x01\xc1")
        elif attack == "not a kernel message":
            p = msgpack.packb({"id": 1, "source": "nope"})
            raw.send_plain(len(p).to_bytes(4, "big") + p)
        elif attack == "not a map":
            p = msgpack.packb([1, 2, 3])
            raw.send_plain(len(p).to_bytes(4, "big") + p)
        elif attack == "bad ciphertext":
            raw.frame(os.urandom(100))
        assert dropped(raw.sock)
        still_serves(a, b, b"still here")
    assert any(expect in r.getMessage() and "evil.os" in r.getMessage() for r in caplog.records)
    assert b.lost.get(timeout=10) == "evil.os"
    assert_quiet(b.inbox, 0)


def test_spoofed_source_is_dropped_connection_kept(nodes, raw_peer, caplog):
    b = nodes("b.os")
    raw = raw_peer("evil.os", b)
    with caplog.at_level(logging.WARNING, logger="host.net"):
        raw.send_km(request("a.os", "b.os", body=b"spoofed"))
        raw.send_km(request("evil.os", "c.os", body=b"misrouted"))
        honest = request("evil.os", "b.os", body=b"honest")
        raw.send_km(honest)
        assert b.recv() == honest
    assert_quiet(b.inbox, 0)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("claiming source node 'a.os'" in m for m in msgs)
    assert any("for another node 'c.os'" in m for m in msgs)


def test_messages_split_across_many_noise_frames(nodes, raw_peer):
    """The receiver reassembles messages however the sender splits the plaintext stream."""
    b = nodes("b.os")
    raw = raw_peer("peer.os", b)
    kms = [request("peer.os", "b.os", body=bytes([i]) * (i * 1000)) for i in range(1, 6)]
    stream = b"".join(len(p).to_bytes(4, "big") + p
                      for p in (msgpack.packb(k.to_wire()) for k in kms))
    for i in range(0, len(stream), 7):  # tiny frames that cut headers and bodies anywhere
        raw.frame(raw.noise.encrypt(stream[i:i + 7]))
    assert [b.recv() for _ in kms] == kms


def test_big_blobs_received_in_place_whatever_the_framing(nodes, raw_peer, monkeypatch):
    """A message of a megabyte or more is received by its head first, its blob then filled in place
    (host/net/noise.py: split_head); messages whose blob is not last, or whose head is long, take
    the plain path. Every one arrives whole and equal, however the stream is cut into frames."""
    b = nodes("b.os")
    raw = raw_peer("peer.os", b)
    rnd = random.Random(7)
    found, plain_split_head = [], noisemod.split_head
    monkeypatch.setattr(noisemod, "split_head", lambda head, size: found.append(plain_split_head(head, size)) or found[-1])
    big = os.urandom(3 << 20)
    tricky = b"\xc6" + (len(big)).to_bytes(4, "big") + b"\xc6\x00\x00"  # looks like a blob header
    kms = [
        request("peer.os", "b.os", body=tricky, blob=Blob("application/octet-stream", big)),  # in place
        request("peer.os", "b.os", body=b"x" * (1 << 20)),                          # big body, no blob
        request("peer.os", "b.os", body=b"h", metadata="m" * (40 << 10), blob=Blob(None, big[:1 << 20])),  # long head
        request("peer.os", "b.os", body=b"small", blob=Blob(None, b"\xc6" * 100)),
        request("peer.os", "b.os", body=b"", blob=Blob(None, big[5:(1 << 20) + 5])),
    ]
    stream = bytearray()
    for km in kms:
        packed = noisemod.encode(km)
        packed = packed.joined() if isinstance(packed, noisemod.Split) else packed
        assert packed == msgpack.packb(km.to_wire())
        stream += len(packed).to_bytes(4, "big") + packed
    # a blob map entry that is not last: the receiver finds no blob header at the end
    wire = kms[0].to_wire()
    moved = {"blob": wire.pop("blob"), **wire}
    payload = msgpack.packb(moved)
    stream += len(payload).to_bytes(4, "big") + payload
    kms.append(kms[0])
    i = 0
    while i < len(stream):  # frames of every size up to the largest, cutting anywhere
        n = rnd.choice((1, 3, 7, 100, 5000, noisemod.CHUNK, rnd.randint(1, noisemod.CHUNK)))
        raw.frame(raw.noise.encrypt(bytes(stream[i:i + n])))
        i += n
    got = [b.recv() for _ in kms]
    assert got == kms
    assert all(type(g.lazy_load_blob.bytes) is bytes for g in got if g.lazy_load_blob is not None)
    # the two with a big blob last were received in place; the other big ones looked and fell back
    assert [f is not None for f in found] == [True, False, False, True, False]


# ---- routers: indirect nodes reached through a relay ---------------------------------------------
MARKER = b"PLAINTEXT-MARKER-6b1f0e"


def wait_served(router, *names, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not all(n in router.net._served for n in names):
        assert time.monotonic() < deadline, (names, router.net._served)
        time.sleep(0.02)


def test_indirect_node_is_reached_through_its_router_which_sees_only_ciphertext(nodes):
    recorded = bytearray()
    r = nodes("r.os", is_router=True, relay_tap=recorded.extend)
    b = nodes("b.os", routers=["r.os"])
    wait_served(r, "b.os")
    a = nodes("a.os")
    assert b.net.entry() == {"name": "b.os", "public_key": b.identity.public.hex(), "routers": ["r.os"]}
    assert a.net.directory.lookup("b.os").routers == ("r.os",)
    km = request("a.os", "b.os", body=MARKER, blob=Blob(None, MARKER * 40000))
    errors = a.send(km)
    assert b.recv() == km
    b.send(request("b.os", "a.os", body=b"back " + MARKER))
    assert a.recv().message.body == b"back " + MARKER
    assert_quiet(errors, 0)
    assert "r.os relaying" in a.net._peers["b.os"].conn.where
    assert "r.os relaying" in b.net._peers["a.os"].conn.where
    # the router's socket is on loopback, the relayed peer is not judged local by it: compression on
    assert a.net._peers["b.os"].zstd and b.net._peers["a.os"].zstd
    assert r.net.routing_status() == ["we route for 1 nodes (limit 100): b.os; 1 relayed sessions"]
    assert b.net.routing_status() == ["our routers: r.os (connected)"] and a.net.routing_status() == []
    # The router read all of it (the request frame in plain text, then the session), and no marker.
    assert b"b.os" in recorded and len(recorded) > len(MARKER) * 40000
    assert MARKER not in bytes(recorded)


def test_a_router_cannot_alter_what_it_relays(nodes, caplog):
    tamper = threading.Event()

    def tap(data):
        if tamper.is_set() and len(data) > 4096:
            data[len(data) // 2] ^= 1
    r = nodes("r.os", is_router=True, relay_tap=tap)
    b = nodes("b.os", routers=["r.os"])
    wait_served(r, "b.os")
    a = nodes("a.os")
    a.send(request("a.os", "b.os", body=b"first"))
    assert b.recv().message.body == b"first"  # positive control: untouched, it arrives
    tamper.set()
    with caplog.at_level(logging.WARNING, logger="host.net"):
        a.send(request("a.os", "b.os", body=b"second", blob=Blob(None, os.urandom(1 << 20))))
        assert b.lost.get(timeout=10) == "a.os"
    assert_quiet(b.inbox, 0.5)
    assert any("decryption failed" in rec.getMessage() for rec in caplog.records), caplog.text


def test_routers_refuse_with_reasons_and_the_next_router_is_used(nodes):
    problems = queue.Queue()
    r1 = nodes("r1.os", is_router=True)
    r2 = nodes("r2.os", is_router=True, router_max_nodes=1)
    plain = nodes("p.os")                                    # not a router
    b = nodes("b.os", routers=["p.os", "r1.os", "r2.os"])
    wait_served(r1, "b.os")
    wait_served(r2, "b.os")
    nodes("c.os", routers=["r2.os"], on_problem=problems.put)   # r2 is full: it says so
    assert "r2.os does not route for us: r2.os already routes for its limit of 1 nodes" in problems.get(timeout=10)
    a = nodes("a.os")
    errors = a.send(request("a.os", "c.os"))
    why = errors.get(timeout=15)
    assert why.startswith("offline: cannot reach c.os through its routers: r2.os: r2.os does not relay to c.os: "
                          "c.os is not connected to r2.os as to its router"), why
    # b names p.os first, which is no router; r1.os relays
    a.send(request("a.os", "b.os", body=b"one"))
    assert b.recv().message.body == b"one"
    assert "r1.os relaying" in a.net._peers["b.os"].conn.where
    assert b.net.entry()["routers"] == ["p.os", "r1.os", "r2.os"]
    assert "b.os" not in plain.net._served and "b.os" in r1.net._served  # p.os refused to serve b
    # r1 goes away: the relayed session ends, and the next message goes through r2
    r1.stop()
    assert a.lost.get(timeout=10) == "b.os"
    errors = a.send(request("a.os", "b.os", body=b"two"))
    assert b.recv().message.body == b"two"
    assert "r2.os relaying" in a.net._peers["b.os"].conn.where
    assert_quiet(errors, 0)


def test_router_rate_limit_holds_relayed_bytes(nodes):
    r = nodes("r.os", is_router=True, router_max_rate=4 << 20)
    b = nodes("b.os", routers=["r.os"])
    wait_served(r, "b.os")
    a = nodes("a.os")
    a.send(request("a.os", "b.os", body=b"warm"))
    assert b.recv().message.body == b"warm"
    t0 = time.monotonic()
    for _ in range(6):
        a.send(request("a.os", "b.os", blob=Blob(None, os.urandom(1 << 20))))
    for _ in range(6):
        b.recv(timeout=30)
    took = time.monotonic() - t0
    assert took > 1.0, took  # 6 MiB at 4 MiB/s, less a quarter-second burst: at least 1.25 s


def test_the_indirect_nodes_key_is_pinned_through_the_router(nodes, tmp_path):
    """A router (or whoever answers through it) cannot pose as the indirect node: the dialler
    checks the key of its own entry, as for a direct peer."""
    import json
    shared = Directory(tmp_path / "shared.sqlite")          # where r and b register
    r = nodes("r.os", is_router=True, directory=shared)
    b = nodes("b.os", routers=["r.os"], directory=shared)
    wait_served(r, "b.os")
    peers = tmp_path / "a.peers.json"
    a = nodes("a.os", directory=Directory(tmp_path / "a.sqlite", peers))
    shared.register("a.os", a.identity.public, "127.0.0.1", a.net.port)  # b knows a's key

    def a_knows_b_as(key):
        tmp = peers.with_suffix(".tmp")
        tmp.write_text(json.dumps([r.net.entry(), {**b.net.entry(), "public_key": key.hex()}]))
        os.replace(tmp, peers)
    a_knows_b_as(r.identity.public)                         # a wrong key for b
    why = a.send(request("a.os", "b.os")).get(timeout=15)
    assert (f"key {b.identity.public.hex()[:16]} answered, {r.identity.public.hex()[:16]} expected" in why
            and "r.os relaying" in why), why
    assert_quiet(b.inbox, 0.2)
    a_knows_b_as(b.identity.public)                         # positive control: the right one
    errors = a.send(request("a.os", "b.os", body=b"pinned"))
    assert b.recv().message.body == b"pinned"
    assert_quiet(errors, 0)


def test_bad_relay_frames_and_control_messages_are_refused_and_the_router_keeps_serving(nodes, raw_peer, caplog):
    r = nodes("r.os", is_router=True)
    b = nodes("b.os", routers=["r.os"])
    plain = nodes("p.os")                     # not a router
    wait_served(r, "b.os")
    a = nodes("a.os")

    def relay_frame(port, msg, raw=None):
        """Send one relay frame to `port`; the reply frame's map, or None if the socket is dropped."""
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        data = relaymod.RELAY_MAGIC + (raw if raw is not None else msgpack.packb(msg))
        s.sendall(len(data).to_bytes(2, "big") + data)
        try:
            head = s.recv(2)
            if len(head) < 2:
                return None
            body = b""
            while len(body) < int.from_bytes(head, "big"):
                body += s.recv(65536)
            return msgpack.unpackb(body[len(relaymod.RELAY_MAGIC):])
        except ConnectionResetError:
            return None
        finally:
            s.close()

    with caplog.at_level(logging.WARNING, logger="host.net"):
        assert relay_frame(r.net.port, None, raw=b"\xc1garbage") is None
        assert relay_frame(r.net.port, {"relay": 7, "from": None}) is None
        assert relay_frame(r.net.port, {"answer": os.urandom(16)}) is None
        assert relay_frame(r.net.port, {"relay": "nobody.os", "from": "a.os"}) == {
            "ok": False, "reason": "nobody.os is not connected to r.os as to its router"}
        assert relay_frame(plain.net.port, {"relay": "b.os", "from": "a.os"}) == {
            "ok": False, "reason": "p.os is not a router"}
        # an authenticated peer that is not b's router asks b to call it back: ignored
        raw = raw_peer("evil.os", b)
        ctl = msgpack.packb({"ctl": "relay", "token": os.urandom(16), "from": "a.os"})
        raw.send_plain(len(ctl).to_bytes(4, "big") + ctl)
        deadline = time.monotonic() + 10
        while not any("ignored a control message 'relay' from evil.os" in m.getMessage() for m in caplog.records):
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
    msgs = [m.getMessage() for m in caplog.records]
    assert any("malformed relay frame" in m for m in msgs), msgs
    assert any("unknown or expired token" in m for m in msgs), msgs
    # positive control: a real relayed session still goes through, and b kept evil's connection
    a.send(request("a.os", "b.os", body=b"through"))
    assert b.recv().message.body == b"through"
    assert "evil.os" in b.net.connected_peers()


def open_relay(port, target, source_ip):
    """A socket from `source_ip` that asked the router at `port` to relay it to `target`, then
    stalls (never starts its handshake)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(20)
    s.bind((source_ip, 0))
    s.connect(("127.0.0.1", port))
    data = relaymod.RELAY_MAGIC + msgpack.packb({"relay": target, "from": "flood.os"})
    s.sendall(len(data).to_bytes(2, "big") + data)
    return s


def relay_reply(s):
    """The router's answer on a socket from open_relay, or None if it closed without one."""
    try:
        head = s.recv(2)
        if len(head) < 2:
            return None
        body = b""
        while len(body) < int.from_bytes(head, "big"):
            chunk = s.recv(65536)
            if not chunk:
                return None
            body += chunk
        return msgpack.unpackb(body[len(relaymod.RELAY_MAGIC):])
    except ConnectionResetError:
        return None


def test_one_address_cannot_take_a_routers_relays_and_another_still_gets_one(nodes, monkeypatch):
    """Relay requests prove nothing about who asks: one address gets at most
    MAX_RELAYS_PER_SOURCE sessions and MAX_PENDING_RELAYS_PER_SOURCE waiting requests."""
    monkeypatch.setattr(relaymod, "MAX_CALL_BACKS_PER_SOURCE", 100)  # b calls back for all
    r = nodes("r.os", is_router=True)
    b = nodes("b.os", routers=["r.os"], handshake_timeout=60)  # each stalled relay stays open
    wait_served(r, "b.os")
    per_source, waiting = relaymod.MAX_RELAYS_PER_SOURCE, relaymod.MAX_PENDING_RELAYS_PER_SOURCE
    flood: list = []
    try:
        # 127.0.0.2 asks in rounds, each waiting for its answers: it gets its share, then is refused
        replies = []
        for _ in range(3 * per_source // waiting):
            batch = [open_relay(r.net.port, "b.os", "127.0.0.2") for _ in range(waiting)]
            flood += batch
            replies += [relay_reply(s) for s in batch]
        assert replies[:per_source] == [{"ok": True}] * per_source, replies
        assert replies[per_source:] == [{"ok": False, "reason": f"r.os relays its limit of {per_source} "
                                         f"sessions for 127.0.0.2"}] * (2 * per_source), replies
        assert r.net._relays == per_source
        # control: another address (a node at 127.0.0.1) is still relayed to b
        a = nodes("a.os")
        errors = a.send(request("a.os", "b.os", body=b"through the flood"))
        assert b.recv().message.body == b"through the flood"
        assert "r.os relaying" in a.net._peers["b.os"].conn.where
        assert_quiet(errors, 0)
        # waiting requests: b now calls nobody back, so a burst from 127.0.0.3 waits; past the
        # share, it is refused at once
        monkeypatch.setattr(relaymod, "MAX_CALL_BACKS", 0)
        monkeypatch.setattr(relaymod, "RELAY_TIMEOUT", 4.0)
        burst = [open_relay(r.net.port, "b.os", "127.0.0.3") for _ in range(waiting + 4)]
        flood += burst
        answers = [relay_reply(s) for s in burst]
        assert answers.count({"ok": False, "reason": f"127.0.0.3 already has {waiting} relay requests waiting"}) == 4
        assert answers.count({"ok": False, "reason": "b.os did not call back within 4 s"}) == waiting, answers
    finally:
        for s in flood:
            s.close()


def test_an_indirect_node_bounds_its_call_backs_and_counts_them_as_handshakes(nodes, monkeypatch, caplog):
    """Each relay request makes the indirect node dial its router and start a handshake for an
    unknown dialler: at most MAX_CALL_BACKS at once, and none past MAX_HANDSHAKES."""
    monkeypatch.setattr(relaymod, "MAX_RELAYS_PER_SOURCE", 100)        # the router lets all through
    monkeypatch.setattr(relaymod, "MAX_PENDING_RELAYS_PER_SOURCE", 100)
    monkeypatch.setattr(relaymod, "MAX_CALL_BACKS", 3)
    monkeypatch.setattr(relaymod, "MAX_CALL_BACKS_PER_SOURCE", 100)
    monkeypatch.setattr(relaymod, "RELAY_TIMEOUT", 8.0)   # long enough for a loaded machine's call-backs
    r = nodes("r.os", is_router=True)
    b = nodes("b.os", routers=["r.os"], handshake_timeout=60)
    wait_served(r, "b.os")
    flood = [open_relay(r.net.port, "b.os", "127.0.0.2") for _ in range(8)]
    with caplog.at_level(logging.WARNING, logger="host.net"):
        replies = [relay_reply(s) for s in flood]
    assert replies.count({"ok": True}) == 3, replies
    assert replies.count({"ok": False, "reason": "b.os did not call back within 8 s"}) == 5, replies
    assert b.net._calling_back == 3
    assert "3 call-backs already under way" in caplog.text
    for s in flood:
        s.close()
    deadline = time.monotonic() + 10                 # the relays end, and b's call-backs with them
    while b.net._calling_back or b.net._handshakes:
        assert time.monotonic() < deadline, (b.net._calling_back, b.net._handshakes)
        time.sleep(0.02)
    a = nodes("a.os")                                 # control: a relayed session goes through
    a.send(request("a.os", "b.os", body=b"one"))
    assert b.recv().message.body == b"one"
    # call-backs count as unauthenticated connections: with b's full, b calls nobody back
    monkeypatch.setattr(relaymod, "MAX_CALL_BACKS", 100)
    monkeypatch.setattr(noisemod, "MAX_HANDSHAKES", 2)
    stalled = [socket.create_connection(("127.0.0.1", b.net.port), timeout=10) for _ in range(2)]
    try:
        while b.net._handshakes < 2:
            assert time.monotonic() < deadline + 10, b.net._handshakes
            time.sleep(0.02)
        c = nodes("c.os")
        with caplog.at_level(logging.WARNING, logger="host.net"):
            why = c.send(request("c.os", "b.os", body=b"refused")).get(timeout=15)
        assert "b.os did not call back within 8 s" in why, why
        assert any(m.getMessage().startswith("not calling r.os back") and
                   m.getMessage().endswith("too many unauthenticated connections") for m in caplog.records)
    finally:
        for s in stalled:
            s.close()
    errors = c.send(request("c.os", "b.os", body=b"two"))  # control: once they close, it goes through
    assert b.recv().message.body == b"two"
    assert_quiet(errors, 0)
    assert_quiet(b.inbox, 0)


# ---- back-pressure -------------------------------------------------------------------------------
def test_a_peer_whose_messages_are_not_taken_is_held_back_and_others_are_not(nodes):
    """Its messages wait in the node only up to PEER_IN_FLIGHT bytes; then its socket is not read
    (TCP holds its sender) until they are taken, while another peer's messages keep arriving."""
    from host.net import peers as peersmod
    b = nodes("b.os", hold=True)
    a, c = nodes("a.os"), nodes("c.os")
    size = 4 << 20
    count = 2 * peersmod.PEER_IN_FLIGHT // size + 4
    errors = [a.send(request("a.os", "b.os", body=b"%d" % i, blob=Blob(None, os.urandom(size))))
              for i in range(count)]
    deadline = time.monotonic() + 30
    while b.net.intake_status().get("a.os", (0, 0))[1] < 1:     # b stopped reading a
        assert time.monotonic() < deadline, b.net.intake_status()
        time.sleep(0.01)
    held = []
    while not b.held.empty():
        held.append(b.held.get())
    assert 0 < len(held) <= peersmod.PEER_IN_FLIGHT // size + 1, len(held)
    # another peer is read meanwhile
    c.send(request("c.os", "b.os", body=b"from c"))
    km, receipt = b.held.get(timeout=10)
    assert km.message.body == b"from c"
    receipt.taken()
    # taking a's messages lets the rest through, in order and whole
    got = [km.message.body for km, _ in held]
    for _, receipt in held:
        receipt.taken()
    while len(got) < count:
        km, receipt = b.held.get(timeout=30)
        got.append(km.message.body)
        receipt.taken()
    assert got == [b"%d" % i for i in range(count)]
    for e in errors:
        assert_quiet(e, 0)


def test_an_indirect_node_shares_its_call_backs_per_dialler_address(nodes, monkeypatch):
    """Its router tells it each dialler's address: one address gets MAX_CALL_BACKS_PER_SOURCE
    call-backs under way, and a dialler at another address is still called back."""
    monkeypatch.setattr(relaymod, "MAX_RELAYS_PER_SOURCE", 100)        # the router lets all through
    monkeypatch.setattr(relaymod, "MAX_PENDING_RELAYS_PER_SOURCE", 100)
    monkeypatch.setattr(relaymod, "RELAY_TIMEOUT", 2.0)
    share = relaymod.MAX_CALL_BACKS_PER_SOURCE
    r = nodes("r.os", is_router=True)
    b = nodes("b.os", routers=["r.os"], handshake_timeout=60)          # stalled call-backs stay
    wait_served(r, "b.os")
    flood = [open_relay(r.net.port, "b.os", "127.0.0.2") for _ in range(share + 6)]
    try:
        replies = [relay_reply(s) for s in flood]
        assert replies.count({"ok": True}) == share, replies
        assert b.net._calling_back == share
        # control: a node dialling from 127.0.0.1 is relayed and heard meanwhile
        a = nodes("a.os")
        errors = a.send(request("a.os", "b.os", body=b"past the flood"))
        assert b.recv().message.body == b"past the flood"
        assert "r.os relaying" in a.net._peers["b.os"].conn.where
        assert_quiet(errors, 0)
    finally:
        for s in flood:
            s.close()
