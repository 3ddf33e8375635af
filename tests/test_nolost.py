"""Nothing lost: one download per name at a time (from any node, or an upload from the web page), a
replacement said aloud, and a provider's file changing under a transfer never delivered as a mix
of two versions. Real nodes, real files; the provider is held mid-way with the test pause."""
from __future__ import annotations

import os
import re

from conftest import HELD_CHUNKS, no_workers, paused, release, sha256, stop_mid_transfer, wait_for
from test_http import FT, get_json, multipart, request, token_of
from test_transfers import download, put

DL = "download:file_transfer:template.os"


def test_one_name_is_downloaded_from_one_node_at_a_time_and_a_replacement_is_said(node_factory):
    fake = node_factory("fake.dev")
    fake2, fake3 = node_factory("fake2.dev", pause_after=HELD_CHUNKS), node_factory("fake3.dev")
    size = 40 << 20
    first, other = put(fake2, "same.bin", size), put(fake3, "same.bin", 1 << 20)
    stop_mid_transfer(fake, fake2, "same.bin", size)
    try:
        code, lines = fake.run(f"{DL} same.bin fake3.dev", timeout=20)
        assert code == 1 and lines == ["file_transfer:template.os: error: download of same.bin from fake3.dev failed: "
                                       "same.bin is already being downloaded from fake2.dev"], lines
        # the web page's download is refused the same way
        t = token_of(fake)
        status, out = get_json(fake, f"{FT}/download", t, "POST", {"name": "same.bin", "node": "fake3.dev"})
        assert status != 200 and "same.bin is already being downloaded from fake2.dev" in out["error"], (status, out)
        # an upload of that name lands (the HTTP server streams it first) and is told the download will replace it
        body, ctype = multipart([("same.bin", b"uploaded meanwhile")])
        status, _, answer = request(fake, "POST", f"{FT}/files", t, body, {"Content-Type": ctype})
        assert status == 200 and b"same.bin is being downloaded from fake2.dev: that download will replace" in answer, answer
    finally:
        release(fake2)
    line = fake.expect(r"same\.bin downloaded", 60)
    assert line.endswith("; it replaced the same.bin this node had, of other content"), line  # the upload's
    assert sha256(fake.files / "same.bin") == first
    # the second node's copy, of other content, replaces it and says so, on the terminal and the web page
    lines = download(fake, "same.bin", "fake3.dev")
    assert any(ln.endswith("; it replaced the same.bin this node had, of other content") for ln in lines), lines
    assert sha256(fake.files / "same.bin") == other
    history = get_json(fake, f"{FT}/transfers", token_of(fake))[1]["history"]
    assert history[0]["name"] == "same.bin" and history[0]["node"] == "fake3.dev" and history[0]["replaced"], history
    # the control: the same content again replaces nothing worth saying
    lines = download(fake, "same.bin", "fake3.dev")
    done = [ln for ln in lines if "same.bin downloaded" in ln]
    assert done and "replaced" not in done[0], lines
    no_workers(fake, fake2, fake3)
