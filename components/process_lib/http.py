"""HTTP helpers: requests to `http_server:distro:sys`, as Rust's `kinode_process_lib::http::server`.

    http.bind_http_path("/files")                  # /<our process id>/files reaches us as {"Http": ...}
    http.serve_ui(our)                             # pkg/ui as static files, index.html at "/"
    http.bind_ws_path("/ws")                       # WebSocketOpen/Push/Close reach us
    kind, value = http.parse_server_request(msg)   # "Http" -> IncomingHttpRequest, ...
    http.send_response(200, {"Content-Type": "application/json"}, b"...")
    http.send_ws_push(channel_id, b"...")

Every action waits for the server's `Result<(), HttpServerError>` and raises HttpServerError on Err.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from process_lib import vfs
from process_lib.core import Address, Message, ProcessId, Request, Response, our

HTTP_SERVER = ProcessId("http_server", "distro", "sys")
TIMEOUT = 10
_MIME = {"html": "text/html; charset=utf-8", "css": "text/css", "js": "text/javascript", "json": "application/json",
         "svg": "image/svg+xml", "png": "image/png", "ico": "image/x-icon", "txt": "text/plain; charset=utf-8"}


class HttpServerError(Exception):
    pass


def _server() -> Address:
    return Address(our().node, HTTP_SERVER)


def _act(action: dict, blob: bytes | None = None, mime: str | None = None, forward: bool = False) -> None:
    req = Request.to(_server()).body(action).expects_response(TIMEOUT)
    if forward:
        req.forward_current_blob()
    elif blob is not None:
        req.blob_bytes(blob, mime)
    answer = req.send_and_await_response().json()
    if not isinstance(answer, dict) or "Ok" not in answer:
        raise HttpServerError(f"http_server refused {next(iter(action))}: {answer.get('Err') if isinstance(answer, dict) else answer}")


def bind_http_path(path: str, authenticated: bool = True, local_only: bool = False,
                   upload_to: str | None = None) -> None:
    """Requests to /<our process id><path> come to us. `upload_to` (this host's extension): a
    multipart POST is streamed by the server into that drive of our package; we get a summary."""
    bind: dict = {"path": path, "authenticated": authenticated, "local_only": local_only, "cache": False}
    if upload_to is not None:
        bind["upload_to"] = upload_to
    _act({"Bind": bind})


def bind_http_static_path(path: str, content: bytes, mime: str | None = None, authenticated: bool = True,
                          local_only: bool = False) -> None:
    """Serve `content` at the path for GET, without asking us."""
    _act({"Bind": {"path": path, "authenticated": authenticated, "local_only": local_only, "cache": True}},
         content, mime)


def unbind_http_path(path: str) -> None:
    _act({"Unbind": {"path": path}})


def bind_ws_path(path: str, authenticated: bool = True) -> None:
    _act({"WebSocketBind": {"path": path, "authenticated": authenticated, "encrypted": False, "extension": False}})


def send_ws_push(channel_id: int, data: bytes | str, message_type: str = "Text") -> None:
    """Push to one WebSocket; the server's answer is not awaited (pushes are frequent)."""
    body = data.encode() if isinstance(data, str) else data
    (Request.to(_server()).body({"WebSocketPush": {"channel_id": channel_id, "message_type": message_type}})
     .blob_bytes(body).send())


def close_ws(channel_id: int) -> None:
    Request.to(_server()).body({"WebSocketClose": channel_id}).send()


def serve_ui(our_address: Address, directory: str = "ui", authenticated: bool = True) -> list[str]:
    """Bind every file under our package's `pkg/<directory>` as a static path, `index.html` also
    at "/"; the bytes go from the VFS to the server without entering this process. Returns the paths."""
    root = f"/{our_address.package_id()}/pkg/{directory}"
    bound = []
    stack = [root]
    while stack:
        folder = stack.pop()
        for entry in vfs.Directory(folder).read():
            full = "/" + entry.path.lstrip("/")
            if entry.file_type == vfs.DIRECTORY:
                stack.append(full)
                continue
            if entry.file_type != vfs.FILE:
                continue
            rel = full[len(root):]
            mime = _MIME.get(rel.rsplit(".", 1)[-1].lower(), "application/octet-stream")
            for path in [rel] + (["/"] if rel == "/index.html" else []):
                vfs.vfs_request(full, "Read")  # its blob is forwarded to the server, not copied in here
                _act_static(path, mime, authenticated)
                bound.append(path)
            vfs.vfs_request(full, "CloseFile")
    return bound


def _act_static(path: str, mime: str, authenticated: bool) -> None:
    req = (Request.to(_server()).body({"Bind": {"path": path, "authenticated": authenticated, "local_only": False,
                                                "cache": True, "mime": mime}})
           .expects_response(TIMEOUT).forward_current_blob())
    answer = req.send_and_await_response().json()
    if not isinstance(answer, dict) or "Ok" not in answer:
        raise HttpServerError(f"http_server refused to bind {path}: {answer}")


@dataclass
class IncomingHttpRequest:
    source_socket_addr: str
    method: str
    url: str
    bound_path: str
    headers: dict = field(default_factory=dict)
    url_params: dict = field(default_factory=dict)
    query_params: dict = field(default_factory=dict)

    def path(self, strip: ProcessId | None = None) -> str:
        """The bound path, without the `/<process id>` prefix when `strip` (our id) is given."""
        prefix = f"/{strip}" if strip is not None else ""
        return self.bound_path[len(prefix):] if prefix and self.bound_path.startswith(prefix) else self.bound_path


def parse_server_request(msg: Message) -> tuple[str, Any]:
    """("Http", IncomingHttpRequest), ("WebSocketOpen", {"path", "channel_id"}),
    ("WebSocketPush", {"channel_id", "message_type"}) or ("WebSocketClose", channel_id)."""
    body = msg.json()
    if not isinstance(body, dict) or len(body) != 1:
        raise ValueError("not an http_server request")
    (kind, value), = body.items()
    if kind == "Http":
        return kind, IncomingHttpRequest(**value)
    if kind in ("WebSocketOpen", "WebSocketPush", "WebSocketClose"):
        return kind, value
    raise ValueError(f"unknown http_server request {kind!r}")


def send_response(status: int, headers: dict | None = None, body: bytes | str | None = None) -> None:
    """Answer the HTTP request being handled: HttpResponse {status, headers} with the body as blob."""
    resp = Response().body({"status": status, "headers": headers or {}})
    if body is not None:
        resp.blob_bytes(body.encode() if isinstance(body, str) else body)
    resp.send()


def send_json(status: int, obj: Any) -> None:
    send_response(status, {"Content-Type": "application/json"}, json.dumps(obj))


def send_file(path: str, headers: dict | None = None) -> None:
    """Answer with a file of our package's drives, streamed by the server from disk (this host's
    extension: `file` in the HttpResponse)."""
    Response().body({"status": 200, "headers": headers or {}, "file": path}).send()
