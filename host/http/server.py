"""The HTTP server `http_server:distro:sys`: Kinode's message API over aiohttp, with the node's login.

Processes configure it with JSON `HttpServerAction`s (Bind, SecureBind, Unbind, WebSocketBind,
WebSocketUnbind, WebSocketPush, WebSocketClose), each answered `{"Ok": null}` or `{"Err": ...}`.
A bound path is prefixed by the binder's process id (`/file_transfer:file_transfer:template.os/...`);
a segment `:name` matches any one segment and is passed in `url_params`. A request to it reaches the
process as `{"Http": IncomingHttpRequest}` with the body as blob; the process answers
`{"status", "headers"}` with the body as blob (504 if it does not answer in time, 503 if it is gone).

Large bodies never pass whole through memory or a process (a blob crosses into Wasm whole):
- uploads: a Bind may name `"upload_to": DRIVE`, a drive of the binder's own package. A multipart
  POST to that path is then streamed by this service, part by part, into `DRIVE/.partial/*.part`
  and renamed to `DRIVE/NAME` when the part is complete (a hostile name is refused and its bytes
  skipped). NAME may be a relative path, `folder/sub/file` (a browser's folder upload), each part
  checked as a file name; missing folders are made, symlinks never followed. While a part streams,
  `DRIVE/.partial/.uploading/NAME` marks its name (its first path segment); a part whose name the
  package marked in `DRIVE/.partial/.downloading/NAME` is refused, naming the download (host.kinode_types).
  The process then gets the request with the blob
  `{"Uploaded": {"files": [{name, size}], "refused": [{name, reason}]}}` and answers as usual.
- downloads: a response may carry `"file": "/package:publisher/drive/path"` (a file of the
  binder's own package) instead of a blob; the service streams it from disk.

Who may see it: every authenticated path needs the node's token (HOME/.keys/http-token, created
0600 at first start), sent as the HttpOnly SameSite=Strict cookie set by `/login?token=...` or as
`Authorization: Bearer TOKEN`. What a cookie may do is limited to the node's own origin (host/http/guard.py):
the Host must be one the node serves, a request that changes something (every method but GET and HEAD,
every WebSocket upgrade) must come from the node's own page unless it carries the bearer token, and every
response forbids sniffing, framing and referrers. A connection must send a whole request head within
HEADER_TIMEOUT seconds (and may idle that long between requests).
`..` segments, raw or percent-encoded, are refused before any lookup; static files are only the
blobs processes bound (serve_ui), never looked up on disk.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import html
import json
import logging
import mimetypes
import os
import re
import secrets
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import msgpack
from aiohttp import BodyPartReader, WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from host.http import guard
from host.kernel.host_service import HostService as Service
from host.kinode_types import DOWNLOADING_DIR, UPLOADING_DIR, check_relative_path, nfc, vfs_path_problem
from host.messages import Address, Blob, KernelMessage, ProcessId, Request, Response, new_request_id
from host.vfs.store import Vfs

log = logging.getLogger("host.http.server")

HTTP_SERVER_ID = ProcessId("http_server", "distro", "sys")
MAX_BODY = 2 * 1024 * 1024     # a body sent to a process as a blob (a blob crosses into Wasm whole)
UPLOAD_CHUNK = 1024 * 1024
TOKEN_FILE = ".keys/http-token"
LOOPBACK = ("127.", "::1", "::ffff:127.")
REFUSALS_SHOWN, REFUSAL_WINDOW = 5, 10.0  # refused requests told on the terminal: 5 per 10 s
RPC_PATH = "/rpc:distro:sys/message"


def load_or_create_token(home: Path) -> str:
    path = home / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if len(token) >= 32:
            return token
        path.unlink()  # empty or truncated: make a new one
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


MAX_UPLOAD_DEPTH = 32  # folders in an uploaded file's relative path (a browser's folder upload)


def check_upload_path(name: Any) -> str:
    """The file-name rule for every part of an uploaded file's relative path (`trip/day1/a.jpg`, as a
    browser's folder upload names its files), or ''."""
    return check_relative_path(name, MAX_UPLOAD_DEPTH)


def _open_folders(drive: Path, folders: list[str]) -> int:
    """A descriptor of DRIVE/folders..., each made if missing, none followed if it is a symlink
    (O_NOFOLLOW), so an upload cannot leave the drive."""
    fd = os.open(drive, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for folder in folders:
            try:
                os.mkdir(folder, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            inner = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _traversal(raw_path: str) -> bool:
    """Does the path hold a `.`/`..` segment, a backslash or NUL, raw or percent-encoded (once or twice)?"""
    path = raw_path.split("?", 1)[0]
    for _ in range(3):
        if "." in path.split("/") or vfs_path_problem(path):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True  # encoded three times over: no honest client does that


@dataclass
class Binding:
    path: str              # full path, with the process prefix
    pid: ProcessId
    authenticated: bool = True
    local_only: bool = False
    static: Blob | None = None      # `cache`: served as is for GET
    upload_to: Path | None = None   # stream multipart uploads into this drive
    websocket: bool = False
    secure_subdomain: str | None = None   # SecureBind: served only on this subdomain of the host
    extension: bool = False            # WebSocketBind `extension`: a local program's channel

    @property
    def pattern(self) -> list[str]:
        return self.path.split("/")


class _Pending:
    def __init__(self, loop: asyncio.AbstractEventLoop, pid: ProcessId):
        self.future: asyncio.Future = loop.create_future()
        self.pid = pid


class HttpServerService(Service):
    """See the module docstring. Messages from processes are handled on the sender's thread; HTTP
    runs on this service's own asyncio loop and thread."""

    def __init__(self, kernel, home: Path, vfs: Vfs, port: int, host: str = "127.0.0.1", timeout: float = 30.0,
                 names: tuple[str, ...] = ()):
        super().__init__(kernel, HTTP_SERVER_ID)
        self.vfs = vfs          # where a drive's files are (uploads, a process's own files)
        self.timeout = timeout  # seconds a process has to answer (then 504)
        self.home = Path(home)
        self.port = port
        self.host = host
        # Host names a request may use: localhost, the listening host and `names` (--advertise)
        self.names = guard.served_names((host, "127.0.0.1", "::1", *names))
        self.token = load_or_create_token(self.home)
        self.cookie_name = "kinode-auth_" + re.sub(r"[^A-Za-z0-9._-]", "_", kernel.node)
        self.bindings: dict[str, Binding] = {}
        self.lock = threading.Lock()
        self.pending: dict[int, _Pending] = {}
        self.uploading: dict[Path, int] = {}  # UPLOADING_DIR marks -> uploads streaming that name now
        self.channels: dict[int, tuple[web.WebSocketResponse, ProcessId]] = {}
        self.loop = asyncio.new_event_loop()  # run by start()'s thread
        self._runner: web.AppRunner | None = None
        self._refusal_window, self._refusals_shown, self._refusals_hidden = 0.0, 0, 0
        self._thread: threading.Thread | None = None
        self.pair_node: Any = None   # the node, whose pairing /pair shows (host/http/pair_page.py)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen (raising OSError if the port is taken) and serve on a thread of our own."""
        sock = socket.create_server((self.host, self.port), family=socket.AF_INET6 if ":" in self.host
                                    else socket.AF_INET, backlog=128)
        self.port = sock.getsockname()[1]
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application(client_max_size=MAX_BODY)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            app.on_response_prepare.append(_add_security_headers)
            # aiohttp closes a connection that has not sent a whole request head within its keep-alive
            # timeout (from the connection's start too): that is the slow-header (slowloris) guard
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                         keepalive_timeout=guard.HEADER_TIMEOUT)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(serve())
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="http_server", daemon=True)
        self._thread.start()
        ready.wait(10)
        self.kernel.on_exit_listener(self._process_exited)

    @property
    def login_url(self) -> str:
        host = "localhost" if self.host in ("127.0.0.1", "::1", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/login?token={self.token}"

    def stop(self) -> None:
        if self.loop.is_closed() or not self.loop.is_running():
            return
        if self._runner is not None:
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
            try:
                fut.result(5)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)

    # ---- messages from processes (any thread) ------------------------------------------------------
    def deliver(self, km: KernelMessage) -> None:
        if km.source.node != self.kernel.node:
            return
        if isinstance(km.message, Response):
            with self.lock:
                pending = self.pending.pop(km.id, None)
            if pending is not None:
                self.loop.call_soon_threadsafe(_resolve, pending.future, ("response", km))
            return
        try:
            action = json.loads(km.message.body)
            answer = self._action(km.source.process, action, km.lazy_load_blob, km.id)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            answer = {"Err": {"BadRequest": {"req": f"{km.message.body[:200]!r}: {e}"}}}
        if answer is not None and km.rsvp is not None:
            self.kernel.route(KernelMessage(km.id, self.address, km.rsvp, None,
                                            Response(body=json.dumps(answer).encode()), None), self)

    def _action(self, pid: ProcessId, action: Any, blob: Blob | None, mid: int = 0) -> dict | None:
        """The answer to one HttpServerAction; None: no answer (a WebSocketExtPushOutgoing sent)."""
        if isinstance(action, dict) and len(action) == 1:
            (kind, arg), = action.items()
        else:
            raise ValueError("expected one HttpServerAction")
        ok: dict = {"Ok": None}
        if kind in ("Bind", "SecureBind", "WebSocketBind", "WebSocketSecureBind"):
            path = self._full_path(pid, arg["path"])
            binding = Binding(path, pid, websocket=kind.startswith("WebSocket"))
            binding.authenticated = bool(arg.get("authenticated", True)) if kind in ("Bind", "WebSocketBind") else True
            binding.local_only = bool(arg.get("local_only", False))
            if kind in ("SecureBind", "WebSocketSecureBind"):
                binding.secure_subdomain = secure_subdomain(pid)
            if kind == "WebSocketBind" and arg.get("extension"):
                binding.extension = binding.local_only = True   # upstream: local clients only
            if arg.get("cache"):
                if blob is None:
                    return {"Err": "NoBlob"}
                mime = arg.get("mime") or blob.mime or mimetypes.guess_type(path)[0] or "application/octet-stream"
                binding.static = Blob(mime,
                                      bytes(blob.bytes))
            if arg.get("upload_to") is not None:
                drive = arg["upload_to"]
                if drive == "pkg":  # installed package files stay read-only
                    return {"Err": {"PathBindError": {"error": "uploads cannot go into the pkg drive"}}}
                try:
                    binding.upload_to = self._drive_path(pid, drive)
                except ValueError as e:
                    return {"Err": {"PathBindError": {"error": str(e)}}}
                self._clear_stale_marks(binding.upload_to)
            with self.lock:
                self.bindings[path] = binding
            return ok
        if kind in ("Unbind", "WebSocketUnbind"):
            path = self._full_path(pid, arg["path"])
            with self.lock:
                if self.bindings.get(path) is not None and self.bindings[path].pid == pid:
                    del self.bindings[path]
            return ok
        if kind == "WebSocketPush":
            cid, mtype = int(arg["channel_id"]), arg.get("message_type", "Text")
            with self.lock:
                chan = self.channels.get(cid)
            if chan is None or chan[1] != pid:
                return {"Err": {"WebSocketPushError": {"error": f"no open WebSocket channel {cid}"}}}
            data = b"" if blob is None else bytes(blob.bytes)
            asyncio.run_coroutine_threadsafe(_ws_send(chan[0], mtype, data), self.loop)
            return ok
        if kind == "WebSocketExtPushOutgoing":
            # as upstream (http/server.rs send_push): the blob goes out wrapped in a MessagePack
            # WebSocketExtPushData carrying this request's id; the extension's reply with that id
            # comes back to the process as a Request or the Response to this request
            cid, reply_type = int(arg["channel_id"]), arg["desired_reply_type"]
            with self.lock:
                chan = self.channels.get(cid)
            if blob is None or arg.get("message_type") != "Binary" or reply_type not in ("Request", "Response"):
                return {"Err": "NoBlob"}
            if chan is None or chan[1] != pid:
                return {"Err": {"WebSocketPushError": {"error": f"no open WebSocket channel {cid}"}}}
            data = msgpack.packb({"WebSocketExtPushData": {"id": mid, "kinode_message_type": reply_type,
                                                           "blob": list(blob.bytes)}})
            asyncio.run_coroutine_threadsafe(_ws_send(chan[0], "Binary", data), self.loop)
            return None
        if kind == "WebSocketClose":
            cid = int(arg)
            with self.lock:
                chan = self.channels.get(cid)
            if chan is not None and chan[1] == pid:
                asyncio.run_coroutine_threadsafe(chan[0].close(), self.loop)
            return ok
        raise ValueError(f"unknown HttpServerAction {kind!r}")

    def _drive_path(self, pid: ProcessId, drive: Any) -> Path:
        """The folder of a drive of the process's package: a process reaches only its own package's drives."""
        return self.vfs.drive_path(pid.package_id, drive)

    def _full_path(self, pid: ProcessId, path: Any) -> str:
        if not isinstance(path, str) or _traversal(path) or "?" in path or "#" in path:
            raise ValueError(f"bad path {path!r}")
        return f"/{pid}" + ("" if path.startswith("/") else "/") + path

    def fail(self, mid: int, kind: str) -> None:
        """The kernel could not deliver our request (the process is gone)."""
        with self.lock:
            pending = self.pending.pop(mid, None)
        if pending is not None:
            self.loop.call_soon_threadsafe(_resolve, pending.future, ("gone", None))

    def _process_exited(self, pid: ProcessId, reason: str) -> None:
        with self.lock:
            gone = [mid for mid, p in self.pending.items() if p.pid == pid]
            failed = [self.pending.pop(mid) for mid in gone]
            chans = [ws for ws, owner in self.channels.values() if owner == pid]
        for p in failed:
            self.loop.call_soon_threadsafe(_resolve, p.future, ("gone", reason))
        for ws in chans:
            asyncio.run_coroutine_threadsafe(ws.close(), self.loop)

    # ---- HTTP (the service's loop) ------------------------------------------------------------------
    def _authed(self, request: web.Request) -> bool:
        given = request.cookies.get(self.cookie_name, "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[7:].strip()
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def _refused(self, request: web.Request, problem: str) -> None:
        """Tell the user (a few lines a window at most: a page can send many) that a request was refused."""
        now = time.monotonic()
        if now - self._refusal_window >= REFUSAL_WINDOW:
            if self._refusals_hidden:
                self.kernel.terminal.info(f"http: {self._refusals_hidden} more requests refused")
            self._refusal_window, self._refusals_shown, self._refusals_hidden = now, 0, 0
        if self._refusals_shown < REFUSALS_SHOWN:
            self._refusals_shown += 1
            self.kernel.terminal.info(f"http: refused {request.method} {request.path[:200]}: {problem}")
        else:
            self._refusals_hidden += 1

    def _bearer(self, request: web.Request) -> bool:
        """Does the request carry the token in Authorization (which no page can make a browser send)?"""
        auth = request.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), self.token.encode())

    def _match(self, path: str) -> tuple[Binding | None, dict]:
        with self.lock:
            exact = self.bindings.get(path)
            if exact is not None:
                return exact, {}
            parts = path.split("/")
            for b in self.bindings.values():
                pattern = b.pattern
                if len(pattern) != len(parts) or not any(p.startswith(":") for p in pattern):
                    continue
                params = {}
                for want, got in zip(pattern, parts):
                    if want.startswith(":") and got:
                        params[want[1:]] = got
                    elif want != got:
                        break
                else:
                    return b, params
        return None, {}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if _traversal(request.raw_path):
            return _json_error(400, "bad path: '.' and '..' segments are not allowed")
        problem = guard.host_problem(request.headers.get("Host"), self.names)
        if problem:
            self._refused(request, problem)
            return _json_error(421, problem)
        path = request.path
        if path == "/login":
            return self._login(request)
        if path == RPC_PATH:
            return await self._rpc(request)
        if path == "/":
            if not self._authed(request):
                return self._unauthorized(request)
            return self._homepage()
        if path == "/pair" and self.pair_node is not None:
            if not self._authed(request):
                return self._unauthorized(request)
            from host.http.pair_page import handle
            return await handle(request, self.pair_node, _page)
        binding, url_params = self._match(path)
        if binding is None and len(path) > 1 and path.endswith("/"):
            # upstream normalises a trailing slash away (http/utils.rs normalize_path)
            binding, url_params = self._match(path[:-1])
        if binding is None:
            if not self._authed(request):  # strangers learn nothing about which paths exist
                return self._unauthorized(request)
            if not path.endswith("/") and self._match(path + "/")[0] is not None:
                raise web.HTTPFound(path + "/")
            return _json_error(404, f"nothing is bound at {path}")
        if binding.secure_subdomain is not None:
            # as upstream (kinode/src/http/server.rs http_handler): served on its own subdomain,
            # where the login cookie is that host's own; elsewhere a redirect there
            host = request.host or ""
            if host.split(".")[0] != binding.secure_subdomain:
                proto = request.headers.get("X-Forwarded-Proto", "http")
                raise web.HTTPTemporaryRedirect(f"{proto}://{binding.secure_subdomain}.{host}{request.path_qs}")
        if binding.authenticated and not self._authed(request):
            return self._unauthorized(request)
        if binding.local_only and not (request.remote or "").startswith(LOOPBACK):
            return _json_error(403, "this path is served to local clients only")
        problem = guard.origin_problem(request.method, request.headers, request.scheme, self._bearer(request),
                                       websocket=binding.websocket)
        if problem:
            self._refused(request, problem)
            return _json_error(403, problem)
        if binding.websocket:
            return await self._websocket(request, binding)
        if binding.static is not None:
            if request.method not in ("GET", "HEAD"):
                return _json_error(405, "static file: GET only")
            return web.Response(body=binding.static.bytes, headers={"Content-Type": binding.static.mime or "application/octet-stream",
                                                                    "Cache-Control": "no-cache"})
        blob: Blob | None = None
        if binding.upload_to is not None and request.method == "POST" and \
                request.content_type == "multipart/form-data":
            try:
                summary = await self._receive_upload(request, binding.upload_to)
            except (ValueError, OSError) as e:
                return _json_error(400, f"upload failed: {e}")
            except HttpProcessingError as e:  # aiohttp refuses a part header holding a control character
                return _json_error(400, f"upload failed: a part's headers are malformed ({e.message}): a file "
                                        f"name may not hold a control character")
            blob = Blob("application/json", json.dumps({"Uploaded": summary}).encode())
        elif request.can_read_body:
            if (request.content_length or 0) > MAX_BODY:
                return _json_error(413, f"body larger than {MAX_BODY} bytes")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _json_error(413, f"body larger than {MAX_BODY} bytes")
            blob = Blob(None, body)
        return await self._ask_process(request, binding, url_params, blob)

    async def _ask_process(self, request: web.Request, binding: Binding, url_params: dict,
                           blob: Blob | None) -> web.StreamResponse:
        incoming = {
            "source_socket_addr": _socket_addr(request),
            "method": request.method,
            "url": str(request.url),
            "bound_path": binding.path,
            "headers": {k.lower(): v for k, v in request.headers.items() if k.lower() != "cookie"
                        and k.lower() != "authorization"},
            "url_params": url_params,
            "query_params": dict(request.query),
        }
        mid = new_request_id()
        pending = _Pending(self.loop, binding.pid)
        with self.lock:
            self.pending[mid] = pending
        target = Address(self.kernel.node, binding.pid)
        km = KernelMessage(mid, self.address, target, self.address,
                           Request(expects_response=int(self.timeout) + 1, body=json.dumps({"Http": incoming}).encode()),
                           blob)
        self.kernel.route(km, self)
        try:
            kind, value = await asyncio.wait_for(pending.future, self.timeout)
        except TimeoutError:
            with self.lock:
                self.pending.pop(mid, None)
            return _json_error(504, f"{binding.pid} did not answer within {self.timeout:g} s")
        if kind == "gone":
            return _json_error(503, f"{binding.pid} is not running" + (f" ({value})" if value else ""))
        return self._to_http(value, binding)

    async def _rpc(self, request: web.Request) -> web.StreamResponse:
        """`POST /rpc:distro:sys/message`, as kit's inject-message sends it (kinode v0.9.5
        kinode/src/http/server.rs handle_rpc_message; utils.rs RpcMessage): a message to a local
        process, its blob base64 in `data`. Local clients only, as upstream, and here also only with
        the node's token. With `expects_response` the answer is `{"body", "lazy_load_blob"}`."""
        if not (request.remote or "").startswith(LOOPBACK):
            return web.Response(status=403)
        if not self._authed(request):
            return self._unauthorized(request)
        if request.method != "POST":
            return _json_error(405, "POST a message")
        if (request.content_length or 0) > 2 * MAX_BODY:
            return _json_error(413, f"body larger than {2 * MAX_BODY} bytes")
        try:
            rpc = json.loads(await request.read())
            target = Address(str(rpc.get("node") or self.kernel.node), ProcessId.parse(str(rpc["process"])))
            expects = rpc.get("expects_response")
            if expects is not None:
                expects = min(int(expects), int(self.timeout))
            data = rpc.get("data")
            blob = None if data is None else Blob(rpc.get("mime"), base64.b64decode(data, validate=True))
            body = rpc.get("body")
            req = Request(expects_response=expects, body=b"" if body is None else str(body).encode(),
                          metadata=rpc.get("metadata"))
        except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as e:
            return _json_error(400, f"not an RpcMessage: {e}")
        if target.node != self.kernel.node:
            return _json_error(400, "this node passes RPC messages to its own processes only")
        mid = new_request_id()
        if expects is None:   # fire and forget
            self.kernel.route(KernelMessage(mid, self.address, target, None, req, blob), self)
            return web.Response(status=200)
        pending = _Pending(self.loop, target.process)
        with self.lock:
            self.pending[mid] = pending
        self.kernel.route(KernelMessage(mid, self.address, target, self.address, req, blob), self)
        try:
            kind, km = await asyncio.wait_for(pending.future, expects + 1)
        except TimeoutError:
            with self.lock:
                self.pending.pop(mid, None)
            return web.Response(status=408)
        if kind == "gone":
            return web.Response(status=500)
        out = km.lazy_load_blob
        answer = {"body": list(km.message.body),
                  # upstream's RpcResponseBody: the blob's bytes are its base64 text, as serde writes bytes
                  "lazy_load_blob": None if out is None else {"mime": out.mime,
                                                              "bytes": list(base64.b64encode(out.bytes))}}
        return web.Response(status=200, body=json.dumps(answer).encode(), headers={"Content-Type": "text/html"})

    def _to_http(self, km: KernelMessage, binding: Binding) -> web.StreamResponse:
        try:
            answer = json.loads(km.message.body)
            status = int(answer.get("status", 200))
            headers = {str(k): str(v) for k, v in (answer.get("headers") or {}).items()
                       if str(k).lower() not in ("content-length", "transfer-encoding", "connection")}
            if not 100 <= status <= 599:
                raise ValueError(f"status {status}")
        except (ValueError, TypeError, AttributeError) as e:
            return _json_error(502, f"{binding.pid} sent a malformed HttpResponse: {e}")
        if answer.get("file"):
            path = self._own_file(binding.pid, answer["file"])
            if path is None:
                return _json_error(502, f"{binding.pid} may not serve {answer['file']!r}")
            return web.FileResponse(path, status=status, headers=headers)
        body = b"" if km.lazy_load_blob is None else bytes(km.lazy_load_blob.bytes)
        return web.Response(status=status, headers=headers, body=body)

    def _own_file(self, pid: ProcessId, vfs_path: Any) -> Path | None:
        """A file of the process's own package drives (not pkg/), resolved inside its drive."""
        if not isinstance(vfs_path, str) or _traversal(vfs_path):
            return None
        parts = vfs_path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != str(pid.package_id) or parts[1] == "pkg":
            return None
        try:
            drive = self._drive_path(pid, parts[1]).resolve()
        except ValueError:
            return None
        path = drive.joinpath(*parts[2:]).resolve()
        return path if drive in path.parents and path.is_file() else None

    async def _receive_upload(self, request: web.Request, drive: Path) -> dict:
        """Stream each `files` part into DRIVE/.partial, then rename it to its name."""
        files, refused = [], []
        partial_dir = drive / ".partial"
        partial_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader) or part.name != "files" or part.filename is None:
                await part.release()
                continue
            name = nfc(part.filename)  # a Mac's browser may send a decomposed name
            problem = check_upload_path(name)
            if problem:
                refused.append({"name": name, "reason": problem})
                await part.release()
                continue
            mark = drive / UPLOADING_DIR / name.split("/")[0]
            self._mark(mark, +1)
            held = _downloading(drive, name.split("/")[0])
            if held is not None:  # the package is downloading that name: its end would replace this
                self._mark(mark, -1)
                refused.append({"name": name, "reason": held})
                await part.release()
                continue
            try:
                files.append(await self._receive_part(part, name, drive, partial_dir, refused))
            except _Refused:
                pass
            finally:
                self._mark(mark, -1)
        return {"files": files, "refused": refused}

    def _mark(self, mark: Path, step: int) -> None:
        """Count an upload of the name `mark` names in or out; the file exists while any streams."""
        count = self.uploading.get(mark, 0) + step
        if count > 0:
            self.uploading[mark] = count
            if count == 1:
                mark.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.close(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        else:
            self.uploading.pop(mark, None)
            mark.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the last one: no empty folder left behind
                mark.parent.rmdir()

    def _clear_stale_marks(self, drive: Path) -> None:
        """Marks left by a node stopped mid-upload (none of them streams now)."""
        try:
            for mark in (drive / UPLOADING_DIR).iterdir():
                if mark not in self.uploading:
                    mark.unlink(missing_ok=True)
        except OSError:
            pass  # no marks yet

    async def _receive_part(self, part: BodyPartReader, name: str, drive: Path, partial_dir: Path,
                            refused: list) -> dict:
        """Stream one part into DRIVE/.partial, then rename it to `name`; raises _Refused after
        noting a refusal in `refused`."""
        loop = asyncio.get_running_loop()
        tmp = partial_dir / f"upload-{secrets.token_hex(8)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        size = 0
        try:
            while True:
                chunk = await part.read_chunk(UPLOAD_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                await loop.run_in_executor(None, _write_all, fd, chunk)
            os.close(fd)
            fd = -1
            *folders, leaf = name.split("/")
            try:
                dir_fd = _open_folders(drive, folders)
            except OSError as e:  # a file or a symlink where a folder should be
                tmp.unlink(missing_ok=True)
                refused.append({"name": name, "reason": f"{'/'.join(folders)} is not a folder ({e.strerror})"})
                raise _Refused() from None
            try:
                try:
                    mode = os.lstat(leaf, dir_fd=dir_fd).st_mode
                except FileNotFoundError:
                    mode = stat.S_IFREG  # a new file
                if not stat.S_ISREG(mode):
                    raise ValueError(f"{name} exists and is not a plain file")
                os.replace(tmp, leaf, dst_dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return {"name": name, "size": size}

    async def _websocket(self, request: web.Request, binding: Binding) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30)
        if not ws.can_prepare(request).ok:
            return _json_error(400, "expected a WebSocket upgrade")
        await ws.prepare(request)
        cid = secrets.randbits(32)
        with self.lock:
            self.channels[cid] = (ws, binding.pid)
        target = Address(self.kernel.node, binding.pid)

        def tell(body: Any, blob: Blob | None = None) -> None:
            self.kernel.route(KernelMessage(new_request_id(), self.address, target, None,
                                            Request(body=json.dumps(body).encode()), blob), self)
        tell({"WebSocketOpen": {"path": binding.path, "channel_id": cid}})
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    data = msg.data.encode() if msg.type == WSMsgType.TEXT else msg.data
                    mtype = "Text" if msg.type == WSMsgType.TEXT else "Binary"
                    if binding.extension and self._from_extension(target, cid, mtype, data):
                        continue
                    tell({"WebSocketPush": {"channel_id": cid, "message_type": mtype}}, Blob(None, data))
        finally:
            with self.lock:
                self.channels.pop(cid, None)
            tell({"WebSocketClose": cid})
        return ws

    def _from_extension(self, target: Address, cid: int, mtype: str, data: bytes) -> bool:
        """A MessagePack WebSocketExtPushData from an extension: to the process with its id, as a
        Request or a Response, body WebSocketPush, the blob its own (upstream's
        make_ext_websocket_message). False if it is none: then a plain WebSocketPush."""
        try:
            ext = msgpack.unpackb(data)["WebSocketExtPushData"]
            mid, kind, payload = int(ext["id"]), ext["kinode_message_type"], bytes(ext["blob"])
        except Exception:  # noqa: BLE001 - anything else is an ordinary push
            return False
        body = json.dumps({"WebSocketPush": {"channel_id": cid, "message_type": mtype}}).encode()
        message: Request | Response = Request(body=body) if kind == "Request" else Response(body=body)
        self.kernel.route(KernelMessage(mid, self.address, target, None, message, Blob(None, payload)), self)
        return True

    # ---- login and homepage ------------------------------------------------------------------------
    def _unauthorized(self, request: web.Request) -> web.StreamResponse:
        browser = request.method == "GET" and "text/html" in request.headers.get("Accept", "") \
            and request.headers.get("Upgrade", "").lower() != "websocket"
        if browser:
            raise web.HTTPFound("/login?next=" + quote(request.path_qs, safe=""))
        return _json_error(401, "log in first: open the login link the node printed, or send "
                                "Authorization: Bearer TOKEN (HOME/.keys/http-token)")

    def _login(self, request: web.Request) -> web.StreamResponse:
        given = request.query.get("token", "")
        nxt = guard.safe_next(request.query.get("next", "/"))
        if given and hmac.compare_digest(given.encode(), self.token.encode()):
            resp = web.HTTPFound(nxt)
            resp.set_cookie(self.cookie_name, self.token, httponly=True, samesite="Strict", path="/",
                            max_age=30 * 24 * 3600)
            raise resp
        note = "<p class=err>Wrong token.</p>" if given else ""
        page = _page(f"{self.kernel.node}: log in", f"""
<h1>{html.escape(self.kernel.node)}</h1>{note}
<p>Open the login link the node printed at start, or paste its token
(<code>HOME/.keys/http-token</code>):</p>
<form method=get action=/login><input type=hidden name=next value="{html.escape(nxt)}">
<input name=token type=password autocomplete=off autofocus placeholder=token> <button>Log in</button></form>""")
        return web.Response(status=401 if given else 200, text=page, content_type="text/html")

    def _homepage(self) -> web.StreamResponse:
        with self.lock:
            apps = sorted({b.pid for b in self.bindings.values() if b.static is not None and b.path.endswith("/")
                           and b.path.count("/") == 2}, key=str)
        items = "".join(f'<li><a href="/{quote(str(p), safe=":")}/">{html.escape(p.package_name)}</a> '
                        f'<small>{html.escape(str(p))}</small></li>' for p in apps) or "<li>no apps yet</li>"
        return web.Response(text=_page(f"{self.kernel.node}", f"<h1>{html.escape(self.kernel.node)}</h1>"
                                       f"<h2>Apps</h2><ul class=apps>{items}</ul>"
                                       + ("<p><a href=/pair>Pair with a node</a></p>" if self.pair_node else "")),
                            content_type="text/html")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><meta name=viewport content='width=device-width,"
            f"initial-scale=1'><title>{html.escape(title)}</title><style>body{{font-family:system-ui,sans-serif;"
            f"max-width:40rem;margin:2rem auto;padding:0 1rem}}.err{{color:#b00}}input{{font-size:1rem;padding:.3rem}}"
            f"li{{margin:.5rem 0}}</style></head><body>{body}</body></html>")


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(guard.with_security_headers(response.headers))


def secure_subdomain(pid: ProcessId) -> str:
    """A SecureBind's subdomain: `package-publisher`, other characters as `-` (http/utils.rs)."""
    return re.sub(r"[^A-Za-z0-9]", "-", f"{pid.package_name}-{pid.publisher_node}")


def _socket_addr(request: web.Request) -> str:
    """The client's address as Rust's SocketAddr prints it (ip:port, [ipv6]:port)."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(request.remote)


def _json_error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


class _Refused(Exception):
    """A part not taken (its reason already noted)."""


def _downloading(drive: Path, name: str) -> str | None:
    """Why `name` cannot be uploaded now, if the drive's package marked it as being downloaded."""
    try:
        held = (drive / DOWNLOADING_DIR / name).read_text("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    except OSError:
        held = ""
    return f"{name} is being downloaded{' from ' + held if held else ''}: upload it when that download ends (or cancel it)"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def _ws_send(ws: web.WebSocketResponse, mtype: str, data: bytes) -> None:
    try:
        if mtype == "Text":
            await ws.send_str(data.decode("utf-8", "replace"))
        elif mtype == "Binary":
            await ws.send_bytes(data)
        elif mtype == "Ping":
            await ws.ping(data)
        elif mtype == "Pong":
            await ws.pong(data)
        elif mtype == "Close":
            await ws.close()
    except (ConnectionError, RuntimeError) as e:
        log.info("WebSocket push failed: %s", e)
