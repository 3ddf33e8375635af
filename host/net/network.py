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

Compression: nodes that both announce it in their handshake payloads send big blobs as zstd frames
where a sample of each shows it pays (host/net/compress.py; off with ``--no-compress`` or
``KINODE_COMPRESS=0``, which also stops announcing it). A peer that does not announce it (an older
node) gets every byte raw. The wire format is in host/net/noise.py's docstring.

The rooms: host/net/noise.py (the connection: socket I/O, Noise framing, message parsing),
host/net/peers.py (the peer table, send queues, liveness), host/net/relay.py (routers),
host/net/identity.py (the keypair), host/net/directory.py (names to keys and addresses). This
module is the façade: the `Network` service, its lifecycle, dialling and the handshakes.

One connection per peer pair: the responder answers the handshake with accept or reject. When both
nodes dial each other at once, the connection dialled by the node whose name sorts first wins; the
other is rejected before any message passes on it, and its dialler uses the winner instead.

Threading: everything runs on one asyncio loop on a daemon thread. ``send`` may be called from any
thread; ``on_message``, ``on_peer_lost`` and every ``on_error`` are called on the network thread
and must only enqueue.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
from noise.connection import Keypair, NoiseConnection

from host.net import noise
from host.net.directory import Directory, NodeRecord, fingerprint, host_port, peers_entry
from host.net.identity import Identity, load_or_create_identity
from host.net.known import KnownPeers
from host.net.noise import (
    HANDSHAKE_MAX,
    INSTANCE_LEN,
    MAX_MESSAGE,
    NOISE_MAX,
    NOISE_PROTOCOL,
    PROLOGUE,
    Closed,
    Conn,
    DialFailed,
    ProtocolError,
    parse_hello,
    tune,
)
from host.net.peers import OnError, OnMessage, OnPeerLost, Peer, safe_call
from host.net.relay import RELAY_MAGIC, Relay, source_key

__all__ = ["MAX_MESSAGE", "Identity", "Network", "listen_addresses", "load_or_create_identity"]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0
DIAL_TIMEOUT = 5.0
HEARTBEAT_EVERY = 5.0      # directory heartbeat
KEEPALIVE_EVERY = 5.0      # an idle connection sends an empty transport message this often
DEAD_AFTER = 20.0          # a connection that hears nothing this long is dropped (a half-open link);
                           # longer than a short outage plus TCP's retransmission back-off


class Network(Relay):
    """The node's network service. See the module docstring for the protocol."""

    def __init__(self, our_name: str, identity: Identity, port: int, directory: Directory,
                 on_message: OnMessage, on_peer_lost: OnPeerLost,
                 host: str | Sequence[str] = "127.0.0.1", *,
                 advertise_host: str | None = None, advertise_port: int | None = None,
                 on_problem: OnError | None = None,
                 routers: Sequence[str] = (), is_router: bool = False,
                 router_max_nodes: int = 100, router_max_rate: float = 0.0,
                 relay_tap: Callable[[memoryview], None] | None = None,
                 known: KnownPeers | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 heartbeat_every: float = HEARTBEAT_EVERY,
                 keepalive_every: float = KEEPALIVE_EVERY, dead_after: float = DEAD_AFTER,
                 compress: bool = True):
        self.our_name = our_name
        self.compress = compress           # announce and send zstd-compressed blobs (see host/net/compress.py)
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
        self.known = known                 # the key first seen for each name (None: not remembered)
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
        self._loop = asyncio.new_event_loop()   # runs on the network thread from start() on
        self._thread: threading.Thread | None = None
        self._listeners: list[socket.socket] = []
        self._peers: dict[str, Peer] = {}
        self._tasks: set = set()
        self._handshakes = 0
        self._running = False
        self._closing = False
        self._served: dict[str, Conn] = {}          # router: indirect nodes' connections to us
        self._pending_relays: dict[bytes, asyncio.Future] = {}  # router: token -> the call-back
        self._relays = 0                             # router: sessions being relayed
        self._relays_from: Counter[str] = Counter()  # router: sessions, waiting or relayed, per source
        self._waiting_from: Counter[str] = Counter()  # router: of those, still waiting for a call-back
        self._calling_back = 0                       # indirect node: call-backs under way
        self._relay_clock = 0.0                      # router: when the rate limit frees the link
        self._via: dict[str, str] = {}               # indirect peer -> the router that worked last
        self._keeping: set[str] = set()              # routers being dialled by the keeper
        self.pair_handler: Any = None  # host/net/pairing.py's Pairing: serves connections opening with its magic
        self._handshakes_from: Counter[str] = Counter()  # unauthenticated connections per source
        self._calls_for: Counter[str] = Counter()    # indirect node: call-backs per dialler's source
        self._refused_unauthenticated = 0
        self._refused_logged = float("-inf")

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
        self._handshakes_from = Counter()
        self._calling_back = 0
        self._calls_for = Counter()
        self.instance = secrets.token_bytes(INSTANCE_LEN)  # new per run: tells peers we restarted
        hello: dict = {"v": 1, "name": self.our_name, "instance": self.instance}
        if self.compress:
            hello["compress"] = ["zstd"]
        self._hello = msgpack.packb(hello)
        self._hello_route = msgpack.packb({**hello, "route": True})
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
        assert self._thread is not None   # _running was set after the thread started
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

    async def _dial(self, peer: Peer) -> Conn:
        """Return a usable connection to ``peer``, dialling it; raises DialFailed."""
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
        raise DialFailed(f"{peer.name} keeps refusing our connection as a duplicate")

    async def _lookup(self, name: str) -> NodeRecord:
        """The directory's record for a node we mean to dial; DialFailed says why there is none."""
        try:
            rec = await asyncio.to_thread(self.directory.lookup, name)
        except Exception as e:
            raise DialFailed(f"directory lookup for {name} failed: {e}") from None
        if rec is None:
            pf = self.directory.peers_file
            raise DialFailed(f"{name} is not in the node directory ({self.directory.path})"
                              + (f" nor in the peers file ({pf})" if pf else " and no --peers file is given"))
        if not rec.online:
            raise DialFailed(f"node {name} is not running (it stopped; the directory says so)")
        return rec

    async def _connect(self, rec: NodeRecord) -> tuple[socket.socket, str]:
        """A TCP connection to a direct node's address (and that address, for messages)."""
        where = host_port(rec.host, rec.port)
        try:
            infos = await self._loop.getaddrinfo(rec.host, rec.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise DialFailed(f"cannot resolve {rec.host} for {rec.name}: {e}") from None
        tried: list[str] = []
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                tune(sock)
                await asyncio.wait_for(self._loop.sock_connect(sock, addr), DIAL_TIMEOUT)
                return sock, where
            except (TimeoutError, OSError) as e:
                sock.close()
                why = (f"no answer in {DIAL_TIMEOUT:.0f} s" if isinstance(e, asyncio.TimeoutError)
                       else e.strerror or str(e))
                tried.append(f"{host_port(str(addr[0]), int(addr[1]))}: {why}")
            except BaseException:  # cancelled (shutdown)
                sock.close()
                raise
        raise DialFailed(f"cannot connect to {where} ({rec.source} entry): {'; '.join(tried)}")

    async def _dial_once(self, peer: Peer) -> Conn | None:
        """Dial and handshake; the connection, or None if the peer rejected it as a duplicate."""
        rec = await self._lookup(peer.name)
        if peer.conn is not None and not peer.conn.closed:
            return peer.conn  # the peer dialled us meanwhile
        if rec.routers:
            return await self._dial_indirect(peer, rec)
        sock, where = await self._connect(rec)
        return await self._handshake_out(peer, Conn(self, sock, dialled=True, where=where), rec)

    async def _handshake_out(self, peer: Peer, conn: Conn, rec: NodeRecord) -> Conn | None:
        """The initiator's handshake on a connected socket, then install it as the peer's."""
        name, where = rec.name, conn.where
        try:
            accepted = await asyncio.wait_for(self._initiate(conn, name, rec.public_key, rec.source),
                                              self.handshake_timeout)
        except TimeoutError:
            conn.close()
            raise DialFailed(f"handshake with {name} at {where} timed out") from None
        except DialFailed:
            conn.close()
            raise
        except (ProtocolError, OSError, Closed) as e:
            conn.close()
            raise DialFailed(f"handshake with {name} at {where} failed: {e}") from None
        except Exception as e:  # errors raised by the noise library on bad input
            conn.close()
            raise DialFailed(f"handshake with {name} at {where} failed: {e!r}") from None
        except BaseException:  # cancelled (shutdown)
            conn.close()
            raise
        if not accepted or self._closing:
            conn.close()
            if self._closing:
                raise DialFailed("network stopped")
            return None
        return self._install(peer, conn)

    async def _initiate(self, conn: Conn, name: str, expected_key: bytes,
                        source: str = "directory") -> bool:
        noise = NoiseConnection.from_name(NOISE_PROTOCOL)
        noise.set_keypair_from_private_bytes(Keypair.STATIC, self.identity.private)
        noise.set_prologue(PROLOGUE)
        noise.set_as_initiator()
        noise.start_handshake()
        await conn.write_frame(noise.write_message())                      # -> e
        hs = noise.noise_protocol.handshake_state
        payload = noise.read_message(await conn.read_frame(HANDSHAKE_MAX))  # <- e, ee, s, es
        claimed, instance, _, zstd = parse_hello(payload)
        remote_key = hs.rs.public_bytes
        if claimed != name:
            log.warning("dialled %s at %s but it claims to be %r; refusing", name, conn.where,
                        claimed)
            raise DialFailed(f"the node at {conn.where} claims to be {claimed!r}, not {name}")
        if remote_key != expected_key:
            log.warning("dialled %s at %s but its key does not match the %s (%s answered, %s expected); "
                        "refusing", name, conn.where, source, fingerprint(remote_key), fingerprint(expected_key))
            raise DialFailed(f"{name} at {conn.where} did not prove the key the {source} holds: "
                              f"key {fingerprint(remote_key)} answered, {fingerprint(expected_key)} "
                              f"expected (an outdated entry, or another node at that address)")
        changed = self._key_changed(name, remote_key, source)
        if changed is not None:
            log.warning("dialled %s at %s: refusing it: %s", name, conn.where, changed)
            raise DialFailed(changed)
        route = name in self.routers   # ask our router to serve us
        await conn.write_frame(noise.write_message(self._hello_route if route else self._hello))  # -> s, se
        conn.set_keys(noise)
        conn.peer_name, conn.instance = name, instance
        conn.zstd = self.compress and zstd
        reply = msgpack.unpackb(conn.decrypt_frame(await conn.read_frame(NOISE_MAX)), raw=False)
        if not isinstance(reply, dict) or not isinstance(reply.get("accept"), bool):
            raise ProtocolError("bad handshake reply")
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
            raise DialFailed(f"{name} refused the connection: {reason}")
        return True

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
            source = source_key(host)
            if self._handshakes >= noise.MAX_HANDSHAKES:
                self._refuse_unauthenticated(where, "too many unauthenticated connections")
                sock.close()
                continue
            if self._handshakes_from[source] >= noise.MAX_HANDSHAKES_PER_SOURCE:
                self._refuse_unauthenticated(where, f"{source} has {noise.MAX_HANDSHAKES_PER_SOURCE} "
                                                    "unauthenticated connections already")
                sock.close()
                continue
            try:
                tune(sock)
            except OSError:
                sock.close()
                continue
            conn = Conn(self, sock, dialled=False, where=where)
            conn.source = source
            self._handshakes += 1            # counted at once: the next accept sees it
            self._handshakes_from[source] += 1
            self._spawn(self._handle_incoming(conn))

    def _refuse_unauthenticated(self, where: str, why: str) -> None:
        """Log a connection closed unheard (a flood: at most one line a second)."""
        self._refused_unauthenticated += 1
        now = self._loop.time()
        if now - self._refused_logged >= 1.0:
            self._refused_logged = now
            log.warning("dropping connection from %s: %s (%d dropped so far)", where, why,
                        self._refused_unauthenticated)

    async def _handle_incoming(self, conn: Conn, allow_relay: bool = True) -> None:
        """`_accept_loop` counted it in _handshakes and _handshakes_from."""
        try:
            await self._handle_incoming_inner(conn, allow_relay)
        finally:
            self._handshakes -= 1
            self._handshakes_from[conn.source] -= 1
            if self._handshakes_from[conn.source] <= 0:
                del self._handshakes_from[conn.source]
        if conn.relay_frame is not None and not conn.closed:
            self._spawn(self._on_relay_frame(conn))

    async def _handle_incoming_inner(self, conn: Conn, allow_relay: bool) -> None:
        try:
            await asyncio.wait_for(self._respond(conn, allow_relay), self.handshake_timeout)
        except TimeoutError:
            log.warning("dropping unauthenticated connection from %s: handshake timed out",
                        conn.where)
            conn.close()
        except Closed:
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

    async def _respond(self, conn: Conn, allow_relay: bool = True) -> None:
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
        claimed, instance, route, zstd = parse_hello(payload)
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
        changed = self._key_changed(claimed, remote_key, rec.source)
        if changed is not None:
            log.warning("refused connection from %s claiming to be %r: %s", conn.where, claimed, changed)
            if self.on_problem is not None:
                safe_call(self.on_problem, f"refused a connection from {claimed}: {changed}")
            self._reject(conn, f"{self.our_name} refuses the key {fingerprint(remote_key)} for {claimed}: "
                               f"it first saw another")
            return
        if self._closing:
            conn.close()
            return
        conn.peer_name, conn.instance = claimed, instance
        conn.zstd = self.compress and zstd
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

    def _key_changed(self, name: str, key: bytes, source: str) -> str | None:
        """Why `key` may not speak for `name` though the directory says so (it is not the key we
        first saw for it), or None."""
        if self.known is None:
            return None
        return self.known.check(name, key, from_peers_file=source != "directory")

    def guard_status(self) -> list[str]:
        """Lines for diagnostics: what the limits against floods are doing (any thread)."""
        lines = [f"unauthenticated connections: {self._handshakes} (limit {noise.MAX_HANDSHAKES}, "
                 f"{noise.MAX_HANDSHAKES_PER_SOURCE} per address); {self._refused_unauthenticated} turned away"]
        for name, (waiting, holds) in sorted(self.intake_status().items()):
            lines.append(f"    {name}: {waiting / 2**20:.1f} MiB of its messages not yet taken; "
                         f"its socket left unread {holds} times")
        return lines

    @staticmethod
    def _reject(conn: Conn, reason: str) -> None:
        """Refuse an authenticated connection, telling the dialler why, and close it."""
        try:
            conn.send_now(conn.encrypt_frame(msgpack.packb({"accept": False, "reason": reason})))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()


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



# ---- command-line helpers ------------------------------------------------------------------------
def listen_addresses(bind: Sequence[str] | None, peers_file: Path | None) -> list[str]:
    """The addresses to listen on: `--bind` values (each may be a comma list; IPv6 with or without
    brackets), else loopback only, or every address (IPv4 and IPv6) for a node with a peers file,
    which expects nodes on other machines."""
    if bind:
        addrs = [a.strip() for item in bind for a in item.split(",") if a.strip()]
        return [a[1:-1] if a.startswith("[") and a.endswith("]") else a for a in addrs]
    if peers_file is not None:
        return ["::"] if socket.has_dualstack_ipv6() else ["0.0.0.0"]
    return ["127.0.0.1"]

