"""The Noise connection between two nodes: raw non-blocking socket I/O on the network loop, the
``Noise_XX_25519_AESGCM_BLAKE2s`` handshake's framing, transport encryption and the KernelMessage
stream parser. See host/net/network.py for the protocol.

Wire format (all integers big-endian)::

    noise message := u16 length, ciphertext          (length <= 65535)
    handshake     := XX message 1, 2, 3, then one transport message from the responder:
                     msgpack {"accept": bool, "reason": str}
    plaintext     := (u32 length, msgpack(KernelMessage.to_wire()))*  split over transport messages

Handshake payload (messages 2 and 3): msgpack ``{"v": 1, "name": str, "instance": 16 bytes}``, plus
``"compress": ["zstd"]`` from a node that takes compressed blobs (and ``"route": true`` from an
indirect node to its router). Unknown keys are ignored, so an older node simply does not announce.

Compressed blobs: only on a connection where both hellos announced ``"zstd"``, a message whose blob
was worth compressing (host/net/compress.py) carries ``"z": N`` (the blob's size) just before
``"blob": [mime, zstd frame]``; the frame states its content size N, at most MAX_MESSAGE. The u32
length and MAX_MESSAGE's check on it apply to the message as sent; a frame that does not inflate to
exactly N is a protocol error (the connection is dropped), and so is a frame stating more than
host/net/compress.py's ratio cap allows for its length.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import struct
import sys
from typing import Protocol

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from noise.connection import NoiseConnection

from host.messages import KernelMessage, ParseError
from host.net.compress import CompressError, compress_blob, decompress_blob

log = logging.getLogger(__name__)

MAX_MESSAGE = 10_485_800
"""Largest encoded (MessagePack) KernelMessage accepted, as in Kinode."""

NOISE_PROTOCOL = b"Noise_XX_25519_AESGCM_BLAKE2s"
PROLOGUE = b"kinode-py net v1"
NOISE_MAX = 65535          # largest Noise message
TAG = 16                   # AES-GCM tag
CHUNK = NOISE_MAX - TAG    # plaintext bytes per transport message
HANDSHAKE_MAX = 4096       # largest handshake message we accept from an unauthenticated socket
INSTANCE_LEN = 16
OUT_KEEP = 2 << 20         # a connection's output buffer, at most: a batch is encrypted into it and written a buffer at a time
HANDSHAKE_BUF = 2 * (NOISE_MAX + 2)        # receive buffer while unauthenticated
RECV_BUF = (1 << 20) + 2 * (NOISE_MAX + 2)  # receive buffer once established
MAX_HANDSHAKES = 256       # concurrent unauthenticated connections; more are closed at once
MAX_HANDSHAKES_PER_SOURCE = 16  # of those, from one address (an IPv6 /64): one cannot take them all
SOCK_BUF = 4 << 20
INFLATE_TURN = MAX_MESSAGE  # bytes a connection may inflate before the loop serves other connections

_NONCE = struct.Struct(">4xQ")  # Noise AESGCM nonce: 32 zero bits + 64-bit big-endian counter
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class Split:
    """An encoded KernelMessage whose big blob is kept as its own segment: the msgpack head ends
    with the blob's bin32 header, so head + blob is exactly what `packb` would give, without
    copying megabytes into a new bytes object only to encrypt them from there. `raw_size` is the
    message's size uncompressed when its blob is a zstd frame, else None."""
    __slots__ = ("parts", "size", "raw_size")

    def __init__(self, head: bytes, blob: bytes, raw_size: int | None = None):
        self.parts = (head, blob)
        self.size = len(head) + len(blob)
        self.raw_size = raw_size

    def __len__(self) -> int:
        return self.size

    def joined(self) -> bytes:
        return b"".join(self.parts)


SPLIT_BLOB_MIN = 1 << 16   # msgpack encodes a bin this long with a bin32 header


def _split(wire: dict, mime: str | None, data: bytes, raw_size: int | None = None) -> Split:
    wire["blob"] = [mime, b""]             # the blob is the last thing packed: b"" ends the head
    head = msgpack.packb(wire)
    return Split(head[:-2] + b"\xc6" + _U32.pack(len(data)), data, raw_size)


def encode(km: KernelMessage, compress: bool = False) -> bytes | Split:
    """The message as sent; with `compress`, its big blob as a zstd frame if a sample says that pays
    (on the caller's thread: zstd releases the GIL, the network loop goes on meanwhile). A message
    over MAX_MESSAGE is never compressed: the sender refuses it by its raw size."""
    wire = km.to_wire()
    blob = wire["blob"]
    if blob is None or len(blob[1]) < SPLIT_BLOB_MIN:
        return msgpack.packb(wire)
    mime, data = blob
    raw = _split(wire, mime, data)
    if not compress or len(raw) > MAX_MESSAGE:
        return raw
    frame = compress_blob(data)
    if frame is None:
        return raw
    del wire["blob"]
    wire["z"] = len(data)                  # before the blob, which must stay last
    return _split(wire, mime, frame, len(raw))


def decompressed(payload: Split) -> Split:
    """A compressed message as it was before compression (for a connection that does not take it:
    the peer came back without compression between queueing and sending)."""
    wire = msgpack.unpackb(payload.joined(), raw=False)
    size = wire.pop("z")
    mime, frame = wire.pop("blob")
    return _split(wire, mime, decompress_blob(frame, size, MAX_MESSAGE))




# ---- receiving a big blob in place -------------------------------------------------------------
# A message with a big blob is received without zeroing a buffer for it and without msgpack copying
# the blob out: its first bytes (the head, ending with the blob's bin32 header) are read apart, then
# the rest is decrypted straight into the `bytes` object that becomes the blob.
SPLIT_RECV_MIN = 1 << 20   # messages this long are received so
HEAD_PEEK = 16 << 10       # bytes read apart to find the head in; a longer head takes the plain path


def _uninit_bytes_api():
    """CPython's PyBytes_FromStringAndSize(NULL, n): a new bytes object whose content is ours to fill
    before anyone else sees it; None elsewhere (the plain path is used)."""
    if sys.implementation.name != "cpython":
        return None
    proto = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)
    try:  # a prototype of our own: ctypes.pythonapi's shared attribute is left as it is
        return proto(("PyBytes_FromStringAndSize", ctypes.pythonapi))
    except AttributeError:
        return None


_new_bytes = _uninit_bytes_api()
_BYTES_DATA = bytes.__basicsize__ - 1   # offset of a bytes object's first byte (ob_sval)


def fresh_bytes(n: int) -> tuple[bytes, memoryview]:
    """A new bytes object of `n` bytes, not yet filled, and a writable view of its content; the
    caller fills it all before the object leaves its hands."""
    assert _new_bytes is not None
    b = _new_bytes(None, n)
    return b, memoryview((ctypes.c_char * n).from_address(id(b) + _BYTES_DATA)).cast("B")


def split_head(head: bytes | bytearray | memoryview, size: int) -> tuple[dict, int] | None:
    """Where a message of `size` bytes starting with `head` has its blob, if it ends with it.

    Returns (the message decoded with the blob left empty, the blob's offset), or None. A candidate
    position p holds a bin32 header whose length reaches exactly the message's end; it is taken
    only if `head[:p]` followed by an empty bin decodes to a complete map whose ["blob"][1] is that
    bin (checked again with a one-byte bin): msgpack decodes left to right, so the whole message
    then decodes to the same map with the blob in that place."""
    raw = bytes(head)
    p = raw.find(b"\xc6")
    while 0 <= p <= len(raw) - 5:
        if _U32.unpack_from(raw, p + 1)[0] == size - p - 5:
            try:
                wire = msgpack.unpackb(raw[:p] + b"\xc4\x00", raw=False)
                probe = msgpack.unpackb(raw[:p] + b"\xc4\x01\x00", raw=False)
                if wire["blob"][1] == b"" and probe["blob"][1] == b"\x00":
                    return wire, p + 5
            except Exception:  # not the blob's header after all (msgpack raises several types)
                pass
        p = raw.find(b"\xc6", p + 1)
    return None


# ---- connections ---------------------------------------------------------------------------------
class ProtocolError(Exception):
    """The peer broke the protocol; its connection is dropped."""


class DialFailed(Exception):
    pass


class Closed(ConnectionError):
    pass


def tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt in ((socket.SO_SNDBUF, socket.SO_RCVBUF) if SOCK_BUF else ()):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass



class ConnOwner(Protocol):
    """What a connection tells about what it reads: the network service."""
    _loop: asyncio.AbstractEventLoop

    def _control(self, conn: Conn, wire: dict) -> None: ...

    def _received(self, conn: Conn, km: KernelMessage, size: int) -> None: ...

    async def _held(self, conn: Conn) -> None: ...


class Conn:
    """One TCP connection: raw non-blocking I/O on the loop, Noise framing, message parsing."""

    def __init__(self, net: ConnOwner, sock: socket.socket, dialled: bool, where: str):
        self.net = net
        self.loop = net._loop
        self.sock = sock
        self.fd = sock.fileno()
        self.dialled = dialled          # True if we dialled it
        self.where = where              # remote address, for logs
        self.peer_name: str | None = None
        self.instance: bytes | None = None
        self.established = False
        self.closed = False
        self._rfut: asyncio.Future | None = None
        self._wfut: asyncio.Future | None = None
        self.reader_task: asyncio.Task | None = None
        # receive buffer of whole/partial Noise messages (small until authenticated)
        self.rbuf = bytearray(HANDSHAKE_BUF)
        self.rmv = memoryview(self.rbuf)
        self.rstart = self.rend = 0
        # transport ciphers (after the handshake)
        self.enc: AESGCM | None = None
        self.dec: AESGCM | None = None
        self.enc_n = self.dec_n = 0
        # KernelMessage stream parser state
        self.hdr = bytearray(4)
        self.hlen = 0
        self.body: bytearray | None = None
        self.body_mv: memoryview | None = None   # where the message's next bytes go
        self.size = 0                            # the length of the message being received
        self.have = 0
        self.peek = False               # body holds a big message's first bytes (see split_head)
        self.split: dict | None = None  # a big message's head, decoded, while its blob arrives
        self.blob: bytes | None = None  # ... and the blob being filled (body_mv is its view)
        self.scratch: memoryview | None = None
        self.out = bytearray(0)
        # liveness: when bytes last arrived and were last written; one writer at a time
        self.last_recv = self.last_sent = self.loop.time()
        self.wlock = asyncio.Lock()
        self.pinging = False
        self.route = False              # the peer asked us (a router) to serve it on this connection
        self.relay_frame: bytes | None = None  # the first frame, when it asked for a relay
        self.pair_frame: bytes | None = None   # the first frame, when it began a pairing
        self.source = where             # the remote address (an IPv6 /64) that relay limits count by
        self.held: object = None        # set while the peer's messages wait to be taken: stop reading
        self.zstd = False               # both ends announced compressed blobs in their hellos
        self.relayed = False            # the bytes go through a router: `where` is the router's socket
        self.rest: bytes | None = None  # a frame's plaintext not yet parsed, kept while held (see _feed)
        self.inflated = 0               # bytes inflated since this reader last paused (see _pause)

    def __repr__(self) -> str:
        return f"<conn {self.peer_name or '?'} {self.where} {'out' if self.dialled else 'in'}>"

    @property
    def label(self) -> str:
        return f"{self.peer_name} ({self.where})" if self.peer_name else self.where

    # ---- raw I/O ---------------------------------------------------------------------------------
    async def _wait_io(self, write: bool) -> None:
        if self.closed:
            raise Closed("connection closed")
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

    async def sendall(self, data: memoryview | bytes) -> None:
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
            raise Closed("could not write handshake reply")

    async def _fill(self) -> None:
        """Read more bytes into the receive buffer; raises Closed at end of stream."""
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
                raise Closed("closed by peer")
            self.rend += n
            self.last_recv = self.loop.time()
            return

    def _next_frame(self) -> memoryview | None:
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
                    raise ProtocolError(f"handshake message of {size} bytes (limit {limit})")
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
                self._rfut.set_exception(Closed("connection closed"))
        if self._wfut is not None:
            self.loop.remove_writer(self.fd)
            if not self._wfut.done():
                self._wfut.set_exception(Closed("connection closed"))
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
        assert self.enc is not None, "encrypting before the handshake set the keys"
        ct = self.enc.encrypt(_NONCE.pack(self.enc_n), plaintext, None)
        self.enc_n += 1
        return _U16.pack(len(ct)) + ct

    def decrypt_frame(self, frame: bytes) -> bytes:
        assert self.dec is not None, "decrypting before the handshake set the keys"
        try:
            pt = self.dec.decrypt(_NONCE.pack(self.dec_n), frame, None)
        except InvalidTag:
            raise ProtocolError("decryption failed") from None
        self.dec_n += 1
        return pt

    async def send_payloads(self, payloads: list) -> None:
        """Frame, encrypt and write encoded KernelMessages (one write per OUT_KEEP bytes of the batch)."""
        segs: list = []
        total = 0
        for p in payloads:
            segs.append(_U32.pack(len(p)))
            if isinstance(p, Split):
                segs.extend(p.parts)
            else:
                segs.append(p)
            total += 4 + len(p)
        need = min(total + -(-total // CHUNK) * (2 + TAG), OUT_KEEP)
        if len(self.out) < need:
            self.out = bytearray(max(need, min(OUT_KEEP, 2 * len(self.out))))
        out = memoryview(self.out)
        enc, pack_nonce = self.enc, _NONCE.pack
        assert enc is not None, "sending before the handshake set the keys"
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
            if pos + 2 + c + TAG > len(out):   # the buffer is full: write it, then fill it again
                self.enc_n = n
                await self.sendall(out[:pos])
                pos = 0
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
                if self.held is not None or self.rest is not None or self.inflated > INFLATE_TURN:
                    await self._pause()
                frame = self._next_frame()
            await self._fill()

    async def _pause(self) -> None:
        """Held: read on once processes take the peer's messages; else, after much inflating, let
        the loop serve other connections first. Then parse the rest of the frame, which may stop
        again."""
        while True:
            if self.held is not None:    # back-pressure
                await self.net._held(self)
            else:
                await asyncio.sleep(0)
            self.inflated = 0
            rest, self.rest = self.rest, None
            if rest is not None:
                self._feed(memoryview(rest))
            if self.held is None and self.rest is None:
                return

    def _on_frame(self, frame: memoryview) -> None:
        size = len(frame)
        if size < TAG:
            raise ProtocolError(f"short transport message ({size} bytes)")
        plain = size - TAG
        nonce = _NONCE.pack(self.dec_n)
        into, dec, scratch = self.body_mv, self.dec, self.scratch
        assert dec is not None and scratch is not None, "a frame before the handshake set the keys"
        try:
            if into is not None and plain <= len(into) - self.have:
                # the common case for large messages: decrypt straight into the message buffer
                dec.decrypt_into(nonce, frame, None, into[self.have:self.have + plain])
                self.dec_n += 1
                self.have += plain
                if self.have == len(into):
                    self._complete()
                return
            dec.decrypt_into(nonce, frame, None, scratch[:plain])
        except InvalidTag:
            raise ProtocolError("decryption failed") from None
        self.dec_n += 1
        self._feed(scratch[:plain])

    def _feed(self, mv: memoryview) -> None:
        """Parse a frame's plaintext. One frame may hold hundreds of small messages, each of which
        may inflate to a megabyte: stop after a message that holds the peer back or passes the
        inflating budget, keeping the rest in `rest` until `_pause` lets it go on."""
        pos, end = 0, len(mv)
        while pos < end:
            if self.body_mv is None:   # between messages: the next one's length
                take = min(4 - self.hlen, end - pos)
                self.hdr[self.hlen:self.hlen + take] = mv[pos:pos + take]
                self.hlen += take
                pos += take
                if self.hlen == 4:
                    self.hlen = 0
                    size = _U32.unpack(self.hdr)[0]
                    if size > MAX_MESSAGE:
                        raise ProtocolError(f"declared message length {size} > {MAX_MESSAGE}")
                    if size == 0:
                        raise ProtocolError("empty message")
                    self.peek = size >= SPLIT_RECV_MIN and _new_bytes is not None
                    self.body = bytearray(HEAD_PEEK if self.peek else size)
                    self.body_mv = memoryview(self.body)
                    self.size = size
                    self.have = 0
            else:
                into = self.body_mv
                assert into is not None
                take = min(len(into) - self.have, end - pos)
                into[self.have:self.have + take] = mv[pos:pos + take]
                self.have += take
                pos += take
                if self.have == len(into):
                    self._complete()
                    if (self.held is not None or self.inflated > INFLATE_TURN) and pos < end:
                        self.rest = bytes(mv[pos:end])
                        return

    def _complete(self) -> None:
        """The buffer being filled is full: a whole message, or a big one's first bytes."""
        if self.split is not None:
            self._deliver_split()
        elif self.peek:
            self._peeked()
        else:
            self._deliver()

    def _peeked(self) -> None:
        """A big message's first bytes are in: receive its blob in place if it ends with one, else
        the whole message into one buffer as any other."""
        head = self.body
        assert head is not None
        self.peek = False
        found = split_head(head, self.size)
        if found is None:
            self.body = bytearray(self.size)
            self.body_mv = memoryview(self.body)
            self.body_mv[:len(head)] = head
            return
        self.split, at = found
        self.blob, self.body_mv = fresh_bytes(self.size - at)
        self.have = len(head) - at
        self.body_mv[:self.have] = memoryview(head)[at:]
        self.body = None

    def _deliver_split(self) -> None:
        wire, blob = self.split, self.blob
        assert wire is not None and blob is not None
        self.split = self.blob = self.body = self.body_mv = None
        self.have = 0
        wire["blob"][1] = blob
        self._deliver_wire(wire, self.size)

    def _deliver(self) -> None:
        body = self.body
        assert body is not None
        self.body = self.body_mv = None
        self.have = 0
        try:
            wire = msgpack.unpackb(body, raw=False)
        except Exception as e:  # msgpack raises several unrelated types
            raise ProtocolError(f"undecodable MessagePack ({e})") from None
        self._deliver_wire(wire, len(body))

    def _deliver_wire(self, wire, size: int) -> None:
        if not isinstance(wire, dict):
            raise ProtocolError(f"message is a {type(wire).__name__}, not a map")
        if "ctl" in wire:
            self.net._control(self, wire)
            return
        if "z" in wire:
            size = self._inflate(wire, size)
        try:
            km = KernelMessage.from_wire(wire)
        except (ParseError, ValueError, TypeError, KeyError) as e:
            raise ProtocolError(f"bad kernel message ({e})") from None
        self.net._received(self, km, size)

    def _inflate(self, wire: dict, size: int) -> int:
        """Replace a compressed blob by its bytes; the message's size as it was before compression."""
        if not self.zstd:
            raise ProtocolError("compressed blob on a connection that did not negotiate compression")
        raw_size, blob = wire.pop("z"), wire.get("blob")
        if not isinstance(raw_size, int) or not isinstance(blob, list) or len(blob) != 2 \
                or not isinstance(blob[1], bytes):
            raise ProtocolError("malformed compressed blob")
        frame = blob[1]
        self.inflated += raw_size
        try:
            blob[1] = decompress_blob(frame, raw_size, MAX_MESSAGE)
        except CompressError as e:
            raise ProtocolError(f"refused compressed blob: {e}") from None
        return size - len(frame) + raw_size


def parse_hello(payload: bytes) -> tuple:
    """(name, instance, asks to be routed, takes compressed blobs) from a peer's handshake payload."""
    try:
        hello = msgpack.unpackb(bytes(payload), raw=False)
    except Exception as e:
        raise ProtocolError(f"undecodable handshake payload ({e})") from None
    if not isinstance(hello, dict) or hello.get("v") != 1:
        raise ProtocolError("bad handshake payload")
    name, instance = hello.get("name"), hello.get("instance")
    if not isinstance(name, str) or not name or len(name) > 255:
        raise ProtocolError("bad node name in handshake payload")
    if not isinstance(instance, bytes) or len(instance) != INSTANCE_LEN:
        raise ProtocolError("bad instance in handshake payload")
    compress = hello.get("compress")
    zstd = isinstance(compress, list) and "zstd" in compress
    return name, instance, hello.get("route") is True, zstd

