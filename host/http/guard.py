"""Who the web page acts for: the node's HTTP policy on origins, hosts and response headers.

A browser sends the login cookie with every request to the node, whichever page made it: every port
of `localhost` is the same *site*, so SameSite=Strict does not stop a page served on another local
port. So the server acts on a cookie only for the node's own origin:

- `Host` must name the node: `localhost`, the names it was told it serves (`--http-host`,
  `--advertise`), a subdomain of one (a SecureBind is served on `package-publisher.HOST`; every
  `*.localhost` is loopback), or an IP address literal. A DNS-rebinding page reaches the node under
  a *name* it controls, which is refused; an IP literal cannot be rebound.
- a request that changes something (every method but GET and HEAD, and every WebSocket upgrade)
  without a valid bearer token must come from the node's own origin: its `Origin` equals
  `http://HOST` of the request (or, without `Origin`, `Sec-Fetch-Site: same-origin`). A client that
  sends neither and no cookie (a script reaching a public path) is let through: it carries no
  authority a page could borrow.
- a bearer token (`Authorization: Bearer TOKEN`) is never sent by a browser on its own, so scripts
  using it need no `Origin` (but an `Origin` that is sent must still be the node's own).

Every response carries `SECURITY_HEADERS` (no sniffing, no framing, no referrer: the login link
holds the token).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

# seconds a connection may take to send a whole request head (and may sit idle between requests)
HEADER_TIMEOUT = 10.0

SAFE_METHODS = frozenset({"GET", "HEAD"})
WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})

SECURITY_HEADERS: Mapping[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def host_name(host_header: str) -> str:
    """The name in a `Host` header, without its port, lower-cased (`[::1]:8080` -> `::1`)."""
    text = host_header.strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    if text.count(":") == 1:
        return text.partition(":")[0]
    return text


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def served_names(names: Iterable[str | None]) -> frozenset[str]:
    """The host names the node answers to: localhost and the given ones (wildcards dropped)."""
    out = {"localhost"}
    for name in names:
        if name is not None and name.strip() not in WILDCARDS:
            out.add(host_name(name) if not is_ip_literal(name.strip("[]")) else name.strip("[]").lower())
    return frozenset(out)


def host_problem(host_header: str | None, names: frozenset[str]) -> str:
    """Why this `Host` is not one the node serves, or ''."""
    if host_header is None:  # HTTP/1.0 without Host: no browser sends that
        return ""
    name = host_name(host_header)
    if name in names or is_ip_literal(name):
        return ""
    if any(name.endswith("." + n) for n in names if not is_ip_literal(n)):
        return ""   # a subdomain: where SecureBind serves its package
    return (f"Host {host_header[:100]!r} is not a name this node serves (localhost, an IP address, "
            f"or --http-host/--advertise)")


def origin_problem(method: str, headers: Mapping[str, str], scheme: str, bearer: bool,
                   websocket: bool = False) -> str:
    """Why this request may not act on the node for the page that sent it, or ''.

    `headers` are the request's (case-insensitive lookups, as aiohttp's); `bearer`: it carries the
    node's token in `Authorization`."""
    if method.upper() in SAFE_METHODS and not websocket:
        return ""
    origin = headers.get("Origin")
    fetch_site = headers.get("Sec-Fetch-Site")
    own = f"{scheme}://{headers.get('Host', '')}".lower()
    if origin is not None:  # a page said where it is: even with a token, only our own
        if origin.lower() == own:
            return ""
        return f"cross-origin request refused (Origin {origin[:100]}, this node is {own})"
    if bearer:
        return ""
    if fetch_site is not None:
        if fetch_site.lower() == "same-origin":
            return ""
        return f"cross-origin request refused (Sec-Fetch-Site: {fetch_site[:40]})"
    if "Cookie" in headers:
        return ("a request that changes something must say where it comes from (Origin), "
                "or carry Authorization: Bearer TOKEN")
    return ""


def safe_next(nxt: str) -> str:
    """The path to go to after login: `nxt` if it is a path of this origin, else `/`.

    Browsers drop tabs and newlines from URLs and read a backslash as a slash, so `/\\t/evil.example`
    would become `//evil.example`: any control character, space or backslash is refused outright."""
    if not nxt.startswith("/") or nxt.startswith("//"):
        return "/"
    if any(c in "\\ " or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in nxt):
        return "/"
    parts = urlsplit(nxt)
    if parts.scheme or parts.netloc:
        return "/"
    return nxt


def with_security_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers to add to a response that has `headers`: those of SECURITY_HEADERS it lacks, and
    `frame-ancestors 'none'` appended to a Content-Security-Policy a process set without one."""
    present = {k.lower(): k for k in headers}
    add: dict[str, str] = {}
    for name, value in SECURITY_HEADERS.items():
        key = present.get(name.lower())
        if key is None:
            add[name] = value
        elif name == "Content-Security-Policy" and "frame-ancestors" not in headers[key]:
            add[name] = headers[key].rstrip("; ") + "; frame-ancestors 'none'"
    return add
