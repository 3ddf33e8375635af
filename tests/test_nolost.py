"""Nothing lost: one download per name at a time (from any node, or an upload from the web page), a
replacement said aloud, and a provider's file changing under a transfer never delivered as a mix
of two versions. Real nodes, real files; the provider is held mid-way with the test pause."""
from __future__ import annotations

import http.client
import json
import os
import re
import uuid

from conftest import HELD_CHUNKS, no_workers, partial_size, rearm, release, sha256, stop_mid_transfer, wait_for
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
        # an upload of that name is refused naming the download; the control: another name in the
        # same upload lands
        body, ctype = multipart([("same.bin", b"uploaded meanwhile"), ("other.txt", b"another name")])
        status, _, answer = request(fake, "POST", f"{FT}/files", t, body, {"Content-Type": ctype})
        summary = json.loads(answer)
        assert status == 200 and summary["files"] == [{"name": "other.txt", "size": 12}], answer
        assert summary["refused"] == [{"name": "same.bin", "reason": "same.bin is being downloaded from fake2.dev: "
                                       "upload it when that download ends (or cancel it)"}], answer
        assert (fake.files / "other.txt").read_bytes() == b"another name"
        assert not (fake.files / "same.bin").exists()
    finally:
        release(fake2)
    line = fake.expect(r"same\.bin downloaded", 60)
    assert "replaced" not in line, line  # nothing had the name: the upload was refused
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


def test_a_download_is_refused_while_an_upload_of_its_name_streams(node_factory):
    """The upload is held mid-part (its client sends the rest later): a download of that name is
    refused naming the upload, one of another name goes through, and once the upload has landed
    the name is free again."""
    fake, fake2 = node_factory("fake.dev"), node_factory("fake2.dev")
    put(fake2, "up.bin", 1 << 20)
    other = put(fake2, "free.bin", 1 << 20)
    t = token_of(fake)
    wait_for(lambda: request(fake, "GET", f"{FT}/files", t)[0] == 200, 30, "file_transfer's paths bound")
    boundary, data = uuid.uuid4().hex, os.urandom(300_000)
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="up.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=60)
    try:
        conn.putrequest("POST", f"{FT}/files")
        conn.putheader("Authorization", f"Bearer {t}")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(head) + len(data) + len(tail)))
        conn.endheaders()
        conn.send(head + data[:100_000])
        wait_for(lambda: (fake.files / ".partial" / ".uploading" / "up.bin").exists(), 30, "the upload streaming")
        code, lines = fake.run(f"{DL} up.bin fake2.dev", timeout=20)
        assert code == 1 and lines == ["file_transfer:template.os: error: download of up.bin from fake2.dev failed: "
                                       "up.bin is being uploaded from the web page: download it when that upload "
                                       "ends"], lines
        download(fake, "free.bin", "fake2.dev")  # the control: another name, meanwhile
        assert sha256(fake.files / "free.bin") == other
        conn.send(data[100_000:] + tail)
        resp = conn.getresponse()
        answer = resp.read()
    finally:
        conn.close()
    assert resp.status == 200 and json.loads(answer)["files"] == [{"name": "up.bin", "size": len(data)}], answer
    assert (fake.files / "up.bin").read_bytes() == data
    assert not (fake.files / ".partial" / ".uploading" / "up.bin").exists()
    lines = download(fake, "up.bin", "fake2.dev")  # free again: the download replaces the upload, and says so
    assert any(ln.endswith("; it replaced the up.bin this node had, of other content") for ln in lines), lines
    assert sha256(fake.files / "up.bin") == sha256(fake2.files / "up.bin")
    no_workers(fake, fake2)


# ---- a provider's file changing under a transfer ----------------------------------------------------
def _truncate(path, size):
    os.truncate(path, size // 3)  # below what was sent


def _append(path, size):
    with open(path, "ab") as f:
        f.write(b"more")


def _overwrite(path, size):  # same size, in place, in the part already sent
    with open(path, "r+b") as f:
        f.write(os.urandom(4096))


def _replace(path, size):  # another file renamed over it (an editor's save)
    tmp = path.with_name(".new")
    tmp.write_bytes(os.urandom(size))
    os.replace(tmp, path)


def _delete(path, size):
    path.unlink()


CHANGES = {"truncated": _truncate, "appended to": _append, "overwritten in place": _overwrite,
           "replaced by rename": _replace, "deleted": _delete}


def test_a_file_changed_under_its_transfer_fails_clearly_and_leaves_nothing(node_factory):
    """Each change, made while the provider holds part way: the download fails naming the change, no
    final file and no partial remain; the next download (the control) delivers the new version whole."""
    from ft_common import EXT_CHUNK_SIZE
    fake, fake2 = node_factory("fake.dev"), node_factory("fake2.dev", pause_after=HELD_CHUNKS)
    size = (HELD_CHUNKS + 2) * EXT_CHUNK_SIZE
    for how, change in CHANGES.items():
        name = f"{how.split()[0]}.bin"
        put(fake2, name, size)
        stop_mid_transfer(fake, fake2, name, size)
        change(fake2.files / name, size)
        release(fake2)
        line = fake.expect(rf"{re.escape(name)} downloaded|error: download of {re.escape(name)}", 60)
        assert re.search(rf"error: download of {re.escape(name)} from fake2\.dev failed: fake2\.dev: {re.escape(name)} "
                         rf"changed on fake2\.dev during the transfer( \(it is gone or unreadable\))?; nothing was "
                         rf"saved$", line), (how, line)
        assert not (fake.files / name).exists(), how
        wait_for(lambda: partial_size(fake, "fake2.dev", name) == -1, 10, f"{how}: the partial removed")  # noqa: B023
        if how != "deleted":  # the control: the file as it is now arrives whole
            download(fake, name, "fake2.dev")
            assert sha256(fake.files / name) == sha256(fake2.files / name), how
        rearm(fake2)
    no_workers(fake, fake2)


def test_a_file_in_a_folder_changed_under_its_transfer_fails_clearly_and_leaves_nothing(node_factory):
    from test_folders import HELD_BATCHES, big_folder, fetch, hold_in_second_file, tree
    fake, fake2 = node_factory("fake.dev"), node_factory("fake2.dev", pause_after=HELD_BATCHES)
    for how, change in CHANGES.items():
        folder = how.split()[0]
        big_folder(fake2, folder)
        hold_in_second_file(fake, fake2, folder)  # a1.bin sent, a2.bin part way
        change(fake2.files / folder / "a2.bin", 20 << 20)
        release(fake2)
        line = fake.expect(rf"{folder} downloaded|error: download of {folder}", 60)
        assert re.search(rf"error: download of {folder} from fake2\.dev failed: fake2\.dev: folder {folder} changed "
                         rf"on fake2\.dev during the transfer: a2\.bin changed since the folder was listed.*; nothing "
                         rf"was saved$", line), (how, line)
        assert not (fake.files / folder).exists(), how
        wait_for(lambda: not (fake.files / ".partial" / "fake2.dev" / f"{folder}.tree").exists(), 10,  # noqa: B023
                 f"{how}: the partial tree removed")
        fetch(fake, folder)  # the control: the folder as it is now arrives whole
        assert tree(fake.files / folder) == tree(fake2.files / folder), how
        rearm(fake2)
    no_workers(fake, fake2)
