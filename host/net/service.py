"""`net:distro:sys`: the network as a process sees it. Local processes ask it, in Kinode's `NetAction`
MessagePack shapes (rmp-serde's: unit variants as their name, others as a one-entry map, structs as
arrays), for the connected peers, one peer's identity, a diagnostics text, or to `Sign` and `Verify`
bytes; a request from a peer that is no routing action is a `hi`: printed and answered "delivered".
As upstream (kinode v0.9.5 kinode/src/net/mod.rs handle_local_request) it is not public, and a local
request that is no `NetAction` is dropped."""
from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from host.kernel.host_service import HostService
from host.kernel.kernel import Kernel
from host.messages import Address, Blob, KernelMessage, ParseError, ProcessId, Request, Response

if TYPE_CHECKING:
    from host.net.network import Network

log = logging.getLogger("host.net.service")

NET_ID = ProcessId("net", "distro", "sys")
# what upstream's net takes from peers (router business); anything else from a peer is a `hi`
REMOTE_ACTIONS = {"ConnectionRequest", "KnsUpdate", "KnsBatchUpdate"}
# upstream's NetAction variants in declaration order (the old rmp-serde form uses the index)
ACTIONS = ["ConnectionRequest", "KnsUpdate", "KnsBatchUpdate", "GetPeers", "GetPeer",
           "GetDiagnostics", "Sign", "Verify"]


def decode_action(body: bytes) -> tuple[str, Any] | None:
    """(variant, value) if `body` is a MessagePack `NetAction`, else None. Accepts rmp-serde's
    current enum form and its older `[index, [args]]` one."""
    try:
        value = msgpack.unpackb(body, raw=False)
    except Exception:
        return None
    names = ACTIONS
    if isinstance(value, str) and value in names:
        return value, None
    if isinstance(value, dict) and len(value) == 1:
        (name, arg), = value.items()
        if name in names:
            return name, arg
    if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], int)
            and 0 <= value[0] < len(names) and isinstance(value[1], list)):
        args = value[1]
        return names[value[0]], args[0] if len(args) == 1 else args
    return None


def encode_response(variant: str, value: Any) -> bytes:
    """A `NetResponse` as rmp-serde writes it (newtype variant: a one-entry map)."""
    return msgpack.packb({variant: value}, use_bin_type=True)


class NetService(HostService):
    public = False         # as upstream: a process needs a messaging capability; peers send it `hi`s
    hears_network = True

    def __init__(self, kernel: Kernel, net: Network | None):
        super().__init__(kernel, NET_ID)
        self.net = net

    # ---- what the queries answer (also used by the terminal's built-ins) -------------------
    def identity(self, name: str) -> list | None:
        """Kinode's `Identity` (name, networking_key, routing) of a node we know an address for."""
        if self.net is None:
            return None
        if name == self.kernel.node:
            e = self.net.entry()
            host, port, key, routers = e.get("host"), e.get("port"), e["public_key"], e.get("routers")
        else:
            rec = self.net.directory.lookup(name)
            if rec is None:
                return None
            host, port, key, routers = rec.host, rec.port, bytes(rec.public_key).hex(), list(rec.routers)
        if routers:  # an indirect node, as upstream's NodeRouting::Routers
            return [name, f"0x{key}", {"Routers": list(routers)}]
        return [name, f"0x{key}", {"Direct": [host, {"tcp": port}]}]

    def peers(self) -> list[list]:
        if self.net is None:
            return []
        found = (self.identity(name) for name in self.net.connected_peers())
        return [i for i in found if i is not None]

    def diagnostics(self) -> str:
        if self.net is None:
            return "networking is off on this node\r\n"
        me = self.identity(self.kernel.node)
        activity = self.net.peer_activity()
        lines = [f"our Identity: {format_identity(me)}",
                 f"we have connections with {len(activity)} peers:"]
        lines += [f"    {name}, last message {age:.0f}s ago" for name, age in sorted(activity.items())]
        lines += self.net.routing_status()
        lines += self.net.guard_status()
        return "".join(line + "\r\n" for line in lines)

    # ---- Sign and Verify ----------------------------------------------------------------------
    def _signing_key(self) -> ed25519.Ed25519PrivateKey | None:
        """Upstream signs with its Ed25519 networking key; ours is an X25519 key (it cannot sign),
        so the signing key is derived from it: one key per node, kept nowhere else."""
        if self.net is None:
            return None
        seed = hashlib.sha256(b"kinode-py net Sign\0" + self.net.identity.private).digest()
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)

    def sign(self, source: Address, data: bytes) -> bytes | None:
        key = self._signing_key()   # upstream signs the source address, then the blob (NetAction::Sign)
        return None if key is None else key.sign(str(source).encode() + data)

    def verify(self, signer: Address, signature: bytes, data: bytes) -> bool:
        """Only this node's signatures can be checked: the directory holds each node's X25519 key,
        not a signing key (upstream too answers false for a signer it has no key for)."""
        key = self._signing_key()
        if key is None or signer.node != self.kernel.node:
            return False
        try:
            key.public_key().verify(signature, str(signer).encode() + data)
            return True
        except InvalidSignature:
            return False

    # ---- messages ----------------------------------------------------------------------------
    def deliver(self, km: KernelMessage) -> None:
        if not isinstance(km.message, Request):
            return
        body = km.message.body
        action = decode_action(body)
        local = km.source.node == self.kernel.node
        if action is not None and not local and action[0] in REMOTE_ACTIONS:
            log.info("net: %s from %s ignored (no routers here)", action[0], km.source)
            return
        if action is None and local:
            log.info("net: a local request from %s that is no NetAction dropped (as upstream)", km.source)
            return
        if action is None or not local:
            # a `hi` (upstream: anything from a peer but its routing actions): printed at verbosity 0
            # as upstream, without its colour codes, and answered
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = "!!message parse error!!"
            self.kernel.terminal.info(f"{km.source.node}: {text}")
            self._answer(km, b"delivered")
            return
        name, arg = action
        if name == "GetPeers":
            self._answer(km, encode_response("Peers", self.peers()))
        elif name == "GetPeer":
            self._answer(km, encode_response("Peer", self.identity(arg) if isinstance(arg, str) else None))
        elif name == "GetDiagnostics":
            self._answer(km, encode_response("Diagnostics", self.diagnostics()))
        elif name == "Sign":
            data = km.lazy_load_blob.bytes if km.lazy_load_blob else b""
            sig = self.sign(km.source, data)
            if sig is None:
                self.kernel.terminal.error(f"net:distro:sys: Sign from {km.source}: networking is off on this node")
                return
            self._answer(km, msgpack.packb("Signed"), Blob(None, sig))
        elif name == "Verify":
            try:
                signer, signature = (arg["from"], arg["signature"]) if isinstance(arg, dict) else arg
                ok = self.verify(Address.parse(str(signer)), bytes(signature),
                                 km.lazy_load_blob.bytes if km.lazy_load_blob else b"")
            except (ValueError, TypeError, KeyError, ParseError) as e:
                log.info("net: bad Verify from %s: %s", km.source, e)
                return
            self._answer(km, encode_response("Verified", ok))
        else:  # no error variant upstream: the asker times out; say why here
            self.kernel.terminal.error(f"net:distro:sys: {name} from {km.source} is not supported on this node")

    def _answer(self, km: KernelMessage, body: bytes, blob: Blob | None = None) -> None:
        if km.rsvp is not None:
            self.kernel.route(KernelMessage(km.id, self.address, km.rsvp, None, Response(body=body), blob), self)


def format_identity(identity: list | None) -> str:
    """An `Identity` as the terminal shows it (upstream prints Rust's Debug form of the routing)."""
    if identity is None:
        return "(none)"
    name, key, routing = identity
    return f"{name}, networking key {key}, routing {format_routing(routing)}"


def format_routing(routing: dict) -> str:
    if "Routers" in routing:
        return "Routers([" + ", ".join(f'"{r}"' for r in routing["Routers"]) + "])"
    host, ports = routing["Direct"]
    shown = ", ".join(f'"{k}": {v}' for k, v in ports.items())
    return f'Direct {{ ip: "{host}", ports: {{{shown}}} }}'
