"""Capabilities as Kinode's kernel handles them, seen from guests (the capprobe package, built
against plain `process-v0`): caps attached to a message, save and drop, the messaging check on
responses, what spawn grants, and who hears requests from other nodes.

The rules (also in fixtures/capabilities.json, with the encodings), from kinode-dao/kinode v0.9.5:
- kinode/src/kernel/standard_host.rs, `send_request`/`send_response`: attached caps go through the
  caps oracle's `FilterCaps` before the message leaves; `spawn`: the child gets the filtered
  requested caps plus messaging caps to itself and to its parent, the parent one to the child.
- kinode/src/kernel/mod.rs, `FilterCaps`: a cap is kept if the sender issued it or holds it; the
  event loop checks every local message, request or response, against `public` or a messaging cap
  (a refused response is dropped, its requester times out); a message from another node reaches
  any process holding the network cap (`public` plays no part); one sent to another node needs it.
- kinode/src/state.rs, `bootstrap`: an installed process holds a messaging cap to itself.
"""
from __future__ import annotations

import json
import re

import pytest
from conftest import REPO, wait_for

PACKAGES = REPO / "tests" / "conformance" / "packages"
PKG = "capprobe:test.os"
FIX = json.loads((REPO / "tests" / "conformance" / "fixtures" / "capabilities.json").read_text())["encodings"]
NAMES = ("giver", "taker", "secret", "hidden", "listener")


def addr(node: str, name: str) -> str:
    return f"{node}@{name}:{PKG}"


def messaging(node: str, name: str) -> str:
    """A messaging cap as the probe prints it: issuer, then params (upstream: the JSON "messaging")."""
    return f'{addr(node, name)} {FIX["messaging_params"]}'


def start(node_factory, name: str = "fake.dev"):
    n = node_factory(name, extra_args=["--packages", str(PACKAGES)])
    for proc in NAMES:
        if not any(f"{PKG}: {proc} ready" in ln for ln in n.lines):
            n.expect(rf"{re.escape(PKG)}: {proc} ready", 60)
    return n


def step(node, who: str, what: str, timeout: float = 30, having: str = "") -> dict:
    """The JSON of the probe's first line `WHO WHAT JSON` (holding `having`), waiting for it;
    processes print concurrently, so lines are looked for in all the output, in any order."""
    head = f"{PKG}: {who} {what} {{"
    found: list[str] = []

    def seen() -> bool:
        found[:] = [ln for ln in node.lines if head in ln and having in ln][:1]
        return bool(found)
    wait_for(seen, timeout, f"{node.name}: a line {head!r} holding {having!r}")
    return json.loads(found[0].split(f"{who} {what} ", 1)[1])


@pytest.fixture
def node(node_factory):
    return start(node_factory)


def test_attached_caps_are_filtered_delivered_and_kept_by_save(node):
    me = "fake.dev"
    node.type(f"m {addr(me, 'giver')} give")
    # giver attached messaging caps to secret (held) and to hidden (not held), one it issues itself,
    # and the read cap to its pkg drive (held since its install, as upstream's); all but hidden's
    # were delivered (params in upstream's encoding: serde_json's compact text, keys sorted)
    got = step(node, "taker", "got")
    pkg_read = f'{me}@vfs:distro:sys {FIX["pkg_drive_read_params"].replace("PACKAGE", PKG)}'
    assert got["caps"] == sorted([messaging(me, "secret"), f'{addr(me, "giver")} "custom"', pkg_read])
    # given is not held: before saving, taker may not message secret (refused: timeout, as upstream)
    assert step(node, "taker", "before-save") == {"answer": "error:timeout"}
    # after save-capabilities the given caps are held; the cap it was never given is not
    saved = step(node, "taker", "saved")["held"]
    assert messaging(me, "secret") in saved and f'{addr(me, "giver")} "custom"' in saved
    assert messaging(me, "hidden") not in saved and pkg_read in saved
    # what every installed process holds (state.rs's bootstrap): messaging to itself, its pkg drive
    assert messaging(me, "taker") in saved
    assert f'{me}@vfs:distro:sys {FIX["pkg_drive_write_params"].replace("PACKAGE", PKG)}' in saved
    after = step(node, "taker", "after-save")
    assert after == {"answer": "secret here", "hidden": "error:timeout"}
    # the response's caps went through the same filter: its own messaging cap kept, hidden's not
    assert step(node, "giver", "give") == {"answer": "taken", "caps": [messaging(me, "taker")]}
    assert any(re.search(r"taker:capprobe:test\.os may not message hidden:capprobe:test\.os", ln)
               for ln in node.lines)
    assert not any(re.search(r"hidden heard .*taker", ln) for ln in node.lines)


def test_a_response_is_checked_like_a_request(node):
    me = "fake.dev"
    # refused: hidden hears the question but holds no messaging cap to secret (not public), so its
    # answer is dropped and secret's request times out
    node.type(f"m {addr(me, 'secret')} ask")
    assert step(node, "hidden", "heard", having="question") == {"from": addr(me, "secret"), "body": "question"}
    node.expect(r"hidden:capprobe:test\.os may not message secret:capprobe:test\.os .*response refused", 10)
    assert step(node, "secret", "ask") == {"answer": "error:timeout"}
    # the positive control, the Kinode idiom: secret attaches a messaging cap to itself, hidden
    # saves it, and the same answer arrives
    node.type(f"m {addr(me, 'secret')} ask-with-cap")
    assert step(node, "secret", "ask-with-cap") == {"answer": "answer"}


def test_parent_and_child_get_messaging_caps_as_upstream_grants_them(node):
    me = "fake.dev"
    node.type(f"m {addr(me, 'secret')} spawn")
    spawned = step(node, "secret", "spawned")
    assert spawned["kid"] == addr(me, "kid")
    assert messaging(me, "kid") in spawned["held"]              # the parent: a cap to the child
    started = step(node, "kid", "started")
    # the child: caps to itself and its parent, nothing it did not ask for
    assert started["held"] == sorted([messaging(me, "kid"), messaging(me, "secret")])
    # with them, the child reaches its (private) parent; a private sibling it holds nothing for refuses
    assert step(node, "secret", "heard", having="hello-parent") == {"from": addr(me, "kid"), "body": "hello-parent"}
    assert step(node, "kid", "to-hidden") == {"answer": "error:timeout"}
    assert step(node, "secret", "before-drop") == {"answer": "kid here"}
    # upstream has no parent exception: once the parent drops its cap, the child refuses it
    after = step(node, "secret", "after-drop")
    assert after["answer"] == "error:timeout" and messaging(me, "kid") not in after["held"]
    # the child's on-exit request reaches its parent with its caps filtered as any request's, and
    # expecting no answer (upstream: nobody is left to hear it)
    node.type(f"m {addr(me, 'kid')} leave")
    step(node, "kid", "leaving")
    assert step(node, "secret", "bye") == {"caps": [messaging(me, "secret")], "expects_response": None}


def test_remote_requests_reach_private_processes_that_hold_the_network_cap(node_factory):
    fake, fake2 = start(node_factory, "fake.dev"), start(node_factory, "fake2.dev")
    terminal = "fake.dev@terminal:terminal:sys"
    # listener is not public but holds the network cap: it hears fake.dev, as upstream
    assert fake.run(f"m -a 5 {addr('fake2.dev', 'listener')} hello", until="listener here")[0] == 0
    assert step(fake2, "listener", "heard", having="hello") == {"from": terminal, "body": "hello"}
    # hidden is not public and lacks the network cap: fake2 drops the request, hidden never hears it
    fake.type(f"m {addr('fake2.dev', 'hidden')} hello")
    fake2.expect(rf"hidden:capprobe:test\.os has no network capability: request from {re.escape(terminal)} "
                 r"dropped", 20)
    # a response is checked as a request: listener hands the remote request on to hidden, whose
    # answer would leave the node without the network cap, so it is refused and fake's `m` times out
    lines = fake.run(f"m -a 3 {addr('fake2.dev', 'listener')} forward", until="Target did not")[1]
    assert step(fake2, "hidden", "heard", having="question") == {"from": addr("fake2.dev", "listener"),
                                                                 "body": "question"}
    fake2.expect(rf"hidden:capprobe:test\.os has no network capability: response to {re.escape(terminal)} "
                 r"refused", 10)
    assert not any("answer" in ln for ln in lines), lines
    assert not any(re.search(r"hidden heard .*\"hello\"", ln) for ln in fake2.lines)


class _Stub:
    """A minimal endpoint for the kernel: records what reaches it."""
    public = False
    hears_network = True
    trusted = False
    parent = None
    current = None
    current_blob = None

    def __init__(self, node: str, name: str, caps: set):
        from host.messages import Address, ProcessId
        self.id = ProcessId(name, "capprobe", "test.os")
        self.address = Address(node, self.id)
        self.capabilities = caps
        self.delivered: list = []
        self.failed: list = []

    def deliver(self, km) -> None:
        self.delivered.append(km)

    def fail(self, mid: int, kind: str) -> None:
        self.failed.append(kind)

    def fail_node(self, node: str, kind: str) -> None: ...
    def add_pending(self, mid: int, pending) -> None: ...
    def stop(self) -> None: ...

    def has_cap(self, cap) -> bool:
        return cap.normalised() in self.capabilities

    def was_given(self, cap) -> bool:
        return False


def test_our_caps_come_back_from_a_peer_only_if_we_gave_them_out(tmp_path):
    """Upstream prunes a cap issued by this node that a peer sends, unless this node signed it
    (kernel/standard_host.rs, kernel_message_to_process_receive); our wire has no signatures, so
    the kernel remembers which of its caps went to peers."""
    from host.kernel.kernel import Kernel, messaging_cap
    from host.messages import Address, Capability, KernelMessage, ProcessId, Request
    from host.runtime.wasm import Runtime
    from host.settings import runtime_from_environment

    class Terminal:
        def process_output(self, pid, text, verbosity=0) -> None: ...
        def info(self, text) -> None: ...
        def error(self, text) -> None: ...

    class Net:
        def __init__(self) -> None:
            self.sent: list = []

        def send(self, km, on_error) -> None:
            self.sent.append(km)

    kernel = Kernel("fake.dev", tmp_path, Runtime(runtime_from_environment()), Terminal())
    net = kernel.net = Net()
    network = kernel.network_cap()       # upstream's encoding of the network cap
    assert (str(network.issuer.process), network.params) == (FIX["network"]["issuer_process"],
                                                              FIX["network"]["params"])
    ours = Capability.make(Address("fake.dev", ProcessId("secret", "capprobe", "test.os")), "messaging")
    never_sent = Capability.make(Address("fake.dev", ProcessId("hidden", "capprobe", "test.os")), "messaging")
    theirs = Capability.make(Address("fake2.dev", ProcessId("x", "y", "z")), {"kind": "read"})
    sender = _Stub("fake.dev", "giver", {kernel.network_cap(), ours})
    listener = _Stub("fake.dev", "listener", {kernel.network_cap()})
    for e in (sender, listener):
        kernel.register(e)
    peer = Address("fake2.dev", ProcessId("p", "q", "r"))
    # giver gives fake2 a cap it holds, and tries one it does not hold: only the first leaves
    kernel.send_request(sender, peer, Request(body=b"take", capabilities=[ours, never_sent]), None, None)
    assert net.sent[-1].message.capabilities == [ours]
    # fake2 hands caps to listener: ours that went out, ours that never did, and its own
    km = KernelMessage(1, peer, listener.address, None, Request(body=b"back", capabilities=[ours, never_sent, theirs]))
    kernel.from_network(km)
    assert listener.delivered[-1].message.capabilities == [ours, theirs.normalised()]
    # a third node hands back the same cap of ours, which we gave to fake2, not to it: pruned
    # (upstream: only fake2 holds our signature on it); its own cap still passes
    other = Address("fake3.dev", ProcessId("p", "q", "r"))
    mine3 = Capability.make(Address("fake3.dev", ProcessId("x", "y", "z")), "messaging")
    kernel.from_network(KernelMessage(4, other, listener.address, None, Request(body=b"steal", capabilities=[ours, mine3])))
    assert listener.delivered[-1].message.capabilities == [mine3.normalised()]
    kernel.send_request(sender, other, Request(body=b"take", capabilities=[ours]), None, None)
    kernel.from_network(KernelMessage(5, other, listener.address, None, Request(body=b"back", capabilities=[ours])))
    assert listener.delivered[-1].message.capabilities == [ours]
    # the refusal's control: a process without the network cap hears nothing from fake2
    deaf = _Stub("fake.dev", "hidden", {messaging_cap(Address("fake.dev", ProcessId("hidden", "capprobe", "test.os")))})
    kernel.register(deaf)
    kernel.from_network(KernelMessage(2, peer, deaf.address, None, Request(body=b"hi")))
    kernel.from_network(KernelMessage(3, peer, listener.address, None, Request(body=b"hi")))
    assert deaf.delivered == [] and listener.delivered[-1].message.body == b"hi"
