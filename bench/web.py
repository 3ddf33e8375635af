"""The web page's upload and download: one file through file_transfer's HTTP API on one node.

    .venv/bin/python bench/web.py [--mib 1024] [--rounds 3]

Starts a node (temporary home), then per round uploads a random file of --mib MiB as the page does
(`POST files`, multipart, streamed into the drive) and downloads it back (`GET files/NAME`, streamed
from disk), checking both by hash. Prints MiB/s and the node's CPU-seconds per GiB for each, and the
node's peak memory (VmHWM).
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer import FILES, peak_rss_mib, start_node  # noqa: E402

FT = "/file_transfer:file_transfer:template.os"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def upload(port: int, token: str, name: str, size: int) -> str:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.putrequest("POST", f"{FT}/files")
    conn.putheader("Authorization", f"Bearer {token}")
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
    if resp.status != 200 or json.loads(data)["files"] != [{"name": name, "size": size}]:
        raise RuntimeError(f"upload failed: {resp.status} {data[:200]!r}")
    return digest.hexdigest()


def download(port: int, token: str, name: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", f"{FT}/files/{name}", headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"download failed: {resp.status}")
    digest = hashlib.sha256()
    while block := resp.read(1 << 20):
        digest.update(block)
    return digest.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-web-"))
    env = dict(os.environ, KINODE_DIRECTORY=str(tmp / "directory.sqlite"))
    home = tmp / "node"
    port = free_port()
    node = start_node("bench-web.dev", home, free_port(), env, ["--port", str(port)])
    size, gib = args.mib << 20, args.mib / 1024
    ups, downs = [], []
    try:
        token = (home / ".keys" / "http-token").read_text().strip()
        deadline = time.monotonic() + 60
        while True:  # file_transfer has bound its paths
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", f"{FT}/files", headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("file_transfer never bound its paths")
            time.sleep(0.2)
        for r in range(1, args.rounds + 1):
            c0, t0 = cpu(node.pid), time.perf_counter()
            digest = upload(port, token, "web.bin", size)
            c1, t1 = cpu(node.pid), time.perf_counter()
            if download(port, token, "web.bin") != digest:
                raise RuntimeError("downloaded copy differs")
            c2, t2 = cpu(node.pid), time.perf_counter()
            ups.append((size / (t1 - t0) / 2**20, (c1 - c0) / gib))
            downs.append((size / (t2 - t1) / 2**20, (c2 - c1) / gib))
            (home / FILES / "web.bin").unlink()
            print(f"round {r}: upload {ups[-1][0]:.0f} MiB/s, node CPU-s/GiB {ups[-1][1]:.2f}; download "
                  f"{downs[-1][0]:.0f} MiB/s, node CPU-s/GiB {downs[-1][1]:.2f} (verified); load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
        med = statistics.median
        print(f"median: upload {med(u[0] for u in ups):.0f} MiB/s ({med(u[1] for u in ups):.2f} CPU-s/GiB), download "
              f"{med(d[0] for d in downs):.0f} MiB/s ({med(d[1] for d in downs):.2f} CPU-s/GiB); node peak RSS "
              f"{peak_rss_mib(node.pid):.0f} MiB")
    finally:
        node.terminate()
        node.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
