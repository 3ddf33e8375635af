"""Nodes on several machines, over a real link: network namespaces joined by veth pairs and a
bridge, a node in each with only a peers file (see tests/netns.py). Needs root; skipped otherwise."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import no_workers
from netns import Netns, netns  # noqa: F401  (the fixture)

LIST = "list_files:file_transfer:template.os"
DOWNLOAD = "download:file_transfer:template.os"


def write_random(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size >> 22):
            block = os.urandom(1 << 22)
            f.write(block)
            h.update(block)
    return h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def pair(net: Netns, v6: bool = False):
    """Requestor a.dev and provider b.dev in two namespaces, each listing the other (by IPv4 or
    IPv6 address), their entries made by `python -m host id`."""
    ha, hb = net.host("a"), net.host("b")
    a, b = net.node(ha, "a.dev"), net.node(hb, "b.dev")
    addr = (lambda h: f"[{h.addr6}]:8080") if v6 else (lambda h: h.addr4)
    a.set_peers([b.entry(addr(hb))])
    b.set_peers([a.entry(addr(ha))])
    return a.start(), b.start()


def test_list_files_and_a_256_mib_download_across_the_link(netns):
    a, b = pair(netns)
    (b.files / "my_file.txt").parent.mkdir(parents=True, exist_ok=True)
    (b.files / "my_file.txt").write_text("hello world\n")
    code, lines = a.run(f"{LIST} b.dev")
    assert code == 0, lines
    assert "file_transfer:template.os: my_file.txt\t\t12" in lines, lines
    digest = write_random(b.files / "big.bin", 256 << 20)
    code, lines = a.run(f"{DOWNLOAD} big.bin b.dev", until=r"big\.bin downloaded|error:", timeout=120)
    assert code == 0, lines
    assert sha256(a.files / "big.bin") == digest
    # The node's `id` command prints the entry `python -m host id` made (the same key), with the
    # address it advertises (no --advertise: the hostname).
    _, lines = b.run("id", wait=0.1)
    shown = json.loads(lines[0])
    assert shown["public_key"] == b.entry("x")["public_key"] and shown["name"] == "b.dev"
    # The connection really is over the link, to the provider's port on its veth address.
    ss = subprocess.run(["ip", "netns", "exec", b.host.ns, "ss", "-tnH", "state", "established"],
                        capture_output=True, text=True, check=True).stdout
    v4 = lambda addr: rf"\[?(::ffff:)?{re.escape(addr)}\]?"  # noqa: E731  (a dual-stack socket shows ::ffff:)
    assert re.search(rf"{v4(b.host.addr4)}:8080\s+{v4(a.host.addr4)}:\d+", ss), ss
    no_workers(a, b)
