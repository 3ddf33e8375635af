"""The peer table: one connection per peer (which of two simultaneous dials wins), each peer's
ordered send queue and the pump that writes it, liveness (keepalives, dropping silent links,
noticing edited peers-file entries), and the hand-over of received messages to the kernel.

Everything here runs on the network loop; `PeerTable.send` may be called from any thread.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections import deque
from collections.abc import Callable

import msgpack

from host.messages import KernelMessage
from host.net.compress import CompressError
from host.net.directory import Directory
from host.net.noise import MAX_MESSAGE, Closed, Conn, DialFailed, ProtocolError, Split, decompressed, encode

log = logging.getLogger(__name__)

PEERS_CHECK = 0.1          # the peers file is checked for changes at most this often
REPORT_AGAIN_AFTER = 30.0  # the same dial failure is told to the user at most this often
SEND_BATCH = 1 << 20       # plaintext bytes gathered from the queue per encrypt+write round
# bytes of one peer's messages handed to processes and not yet taken by them; past it we stop reading
# that peer's socket (a worker still has chunks queued: more would only wait in memory)
PEER_IN_FLIGHT = 8 << 20

OnMessage = Callable[[KernelMessage, "Receipt"], None]
OnPeerLost = Callable[[str], None]
OnError = Callable[[str], None]


class Intake:
    """Bytes of one peer's messages handed to processes and not yet taken by them."""

    def __init__(self) -> None:
        self.bytes = 0
        self.lock = threading.Lock()
        self.event = asyncio.Event()   # set on the loop when one of its messages is taken
        self.loop: asyncio.AbstractEventLoop | None = None
        self.holds = 0                 # times its socket was left unread (for diagnostics and tests)
        self.waiting = 0               # readers waiting on `event` (under `lock`): only then wake the loop


class Receipt:
    """Goes with each message from a peer: the kernel calls `taken()` once the receiving process
    takes the message, or drops it (from any thread; more than once is harmless). `over` is set by
    the kernel when the message puts its process's inbox over its cap."""
    __slots__ = ("intake", "size", "done", "over")

    def __init__(self, intake: Intake, size: int):
        self.intake, self.size, self.done, self.over = intake, size, False, False

    def taken(self) -> None:
        intake = self.intake
        with intake.lock:
            if self.done:
                return
            self.done = True
            intake.bytes -= self.size
            waiting = intake.waiting
        loop = intake.loop
        if waiting and loop is not None:  # a wake-up per message taken cost a loop round each
            try:
                loop.call_soon_threadsafe(intake.event.set)
            except RuntimeError:   # the loop is closed: nobody waits
                pass

    def holds_back(self) -> bool:
        """True while the sender must wait: over its share, or its message over an inbox's cap."""
        with self.intake.lock:
            return self.intake.bytes > PEER_IN_FLIGHT or (self.over and not self.done)


class Peer:
    """Per-peer state on the loop: the current connection and the ordered outgoing queue."""

    def __init__(self, name: str):
        self.name = name
        self.intake = Intake()
        self.conn: Conn | None = None
        self.queue: deque = deque()    # (encoded payload, on_error)
        self.wake = asyncio.Event()
        self.pump: asyncio.Task | None = None
        self.dialling = False
        self.waiters: list = []        # futures resolved when a connection is installed
        self.zstd = False              # its last connection took compressed blobs: compress what is queued for it



class PeerTable:
    """The peer table's half of the network service (`host.net.network.Network` is the whole)."""
    our_name: str
    directory: Directory
    on_message: OnMessage
    on_peer_lost: OnPeerLost
    on_problem: OnError | None
    keepalive_every: float
    dead_after: float
    compress: bool
    _loop: asyncio.AbstractEventLoop
    _running: bool
    _closing: bool
    _peers: dict[str, Peer]
    _retired: set[Conn]
    _reported: dict
    _peers_checked: float
    _served: dict[str, Conn]

    def _spawn(self, coro) -> asyncio.Task:
        raise NotImplementedError

    async def _dial(self, peer: Peer) -> Conn:
        raise NotImplementedError

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
                if conn.held is not None:  # we are not reading it: its silence is ours
                    conn.last_recv = now
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

    async def _ping(self, conn: Conn) -> None:
        try:
            await conn.ping()
        except (OSError, Closed) as e:
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
        if self.on_problem is not None:   # the terminal shows it: not twice
            log.info("cannot reach %s: %s", peer, text)
            safe_call(self.on_problem, f"cannot reach {peer}: {text}")
        else:
            log.warning("cannot reach %s: %s", peer, text)

    def send(self, km: KernelMessage, on_error: OnError) -> None:
        """Queue ``km`` for its target node; never blocks on the network.

        Failures are reported through ``on_error(reason)`` on the network thread:
        ``"offline: ..."`` or ``"message too large: N bytes > 10485800"``.
        """
        loop = self._loop
        if not self._running or loop is None or loop.is_closed():
            safe_call(on_error, "offline: network is not running")
            return
        node = km.target.node
        peer = self._peers.get(node)   # read from any thread: a stale answer only sends raw or unpacks
        try:
            payload = encode(km, compress=self.compress and peer is not None and peer.zstd
                             and node != self.our_name)
        except Exception as e:
            loop.call_soon_threadsafe(safe_call, on_error, f"message not encodable: {e}")
            return
        size = (payload.raw_size or payload.size) if isinstance(payload, Split) else len(payload)
        if size > MAX_MESSAGE:
            loop.call_soon_threadsafe(
                safe_call, on_error,
                f"message too large: {size} bytes > {MAX_MESSAGE}")
            return
        try:
            loop.call_soon_threadsafe(self._enqueue, km.target.node, payload, on_error)
        except RuntimeError:  # loop closed under us
            safe_call(on_error, "offline: network is not running")

    def _enqueue(self, node: str, payload: bytes | Split, on_error: OnError) -> None:
        if self._closing:
            safe_call(on_error, "offline: network stopped")
            return
        if node == self.our_name:  # loopback: deliver a decoded copy, as a peer would
            try:
                raw = payload.joined() if isinstance(payload, Split) else payload
                km = KernelMessage.from_wire(msgpack.unpackb(raw, raw=False))
            except Exception as e:
                safe_call(on_error, f"message not encodable: {e}")
                return
            safe_call(self.on_message, km, Receipt(Intake(), 0))
            return
        peer = self._peer(node)
        peer.queue.append((payload, on_error))
        if peer.pump is None or peer.pump.done():
            peer.pump = self._loop.create_task(self._pump(peer))
        else:
            peer.wake.set()

    def _peer(self, name: str) -> Peer:
        peer = self._peers.get(name)
        if peer is None:
            peer = self._peers[name] = Peer(name)
        return peer

    def _fail_queue(self, peer: Peer, reason: str) -> None:
        while peer.queue:
            _, on_error = peer.queue.popleft()
            safe_call(on_error, reason)

    async def _pump(self, peer: Peer) -> None:
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
                    except DialFailed as e:
                        if not self._closing:
                            self._report(peer.name, str(e))
                        self._fail_queue(peer, f"offline: {e}")
                        continue
                batch = []
                size = 0
                while peer.queue and size < SEND_BATCH:
                    payload, _ = peer.queue.popleft()
                    if isinstance(payload, Split) and payload.raw_size is not None and not conn.zstd:
                        payload = self._uncompressed(payload)
                    batch.append(payload)
                    size += len(payload)
                try:
                    async with conn.wlock:
                        await conn.send_payloads(batch)
                except (OSError, Closed) as e:
                    self._drop(conn, f"write failed: {e}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("network pump for %s failed", peer.name)
            self._fail_queue(peer, "offline: internal network error")

    @staticmethod
    def _uncompressed(payload: Split) -> Split:
        try:
            return decompressed(payload)
        except CompressError as e:   # our own frame: cannot happen short of a bug
            raise RuntimeError(f"cannot undo our own compression: {e}") from None

    async def _wait_for_conn(self, peer: Peer, timeout: float) -> Conn | None:
        if peer.conn is not None and not peer.conn.closed:
            return peer.conn
        fut = self._loop.create_future()
        peer.waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            if fut in peer.waiters:
                peer.waiters.remove(fut)

    def _judge_incoming(self, peer: Peer, conn: Conn) -> str | None:
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

    def _install(self, peer: Peer, conn: Conn) -> Conn:
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
        # bytes cost nothing between two nodes on one machine, so compressing would only spend CPU; such a
        # connection still takes the peer's compressed blobs, if the peer sends them
        peer.zstd = conn.zstd and not _is_loopback(conn)
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

    async def _read(self, conn: Conn) -> None:
        try:
            await conn.read_loop()
        except asyncio.CancelledError:
            raise
        except ProtocolError as e:
            log.warning("dropping connection to %s: %s", conn.label, e)
            self._drop(conn, str(e))
        except (Closed, OSError) as e:
            self._drop(conn, str(e) or type(e).__name__)
        except Exception as e:
            log.exception("reading from %s failed", conn.label)
            self._drop(conn, repr(e))

    def _drop(self, conn: Conn, reason: str) -> None:
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
                safe_call(self.on_peer_lost, peer.name)

    def _received(self, conn: Conn, km: KernelMessage, size: int) -> None:
        if km.source.node != conn.peer_name:
            log.warning("dropped message from %s claiming source node %r", conn.label,
                        km.source.node)
            return
        if km.target.node != self.our_name:
            log.warning("dropped message from %s for another node %r", conn.label,
                        km.target.node)
            return
        intake = self._peer(km.source.node).intake
        intake.loop = self._loop
        with intake.lock:
            intake.bytes += size
        receipt = Receipt(intake, size)
        safe_call(self.on_message, km, receipt)
        if receipt.holds_back():
            conn.held = receipt

    async def _held(self, conn: Conn) -> None:
        """Leave the peer's socket unread (TCP then holds its sender back) until the processes
        have taken enough of its messages; other peers are read on meanwhile."""
        receipt = conn.held
        assert isinstance(receipt, Receipt)
        intake = receipt.intake
        intake.holds += 1
        if intake.holds == 1 or intake.holds % 100 == 0:   # back-pressure, normal in a fast transfer: -v shows it
            log.info("%s sends faster than our processes take its messages: not reading from it until they "
                     "do (%d time%s so far)", conn.label, intake.holds, "" if intake.holds == 1 else "s")
        with intake.lock:
            intake.waiting += 1            # from here on, each message taken wakes us
        try:
            while True:
                intake.event.clear()
                if not receipt.holds_back():
                    return
                await intake.event.wait()
        finally:
            with intake.lock:
                intake.waiting -= 1
            conn.held = None
            conn.last_recv = self._loop.time()  # the silence was ours

    def intake_status(self) -> dict[str, tuple[int, int]]:
        """Per peer: bytes of its messages not yet taken, times its socket was left unread (any thread)."""
        return {name: (p.intake.bytes, p.intake.holds) for name, p in list(self._peers.items())
                if p.intake.bytes or p.intake.holds}

    def connected_peers(self) -> list:
        """Names of peers with an established connection (a snapshot; any thread)."""
        return sorted(name for name, p in list(self._peers.items())
                      if p.conn is not None and not p.conn.closed)

    def peer_activity(self) -> dict:
        """Seconds since each connected peer last sent us anything (a snapshot; any thread)."""
        now = self._loop.time()
        return {name: max(0.0, now - p.conn.last_recv) for name, p in list(self._peers.items())
                if p.conn is not None and not p.conn.closed}


def safe_call(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("network callback %r failed", fn)


def _is_loopback(conn: Conn) -> bool:
    """Whether the connection's other end is this machine: never for a relayed connection (its
    socket goes to the router, wherever the peer is); else by `_same_machine`."""
    if conn.relayed:
        return False
    try:
        return _same_machine(conn.sock.getpeername()[0], conn.sock.getsockname()[0])
    except (OSError, IndexError, TypeError):
        return False


def _same_machine(remote: str, local: str) -> bool:
    """A remote address that is loopback (127.0.0.0/8, ::1) or the socket's own local address: two
    nodes on one machine talking over its LAN address connect from and to that same address."""
    def norm(host: str):
        addr = ipaddress.ip_address(host.split("%")[0])
        return getattr(addr, "ipv4_mapped", None) or addr

    try:
        r, loc = norm(remote), norm(local)
    except ValueError:
        return False
    return r.is_loopback or r == loc
