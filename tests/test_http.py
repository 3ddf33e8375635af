"""The node's HTTP server with real nodes: ports, login, who may see what, Kinode's JSON shapes (through
the webtest package), 504/503, streamed uploads and file_transfer's JSON API."""
from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import time
import urllib.parse
import uuid

import aiohttp
import pytest
from conftest import REPO, TEST_PACKAGES, evict_compiled

WITH_TESTS = ["--packages", str(REPO / "components"), "--packages", str(TEST_PACKAGES)]
FT = "/file_transfer:file_transfer:template.os"
WT = "/webtest:webtest:test.os"


def token_of(node) -> str:
    return (node.home / ".keys" / "http-token").read_text().strip()


def request(node, method: str, path: str, token: str | None = None, body: bytes | None = None,
            headers: dict | None = None, host: str = "127.0.0.1", cookie: str | None = None):
    """One HTTP request with the path sent exactly as given; (status, headers, body)."""
    conn = http.client.HTTPConnection(host, node.port, timeout=60)
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if cookie is not None:
        h["Cookie"] = cookie
    conn.request(method, path, body=body, headers=h)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def get_json(node, path: str, token: str, method: str = "GET", body=None):
    status, _, data = request(node, method, path, token, None if body is None else json.dumps(body).encode(),
                              {"Content-Type": "application/json"} if body is not None else None)
    return status, json.loads(data)


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = b""
    for name, data in files:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def ws_try(node, path: str, token: str | None, origin: str | None = None, send: str | None = None,
                 cookie: str | None = None):
    """Open a WebSocket; return ("refused", status) or ("open", [messages received])."""
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if origin:
        headers["Origin"] = origin
    if cookie:
        headers["Cookie"] = cookie
    async with aiohttp.ClientSession() as s:
        try:
            async with s.ws_connect(f"http://127.0.0.1:{node.port}{path}", headers=headers) as ws:
                got = [json.loads((await ws.receive(timeout=10)).data)]
                if send is not None:
                    await ws.send_str(send)
                    got.append(json.loads((await ws.receive(timeout=10)).data))
                return "open", got
        except aiohttp.WSServerHandshakeError as e:
            return "refused", e.status


@pytest.fixture
def web_node(node_factory):
    node = node_factory("fake.dev", start=False, extra_args=WITH_TESTS)
    node.env = dict(node.env, KINODE_HTTP_TIMEOUT="3")
    node.start()
    assert "web page: http://localhost:" in "\n".join(node.lines)
    wait_for_webtest(node)
    return node


def wait_for_webtest(node) -> None:
    """The test package says when its paths are bound; the line may come before or after `ready`
    (which the node fixture waits for), so look at the whole output, not only new lines."""
    deadline = time.monotonic() + 30
    while "webtest ready" not in "\n".join(node.lines):
        assert time.monotonic() < deadline, node.lines[-20:]
        time.sleep(0.1)


def test_ports_token_and_login(web_node, tmp_path):
    node = web_node
    tok = node.home / ".keys" / "http-token"
    assert tok.stat().st_mode & 0o777 == 0o600
    link = next(ln for ln in node.lines if "web page:" in ln).split("web page: ")[1]
    assert link == f"http://localhost:{node.port}/login?token={token_of(node)}"
    # the networking port is another one, and the directory has it
    import sqlite3
    db = sqlite3.connect(node.env["KINODE_DIRECTORY"])
    ports = [r[0] for r in db.execute("select port from nodes where name = 'fake.dev'")]
    assert ports == [node.net_port] and node.net_port != node.port
    # the login link sets an HttpOnly, SameSite=Strict cookie that then opens the homepage
    status, headers, _ = request(node, "GET", urllib.parse.urlsplit(link).path + "?" + urllib.parse.urlsplit(link).query)
    assert status == 302
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    status, _, page = request(node, "GET", "/", cookie=cookie.split(";")[0])
    assert status == 200 and b"file_transfer" in page and b"webtest" in page
    # the login goes back only to a path of this node, never to another site
    for nxt, where in (("/file_transfer%3Afile_transfer%3Atemplate.os/", "/file_transfer:file_transfer:template.os/"),
                       ("//evil.example/x", "/"), ("https://evil.example/", "/"), ("/\\evil.example", "/"),
                       ("/%09/example.com", "/"), ("/%0a/example.com", "/"), ("/%5C/example.com", "/"),
                       ("%2F%2Fexample.com", "/"), ("/%20/example.com", "/"), ("javascript:alert(1)", "/")):
        status, headers, _ = request(node, "GET", f"/login?token={token_of(node)}&next={nxt}")
        assert (status, headers["Location"]) == (302, where), nxt
    # a wrong token: 401 and no cookie
    status, headers, _ = request(node, "GET", "/login?token=nope")
    assert status == 401 and "Set-Cookie" not in headers
    # the token survives a restart
    before = token_of(node)
    node.stop()
    node.start()
    assert token_of(node) == before


def test_http_listens_on_loopback_only_by_default(web_node):
    with socket.socket() as s:
        s.connect(("127.0.0.1", web_node.port))
    addrs = [ln for ln in open(f"/proc/{web_node.proc.pid}/net/tcp").read().splitlines()[1:]
             if ln.split()[3] == "0A" and int(ln.split()[1].split(":")[1], 16) == web_node.port]
    assert addrs and all(ln.split()[1].split(":")[0] == "0100007F" for ln in addrs), addrs


# (FT/files/NAME is a name the process refuses with a 400: a missing file's 404 would look unbound)
PATHS = ["/", f"{WT}/echo", f"{WT}/echo/abc", f"{WT}/static.txt", f"{WT}/", f"{WT}/index.html", f"{WT}/sub/style.css",
         f"{WT}/upload", f"{WT}/file/a.txt", f"{WT}/local", f"{FT}/", f"{FT}/index.html", f"{FT}/app.js", f"{FT}/files",
         f"{FT}/files?node=fake2.dev", f"{FT}/files/.hidden", f"{FT}/download", f"{FT}/transfers", f"{FT}/transfers/a.txt",
         f"{FT}/allow"]


def test_every_bound_path_needs_the_token(web_node):
    node = web_node
    good = token_of(node)
    for path in PATHS:
        for method in ("GET", "POST", "DELETE"):
            assert request(node, method, path)[0] == 401, (method, path)
            assert request(node, method, path, token="x" * 43)[0] == 401, (method, path)
            assert request(node, method, path, cookie="kinode-auth_fake.dev=" + "y" * 43)[0] == 401, (method, path)
        # a browser is sent to the login page, which comes back here
        status, headers, _ = request(node, "GET", path, headers={"Accept": "text/html"})
        assert status == 302 and headers["Location"].startswith("/login?next="), path
        # positive control: with the token, the path answers (whatever it answers)
        assert request(node, "GET", path, token=good)[0] not in (401, 404), path
        assert request(node, "GET", path, cookie=f"kinode-auth_fake.dev={good}")[0] not in (401, 404), path
    # a path bound with authenticated=false needs none
    assert request(node, "GET", f"{WT}/public")[0] == 200
    for ws in (f"{WT}/ws", f"{FT}/ws"):
        assert asyncio.run(ws_try(node, ws, None)) == ("refused", 401)
        assert asyncio.run(ws_try(node, ws, "z" * 43)) == ("refused", 401)
        assert asyncio.run(ws_try(node, ws, good))[0] == "open"


def test_traversal_in_urls_is_refused(web_node):
    node = web_node
    good = token_of(node)
    for path in [f"{FT}/../../../../etc/passwd", f"{FT}/%2e%2e/%2e%2e/%2e%2e/etc/passwd", f"{FT}/%2E%2E%2Fpkg%2Fmanifest.json",
                 f"{FT}/..%2f..%2fpkg/manifest.json", f"{FT}/%252e%252e/%252e%252e/etc/passwd", "/../etc/passwd",
                 f"{FT}/./index.html", f"{FT}/..\\..\\etc\\passwd", f"{FT}//etc/passwd", "//etc/passwd",
                 f"{FT}/pkg/manifest.json", f"{FT}/file_transfer.wasm", f"{FT}/files/..%2fpkg%2fmanifest.json",
                 f"{FT}/files/%2e%2e", "/file_transfer:template.os/pkg/manifest.json", "/etc/passwd"]:
        status, _, body = request(node, "GET", path, token=good)
        assert status in (400, 404), (path, status, body[:200])
        assert b"root:" not in body and b"process_wasm_path" not in body, path
    assert request(node, "GET", f"{FT}/index.html", token=good)[0] == 200  # positive control


def test_cross_origin_websocket_is_refused(web_node):
    node = web_node
    good = token_of(node)
    assert asyncio.run(ws_try(node, f"{FT}/ws", good, origin="http://evil.example")) == ("refused", 403)
    assert asyncio.run(ws_try(node, f"{FT}/ws", good, origin=f"http://localhost:{node.port + 1}")) == ("refused", 403)
    assert asyncio.run(ws_try(node, f"{FT}/ws", good, origin=f"http://127.0.0.1:{node.port}"))[0] == "open"


def test_cookie_requests_that_change_things_need_the_nodes_own_origin(web_node):
    """A page on another local port gets the cookie sent too (same site): refused unless the request
    comes from the node's own origin; scripts with the bearer token need no Origin."""
    node = web_node
    good = token_of(node)
    cookie = f"kinode-auth_fake.dev={good}"
    own = f"http://127.0.0.1:{node.port}"
    allow = json.dumps({"allow": ["mallory.dev"]}).encode()
    as_json = {"Content-Type": "application/json"}

    def allow_list():
        status, out = get_json(node, f"{FT}/allow", good)
        assert status == 200
        return out["allow"]

    assert allow_list() is None
    for headers in ({}, {"Origin": f"http://localhost:{node.port + 1}"}, {"Origin": "null"},
                    {"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "same-site"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Origin": f"http://127.0.0.1:{node.port + 1}",
                                                       "Sec-Fetch-Site": "same-origin"}):
        for method in ("PUT", "POST"):
            status, _, body = request(node, method, f"{FT}/allow", body=allow, cookie=cookie,
                                      headers={**as_json, **headers})
            assert status == 403 and b"refused" in body or b"Origin" in body, (headers, status, body)
    # a cross-origin upload and download request, and a WebSocket, with the cookie: refused too
    files, ctype = multipart([("planted.txt", b"x")])
    foreign = {"Origin": f"http://localhost:{node.port + 1}"}
    assert request(node, "POST", f"{FT}/files", body=files, cookie=cookie,
                   headers={"Content-Type": ctype, **foreign})[0] == 403
    assert request(node, "POST", f"{FT}/download", cookie=cookie, headers={**as_json, **foreign},
                   body=json.dumps({"name": "a.txt", "node": "fake2.dev"}).encode())[0] == 403
    assert request(node, "DELETE", f"{FT}/transfers/a.txt", cookie=cookie, headers=foreign)[0] == 403
    assert asyncio.run(ws_try(node, f"{FT}/ws", None, cookie=cookie)) == ("refused", 403)
    assert asyncio.run(ws_try(node, f"{FT}/ws", None, cookie=cookie, origin=foreign["Origin"])) == ("refused", 403)
    assert allow_list() is None and not (node.files / "planted.txt").exists()
    # reading is still allowed from anywhere the cookie goes (a foreign page cannot read the answer)
    assert request(node, "GET", f"{FT}/allow", cookie=cookie, headers=foreign)[0] == 200

    # positive controls: the node's own page (Origin, or Sec-Fetch-Site alone), and a bearer script
    status, _, body = request(node, "PUT", f"{FT}/allow", body=allow, cookie=cookie, headers={**as_json, "Origin": own})
    assert status == 200, body
    assert allow_list() == ["mallory.dev"]
    status, _, body = request(node, "PUT", f"{FT}/allow", body=json.dumps({"allow": ["b.dev"]}).encode(),
                              cookie=cookie, headers={**as_json, "Sec-Fetch-Site": "same-origin"})
    assert status == 200 and allow_list() == ["b.dev"], body
    status, _, body = request(node, "PUT", f"{FT}/allow", good, json.dumps({"allow": None}).encode(), as_json)
    assert status == 200 and allow_list() is None, body
    assert request(node, "POST", f"{FT}/files", body=files, cookie=cookie,
                   headers={"Content-Type": ctype, "Origin": own})[0] == 200
    assert (node.files / "planted.txt").read_bytes() == b"x"
    assert asyncio.run(ws_try(node, f"{FT}/ws", None, cookie=cookie, origin=own))[0] == "open"
    # the JSON endpoints take JSON only: a form's text/plain body (valid JSON) is refused even from here
    status, _, body = request(node, "PUT", f"{FT}/allow", body=allow, cookie=cookie,
                              headers={"Content-Type": "text/plain", "Origin": own})
    assert status == 415 and b"application/json" in body and allow_list() is None
    status, _, body = request(node, "PUT", f"{FT}/allow", good, allow, {"Content-Type": "text/plain"})
    assert status == 415 and allow_list() is None


def test_host_header_must_name_this_node(web_node):
    """DNS rebinding: a page under an attacker's name that resolves to 127.0.0.1 sends that name."""
    node = web_node
    good = token_of(node)
    for host in ("evil.example", f"evil.example:{node.port}", f"localhost.evil.example:{node.port}", "127.0.0.1.nip.io"):
        for auth in ({"token": good}, {"cookie": f"kinode-auth_fake.dev={good}"}, {}):
            status, _, body = request(node, "GET", f"{FT}/allow", headers={"Host": host}, **auth)
            assert status == 421 and b"not a name this node serves" in body, (host, status, body)
    for host in (f"localhost:{node.port}", f"127.0.0.1:{node.port}", f"[::1]:{node.port}", "LOCALHOST", "127.0.0.1"):
        assert request(node, "GET", f"{FT}/allow", good, headers={"Host": host})[0] == 200, host


def test_every_response_forbids_sniffing_framing_and_referrers(web_node):
    node = web_node
    good = token_of(node)
    for method, path, token in (("GET", "/", good), ("GET", "/login", None), ("GET", f"{FT}/allow", None),
                                ("GET", "/nothing", good), ("GET", f"{FT}/app.js", good), ("GET", f"{FT}/allow", good),
                                ("GET", f"{WT}/file/a.txt", good), ("GET", f"{FT}/..%2f", good),
                                ("GET", f"/login?token={good}", None)):
        status, headers, _ = request(node, method, path, token)
        assert headers.get("X-Content-Type-Options") == "nosniff", (path, status)
        assert "frame-ancestors 'none'" in headers.get("Content-Security-Policy", ""), (path, status)
        assert headers.get("Referrer-Policy") == "no-referrer", (path, status)


def test_a_connection_must_send_its_request_head_in_time(web_node):
    """Slowloris: a header line every second never completes the head; the node hangs up. Control: a
    request sent at once on a connection opened at the same moment is answered."""
    from host.http.guard import HEADER_TIMEOUT
    node = web_node
    slow = socket.create_connection(("127.0.0.1", node.port))
    slow.settimeout(HEADER_TIMEOUT + 30)
    t0 = time.monotonic()
    slow.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
    assert request(node, "GET", f"{FT}/allow", token_of(node))[0] == 200
    closed_after = None
    for i in range(int(HEADER_TIMEOUT) + 30):
        try:
            slow.sendall(f"X-Slow-{i}: 1\r\n".encode())
        except OSError:
            closed_after = time.monotonic() - t0
            break
        time.sleep(1)
        slow.setblocking(False)
        try:
            if slow.recv(1024) == b"":
                closed_after = time.monotonic() - t0
                break
        except BlockingIOError:
            pass
        finally:
            slow.setblocking(True)
    slow.close()
    assert closed_after is not None and HEADER_TIMEOUT - 1 <= closed_after <= HEADER_TIMEOUT + 10, closed_after


def _non_loopback_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        return None if ip.startswith("127.") else ip
    except OSError:
        return None


def test_local_only_refuses_other_hosts(node_factory):
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    node = node_factory("fake.dev", extra_args=WITH_TESTS + ["--http-host", "0.0.0.0"])
    wait_for_webtest(node)
    good = token_of(node)
    assert request(node, "GET", f"{WT}/local", token=good)[0] == 200
    status, _, body = request(node, "GET", f"{WT}/local", token=good, host=ip)
    assert status == 403 and b"local" in body
    assert request(node, "GET", f"{WT}/echo", token=good, host=ip)[0] == 200  # not local_only


def test_json_shapes_through_process_lib(web_node):
    node = web_node
    good = token_of(node)
    status, headers, data = request(node, "POST", f"{WT}/echo?x=1&y=two", good, b"hello body", {"X-Thing": "v"})
    assert status == 201 and headers["X-Webtest"] == "yes"
    out = json.loads(data)
    (kind, inc), = out["raw"].items()
    assert kind == "Http"
    assert set(inc) == {"source_socket_addr", "method", "url", "bound_path", "headers", "url_params", "query_params"}
    assert inc["method"] == "POST" and inc["bound_path"] == f"{WT}/echo" and out["path"] == "/echo"
    assert inc["query_params"] == {"x": "1", "y": "two"} and inc["url_params"] == {}
    assert inc["url"].endswith(f"{WT}/echo?x=1&y=two") and inc["source_socket_addr"].startswith("127.0.0.1")
    assert inc["headers"]["x-thing"] == "v" and "authorization" not in inc["headers"] and "cookie" not in inc["headers"]
    assert out["body"] == "hello body"
    # ip:port, as Rust's SocketAddr prints it: process_lib parses it back (kinode v0.9.5
    # kinode/src/http/server.rs line 656)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", inc["source_socket_addr"]), inc["source_socket_addr"]
    # a trailing slash is normalised away, as upstream (kinode/src/http/utils.rs lines 76-81)
    out = json.loads(request(node, "POST", f"{WT}/echo/", good, b"slash")[2])
    assert out["raw"]["Http"]["bound_path"] == f"{WT}/echo" and out["body"] == "slash"
    # SecureBind: served on the subdomain `package-publisher` only; elsewhere a redirect there
    # (kinode v0.9.5 kinode/src/http/server.rs lines 529-569, utils.rs lines 98-104)
    assert out["answers"]["secure"] == {"Ok": None}
    status, headers, _ = request(node, "GET", f"{WT}/secure?a=1", good, headers={"Host": f"localhost:{node.port}"})
    assert status == 307 and headers["Location"] == f"http://webtest-test-os.localhost:{node.port}{WT}/secure?a=1"
    status, _, data = request(node, "GET", f"{WT}/secure", good, headers={"Host": f"webtest-test-os.localhost:{node.port}"})
    assert status == 200 and json.loads(data)["raw"]["Http"]["bound_path"] == f"{WT}/secure"
    assert request(node, "GET", f"{WT}/secure", None, headers={"Host": f"webtest-test-os.localhost:{node.port}"})[0] == 401
    # a `:name` segment
    out = json.loads(request(node, "GET", f"{WT}/echo/some%20file.txt", good)[2])
    assert out["raw"]["Http"]["url_params"] == {"name": "some file.txt"} and out["path"] == "/echo/:name"
    # the server's answers to the binder's actions: Result<(), HttpServerError>
    answers = out["answers"]
    assert answers["no_blob"] == {"Err": "NoBlob"}
    assert set(answers["bad_push"]["Err"]) == {"WebSocketPushError"} and "12345" in answers["bad_push"]["Err"]["WebSocketPushError"]["error"]
    assert set(answers["unknown"]["Err"]) == {"BadRequest"} and "req" in answers["unknown"]["Err"]["BadRequest"]
    assert set(answers["traversal"]["Err"]) == {"BadRequest"}
    assert answers["unbind"] == {"Ok": None}
    assert set(answers["pkg_upload"]["Err"]) == {"PathBindError"}  # installed files stay read-only
    # static files: a bound blob, and serve_ui's pkg/ui with index.html at "/"
    status, headers, data = request(node, "GET", f"{WT}/static.txt", good)
    assert (status, data) == (200, b"static bytes\n") and headers["Content-Type"].startswith("text/plain")
    index = (REPO / "tests/packages/webtest/pkg/ui/index.html").read_bytes()
    assert request(node, "GET", f"{WT}/", good)[2] == index
    assert request(node, "GET", f"{WT}/index.html", good)[2] == index
    status, headers, data = request(node, "GET", f"{WT}/sub/style.css", good)
    assert status == 200 and headers["Content-Type"].startswith("text/css") and b"#123456" in data
    assert request(node, "GET", WT, good)[0] == 302  # to the trailing slash
    # WebSocket: open, push both ways, close
    kind, msgs = asyncio.run(ws_try(node, f"{WT}/ws", good, send="ping from the test"))
    assert kind == "open"
    opened = msgs[0]["open"]
    assert opened["path"] == f"{WT}/ws" and isinstance(opened["channel_id"], int)
    assert msgs[1]["push"] == {"channel_id": opened["channel_id"], "message_type": "Text"}
    assert msgs[1]["data"] == "ping from the test"
    node.expect(rf"webtest ws closed: {opened['channel_id']}\b")


def test_silent_process_504_and_crashed_process_503(web_node):
    node = web_node
    good = token_of(node)
    t0 = time.monotonic()
    status, _, body = request(node, "GET", f"{WT}/slow", good)
    assert status == 504 and b"did not answer" in body and 2.5 < time.monotonic() - t0 < 20
    status, _, body = request(node, "GET", f"{WT}/crash", good)
    assert status == 503 and b"not running" in body, body
    # restarted (on_exit Restart), it binds again and answers
    deadline = time.monotonic() + 30
    while request(node, "GET", f"{WT}/echo", good)[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_uploads_stream_into_the_drive_and_hostile_names_are_refused(web_node):
    node = web_node
    good = token_of(node)
    body, ctype = multipart([("a.txt", b"first file\n"), ("../../x", b"evil"), ("b.bin", os.urandom(3_000_000)),
                             (".hidden", b"no")])
    status, _, data = request(node, "POST", f"{WT}/upload", good, body, {"Content-Type": ctype})
    assert status == 201, data
    summary = json.loads(json.loads(data)["body"])["Uploaded"]
    assert [f["name"] for f in summary["files"]] == ["a.txt", "b.bin"]
    assert summary["files"][1]["size"] == 3_000_000
    assert sorted(r["name"] for r in summary["refused"]) == ["../../x", ".hidden"]
    drive = node.home / "vfs/webtest:test.os/uploads"
    assert (drive / "a.txt").read_bytes() == b"first file\n"
    assert not (node.home / "x").exists() and not (node.home / "vfs/x").exists() and not (drive.parent / "x").exists()
    assert [p.name for p in (drive / ".partial").iterdir()] == []
    # a file streamed back from disk by the server (the process answers with its VFS path)
    status, _, data = request(node, "GET", f"{WT}/file/a.txt", good)
    assert (status, data) == (200, b"first file\n")
    assert request(node, "GET", f"{WT}/file/nope.txt", good)[0] == 502


def _vm_hwm_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_one_gib_upload_keeps_the_node_small(node_factory):
    evict_compiled()  # the node's memory, not how recently its components were compiled
    node = node_factory("fake.dev")
    good = token_of(node)
    size = 1 << 30
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    deadline = time.monotonic() + 30
    while request(node, "GET", f"{FT}/files", good)[0] != 200:  # file_transfer has bound its paths
        assert time.monotonic() < deadline
        time.sleep(0.2)
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=300)
    conn.putrequest("POST", f"{FT}/files")
    conn.putheader("Authorization", f"Bearer {good}")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Content-Length", str(len(head) + size + len(tail)))
    conn.endheaders()
    conn.send(head)
    for i in range(size >> 20):
        chunk = i.to_bytes(8, "big") + block[8:]
        digest.update(chunk)
        conn.send(chunk)
    conn.send(tail)
    resp = conn.getresponse()
    data = resp.read()
    assert resp.status == 200, data
    assert json.loads(data)["files"] == [{"name": "big.bin", "size": size}]
    peak = _vm_hwm_mib(node.proc.pid)
    print(f"1 GiB upload: node peak RSS {peak:.0f} MiB")
    assert peak < 300, peak
    got = hashlib.sha256()
    with open(node.files / "big.bin", "rb") as f:
        while chunk := f.read(1 << 22):
            got.update(chunk)
    assert got.digest() == digest.digest()
    (node.files / "big.bin").unlink()


def test_file_transfer_api_between_two_nodes(two_nodes):
    fake, fake2 = two_nodes
    t1, t2 = token_of(fake), token_of(fake2)
    for n, t in ((fake, t1), (fake2, t2)):
        deadline = time.monotonic() + 30
        while request(n, "GET", f"{FT}/files", t)[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    data = os.urandom(5_000_000)
    body, ctype = multipart([("shared.bin", data), ("note.txt", b"hi\n")])
    status, _, out = request(fake2, "POST", f"{FT}/files", t2, body, {"Content-Type": ctype})
    assert status == 200, out
    status, listing = get_json(fake2, f"{FT}/files", t2)
    assert status == 200 and sorted(listing["ListFiles"], key=lambda f: f["name"]) == [
        {"name": "note.txt", "size": 3}, {"name": "shared.bin", "size": 5_000_000}]
    # fake lists fake2's files, downloads one, sees it finish
    status, listing = get_json(fake, f"{FT}/files?node=fake2.dev", t1)
    assert status == 200 and len(listing["ListFiles"]) == 2
    status, out = get_json(fake, f"{FT}/download", t1, "POST", {"name": "shared.bin", "node": "fake2.dev"})
    assert status == 200 and out == {"Download": {"Ok": None}}
    deadline = time.monotonic() + 60
    while True:
        status, state = get_json(fake, f"{FT}/transfers", t1)
        if state["history"]:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["history"][0]["ok"] and state["history"][0]["name"] == "shared.bin", state
    assert (fake.files / "shared.bin").read_bytes() == data
    # errors: a hostile name, an unknown node, cancelling nothing
    status, out = get_json(fake, f"{FT}/download", t1, "POST", {"name": "../../x", "node": "fake2.dev"})
    assert status == 400 and "file name" in out["error"]
    status, out = get_json(fake, f"{FT}/files?node=nobody.dev", t1)
    assert status == 502 and "nobody.dev" in out["error"]
    status, out = get_json(fake, f"{FT}/transfers/nothing.txt", t1, "DELETE")
    assert status == 400 and "no transfer" in out["error"]
    # the allow rule: fake2 shares with nobody, and fake is told so
    status, out = get_json(fake2, f"{FT}/allow", t2, "PUT", {"allow": ["other.dev"]})
    assert status == 200 and get_json(fake2, f"{FT}/allow", t2)[1] == {"allow": ["other.dev"]}
    status, out = get_json(fake, f"{FT}/files?node=fake2.dev", t1)
    assert status == 403 and "not allowed" in out["error"]
    status, out = get_json(fake2, f"{FT}/allow", t2, "PUT", {"allow": None})
    assert get_json(fake, f"{FT}/files?node=fake2.dev", t1)[0] == 200


def test_traversal_check_unit():
    from host.http.server import _traversal
    for bad in ["/a/../b", "/a/%2e%2e/b", "/a/%2E%2e%2Fb", "/a/%252e%252e/b", "/./a", "/a/..", "/a/b\\..\\c",
                "/a/%00b", "/a/%25252e%25252e/b"]:
        assert _traversal(bad), bad
    for good in ["/", "/a/b.c/d", "/a/..b/c", "/a/b..", "/a/%20b?x=../y", "/file_transfer:file_transfer:template.os/"]:
        assert not _traversal(good), good


def test_file_transfer_api_folders(two_nodes):
    """Folders through the JSON API: listed with their counts, opened, downloaded whole, a file inside
    one saved; hostile or missing folders get a clear error beside each positive control."""
    fake, fake2 = two_nodes
    t1, t2 = token_of(fake), token_of(fake2)
    docs = fake2.files / "docs"
    (docs / "deep").mkdir(parents=True)
    (docs / "a.txt").write_bytes(b"a" * 10)
    (docs / "deep" / "b.bin").write_bytes(data := os.urandom(300_000))
    for n, t in ((fake, t1), (fake2, t2)):
        deadline = time.monotonic() + 30
        while request(n, "GET", f"{FT}/files", t)[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    # the provider's own listing and fake's view of it: the folder with its count and size
    folder_row = {"name": "docs/", "size": 300_010, "files": 2}
    assert get_json(fake2, f"{FT}/files", t2) == (200, {"ListFiles": [folder_row]})
    assert get_json(fake, f"{FT}/files?node=fake2.dev", t1) == (200, {"ListFiles": [folder_row]})
    status, inside = get_json(fake, f"{FT}/files?node=fake2.dev&folder=docs", t1)
    assert status == 200 and sorted(inside["ListFiles"], key=lambda f: f["name"]) == [
        {"name": "a.txt", "size": 10}, {"name": "deep/", "size": 300_000, "files": 1}]
    status, inside = get_json(fake, f"{FT}/files?node=fake2.dev&folder=docs/deep/", t1)
    assert (status, inside) == (200, {"ListFiles": [{"name": "b.bin", "size": 300_000}]})
    # hostile and missing folders, here and there
    for query in ("folder=..", "folder=docs/../..", "folder=.partial", "folder=docs%5C..",
                  "node=fake2.dev&folder=../x", "node=fake2.dev&folder=docs/./deep"):
        status, out = get_json(fake, f"{FT}/files?{query}", t1)
        assert status == 400 and out["error"].startswith("bad folder name"), (query, out)
    status, out = get_json(fake, f"{FT}/files?node=fake2.dev&folder=nope", t1)
    assert (status, out) == (404, {"error": "fake2.dev has no folder nope"})
    status, out = get_json(fake, f"{FT}/files?node=fake2.dev&folder=docs/a.txt", t1)
    assert status == 404 and "no folder docs/a.txt" in out["error"], out
    status, out = get_json(fake2, f"{FT}/files?folder=nope", t2)
    assert status == 404 and "no such folder on fake2.dev: nope" in out["error"], out
    # a folder upload (files named by their path inside it): made as sent; hostile parts, a file or a
    # symlink where a folder should be, are refused and nothing lands outside the drive
    outside = fake2.home / "outside"
    outside.mkdir()
    (fake2.files / "link").symlink_to(outside)
    body, ctype = multipart([("trip/day1/a.txt", b"day one\n"), ("trip/b.txt", b"bee\n"), ("trip/../../x", b"evil"),
                             ("trip/.git/config", b"no"), ("docs/a.txt/c.txt", b"no"), ("link/evil.txt", b"no")])
    status, _, out = request(fake2, "POST", f"{FT}/files", t2, body, {"Content-Type": ctype})
    summary = json.loads(out)
    assert status == 200 and [f["name"] for f in summary["files"]] == ["trip/day1/a.txt", "trip/b.txt"], summary
    refused = {r["name"]: r["reason"] for r in summary["refused"]}
    assert sorted(refused) == ["docs/a.txt/c.txt", "link/evil.txt", "trip/../../x", "trip/.git/config"]
    assert "docs/a.txt is not a folder" in refused["docs/a.txt/c.txt"] and "link is not a folder" in refused["link/evil.txt"]
    assert (fake2.files / "trip" / "day1" / "a.txt").read_bytes() == b"day one\n"
    assert sorted(p.name for p in (fake2.files / "trip").iterdir()) == ["b.txt", "day1"]
    assert list(outside.iterdir()) == [] and not (fake2.home / "x").exists() and (docs / "a.txt").read_bytes() == b"a" * 10
    assert [p.name for p in (fake2.files / ".partial").iterdir()] == []
    status, listing = get_json(fake2, f"{FT}/files", t2)
    assert {"name": "trip/", "size": 12, "files": 2} in listing["ListFiles"], listing
    (fake2.files / "link").unlink()
    shutil.rmtree(fake2.files / "trip")
    # a file inside a folder, from the node's own drive; the folder itself and escapes are refused
    status, _, got = request(fake2, "GET", f"{FT}/files/docs?path=deep/b.bin", t2)
    assert status == 200 and got == data
    for path, want in ((f"{FT}/files/docs", 400), (f"{FT}/files/docs?path=../../x", 400),
                       (f"{FT}/files/docs?path=deep/../../x", 400), (f"{FT}/files/docs?path=nope.txt", 404)):
        status, _, out = request(fake2, "GET", path, t2)
        assert status == want and json.loads(out)["error"], (path, status, out)
    # a nested name is not a download (one click fetches the top folder); the folder is, whole
    status, out = get_json(fake, f"{FT}/download", t1, "POST", {"name": "docs/deep", "node": "fake2.dev"})
    assert status == 400 and "file name" in out["error"], out
    status, out = get_json(fake, f"{FT}/download", t1, "POST", {"name": "docs", "node": "fake2.dev"})
    assert (status, out) == (200, {"Download": {"Ok": None}})
    deadline = time.monotonic() + 60
    while not (state := get_json(fake, f"{FT}/transfers", t1)[1])["history"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["history"][0] == {**state["history"][0], "name": "docs", "ok": True, "files": 2, "bytes": 300_010}
    assert (fake.files / "docs" / "deep" / "b.bin").read_bytes() == data
    assert get_json(fake, f"{FT}/files?folder=docs/deep", t1) == (200, {"ListFiles": [{"name": "b.bin", "size": 300_000}]})


def test_a_control_character_in_an_uploaded_name_is_refused_with_its_reason(web_node):
    node = web_node
    good = token_of(node)
    for name in ("ctl\x01.txt", "esc\x1b[31m.txt", "del\x7f.txt"):
        body, ctype = multipart([(name, b"bad")])
        status, _, data = request(node, "POST", f"{FT}/files", good, body, {"Content-Type": ctype})
        assert status == 400 and b"control character" in data and b"Traceback" not in data, (name, status, data)
    body, ctype = multipart([("fine.txt", b"good")])  # control: the same upload with a plain name
    assert request(node, "POST", f"{FT}/files", good, body, {"Content-Type": ctype})[0] == 200
    assert (node.files / "fine.txt").read_bytes() == b"good"
    assert sorted(p.name for p in node.files.iterdir() if not p.name.startswith(".")) == ["fine.txt"]


def test_uploaded_names_cannot_lie(web_node):
    """A bidi override or a zero-width character in an uploaded name is refused with its reason; a
    decomposed (NFD) name, as a Mac's browser sends it, is stored under its one NFC spelling."""
    node = web_node
    good = token_of(node)
    body, ctype = multipart([("rtl\u202etxt.exe", b"x"), ("zero\u200bwidth.txt", b"y"), ("cafe\u0301.txt", b"nfd")])
    status, _, data = request(node, "POST", f"{FT}/files", good, body, {"Content-Type": ctype})
    summary = json.loads(data)
    assert status == 200 and [f["name"] for f in summary["files"]] == ["caf\u00e9.txt"], summary
    assert {r["name"]: r["reason"] for r in summary["refused"]} == {
        "rtl\u202etxt.exe": "file name 'rtl\\u202etxt.exe' holds an invisible formatting character (U+202E) that can disguise it",
        "zero\u200bwidth.txt": "file name 'zero\\u200bwidth.txt' holds an invisible formatting character (U+200B) that can disguise it"}
    assert os.listdir(node.files) == ["caf\u00e9.txt"] or sorted(os.listdir(node.files)) == [".partial", "caf\u00e9.txt"]
    assert (node.files / "caf\u00e9.txt").read_bytes() == b"nfd"
    status, _, data = request(node, "GET", f"{FT}/files", good)
    assert [f["name"] for f in json.loads(data)["ListFiles"]] == ["caf\u00e9.txt"]


def test_an_extension_websocket_answers_a_request(web_node):
    """WebSocketBind with `extension`, WebSocketExtPushOutgoing and the extension's
    WebSocketExtPushData reply (kinode v0.9.5 kinode/src/http/server.rs lines 66-165 send_push,
    826-906 make_ext_websocket_message, 1316-1331; lib/src/http/server_types.rs lines 128-147): the
    process's bytes reach the extension wrapped with the request's id, and the reply with that id
    is the Response the process awaits."""
    import msgpack
    node, good = web_node, token_of(web_node)

    async def extension() -> tuple[dict, dict]:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"http://127.0.0.1:{node.port}{WT}/ext",
                                    headers={"Authorization": f"Bearer {good}"}) as ws:
                sent = msgpack.unpackb((await ws.receive(timeout=20)).data)
                data = sent["WebSocketExtPushData"]
                await ws.send_bytes(msgpack.packb({"WebSocketExtPushData": {
                    "id": data["id"], "kinode_message_type": "Response", "blob": list(b"from the extension")}}))
                return sent, json.loads((await ws.receive(timeout=20)).data)

    sent, told = asyncio.run(extension())
    data = sent["WebSocketExtPushData"]
    assert bytes(data["blob"]) == b"to the extension" and data["kinode_message_type"] == "Response"
    assert isinstance(data["id"], int)
    assert told["kind"] == "ext-reply" and told["blob"] == "from the extension", told
    assert set(told["body"]) == {"WebSocketPush"} and told["body"]["WebSocketPush"]["message_type"] == "Binary"
