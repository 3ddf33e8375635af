"""Text-like test data: web-server access logs, application logs and CSV rows, each line with its
own addresses, times, ids and amounts (as real logs compress, not as one line repeated does)."""
from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

_METHODS = ("GET", "GET", "GET", "POST", "PUT", "DELETE")
_PATHS = ("/api/v1/users", "/api/v1/orders", "/static/app.js", "/login", "/api/v1/items/search", "/health",
          "/metrics", "/api/v1/cart", "/img/logo.png")
_AGENTS = ("Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0", "curl/8.5.0",
           "python-requests/2.32.3", "Go-http-client/1.1", "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X)")
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")
_WORDS = ("cache miss", "retrying", "connection reset by peer", "slow query", "session expired",
          "payment accepted", "rate limited", "queue drained", "config reloaded", "user logged in")


def text_like(size: int, seed: int = 1) -> bytes:
    """`size` bytes of log and CSV lines, the same for the same seed."""
    rnd = random.Random(seed)
    out: list[str] = []
    n = 0
    t = 1_767_225_600.0 + seed * 86_400
    while n < size:
        t += rnd.expovariate(50)
        stamp = time.gmtime(t)
        roll = rnd.random()
        if roll < 0.5:
            line = (f'{rnd.randint(1, 223)}.{rnd.randint(0, 255)}.{rnd.randint(0, 255)}.{rnd.randint(1, 254)} - - '
                    f'[{time.strftime("%d/%b/%Y:%H:%M:%S", stamp)} +0000] "{rnd.choice(_METHODS)} '
                    f'{rnd.choice(_PATHS)}?id={rnd.randint(1, 999_999)} HTTP/1.1" '
                    f'{rnd.choice((200, 200, 200, 201, 304, 404, 500))} {rnd.randint(100, 60_000)} "-" '
                    f'"{rnd.choice(_AGENTS)}"\n')
        elif roll < 0.75:
            line = (f'{time.strftime("%Y-%m-%dT%H:%M:%S", stamp)}.{int(t * 1000) % 1000:03d}Z {rnd.choice(_LEVELS)} '
                    f'worker-{rnd.randint(1, 16)} request_id={rnd.getrandbits(64):016x} {rnd.choice(_WORDS)} '
                    f'took {rnd.uniform(0.1, 900):.1f} ms user={rnd.randint(1, 50_000)}\n')
        else:
            line = (f'{rnd.randint(1, 10**7)},{time.strftime("%Y-%m-%d %H:%M:%S", stamp)},customer_{rnd.randint(1, 90_000)},'
                    f'{rnd.choice(("EUR", "USD", "GBP"))},{rnd.uniform(1, 5000):.2f},{rnd.randint(1, 20)},'
                    f'{rnd.choice(("paid", "pending", "refunded", "shipped"))}\n')
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def write_text_like(path: Path, size: int, seed: int = 1) -> str:
    """Write `size` bytes of text_like data (made 8 MiB at a time); their SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left, part = size, 0
        while left:
            block = text_like(min(left, 8 << 20), seed * 100_003 + part)
            f.write(block)
            h.update(block)
            left -= len(block)
            part += 1
    return h.hexdigest()
