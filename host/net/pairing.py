"""Pairing two nodes with a short code: a password-authenticated key exchange (SPAKE2), as
magic-wormhole does, over one short-lived TCP connection.

`pair` on node A makes a code such as ``7-guitar-ocean``: a number and two words from WORDS,
valid ``CODE_LIFETIME`` seconds and for one pairing. `pair CODE` on node B dials A and both run
SPAKE2 with the code as the password; each side then proves it holds the same key and sends its
identity (name, networking key, net port) sealed with it. An eavesdropper learns nothing, and an
attacker gets one guess per connection: A counts every exchange begun as a try and the code stops
working after ``MAX_TRIES``: a few guesses at the two words (16 bits; the number is shown on the
LAN, see host/net/discovery.py) per code. Each side pins the other's name and key in its peers
file (A before it sends its own identity, since B may connect as soon as it has it); from then on
the Noise handshake (host/net/network.py) checks that key on every connection. Nothing here
trusts a key that did not come through the code.

Through a router: a node behind NAT (started with --router) shows a code and names its router;
the other node types `pair CODE NODE via ROUTER`, sends the router network.py's relay request
first, and the exchange runs on the connection the router splices to the indirect node's
call-back. Each side then pins the indirect node with its routers, the other at its address.

Transport: the exchange runs on the node's own net port, on a connection whose first frame starts
with ``PAIR_MAGIC`` instead of a Noise message (as a relay request starts with RELAY_MAGIC), so
network.py only hands such a connection over (a few lines there). A separate port would leave
network.py untouched but would be a second port for users to open in a firewall or forward
through a NAT, and a second address for `pair CODE HOST:PORT` to know; the net port is the one
already announced on the LAN and written in peers files.

Wire (frames are u16 length + bytes, as the Noise messages' framing; bodies are msgpack maps):

    B -> A   PAIR_MAGIC + {"v": 1, "spake": SPAKE2 message of side B}
    A -> B   {"spake": SPAKE2 message of side A, "confirm": HMAC}          or {"error": text}
    B -> A   {"confirm": HMAC, "box": B's identity sealed}                 or {"fail": "wrong code"}
    A -> B   {"box": A's identity sealed}                                  or {"error": text}

The protocol is a pair of sans-I/O state machines (`Joiner`, `HolderSession`): bytes in, `Step`
out (frames to send, the peer's identity when done, or an error). `Pairing` drives them, A's side
on the network loop and B's on a blocking socket in a thread of its own.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B

log = logging.getLogger("host.net.pairing")

PAIR_MAGIC = b"kinode-py pair\x00\x00"  # a Noise message 1 is 32 random bytes; a relay frame has its own magic
CODE_LIFETIME = 600.0      # seconds a code may be used
MAX_TRIES = 3              # exchanges begun with one code before it stops working
FRAME_MAX = 4096           # largest pairing frame accepted
EXCHANGE_TIMEOUT = 20.0    # seconds either side waits for the other's next message
DIAL_TIMEOUT = 5.0
REFUSAL_TOLD_EVERY = 5.0   # seconds between terminal lines about refused pairing requests
KEY_LEN = 32
ID_HOLDER, ID_JOINER = b"kinode-py pair: shows the code", b"kinode-py pair: types the code"
_U16 = struct.Struct(">H")
_ZERO_NONCE = bytes(12)    # each sealing key seals one message

WORDS = tuple("""
    acid acorn actor adobe agent alarm album alley amber angle ankle apple apron arena arrow aspen
    atlas attic autumn award bacon badge bagel baker bamboo banjo barn basil basket beach beard
    beetle bell berry bison blade blanket bloom board boat bottle brain brass bread brick bridge
    broom brush bucket bugle button cabin cactus camel candle canoe canvas carpet carrot castle
    cedar chalk cherry chess circle citrus clock cloud clover cobalt cocoa comet copper coral
    cotton cougar crane crayon cricket crown crystal cube daisy dance delta denim desert diary
    dingo dolphin donkey dragon drum eagle echo elbow ember engine falcon feather fern fiddle flame
    flute forest fossil fox galaxy garden garlic gecko geyser ginger glacier globe goose grape
    gravel guitar hammer harbor harp hazel helmet heron hill honey hornet igloo island ivory jacket
    jaguar jasmine jelly jigsaw jungle kayak kettle kiwi koala ladder lagoon lamp lantern lava
    lemon lily lion lizard magnet mango maple marble meadow melon meteor mint mirror mitten monkey
    moose muffin nectar needle nest nickel noodle nutmeg oasis ocean olive onion orange orbit
    orchid otter owl paddle panda paper parrot peach pebble pencil pepper piano pickle pillow pine
    planet plum pocket pony potato pretzel pumpkin puzzle quartz quill rabbit radar radish raven
    ribbon river robin rocket saddle salmon sandal saturn scarf shadow shell silver sketch sled
    spider spoon spruce squash stone sugar summit sunset swan table tango teapot temple thunder
    tiger timber toast tomato topaz torch trumpet tulip turtle valley velvet violin volcano wagon
    walnut walrus whale willow window winter wizard yogurt zebra zipper
""".split())
CODE_RE = re.compile(r"^([1-9][0-9]?)-([a-z]+)-([a-z]+)$")


class PairingError(Exception):
    """A pairing that cannot go on; the text is for the user."""


# ---- codes --------------------------------------------------------------------------------------
def new_code() -> str:
    """A fresh code: a number from 1 to 99 and two words, e.g. ``7-guitar-ocean``."""
    return f"{secrets.randbelow(99) + 1}-{secrets.choice(WORDS)}-{secrets.choice(WORDS)}"


def parse_code(text: str) -> str:
    """The code in its one spelling (lower case, dashes), or ValueError saying what a code is."""
    code = "-".join(text.strip().lower().replace("_", "-").split()).replace("--", "-")
    m = CODE_RE.match(code)
    if m is None or m.group(2) not in WORDS or m.group(3) not in WORDS:
        raise ValueError(f"{text.strip()!r} is not a pairing code: `pair` on the other node shows one, "
                         f"a number and two words such as 7-guitar-ocean")
    return code


def code_number(code: str) -> int:
    return int(code.split("-", 1)[0])


# ---- identities ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    """What each side tells the other: its name, networking key and net port; the host it
    advertises (`host_given`: by --advertise; else its bind address or hostname, used only when
    the exchange came through a router: a direct one shows the address that really worked); and,
    for an indirect node, its routers (then it is pinned with them, as `python -m host id
    --router` writes it)."""
    name: str
    public_key: bytes
    port: int
    host: str | None = None
    host_given: bool = False
    routers: tuple[str, ...] = ()

    def pack(self) -> bytes:
        return msgpack.packb({"name": self.name, "key": self.public_key, "port": self.port, "host": self.host,
                              "host_given": self.host_given, "routers": list(self.routers)})

    def address(self, seen: str, relayed: bool) -> str:
        """The host to pin for this peer, which connected from (or was dialled at) `seen`."""
        if self.host and (self.host_given or relayed):
            return self.host
        return seen

    @staticmethod
    def unpack(data: bytes) -> Peer:
        try:
            d = msgpack.unpackb(data, raw=False)
        except Exception:
            raise PairingError("the other node's identity is not readable") from None
        if not isinstance(d, dict):
            raise PairingError("the other node's identity is not readable")
        name, key, port, host = d.get("name"), d.get("key"), d.get("port"), d.get("host")
        routers = d.get("routers") or []
        if not isinstance(name, str) or not name or len(name) > 255 or not name.isprintable() or "," in name:
            raise PairingError("the other node sent an unusable name")
        if not isinstance(key, bytes) or len(key) != KEY_LEN:
            raise PairingError("the other node sent an unusable key")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise PairingError("the other node sent an unusable port")
        if host is not None and (not isinstance(host, str) or not host or len(host) > 255):
            raise PairingError("the other node sent an unusable address")
        if not isinstance(routers, list) or len(routers) > 16 or not all(
                isinstance(r, str) and r and len(r) <= 255 and "," not in r and r != name for r in routers):
            raise PairingError("the other node sent unusable routers")
        return Peer(name, key, port, host, d.get("host_given") is True, tuple(routers))


@dataclass
class Step:
    """What a state machine wants done after an input: send these frames, then (if set) report
    the peer paired or the error. Either ends the exchange."""
    send: list = field(default_factory=list)
    peer: Peer | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.peer is not None or self.error is not None


class _Keys:
    """The keys both sides derive from SPAKE2's shared key, one per purpose and side."""

    def __init__(self, shared: bytes):
        def derive(label: bytes) -> bytes:
            return HKDF(hashes.SHA256(), 32, salt=None, info=b"kinode-py pair v1 " + label).derive(shared)
        self.confirm_holder, self.confirm_joiner = derive(b"confirm holder"), derive(b"confirm joiner")
        self.box_holder, self.box_joiner = derive(b"box holder"), derive(b"box joiner")

    @staticmethod
    def mac(key: bytes) -> bytes:
        return hmac.new(key, b"confirm", hashlib.sha256).digest()

    @staticmethod
    def seal(key: bytes, peer: Peer) -> bytes:
        return AESGCM(key).encrypt(_ZERO_NONCE, peer.pack(), None)

    @staticmethod
    def open(key: bytes, box: object) -> Peer:
        if not isinstance(box, bytes):
            raise PairingError("the other node's identity is missing")
        try:
            data = AESGCM(key).decrypt(_ZERO_NONCE, box, None)
        except Exception:
            raise PairingError("the other node's identity did not decrypt") from None
        return Peer.unpack(data)


def _body(frame: bytes) -> dict:
    try:
        d = msgpack.unpackb(frame, raw=False)
    except Exception:
        d = None
    if not isinstance(d, dict):
        raise PairingError("the other side does not speak the pairing protocol")
    return d


def _pack(d: dict) -> bytes:
    return msgpack.packb(d)


WRONG_CODE = "wrong pairing code"


# ---- node A: shows the code ---------------------------------------------------------------------
class CodeHolder:
    """One code shown by `pair`: when it expires, how many exchanges began with it, whether it
    was used. Serves one exchange at a time."""

    def __init__(self, code: str, me: Peer, now: float, lifetime: float = CODE_LIFETIME,
                 max_tries: int = MAX_TRIES):
        self.code = parse_code(code)
        self.me = me
        self.expires = now + lifetime
        self.max_tries = max_tries
        self.tries = 0
        self.used = False
        self.busy = False

    def refusal(self, now: float) -> str | None:
        """Why the code cannot start an exchange now, or None."""
        if self.used:
            return "its pairing code was already used; run `pair` there for a new one"
        if self.tries >= self.max_tries:
            return (f"its pairing code stopped working after {self.max_tries} wrong tries; "
                    f"run `pair` there for a new one")
        if now >= self.expires:
            return "its pairing code expired; run `pair` there for a new one"
        if self.busy:
            return "another pairing is under way there; try again in a moment"
        return None

    @property
    def spent(self) -> bool:
        return self.used or self.tries >= self.max_tries

    def session(self) -> HolderSession:
        return HolderSession(self)


class HolderSession:
    """Node A's side of one exchange."""

    def __init__(self, holder: CodeHolder):
        self.holder = holder
        self.state = "start"
        self.keys: _Keys | None = None
        self.began = False

    def receive(self, frame: bytes, now: float) -> Step:
        try:
            return self._receive(frame, now)
        except PairingError as e:
            self._end()
            return Step(error=str(e))

    def _receive(self, frame: bytes, now: float) -> Step:
        h = self.holder
        if self.state == "start":
            if not frame.startswith(PAIR_MAGIC):
                raise PairingError("not a pairing request")
            body = _body(frame[len(PAIR_MAGIC):])
            if body.get("v") != 1 or not isinstance(body.get("spake"), bytes):
                raise PairingError("the other side speaks another version of the pairing protocol")
            why = h.refusal(now)
            if why is not None:
                self.state = "done"
                return Step(send=[_pack({"error": why})], error=f"refused a pairing request: {why}")
            h.tries += 1     # counted before anything is sent: dropping the connection saves no guess
            h.busy = self.began = True
            spake = SPAKE2_A(h.code.encode(), idA=ID_HOLDER, idB=ID_JOINER)
            msg = spake.start()
            try:
                self.keys = _Keys(spake.finish(body["spake"]))
            except Exception:
                raise PairingError("the other side's key exchange message is not valid") from None
            self.state = "confirm"
            return Step(send=[_pack({"spake": msg, "confirm": _Keys.mac(self.keys.confirm_holder)})])
        if self.state == "confirm":
            assert self.keys is not None
            body = _body(frame)
            self._end()
            if "fail" in body or not hmac.compare_digest(
                    bytes(body.get("confirm") or b""), _Keys.mac(self.keys.confirm_joiner)):
                return Step(send=[] if "fail" in body else [_pack({"error": WRONG_CODE})],
                            error=self.wrong_code_text())
            peer = _Keys.open(self.keys.box_joiner, body.get("box"))
            if peer.name == h.me.name:
                return Step(send=[_pack({"error": "both nodes have the same name"})],
                            error=f"the other node has this node's own name {peer.name!r}")
            h.used = True
            return Step(send=[_pack({"box": _Keys.seal(self.keys.box_holder, h.me)})], peer=peer)
        raise PairingError("unexpected message after the exchange ended")

    def wrong_code_text(self) -> str:
        h = self.holder
        left = h.max_tries - h.tries
        return (f"{WRONG_CODE} (try {h.tries} of {h.max_tries}); " +
                (f"{left} more {'try' if left == 1 else 'tries'} before the code stops working" if left
                 else "the code no longer works; run `pair` again for a new one"))

    def aborted(self) -> str:
        """The connection ended (or timed out) before the exchange did: what to tell the user."""
        counted = self.began and self.state == "confirm"
        self._end()
        if counted:
            return "the other side went away before confirming the code: " + self.wrong_code_text()
        return "the other side went away"

    def _end(self) -> None:
        if self.state != "done":
            self.state = "done"
            if self.began:
                self.holder.busy = False


# ---- node B: types the code ---------------------------------------------------------------------
class Joiner:
    """Node B's side of the exchange."""

    def __init__(self, code: str, me: Peer):
        self.code = parse_code(code)
        self.me = me
        self.spake = SPAKE2_B(self.code.encode(), idA=ID_HOLDER, idB=ID_JOINER)
        self.keys: _Keys | None = None
        self.state = "start"

    def start(self) -> bytes:
        self.state = "spake"
        return PAIR_MAGIC + _pack({"v": 1, "spake": self.spake.start()})

    def receive(self, frame: bytes) -> Step:
        try:
            return self._receive(frame)
        except PairingError as e:
            self.state = "done"
            return Step(error=str(e))

    def _receive(self, frame: bytes) -> Step:
        body = _body(frame)
        if isinstance(body.get("error"), str):
            self.state = "done"
            text = body["error"]
            return Step(error=WRONG_CODE if text == WRONG_CODE else f"the other node refused: {text}")
        if self.state == "spake":
            if not isinstance(body.get("spake"), bytes):
                raise PairingError("the other side does not speak the pairing protocol")
            try:
                self.keys = _Keys(self.spake.finish(body["spake"]))
            except Exception:
                raise PairingError("the other side's key exchange message is not valid") from None
            if not hmac.compare_digest(bytes(body.get("confirm") or b""), _Keys.mac(self.keys.confirm_holder)):
                self.state = "done"
                return Step(send=[_pack({"fail": WRONG_CODE})], error=WRONG_CODE)
            self.state = "box"
            return Step(send=[_pack({"confirm": _Keys.mac(self.keys.confirm_joiner),
                                     "box": _Keys.seal(self.keys.box_joiner, self.me)})])
        if self.state == "box":
            assert self.keys is not None
            self.state = "done"
            peer = _Keys.open(self.keys.box_holder, body.get("box"))
            if peer.name == self.me.name:
                raise PairingError(f"the other node has this node's own name {peer.name!r}")
            return Step(peer=peer)
        raise PairingError("unexpected message after the exchange ended")


# ---- driving the exchange -----------------------------------------------------------------------
def _host_of(addr: tuple) -> str:
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class Pairing:
    """The node's pairing: the code it shows (one at a time), A's side of exchanges on the network
    loop (network.py hands it connections that start with PAIR_MAGIC), and B's side for `pair CODE`.

    `pin(peer, host)` pins a paired peer (peers file) and returns where, for the message;
    `say`/`warn` print on the node's terminal; `announce(number or None)` shows the code's number
    on the LAN (host/net/discovery.py), so `pair CODE` can find the node without an address."""

    def __init__(self, me: Callable[[], Peer], pin: Callable[[Peer, str], str], say: Callable[[str], None],
                 warn: Callable[[str], None], announce: Callable[[int | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.me, self.pin, self.say, self.warn = me, pin, say, warn
        self.announce = announce
        self.clock = clock
        self.holder: CodeHolder | None = None
        self._lock = threading.Lock()
        self._last_refusal_told = float("-inf")
        self._expiry: threading.Timer | None = None   # stops showing the code's number when it expires

    # ---- A ---------------------------------------------------------------------------------------
    def new_code(self) -> str:
        """A new code (the previous one, if any, stops working)."""
        expiry = threading.Timer(CODE_LIFETIME, lambda: self._retire(holder))
        expiry.daemon = True
        with self._lock:
            holder = self.holder = CodeHolder(new_code(), self.me(), self.clock())
            old, self._expiry = self._expiry, expiry
        if old is not None:
            old.cancel()
        if self.announce is not None:
            self.announce(code_number(holder.code))
        expiry.start()
        return holder.code

    @staticmethod
    def wants(first: bytes) -> bool:
        return first.startswith(PAIR_MAGIC)

    def _retire(self, holder: CodeHolder) -> None:
        """Stop showing a spent code's number; the code itself stays to say why it is refused."""
        if self.announce is not None and self.holder is holder:
            self.announce(None)

    async def serve(self, conn, first: bytes) -> None:
        """A's side of one exchange on a connection from network.py (its `read_frame`,
        `write_frame`, `close` and `sock`)."""
        try:
            where = _host_of(conn.sock.getpeername())
            relayed = "relaying)" in conn.where   # network.py's label of a router's call-back
        except OSError:
            conn.close()
            return
        with self._lock:
            holder = self.holder
            if holder is not None and holder.refusal(self.clock()) is None:
                session: HolderSession | None = holder.session()
            else:
                session = None
        try:
            if session is None:
                why = holder.refusal(self.clock()) if holder is not None else None
                text = why or "no pairing code is shown there; run `pair` there first"
                await conn.write_frame(_pack({"error": text}))
                now = self.clock()
                if now - self._last_refusal_told >= REFUSAL_TOLD_EVERY:   # a flood of requests is told once
                    self._last_refusal_told = now
                    self.warn(f"pairing request from {where} refused: {text.replace('there', 'here')}")
                return
            assert holder is not None
            def begin() -> Step:   # the code's checks and claim, atomic against other requests
                with self._lock:
                    return session.receive(first, self.clock())
            # SPAKE2 is a few milliseconds of pure Python: off the network loop
            step = await asyncio.to_thread(begin)
            while True:
                for frame in step.send:
                    await conn.write_frame(frame)
                if step.done:
                    break
                try:
                    frame = await asyncio.wait_for(conn.read_frame(FRAME_MAX), EXCHANGE_TIMEOUT)
                except Exception:
                    step = Step(error=session.aborted())
                    break
                step = await asyncio.to_thread(session.receive, frame, self.clock())
                if step.peer is not None:
                    # pinned before our identity goes out: the peer may connect as soon as it has it
                    self._retire(holder)
                    try:
                        shown = await asyncio.to_thread(self.pin, step.peer, step.peer.address(where, relayed))
                    except Exception as e:
                        await conn.write_frame(_pack({"error": str(e)}))
                        self.warn(f"pairing with {step.peer.name} failed: {e}")
                        return
            if step.peer is not None:
                self.say(shown)
            else:
                if holder.spent:
                    self._retire(holder)
                self.warn(f"pairing with {where} failed: {step.error}")
        except Exception as e:   # the socket failed while writing
            if session is not None:
                self.warn(f"pairing with {where} failed: {session.aborted()} ({e})")
        finally:
            conn.close()

    # ---- B ---------------------------------------------------------------------------------------
    def join(self, code: str, addresses: list[tuple[str, int]],
             relay: tuple[bytes, dict] | None = None) -> str:
        """B's side: run the exchange with the node at the first of `addresses` (host, port) that
        answers (blocking); pin the peer and return what was pinned (also said on the terminal), or
        raise PairingError. `relay`: the address is a router's, asked first for a relayed
        connection with this frame (magic, map), as network.py's indirect dialling does."""
        joiner = Joiner(code, self.me())
        failed = []
        for host, port in addresses:
            try:
                sock = socket.create_connection((host, port), timeout=DIAL_TIMEOUT)
                break
            except OSError as e:
                failed.append(f"{_hp(host, port)}: {e.strerror or e}")
        else:
            raise PairingError(f"cannot reach {'; '.join(failed) or 'an address'}")
        try:
            sock.settimeout(EXCHANGE_TIMEOUT)
            if relay is not None:
                _ask_relay(sock, *relay, where=_hp(host, port))
            _send(sock, joiner.start())
            while True:
                try:
                    frame = _recv(sock)
                except (OSError, PairingError) as e:
                    raise PairingError(f"the other node went away during the exchange ({e})") from None
                step = joiner.receive(frame)
                for out in step.send:
                    try:
                        _send(sock, out)
                    except OSError:
                        pass
                if step.error is not None:
                    raise PairingError(step.error)
                if step.peer is not None:
                    break
        finally:
            sock.close()
        shown = self.pin(step.peer, step.peer.address(host, relay is not None))
        self.say(shown)
        return shown


def _ask_relay(sock: socket.socket, magic: bytes, request: dict, where: str) -> None:
    """Ask the router at the other end of `sock` to relay us to a node it serves."""
    _send(sock, magic + msgpack.packb(request))
    try:
        frame = _recv(sock)
        reply = msgpack.unpackb(frame[len(magic):], raw=False) if frame.startswith(magic) else None
    except (OSError, PairingError) as e:
        raise PairingError(f"the router at {where} did not answer ({e})") from None
    except Exception:
        reply = None
    if not isinstance(reply, dict):
        raise PairingError(f"{where} did not answer as a router would")
    if reply.get("ok") is not True:
        raise PairingError(f"the router at {where} does not relay to {request.get('relay')}: {reply.get('reason')}")


def _hp(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_U16.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise PairingError("connection closed")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (size,) = _U16.unpack(_recv_exact(sock, 2))
    if size > FRAME_MAX:
        raise PairingError(f"a pairing message of {size} bytes")
    return _recv_exact(sock, size)
