# world: kinode-py:host-ext/process-v0-portable@0.1.0
"""The two-toolchain conformance guest, in Python (componentize-py): the twin of
../../jsguest/guest/main.js, with the same commands and the same `guest STEP JSON` lines. Like the
JavaScript one it calls Kinode's ABI (`standard`) directly, not through process_lib, so both
toolchains make the same calls with the same values."""
import json
import time

import wit_world
from componentize_py_types import Err
from wit_world.imports import standard as wit

OUR = None


# ---- helpers --------------------------------------------------------------------------------------
def parse_address(text: str) -> wit.Address:
    node, proc = text.split("@")
    name, package, publisher = proc.split(":")
    return wit.Address(node, wit.ProcessId(name, package, publisher))


def addr_text(a) -> str:
    return f"{a.node}@{a.process.process_name}:{a.process.package_name}:{a.process.publisher_node}"


def cap_json(c) -> dict:
    return {"issuer": addr_text(c.issuer), "params": c.params}


def blob_json(b):
    return None if b is None else {"mime": b.mime, "hex": b.bytes.hex()}


def enum_name(e) -> str:   # as the WIT spells it, and as JavaScript sees it
    return e.name.lower().replace("_", "-")


def show(step: str, value) -> None:
    wit.print_to_terminal(0, f"guest {step} {json.dumps(value, ensure_ascii=False, separators=(',', ':'))}")


def json_bytes(v) -> bytes:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()


def request(body, expects=5, metadata=None, caps=None, inherit=False) -> wit.Request:
    return wit.Request(inherit, expects, json_bytes(body), metadata, caps or [])


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def message_json(source, msg) -> dict:
    m = msg.value if isinstance(msg, wit.Message_Request) else msg.value[0]
    out = {"source": addr_text(source), "kind": "request" if isinstance(msg, wit.Message_Request) else "response",
           "body": m.body.decode(), "metadata": m.metadata, "caps": [cap_json(c) for c in m.capabilities]}
    if isinstance(msg, wit.Message_Request):
        out["expects"] = m.expects_response
    else:
        out["context"] = None if msg.value[1] is None else msg.value[1].decode()
    return out


def await_response(target, req, blob=None, show_blob=True) -> dict:
    try:
        source, msg = wit.send_and_await_response(target, req, blob)
    except Err as e:
        return {"error": enum_name(e.value.kind), "target": addr_text(e.value.target)}
    return {**message_json(source, msg), "blob": blob_json(wit.get_blob()) if show_blob else None}


def receive_one():
    try:
        source, msg = wit.receive()
        return "msg", source, msg
    except Err as e:
        err, context = e.value
        return "err", err, context


def drive(name: str = "d") -> str:
    return f"/{OUR.process.package_name}:{OUR.process.publisher_node}/{name}"


def vfs(path: str, action, blob=None, show_blob=True) -> dict:
    return await_response(parse_address("our@vfs:distro:sys"), request({"path": path, "action": action}), blob,
                          show_blob)


# ---- commands -------------------------------------------------------------------------------------
def peer(target: str) -> None:
    got = await_response(parse_address(target), request({"echo": "héllo ✓ 🎉"}, metadata='{"from":"py"}'),
                         wit.LazyLoadBlob("application/x-test", pattern(300, 3)))
    show("peer", got)
    wit.send_request(parse_address(target), request({"echo": "second"}), b"ctx-py", None)
    kind, source, msg = receive_one()
    show("peer-context", message_json(source, msg) if kind == "msg" else {"error": enum_name(source.kind)})
    wit.send_requests([(parse_address(target), request({"echo": f"batch {i}"}), f"batch-ctx {i}".encode(),
                        wit.LazyLoadBlob(None, pattern(i * 10, i))) for i in (1, 2, 3)])
    answers = []
    for _ in range(3):
        k, src, m = receive_one()
        if k == "msg":
            blob = wit.get_blob()
            answers.append({"context": m.value[1].decode(), "body": json.loads(m.value[0].body),
                            "blob_len": len(blob.bytes) if blob else 0})
        else:
            answers.append({"error": enum_name(src.kind)})
    show("peer-batch", sorted(answers, key=lambda a: a.get("context", "")))


def answer_echo(source, req) -> None:
    blob = wit.get_blob()
    data = blob.bytes if blob else b""
    body = json.loads(req.body)
    show("echo-heard", {"source": addr_text(source), "body": body, "metadata": req.metadata,
                        "blob_len": len(data), "blob_sum": sum(data) % 1000000007,
                        "mime": blob.mime if blob else None})
    back = data[::-1]
    wit.send_response(wit.Response(False, json_bytes({"echoed": body["echo"], "by": "py"}), '{"answer":true}', []),
                      wit.LazyLoadBlob("application/x-reversed", back) if back else None)


def relay(target: str) -> None:
    """Ask the peer for a file of its drive, which the VFS sends us on its behalf."""
    show("relay", await_response(parse_address(target), request({"relay_read": True})))


def answer_relay() -> None:
    """Forward with `inherit`: the VFS answers the request being handled."""
    path = f"{drive('r')}/relay.txt"
    vfs(drive("r"), "CreateDrive")
    vfs(path, "Write", wit.LazyLoadBlob(None, b"relayed by py"))
    wit.send_request(parse_address("our@vfs:distro:sys"), request({"path": path, "action": "Read"}, expects=None,
                                                                  inherit=True), None, None)


def vfs_steps() -> None:
    d = drive()
    show("vfs create-drive", vfs(d, "CreateDrive"))
    data = pattern(1000, 11)
    show("vfs write", vfs(f"{d}/f.bin", "Write", wit.LazyLoadBlob(None, data)))
    read = vfs(f"{d}/f.bin", "Read")
    b = read["blob"]
    show("vfs read", {"body": read["body"], "mime": b and b["mime"], "same": bool(b) and b["hex"] == data.hex()})
    vfs(f"{d}/sub", "CreateDirAll")
    show("vfs read-dir", json.loads(vfs(d, "ReadDir")["body"]))
    show("vfs read-missing", json.loads(vfs(f"{d}/missing", "Read")["body"]))
    got = await_response(parse_address("our@vfs:distro:sys"), request({"path": d, "action": "Metadata"}, metadata='{"mine":1}'))
    show("vfs metadata", {"body": json.loads(got["body"]), "metadata": got["metadata"]})
    show("vfs root", json.loads(vfs("/", "ReadDir")["body"]))


def big_blob(n: int) -> None:
    path = f"{drive()}/big.bin"
    vfs(drive(), "CreateDrive")
    data = pattern(n, 5)
    w = vfs(path, "Write", wit.LazyLoadBlob("application/octet-stream", data), False)
    r = vfs(path, "Read", None, False)
    back = wit.get_blob()
    show("bigblob", {"write": w["body"], "read": r["body"], "len": None if back is None else len(back.bytes),
                     "same": back is not None and back.bytes == data})


def spawn_steps() -> None:
    wasm = f"/{OUR.process.package_name}:{OUR.process.publisher_node}/pkg/guest.wasm"
    try:
        child = wit.spawn("child", wasm, wit.OnExit_None_(), [], [OUR.process], False)
    except Err as e:
        show("spawn", {"error": enum_name(e.value)})
        return
    show("spawn", {"child": f"{child.process_name}:{child.package_name}:{child.publisher_node}"})
    show("spawn-answer", await_response(wit.Address(OUR.node, child), request({"child": "hello child"})))
    for what, name, path in (("taken", "child", wasm), ("missing", "other", "/nowhere/pkg/none.wasm")):
        try:
            wit.spawn(name, path, wit.OnExit_None_(), [], [], False)
            show(f"spawn-{what}", {"error": None})
        except Err as e:
            show(f"spawn-{what}", {"error": enum_name(e.value)})
    wit.send_request(wit.Address(OUR.node, child), request("bye", expects=None), None, None)


def timer() -> None:
    start = time.time()
    wit.send_request(parse_address("our@timer:distro:sys"), request({"SetTimer": 300}), b"timer-ctx", None)
    kind, source, msg = receive_one()
    got = message_json(source, msg) if kind == "msg" else {"error": enum_name(source.kind)}
    show("timer", {**got, "elapsed_ms": int((time.time() - start) * 1000)})


def state_set(value: str) -> None:
    wit.set_state(value.encode())
    kept = wit.get_state()
    show("state-set", {"state": None if kept is None else kept.decode()})


def state_clear() -> None:
    wit.clear_state()
    show("state-cleared", {"state": wit.get_state()})


def on_exit_steps(target: str) -> None:
    req = request({"echo": "on-exit"}, expects=None, metadata="m")
    wit.set_on_exit(wit.OnExit_Requests([(parse_address(target), req, wit.LazyLoadBlob("text/plain", b"bye"))]))
    got = wit.get_on_exit()
    addr, r, blob = got.value[0]
    show("on-exit", {"tag": "requests" if isinstance(got, wit.OnExit_Requests) else str(got),
                     "target": addr_text(addr), "body": r.body.decode(), "metadata": r.metadata,
                     "expects": r.expects_response, "blob": blob_json(blob)})
    wit.set_on_exit(wit.OnExit_Restart())
    show("on-exit-restored", {"tag": "restart" if isinstance(wit.get_on_exit(), wit.OnExit_Restart) else "other"})


def caps_steps(target: str) -> None:
    mine = sorted((cap_json(c) for c in wit.our_capabilities()), key=lambda c: c["issuer"] + c["params"])
    show("caps", mine)
    drv = vfs(drive(), "CreateDrive")
    read_cap = next((c for c in wit.our_capabilities() if '"read"' in c.params and drive() in c.params), None)
    got = await_response(parse_address(target), request({"take_caps": True}, caps=[read_cap] if read_cap else []))
    show("caps-given", {"drive": drv["body"], "given": cap_json(read_cap) if read_cap else None,
                        "answer": json.loads(got["body"]) if "body" in got else got})


def take_caps(req) -> None:
    given = req.capabilities
    wit.save_capabilities(given)

    def held(c) -> bool:
        return any(o.params == c.params and addr_text(o.issuer) == addr_text(c.issuer) for o in wit.our_capabilities())
    saved = [held(c) for c in given]
    wit.drop_capabilities(given)
    dropped = [not held(c) for c in given]
    wit.send_response(wit.Response(False, json_bytes({"received": [cap_json(c) for c in given], "saved": saved,
                                                      "dropped": dropped}), None, []), None)


def send_errors() -> None:
    pkg = f"{OUR.process.package_name}:{OUR.process.publisher_node}"
    wit.send_request(parse_address(f"our@nosuch:{pkg}"), request("hello", metadata="meta"), b"ctx-missing",
                     wit.LazyLoadBlob("text/plain", b"held"))
    kind, err, context = receive_one()
    if kind == "err":
        show("senderr missing-local", {
            "kind": enum_name(err.kind), "target": addr_text(err.target),
            "context": None if context is None else context.decode(), "body": err.message.value.body.decode(),
            "message": "request" if isinstance(err.message, wit.Message_Request) else "response",
            "blob": blob_json(err.lazy_load_blob)})
    else:
        show("senderr missing-local", {"kind": None})
    show("senderr unknown-node", await_response(parse_address(f"ghost.os@guest:{OUR.process.package_name}:test.os"),
                                                request("hello")))
    # a request expecting no response is not followed by an error (upstream drops it: no context)
    ghost = parse_address(f"ghost.os@guest:{OUR.process.package_name}:test.os")
    wit.send_request(ghost, request("quiet", expects=None), None, None)
    wit.send_request(ghost, request("loud"), b"ctx-loud", None)
    kind, err, context = receive_one()
    show("senderr unawaited", {"kind": enum_name(err.kind), "body": err.message.value.body.decode(),
                               "context": None if context is None else context.decode()} if kind == "err" else {"kind": None})


def prompt(target: str) -> None:
    """Ask the peer a question it answers only after a sub-request of its own (awaited, then one
    answered through `receive`), and meanwhile send it two more requests: one expecting no answer
    (it must not become the peer's prompting message) and one it answers at once."""
    t = parse_address(target)
    wit.send_request(t, request({"prompted": "py"}, expects=15), b"p1", None)
    wit.send_request(t, request({"noise": "quiet"}, expects=None), None, None)
    wit.send_request(t, request({"noise": "loud"}), b"p2", None)
    answers = []
    while len(answers) < 2:
        kind, a, b = receive_one()
        if kind == "err":
            answers.append({"context": None if b is None else b.decode(), "error": enum_name(a.kind)})
        elif isinstance(b, wit.Message_Request):
            # the peer's sub-request, answered only now: after all three requests reached it
            body = json.loads(b.value.body)
            wit.send_response(wit.Response(False, json_bytes({"sub_answer": body.get("sub")}), None, []), None)
        else:
            ctx = b.value[1]
            answers.append({"context": None if ctx is None else ctx.decode(), "body": json.loads(b.value[0].body)})
    show("prompt", sorted(answers, key=lambda x: x["context"] or ""))


PROMPTED = {}


def answer_prompted(source, req) -> None:
    """A request answered later: first an awaited sub-request (to the VFS), then one to the asker
    whose response comes through `receive`; the answer is sent in `answer_later`."""
    PROMPTED["vfs"] = vfs(drive(), "CreateDrive")["body"]
    wit.send_request(source, request({"sub": "from-py"}, expects=10), b"prompted-sub", None)


def answer_later(source, msg) -> None:
    if msg.value[1] != b"prompted-sub":
        return
    # the prompting message is again the request that started it all (Kinode restores it)
    wit.send_response(wit.Response(False, json_bytes({"answer": "py", "vfs": PROMPTED.get("vfs"),
                                                      "sub": json.loads(msg.value[0].body)}), None, []), None)


def noise(req) -> None:
    body = json.loads(req.body)
    if req.expects_response is None:
        show("noise-heard", body)
    else:   # answered twice: the second finds no request waiting for it and is dropped
        for _ in range(2):
            wit.send_response(wit.Response(False, json_bytes({"noise": body["noise"], "by": "py"}), None, []), None)


def kernel_ask(command, inherit=False) -> dict:
    got = await_response(parse_address("our@kernel:distro:sys"), request(command, inherit=inherit), None, False)
    return json.loads(got["body"]) if "body" in got else got


def kinit() -> None:
    """Install and start another process at run time as Kinode's terminal does a script
    (kinode/packages/terminal/terminal/src/lib.rs handle_run): read its wasm from the VFS,
    InitializeProcess with the bytes, message it before it runs, RunProcess; then grant and drop it
    a capability, read its persisted form back, and let it exit into its OnExit::Requests."""
    pkg = f"{OUR.process.package_name}:{OUR.process.publisher_node}"
    wasm, kid, me = f"/{pkg}/pkg/guest.wasm", f"kid:{pkg}", addr_text(OUR)
    vfs(wasm, "Read", None, False)   # the wasm is the blob now: passed on with `inherit`, as the terminal does
    on_exit = {"Requests": [[me, {"inherit": False, "expects_response": None, "body": list(json_bytes({"noise": "kid-exit"})),
                                  "metadata": None, "capabilities": []}, None]]}
    init = {"InitializeProcess": {"id": kid, "wasm_bytes_handle": wasm, "wit_version": 0, "on_exit": on_exit,
                                  "initial_capabilities": [{"issuer": f"{OUR.node}@vfs:distro:sys", "params": '"messaging"'}],
                                  "public": False}}
    out = {"init": kernel_ask(init, inherit=True)}
    kid_addr = parse_address(f"{OUR.node}@{kid}")
    # sent before it runs: it waits for the process (upstream's pre-boot queue)
    wit.send_request(kid_addr, request({"child": "early"}, expects=15), b"early", None)
    out["run"] = kernel_ask({"RunProcess": kid})
    kind, a, b = receive_one()
    out["early"] = {"context": b.value[1].decode(), "body": json.loads(b.value[0].body)} if kind == "msg" else {"error": enum_name(a.kind)}
    cap = {"issuer": me, "params": '"granted"'}
    has = {"Debug": {"HasCap": {"on": kid, "cap": cap}}}
    wit.send_request(parse_address("our@kernel:distro:sys"),   # unanswered, as upstream
                     request({"GrantCapabilities": {"target": kid, "capabilities": [cap]}}, expects=None), None, None)
    out["granted"] = kernel_ask(has)
    wit.send_request(parse_address("our@kernel:distro:sys"),   # unanswered, as upstream
                     request({"DropCapabilities": {"target": kid, "capabilities": [cap]}}, expects=None), None, None)
    out["dropped"] = kernel_ask(has)
    out["persisted"] = kernel_ask({"Debug": {"Process": kid}})
    out["no-bytes"] = kernel_ask({"InitializeProcess": {**init["InitializeProcess"], "id": f"kid2:{pkg}"}})
    out["run-missing"] = kernel_ask({"RunProcess": f"nobody:{pkg}"})
    wit.send_request(kid_addr, request("bye", expects=None), None, None)
    show("kinit", out)


def mp_str(text: str) -> bytes:   # MessagePack, just what NetAction needs (rmp-serde's shapes)
    b = text.encode()
    return (bytes([0xA0 | len(b)]) if len(b) < 32 else bytes([0xD9, len(b)])) + b


def mp_bytes_as_array(data: bytes) -> bytes:   # serde writes a Vec<u8> as an array of numbers
    return bytes([0xDC]) + len(data).to_bytes(2, "big") + b"".join(
        bytes([x]) if x < 128 else bytes([0xCC, x]) for x in data)


def net_ask(body: bytes, blob: bytes, timeout: int = 5) -> dict:
    try:
        _src, msg = wit.send_and_await_response(parse_address("our@net:distro:sys"), wit.Request(False, timeout, body, None, []),
                                                wit.LazyLoadBlob(None, blob))
    except Err as e:
        return {"error": enum_name(e.value.kind)}
    back = wit.get_blob()
    return {"body": msg.value[0].body.hex(), "blob": None if back is None else back.bytes.hex()}


def netsign() -> None:
    """process_lib's net::sign and net::verify: NetAction::Sign and Verify with the bytes in the blob."""
    me = addr_text(OUR)
    signed = net_ask(mp_str("Sign"), b"sign me")
    sig = bytes.fromhex(signed.get("blob") or "")
    verify = b"\x81" + mp_str("Verify") + b"\x92" + mp_str(me) + mp_bytes_as_array(sig)
    show("netsign", {"signed": signed, "verified": net_ask(verify, b"sign me").get("body"),
                     "tampered": net_ask(verify, b"sign me!").get("body"),
                     "not-an-action": net_ask(b"hello net", b"", 1).get("error"),
                     "private": net_private()})


def net_private() -> dict:
    """net is not public: without the messaging cap to it a request is refused; granted back
    through the kernel, it is answered again."""
    net_cap = next(c for c in wit.our_capabilities() if addr_text(c.issuer).endswith("@net:distro:sys"))
    wit.drop_capabilities([net_cap])
    without = net_ask(mp_str("GetPeers"), b"", 1)
    grant = {"GrantCapabilities": {"target": f"{OUR.process.process_name}:{OUR.process.package_name}:{OUR.process.publisher_node}",
                                   "capabilities": [cap_json(net_cap)]}}
    wit.send_request(parse_address("our@kernel:distro:sys"), request(grant, expects=None), None, None)
    return {"without-cap": without.get("error"), "granted-back": net_ask(mp_str("GetPeers"), b"").get("body")}


def rounds(n: int) -> None:
    """For bench/guests.py: N awaited requests to the VFS, timed."""
    vfs(drive(), "CreateDrive")
    start = time.time()
    for _ in range(n):
        vfs(drive(), "Metadata", None, False)
    show("rounds", {"n": n, "ms": int((time.time() - start) * 1000)})


def spawns(n: int) -> None:
    """For bench/guests.py: N children spawned, asked once and let go, timed."""
    wasm = f"/{OUR.process.package_name}:{OUR.process.publisher_node}/pkg/guest.wasm"
    start, ok = time.time(), 0
    for i in range(n):
        child = wit.spawn(f"bench-{i}", wasm, wit.OnExit_None_(), [], [OUR.process], False)
        target = wit.Address(OUR.node, child)
        ok += await_response(target, request({"child": "hi"}), None, False).get("kind") == "response"
        wit.send_request(target, request("bye", expects=None), None, None)
    show("spawns", {"n": n, "ok": ok, "ms": int((time.time() - start) * 1000)})


def unicode() -> None:
    text = "héllo ✓ 🎉 \u00ff end"
    wit.set_state(text.encode())
    # `len` as JavaScript counts it (UTF-16 code units), so both guests print the same line
    show("unicode", {"text": text, "len": sum(2 if ord(c) > 0xFFFF else 1 for c in text), "state": wit.get_state().decode()})


def child(parent: str) -> None:
    kind, source, msg = receive_one()
    if kind != "msg":
        return
    body = json.loads(msg.value.body)
    if body.get("caps"):   # run as a script from the terminal (scripts.json): show what it was given
        show("script-caps", sorted((cap_json(c) for c in wit.our_capabilities()), key=lambda c: c["issuer"] + c["params"]))
        show("script-root", json.loads(vfs("/", "ReadDir")["body"]))   # the root cap at work
        return
    wit.send_response(wit.Response(False, json_bytes({"reply": f"{body['child']}, from {OUR.process.process_name}",
                                                      "parent_heard": addr_text(source) == parent}), None, []), None)
    receive_one()  # live on until the parent says goodbye, so its name stays taken meanwhile


def handle(source, msg) -> None:
    if not isinstance(msg, wit.Message_Request):
        answer_later(source, msg)
        return
    req = msg.value
    try:
        body = json.loads(req.body)
    except ValueError as e:
        show("bad-body", {"error": str(e)})
        return
    if isinstance(body, dict):
        if "echo" in body:
            answer_echo(source, req)
        elif "take_caps" in body:
            take_caps(req)
        elif "relay_read" in body:
            answer_relay()
        elif "prompted" in body:
            answer_prompted(source, req)
        elif "noise" in body:
            noise(req)
        return
    cmd, _, arg = str(body).partition(" ")
    commands = {"ping": lambda: show("pong", message_json(source, msg)), "peer": lambda: peer(arg),
                "vfs": vfs_steps, "relay": lambda: relay(arg), "bigblob": lambda: big_blob(int(arg)), "spawn": spawn_steps, "timer": timer,
                "state-set": lambda: state_set(arg), "state-clear": state_clear, "on-exit": lambda: on_exit_steps(arg),
                "caps": lambda: caps_steps(arg), "senderr": send_errors, "unicode": unicode,
                "prompt": lambda: prompt(arg), "kinit": kinit, "netsign": netsign, "rounds": lambda: rounds(int(arg)), "spawns": lambda: spawns(int(arg))}
    if cmd == "crash":
        raise RuntimeError("crash requested")
    commands.get(cmd, lambda: show("unknown", {"cmd": cmd}))()


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        global OUR
        OUR = parse_address(our)
        if OUR.process.process_name != "guest":
            child(f"{OUR.node}@guest:{OUR.process.package_name}:{OUR.process.publisher_node}")
            return
        state = wit.get_state()
        show("ready", {"our": our, "state": None if state is None else state.decode()})
        while True:
            kind, a, b = receive_one()
            if kind == "err":
                show("send-error", {"kind": enum_name(a.kind)})
            else:
                handle(a, b)
