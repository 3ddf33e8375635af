"""host/http/guard.py: the web page's origin, host and header policy, as units (the HTTP tests in
tests/test_http.py and tests/test_browser.py show it on a running node)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from host.http import guard

NAMES = guard.served_names(["127.0.0.1", "::1", "node.example.org", "0.0.0.0", None, "[2001:db8::1]"])


def test_served_names():
    assert NAMES == {"localhost", "127.0.0.1", "::1", "node.example.org", "2001:db8::1"}


@pytest.mark.parametrize("host,ok", [
    ("localhost", True), ("localhost:8080", True), ("LocalHost:1", True), ("127.0.0.1:8080", True),
    ("[::1]:8080", True), ("[::1]", True), ("node.example.org:80", True), ("10.1.2.3:8080", True),
    ("[fe80::1]:8080", True), (None, True),
    ("webtest-test-os.localhost:8080", True), ("pkg-pub.node.example.org", True),   # SecureBind's subdomains
    ("x.127.0.0.1", False), ("evillocalhost", False), ("node.example.org.evil.example", False),
    ("evil.example", False), ("evil.example:8080", False), ("localhost.evil.example", False),
    ("127.0.0.1.nip.io:8080", False), ("", False), ("example.org", False),
])
def test_host_problem(host, ok):
    assert (guard.host_problem(host, NAMES) == "") == ok


def h(**kw: str) -> CIMultiDict:
    return CIMultiDict({k.replace("_", "-"): v for k, v in kw.items()})


OWN = "http://localhost:8080"


@pytest.mark.parametrize("method,headers,bearer,ws,ok", [
    ("GET", h(Host="localhost:8080", Cookie="c=1", Origin="http://evil.example"), False, False, True),
    ("HEAD", h(Host="localhost:8080", Cookie="c=1"), False, False, True),
    ("POST", h(Host="localhost:8080", Cookie="c=1", Origin=OWN), False, False, True),
    ("PUT", h(Host="localhost:8080", Cookie="c=1", Origin=OWN.upper()), False, False, True),
    ("DELETE", h(Host="localhost:8080", Cookie="c=1", Sec_Fetch_Site="same-origin"), False, False, True),
    ("POST", h(Host="localhost:8080"), True, False, True),             # a bearer script
    ("POST", h(Host="localhost:8080"), False, False, True),            # no cookie, no browser: nothing to borrow
    ("POST", h(Host="localhost:8080", Cookie="c=1"), False, False, False),
    ("POST", h(Host="localhost:8080", Cookie="c=1", Origin="http://localhost:8081"), False, False, False),
    ("POST", h(Host="localhost:8080", Cookie="c=1", Origin="null"), False, False, False),
    ("POST", h(Host="localhost:8080", Cookie="c=1", Origin="http://127.0.0.1:8080"), False, False, False),
    ("PATCH", h(Host="localhost:8080", Cookie="c=1", Sec_Fetch_Site="same-site"), False, False, False),
    ("POST", h(Host="localhost:8080", Sec_Fetch_Site="cross-site"), False, False, False),
    ("POST", h(Host="localhost:8080", Origin="http://evil.example"), True, False, False),  # a page that has the token
    ("OPTIONS", h(Host="localhost:8080", Origin="http://evil.example"), False, False, False),
    ("GET", h(Host="localhost:8080", Cookie="c=1"), False, True, False),  # a WebSocket upgrade changes things
    ("GET", h(Host="localhost:8080", Cookie="c=1", Origin=OWN), False, True, True),
    ("GET", h(Host="localhost:8080", Origin="http://localhost:9"), True, True, False),
])
def test_origin_problem(method, headers, bearer, ws, ok):
    problem = guard.origin_problem(method, headers, "http", bearer, websocket=ws)
    assert (problem == "") == ok, problem


@pytest.mark.parametrize("nxt,want", [
    ("/", "/"), ("/file_transfer:file_transfer:template.os/", "/file_transfer:file_transfer:template.os/"),
    ("/a?b=c&d=/e", "/a?b=c&d=/e"), ("/%2F%2Fevil", "/%2F%2Fevil"),
    ("//evil.example", "/"), ("/\\evil.example", "/"), ("/\t/evil.example", "/"), ("/\n/evil.example", "/"),
    ("/\r/evil", "/"), ("/ /evil", "/"), ("https://evil.example/", "/"), ("evil.example", "/"),
    ("javascript:alert(1)", "/"), ("", "/"), ("/\x85/evil", "/"),
])
def test_safe_next(nxt, want):
    assert guard.safe_next(nxt) == want


@given(st.text(max_size=40))
def test_safe_next_stays_on_this_origin(nxt):
    """Whatever is asked, the answer is a path that a browser (dropping tabs/newlines, reading `\\` as
    `/`) resolves on this origin."""
    out = guard.safe_next(nxt)
    seen = "".join(c for c in out if c not in "\t\n\r").replace("\\", "/")
    assert seen.startswith("/") and not seen.startswith("//")


def test_security_headers_are_added_and_a_process_csp_gets_frame_ancestors():
    assert guard.with_security_headers({}) == dict(guard.SECURITY_HEADERS)
    added = guard.with_security_headers({"content-security-policy": "default-src 'self'",
                                         "X-Content-Type-Options": "nosniff"})
    assert added["Content-Security-Policy"] == "default-src 'self'; frame-ancestors 'none'"
    assert "X-Content-Type-Options" not in added
    assert "Content-Security-Policy" not in guard.with_security_headers(
        {"Content-Security-Policy": "frame-ancestors 'self'"})
