# world: kinode-py:host-ext/process-v0-portable@0.1.0
"""Capability probe: one component run as several processes of its package (see pkg/manifest.json),
each acting by its name. It attaches, saves, drops and uses capabilities through Kinode's plain
`standard` imports and prints what it saw, one `NAME WHAT JSON` line per step, for
tests/conformance/test_capabilities.py."""
import json

import wit_world
from process_lib import (
    Address,
    Capability,
    ProcessId,
    Request,
    Response,
    SendError,
    await_message,
    our_capabilities,
    println,
    run,
    sibling,
    spawn,
    to_wit_address,
)
from wit_world.imports import standard

MESSAGING = '"messaging"'   # upstream's params of a messaging cap: the JSON string "messaging"
ME = {"name": ""}


def show(what: str, value) -> None:
    println(f"{ME['name']} {what} {json.dumps(value, sort_keys=True)}")


def cap_text(c: Capability) -> str:
    return f"{c.issuer} {c.params}"


def messaging(a: Address) -> Capability:
    return Capability(a, MESSAGING)


def held() -> list:
    return sorted(cap_text(c) for c in our_capabilities())


def ask(target: Address, body: str, caps=(), timeout: int = 3) -> str:
    """Send `body`, wait for the answer: its body, or `error:KIND`."""
    try:
        answer = Request.to(target).body(body.encode()).capabilities(list(caps)) \
            .send_and_await_response(timeout)
    except SendError as e:
        return f"error:{e.kind}"
    return answer.body.decode("utf-8", "replace")


def save(caps) -> None:
    standard.save_capabilities([c.to_wit() for c in caps])


def drop(caps) -> None:
    standard.drop_capabilities([c.to_wit() for c in caps])


def giver(our: Address, cmd: str) -> None:
    if cmd == "give":
        # caps it holds (from its manifest, and its pkg drive's read cap from the install), one it
        # does not hold, one it issues itself: the kernel keeps all but the one not held
        vfs = Address(our.node, ProcessId("vfs", "distro", "sys"))
        pkg_read = Capability(vfs, json.dumps({"drive": f"/{our.package_id()}/pkg", "kind": "read"},
                                              separators=(",", ":")))
        caps = [messaging(sibling(our, "secret")), messaging(sibling(our, "hidden")),
                Capability(our, '"custom"'), pkg_read]
        try:
            answer = Request.to(sibling(our, "taker")).body(b"take").capabilities(caps) \
                .send_and_await_response(10)
        except SendError as e:
            show("give", {"error": e.kind})
            return
        show("give", {"answer": answer.body.decode(), "caps": sorted(cap_text(c) for c in answer.capabilities)})


def taker(our: Address, msg) -> None:
    got = list(msg.capabilities)
    show("got", {"caps": sorted(cap_text(c) for c in got)})
    secret, hidden = sibling(our, "secret"), sibling(our, "hidden")
    show("before-save", {"answer": ask(secret, "who")})        # holds no cap to secret yet
    save([messaging(hidden)])                                  # never given to it: not kept
    save(got)                                                  # given on the message: kept
    show("saved", {"held": held()})
    show("after-save", {"answer": ask(secret, "who"), "hidden": ask(hidden, "who")})
    # a response carries caps as a request does: filtered to those it holds or issued
    Response().body(b"taken").capabilities([messaging(our), messaging(hidden)]).send()


def secret(our: Address, msg, cmd: str) -> None:
    hidden = sibling(our, "hidden")
    if cmd == "ask":              # hidden holds no cap to us: its answer is refused, as upstream
        show("ask", {"answer": ask(hidden, "question")})
    elif cmd == "ask-with-cap":   # the Kinode idiom: hand the answerer a messaging cap to us
        show("ask-with-cap", {"answer": ask(hidden, "question", [messaging(our)])})
    elif cmd == "spawn":
        kid = spawn("kid", f"{our.package_id()}/pkg/capprobe.wasm", request_capabilities=[], public=False)
        kid_address = Address(our.node, kid)
        show("spawned", {"kid": str(kid_address), "held": held()})
        show("before-drop", {"answer": ask(kid_address, "who", timeout=10)})
        drop([messaging(kid_address)])
        show("after-drop", {"answer": ask(kid_address, "who"), "held": held()})
    elif msg.expects_response is not None:
        Response().body(f"{ME['name']} here".encode()).send()


def hidden(our: Address, msg, cmd: str) -> None:
    if cmd == "question":
        save(msg.capabilities)
        Response().body(b"answer").send()
    elif msg.expects_response is not None:
        Response().body(f"{ME['name']} here".encode()).send()


def listener(our: Address, msg, cmd: str) -> None:
    if cmd == "forward":          # hidden answers the remote asker directly: it lacks the network cap
        Request.to(sibling(our, "hidden")).body(b"question").inherit().send()
    elif msg.expects_response is not None:
        Response().body(f"{ME['name']} here".encode()).send()


def kid(our: Address) -> None:
    """A spawned child: it holds messaging caps to itself and its parent, and nothing else."""
    show("started", {"held": held()})
    Request.to(sibling(our, "secret")).body(b"hello-parent").send()
    show("to-hidden", {"answer": ask(sibling(our, "hidden"), "who")})


def leave(our: Address) -> None:
    """End, leaving a request for the parent that carries a cap held and one not held."""
    caps = [messaging(sibling(our, "secret")), messaging(sibling(our, "hidden"))]
    request = standard.Request(False, 5, b"bye", None, [c.to_wit() for c in caps])
    standard.set_on_exit(standard.OnExit_Requests([(to_wit_address(sibling(our, "secret")), request, None)]))
    show("leaving", {})


def main(our: Address) -> None:
    name = ME["name"] = our.process.process_name
    println(f"{name} ready")
    if name == "kid":
        kid(our)
    while True:
        try:
            msg = await_message()
        except SendError as e:
            show("send-error", {"kind": e.kind})
            continue
        if not msg.is_request:
            continue
        cmd = msg.body.decode("utf-8", "replace").strip().strip('"')
        show("heard", {"from": str(msg.source), "body": cmd})
        if cmd == "bye":
            show("bye", {"caps": sorted(cap_text(c) for c in msg.capabilities),
                         "expects_response": msg.expects_response})
        if name == "kid" and cmd == "leave":
            leave(our)
            return
        if name == "giver":
            giver(our, cmd)
        elif name == "taker" and cmd == "take":
            taker(our, msg)
        elif name == "secret":
            secret(our, msg, cmd)
        elif name == "hidden":
            hidden(our, msg, cmd)
        elif name == "listener":
            listener(our, msg, cmd)
        elif msg.expects_response is not None:
            Response().body(f"{name} here".encode()).send()


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
