"""Nearby nodes: the node announces itself on the LAN with mDNS/DNS-SD (python-zeroconf) and
browses for others, for the terminal's `nearby` and for `pair CODE` without an address.

Each node listening beyond loopback registers a ``_kinode-py._tcp`` service: its SRV record gives
the net port and its addresses, its TXT record ``n`` (the node name), ``fp`` (the networking key's
fingerprint, as `peers-file` shows it) and, while `pair` shows a code, ``pair`` (the code's
number, so the node typing the code can find the node showing it). The instance name carries the
fingerprint too, so two nodes claiming one name do not collide.

An mDNS record is unauthenticated: anyone on the LAN can announce any name and fingerprint. It is
only an address hint here. Nothing from it is written to a peers file or used to choose whom to
trust: keys come only through a pairing code (host/net/pairing.py), and every connection is
checked against the pinned key by the Noise handshake.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zeroconf import ServiceBrowser, ServiceInfo, Zeroconf

log = logging.getLogger("host.net.discovery")

SERVICE = "_kinode-py._tcp.local."
LOOKUP_MS = 3000   # how long to wait for a service's records once it is seen
MAX_SEEN = 256     # nodes kept in the nearby table: anyone on the LAN can announce any number


@dataclass(frozen=True)
class NearbyNode:
    name: str
    fingerprint: str
    addresses: tuple[str, ...]
    port: int
    pair_number: int | None   # the number of the code it shows, if any
    instance: str


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return addr == "localhost"


def announce_addresses(bind: Sequence[str]) -> list[str]:
    """The addresses to announce for a node listening on `bind`: the specific ones that are not
    loopback, or, for a wildcard, every address of the machine that is not loopback or link-local.
    Empty for a node on loopback only: such a node announces nothing."""
    wildcard = any(b in ("", "0.0.0.0", "::") for b in bind)
    if not wildcard:
        return [b for b in bind if not _is_loopback(b)]
    import ifaddr
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                parsed = ipaddress.ip_address(addr.split("%")[0])
            except ValueError:
                continue
            if parsed.is_loopback or parsed.is_link_local:
                continue
            if parsed.version == 6 and not any(b in ("", "::") for b in bind):
                continue   # 0.0.0.0 takes IPv4 only
            found.append(str(parsed))
    return found


class Discovery:
    """Announce this node and keep the table of nodes seen nearby (any thread may read it)."""

    def __init__(self, name: str, fingerprint: str, port: int, addresses: Sequence[str],
                 on_problem: Callable[[str], None] | None = None):
        self.name, self.fingerprint, self.port = name, fingerprint, port
        self.addresses = list(addresses)
        self.on_problem = on_problem
        self.instance = f"{name[:40]} {fingerprint[:8]}"
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._browser: ServiceBrowser | None = None
        self._seen: dict[str, NearbyNode] = {}
        self._lock = threading.Lock()
        self._pair_number: int | None = None
        self._updates = threading.Lock()   # one TXT update at a time, in order

    @property
    def active(self) -> bool:
        return self._zc is not None

    def start(self) -> None:
        """Join the multicast group, start browsing, and register in the background (zeroconf
        probes for a clash for a second or two first)."""
        if not self.addresses:
            return
        from zeroconf import IPVersion, ServiceBrowser, Zeroconf
        v4 = [a for a in self.addresses if ":" not in a]
        v6 = [a for a in self.addresses if ":" in a]
        version = IPVersion.All if v4 and v6 else IPVersion.V4Only if v4 else IPVersion.V6Only
        try:
            zc = Zeroconf(interfaces=v4 + v6, ip_version=version)
        except Exception as e:   # no multicast here (no route, no permission): the node runs without
            self._problem(f"cannot look for nearby nodes (mDNS): {e or type(e).__name__}")
            return
        self._zc = zc
        self._info = self._service_info()
        self._browser = ServiceBrowser(zc, SERVICE, handlers=[self._on_change])
        threading.Thread(target=self._register, name="mdns-register", daemon=True).start()

    def _service_info(self) -> ServiceInfo:
        from zeroconf import ServiceInfo
        props = {"v": "1", "n": self.name, "fp": self.fingerprint}
        if self._pair_number is not None:
            props["pair"] = str(self._pair_number)
        return ServiceInfo(SERVICE, f"{self.instance}.{SERVICE}", port=self.port, properties=props,
                           parsed_addresses=self.addresses, server=f"kinode-py-{self.fingerprint}.local.")

    def _register(self) -> None:
        try:
            assert self._zc is not None and self._info is not None
            self._zc.register_service(self._info, allow_name_change=True)
            log.info("announced on the LAN as %r at %s port %d", self.instance, ", ".join(self.addresses), self.port)
        except Exception as e:
            self._problem(f"cannot announce this node on the LAN (mDNS): {e or type(e).__name__}")

    def _problem(self, text: str) -> None:
        log.warning("%s", text)
        if self.on_problem is not None:
            self.on_problem(text)

    def set_pair_number(self, number: int | None) -> None:
        """Show (or stop showing) a code's number in our record; returns at once."""
        self._pair_number = number
        if self._zc is None:
            return

        def update() -> None:
            with self._updates:
                if self._zc is None:
                    return
                info = self._service_info()
                if self._info is not None:
                    info.name = self._info.name   # the name registration settled on
                try:
                    self._zc.update_service(info)
                    self._info = info
                except Exception as e:
                    log.warning("mDNS update failed: %s", e)
        threading.Thread(target=update, name="mdns-update", daemon=True).start()

    def _on_change(self, zeroconf, service_type: str, name: str, state_change) -> None:
        try:
            self._changed(zeroconf, service_type, name, state_change)
        except Exception:   # a malformed record from the LAN must not stop the browser's thread
            log.debug("ignored the mDNS record %r", name, exc_info=True)

    def _changed(self, zeroconf, service_type: str, name: str, state_change) -> None:
        from zeroconf import ServiceStateChange
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                self._seen.pop(name, None)
            return
        info = zeroconf.get_service_info(service_type, name, timeout=LOOKUP_MS)
        if info is None:
            return
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                 for k, v in info.properties.items()}
        node_name, fp = props.get("n", ""), props.get("fp", "")
        if not node_name or not fp or (node_name == self.name and fp == self.fingerprint):
            return
        pair = props.get("pair", "")
        seen = NearbyNode(node_name, fp, tuple(info.parsed_scoped_addresses()), int(info.port or 0),
                          int(pair) if pair.isdigit() else None, name)
        with self._lock:
            if name in self._seen or len(self._seen) < MAX_SEEN:
                self._seen[name] = seen

    def nearby(self) -> list[NearbyNode]:
        with self._lock:
            return sorted(self._seen.values(), key=lambda n: (n.name, n.fingerprint))

    def find(self, *, name: str | None = None, pair_number: int | None = None,
             wait: float = 0.0) -> list[NearbyNode]:
        """Nodes seen with this name or showing this code number, waiting up to `wait` seconds
        for one to appear."""
        deadline = time.monotonic() + wait
        while True:
            found = [n for n in self.nearby()
                     if (name is None or n.name == name) and (pair_number is None or n.pair_number == pair_number)]
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.2)

    def stop(self) -> None:
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            with self._updates:
                zc.unregister_all_services()
        except Exception:
            pass
        zc.close()
