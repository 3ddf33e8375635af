"""Authenticated, encrypted transport between nodes.

Each node listens on one TCP port (on one or more addresses, IPv4 or IPv6) and keeps at most one
connection per peer, opened on first use (by either side) and reused in both directions. An idle
connection sends an empty transport message every few seconds; one that hears nothing for
``DEAD_AFTER`` seconds is dropped, so a peer that vanished without closing (a cut link, a deleted
host) is noticed and its pending requests fail as offline. Connections are secured with
``Noise_XX_25519_AESGCM_BLAKE2s`` (Kinode uses ChaChaPoly; AES-GCM is 2.7x faster with AES-NI and
only our nodes speak this transport): each side's static key is its networking identity, and each
side's handshake payload names the node it claims to be. A claim is accepted only if the directory
holds exactly that static key for that name, so a peer cannot pose as another node.

Wire format (all integers big-endian)::

    noise message := u16 length, ciphertext          (length <= 65535)
    handshake     := XX message 1, 2, 3, then one transport message from the responder:
                     msgpack {"accept": bool, "reason": str}
    plaintext     := (u32 length, msgpack(KernelMessage.to_wire()))*  split over transport messages

Handshake payload (messages 2 and 3): msgpack ``{"v": 1, "name": str, "instance": 16 bytes}``. The
``instance`` is random per ``Network.start()``; it tells a restarted peer from a second connection
of the same run.

One connection per peer pair: the responder answers the handshake with accept or reject. When both
nodes dial each other at once, the connection dialled by the node whose name sorts first wins; the
other is rejected before any message passes on it, and its dialler uses the winner instead.

Routers (Kinode's indirect nodes): a node that cannot be dialled names routers; it keeps a
connection to each (its hello says ``"route": true``), and a router started with ``is_router``
serves it. A peer that wants the indirect node opens a TCP connection to one of its routers and
sends, instead of Noise message 1, a relay frame: ``u16 length, RELAY_MAGIC, msgpack {"relay":
target, "from": name}``. The router asks the target over their connection (a control map
``{"ctl": "relay", "token", "from"}`` in the plaintext stream) to open a connection back, which
starts with the relay frame ``{"answer": token}``; the router then answers the dialler ``{"ok":
true}`` (or ``false`` and a ``reason``) and copies bytes between the two sockets. The two ends
then run the usual Noise XX handshake and session through it: the router never holds their
keys, and the dialler pins the indirect node's key as for a direct peer. A relay request is
unauthenticated, so the router shares its relays out per source address and the indirect node
bounds its call-backs (each one a dial and a handshake) and counts them as handshakes.

Threading: everything runs on one asyncio loop on a daemon thread. ``send`` may be called from any
thread; ``on_message``, ``on_peer_lost`` and every ``on_error`` are called on the network thread
and must only enqueue.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import socket
import struct
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from noise.connection import Keypair, NoiseConnection

from host import fsutil
from host.net.directory import Directory, NameTaken, NodeRecord, fingerprint, host_port, peers_entry  # noqa: F401
from host.messages import KernelMessage, ParseError

log = logging.getLogger("host.net.network")

MAX_MESSAGE = 10_485_800
"""Largest encoded (MessagePack) KernelMessage accepted, as in Kinode."""

NOISE_PROTOCOL = b"Noise_XX_25519_AESGCM_BLAKE2s"
PROLOGUE = b"kinode-py net v1"
NOISE_MAX = 65535          # largest Noise message
TAG = 16                   # AES-GCM tag
CHUNK = NOISE_MAX - TAG    # plaintext bytes per transport message
HANDSHAKE_MAX = 4096       # largest handshake message we accept from an unauthenticated socket
HANDSHAKE_TIMEOUT = 5.0
DIAL_TIMEOUT = 5.0
HEARTBEAT_EVERY = 5.0      # directory heartbeat
KEEPALIVE_EVERY = 5.0      # an idle connection sends an empty transport message this often
DEAD_AFTER = 20.0          # a connection that hears nothing this long is dropped (a half-open link);
                           # longer than a short outage plus TCP's retransmission back-off
PEERS_CHECK = 0.1          # the peers file is checked for changes at most this often
REPORT_AGAIN_AFTER = 30.0  # the same dial failure is told to the user at most this often
INSTANCE_LEN = 16
RELAY_MAGIC = b"kinode-py relay\x00"  # starts a relay frame (a Noise message 1 is 32 random bytes)
RELAY_TIMEOUT = 5.0        # seconds a router waits for the indirect node to call back
RELAY_BUF = 256 << 10      # bytes a router copies per read
ROUTER_RETRY = 2.0         # seconds between an indirect node's attempts to reach a lost router
MAX_RELAYS = 512           # relayed sessions a router carries at once
# relay requests carry no proof of who asks: one address (an IPv6 /64) gets only a share of the router
MAX_RELAYS_PER_SOURCE = 16          # sessions, waiting or relayed, for diallers at one address
MAX_PENDING_RELAYS_PER_SOURCE = 4   # of those, still waiting for the indirect node's call-back
MAX_CALL_BACKS = 32        # an indirect node's call-backs to its routers under way (dial and handshake)

SEND_BATCH = 1 << 20       # plaintext bytes gathered from the queue per encrypt+write round
OUT_KEEP = 5 << 20         # keep a connection's output buffer up to this size between rounds (a 4 MiB chunk fits)
HANDSHAKE_BUF = 2 * (NOISE_MAX + 2)        # receive buffer while unauthenticated
RECV_BUF = (1 << 20) + 2 * (NOISE_MAX + 2)  # receive buffer once established
MAX_HANDSHAKES = 256       # concurrent unauthenticated connections; more are closed at once
SOCK_BUF = 4 << 20

_NONCE = struct.Struct(">4xQ")  # Noise AESGCM nonce: 32 zero bits + 64-bit big-endian counter
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class _Split:
    """An encoded KernelMessage whose big blob is kept as its own segment: the msgpack head ends
    with the blob's bin32 header, so head + blob is exactly what `packb` would give, without
    copying megabytes into a new bytes object only to encrypt them from there."""
    __slots__ = ("parts", "size")

    def __init__(self, head: bytes, blob: bytes):
        self.parts = (head, blob)
        self.size = len(head) + len(blob)

    def __len__(self) -> int:
        return self.size

    def joined(self) -> bytes:
        return b"".join(self.parts)


SPLIT_BLOB_MIN = 1 << 16   # msgpack encodes a bin this long with a bin32 header


def _encode(km: KernelMessage) -> Union[bytes, _Split]:
    wire = km.to_wire()
    blob = wire["blob"]
    if blob is None or len(blob[1]) < SPLIT_BLOB_MIN:
        return msgpack.packb(wire)
    data = blob[1]
    wire["blob"] = [blob[0], b""]          # the blob is the last thing packed: b"" ends the head
    head = msgpack.packb(wire)
    return _Split(head[:-2] + b"\xc6" + _U32.pack(len(data)), data)


# ---- identity ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """The node's networking keypair (raw X25519 bytes)."""
    private: bytes = field(repr=False)
    public: bytes


def _public_of(private: bytes) -> bytes:
    key = x25519.X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_or_create_identity(home: Path) -> Identity:
    """Load ``home/.keys/networking.key`` (32 raw private bytes), creating it on first use.

    The directory is kept at mode 0700 and the file at 0600. Creation is atomic and exclusive, so
    two processes starting on one home at once end up with the same key.
    """
    keys = Path(home) / ".keys"
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(keys, 0o700)
    path = keys / "networking.key"
    if not path.exists():
        private = x25519.X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())
        if fsutil.create_atomic(path, private, fsync=True, mode=0o600):  # else a racing process made it: use its key
            log.info("created networking key %s", path)
    mode = path.stat().st_mode & 0o777
    if mode != 0o600:
        log.warning("networking key %s had mode %o; setting 0600", path, mode)
        os.chmod(path, 0o600)
    private = path.read_bytes()
    if len(private) != 32:
        raise ValueError(f"{path}: expected 32 raw bytes of X25519 private key, found {len(private)}")
    return Identity(private, _public_of(private))


# ---- connections ---------------------------------------------------------------------------------
class _ProtocolError(Exception):
    """The peer broke the protocol; its connection is dropped."""


class _DialFailed(Exception):
    pass


class _Closed(ConnectionError):
    pass


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt in ((socket.SO_SNDBUF, socket.SO_RCVBUF) if SOCK_BUF else ()):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass


class _Conn:
    """One TCP connection: raw non-blocking I/O on the loop, Noise framing, message parsing."""

    def __init__(self, net: "Network", sock: socket.socket, dialled: bool, where: str):
        self.net = net
        self.loop = net._loop
        self.sock = sock
        self.fd = sock.fileno()
        self.dialled = dialled          # True if we dialled it
        self.where = where              # remote address, for logs
        self.peer_name: Optional[str] = None
        self.instance: Optional[bytes] = None
        self.established = False
        self.closed = False
        self._rfut: Optional[asyncio.Future] = None
        self._wfut: Optional[asyncio.Future] = None
        self.reader_task: Optional[asyncio.Task] = None
        # receive buffer of whole/partial Noise messages (small until authenticated)
        self.rbuf = bytearray(HANDSHAKE_BUF)
        self.rmv = memoryview(self.rbuf)
        self.rstart = self.rend = 0
        # transport ciphers (after the handshake)
        self.enc: Optional[AESGCM] = None
        self.dec: Optional[AESGCM] = None
        self.enc_n = self.dec_n = 0
        # KernelMessage stream parser state
        self.hdr = bytearray(4)
        self.hlen = 0
        self.body: Optional[bytearray] = None
        self.body_mv: Optional[memoryview] = None
        self.have = 0
        self.scratch: Optional[memoryview] = None
        self.out = bytearray(0)
        # liveness: when bytes last arrived and were last written; one writer at a time
        self.last_recv = self.last_sent = self.loop.time()
        self.wlock = asyncio.Lock()
        self.pinging = False
        self.route = False              # the peer asked us (a router) to serve it on this connection
        self.relay_frame: Optional[bytes] = None  # the first frame, when it asked for a relay
        self.pair_frame: Optional[bytes] = None   # the first frame, when it began a pairing
        self.source = where             # the remote address (an IPv6 /64) that relay limits count by

    def __repr__(self) -> str:
        return f"<conn {self.peer_name or '?'} {self.where} {'out' if self.dialled else 'in'}>"

    @property
    def label(self) -> str:
        return f"{self.peer_name} ({self.where})" if self.peer_name else self.where

    # ---- raw I/O ---------------------------------------------------------------------------------
    async def _wait_io(self, write: bool) -> None:
        if self.closed:
            raise _Closed("connection closed")
        fut = self.loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if write:
            self._wfut = fut
            self.loop.add_writer(self.fd, ready)
        else:
            self._rfut = fut
            self.loop.add_reader(self.fd, ready)
        try:
            await fut
        finally:
            if write:
                self._wfut = None
            else:
                self._rfut = None
            if not self.closed:
                (self.loop.remove_writer if write else self.loop.remove_reader)(self.fd)

    async def sendall(self, data: Union[memoryview, bytes]) -> None:
        mv = memoryview(data)
        while True:
            try:
                n = self.sock.send(mv)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n == len(mv):
                return
            mv = mv[n:]
            await self._wait_io(True)

    def send_now(self, data: bytes) -> None:
        """Write a small frame on a fresh socket without waiting (it fits the empty send buffer)."""
        n = self.sock.send(data)
        if n != len(data):
            raise _Closed("could not write handshake reply")

    async def _fill(self) -> None:
        """Read more bytes into the receive buffer; raises _Closed at end of stream."""
        if self.rstart == self.rend:
            self.rstart = self.rend = 0
        elif len(self.rbuf) - self.rend < NOISE_MAX + 2:
            n = self.rend - self.rstart
            self.rbuf[0:n] = self.rbuf[self.rstart:self.rend]
            self.rstart, self.rend = 0, n
        while True:
            try:
                n = self.sock.recv_into(self.rmv[self.rend:])
            except (BlockingIOError, InterruptedError):
                await self._wait_io(False)
                continue
            if n == 0:
                raise _Closed("closed by peer")
            self.rend += n
            self.last_recv = self.loop.time()
            return

    def _next_frame(self) -> Optional[memoryview]:
        """The next whole Noise message in the receive buffer (a view valid until the next fill)."""
        start = self.rstart
        if self.rend - start < 2:
            return None
        size = (self.rbuf[start] << 8) | self.rbuf[start + 1]
        if self.rend - start < 2 + size:
            return None
        self.rstart = start + 2 + size
        return self.rmv[start + 2:start + 2 + size]

    async def read_frame(self, limit: int) -> bytes:
        while True:
            if self.rend - self.rstart >= 2:
                size = (self.rbuf[self.rstart] << 8) | self.rbuf[self.rstart + 1]
                if size > limit:
                    raise _ProtocolError(f"handshake message of {size} bytes (limit {limit})")
            frame = self._next_frame()
            if frame is not None:
                return bytes(frame)
            await self._fill()

    async def write_frame(self, payload: bytes) -> None:
        await self.sendall(_U16.pack(len(payload)) + bytes(payload))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._rfut is not None:
            self.loop.remove_reader(self.fd)
            if not self._rfut.done():
                self._rfut.set_exception(_Closed("connection closed"))
        if self._wfut is not None:
            self.loop.remove_writer(self.fd)
            if not self._wfut.done():
                self._wfut.set_exception(_Closed("connection closed"))
        try:
            self.sock.close()
        except OSError:
            pass

    def grow(self) -> None:
        """Switch to the large receive buffer (once the peer is authenticated)."""
        if len(self.rbuf) >= RECV_BUF:
            return
        pending = self.rbuf[self.rstart:self.rend]
        self.rbuf = bytearray(RECV_BUF)
        self.rmv = memoryview(self.rbuf)
        self.rbuf[:len(pending)] = pending
        self.rstart, self.rend = 0, len(pending)
        self.scratch = memoryview(bytearray(CHUNK))

    # ---- transport -------------------------------------------------------------------------------
    def set_keys(self, noise: NoiseConnection) -> None:
        proto = noise.noise_protocol
        self.enc = AESGCM(proto.cipher_state_encrypt.k)
        self.dec = AESGCM(proto.cipher_state_decrypt.k)
        self.enc_n = proto.cipher_state_encrypt.n
        self.dec_n = proto.cipher_state_decrypt.n

    def encrypt_frame(self, plaintext: bytes) -> bytes:
        ct = self.enc.encrypt(_NONCE.pack(self.enc_n), plaintext, None)
        self.enc_n += 1
        return _U16.pack(len(ct)) + ct

    def decrypt_frame(self, frame: bytes) -> bytes:
        try:
            pt = self.dec.decrypt(_NONCE.pack(self.dec_n), frame, None)
        except InvalidTag:
            raise _ProtocolError("decryption failed") from None
        self.dec_n += 1
        return pt

    async def send_payloads(self, payloads: list) -> None:
        """Frame, encrypt and write encoded KernelMessages (one write for the whole batch)."""
        segs: list = []
        total = 0
        for p in payloads:
            segs.append(_U32.pack(len(p)))
            if isinstance(p, _Split):
                segs.extend(p.parts)
            else:
                segs.append(p)
            total += 4 + len(p)
        need = total + -(-total // CHUNK) * (2 + TAG)
        if need <= OUT_KEEP:
            if len(self.out) < need:
                self.out = bytearray(max(need, min(OUT_KEEP, 2 * len(self.out))))
            out = memoryview(self.out)
        else:
            out = memoryview(bytearray(need))
        enc, pack_nonce = self.enc, _NONCE.pack
        n = self.enc_n
        pos = 0
        si, so = 0, 0          # current segment and offset in it
        remaining = total
        while remaining:
            c = CHUNK if remaining > CHUNK else remaining
            seg = segs[si]
            if len(seg) - so >= c:  # the chunk lies inside one segment: no copy
                data: bytes | memoryview = memoryview(seg)[so:so + c]
                so += c
                if so == len(seg):
                    si, so = si + 1, 0
            else:                   # the chunk spans segments: join the pieces
                parts = []
                want = c
                while want:
                    seg = segs[si]
                    take = min(len(seg) - so, want)
                    parts.append(memoryview(seg)[so:so + take])
                    so += take
                    want -= take
                    if so == len(seg):
                        si, so = si + 1, 0
                data = b"".join(parts)
            _U16.pack_into(out, pos, c + TAG)
            enc.encrypt_into(pack_nonce(n), data, None, out[pos + 2:pos + 2 + c + TAG])
            n += 1
            pos += 2 + c + TAG
            remaining -= c
        self.enc_n = n
        await self.sendall(out[:pos])
        self.last_sent = self.loop.time()

    async def ping(self) -> None:
        """An empty transport message: tells the peer we are alive (it carries no KernelMessage,
        so any version of this transport ignores it)."""
        async with self.wlock:
            if not self.closed:
                await self.sendall(self.encrypt_frame(b""))
                self.last_sent = self.loop.time()

    async def read_loop(self) -> None:
        """Decrypt and deliver messages until the connection ends (raises on protocol errors)."""
        while True:
            frame = self._next_frame()
            while frame is not None:
                self._on_frame(frame)
                frame = self._next_frame()
            await self._fill()

    def _on_frame(self, frame: memoryview) -> None:
        size = len(frame)
        if size < TAG:
            raise _ProtocolError(f"short transport message ({size} bytes)")
        plain = size - TAG
        nonce = _NONCE.pack(self.dec_n)
        body = self.body
        try:
            if body is not None and plain <= len(body) - self.have:
                # the common case for large messages: decrypt straight into the message buffer
                self.dec.decrypt_into(nonce, frame, None, self.body_mv[self.have:self.have + plain])
                self.dec_n += 1
                self.have += plain
                if self.have == len(body):
                    self._deliver()
                return
            self.dec.decrypt_into(nonce, frame, None, self.scratch[:plain])
        except InvalidTag:
            raise _ProtocolError("decryption failed") from None
        self.dec_n += 1
        self._feed(self.scratch[:plain])

    def _feed(self, mv: memoryview) -> None:
        pos, end = 0, len(mv)
        while pos < end:
            if self.body is None:
                take = min(4 - self.hlen, end - pos)
                self.hdr[self.hlen:self.hlen + take] = mv[pos:pos + take]
                self.hlen += take
                pos += take
                if self.hlen == 4:
                    self.hlen = 0
                    size = _U32.unpack(self.hdr)[0]
                    if size > MAX_MESSAGE:
                        raise _ProtocolError(f"declared message length {size} > {MAX_MESSAGE}")
                    if size == 0:
                        raise _ProtocolError("empty message")
                    self.body = bytearray(size)
                    self.body_mv = memoryview(self.body)
                    self.have = 0
            else:
                take = min(len(self.body) - self.have, end - pos)
                self.body_mv[self.have:self.have + take] = mv[pos:pos + take]
                self.have += take
                pos += take
                if self.have == len(self.body):
                    self._deliver()

    def _deliver(self) -> None:
        body = self.body
        self.body = self.body_mv = None
        self.have = 0
        try:
            wire = msgpack.unpackb(body, raw=False)
        except Exception as e:  # msgpack raises several unrelated types
            raise _ProtocolError(f"undecodable MessagePack ({e})") from None
        if not isinstance(wire, dict):
            raise _ProtocolError(f"message is a {type(wire).__name__}, not a map")
        if "ctl" in wire:
            self.net._control(self, wire)
            return
        try:
            km = KernelMessage.from_wire(wire)
        except (ParseError, ValueError, TypeError, KeyError) as e:
            raise _ProtocolError(f"bad kernel message ({e})") from None
        self.net._received(self, km)


class _Peer:
    """Per-peer state on the loop: the current connection and the ordered outgoing queue."""

    def __init__(self, name: str):
        self.name = name
        self.conn: Optional[_Conn] = None
        self.queue: deque = deque()    # (encoded payload, on_error)
        self.wake = asyncio.Event()
        self.pump: Optional[asyncio.Task] = None
        self.dialling = False
        self.waiters: list = []        # futures resolved when a connection is installed


# ---- the network service -------------------------------------------------------------------------
OnMessage = Callable[[KernelMessage], None]
OnPeerLost = Callable[[str], None]
OnError = Callable[[str], None]


class Network:
    """The node's network service. See the module docstring for the protocol."""

    def __init__(self, our_name: str, identity: Identity, port: int, directory: Directory,
                 on_message: OnMessage, on_peer_lost: OnPeerLost,
                 host: Union[str, Sequence[str]] = "127.0.0.1", *,
                 advertise_host: Optional[str] = None, advertise_port: Optional[int] = None,
                 on_problem: Optional[OnError] = None,
                 routers: Sequence[str] = (), is_router: bool = False,
                 router_max_nodes: int = 100, router_max_rate: float = 0.0,
                 relay_tap: Optional[Callable[[memoryview], None]] = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 heartbeat_every: float = HEARTBEAT_EVERY,
                 keepalive_every: float = KEEPALIVE_EVERY, dead_after: float = DEAD_AFTER):
        self.our_name = our_name
        self.identity = identity
        self.bind = [host] if isinstance(host, str) else list(host)   # addresses to listen on
        if not self.bind:
            raise ValueError("no address to listen on")
        self.host = self.bind[0]
        self.port = port
        self.directory = directory
        self.on_message = on_message
        self.on_peer_lost = on_peer_lost
        self.on_problem = on_problem       # told (besides the log) why a peer cannot be reached
        self.routers = tuple(routers)      # we are an indirect node, reached through these
        self.is_router = is_router         # we relay for indirect nodes that name us
        self.router_max_nodes = router_max_nodes
        self.router_max_rate = router_max_rate  # bytes/s over all relayed sessions; 0: no limit
        self.relay_tap = relay_tap         # sees every byte a relay reads (tests record them)
        self._address_given = advertise_host is not None
        if advertise_host is None:
            specific = [h for h in self.bind if h not in ("", "0.0.0.0", "::")]
            advertise_host = specific[0] if specific else socket.gethostname()
        self.advertise_host = advertise_host
        self.advertise_port = advertise_port  # None: the port we listen on
        self.handshake_timeout = handshake_timeout
        self.heartbeat_every = heartbeat_every
        self.keepalive_every = keepalive_every
        self.dead_after = dead_after
        self._reported: dict = {}          # (peer, text) -> when it was last told
        self._peers_checked = float("-inf")
        self._retired: set = set()         # connections replaced after a peers-file edit
        self.instance = b""
        self._hello = b""
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._listeners: list[socket.socket] = []
        self._peers: dict[str, _Peer] = {}
        self._tasks: set = set()
        self._handshakes = 0
        self._running = False
        self._closing = False
        self._served: dict[str, _Conn] = {}          # router: indirect nodes' connections to us
        self._pending_relays: dict[bytes, asyncio.Future] = {}  # router: token -> the call-back
        self._relays = 0                             # router: sessions being relayed
        self._relays_from: Counter[str] = Counter()  # router: sessions, waiting or relayed, per source
        self._waiting_from: Counter[str] = Counter()  # router: of those, still waiting for a call-back
        self._calling_back = 0                       # indirect node: call-backs under way
        self._relay_clock = 0.0                      # router: when the rate limit frees the link
        self._via: dict[str, str] = {}               # indirect peer -> the router that worked last
        self._keeping: set[str] = set()              # routers being dialled by the keeper
        self.pair_handler: Any = None  # host/net/pairing.py's Pairing: serves connections opening with its magic

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the port (OSError on a clash), register in the directory (NameTaken), start the loop."""
        if self._running:
            raise RuntimeError("network already started")
        listeners: list[socket.socket] = []
        try:
            for addr in self.bind:
                lsock = _listen(addr, self.port, dual_stack="0.0.0.0" not in self.bind)
                listeners.append(lsock)
                self.port = lsock.getsockname()[1]  # port 0: the first listener's port for all
            self.directory.register(self.our_name, self.identity.public, self.advertise_host,
                                    self.advertised_port, self.routers)
            self.directory.changed_peers()  # what is there now is no change: connections are new
        except BaseException:
            for lsock in listeners:
                lsock.close()
            raise
        self._listeners = listeners
        self._closing = False
        self._peers = {}
        self._tasks = set()
        self._handshakes = 0
        self._calling_back = 0
        self.instance = secrets.token_bytes(INSTANCE_LEN)  # new per run: tells peers we restarted
        self._hello = msgpack.packb({"v": 1, "name": self.our_name, "instance": self.instance})
        self._hello_route = msgpack.packb({"v": 1, "name": self.our_name, "instance": self.instance,
                                           "route": True})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"net-{self.our_name}", daemon=True)
        started = threading.Event()
        self._loop.call_soon(started.set)
        self._thread.start()
        started.wait()
        self._running = True
        asyncio.run_coroutine_threadsafe(self._begin(), self._loop).result()
        log.info("%s listening on %s, advertised as %s%s%s", self.our_name,
                 ", ".join(host_port(h or "*", self.port) for h in self.bind),
                 host_port(self.advertise_host, self.advertised_port),
                 f", reached through {', '.join(self.routers)}" if self.routers else "",
                 ", routing for indirect nodes" if self.is_router else "")

    @property
    def advertised_port(self) -> int:
        return self.advertise_port or self.port

    def entry(self) -> dict:
        """This node's entry for other nodes' peers files (an indirect node's names its routers,
        and its address only if --advertise gave one)."""
        if self.routers and not self._address_given:
            return peers_entry(self.our_name, self.identity.public, None, None, self.routers)
        return peers_entry(self.our_name, self.identity.public, self.advertise_host,
                           self.advertised_port, self.routers)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _begin(self) -> None:
        for lsock in self._listeners:
            self._spawn(self._accept_loop(lsock))
        self._spawn(self._heartbeat_loop())
        self._spawn(self._liveness_loop())
        if self.routers:
            self._spawn(self._keep_routers())

    def stop(self) -> None:
        """Unregister from the directory, close every connection and join the network thread."""
        if not self._running:
            return
        self._running = False
        try:
            self.directory.unregister(self.our_name, self.identity.public)
        except Exception as e:
            log.warning("could not unregister %s from the directory: %s", self.our_name, e)
        loop = self._loop
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        except Exception as e:
            log.warning("network shutdown: %r", e)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.warning("network thread of %s did not stop", self.our_name)
            return
        try:
            loop.run_until_complete(loop.shutdown_default_executor())
        except Exception:
            pass
        loop.close()
        log.info("%s network stopped", self.our_name)

    async def _shutdown(self) -> None:
        self._closing = True
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for peer in self._peers.values():
            if peer.pump is not None:
                tasks.append(peer.pump)
            if peer.conn is not None and peer.conn.reader_task is not None:
                tasks.append(peer.conn.reader_task)
        tasks.extend(c.reader_task for c in self._retired if c.reader_task is not None)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in self._retired:
            conn.close()
        self._retired.clear()
        for peer in self._peers.values():
            if peer.conn is not None:
                peer.conn.close()
                peer.conn = None
            self._fail_queue(peer, "offline: network stopped")
        for lsock in self._listeners:
            lsock.close()
        self._listeners = []

    def _spawn(self, coro) -> asyncio.Task:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_every)
            try:
                ok = await asyncio.to_thread(self.directory.heartbeat, self.our_name,
                                             self.identity.public)
            except Exception as e:
                log.warning("directory heartbeat failed: %s", e)
                continue
            if not ok:
                log.error("the directory no longer maps %s to our key (re-registered elsewhere?); "
                          "peers will refuse us", self.our_name)

    async def _liveness_loop(self) -> None:
        """Keep idle connections audibly alive, drop those that have heard nothing for
        ``dead_after`` (the peer or the link vanished without a FIN or RST: a half-open
        connection), and drop connections whose peers-file entry changed, so the next message
        dials the new address."""
        tick = min(1.0, self.keepalive_every / 2)
        while True:
            await asyncio.sleep(tick)
            now = self._loop.time()
            for peer in list(self._peers.values()):
                conn = peer.conn
                if conn is None or conn.closed or not conn.established:
                    continue
                silent = now - conn.last_recv
                if silent > self.dead_after:
                    log.warning("dropping connection to %s: nothing heard for %.0f s "
                                "(the peer or the link is gone)", conn.label, silent)
                    self._drop(conn, f"nothing heard for {silent:.0f} s")
                elif now - conn.last_sent >= self.keepalive_every and not conn.wlock.locked() \
                        and not conn.pinging:
                    conn.pinging = True
                    self._spawn(self._ping(conn))
            for conn in list(self._retired):
                if conn.closed or now - conn.last_recv > self.dead_after:
                    self._retired.discard(conn)
                    self._drop(conn, "retired")
            self._check_peers()

    def _check_peers(self, now_please: bool = False) -> None:
        """Retire connections whose peers-file entry changed (at most every PEERS_CHECK seconds
        unless `now_please`: a pump waking from idle checks at once, so an edit made just before a
        command is seen by that command)."""
        now = self._loop.time()
        if now - self._peers_checked < PEERS_CHECK and not now_please:
            return
        self._peers_checked = now
        try:
            changed = self.directory.changed_peers()  # a stat() unless the file changed
        except Exception as e:
            log.warning("peers file check failed: %s", e)
            return
        for name in changed:
            peer = self._peers.get(name)
            if peer is not None and peer.conn is not None and not peer.conn.closed:
                # Retire the connection rather than drop it: new messages dial the new entry, and
                # answers to what was sent before may still arrive on the old one. Reporting the
                # peer lost would fail requests queued for the new connection too.
                log.info("peers-file entry of %s changed: new messages dial it afresh", name)
                self._retired.add(peer.conn)
                peer.conn = None

    async def _ping(self, conn: _Conn) -> None:
        try:
            await conn.ping()
        except (OSError, _Closed) as e:
            self._drop(conn, f"write failed: {e}")
        finally:
            conn.pinging = False

    def _report(self, peer: str, text: str) -> None:
        """Tell the user why `peer` cannot be reached; the same text at most every 30 s."""
        now = self._loop.time()
        key = (peer, text)
        if now - self._reported.get(key, -REPORT_AGAIN_AFTER) < REPORT_AGAIN_AFTER:
            log.info("cannot reach %s: %s", peer, text)
            return
        if len(self._reported) > 1000:
            self._reported.clear()
        self._reported[key] = now
        log.warning("cannot reach %s: %s", peer, text)
        if self.on_problem is not None:
            _safe_call(self.on_problem, f"cannot reach {peer}: {text}")

    # ---- sending ---------------------------------------------------------------------------------
    def send(self, km: KernelMessage, on_error: OnError) -> None:
        """Queue ``km`` for its target node; never blocks on the network.

        Failures are reported through ``on_error(reason)`` on the network thread:
        ``"offline: ..."`` or ``"message too large: N bytes > 10485800"``.
        """
        loop = self._loop
        if not self._running or loop is None or loop.is_closed():
            _safe_call(on_error, "offline: network is not running")
            return
        try:
            payload = _encode(km)
        except Exception as e:
            loop.call_soon_threadsafe(_safe_call, on_error, f"message not encodable: {e}")
            return
        if len(payload) > MAX_MESSAGE:
            loop.call_soon_threadsafe(
                _safe_call, on_error,
                f"message too large: {len(payload)} bytes > {MAX_MESSAGE}")
            return
        try:
            loop.call_soon_threadsafe(self._enqueue, km.target.node, payload, on_error)
        except RuntimeError:  # loop closed under us
            _safe_call(on_error, "offline: network is not running")

    def _enqueue(self, node: str, payload: Union[bytes, _Split], on_error: OnError) -> None:
        if self._closing:
            _safe_call(on_error, "offline: network stopped")
            return
        if node == self.our_name:  # loopback: deliver a decoded copy, as a peer would
            try:
                raw = payload.joined() if isinstance(payload, _Split) else payload
                km = KernelMessage.from_wire(msgpack.unpackb(raw, raw=False))
            except Exception as e:
                _safe_call(on_error, f"message not encodable: {e}")
                return
            _safe_call(self.on_message, km)
            return
        peer = self._peer(node)
        peer.queue.append((payload, on_error))
        if peer.pump is None or peer.pump.done():
            peer.pump = self._loop.create_task(self._pump(peer))
        else:
            peer.wake.set()

    def _peer(self, name: str) -> _Peer:
        peer = self._peers.get(name)
        if peer is None:
            peer = self._peers[name] = _Peer(name)
        return peer

    def _fail_queue(self, peer: _Peer, reason: str) -> None:
        while peer.queue:
            _, on_error = peer.queue.popleft()
            _safe_call(on_error, reason)

    async def _pump(self, peer: _Peer) -> None:
        """Write the peer's queue in order, dialling when there is no connection."""
        try:
            idle = True
            while True:
                if not peer.queue:
                    peer.wake.clear()
                    await peer.wake.wait()
                    idle = True
                    continue
                # an edited entry: dial the new address, not the old connection
                self._check_peers(now_please=idle)
                idle = False
                conn = peer.conn
                if conn is None or conn.closed:
                    try:
                        conn = await self._dial(peer)
                    except _DialFailed as e:
                        if not self._closing:
                            self._report(peer.name, str(e))
                        self._fail_queue(peer, f"offline: {e}")
                        continue
                batch = []
                size = 0
                while peer.queue and size < SEND_BATCH:
                    payload, _ = peer.queue.popleft()
                    batch.append(payload)
                    size += len(payload)
                try:
                    async with conn.wlock:
                        await conn.send_payloads(batch)
                except (OSError, _Closed) as e:
                    self._drop(conn, f"write failed: {e}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("network pump for %s failed", peer.name)
            self._fail_queue(peer, "offline: internal network error")

    # ---- dialling --------------------------------------------------------------------------------
    async def _dial(self, peer: _Peer) -> _Conn:
        """Return a usable connection to ``peer``, dialling it; raises _DialFailed."""
        for attempt in range(2):
            peer.dialling = True
            try:
                conn = await self._dial_once(peer)
            finally:
                peer.dialling = False
            if conn is not None:
                return conn
            # Rejected as a duplicate: the peer's own connection to us is (about to be) the one.
            got = await self._wait_for_conn(peer, self.handshake_timeout if attempt else 2.0)
            if got is not None:
                return got
        raise _DialFailed(f"{peer.name} keeps refusing our connection as a duplicate")

    async def _wait_for_conn(self, peer: _Peer, timeout: float) -> Optional[_Conn]:
        if peer.conn is not None and not peer.conn.closed:
            return peer.conn
        fut = self._loop.create_future()
        peer.waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            if fut in peer.waiters:
                peer.waiters.remove(fut)

    async def _lookup(self, name: str) -> NodeRecord:
        """The directory's record for a node we mean to dial; _DialFailed says why there is none."""
        try:
            rec = await asyncio.to_thread(self.directory.lookup, name)
        except Exception as e:
            raise _DialFailed(f"directory lookup for {name} failed: {e}") from None
        if rec is None:
            pf = self.directory.peers_file
            raise _DialFailed(f"{name} is not in the node directory ({self.directory.path})"
                              + (f" nor in the peers file ({pf})" if pf else " and no --peers file is given"))
        if not rec.online:
            raise _DialFailed(f"node {name} is not running (it stopped; the directory says so)")
        return rec

    async def _connect(self, rec: NodeRecord) -> tuple[socket.socket, str]:
        """A TCP connection to a direct node's address (and that address, for messages)."""
        where = host_port(rec.host, rec.port)
        try:
            infos = await self._loop.getaddrinfo(rec.host, rec.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise _DialFailed(f"cannot resolve {rec.host} for {rec.name}: {e}") from None
        tried: list[str] = []
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                _tune(sock)
                await asyncio.wait_for(self._loop.sock_connect(sock, addr), DIAL_TIMEOUT)
                return sock, where
            except (OSError, asyncio.TimeoutError) as e:
                sock.close()
                why = (f"no answer in {DIAL_TIMEOUT:.0f} s" if isinstance(e, asyncio.TimeoutError)
                       else e.strerror or str(e))
                tried.append(f"{host_port(addr[0], addr[1])}: {why}")
            except BaseException:  # cancelled (shutdown)
                sock.close()
                raise
        raise _DialFailed(f"cannot connect to {where} ({rec.source} entry): {'; '.join(tried)}")

    async def _dial_once(self, peer: _Peer) -> Optional[_Conn]:
        """Dial and handshake; the connection, or None if the peer rejected it as a duplicate."""
        rec = await self._lookup(peer.name)
        if peer.conn is not None and not peer.conn.closed:
            return peer.conn  # the peer dialled us meanwhile
        if rec.routers:
            return await self._dial_indirect(peer, rec)
        sock, where = await self._connect(rec)
        return await self._handshake_out(peer, _Conn(self, sock, dialled=True, where=where), rec)

    async def _dial_indirect(self, peer: _Peer, rec: NodeRecord) -> Optional[_Conn]:
        """Reach an indirect node through the first of its routers that relays for us (starting
        with the one that worked last)."""
        routers = [r for r in rec.routers if r != self.our_name]
        last = self._via.get(rec.name)
        if last in routers:
            routers.remove(last)
            routers.insert(0, last)
        if not routers:
            raise _DialFailed(f"{rec.name} is reached only through routers, and names no router but us")
        failures = []
        for router in routers:
            conn: Optional[_Conn] = None
            try:
                rrec = await self._lookup(router)
                if rrec.routers:
                    raise _DialFailed(f"{router} is itself an indirect node")
                sock, where = await self._connect(rrec)
                conn = _Conn(self, sock, dialled=True, where=f"{where} ({router} relaying)")
                await asyncio.wait_for(self._ask_relay(conn, rec.name, router),
                                       RELAY_TIMEOUT + self.handshake_timeout)
            except (_DialFailed, asyncio.TimeoutError, _ProtocolError, _Closed, OSError) as e:
                if conn is not None:
                    conn.close()
                why = str(e) if isinstance(e, _DialFailed) else (
                    "no answer to the relay request" if isinstance(e, asyncio.TimeoutError)
                    else f"relay request failed: {e or type(e).__name__}")
                failures.append(f"{router}: {why}")
                log.info("cannot reach %s through %s: %s", rec.name, router, why)
                continue
            try:
                got = await self._handshake_out(peer, conn, rec)
            except _DialFailed as e:
                failures.append(f"{router}: {e}")
                continue
            self._via[rec.name] = router
            return got
        raise _DialFailed(f"cannot reach {rec.name} through its routers: {'; '.join(failures)}")

    async def _ask_relay(self, conn: _Conn, target: str, router: str) -> None:
        """Ask a router for a relayed connection to `target`; returns once it is through."""
        await conn.write_frame(RELAY_MAGIC + msgpack.packb({"relay": target, "from": self.our_name}))
        frame = await conn.read_frame(HANDSHAKE_MAX)
        reply = _parse_relay_frame(frame)
        if reply is None:
            raise _DialFailed(f"{router} did not answer the relay request as a router would")
        if reply.get("ok") is not True:
            raise _DialFailed(f"{router} does not relay to {target}: {reply.get('reason')}")

    async def _handshake_out(self, peer: _Peer, conn: _Conn, rec: NodeRecord) -> Optional[_Conn]:
        """The initiator's handshake on a connected socket, then install it as the peer's."""
        name, where = rec.name, conn.where
        try:
            accepted = await asyncio.wait_for(self._initiate(conn, name, rec.public_key, rec.source),
                                              self.handshake_timeout)
        except asyncio.TimeoutError:
            conn.close()
            raise _DialFailed(f"handshake with {name} at {where} timed out") from None
        except _DialFailed:
            conn.close()
            raise
        except (_ProtocolError, OSError, _Closed) as e:
            conn.close()
            raise _DialFailed(f"handshake with {name} at {where} failed: {e}") from None
        except Exception as e:  # errors raised by the noise library on bad input
            conn.close()
            raise _DialFailed(f"handshake with {name} at {where} failed: {e!r}") from None
        except BaseException:  # cancelled (shutdown)
            conn.close()
            raise
        if not accepted or self._closing:
            conn.close()
            if self._closing:
                raise _DialFailed("network stopped")
            return None
        return self._install(peer, conn)

    async def _initiate(self, conn: _Conn, name: str, expected_key: bytes,
                        source: str = "directory") -> bool:
        noise = NoiseConnection.from_name(NOISE_PROTOCOL)
        noise.set_keypair_from_private_bytes(Keypair.STATIC, self.identity.private)
        noise.set_prologue(PROLOGUE)
        noise.set_as_initiator()
        noise.start_handshake()
        await conn.write_frame(noise.write_message())                      # -> e
        hs = noise.noise_protocol.handshake_state
        payload = noise.read_message(await conn.read_frame(HANDSHAKE_MAX))  # <- e, ee, s, es
        claimed, instance, _ = _parse_hello(payload)
        remote_key = hs.rs.public_bytes
        if claimed != name:
            log.warning("dialled %s at %s but it claims to be %r; refusing", name, conn.where,
                        claimed)
            raise _DialFailed(f"the node at {conn.where} claims to be {claimed!r}, not {name}")
        if remote_key != expected_key:
            log.warning("dialled %s at %s but its key does not match the %s (%s answered, %s expected); "
                        "refusing", name, conn.where, source, fingerprint(remote_key), fingerprint(expected_key))
            raise _DialFailed(f"{name} at {conn.where} did not prove the key the {source} holds: "
                              f"key {fingerprint(remote_key)} answered, {fingerprint(expected_key)} "
                              f"expected (an outdated entry, or another node at that address)")
        route = name in self.routers   # ask our router to serve us
        await conn.write_frame(noise.write_message(self._hello_route if route else self._hello))  # -> s, se
        conn.set_keys(noise)
        conn.peer_name, conn.instance = name, instance
        reply = msgpack.unpackb(conn.decrypt_frame(await conn.read_frame(NOISE_MAX)), raw=False)
        if not isinstance(reply, dict) or not isinstance(reply.get("accept"), bool):
            raise _ProtocolError("bad handshake reply")
        if route and reply["accept"]:
            routing = reply.get("routing")
            if routing == "ok":
                log.info("%s routes for us", name)
            else:
                self._report(name, f"{name} does not route for us: {routing or 'it is an older node'}")
        if not reply["accept"]:
            reason = str(reply.get("reason", ""))
            if reason == "duplicate":
                log.debug("%s rejected our connection as a duplicate", name)
                return False
            raise _DialFailed(f"{name} refused the connection: {reason}")
        return True

    # ---- accepting -------------------------------------------------------------------------------
    async def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, addr = await self._loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                log.warning("accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            host = addr[0][7:] if addr[0].startswith("::ffff:") and "." in addr[0] else addr[0]
            where = host_port(host, addr[1])  # an IPv4 peer of a dual-stack socket shown as IPv4
            if self._handshakes >= MAX_HANDSHAKES:
                log.warning("dropping connection from %s: too many unauthenticated connections",
                            where)
                sock.close()
                continue
            try:
                _tune(sock)
            except OSError:
                sock.close()
                continue
            conn = _Conn(self, sock, dialled=False, where=where)
            conn.source = _source_key(host)
            self._spawn(self._handle_incoming(conn))

    async def _handle_incoming(self, conn: _Conn, allow_relay: bool = True) -> None:
        self._handshakes += 1
        try:
            await self._handle_incoming_inner(conn, allow_relay)
        finally:
            self._handshakes -= 1
        if conn.relay_frame is not None and not conn.closed:
            self._spawn(self._on_relay_frame(conn))

    async def _handle_incoming_inner(self, conn: _Conn, allow_relay: bool) -> None:
        try:
            await asyncio.wait_for(self._respond(conn, allow_relay), self.handshake_timeout)
        except asyncio.TimeoutError:
            log.warning("dropping unauthenticated connection from %s: handshake timed out",
                        conn.where)
            conn.close()
        except _Closed:
            log.warning("dropping unauthenticated connection from %s: closed during handshake",
                        conn.where)
            conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as e:  # garbage, bad Noise messages, bad hello
            log.warning("dropping unauthenticated connection from %s: bad handshake (%s)",
                        conn.where, e or type(e).__name__)
            conn.close()
        if conn.pair_frame is not None and not conn.closed:   # also on a router's call-back
            self._spawn(self.pair_handler.serve(conn, conn.pair_frame))

    async def _respond(self, conn: _Conn, allow_relay: bool = True) -> None:
        first = await conn.read_frame(HANDSHAKE_MAX)
        if first.startswith(RELAY_MAGIC) and allow_relay:
            conn.relay_frame = first   # a relay request or call-back: handled after this
            return
        if self.pair_handler is not None and self.pair_handler.wants(first):
            conn.pair_frame = first    # a pairing exchange: handed over after this
            return
        noise = NoiseConnection.from_name(NOISE_PROTOCOL)
        noise.set_keypair_from_private_bytes(Keypair.STATIC, self.identity.private)
        noise.set_prologue(PROLOGUE)
        noise.set_as_responder()
        noise.start_handshake()
        noise.read_message(first)                                          # -> e
        await conn.write_frame(noise.write_message(self._hello))           # <- e, ee, s, es
        hs = noise.noise_protocol.handshake_state  # dropped by the library once the handshake ends
        payload = noise.read_message(await conn.read_frame(HANDSHAKE_MAX))  # -> s, se
        claimed, instance, route = _parse_hello(payload)
        remote_key = hs.rs.public_bytes
        conn.set_keys(noise)
        if claimed == self.our_name:
            log.warning("refused connection from %s claiming our own name %r", conn.where, claimed)
            conn.close()
            return
        rec = await asyncio.to_thread(self.directory.lookup, claimed)
        if rec is None or rec.public_key != remote_key:
            pf = self.directory.peers_file
            if rec is None:
                why = (f"{claimed} is not in {self.our_name}'s node directory"
                       + (" nor its peers file" if pf else " (and it has no peers file)"))
            else:
                why = (f"key does not match: {claimed} connected with key {fingerprint(remote_key)}, "
                       f"but {self.our_name}'s {rec.source} has {fingerprint(rec.public_key)} for it")
            log.warning("refused connection from %s claiming to be %r: %s", conn.where, claimed, why)
            self._reject(conn, why)
            return
        if self._closing:
            conn.close()
            return
        conn.peer_name, conn.instance = claimed, instance
        peer = self._peer(claimed)
        reason = self._judge_incoming(peer, conn)
        if reason is not None:
            log.debug("rejecting connection from %s: %s", claimed, reason)
            self._reject(conn, reason)
            return
        reply: dict = {"accept": True, "reason": ""}
        refusal = self._routing_refusal(claimed) if route else None
        if route:
            reply["routing"] = refusal or "ok"
        conn.send_now(conn.encrypt_frame(msgpack.packb(reply)))
        conn = self._install(peer, conn)
        if route and refusal is None:
            conn.route = True
            self._served[claimed] = conn
            log.info("routing for %s (%d nodes served)", claimed, len(self._served))
        elif route:
            log.warning("not routing for %s: %s", claimed, refusal)

    @staticmethod
    def _reject(conn: _Conn, reason: str) -> None:
        """Refuse an authenticated connection, telling the dialler why, and close it."""
        try:
            conn.send_now(conn.encrypt_frame(msgpack.packb({"accept": False, "reason": reason})))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()

    def _judge_incoming(self, peer: _Peer, conn: _Conn) -> Optional[str]:
        """Decide whether an authenticated incoming connection replaces or loses to what we have.

        None to accept it, or the reason to reject it. The rule is the same on both nodes, so
        they agree: between two live connections of one run, the one dialled by the node whose
        name sorts first wins. A connection from a restarted peer (new instance) always wins.
        """
        we_first = self.our_name < peer.name
        cur = peer.conn
        if cur is not None and not cur.closed:
            if cur.instance != conn.instance:
                self._drop(cur, "peer restarted")
                return None
            if cur.dialled and we_first:
                return "duplicate"
            # The peer dialled although we have a connection: it no longer uses that one.
            self._drop(cur, "replaced by a new connection from the peer")
            return None
        if peer.dialling and we_first:
            return "duplicate"  # our own dial wins; the peer will use it
        return None

    # ---- established connections -----------------------------------------------------------------
    def _install(self, peer: _Peer, conn: _Conn) -> _Conn:
        """Make ``conn`` the peer's connection and start reading it."""
        cur = peer.conn
        if cur is not None and not cur.closed and cur is not conn:
            # Only reachable through a race the accept/reject reply should prevent; stay consistent.
            if cur.instance == conn.instance and (cur.dialled == (self.our_name < peer.name)):
                log.debug("keeping existing connection to %s; closing the newer one", peer.name)
                conn.close()
                return cur
            self._drop(cur, "superseded")
        conn.established = True
        conn.grow()
        peer.conn = conn
        conn.reader_task = self._loop.create_task(self._read(conn))
        for fut in peer.waiters:
            if not fut.done():
                fut.set_result(conn)
        peer.waiters.clear()
        log.info("connected to %s (%s, %s)", peer.name, conn.where,
                 "dialled" if conn.dialled else "accepted")
        if peer.queue:
            peer.wake.set()
        return conn

    async def _read(self, conn: _Conn) -> None:
        try:
            await conn.read_loop()
        except asyncio.CancelledError:
            raise
        except _ProtocolError as e:
            log.warning("dropping connection to %s: %s", conn.label, e)
            self._drop(conn, str(e))
        except (_Closed, OSError) as e:
            self._drop(conn, str(e) or type(e).__name__)
        except Exception as e:
            log.exception("reading from %s failed", conn.label)
            self._drop(conn, repr(e))

    def _drop(self, conn: _Conn, reason: str) -> None:
        """Close ``conn``; if it was a peer's established connection, report the peer lost."""
        if conn.closed:
            return
        conn.close()
        if conn.reader_task is not None and conn.reader_task is not asyncio.current_task():
            conn.reader_task.cancel()
        if conn.route and self._served.get(conn.peer_name or "") is conn:
            del self._served[conn.peer_name or ""]
            log.info("no longer routing for %s: %s", conn.peer_name, reason)
        peer = self._peers.get(conn.peer_name) if conn.peer_name else None
        if peer is not None and peer.conn is conn:
            peer.conn = None
            if not self._closing:
                log.info("connection to %s lost: %s", conn.label, reason)
                _safe_call(self.on_peer_lost, peer.name)

    def _received(self, conn: _Conn, km: KernelMessage) -> None:
        if km.source.node != conn.peer_name:
            log.warning("dropped message from %s claiming source node %r", conn.label,
                        km.source.node)
            return
        if km.target.node != self.our_name:
            log.warning("dropped message from %s for another node %r", conn.label,
                        km.target.node)
            return
        _safe_call(self.on_message, km)

    # ---- routers: the indirect node's side ---------------------------------------------------------
    async def _keep_routers(self) -> None:
        """An indirect node keeps a connection to each of its routers, dialling again when one is lost."""
        while True:
            for name in self.routers:
                peer = self._peer(name)
                if (peer.conn is None or peer.conn.closed) and not peer.dialling and name not in self._keeping:
                    self._keeping.add(name)
                    self._spawn(self._reach_router(peer))
            await asyncio.sleep(ROUTER_RETRY)

    async def _reach_router(self, peer: _Peer) -> None:
        try:
            await self._dial(peer)
        except _DialFailed as e:
            if not self._closing:
                self._report(peer.name, f"{e} (it is one of our routers)")
        finally:
            self._keeping.discard(peer.name)

    def _control(self, conn: _Conn, wire: dict) -> None:
        """A control map from a peer (not a KernelMessage): a router asking us to call it back."""
        token, source = wire.get("token"), wire.get("from")
        if (wire.get("ctl") == "relay" and conn.peer_name in self.routers and isinstance(token, bytes)
                and isinstance(source, str)):
            # each call-back dials and starts a handshake for whoever asked the router: bounded,
            # and counted as an unauthenticated connection from the start
            if self._calling_back >= MAX_CALL_BACKS:
                refusal = f"{MAX_CALL_BACKS} call-backs already under way"
            elif self._handshakes >= MAX_HANDSHAKES:
                refusal = "too many unauthenticated connections"
            else:
                refusal = None
            if refusal is not None:
                log.warning("not calling %s back for a relayed connection from %s: %s",
                            conn.peer_name, source[:255], refusal)
                return
            self._calling_back += 1
            self._handshakes += 1
            self._spawn(self._call_back(conn.peer_name or "", token, source[:255]))
        else:
            log.warning("ignored a control message %r from %s (not one of our routers, or malformed)",
                        wire.get("ctl"), conn.label)

    async def _call_back(self, router: str, token: bytes, source: str) -> None:
        """Open the connection a router asked for; the peer behind it then handshakes with us as if
        it had dialled us (and is judged as any incoming peer is). `_control` counted it."""
        try:
            await self._call_back_inner(router, token, source)
        finally:
            self._calling_back -= 1
            self._handshakes -= 1

    async def _call_back_inner(self, router: str, token: bytes, source: str) -> None:
        try:
            rrec = await self._lookup(router)
            sock, where = await self._connect(rrec)
        except _DialFailed as e:
            log.warning("cannot call %s back for a relayed connection from %s: %s", router, source, e)
            return
        conn = _Conn(self, sock, dialled=False, where=f"{where} ({router} relaying)")
        try:
            await conn.write_frame(RELAY_MAGIC + msgpack.packb({"answer": token}))
        except (OSError, _Closed) as e:
            log.warning("cannot call %s back for a relayed connection from %s: %s", router, source, e)
            conn.close()
            return
        await self._handle_incoming_inner(conn, allow_relay=False)

    # ---- routers: the router's side ----------------------------------------------------------------
    def _routing_refusal(self, name: str) -> Optional[str]:
        """Why we will not serve `name` as its router, or None if we will."""
        if not self.is_router:
            return f"{self.our_name} is not a router (start it with --is-router)"
        live = {n for n, c in self._served.items() if not c.closed}
        if name not in live and len(live) >= self.router_max_nodes:
            return f"{self.our_name} already routes for its limit of {self.router_max_nodes} nodes"
        return None

    def _relay_refusal(self, target: str, source: str) -> Optional[str]:
        """Why we will not relay a dialler at address `source` to `target`, or None if we will."""
        if not self.is_router:
            return f"{self.our_name} is not a router"
        conn = self._served.get(target)
        if conn is None or conn.closed:
            return f"{target} is not connected to {self.our_name} as to its router"
        if self._waiting_from[source] >= MAX_PENDING_RELAYS_PER_SOURCE:
            return f"{source} already has {MAX_PENDING_RELAYS_PER_SOURCE} relay requests waiting"
        if self._relays_from[source] >= MAX_RELAYS_PER_SOURCE:
            return f"{self.our_name} relays its limit of {MAX_RELAYS_PER_SOURCE} sessions for {source}"
        if self._relays + len(self._pending_relays) >= MAX_RELAYS:
            return f"{self.our_name} relays its limit of {MAX_RELAYS} sessions"
        return None

    async def _on_relay_frame(self, conn: _Conn) -> None:
        """A connection that began with a relay frame: a peer asking us to relay it to a node we
        serve, or that node calling back for such a request."""
        frame = conn.relay_frame or b""
        if self.relay_tap is not None:
            self.relay_tap(memoryview(frame))
        msg = _parse_relay_frame(frame)
        if msg is not None and isinstance(msg.get("answer"), bytes):
            fut = self._pending_relays.pop(msg["answer"], None)
            if fut is None or fut.done():
                log.warning("dropping relay call-back from %s: unknown or expired token", conn.where)
                conn.close()
            else:
                fut.set_result(conn)
            return
        target, source = (msg or {}).get("relay"), (msg or {}).get("from")
        if not isinstance(target, str) or not isinstance(source, str):
            log.warning("dropping connection from %s: malformed relay frame", conn.where)
            conn.close()
            return
        source = source[:255]
        reason = self._relay_refusal(target, conn.source)
        if reason is not None:
            await self._refuse_relay(conn, source, target, reason)
            return
        self._relays_from[conn.source] += 1
        try:
            await self._relay(conn, source, target)
        finally:
            self._relays_from[conn.source] -= 1
            if self._relays_from[conn.source] <= 0:
                del self._relays_from[conn.source]

    async def _relay(self, conn: _Conn, source: str, target: str) -> None:
        """Have `target` call us back, then relay `conn` to it until either side ends."""
        other: Optional[_Conn] = None
        reason = ""
        token = secrets.token_bytes(16)
        fut = self._loop.create_future()
        self._pending_relays[token] = fut
        self._waiting_from[conn.source] += 1
        try:
            served = self._served[target]
            async with served.wlock:
                await served.send_payloads([msgpack.packb({"ctl": "relay", "token": token, "from": source})])
            other = await asyncio.wait_for(fut, RELAY_TIMEOUT)
        except asyncio.TimeoutError:
            reason = f"{target} did not call back within {RELAY_TIMEOUT:.0f} s"
        except (OSError, _Closed) as e:
            reason = f"{target}'s connection failed: {e}"
        finally:
            self._pending_relays.pop(token, None)
            self._waiting_from[conn.source] -= 1
            if self._waiting_from[conn.source] <= 0:
                del self._waiting_from[conn.source]
        if other is None:
            await self._refuse_relay(conn, source, target, reason)
            return
        try:
            await conn.write_frame(RELAY_MAGIC + msgpack.packb({"ok": True}))
        except (OSError, _Closed):
            conn.close()
            other.close()
            return
        log.info("relaying %s (%s) to %s", source, conn.where, target)
        await self._splice(conn, other, f"{source} -> {target}")

    async def _refuse_relay(self, conn: _Conn, source: str, target: str, reason: str) -> None:
        """Tell the dialler why we do not relay it, and close its connection."""
        log.warning("not relaying %s (%s) to %s: %s", source, conn.where, target, reason)
        try:
            await conn.write_frame(RELAY_MAGIC + msgpack.packb({"ok": False, "reason": reason}))
        except (OSError, _Closed):
            pass
        conn.close()

    async def _splice(self, a: _Conn, b: _Conn, what: str) -> None:
        """Copy bytes both ways until either side ends; then close both. What passes is the two
        ends' Noise session: we can neither read nor alter it undetected."""
        self._relays += 1
        copiers = [self._loop.create_task(self._copy(a, b)), self._loop.create_task(self._copy(b, a))]
        try:
            await asyncio.wait(copiers, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in copiers:
                t.cancel()
            await asyncio.gather(*copiers, return_exceptions=True)
            a.close()
            b.close()
            self._relays -= 1
            log.info("relay %s ended", what)

    async def _copy(self, src: _Conn, dst: _Conn) -> None:
        loop = self._loop
        leftover = bytes(src.rbuf[src.rstart:src.rend])  # read past the relay frame, if anything
        if leftover:
            if self.relay_tap is not None:
                self.relay_tap(memoryview(leftover))
            await loop.sock_sendall(dst.sock, leftover)
        buf = bytearray(RELAY_BUF)
        view = memoryview(buf)
        while True:
            n = await loop.sock_recv_into(src.sock, buf)
            if n == 0:
                return
            if self.relay_tap is not None:
                self.relay_tap(view[:n])
            if self.router_max_rate > 0:
                await self._throttle(n)
            await loop.sock_sendall(dst.sock, view[:n])

    async def _throttle(self, n: int) -> None:
        """Hold relayed bytes to router_max_rate over all sessions (a burst of a quarter second)."""
        now = self._loop.time()
        self._relay_clock = max(self._relay_clock, now) + n / self.router_max_rate
        wait = self._relay_clock - now - 0.25
        if wait > 0:
            await asyncio.sleep(wait)

    # ---- introspection ---------------------------------------------------------------------------
    def connected_peers(self) -> list:
        """Names of peers with an established connection (a snapshot; any thread)."""
        return sorted(name for name, p in list(self._peers.items())
                      if p.conn is not None and not p.conn.closed)

    def routing_status(self) -> list[str]:
        """Lines about routers for diagnostics: ours (connected or not), and whom we route for."""
        lines = []
        if self.routers:
            up = set(self.connected_peers())
            lines.append("our routers: " + ", ".join(f"{r} ({'connected' if r in up else 'not connected'})"
                                                    for r in self.routers))
        if self.is_router:
            served = sorted(n for n, c in list(self._served.items()) if not c.closed)
            lines.append(f"we route for {len(served)} nodes (limit {self.router_max_nodes})"
                         + (": " + ", ".join(served) if served else "")
                         + f"; {self._relays} relayed sessions")
        return lines

    def peer_activity(self) -> dict:
        """Seconds since each connected peer last sent us anything (a snapshot; any thread)."""
        if self._loop is None:
            return {}
        now = self._loop.time()
        return {name: max(0.0, now - p.conn.last_recv) for name, p in list(self._peers.items())
                if p.conn is not None and not p.conn.closed}


def _listen(addr: str, port: int, dual_stack: bool) -> socket.socket:
    """A listening socket on `addr` (an IPv4 or IPv6 address or a name; "::" also takes IPv4
    when `dual_stack`); OSError naming the address if it cannot be had."""
    try:
        infos = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, type_, proto)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e} (address {addr})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            wildcard = sockaddr[0] == "::"
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if wildcard and dual_stack else 1)
        sock.bind(sockaddr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"{e.strerror or e} ({host_port(addr, port)})") from None
    return sock


def _parse_hello(payload: bytes) -> tuple:
    try:
        hello = msgpack.unpackb(bytes(payload), raw=False)
    except Exception as e:
        raise _ProtocolError(f"undecodable handshake payload ({e})") from None
    if not isinstance(hello, dict) or hello.get("v") != 1:
        raise _ProtocolError("bad handshake payload")
    name, instance = hello.get("name"), hello.get("instance")
    if not isinstance(name, str) or not name or len(name) > 255:
        raise _ProtocolError("bad node name in handshake payload")
    if not isinstance(instance, bytes) or len(instance) != INSTANCE_LEN:
        raise _ProtocolError("bad instance in handshake payload")
    return name, instance, hello.get("route") is True


def _source_key(host: str) -> str:
    """What relay limits count a dialler by: its IPv4 address, or its IPv6 /64 (one host's usual share)."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return host


def _parse_relay_frame(frame: bytes) -> Optional[dict]:
    """The map a relay frame carries, or None if it is no relay frame."""
    if not frame.startswith(RELAY_MAGIC):
        return None
    try:
        msg = msgpack.unpackb(frame[len(RELAY_MAGIC):], raw=False)
    except Exception:
        return None
    return msg if isinstance(msg, dict) else None


def _safe_call(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("network callback %r failed", fn)


# ---- command-line helpers ------------------------------------------------------------------------
def listen_addresses(bind: Optional[Sequence[str]], peers_file: Optional[Path]) -> list[str]:
    """The addresses to listen on: `--bind` values (each may be a comma list; IPv6 with or without
    brackets), else loopback only, or every address (IPv4 and IPv6) for a node with a peers file,
    which expects nodes on other machines."""
    if bind:
        addrs = [a.strip() for item in bind for a in item.split(",") if a.strip()]
        return [a[1:-1] if a.startswith("[") and a.endswith("]") else a for a in addrs]
    if peers_file is not None:
        return ["::"] if socket.has_dualstack_ipv6() else ["0.0.0.0"]
    return ["127.0.0.1"]


def id_command(argv: list[str]) -> int:
    """`python -m host id`: print this node's peers-file entry without starting the node."""
    import argparse
    import json
    import sys
    from host.net.directory import parse_host_port
    from host.settings import DEFAULT_HOME
    p = argparse.ArgumentParser(
        prog="python -m host id",
        description="Print this node's entry for other nodes' peers files, as JSON, without starting it. "
                    "The key is HOME/.keys/networking.key, created now if the home has none yet "
                    "(the node uses the same key when it starts).")
    p.add_argument("--home", type=Path, default=DEFAULT_HOME, help=f"the node's home (default {DEFAULT_HOME})")
    p.add_argument("--node", metavar="NAME", default=None,
                   help="the node's name (default: the name the node last ran with in this home)")
    p.add_argument("--advertise", metavar="HOST[:PORT]", default=None,
                   help="the address other nodes should dial (default: this machine's hostname); "
                        "give the port if the node does not use the default 8080")
    p.add_argument("--router", action="append", default=None, metavar="NODE", dest="routers",
                   help="an indirect node: other nodes reach it through NODE (repeatable, as the node's "
                        "own --router); the entry then has no address unless --advertise gives one")
    args = p.parse_args(argv)
    name = args.node
    if name is None:
        try:  # the node writes "NAME, pid N" into its lock file when it runs
            name = (args.home / ".node.lock").read_text().split(",")[0].strip() or None
        except OSError:
            pass
    if name is None:
        p.error(f"no node has run with home {args.home} yet: give its name with --node NAME")
    try:
        host, port = parse_host_port(args.advertise, 8080) if args.advertise else (None, 8080)
    except ValueError as e:
        p.error(f"--advertise {e}")
    routers = tuple(dict.fromkeys(args.routers or ()))
    if name in routers:
        p.error("a node cannot be its own --router")
    if host is None and not routers:
        host = socket.gethostname()
        print(f"note: no --advertise given; using this machine's hostname {host!r}", file=sys.stderr)
    identity = load_or_create_identity(args.home)
    print(json.dumps(peers_entry(name, identity.public, host, port if host else None, routers)))
    return 0
