"""Routers (Kinode's indirect nodes). A node that cannot be dialled names routers; it keeps a
connection to each (its hello says ``"route": true``), and a router started with ``is_router``
serves it. A peer that wants the indirect node opens a TCP connection to one of its routers and
sends, instead of Noise message 1, a relay frame: ``u16 length, RELAY_MAGIC, msgpack {"relay":
target, "from": name}``. The router asks the target over their connection (a control map
``{"ctl": "relay", "token", "from", "addr"}`` in the plaintext stream, "addr" the dialler's
address, by which the indirect node shares out its call-backs) to open a connection back, which
starts with the relay frame ``{"answer": token}``; the router then answers the dialler ``{"ok":
true}`` (or ``false`` and a ``reason``) and copies bytes between the two sockets. The two ends
then run the usual Noise XX handshake and session through it: the router never holds their
keys, and the dialler pins the indirect node's key as for a direct peer. A relay request is
unauthenticated, so the router shares its relays out per source address and the indirect node
bounds its call-backs (each one a dial and a handshake) and counts them as handshakes.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
from collections import Counter
from collections.abc import Callable

import msgpack

from host.net import noise
from host.net.directory import NodeRecord
from host.net.noise import HANDSHAKE_MAX, Closed, Conn, DialFailed, ProtocolError
from host.net.peers import Peer, PeerTable

log = logging.getLogger(__name__)

RELAY_MAGIC = b"kinode-py relay\x00"  # starts a relay frame (a Noise message 1 is 32 random bytes)
RELAY_TIMEOUT = 5.0        # seconds a router waits for the indirect node to call back
RELAY_BUF = 256 << 10      # bytes a router copies per read
ROUTER_RETRY = 2.0         # seconds between an indirect node's attempts to reach a lost router
MAX_RELAYS = 512           # relayed sessions a router carries at once
# relay requests carry no proof of who asks: one address (an IPv6 /64) gets only a share of the router
MAX_RELAYS_PER_SOURCE = 16          # sessions, waiting or relayed, for diallers at one address
MAX_PENDING_RELAYS_PER_SOURCE = 4   # of those, still waiting for the indirect node's call-back
MAX_CALL_BACKS = 32        # an indirect node's call-backs to its routers under way (dial and handshake)
MAX_CALL_BACKS_PER_SOURCE = 2  # of those, for diallers at one address (as its router tells it)


class Relay(PeerTable):
    """The router relay's half of the network service: both the indirect node's side (reaching
    its routers, calling back) and the router's (relaying), and a dialler's relayed dial."""
    routers: tuple[str, ...]
    is_router: bool
    router_max_nodes: int
    router_max_rate: float
    relay_tap: Callable[[memoryview], None] | None
    handshake_timeout: float
    _handshakes: int
    _pending_relays: dict[bytes, asyncio.Future]
    _relays: int
    _relays_from: Counter[str]
    _waiting_from: Counter[str]
    _calling_back: int
    _calls_for: Counter[str]
    _handshakes_from: Counter[str]
    _relay_clock: float
    _via: dict[str, str]
    _keeping: set[str]

    async def _lookup(self, name: str) -> NodeRecord:
        raise NotImplementedError

    async def _connect(self, rec: NodeRecord) -> tuple[socket.socket, str]:
        raise NotImplementedError

    async def _handshake_out(self, peer: Peer, conn: Conn, rec: NodeRecord) -> Conn | None:
        raise NotImplementedError

    async def _handle_incoming_inner(self, conn: Conn, allow_relay: bool) -> None:
        raise NotImplementedError

    async def _dial_indirect(self, peer: Peer, rec: NodeRecord) -> Conn | None:
        """Reach an indirect node through the first of its routers that relays for us (starting
        with the one that worked last)."""
        routers = [r for r in rec.routers if r != self.our_name]
        last = self._via.get(rec.name)
        if last in routers:
            routers.remove(last)
            routers.insert(0, last)
        if not routers:
            raise DialFailed(f"{rec.name} is reached only through routers, and names no router but us")
        failures = []
        for router in routers:
            conn: Conn | None = None
            try:
                rrec = await self._lookup(router)
                if rrec.routers:
                    raise DialFailed(f"{router} is itself an indirect node")
                sock, where = await self._connect(rrec)
                conn = Conn(self, sock, dialled=True, where=f"{where} ({router} relaying)")
                conn.relayed = True
                await asyncio.wait_for(self._ask_relay(conn, rec.name, router),
                                       RELAY_TIMEOUT + self.handshake_timeout)
            except (TimeoutError, DialFailed, ProtocolError, Closed, OSError) as e:
                if conn is not None:
                    conn.close()
                why = str(e) if isinstance(e, DialFailed) else (
                    "no answer to the relay request" if isinstance(e, asyncio.TimeoutError)
                    else f"relay request failed: {e or type(e).__name__}")
                failures.append(f"{router}: {why}")
                log.info("cannot reach %s through %s: %s", rec.name, router, why)
                continue
            try:
                got = await self._handshake_out(peer, conn, rec)
            except DialFailed as e:
                failures.append(f"{router}: {e}")
                continue
            self._via[rec.name] = router
            return got
        raise DialFailed(f"cannot reach {rec.name} through its routers: {'; '.join(failures)}")

    async def _ask_relay(self, conn: Conn, target: str, router: str) -> None:
        """Ask a router for a relayed connection to `target`; returns once it is through."""
        await conn.write_frame(RELAY_MAGIC + msgpack.packb({"relay": target, "from": self.our_name}))
        frame = await conn.read_frame(HANDSHAKE_MAX)
        reply = parse_relay_frame(frame)
        if reply is None:
            raise DialFailed(f"{router} did not answer the relay request as a router would")
        if reply.get("ok") is not True:
            raise DialFailed(f"{router} does not relay to {target}: {reply.get('reason')}")

    async def _keep_routers(self) -> None:
        """An indirect node keeps a connection to each of its routers, dialling again when one is lost."""
        while True:
            for name in self.routers:
                peer = self._peer(name)
                if (peer.conn is None or peer.conn.closed) and not peer.dialling and name not in self._keeping:
                    self._keeping.add(name)
                    self._spawn(self._reach_router(peer))
            await asyncio.sleep(ROUTER_RETRY)

    async def _reach_router(self, peer: Peer) -> None:
        try:
            await self._dial(peer)
        except DialFailed as e:
            if not self._closing:
                self._report(peer.name, f"{e} (it is one of our routers)")
        finally:
            self._keeping.discard(peer.name)

    def _control(self, conn: Conn, wire: dict) -> None:
        """A control map from a peer (not a KernelMessage): a router asking us to call it back."""
        token, source = wire.get("token"), wire.get("from")
        if (wire.get("ctl") == "relay" and conn.peer_name in self.routers and isinstance(token, bytes)
                and isinstance(source, str)):
            # each call-back dials and starts a handshake for whoever asked the router: bounded,
            # shared out per dialler's address (an older router does not say it: all count as one),
            # and counted as an unauthenticated connection from the start
            addr = wire.get("addr")
            key = f"{conn.peer_name}/{addr[:64] if isinstance(addr, str) else '?'}"
            if self._calling_back >= MAX_CALL_BACKS:
                refusal = f"{MAX_CALL_BACKS} call-backs already under way"
            elif self._calls_for[key] >= MAX_CALL_BACKS_PER_SOURCE:
                refusal = f"{MAX_CALL_BACKS_PER_SOURCE} call-backs already under way for diallers at {key}"
            elif self._handshakes >= noise.MAX_HANDSHAKES:
                refusal = "too many unauthenticated connections"
            else:
                refusal = None
            if refusal is not None:
                log.warning("not calling %s back for a relayed connection from %s: %s",
                            conn.peer_name, source[:255], refusal)
                return
            self._calling_back += 1
            self._calls_for[key] += 1
            self._handshakes += 1
            self._spawn(self._call_back(conn.peer_name or "", token, source[:255], key))
        else:
            log.warning("ignored a control message %r from %s (not one of our routers, or malformed)",
                        wire.get("ctl"), conn.label)

    async def _call_back(self, router: str, token: bytes, source: str, key: str) -> None:
        """Open the connection a router asked for; the peer behind it then handshakes with us as if
        it had dialled us (and is judged as any incoming peer is). `_control` counted it."""
        try:
            await self._call_back_inner(router, token, source)
        finally:
            self._calling_back -= 1
            self._handshakes -= 1
            self._calls_for[key] -= 1
            if self._calls_for[key] <= 0:
                del self._calls_for[key]

    async def _call_back_inner(self, router: str, token: bytes, source: str) -> None:
        try:
            rrec = await self._lookup(router)
            sock, where = await self._connect(rrec)
        except DialFailed as e:
            log.warning("cannot call %s back for a relayed connection from %s: %s", router, source, e)
            return
        conn = Conn(self, sock, dialled=False, where=f"{where} ({router} relaying)")
        conn.relayed = True
        try:
            await conn.write_frame(RELAY_MAGIC + msgpack.packb({"answer": token}))
        except (OSError, Closed) as e:
            log.warning("cannot call %s back for a relayed connection from %s: %s", router, source, e)
            conn.close()
            return
        await self._handle_incoming_inner(conn, allow_relay=False)

    def _routing_refusal(self, name: str) -> str | None:
        """Why we will not serve `name` as its router, or None if we will."""
        if not self.is_router:
            return f"{self.our_name} is not a router (start it with --is-router)"
        live = {n for n, c in self._served.items() if not c.closed}
        if name not in live and len(live) >= self.router_max_nodes:
            return f"{self.our_name} already routes for its limit of {self.router_max_nodes} nodes"
        return None

    def _relay_refusal(self, target: str, source: str) -> str | None:
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

    async def _on_relay_frame(self, conn: Conn) -> None:
        """A connection that began with a relay frame: a peer asking us to relay it to a node we
        serve, or that node calling back for such a request."""
        frame = conn.relay_frame or b""
        if self.relay_tap is not None:
            self.relay_tap(memoryview(frame))
        msg = parse_relay_frame(frame)
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

    async def _relay(self, conn: Conn, source: str, target: str) -> None:
        """Have `target` call us back, then relay `conn` to it until either side ends."""
        other: Conn | None = None
        reason = ""
        token = secrets.token_bytes(16)
        fut = self._loop.create_future()
        self._pending_relays[token] = fut
        self._waiting_from[conn.source] += 1
        try:
            served = self._served[target]
            async with served.wlock:
                await served.send_payloads([msgpack.packb({"ctl": "relay", "token": token, "from": source,
                                                           "addr": conn.source})])
            other = await asyncio.wait_for(fut, RELAY_TIMEOUT)
        except TimeoutError:
            reason = f"{target} did not call back within {RELAY_TIMEOUT:.0f} s"
        except (OSError, Closed) as e:
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
        except (OSError, Closed):
            conn.close()
            other.close()
            return
        log.info("relaying %s (%s) to %s", source, conn.where, target)
        await self._splice(conn, other, f"{source} -> {target}")

    async def _refuse_relay(self, conn: Conn, source: str, target: str, reason: str) -> None:
        """Tell the dialler why we do not relay it, and close its connection."""
        log.warning("not relaying %s (%s) to %s: %s", source, conn.where, target, reason)
        try:
            await conn.write_frame(RELAY_MAGIC + msgpack.packb({"ok": False, "reason": reason}))
        except (OSError, Closed):
            pass
        conn.close()

    async def _splice(self, a: Conn, b: Conn, what: str) -> None:
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

    async def _copy(self, src: Conn, dst: Conn) -> None:
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


def source_key(host: str) -> str:
    """What relay limits count a dialler by: its IPv4 address, or its IPv6 /64 (one host's usual share)."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return host


def parse_relay_frame(frame: bytes) -> dict | None:
    """The map a relay frame carries, or None if it is no relay frame."""
    if not frame.startswith(RELAY_MAGIC):
        return None
    try:
        msg = msgpack.unpackb(frame[len(RELAY_MAGIC):], raw=False)
    except Exception:
        return None
    return msg if isinstance(msg, dict) else None
