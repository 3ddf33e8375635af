"""The node's side of nearby nodes and pairing: runs discovery (host/net/discovery.py) and pairing
(host/net/pairing.py) beside the network, pins a paired peer in the peers file, and answers the
terminal's `nearby` and `pair` commands and the /pair web page (host/http/pair_page.py).

A node started without --peers gets HOME/peers.json at its first pairing; it is read at every
start after that, as a --peers file would be (so the node then listens on every address).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from host.net import discovery, pairing
from host.net.directory import PeersFileError, fingerprint, host_port, parse_host_port, peers_entry
from host.net.network import RELAY_MAGIC, Network

log = logging.getLogger("host.net.lan")

PAIRED_PEERS = "peers.json"   # the peers file pairing writes when the node was started without --peers
FIND_CODE_WAIT = 5.0          # seconds `pair CODE` waits to see the node showing the code nearby


def peers_file(home: Path, given: Path | None) -> Path | None:
    """The node's peers file: --peers, else the one an earlier pairing wrote, else none."""
    if given is None and (home / PAIRED_PEERS).exists():
        return home / PAIRED_PEERS
    return given


class Lan:
    """Discovery and pairing for one node; `say`/`warn` print on its terminal."""

    def __init__(self, net: Network, home: Path, *, discovery_on: bool, advertise_given: bool,
                 routers: Sequence[str], say: Callable[[str], None], warn: Callable[[str], None]):
        self.net, self.home = net, home
        self.discovery_on = discovery_on
        self.advertise_given = advertise_given
        self.routers = tuple(routers)
        self.say, self.warn = say, warn
        addrs = discovery.announce_addresses(net.bind) if discovery_on else []
        self.discovery = discovery.Discovery(net.our_name, fingerprint(net.identity.public), net.port, addrs,
                                             on_problem=lambda text: say(f"warning: {text}"))
        self.pairing = pairing.Pairing(self.identity, self.pin, say=say, warn=warn,
                                       announce=self.discovery.set_pair_number)

    def start(self) -> None:
        self.discovery.start()
        self.net.pair_handler = self.pairing   # network.py hands it connections that begin a pairing

    def stop(self) -> None:
        self.discovery.stop()

    # ---- what pairing needs ----------------------------------------------------------------------
    def identity(self) -> pairing.Peer:
        net = self.net
        return pairing.Peer(net.our_name, net.identity.public, net.advertised_port, net.advertise_host,
                            host_given=self.advertise_given, routers=self.routers)

    def pin(self, peer: pairing.Peer, host: str) -> str:
        """Pin a paired peer in the peers file; the line that says so."""
        directory = self.net.directory
        direct = not peer.routers or peer.host_given   # an indirect node's entry has an address only if given
        path = directory.pin_peer(peers_entry(peer.name, peer.public_key, host if direct else None,
                                              peer.port if direct else None, peer.routers),
                                  self.home / PAIRED_PEERS)
        where = host_port(host, peer.port) if direct else "via " + ", ".join(peer.routers)
        text = f"paired with {peer.name} (key {fingerprint(peer.public_key)}) at {where}; pinned in {path}"
        unknown = [r for r in peer.routers if r != self.net.our_name and directory.lookup(r) is None]
        if unknown:
            text += f"\nwarning: {peer.name} is reached through {', '.join(unknown)}, which this node does not know"
        rec = directory.lookup(peer.name)
        if rec is not None and rec.public_key != peer.public_key:   # the node directory wins over the file
            text += (f"\nwarning: this node's directory ({directory.path}) holds another key for {peer.name}, "
                     f"which wins over the peers file while that node runs")
        return text

    # ---- commands --------------------------------------------------------------------------------
    def nearby_text(self) -> str:
        """`nearby`: the nodes announced on the LAN, each with whether its key is the pinned one."""
        if not self.discovery.active:
            if not self.discovery_on:
                return "discovery is off (--no-discovery)"
            return ("this node listens on loopback only, so it neither announces itself nor looks for nearby "
                    "nodes; start it with --bind ADDRESS (e.g. --bind 0.0.0.0) to be found on the LAN")
        seen = self.discovery.nearby()
        if not seen:
            return "no nearby nodes seen (yet)"
        lines = [f"{len(seen)} nearby node{'s' if len(seen) != 1 else ''} (announced on the LAN, unverified):"]
        for n in seen:
            rec = self.net.directory.lookup(n.name)
            if rec is None:
                status = "not paired"
            elif fingerprint(rec.public_key) == n.fingerprint:
                status = "paired" if rec.source == "peers file" else "known (node directory)"
            else:
                status = f"NOT the key pinned for {n.name} ({fingerprint(rec.public_key)})"
            where = ", ".join(host_port(a, n.port) for a in n.addresses) or f"port {n.port}"
            code = f", shows code {n.pair_number}" if n.pair_number is not None else ""
            lines.append(f"  {n.name}  {where}  key {n.fingerprint}  {status}{code}")
        return "\n".join(lines)

    def unpair(self, name: str) -> str:
        """`unpair NAME`: forget a paired node (its peers-file entry)."""
        path = self.net.directory.unpin_peer(name)
        if path is None:
            raise ValueError(f"{name} is not in this node's peers file")
        return f"{name} removed from {path}; pair again to reach it"

    def pair_code(self) -> tuple[str, str]:
        """`pair`: a new code, and what to type on the other node."""
        code = self.pairing.new_code()
        if self.routers:   # not reachable directly: the other node comes through a router
            return code, f"pair {code} {self.net.our_name} via {self.routers[0]}"
        return code, f"pair {code}"

    def pair_join(self, code: str, target: str | None) -> str:
        """`pair CODE [NODE|HOST:PORT|NODE via ROUTER]` (blocking): what was pinned, or ValueError
        saying why not."""
        try:
            code = pairing.parse_code(code)
            relay = None
            if target is not None and " via " in f" {target} ":
                node, _, router = target.partition(" via ")
                node, router = node.strip(), router.strip()
                if not node or not router or " " in node or " " in router:
                    raise ValueError("usage: pair CODE NODE via ROUTER (ROUTER: a node's name or HOST:PORT)")
                relay = (RELAY_MAGIC, {"relay": node, "from": self.net.our_name})
                target = router
            return self.pairing.join(code, self._addresses(code, target, prefer_known=relay is not None), relay)
        except (pairing.PairingError, PeersFileError) as e:
            raise ValueError(str(e)) from None
        except ValueError:
            raise
        except Exception as e:
            log.exception("pairing failed")
            raise ValueError(repr(e)) from None

    def _addresses(self, code: str, target: str | None, prefer_known: bool) -> list[tuple[str, int]]:
        """Where to dial for `pair CODE [TARGET]`: the nearby node showing the code's number, a
        nearby node or a known node by name (`prefer_known`: a known one first: a router), or
        HOST:PORT. Each address a nearby node announced, to be tried in turn."""
        if target is None:
            number = pairing.code_number(code)
            found = self.discovery.find(pair_number=number, wait=FIND_CODE_WAIT) if self.discovery.active else []
            if not found:
                raise ValueError(f"no nearby node shows a code numbered {number}; give its address: "
                                 f"pair {code} HOST:PORT (its net port)")
            if len({(n.name, n.fingerprint) for n in found}) > 1:
                raise ValueError(f"several nearby nodes show a code numbered {number} "
                                 f"({', '.join(sorted(n.name for n in found))}); name one: pair {code} NODE")
            return [(a, found[0].port) for a in found[0].addresses]
        rec = self.net.directory.lookup(target)
        known = [(rec.host, rec.port)] if rec is not None and not rec.routers else []
        if known and prefer_known:
            return known
        found = self.discovery.find(name=target) if self.discovery.active else []
        if len(found) == 1 and found[0].addresses:
            return [(a, found[0].port) for a in found[0].addresses] + known
        if len(found) > 1 and not known:
            raise ValueError(f"several nearby nodes are called {target} (different keys): give HOST:PORT")
        if known:
            return known
        host, port = parse_host_port(target, None)
        if port is None:
            raise ValueError(f"{target} is not a nearby or known node; give HOST:PORT (its net port)")
        return [(host, port)]
