# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""Binds paths and a WebSocket through process_lib.http and answers with what it was sent, so the
tests can check http_server's JSON shapes, its refusals, and its 504/503 for a silent or dead process."""
import json

import wit_world
from process_lib import Address, Request, await_message, get_blob, http, println, run, vfs


def main(our: Address) -> None:
    vfs.create_drive(our.package_id(), "uploads")
    http.bind_http_path("/echo")
    http.bind_http_path("/echo/:name")
    http.bind_http_path("/public", authenticated=False)
    http.bind_http_path("/local", local_only=True)
    http.bind_http_path("/slow")
    http.bind_http_path("/crash")
    http.bind_http_path("/upload", upload_to="uploads")
    http.bind_http_path("/file/:name")
    http.bind_http_static_path("/static.txt", b"static bytes\n", "text/plain")
    http.bind_ws_path("/ws")
    ui = http.serve_ui(our)
    # the server's answers to bad actions, for the shape checks
    answers = {}
    server = Address(our.node, http.HTTP_SERVER)
    for name, body in [("no_blob", {"Bind": {"path": "/x", "authenticated": True, "local_only": False, "cache": True}}),
                       ("bad_push", {"WebSocketPush": {"channel_id": 12345, "message_type": "Text"}}),
                       ("unknown", {"Frobnicate": {}}),
                       ("traversal", {"Bind": {"path": "/../x", "authenticated": True, "local_only": False, "cache": False}}),
                       ("unbind", {"Unbind": {"path": "/nothing"}}),
                       ("secure", {"SecureBind": {"path": "/secure", "cache": False}}),
                       ("ext", {"WebSocketBind": {"path": "/ext", "authenticated": True, "encrypted": False,
                                                  "extension": True}}),
                       ("pkg_upload", {"Bind": {"path": "/y", "authenticated": True, "local_only": False, "cache": False,
                                                "upload_to": "pkg"}})]:
        answers[name] = Request.to(server).body(body).expects_response(5).send_and_await_response().json()
    channels = {}
    println(f"webtest ready: {json.dumps(ui)}")
    while True:
        msg = await_message()
        if msg.source.process != http.HTTP_SERVER:
            continue
        kind, value = http.parse_server_request(msg)
        if kind == "WebSocketOpen" and value["path"].endswith("/ext"):
            ext_exchange(server, value["channel_id"])
        elif kind == "WebSocketOpen":
            channels[value["channel_id"]] = value["path"]
            http.send_ws_push(value["channel_id"], json.dumps({"kind": "open", "open": value}))
        elif kind == "WebSocketPush":
            blob = get_blob()
            data = blob.bytes.decode("utf-8", "replace") if blob else ""
            http.send_ws_push(value["channel_id"], json.dumps({"kind": "echo", "push": value, "data": data}))
        elif kind == "WebSocketClose":
            channels.pop(value, None)
            println(f"webtest ws closed: {value}")
        elif kind == "Http":
            req = value
            path = req.path(our.process)
            if path == "/slow":
                continue  # never answers: the server gives the client a 504
            if path == "/crash":
                raise RuntimeError("asked to crash")
            if path == "/file/:name":
                http.send_file(f"/{our.package_id()}/uploads/{req.url_params.get('name')}")
                continue
            blob = get_blob()
            body = blob.bytes if blob else b""
            out = {"raw": json.loads(msg.body), "path": path, "body": body.decode("latin-1"),
                   "answers": answers, "channels": sorted(channels)}
            http.send_response(201 if req.method == "POST" else 200,
                               {"Content-Type": "application/json", "X-Webtest": "yes"}, json.dumps(out))


def ext_exchange(server: Address, cid: int) -> None:
    """An extension's channel: send it bytes with WebSocketExtPushOutgoing and await its reply, the
    Response to that very request; then tell it, with a plain push, what came back."""
    try:
        reply = Request.to(server).body({"WebSocketExtPushOutgoing": {"channel_id": cid, "message_type": "Binary",
                                                                      "desired_reply_type": "Response"}}) \
            .blob_bytes(b"to the extension").expects_response(10).send_and_await_response()
        blob = get_blob()
        out = {"kind": "ext-reply", "body": reply.json(), "blob": blob.bytes.decode() if blob else None}
    except Exception as e:  # noqa: BLE001 - the test reads what failed
        out = {"kind": "ext-reply", "error": str(e)}
    http.send_ws_push(cid, json.dumps(out))


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
