# world: kinode-py:host-ext/process-v0-portable@0.1.0
"""Conformance probe: built against plain `process-v0` (no host extension), it does what a Kinode
process would and prints what it saw, one `probe: WHAT JSON` line per step, for tests/conformance."""
import json
import time

import wit_world
from process_lib import Address, ProcessId, Request, SendError, await_message, get_blob, println, run, to_wit_address
from wit_world.imports import standard

VFS = Address("our", ProcessId("vfs", "distro", "sys"))   # as Rust's process_lib addresses it
DRIVE = "/probe:test.os/d"


def show(what: str, value) -> None:
    println(f"{what} {json.dumps(value, sort_keys=True)}")


def vfs(path: str, action, blob: bytes = None, mime: str = None) -> dict:
    req = Request.to(VFS).body({"path": path, "action": action}).expects_response(5)
    if blob is not None:
        req.blob_bytes(blob, mime)
    msg = req.send_and_await_response()
    b = get_blob() if msg.body == b'"Read"' else None
    return {"source": str(msg.source), "body": json.loads(msg.body),
            "blob": None if b is None else {"mime": b.mime, "bytes": b.bytes.decode("latin-1")}}


def vfs_steps() -> None:
    show("vfs create-drive", vfs(DRIVE, "CreateDrive"))
    vfs(DRIVE + "/f", "Write", b"hello")
    vfs(DRIVE + "/sub", "CreateDirAll")
    show("vfs read-dir", vfs(DRIVE, "ReadDir"))
    show("vfs metadata-dir", vfs(DRIVE + "/sub", "Metadata"))
    show("vfs read", vfs(DRIVE + "/f", "Read"))
    show("vfs hash", vfs(DRIVE + "/f", "Hash"))
    show("vfs read-missing", vfs(DRIVE + "/missing", "Read"))
    show("vfs open-missing", vfs(DRIVE + "/missing", {"OpenFile": {"create": False}}))
    show("vfs create-dir-twice", vfs(DRIVE + "/sub", "CreateDir"))
    show("vfs no-blob", vfs(DRIVE + "/f", "Write"))
    show("vfs other-drive", vfs("/file_transfer:template.os/files/x", "Read"))


def add_zip(name: str) -> None:
    """Unpack DRIVE/NAME (put there by the test) into DRIVE/unz, as a zip blob."""
    vfs(DRIVE, "CreateDrive")
    read = vfs(f"{DRIVE}/{name}", "Read")
    data = read["blob"]["bytes"].encode("latin-1") if read["blob"] else b""
    show(f"addzip {name}", vfs(DRIVE + "/unz", "AddZip", data, "application/zip"))


def send_errors() -> None:
    cases = [("missing-local", Address("our", ProcessId("nosuch", "probe", "test.os"))),
             ("unknown-node", Address("ghost.os", ProcessId("probe", "probe", "test.os")))]
    for what, target in cases:
        start = time.monotonic()
        try:
            Request.to(target).body("hello").expects_response(20).send_and_await_response()
            show(f"senderr {what}", {"kind": None})
        except SendError as e:
            show(f"senderr {what}", {"kind": e.kind, "target": str(e.target),
                                     "seconds": round(time.monotonic() - start, 1)})


def await_without_timeout(our: Address) -> None:
    req = standard.Request(False, None, b"hello", None, [])
    standard.send_and_await_response(to_wit_address(VFS), req, None)   # the kernel ends us here
    show("await-without-timeout", {"returned": True})


def main(our: Address) -> None:
    println("probe ready")
    while True:
        try:
            msg = await_message()
        except SendError as e:
            show("send-error", {"kind": e.kind})
            continue
        if not msg.is_request:
            continue
        cmd = msg.body.decode("utf-8", "replace").strip().strip('"')
        if cmd == "ping":
            show("pong", {"source": str(msg.source)})
        elif cmd == "vfs":
            vfs_steps()
        elif cmd.startswith("addzip "):
            add_zip(cmd.split(" ", 1)[1])
        elif cmd == "senderr":
            send_errors()
        elif cmd == "await-without-timeout":
            await_without_timeout(our)


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
