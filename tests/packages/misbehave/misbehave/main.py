# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""A process that misbehaves when asked (by a terminal `m` command), for the fault tests."""
import wit_world
from process_lib import (
    Address,
    ProcessId,
    Request,
    SendError,
    await_message,
    get_state,
    println,
    run,
    set_on_exit,
    set_state,
    to_wit_address,
)
from wit_world.imports import standard

FT = ProcessId("file_transfer", "file_transfer", "template.os")
VFS = ProcessId("vfs", "distro", "sys")

GARBAGE_BODIES = [b"\xff\xfe\x00garbage", b"{", b"[]", b"42", b'"Nope"', b'{"Download": 5}',
                  b'{"Download": {"name": 7, "target": null, "is_requestor": "yes"}}',
                  b'{"Chunk": {"name": "x", "offset": 0, "length": 99}}', b'{"Size": 1e400}',
                  b'{"Progress": {"name": "x", "progress": 123456789012345678901234567890}}']
VFS_BODIES = [b"garbage", b'{"path": 5, "action": "Read"}', b'{"path": "/misbehave:test.os/d", "action": {"Nope": 1}}',
              b'{"path": "/misbehave:test.os/d/x", "action": {"ReadExact": -1}}',
              b'{"path": "/misbehave:test.os/d/x", "action": {"SetLen": 1e30}}']
ESCAPES = ["/misbehave:test.os/d/../../../etc/passwd", "/file_transfer:template.os/files/my_file.txt",
           "/../etc/passwd", "/misbehave:test.os/d/a\\..\\..\\b"]


def ask(target: Address, body: bytes) -> str:
    try:
        return Request.to(target).body(body).expects_response(3).send_and_await_response().body.decode("utf-8", "replace")
    except SendError as e:
        return f"no answer ({e.kind})"


def main(our: Address) -> None:
    println("begin")
    while True:
        try:
            msg = await_message()
        except SendError as e:
            println(f"send error {e.kind} for {e.target} with context {e.context!r}")
            continue
        cmd = msg.body.decode("utf-8", "replace").strip().strip('"')
        if cmd == "ping":
            println("pong")
        elif cmd.startswith("setstate "):
            set_state(cmd.split(" ", 1)[1].encode())
            println("state saved")
        elif cmd == "getstate":
            state = get_state()
            println(f"state is {state.decode() if state is not None else None}")
        elif cmd == "timeout":
            # a request to ourselves that we never answer: the kernel must time it out, with its context
            Request.to(our).body("unanswered").expects_response(1).context(b"ctx-123").send()
        elif cmd.startswith("remote "):
            # misbehave has no network capability: the kernel must refuse this
            target = Address(cmd.split(" ", 1)[1], ProcessId("misbehave", "misbehave", "test.os"))
            Request.to(target).body("ping").expects_response(5).context(b"remote").send()
        elif cmd == "farewell":
            # on exit, the kernel sends this to the terminal (which prints it) instead of restarting us
            set_on_exit([(Address(our.node, ProcessId("terminal", "terminal", "sys")), b"farewell from misbehave")])
            println("on-exit set")
        elif cmd == "poke":
            # quiet is not public and misbehave holds no capability for it: refused by the kernel
            Request.to(Address(our.node, ProcessId("quiet", "misbehave", "test.os"))).body("poke") \
                .expects_response(5).context(b"poke").send()
        elif cmd == "unanswered":
            pass
        elif cmd == "raise":
            raise RuntimeError("asked to raise")
        elif cmd == "spin":
            n = 0
            while True:
                n += 1
        elif cmd == "bigblob":
            blob = standard.LazyLoadBlob(None, bytes(3 << 20))
            standard.send_request(to_wit_address(our), standard.Request(False, None, b"x", None, []), None, blob)
        elif cmd == "garbage":
            for body in GARBAGE_BODIES:
                println(f"file_transfer answered {body[:20]!r}: {ask(Address(our.node, FT), body)[:120]}")
            for body in VFS_BODIES:
                println(f"vfs answered {body[:20]!r}: {ask(Address(our.node, VFS), body)[:160]}")
            println("garbage done")
        elif cmd == "escape":
            Request.to(Address(our.node, VFS)).body({"path": "/misbehave:test.os/d", "action": "CreateDrive"}) \
                .send_and_await_response(3)
            for path in ESCAPES:
                answer = ask(Address(our.node, VFS), f'{{"path": "{path}", "action": "Read"}}'.replace("\\", "\\\\").encode())
                println(f"escape {path}: {answer[:160]}")
            println("escape done")


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
