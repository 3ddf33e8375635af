"""The VFS against upstream's JSON shapes (fixtures/vfs.json, from kinode 0.9.5 and process_lib 0.9.7):
variants and fields, the error a case gets, capabilities, the read blob's mime, Hash, AddZip."""
from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest

import host.vfs.store as vfs_module
from host.messages import ProcessId
from host.vfs.store import Vfs

FIX = json.loads((Path(__file__).parent / "fixtures" / "vfs.json").read_text())
OWNER = ProcessId("p", "app", "pub.os")
OTHER = ProcessId("o", "other", "pub.os")
DRIVE = "/app:pub.os/data"


def grants(*kinds):
    return lambda params: params.get("kind") in kinds and params.get("drive") == DRIVE


def call(vfs, action, path=DRIVE + "/f", blob=None, src=OWNER, has_cap=lambda p: False):
    res = vfs.handle(src, has_cap, json.dumps({"path": path, "action": action}).encode(), blob)
    return json.loads(res.body), res


def check_error_shape(err):
    """One externally tagged struct variant, with exactly upstream's fields, of a kind upstream sends."""
    assert isinstance(err, dict) and len(err) == 1, err
    (kind, fields), = err.items()
    assert kind in FIX["errors"] and kind not in FIX["errors_never_sent"]["variants"], err
    assert isinstance(fields, dict) and sorted(fields) == sorted(FIX["errors"][kind]), err
    assert all(isinstance(v, str) for v in fields.values()), err
    return kind


@pytest.fixture
def vfs(tmp_path):
    v = Vfs(tmp_path / "vfs")
    assert call(v, "CreateDrive", DRIVE)[0] == "Ok"
    assert call(v, "Write", blob=b"hello")[0] == "Ok"
    assert call(v, "CreateDir", DRIVE + "/sub")[0] == "Ok"
    yield v
    v.forget(OWNER)
    v.forget(OTHER)


def test_response_shapes_are_upstreams(vfs):
    body, res = call(vfs, "Read")
    assert body == FIX["responses"]["read"] and res.blob == b"hello"
    assert res.mime == FIX["read_blob_mime"]
    assert call(vfs, "Hash")[0] == FIX["responses"]["hash_of_hello"]         # SHA-256, not BLAKE3
    assert call(vfs, "Len")[0] == FIX["responses"]["len"]
    md = call(vfs, "Metadata")[0]["Metadata"]
    assert {k: md[k] for k in ("file_type", "len")} == FIX["responses"]["metadata"]["Metadata"]
    listing = call(vfs, "ReadDir", DRIVE)[0]["ReadDir"]
    assert sorted(listing, key=lambda e: e["path"]) == [
        {"path": "app:pub.os/data/f", "file_type": "File"},
        {"path": "app:pub.os/data/sub", "file_type": "Directory"}]
    assert call(vfs, "Metadata", DRIVE + "/sub")[0]["Metadata"]["file_type"] == "Directory"
    for t in (e["file_type"] for e in listing):
        assert t in FIX["file_types"]
    assert call(vfs, {"Seek": {"seek_from": {"Start": 3}}})[0] == FIX["responses"]["seek_from"]
    assert call(vfs, "ReadToString")[0] == {"ReadToString": "lo"}
    call(vfs, {"Seek": {"seek_from": {"Start": 0}}})
    _, res = call(vfs, {"ReadExact": 2})
    assert res.mime == FIX["read_blob_mime"]
    assert call(vfs, "Len")[1].mime is None                                   # no blob, no mime


def test_every_upstream_action_parses(vfs):
    for action in FIX["actions"]["unit"] + FIX["actions"]["with_argument"]:
        body, _ = call(vfs, action, DRIVE + "/g", blob=b"x")
        if isinstance(body, dict) and "Err" in body:
            assert check_error_shape(body["Err"]) not in ("BadJson",), (action, body)


def test_errors_are_upstreams_variants_in_upstreams_cases(vfs):
    missing = DRIVE + "/missing"
    for action in ("Read", "ReadToEnd", {"OpenFile": {"create": False}}, "Metadata", "Len", "Hash",
                   "RemoveFile", "ReadDir"):
        body, _ = call(vfs, action, missing)
        assert check_error_shape(body["Err"]) == "IOError", (action, body)   # upstream: never NotFound
    assert check_error_shape(call(vfs, "CreateDir", DRIVE + "/sub")[0]["Err"]) == "IOError"
    assert check_error_shape(call(vfs, "Write")[0]["Err"]) == "BadRequest"                 # no blob
    assert check_error_shape(call(vfs, "Read", "/app:pub.os")[0]["Err"]) == "ParseError"   # no drive
    assert check_error_shape(call(vfs, "Read", "/nocolon/d/f")[0]["Err"]) == "ParseError"
    assert check_error_shape(call(vfs, "Nope")[0]["Err"]) == "BadJson"
    assert check_error_shape(call(vfs, "Read", src=OTHER)[0]["Err"]) == "NoCap"
    res = vfs.handle(OWNER, lambda p: False, json.dumps({"path": DRIVE + "/f", "action": "Write"}).encode(), "text")
    assert check_error_shape(json.loads(res.body)["Err"]) == "BadBytes"


def test_capabilities_as_upstream(vfs):
    """Read actions need "read", the rest "write"; write does not imply read; root allows all."""
    caps = FIX["capabilities"]
    for action in caps["read"]:
        wire = {"ReadExact": 1} if action == "ReadExact" else {"Seek": {"seek_from": {"Start": 0}}} \
            if action == "Seek" else action
        path = DRIVE if action == "ReadDir" else DRIVE + "/f"
        assert "NoCap" in call(vfs, wire, path, src=OTHER, has_cap=grants("write"))[0]["Err"], action
        body, _ = call(vfs, wire, path, src=OTHER, has_cap=grants("read"))
        assert "Err" not in body, (action, body)
        vfs.forget(OTHER)
    for action in caps["write"]:
        wire = {"OpenFile": {"create": False}} if action == "OpenFile" else {"SetLen": 5} \
            if action == "SetLen" else action
        path = {"CreateDir": DRIVE + "/d2", "CreateDirAll": DRIVE + "/d3", "RemoveDir": DRIVE + "/sub",
                "RemoveDirAll": DRIVE + "/d3", "AddZip": DRIVE + "/z"}.get(action, DRIVE + "/f")
        blob = _zip({"a.txt": b"a"}) if action == "AddZip" else b"hello"
        body, _ = call(vfs, wire, path, blob, src=OTHER, has_cap=grants("read"))
        assert "NoCap" in body["Err"], (action, body)
        body, _ = call(vfs, wire, path, blob, src=OTHER, has_cap=grants("write"))
        assert "Err" not in body, (action, body)
        if action == "RemoveFile":
            call(vfs, "Write", blob=b"hello")
    root = lambda p: p == caps["root_param"]   # noqa: E731
    assert call(vfs, "Hash", src=OTHER, has_cap=root)[0] == FIX["responses"]["hash_of_hello"]


# ---- AddZip ----------------------------------------------------------------------------------------

def _zip(entries: dict, method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in entries.items():
            if data is None:
                z.writestr(zipfile.ZipInfo(name), b"")       # a name ending in / is a directory
            else:
                z.writestr(name, data)
    return buf.getvalue()


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_add_zip_unpacks_into_the_drive(vfs):
    blob = _zip({"a.txt": b"A", "d/": None, "d/e/b.bin": bytes(range(256)) * 100, "./c.txt": b"C"})
    assert call(vfs, "AddZip", DRIVE + "/unz", blob)[0] == "Ok"
    root = vfs.drive_path(OWNER.package_id, "data") / "unz"
    assert _tree(root) == {"a.txt": b"A", "c.txt": b"C", "d": None, "d/e": None,
                           "d/e/b.bin": bytes(range(256)) * 100}
    # an archive again over the same place replaces its files
    assert call(vfs, "AddZip", DRIVE + "/unz", _zip({"a.txt": b"new"}))[0] == "Ok"
    assert (root / "a.txt").read_bytes() == b"new"
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]   # no staging left


@pytest.mark.parametrize("name", ["../evil.txt", "ok/../../evil.txt", "/etc/evil.txt", "a\\..\\evil.txt",
                                  "C:/evil.txt"])
def test_add_zip_refuses_escaping_entries_and_writes_nothing(vfs, name):
    blob = _zip({"fine.txt": b"fine", name: b"evil"})
    before = _tree(vfs.root)
    body, _ = call(vfs, "AddZip", DRIVE + "/unz", blob)
    assert check_error_shape(body["Err"]) == "BadRequest" and "zip entry" in body["Err"]["BadRequest"]["error"]
    assert _tree(vfs.root) == before


def _lying_sizes(blob: bytes, size: int) -> bytes:
    """Set every entry's declared uncompressed size (local and central headers) to `size`."""
    data = bytearray(blob)
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = data.find(sig)
        while i >= 0:
            data[i + off:i + off + 4] = struct.pack("<I", size)
            i = data.find(sig, i + 4)
    return bytes(data)


def test_add_zip_refuses_bombs_before_writing(vfs, monkeypatch):
    before = _tree(vfs.root)
    bomb = _lying_sizes(_zip({"big.bin": b"\0" * 1000}), 0xFFFFFFF0)   # declares 4 GiB
    body, _ = call(vfs, "AddZip", DRIVE + "/unz", bomb)
    assert "unpack to" in body["Err"]["BadRequest"]["error"]
    monkeypatch.setattr(vfs_module, "MAX_ZIP_ENTRIES", 3)
    many = _zip({f"f{i}": b"x" for i in range(4)})
    assert "4 entries" in call(vfs, "AddZip", DRIVE + "/unz", many)[0]["Err"]["BadRequest"]["error"]
    assert _tree(vfs.root) == before
    # positive control: the same limits let a smaller archive through
    assert call(vfs, "AddZip", DRIVE + "/unz", _zip({f"f{i}": b"x" for i in range(3)}))[0] == "Ok"


def test_add_zip_corrupt_or_not_a_zip_writes_nothing(vfs):
    before = _tree(vfs.root)
    assert "ParseError" in call(vfs, "AddZip", DRIVE + "/unz", b"not a zip")[0]["Err"]
    good = _zip({"a.txt": b"A" * 100, "b.txt": b"B" * 100}, zipfile.ZIP_STORED)
    corrupt = good.replace(b"B" * 100, b"X" * 100)          # the CRC no longer matches
    assert "ParseError" in call(vfs, "AddZip", DRIVE + "/unz", corrupt)[0]["Err"]
    shorter = _lying_sizes(good, 10)                        # declares less than is there
    call(vfs, "AddZip", DRIVE + "/unz", shorter)
    assert not (vfs.drive_path(OWNER.package_id, "data") / "unz" / "a.txt").exists() \
        or len((vfs.drive_path(OWNER.package_id, "data") / "unz" / "a.txt").read_bytes()) <= 10
    vfs_tree = _tree(vfs.root)
    assert {k: v for k, v in vfs_tree.items() if "unz" not in k} == before
    assert call(vfs, "AddZip", DRIVE + "/unz2", good)[0] == "Ok"   # positive control


def test_add_zip_file_and_directory_clash_is_refused(vfs):
    before = _tree(vfs.root)
    body, _ = call(vfs, "AddZip", DRIVE + "/unz", _zip({"x": b"file", "x/y": b"below"}))
    assert "both as a file and a directory" in body["Err"]["BadRequest"]["error"]
    body, _ = call(vfs, "AddZip", DRIVE, _zip({"ok.txt": b"1", "sub": b"a file over a folder"}))
    assert check_error_shape(body["Err"]) == "IOError"
    assert _tree(vfs.root) == before
