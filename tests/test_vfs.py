"""Tests for host/vfs/store.py: the `vfs:distro:sys` service."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host.messages import PackageId, ProcessId
from host.vfs.store import Vfs, VfsResult

P = ProcessId("p", "app", "pub.os")        # owner of app:pub.os
Q = ProcessId("q", "app", "pub.os")        # another process of the same package
O = ProcessId("o", "other", "pub.os")      # a process of another package
DRIVE = "/app:pub.os/data"


def no_caps(params: dict) -> bool:
    return False


class Caps:
    """A has_cap that records its calls and accepts the (kind, drive) pairs it was given."""

    def __init__(self, *granted):
        self.granted = set(granted)
        self.calls = []

    def __call__(self, params: dict) -> bool:
        self.calls.append(params)
        return (params["kind"], params["drive"]) in self.granted


def raw(vfs, src, body: bytes, blob=None, has_cap=no_caps) -> VfsResult:
    res = vfs.handle(src, has_cap, body, blob)
    assert isinstance(res, VfsResult) and isinstance(res.body, bytes)
    return res


def call(vfs, src, path, action, blob=None, has_cap=no_caps):
    """-> (parsed JSON body, blob)."""
    res = raw(vfs, src, json.dumps({"path": path, "action": action}).encode(), blob, has_cap)
    return json.loads(res.body), res.blob


def ok(vfs, src, path, action, blob=None, has_cap=no_caps):
    body, out = call(vfs, src, path, action, blob, has_cap)
    assert "Err" not in body, body
    return body, out


def err(vfs, src, path, action, blob=None, has_cap=no_caps):
    body, out = call(vfs, src, path, action, blob, has_cap)
    assert isinstance(body, dict) and "Err" in body, body
    assert out is None
    return body["Err"]


def is_io_error(e) -> bool:
    """Upstream's `IOError {error, path}`: every failed file operation."""
    return isinstance(e, dict) and list(e) == ["IOError"] and set(e["IOError"]) == {"error", "path"}


def is_missing(e) -> bool:
    """Upstream reports a missing file as an IOError, never as NotFound."""
    return is_io_error(e) and "no such file" in e["IOError"]["error"]


def read(vfs, src, path, has_cap=no_caps) -> bytes:
    body, out = ok(vfs, src, path, "Read", has_cap=has_cap)
    assert body == "Read"
    return out


@pytest.fixture
def vfs(tmp_path):
    v = Vfs(tmp_path / "home" / "vfs")
    res = v.handle(P, no_caps, json.dumps({"path": DRIVE, "action": "CreateDrive"}).encode(), None)
    assert json.loads(res.body) == "Ok"
    yield v
    for src in (P, Q, O):
        v.forget(src)


@pytest.fixture
def outside(tmp_path):
    """A directory and file outside the VFS root."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_bytes(b"top secret")
    return d


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- drives and the public helpers -------------------------------------------------------------------

def test_root_created_and_drive_path(tmp_path):
    v = Vfs(tmp_path / "a" / "vfs")
    assert (tmp_path / "a" / "vfs").is_dir()
    assert v.drive_path(PackageId("app", "pub.os"), "data") == tmp_path / "a" / "vfs" / "app:pub.os" / "data"
    for bad in ("", "..", "a/b", "a\\b", "a\x00"):
        with pytest.raises(ValueError):
            v.drive_path(PackageId("app", "pub.os"), bad)



def test_the_vfs_finds_a_process_wasm_and_keeps_it_inside(tmp_path):
    """`Vfs.in_home` and `file_path`, which the node and kernel use instead of building HOME/vfs paths."""
    v = Vfs.in_home(tmp_path)
    pkg = v.drive_path(PackageId("app", "pub.os"), "pkg")
    pkg.mkdir(parents=True)
    (pkg / "p.wasm").write_bytes(b"wasm")
    (tmp_path / "outside.wasm").write_bytes(b"not yours")
    os.symlink(tmp_path / "outside.wasm", pkg / "out.wasm")
    assert pkg == tmp_path / "vfs" / "app:pub.os" / "pkg"
    assert v.file_path("app:pub.os/pkg/p.wasm").read_bytes() == b"wasm"      # the control
    assert v.file_path("/app:pub.os/pkg/p.wasm") == v.file_path("app:pub.os/pkg/p.wasm")
    for bad in ("app:pub.os/pkg/../../outside.wasm", "app:pub.os//p.wasm", "app:pub.os/./pkg/p.wasm",
                "app:pub.os/p.wasm", "app:pub.os/pkg\\p.wasm", "app:pub.os/pkg/p.wasm\x00",
                "app:pub.os/pkg/out.wasm"):
        with pytest.raises(ValueError):
            v.file_path(bad)

def test_create_drive_grants_caps_and_is_idempotent(vfs, tmp_path):
    res = raw(vfs, P, json.dumps({"path": "app:pub.os/files", "action": "CreateDrive"}).encode())
    assert json.loads(res.body) == "Ok" and res.blob is None
    assert res.grant == [{"kind": "read", "drive": "/app:pub.os/files"},
                         {"kind": "write", "drive": "/app:pub.os/files"}]
    assert vfs.drive_path(P.package_id, "files").is_dir()
    res2 = raw(vfs, Q, json.dumps({"path": "/app:pub.os/files", "action": "CreateDrive"}).encode())
    assert json.loads(res2.body) == "Ok" and res2.grant == res.grant


def test_create_drive_of_another_package_is_nocap(vfs):
    res = raw(vfs, O, json.dumps({"path": "/app:pub.os/mine", "action": "CreateDrive"}).encode(),
              has_cap=lambda p: "root" not in p)  # every drive cap, not root
    assert json.loads(res.body) == {"Err": {"NoCap": {"action": "CreateDrive", "path": "app:pub.os/mine"}}}
    assert res.grant == []
    assert not vfs.drive_path(P.package_id, "mine").exists()


def test_create_drive_needs_exactly_package_and_drive(vfs):
    assert "BadRequest" in err(vfs, P, "/app:pub.os/data/sub", "CreateDrive")
    assert "ParseError" in err(vfs, P, "/app:pub.os", "CreateDrive")   # upstream: "malformed path"


def test_create_drive_over_a_file_is_create_dir_error(vfs):
    (vfs.root / "app:pub.os" / "afile").write_bytes(b"x")
    assert is_io_error(err(vfs, P, "/app:pub.os/afile", "CreateDrive"))


# ---- every action and response shape --------------------------------------------------------------

def test_write_read_roundtrip_and_shapes(vfs):
    assert ok(vfs, P, DRIVE + "/f.txt", "Write", b"hello world") == ("Ok", None)
    assert read(vfs, P, DRIVE + "/f.txt") == b"hello world"
    assert ok(vfs, P, DRIVE + "/f.txt", "Len")[0] == {"Len": 11}
    md = ok(vfs, P, DRIVE + "/f.txt", "Metadata")[0]["Metadata"]
    assert md["file_type"] == "File" and md["len"] == 11 and isinstance(md["stamp"], str)
    ok(vfs, P, DRIVE + "/f.txt", {"Seek": {"seek_from": {"Start": 0}}})
    ok(vfs, P, DRIVE + "/f.txt", "WriteAll", b"H")   # same length, other bytes: another stamp
    assert ok(vfs, P, DRIVE + "/f.txt", "Metadata")[0]["Metadata"]["stamp"] != md["stamp"]
    md = ok(vfs, P, DRIVE, "Metadata")[0]["Metadata"]
    assert md["file_type"] == "Directory"
    # Write replaces the whole file (a shorter write truncates)
    ok(vfs, P, DRIVE + "/f.txt", "Write", b"bye")
    assert read(vfs, P, DRIVE + "/f.txt") == b"bye"
    # empty blob is a valid write
    ok(vfs, P, DRIVE + "/f.txt", "Write", b"")
    assert read(vfs, P, DRIVE + "/f.txt") == b""


def test_unit_variant_as_object_with_null_is_accepted(vfs):
    ok(vfs, P, DRIVE + "/f", "Write", b"abc")
    assert call(vfs, P, DRIVE + "/f", {"Len": None})[0] == {"Len": 3}
    assert "BadJson" in err(vfs, P, DRIVE + "/f", {"Len": 5})


def test_path_without_leading_slash(vfs):
    ok(vfs, P, "app:pub.os/data/f", "Write", b"abc")
    assert read(vfs, P, "/app:pub.os/data/f") == b"abc"
    assert read(vfs, P, "app:pub.os//data/./f") == b"abc"


def test_create_file_truncates_and_open_file_does_not(vfs):
    path = DRIVE + "/f"
    ok(vfs, P, path, "Write", b"content")
    ok(vfs, P, path, {"OpenFile": {"create": True}})
    assert read(vfs, P, path) == b"content"
    ok(vfs, P, path, {"OpenFile": {"create": False}})
    assert read(vfs, P, path) == b"content"
    ok(vfs, P, path, "CreateFile")
    assert read(vfs, P, path) == b""
    ok(vfs, P, DRIVE + "/new", "CreateFile")
    assert ok(vfs, P, DRIVE + "/new", "Len")[0] == {"Len": 0}


def test_open_file_missing(vfs):
    assert is_missing(err(vfs, P, DRIVE + "/missing", {"OpenFile": {"create": False}}))
    assert not (vfs.drive_path(P.package_id, "data") / "missing").exists()
    ok(vfs, P, DRIVE + "/missing", {"OpenFile": {"create": True}})
    assert (vfs.drive_path(P.package_id, "data") / "missing").is_file()


def test_open_file_resets_cursor(vfs):
    path = DRIVE + "/f"
    ok(vfs, P, path, "Write", b"abcdef")
    ok(vfs, P, path, {"Seek": {"seek_from": {"Start": 4}}})
    ok(vfs, P, path, {"OpenFile": {"create": False}})
    assert ok(vfs, P, path, {"ReadExact": 2})[1] == b"ab"


def test_cursor_actions(vfs):
    path = DRIVE + "/f"
    ok(vfs, P, path, "Write", b"0123456789")
    ok(vfs, P, path, {"OpenFile": {"create": False}})
    assert ok(vfs, P, path, {"ReadExact": 3}) == ("Read", b"012")
    assert ok(vfs, P, path, {"ReadExact": 2}) == ("Read", b"34")
    assert ok(vfs, P, path, {"ReadExact": 0}) == ("Read", b"")
    assert ok(vfs, P, path, "ReadToEnd") == ("Read", b"56789")
    assert ok(vfs, P, path, "ReadToEnd") == ("Read", b"")
    assert ok(vfs, P, path, {"Seek": {"seek_from": {"Start": 2}}})[0] == {"SeekFrom": 2}
    assert ok(vfs, P, path, {"Seek": {"seek_from": {"Current": 3}}})[0] == {"SeekFrom": 5}
    assert ok(vfs, P, path, {"Seek": {"seek_from": {"Current": -1}}})[0] == {"SeekFrom": 4}
    assert ok(vfs, P, path, "ReadToString")[0] == {"ReadToString": "456789"}
    assert ok(vfs, P, path, {"Seek": {"seek_from": {"End": -3}}})[0] == {"SeekFrom": 7}
    assert ok(vfs, P, path, "ReadToEnd")[1] == b"789"
    # seek past the end is allowed; reading there gives nothing
    assert ok(vfs, P, path, {"Seek": {"seek_from": {"End": 5}}})[0] == {"SeekFrom": 15}
    assert ok(vfs, P, path, "ReadToEnd")[1] == b""


def test_seek_errors_leave_cursor(vfs):
    path = DRIVE + "/f"
    ok(vfs, P, path, "Write", b"0123456789")
    ok(vfs, P, path, {"Seek": {"seek_from": {"Start": 3}}})
    e = err(vfs, P, path, {"Seek": {"seek_from": {"Current": -4}}})
    assert "negative" in e["BadRequest"]["error"]
    assert "BadRequest" in err(vfs, P, path, {"Seek": {"seek_from": {"Start": 2**64 - 1}}})
    assert "BadRequest" in err(vfs, P, path, {"Seek": {"seek_from": {"End": 2**63 - 1}}})
    assert ok(vfs, P, path, {"ReadExact": 1})[1] == b"3"


def test_read_exact_past_end_is_error_and_cursor_unchanged(vfs):
    path = DRIVE + "/f"
    ok(vfs, P, path, "Write", b"abc")
    ok(vfs, P, path, {"Seek": {"seek_from": {"Start": 1}}})
    e = err(vfs, P, path, {"ReadExact": 5})
    assert e["IOError"]["path"] == "app:pub.os/data/f"
    assert "end of file" in e["IOError"]["error"]
    assert "IOError" in err(vfs, P, path, {"ReadExact": 2**64 - 1})   # huge: no allocation, just Err
    assert ok(vfs, P, path, {"ReadExact": 2})[1] == b"bc"


def test_read_reads_whole_file_from_zero(vfs):
    path = DRIVE + "/f"
    ok(vfs, P, path, "Write", b"abcdef")
    ok(vfs, P, path, {"Seek": {"seek_from": {"Start": 4}}})
    assert read(vfs, P, path) == b"abcdef"
    # as in Kinode (vfs.rs: Read is fs::read, no handle), the cursor stays where it was
    assert ok(vfs, P, path, "ReadToEnd")[1] == b"ef"


def test_read_implicitly_opens(vfs):
    (vfs.drive_path(P.package_id, "data") / "g").write_bytes(b"external")
    assert ok(vfs, P, DRIVE + "/g", {"ReadExact": 3})[1] == b"ext"
    assert ok(vfs, P, DRIVE + "/g", "ReadToEnd")[1] == b"ernal"


def test_read_to_string_invalid_utf8(vfs):
    path = DRIVE + "/bin"
    ok(vfs, P, path, "Write", b"ok\xff\xfe")
    ok(vfs, P, path, {"OpenFile": {"create": False}})
    e = err(vfs, P, path, "ReadToString")
    assert "UTF-8" in e["IOError"]["error"]
    # cursor untouched by the failed read
    assert ok(vfs, P, path, {"ReadExact": 2})[1] == b"ok"


def test_read_to_string_unicode(vfs):
    path = DRIVE + "/u"
    ok(vfs, P, path, "Write", "héllo ✓".encode())
    # like Kinode (vfs.rs: Write is fs::write, no handle), Write moves no cursor; ReadToString
    # reads from the cursor
    assert ok(vfs, P, path, "ReadToString")[0] == {"ReadToString": "héllo ✓"}
    assert ok(vfs, P, path, "ReadToString")[0] == {"ReadToString": ""}
    ok(vfs, P, path, {"Seek": {"seek_from": {"Start": 0}}})
    assert ok(vfs, P, path, "ReadToString")[0] == {"ReadToString": "héllo ✓"}


def test_write_all_append_set_len_sync(vfs):
    path = DRIVE + "/f"
    ok(vfs, P, path, "CreateFile")
    ok(vfs, P, path, "WriteAll", b"hello")
    ok(vfs, P, path, "WriteAll", b" world")
    assert read(vfs, P, path) == b"hello world"
    ok(vfs, P, path, {"Seek": {"seek_from": {"Start": 0}}})
    ok(vfs, P, path, "WriteAll", b"J")
    assert read(vfs, P, path) == b"Jello world"
    ok(vfs, P, path, "Append", b"!")
    assert read(vfs, P, path) == b"Jello world!"
    ok(vfs, P, path, {"SetLen": 5})
    assert read(vfs, P, path) == b"Jello"
    ok(vfs, P, path, {"SetLen": 7})
    assert read(vfs, P, path) == b"Jello\0\0"
    assert ok(vfs, P, path, "SyncAll")[0] == "Ok"
    assert "BadRequest" in err(vfs, P, path, {"SetLen": 2**64 - 1})


def test_write_all_after_seek_past_end(vfs):
    path = DRIVE + "/f"
    ok(vfs, P, path, "Write", b"ab")
    ok(vfs, P, path, {"Seek": {"seek_from": {"End": 2}}})
    ok(vfs, P, path, "WriteAll", b"Z")
    assert read(vfs, P, path) == b"ab\0\0Z"


def test_ops_that_do_not_create(vfs):
    for action in ("WriteAll", "Append"):
        assert is_missing(err(vfs, P, DRIVE + "/none", action, b"x"))
    for action in ("SyncAll", {"SetLen": 1}, "Read", "ReadToEnd", "ReadToString", {"ReadExact": 1},
                   {"Seek": {"seek_from": {"Start": 0}}}, "Len", "Hash", "Metadata", "RemoveFile",
                   "RemoveDir", "RemoveDirAll", "ReadDir"):
        assert is_missing(err(vfs, P, DRIVE + "/none", action)), action
    assert not (vfs.drive_path(P.package_id, "data") / "none").exists()


def test_writes_without_blob(vfs):
    for action in ("Write", "WriteAll", "Append", "AddZip"):
        assert err(vfs, P, DRIVE + "/f", action) == {"BadRequest": {"error": f"blob needs to exist for {action}"}}


def test_blob_of_wrong_type_is_bad_bytes(vfs):
    res = raw(vfs, P, json.dumps({"path": DRIVE + "/f", "action": "Write"}).encode(), blob="text")
    assert json.loads(res.body) == {"Err": {"BadBytes": {"action": "Write", "path": "app:pub.os/data/f"}}}


def test_hash(vfs):
    path = DRIVE + "/big"
    data = os.urandom((1 << 20) * 2 + 12345)
    ok(vfs, P, path, "Write", data)
    body, blob = ok(vfs, P, path, "Hash")
    assert blob is None
    assert body == {"Hash": list(hashlib.sha256(data).digest())}
    assert len(body["Hash"]) == 32 and all(0 <= b < 256 for b in body["Hash"])
    ok(vfs, P, DRIVE + "/empty", "CreateFile")
    assert ok(vfs, P, DRIVE + "/empty", "Hash")[0] == {"Hash": list(hashlib.sha256(b"").digest())}


def test_big_sequential_writes_bypass_the_cache_and_are_exact(vfs):
    """4 MiB chunks plus an unaligned tail, as a download writes them: the bytes are exact (the
    aligned part goes out with O_DIRECT where the filesystem has it), and Hash reads them back."""
    path = DRIVE + "/dl.part"
    chunks = [os.urandom(4 << 20) for _ in range(3)] + [os.urandom((1 << 20) + 777)]
    ok(vfs, P, path, "CreateFile")
    for c in chunks:
        ok(vfs, P, path, "WriteAll", c)
    data = b"".join(chunks)
    ok(vfs, P, path, "SyncAll")
    real = vfs.drive_path(P.package_id, "data") / "dl.part"
    assert real.read_bytes() == data
    assert ok(vfs, P, path, "Hash")[0] == {"Hash": list(hashlib.sha256(data).digest())}


def test_hash_is_of_the_file_as_it_is_now(vfs):
    """Also after the file changed behind the VFS's back, between or after a handle's writes."""
    path = DRIVE + "/dl.part"
    first, second = os.urandom(2 << 20), os.urandom(2 << 20)
    ok(vfs, P, path, "CreateFile")
    ok(vfs, P, path, "WriteAll", first)
    ok(vfs, P, path, "SyncAll")     # waits for the write-behind
    real = vfs.drive_path(P.package_id, "data") / "dl.part"

    def tamper():                  # changed behind the VFS's back, same size
        with open(real, "r+b") as f:
            f.seek(100)
            f.write(os.urandom(8))

    tamper()                       # between two sequential writes
    ok(vfs, P, path, "WriteAll", second)
    ok(vfs, P, path, "SyncAll")
    now = real.read_bytes()
    assert now[:100] + now[108:] == (first + second)[:100] + (first + second)[108:]
    assert ok(vfs, P, path, "Hash")[0] == {"Hash": list(hashlib.sha256(now).digest())}
    ok(vfs, P, path, "CreateFile")  # start again; tamper after the last write
    ok(vfs, P, path, "WriteAll", first)
    ok(vfs, P, path, "SyncAll")
    tamper()
    now = real.read_bytes()
    assert ok(vfs, P, path, "Hash")[0] == {"Hash": list(hashlib.sha256(now).digest())}
    # and after a write that is not sequential from zero
    ok(vfs, P, path, {"Seek": {"seek_from": {"Start": 0}}})
    ok(vfs, P, path, "WriteAll", b"Z" * (1 << 20))
    ok(vfs, P, path, "SyncAll")
    now = real.read_bytes()
    assert ok(vfs, P, path, "Hash")[0] == {"Hash": list(hashlib.sha256(now).digest())}


def test_directories(vfs):
    ok(vfs, P, DRIVE + "/a", "CreateDir")
    assert is_io_error(err(vfs, P, DRIVE + "/a", "CreateDir"))          # exists
    assert is_io_error(err(vfs, P, DRIVE + "/x/y", "CreateDir"))        # no parent
    ok(vfs, P, DRIVE + "/x/y/z", "CreateDirAll")
    ok(vfs, P, DRIVE + "/x/y/z", "CreateDirAll")                               # idempotent
    ok(vfs, P, DRIVE + "/file", "Write", b"1")
    assert is_io_error(err(vfs, P, DRIVE + "/file", "CreateDirAll"))
    assert is_io_error(err(vfs, P, DRIVE + "/file/sub", "CreateDirAll"))
    ok(vfs, P, DRIVE + "/b.txt", "Write", b"22")
    os.symlink("b.txt", vfs.drive_path(P.package_id, "data") / "link")
    body = ok(vfs, P, DRIVE, "ReadDir")[0]
    assert body == {"ReadDir": [
        {"path": "app:pub.os/data/a", "file_type": "Directory"},
        {"path": "app:pub.os/data/b.txt", "file_type": "File"},
        {"path": "app:pub.os/data/file", "file_type": "File"},
        {"path": "app:pub.os/data/link", "file_type": "Symlink"},
        {"path": "app:pub.os/data/x", "file_type": "Directory"},
    ]}
    assert ok(vfs, P, DRIVE + "/x", "ReadDir")[0] == {
        "ReadDir": [{"path": "app:pub.os/data/x/y", "file_type": "Directory"}]}
    assert ok(vfs, P, DRIVE + "/a", "ReadDir")[0] == {"ReadDir": []}
    # ReadDir of a file, Read* / Len / Hash of a directory: errors, never a crash
    assert "IOError" in err(vfs, P, DRIVE + "/file", "ReadDir")
    for action in ("Read", "ReadToEnd", "ReadToString", {"ReadExact": 1}, "Len", "Hash",
                   {"OpenFile": {"create": False}}, "Write", "CreateFile"):
        e = err(vfs, P, DRIVE + "/a", action, b"x")
        assert "directory" in e["IOError"]["error"], (action, e)
    # RemoveDir of non-empty fails; RemoveDirAll works; RemoveFile of a dir fails
    assert "IOError" in err(vfs, P, DRIVE + "/x", "RemoveDir")
    assert "IOError" in err(vfs, P, DRIVE + "/x", "RemoveFile")
    ok(vfs, P, DRIVE + "/x/y/z", "RemoveDir")
    ok(vfs, P, DRIVE + "/x", "RemoveDirAll")
    assert "IOError" in err(vfs, P, DRIVE + "/file", "RemoveDirAll")
    assert "IOError" in err(vfs, P, DRIVE + "/file", "RemoveDir")
    ok(vfs, P, DRIVE + "/file", "RemoveFile")
    assert ok(vfs, P, DRIVE + "/a", "ReadDir")[0] == {"ReadDir": []}
    names = [e["path"] for e in ok(vfs, P, DRIVE, "ReadDir")[0]["ReadDir"]]
    assert names == ["app:pub.os/data/a", "app:pub.os/data/b.txt", "app:pub.os/data/link"]


def test_rename_and_copy(vfs):
    ok(vfs, P, DRIVE + "/a", "Write", b"AAA")
    ok(vfs, P, DRIVE + "/a", {"CopyFile": {"new_path": DRIVE + "/b"}})
    assert read(vfs, P, DRIVE + "/b") == b"AAA"
    ok(vfs, P, DRIVE + "/a", "Write", b"changed")
    assert read(vfs, P, DRIVE + "/b") == b"AAA"
    ok(vfs, P, DRIVE + "/a", {"Rename": {"new_path": "app:pub.os/data/c"}})
    assert is_missing(err(vfs, P, DRIVE + "/a", "Metadata"))
    assert read(vfs, P, DRIVE + "/c") == b"changed"
    # rename over an existing file replaces it; copy over an existing file too
    ok(vfs, P, DRIVE + "/c", {"Rename": {"new_path": DRIVE + "/b"}})
    assert read(vfs, P, DRIVE + "/b") == b"changed"
    ok(vfs, P, DRIVE + "/x", "Write", b"xx")
    ok(vfs, P, DRIVE + "/x", {"CopyFile": {"new_path": DRIVE + "/b"}})
    assert read(vfs, P, DRIVE + "/b") == b"xx"
    # directories can be renamed
    ok(vfs, P, DRIVE + "/d1/sub", "CreateDirAll")
    ok(vfs, P, DRIVE + "/d1/sub/f", "Write", b"in dir")
    ok(vfs, P, DRIVE + "/d1", {"Rename": {"new_path": DRIVE + "/d2"}})
    assert read(vfs, P, DRIVE + "/d2/sub/f") == b"in dir"
    # errors
    assert is_missing(err(vfs, P, DRIVE + "/nope", {"Rename": {"new_path": DRIVE + "/z"}}))
    assert is_missing(err(vfs, P, DRIVE + "/nope", {"CopyFile": {"new_path": DRIVE + "/z"}}))
    e = err(vfs, P, DRIVE + "/x", {"Rename": {"new_path": DRIVE + "/no/dir/z"}})
    assert "does not exist" in e["IOError"]["error"]
    e = err(vfs, P, DRIVE + "/x", {"CopyFile": {"new_path": DRIVE + "/no/dir/z"}})
    assert "does not exist" in e["IOError"]["error"]
    assert "IOError" in err(vfs, P, DRIVE + "/d2", {"CopyFile": {"new_path": DRIVE + "/d3"}})
    assert "BadRequest" in err(vfs, P, DRIVE, {"Rename": {"new_path": DRIVE + "/inner"}})
    assert "BadRequest" in err(vfs, P, DRIVE + "/x", {"Rename": {"new_path": "/app:pub.os/other"}})
    # no temp files left behind
    names = sorted(os.listdir(vfs.drive_path(P.package_id, "data")))
    assert names == ["b", "d2", "x"]


def test_close_file(vfs):
    path = DRIVE + "/f"
    ok(vfs, P, path, "Write", b"abcdef")
    ok(vfs, P, path, {"Seek": {"seek_from": {"Start": 3}}})
    assert ok(vfs, P, path, "CloseFile")[0] == "Ok"
    assert ok(vfs, P, path, {"ReadExact": 2})[1] == b"ab"   # a new implicit handle at 0
    assert ok(vfs, P, DRIVE + "/never-opened", "CloseFile")[0] == "Ok"


def test_remove_drive_root_only_by_owner(vfs):
    ok(vfs, P, DRIVE + "/f", "Write", b"x")
    caps = Caps(("write", DRIVE), ("read", DRIVE))
    assert "NoCap" in err(vfs, O, DRIVE, "RemoveDirAll", has_cap=caps)
    assert "NoCap" in err(vfs, O, DRIVE, "RemoveDir", has_cap=caps)
    ok(vfs, O, DRIVE + "/f", "RemoveFile", has_cap=caps)      # inside the drive is fine with write
    ok(vfs, P, DRIVE, "RemoveDirAll")
    assert not vfs.drive_path(P.package_id, "data").exists()


# ---- per-opener handles --------------------------------------------------------------------------

def test_per_opener_cursors(vfs):
    path = DRIVE + "/shared"
    ok(vfs, P, path, "Write", bytes(range(10)))
    ok(vfs, P, path, {"OpenFile": {"create": False}})
    ok(vfs, Q, path, {"OpenFile": {"create": False}})
    assert ok(vfs, P, path, {"ReadExact": 4})[1] == bytes([0, 1, 2, 3])
    assert ok(vfs, Q, path, {"ReadExact": 2})[1] == bytes([0, 1])
    assert ok(vfs, P, path, {"ReadExact": 2})[1] == bytes([4, 5])
    assert ok(vfs, Q, path, {"ReadExact": 2})[1] == bytes([2, 3])
    ok(vfs, Q, path, {"Seek": {"seek_from": {"End": -1}}})
    assert ok(vfs, P, path, "ReadToEnd")[1] == bytes([6, 7, 8, 9])
    assert ok(vfs, Q, path, "ReadToEnd")[1] == bytes([9])
    # another package's process with a read cap has its own cursor too
    caps = Caps(("read", DRIVE))
    assert ok(vfs, O, path, {"ReadExact": 3}, has_cap=caps)[1] == bytes([0, 1, 2])


def test_two_writers_same_file_independent_cursors(vfs):
    path = DRIVE + "/w"
    ok(vfs, P, path, "CreateFile")
    ok(vfs, Q, path, {"OpenFile": {"create": False}})
    ok(vfs, P, path, "WriteAll", b"AAAA")
    ok(vfs, Q, path, "WriteAll", b"bb")   # Q's cursor is still 0
    assert read(vfs, P, path) == b"bbAA"


def test_forget_closes_handles(vfs):
    for i in range(5):
        ok(vfs, P, f"{DRIVE}/f{i}", "Write", b"12345")
    ok(vfs, P, DRIVE + "/f0", {"Seek": {"seek_from": {"Start": 3}}})
    before = open_fds()
    vfs.forget(P)
    assert open_fds() == before - 5
    assert ok(vfs, P, DRIVE + "/f0", {"ReadExact": 1})[1] == b"1"
    vfs.forget(ProcessId("never", "seen", "x.os"))   # unknown process: no-op


def test_remove_file_closes_every_processes_handle(vfs):
    path = DRIVE + "/f"
    ok(vfs, P, path, "Write", b"old content")
    ok(vfs, Q, path, {"ReadExact": 3})
    ok(vfs, P, path, "RemoveFile")
    assert is_missing(err(vfs, Q, path, "ReadToEnd"))   # not the stale unlinked file
    ok(vfs, P, path, "Write", b"new")
    assert ok(vfs, Q, path, "ReadToEnd")[1] == b"new"


def test_rename_closes_handles_on_both_paths(vfs):
    ok(vfs, P, DRIVE + "/a", "Write", b"AAAA")
    ok(vfs, P, DRIVE + "/b", "Write", b"BBBB")
    ok(vfs, Q, DRIVE + "/a", {"ReadExact": 1})
    ok(vfs, Q, DRIVE + "/b", {"ReadExact": 1})
    ok(vfs, P, DRIVE + "/a", {"Rename": {"new_path": DRIVE + "/b"}})
    assert is_missing(err(vfs, Q, DRIVE + "/a", "ReadToEnd"))
    assert ok(vfs, Q, DRIVE + "/b", "ReadToEnd")[1] == b"AAAA"   # fresh handle on the new file


def test_remove_dir_all_closes_handles_below(vfs):
    ok(vfs, P, DRIVE + "/d", "CreateDir")
    ok(vfs, P, DRIVE + "/d/f", "Write", b"xyz")
    ok(vfs, Q, DRIVE + "/d/f", {"ReadExact": 1})
    before = open_fds()
    ok(vfs, P, DRIVE + "/d", "RemoveDirAll")
    assert open_fds() <= before - 2
    assert is_missing(err(vfs, Q, DRIVE + "/d/f", "ReadToEnd"))


def test_handle_limit_evicts_least_recently_used(vfs):
    vfs.MAX_HANDLES_PER_PROCESS = 3
    for i in range(5):
        ok(vfs, P, f"{DRIVE}/f{i}", "Write", b"abc")
    assert len(vfs._handles[P]) == 3


# ---- capabilities ------------------------------------------------------------------------------------

def test_own_package_drive_is_free(vfs):
    caps = Caps()
    ok(vfs, Q, DRIVE + "/f", "Write", b"x", has_cap=caps)
    assert read(vfs, Q, DRIVE + "/f", has_cap=caps) == b"x"
    assert caps.calls == []


def test_other_package_needs_caps(vfs):
    ok(vfs, P, DRIVE + "/f", "Write", b"data")
    e = err(vfs, O, DRIVE + "/f", "Read")
    assert e == {"NoCap": {"action": "Read", "path": "app:pub.os/data/f"}}
    assert err(vfs, O, DRIVE + "/f", "Write", b"x") == {
        "NoCap": {"action": "Write", "path": "app:pub.os/data/f"}}
    assert "NoCap" in err(vfs, O, DRIVE + "/f", {"OpenFile": {"create": False}})
    assert "NoCap" in err(vfs, O, DRIVE, "ReadDir")


def test_read_cap(vfs):
    ok(vfs, P, DRIVE + "/f", "Write", b"data")
    caps = Caps(("read", DRIVE))
    assert read(vfs, O, DRIVE + "/f", has_cap=caps) == b"data"
    assert caps.calls[0] == {"kind": "read", "drive": "/app:pub.os/data"}
    for action in ("ReadDir", {"Seek": {"seek_from": {"Start": 0}}}, {"ReadExact": 1}, "ReadToEnd",
                   "ReadToString", "Metadata", "Len", "Hash"):
        path = DRIVE if action == "ReadDir" else DRIVE + "/f"
        ok(vfs, O, path, action, has_cap=caps)
    # upstream's check_caps counts OpenFile (even without create) and CloseFile as writes
    for action in ("Write", "WriteAll", "Append", "CreateFile", {"OpenFile": {"create": True}},
                   {"OpenFile": {"create": False}}, "CloseFile", "AddZip", "SyncAll", {"SetLen": 0}, "RemoveFile", "CreateDir", "CreateDirAll",
                   "RemoveDir", "RemoveDirAll"):
        assert "NoCap" in err(vfs, O, DRIVE + "/f", action, b"x", has_cap=caps), action
    assert read(vfs, P, DRIVE + "/f") == b"data"
    # a cap for another drive does not help
    other = Caps(("read", "/app:pub.os/elsewhere"), ("write", "/app:pub.os/elsewhere"))
    assert "NoCap" in err(vfs, O, DRIVE + "/f", "Read", has_cap=other)


def test_write_cap_does_not_imply_read(vfs):
    ok(vfs, P, DRIVE + "/f", "Write", b"data")
    caps = Caps(("write", DRIVE))
    assert "NoCap" in err(vfs, O, DRIVE + "/f", "Read", has_cap=caps)
    assert caps.calls == [{"kind": "read", "drive": DRIVE}, {"root": True}]
    ok(vfs, O, DRIVE + "/f", {"OpenFile": {"create": False}}, has_cap=caps)
    ok(vfs, O, DRIVE + "/f", "Append", b"!", has_cap=caps)
    ok(vfs, O, DRIVE + "/f", "CloseFile", has_cap=caps)
    assert read(vfs, P, DRIVE + "/f") == b"data!"
    both = Caps(("write", DRIVE), ("read", DRIVE))
    assert read(vfs, O, DRIVE + "/f", has_cap=both) == b"data!"


def test_root_cap_allows_everything(vfs):
    ok(vfs, P, DRIVE + "/f", "Write", b"data")
    root = lambda params: params == {"root": True}   # noqa: E731
    assert read(vfs, O, DRIVE + "/f", has_cap=root) == b"data"
    ok(vfs, O, DRIVE + "/f", "Append", b"!", has_cap=root)
    ok(vfs, O, "/app:pub.os/rooted", "CreateDrive", has_cap=root)
    assert read(vfs, P, DRIVE + "/f") == b"data!"


def test_rename_copy_need_write_on_both_drives(vfs):
    ok(vfs, P, "/app:pub.os/two", "CreateDrive")
    ok(vfs, P, DRIVE + "/f", "Write", b"data")
    only_src = Caps(("write", DRIVE), ("read", "/app:pub.os/two"))
    for action in ({"Rename": {"new_path": "/app:pub.os/two/f"}},
                   {"CopyFile": {"new_path": "/app:pub.os/two/f"}}):
        e = err(vfs, O, DRIVE + "/f", action, has_cap=only_src)
        assert e["NoCap"]["path"] == "app:pub.os/two/f"
    only_dst = Caps(("read", DRIVE), ("write", "/app:pub.os/two"))
    e = err(vfs, O, DRIVE + "/f", {"CopyFile": {"new_path": "/app:pub.os/two/f"}}, has_cap=only_dst)
    assert e["NoCap"]["path"] == "app:pub.os/data/f"
    both = Caps(("write", DRIVE), ("write", "/app:pub.os/two"))
    ok(vfs, O, DRIVE + "/f", {"CopyFile": {"new_path": "/app:pub.os/two/g"}}, has_cap=both)
    ok(vfs, O, DRIVE + "/f", {"Rename": {"new_path": "/app:pub.os/two/f"}}, has_cap=both)
    assert read(vfs, P, "/app:pub.os/two/f") == b"data"
    assert read(vfs, P, "/app:pub.os/two/g") == b"data"
    # the owner can move files out of its drive into another package only with a write cap there
    ok(vfs, O, "/other:pub.os/mine", "CreateDrive")
    assert "NoCap" in err(vfs, P, "/app:pub.os/two/f", {"Rename": {"new_path": "/other:pub.os/mine/f"}})


def test_has_cap_raising_is_a_refusal(vfs):
    def boom(params):
        raise RuntimeError("kernel exploded")
    assert "NoCap" in err(vfs, O, DRIVE + "/f", "Read", has_cap=boom)


def test_granted_caps_work_through_kernel_style_check(vfs):
    res = raw(vfs, O, json.dumps({"path": "/other:pub.os/pub", "action": "CreateDrive"}).encode())
    granted = res.grant
    ok(vfs, O, "/other:pub.os/pub/f", "Write", b"shared")
    assert read(vfs, P, "/other:pub.os/pub/f", has_cap=lambda p: p in granted[:1]) == b"shared"
    assert "NoCap" in err(vfs, P, "/other:pub.os/pub/f", "Write", b"x",
                          has_cap=lambda p: p in granted[:1])
    ok(vfs, P, "/other:pub.os/pub/f", "Write", b"x", has_cap=lambda p: p in granted)


# ---- paths -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/app:pub.os/data/../x",
    "/app:pub.os/data/../../x",
    "/app:pub.os/data/../../../../etc/passwd",
    "/app:pub.os/../other:pub.os/data/x",
    "..",
    "/../app:pub.os/data/x",
    "/app:pub.os/data/a/../../b",
    "/app:pub.os/data/x\x00y",
    "/app:pub.os/data\\..\\..\\x",
    "/app:pub.os/data/a\\b",
    "",
    "/",
    "///",
])
def test_bad_paths_are_bad_request(vfs, path):
    for action in ("Read", "Write", "CreateDirAll", "ReadDir", "Metadata", "RemoveDirAll"):
        if path == "/" and action == "ReadDir":
            continue   # the list of packages' folders (test_read_dir_of_the_root)
        e = err(vfs, P, path, action, b"x")
        assert "BadRequest" in e, (path, action, e)
        assert e["BadRequest"]["error"]


@pytest.mark.parametrize("path", ["/etc/passwd", "/tmp", "/app:pub.os", "nocolon/data/x", "a:b:c/data/x",
                                  "/:x/data/f", "/app:/data/f", "/app@x:pub/data/f"])
def test_bad_package_id_is_parse_error(vfs, path):
    e = err(vfs, P, path, "Read")
    assert set(e) == {"ParseError"} and set(e["ParseError"]) == {"error", "path"}


def test_absolute_inner_path_stays_in_drive(vfs, tmp_path):
    # empty parts collapse: "//etc/passwd" inside a drive is just data/etc/passwd
    assert is_missing(err(vfs, P, DRIVE + "//etc/passwd", "Read"))
    ok(vfs, P, DRIVE + "//tmpfile", "Write", b"x")
    assert (vfs.drive_path(P.package_id, "data") / "tmpfile").read_bytes() == b"x"


def test_escape_in_new_path_refused(vfs):
    ok(vfs, P, DRIVE + "/f", "Write", b"x")
    for new in ("/app:pub.os/data/../../../evil", "/app:pub.os/data/\x00", "/etc/passwd", 5, None):
        e = err(vfs, P, DRIVE + "/f", {"Rename": {"new_path": new}})
        assert set(e) & {"BadRequest", "ParseError", "BadJson"}, (new, e)
        e = err(vfs, P, DRIVE + "/f", {"CopyFile": {"new_path": new}})
        assert set(e) & {"BadRequest", "ParseError", "BadJson"}, (new, e)
    assert read(vfs, P, DRIVE + "/f") == b"x"


def test_symlink_out_of_drive_refused(vfs, outside):
    drive = vfs.drive_path(P.package_id, "data")
    os.symlink(outside / "secret", drive / "link")
    os.symlink(outside, drive / "dirlink")
    os.symlink(outside / "newfile", drive / "dangling")
    for path in (DRIVE + "/link", DRIVE + "/dirlink/secret", DRIVE + "/dirlink"):
        for action in ("Read", "ReadToEnd", {"ReadExact": 1}, "ReadToString", "Metadata", "Len",
                       "Hash", "ReadDir", {"OpenFile": {"create": False}}):
            e = err(vfs, P, path, action)
            assert set(e) & {"BadRequest", "NoCap"}, (path, action, e)
        for action in ("Write", "WriteAll", "Append", "CreateFile", {"OpenFile": {"create": True}},
                       {"SetLen": 0}, "RemoveFile", "RemoveDirAll", "CreateDirAll"):
            e = err(vfs, P, path, action, b"pwned")
            assert set(e) & {"BadRequest", "NoCap"}, (path, action, e)
        e = err(vfs, P, path, {"CopyFile": {"new_path": DRIVE + "/copy"}})
        assert set(e) & {"BadRequest", "NoCap"}
        e = err(vfs, P, DRIVE + "/nothing", {"Rename": {"new_path": path}})
        assert set(e) & {"BadRequest", "NoCap"}
    # creating through a dangling link would create a file outside: refused
    for action in ("Write", "CreateFile", {"OpenFile": {"create": True}}):
        assert set(err(vfs, P, DRIVE + "/dangling", action, b"x")) & {"BadRequest", "NoCap"}
    ok(vfs, P, DRIVE + "/src", "Write", b"pwned")
    e = err(vfs, P, DRIVE + "/src", {"CopyFile": {"new_path": DRIVE + "/dirlink/secret"}})
    assert set(e) & {"BadRequest", "NoCap"}
    assert not (outside / "newfile").exists()
    assert (outside / "secret").read_bytes() == b"top secret"
    assert sorted(os.listdir(outside)) == ["secret"]
    # a symlink to another package's drive is also outside the drive
    ok(vfs, O, "/other:pub.os/priv", "CreateDrive")
    ok(vfs, O, "/other:pub.os/priv/k", "Write", b"key")
    os.symlink(vfs.drive_path(O.package_id, "priv") / "k", drive / "steal")
    assert set(err(vfs, P, DRIVE + "/steal", "Read")) & {"BadRequest", "NoCap"}


def test_symlink_within_drive_is_followed(vfs):
    drive = vfs.drive_path(P.package_id, "data")
    ok(vfs, P, DRIVE + "/sub/real", "CreateDirAll")
    ok(vfs, P, DRIVE + "/sub/real/f", "Write", b"inside")
    os.symlink("sub/real", drive / "alias")
    os.symlink("sub/real/f", drive / "flink")
    assert read(vfs, P, DRIVE + "/alias/f") == b"inside"
    assert read(vfs, P, DRIVE + "/flink") == b"inside"
    md = ok(vfs, P, DRIVE + "/flink", "Metadata")[0]["Metadata"]
    assert (md["file_type"], md["len"]) == ("File", 6)
    # removing a link removes the link, not its target
    ok(vfs, P, DRIVE + "/flink", "RemoveFile")
    assert read(vfs, P, DRIVE + "/sub/real/f") == b"inside"
    ok(vfs, P, DRIVE + "/alias", "RemoveDirAll")
    assert read(vfs, P, DRIVE + "/sub/real/f") == b"inside"


def test_drive_symlinked_out_of_root_refused(vfs, outside):
    os.symlink(outside, vfs.root / "app:pub.os" / "evil")
    assert set(err(vfs, P, "/app:pub.os/evil/secret", "Read")) & {"BadRequest", "NoCap"}
    assert set(err(vfs, P, "/app:pub.os/evil", "CreateDrive")) & {"BadRequest", "NoCap"}
    assert set(err(vfs, P, "/app:pub.os/evil/x", "Write", b"x")) & {"BadRequest", "NoCap"}
    assert sorted(os.listdir(outside)) == ["secret"]


def test_fifo_in_drive_does_not_block(vfs):
    os.mkfifo(vfs.drive_path(P.package_id, "data") / "pipe")
    e = err(vfs, P, DRIVE + "/pipe", "Read")
    assert "not a regular file" in e["IOError"]["error"]
    assert ok(vfs, P, DRIVE + "/pipe", "Metadata")[0]["Metadata"]["file_type"] == "Other"


# ---- malformed requests -------------------------------------------------------------------------------

BAD_BODIES = [
    b"", b"not json", b"\xff\xfe\x00", b"[]", b"null", b"42", b'"Read"', b"{}",
    b'{"path": "/app:pub.os/data/f"}', b'{"action": "Read"}',
    b'{"path": 5, "action": "Read"}', b'{"path": null, "action": "Read"}',
    b'{"path": ["a"], "action": "Read"}',
    b'{"path": "/app:pub.os/data/f", "action": "Nope"}',
    b'{"path": "/app:pub.os/data/f", "action": 7}',
    b'{"path": "/app:pub.os/data/f", "action": null}',
    b'{"path": "/app:pub.os/data/f", "action": {}}',
    b'{"path": "/app:pub.os/data/f", "action": {"Read": null, "Len": null}}',
    b'{"path": "/app:pub.os/data/f", "action": "ReadExact"}',
    b'{"path": "/app:pub.os/data/f", "action": {"ReadExact": "5"}}',
    b'{"path": "/app:pub.os/data/f", "action": {"ReadExact": 5.0}}',
    b'{"path": "/app:pub.os/data/f", "action": {"ReadExact": true}}',
    b'{"path": "/app:pub.os/data/f", "action": {"ReadExact": -1}}',
    b'{"path": "/app:pub.os/data/f", "action": {"ReadExact": 18446744073709551616}}',
    b'{"path": "/app:pub.os/data/f", "action": {"ReadExact": 1e400}}',
    b'{"path": "/app:pub.os/data/f", "action": {"ReadExact": NaN}}',
    b'{"path": "/app:pub.os/data/f", "action": {"SetLen": -5}}',
    b'{"path": "/app:pub.os/data/f", "action": {"SetLen": null}}',
    b'{"path": "/app:pub.os/data/f", "action": {"Seek": {"seek_from": {"Start": -1}}}}',
    b'{"path": "/app:pub.os/data/f", "action": {"Seek": {"seek_from": {"End": 9223372036854775808}}}}',
    b'{"path": "/app:pub.os/data/f", "action": {"Seek": {"seek_from": {"Middle": 0}}}}',
    b'{"path": "/app:pub.os/data/f", "action": {"Seek": {"seek_from": "Start"}}}',
    b'{"path": "/app:pub.os/data/f", "action": {"Seek": {"Start": 0}}}',
    b'{"path": "/app:pub.os/data/f", "action": {"Seek": 0}}',
    b'{"path": "/app:pub.os/data/f", "action": {"OpenFile": {}}}',
    b'{"path": "/app:pub.os/data/f", "action": {"OpenFile": {"create": "yes"}}}',
    b'{"path": "/app:pub.os/data/f", "action": {"OpenFile": true}}',
    b'{"path": "/app:pub.os/data/f", "action": {"Rename": {"new_path": 1}}}',
    b'{"path": "/app:pub.os/data/f", "action": {"Rename": "x"}}',
    b'{"path": "/app:pub.os/data/f", "action": {"CopyFile": {}}}',
    b'{"path": "/app:pub.os/data/f", "action": "Rename"}',
    b'{"path": "/app:pub.os/data/f", "action": {"Read": 1}}',
    b'{"path": "/app:pub.os/data/f", "action": "Read"',
    b'{"path": "\\ud800", "action": "Read"}',
    b'{"path": "/app:pub.os/data/\\udc80", "action": "Write"}',
    b'{"path": "/app:pub.os/data/' + b"a" * 5000 + b'", "action": "Write"}',
    b'{"path": "/app:pub.os/data/' + b"a/" * 3000 + b'", "action": "CreateDirAll"}',
    b'{"path": "/app:pub.os/data/f", "action": {"ReadExact": ' + b"9" * 5000 + b"}}",
    b"[" * 100000 + b"]" * 100000,
    b'{"path": "/app:pub.os/data/f", "action": ' + b'{"a":' * 50000 + b"1" + b"}" * 50000 + b"}",
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_malformed_bodies_give_err(vfs, body):
    res = raw(vfs, P, body, b"blob")
    parsed = json.loads(res.body)
    assert isinstance(parsed, dict) and list(parsed) == ["Err"], parsed
    assert res.blob is None and res.grant == []


def test_bad_json_shape_details(vfs):
    e = json.loads(raw(vfs, P, b"not json").body)["Err"]
    assert set(e) == {"BadJson"} and e["BadJson"]["error"]
    e = json.loads(raw(vfs, P, b'{"path":"/app:pub.os/data/f","action":"Frobnicate"}').body)["Err"]
    assert "Frobnicate" in e["BadJson"]["error"]


def test_non_bytes_body_never_raises(vfs):
    for body in (None, "text", 5, [1, 2], {"path": DRIVE}):
        res = vfs.handle(P, no_caps, body, None)
        assert "Err" in json.loads(res.body)


def test_extra_fields_ignored(vfs):
    body = json.dumps({"path": DRIVE + "/f", "action": "Write", "extra": 1}).encode()
    assert json.loads(raw(vfs, P, body, b"x").body) == "Ok"


# random requests: handle never raises, always answers JSON, never writes outside its root

_paths = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["app:pub.os", "data", "..", ".", "", "f", "d", "other:pub.os", "x\x00",
                              "a\\b", "/", "app:pub.os/data"]), max_size=6).map("/".join),
)
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                       st.floats(allow_nan=False), st.text(max_size=10))
_json = st.recursive(_json_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), c, max_size=3)),
                     max_leaves=8)
_action_names = st.sampled_from(sorted({
    "CreateDrive", "CreateDir", "CreateDirAll", "CreateFile", "OpenFile", "CloseFile", "Write",
    "WriteAll", "Append", "SyncAll", "Read", "ReadDir", "ReadToEnd", "ReadExact", "ReadToString",
    "Seek", "RemoveFile", "RemoveDir", "RemoveDirAll", "Rename", "CopyFile", "Metadata", "Len",
    "SetLen", "Hash", "Bogus"}))
_args = st.one_of(
    _json,
    st.fixed_dictionaries({"create": st.one_of(st.booleans(), _json)}),
    st.fixed_dictionaries({"new_path": st.one_of(_paths, _json)}),
    st.fixed_dictionaries({"seek_from": st.dictionaries(st.sampled_from(["Start", "End", "Current", "X"]),
                                                        st.one_of(st.integers(-2**65, 2**65), _json),
                                                        max_size=2)}),
)
_actions = st.one_of(_action_names, st.dictionaries(_action_names, _args, min_size=1, max_size=2), _json)
_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda p, a: json.dumps({"path": p, "action": a}).encode(), _paths, _actions),
    st.builds(lambda d: json.dumps(d).encode(), _json),
)


@pytest.fixture(scope="module")
def fuzz_vfs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    v = Vfs(base / "vfs")
    v.handle(P, no_caps, json.dumps({"path": DRIVE, "action": "CreateDrive"}).encode(), None)
    yield v, base
    for src in (P, O):
        v.forget(src)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, blob=st.one_of(st.none(), st.binary(max_size=64)), who=st.sampled_from([P, O]),
       cap=st.booleans())
def test_random_requests_never_raise(fuzz_vfs, body, blob, who, cap):
    v, base = fuzz_vfs
    res = v.handle(who, (lambda p: cap), body, blob)
    assert isinstance(res, VfsResult)
    parsed = json.loads(res.body)
    assert isinstance(parsed, (str, dict))
    if isinstance(parsed, dict):
        assert len(parsed) == 1
    if res.grant:
        assert parsed == "Ok"
    assert sorted(os.listdir(base)) == ["vfs"]


# ---- I/O errors -------------------------------------------------------------------------------------

def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_write(vfs, monkeypatch):
    path = DRIVE + "/f"
    ok(vfs, P, path, "Write", b"old")
    monkeypatch.setattr(os, "pwrite", _enospc)
    monkeypatch.setattr(os, "write", _enospc)
    e = err(vfs, P, path, "Write", b"new content")
    assert e == {"IOError": {"error": "no space left on device: app:pub.os/data/f",
                             "path": "app:pub.os/data/f"}}
    monkeypatch.undo()
    # all-or-nothing: the file is empty, not half-written, and the handle still works
    assert read(vfs, P, path) == b""
    ok(vfs, P, path, "Write", b"works again")
    assert read(vfs, P, path) == b"works again"


def test_enospc_append_and_write_all_roll_back(vfs, monkeypatch):
    path = DRIVE + "/f"
    ok(vfs, P, path, "Write", b"abc")
    ok(vfs, P, path, {"Seek": {"seek_from": {"Start": 3}}})
    real_pwrite = os.pwrite

    def partial(fd, data, pos):   # write one byte, then run out of space
        if len(data) > 1:
            real_pwrite(fd, bytes(data[:1]), pos)
            return 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", partial)
    assert "no space" in err(vfs, P, path, "Append", b"XYZ")["IOError"]["error"]
    assert "no space" in err(vfs, P, path, "WriteAll", b"123456")["IOError"]["error"]
    monkeypatch.undo()
    # growth undone; the cursor did not move
    assert ok(vfs, P, path, "Len")[0] == {"Len": 3}
    ok(vfs, P, path, "WriteAll", b"Z")
    assert read(vfs, P, path) == b"abcZ"


def test_enospc_copy_leaves_no_temp(vfs, monkeypatch):
    ok(vfs, P, DRIVE + "/src", "Write", b"x" * 5000)
    ok(vfs, P, DRIVE + "/dst", "Write", b"keep me")
    monkeypatch.setattr(os, "pwrite", _enospc)
    e = err(vfs, P, DRIVE + "/src", {"CopyFile": {"new_path": DRIVE + "/dst"}})
    assert "no space left on device" in e["IOError"]["error"]
    monkeypatch.undo()
    assert read(vfs, P, DRIVE + "/dst") == b"keep me"
    assert sorted(os.listdir(vfs.drive_path(P.package_id, "data"))) == ["dst", "src"]


def test_read_only_file_falls_back_to_read_only_handle(vfs, monkeypatch):
    ok(vfs, P, DRIVE + "/ro", "Write", b"read only")
    vfs.forget(P)
    real_open = os.open

    def no_rdwr(path, flags, *a, **k):   # what a 0444 file gives a non-root user
        if flags & os.O_RDWR and str(path).endswith("/ro"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", no_rdwr)
    assert read(vfs, P, DRIVE + "/ro") == b"read only"
    e = err(vfs, P, DRIVE + "/ro", "WriteAll", b"x")
    assert e["IOError"]["error"] == "file is not open for writing: app:pub.os/data/ro"
    e = err(vfs, P, DRIVE + "/ro", "CreateFile")
    assert e["IOError"]["error"] == "permission denied: app:pub.os/data/ro"
    monkeypatch.undo()
    assert read(vfs, P, DRIVE + "/ro") == b"read only"


def test_error_paths_leak_no_fds(vfs, outside):
    ok(vfs, P, DRIVE + "/d", "CreateDir")
    ok(vfs, P, DRIVE + "/f", "Write", b"abc")
    os.mkfifo(vfs.drive_path(P.package_id, "data") / "pipe")
    os.symlink(outside / "secret", vfs.drive_path(P.package_id, "data") / "out")
    vfs.forget(P)
    before = open_fds()
    for _ in range(3):
        for path in ("/d", "/pipe", "/out", "/missing"):
            for action in ("Read", "Hash", "Len", {"OpenFile": {"create": False}}, "ReadDir",
                           {"CopyFile": {"new_path": DRIVE + "/nodir/x"}}):
                call(vfs, P, DRIVE + path, action)
        call(vfs, P, DRIVE + "/f", {"CopyFile": {"new_path": DRIVE + "/nodir/x"}})
        call(vfs, P, DRIVE + "/f", {"ReadExact": 100})
    ok(vfs, P, DRIVE + "/f", "CloseFile")
    assert open_fds() == before


def test_overlong_path_is_bad_request(vfs):
    e = err(vfs, P, DRIVE + "/" + "a/" * 3000, "CreateDirAll")
    assert "longer than" in e["BadRequest"]["error"]
    e = err(vfs, P, DRIVE + "/" + "a" * 300, "Write", b"x")     # one part too long for the OS
    assert "file name too long" in e["IOError"]["error"]


def test_forget_racing_with_use(vfs):
    ok(vfs, P, DRIVE + "/f", "Write", b"z" * 4096)
    stop = threading.Event()
    problems = []

    def user():
        while not stop.is_set():
            body, out = call(vfs, Q, DRIVE + "/f", {"ReadExact": 16})
            if body != "Read" and not ("Err" in body and "IOError" in body["Err"]):
                problems.append(body)
            call(vfs, Q, DRIVE + "/f", {"Seek": {"seek_from": {"Start": 0}}})

    t = threading.Thread(target=user)
    t.start()
    for _ in range(300):
        vfs.forget(Q)
    stop.set()
    t.join()
    assert not problems


def test_os_errors_from_rmdir_are_io_error(vfs, monkeypatch):
    ok(vfs, P, DRIVE + "/d", "CreateDir")

    def eacces(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(os, "rmdir", eacces)
    e = err(vfs, P, DRIVE + "/d", "RemoveDir")
    assert e == {"IOError": {"error": "permission denied: app:pub.os/data/d", "path": "app:pub.os/data/d"}}


# ---- speed and concurrency --------------------------------------------------------------------------

def test_read_of_1mib_is_a_single_os_read(vfs, monkeypatch):
    data = os.urandom(1 << 20)
    ok(vfs, P, DRIVE + "/big", "Write", data)
    ok(vfs, P, DRIVE + "/big", {"OpenFile": {"create": False}})
    calls = []
    real = os.pread

    def counting(fd, n, pos):
        calls.append(n)
        return real(fd, n, pos)
    monkeypatch.setattr(os, "pread", counting)
    assert read(vfs, P, DRIVE + "/big") == data
    assert len(calls) == 1
    calls.clear()
    ok(vfs, P, DRIVE + "/big", {"Seek": {"seek_from": {"Start": 0}}})
    assert ok(vfs, P, DRIVE + "/big", {"ReadExact": 1 << 20})[1] == data
    assert len(calls) == 1


def test_concurrent_appends_from_many_processes(vfs):
    path = DRIVE + "/log"
    ok(vfs, P, path, "CreateFile")
    procs = [ProcessId(f"w{i}", "app", "pub.os") for i in range(8)]
    errors = []

    def worker(src, byte):
        try:
            for _ in range(50):
                body, _ = call(vfs, src, path, "Append", bytes([byte]) * 100)
                assert body == "Ok", body
        except Exception as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p, 65 + i)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data = read(vfs, P, path)
    assert len(data) == 8 * 50 * 100
    for i in range(8):
        assert data.count(bytes([65 + i])) == 50 * 100
    for p in procs:
        vfs.forget(p)


def test_concurrent_readers_and_renamers_never_raise(vfs):
    ok(vfs, P, DRIVE + "/a", "Write", b"x" * 1000)
    stop = threading.Event()
    problems = []

    def reader(src):
        while not stop.is_set():
            for action in ("Read", {"ReadExact": 10}, "ReadToEnd", "Len"):
                for path in ("/a", "/b"):
                    res = vfs.handle(src, no_caps, json.dumps({"path": DRIVE + path, "action": action}).encode(), None)
                    body = json.loads(res.body)
                    if body not in ("Read",) and not (isinstance(body, dict) and set(body) & {"Len", "Err"}):
                        problems.append(body)
                    if isinstance(body, dict) and "Err" in body and body["Err"] != "NotFound" \
                            and "IOError" not in body["Err"]:
                        problems.append(body)

    def renamer():
        for i in range(200):
            src, dst = ("/a", "/b") if i % 2 == 0 else ("/b", "/a")
            res = vfs.handle(P, no_caps, json.dumps({"path": DRIVE + src,
                                                     "action": {"Rename": {"new_path": DRIVE + dst}}}).encode(), None)
            if json.loads(res.body) != "Ok":
                problems.append(res.body)
        stop.set()

    readers = [threading.Thread(target=reader, args=(ProcessId(f"r{i}", "app", "pub.os"),)) for i in range(4)]
    for t in readers:
        t.start()
    renamer()
    for t in readers:
        t.join()
    assert not problems, problems[:5]
    for i in range(4):
        vfs.forget(ProcessId(f"r{i}", "app", "pub.os"))


def test_large_write_all_is_written_behind_and_its_failure_reported_next(vfs, monkeypatch):
    from host.vfs.store import WRITE_BEHIND_MIN
    path = f"{DRIVE}/wb.bin"
    ok(vfs, P, path, "CreateFile")
    big = os.urandom(WRITE_BEHIND_MIN * 2)
    ok(vfs, P, path, "WriteAll", big)
    ok(vfs, P, path, "SyncAll")  # waits for the write behind
    assert (vfs.root / "app:pub.os" / "data" / "wb.bin").read_bytes() == big
    # a failing write-behind: answered Ok, then the process's next request carries the error
    monkeypatch.setattr(os, "pwrite", _enospc)
    ok(vfs, P, path, "WriteAll", big)
    body = err(vfs, P, path, "SyncAll")
    assert "an earlier write failed: no space left on device" in json.dumps(body)
    monkeypatch.undo()
    # the file was rolled back to its length before the failed write; the handle keeps working
    assert ok(vfs, P, path, "Len")[0] == {"Len": len(big)}
    ok(vfs, P, path, "SyncAll")


def test_the_pkg_drive_is_writable_but_never_writes_through_to_the_build(vfs, tmp_path):
    """Upstream lets a package write its own pkg drive. Installed files here are hard links to
    the build output: every write lands on a private copy, the build file stays as it was."""
    pkg = vfs.root / "app:pub.os" / "pkg"
    pkg.mkdir(parents=True)
    build = tmp_path / "build"
    build.mkdir()
    names = ["w.wasm", "wa.wasm", "ap.wasm", "sl.wasm", "cf.wasm", "mv.wasm"]
    for n in names:
        (build / n).write_bytes(b"\0asm-build")
        os.link(build / n, pkg / n)
    root = "/app:pub.os/pkg/"
    assert ok(vfs, P, root + "w.wasm", "Read")[1] == b"\0asm-build"
    ok(vfs, P, root + "w.wasm", "Write", b"new")
    ok(vfs, P, root + "wa.wasm", {"OpenFile": {"create": False}})
    ok(vfs, P, root + "wa.wasm", "WriteAll", b"NEW")
    ok(vfs, P, root + "ap.wasm", "Append", b"+")
    ok(vfs, P, root + "sl.wasm", {"SetLen": 2})
    ok(vfs, P, root + "cf.wasm", "CreateFile")
    ok(vfs, P, root + "mv.wasm", {"Rename": {"new_path": DRIVE + "/moved"}})
    ok(vfs, P, DRIVE + "/moved", "Write", b"moved")
    assert (pkg / "w.wasm").read_bytes() == b"new"
    assert (pkg / "wa.wasm").read_bytes() == b"NEWm-build"
    assert (pkg / "ap.wasm").read_bytes() == b"\0asm-build+"
    assert (pkg / "sl.wasm").read_bytes() == b"\0a"
    assert (pkg / "cf.wasm").read_bytes() == b""
    assert read(vfs, P, DRIVE + "/moved") == b"moved"
    for n in names:    # the build output is untouched
        assert (build / n).read_bytes() == b"\0asm-build", n
        assert (build / n).stat().st_nlink == 1, n
    assert not [p for p in pkg.iterdir() if p.name.startswith(".")]   # no copy left behind
    # another package needs a write capability for it, as for any drive
    body = err(vfs, O, root + "w.wasm", "Write", b"evil")
    assert "NoCap" in body
    assert (pkg / "w.wasm").read_bytes() == b"new"


# ---- this host's folder actions: WalkDir, ReadMany, WriteMany --------------------------------------
def test_folder_actions_walk_read_write_and_refuse(vfs, tmp_path, outside):
    import blake3
    root = tmp_path / "home" / "vfs" / "app:pub.os" / "data" / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "x.txt").write_bytes(b"hello")
    (root / "a" / "y.bin").write_bytes(os.urandom(3 << 20))   # a big piece: written behind, maybe directly
    (root / "a" / "b" / "z").write_bytes(b"")
    os.symlink(outside / "secret", root / "a" / "link")
    os.symlink(outside, root / "outlink")
    os.mkfifo(root / "fifo")
    walk = {"WalkDir": {"max_depth": 8, "max_entries": 100}}
    body, listing = ok(vfs, P, f"{DRIVE}/tree", walk)
    found = json.loads(listing)  # in the blob (a body crosses into Wasm only up to 2 MiB)
    assert body == {"WalkDir": {"dirs": 3, "files": 3, "skipped": 3}}
    assert found["dirs"] == ["a", "empty", "a/b"]
    assert [f[:2] for f in found["files"]] == [["x.txt", 5], ["a/y.bin", 3 << 20], ["a/b/z", 0]]
    assert sorted(found["skipped"]) == ["a/link", "fifo", "outlink"]  # never followed nor read
    # limits, and a folder that is itself a symlink
    assert "deeper than 1 levels" in str(err(vfs, P, f"{DRIVE}/tree", {"WalkDir": {"max_depth": 1, "max_entries": 100}}))
    assert "more than 3 entries" in str(err(vfs, P, f"{DRIVE}/tree", {"WalkDir": {"max_depth": 8, "max_entries": 3}}))
    os.symlink(root, root.parent / "treelink")
    assert "symlink" in str(err(vfs, P, f"{DRIVE}/treelink", walk))
    # another package needs a read capability for it
    assert list(err(vfs, O, f"{DRIVE}/tree", walk)) == ["NoCap"]

    items = [[f[0], 0, f[1], f[2]] for f in found["files"]]
    body, data = ok(vfs, P, f"{DRIVE}/tree", {"ReadMany": {"items": items}})
    assert data == b"hello" + (root / "a" / "y.bin").read_bytes()
    hashes = body["ReadMany"]
    assert hashes[0] == blake3.blake3(b"hello").hexdigest()

    pieces = [[f"copy/{f[0]}", 0, f[1], h] for f, h in zip(found["files"], hashes)]
    dirs = ["copy", "copy/a", "copy/a/b", "copy/empty"]
    ok(vfs, P, f"{DRIVE}/part", {"WriteMany": {"items": pieces, "dirs": dirs, "state": {"path": "st", "text": "{}"}}},
       data)
    ok(vfs, P, f"{DRIVE}/part", "Metadata")  # the next request waits for a write behind
    copy = root.parent / "part" / "copy"
    assert (copy / "x.txt").read_bytes() == b"hello" and (copy / "empty").is_dir()
    assert (copy / "a" / "y.bin").read_bytes() == (root / "a" / "y.bin").read_bytes()
    assert (copy / "a" / "b" / "z").read_bytes() == b"" and (root.parent / "part" / "st").read_text() == "{}"

    # a piece that fails its hash: nothing of the batch is written
    bad = [["new/x.txt", 0, 5, "0" * 64]]
    e = err(vfs, P, f"{DRIVE}/part", {"WriteMany": {"items": bad, "dirs": ["new"], "state": None}}, b"hello")
    assert "failed its integrity check" in str(e) and not (root.parent / "part" / "new").exists()
    # a big batch is checked behind the answer: its failure is the next request's answer, and
    # nothing of it is written, its state neither
    big = os.urandom(1 << 20)
    bad = [["new/big", 0, len(big), "0" * 64]]
    ok(vfs, P, f"{DRIVE}/part", {"WriteMany": {"items": bad, "dirs": ["new"], "state": {"path": "st", "text": "x"}}},
       big)
    e = err(vfs, P, f"{DRIVE}/part", "Metadata")
    assert "an earlier write failed" in str(e) and "new/big (at offset 0) failed its integrity check" in str(e)
    assert not (root.parent / "part" / "new").exists() and (root.parent / "part" / "st").read_text() == "{}"
    # paths that could leave the tree, or pass through a symlink, are refused
    empty = blake3.blake3(b"").hexdigest()
    for path in ("../escape", "copy/../../escape", "/abs", "a\\b"):
        assert "bad path component" in str(err(vfs, P, f"{DRIVE}/part", {"WriteMany": {"items": [[path, 0, 0, empty]]}}))
    os.symlink(outside, root.parent / "part" / "out")
    e = err(vfs, P, f"{DRIVE}/part", {"WriteMany": {"items": [["out/planted", 0, 0, empty]]}})
    assert is_io_error(e) and not (outside / "planted").exists()
    assert "bad path component" in str(err(vfs, P, f"{DRIVE}/tree", {"ReadMany": {"items": [["../part/st", 0, 2, "s"]]}}))
    assert is_io_error(err(vfs, P, f"{DRIVE}/tree", {"ReadMany": {"items": [["a/link", 0, 3, "s"]]}}))
    # a file changed since it was listed is not read
    (root / "x.txt").write_bytes(b"HELLO")
    e = err(vfs, P, f"{DRIVE}/tree", {"ReadMany": {"items": items[:1]}})
    assert "x.txt changed since the folder was listed" in str(e)
    # malformed arguments
    assert list(err(vfs, P, f"{DRIVE}/tree", {"ReadMany": []})) == ["BadJson"]
    assert list(err(vfs, P, f"{DRIVE}/tree", {"WalkDir": {"max_depth": 0, "max_entries": 1}})) == ["BadJson"]


def test_write_many_never_writes_through_a_hard_link_to_the_build(vfs, tmp_path):
    """The pkg drive's files are hard links to the build output: WriteMany there is refused, and
    a hard-linked file anywhere is never written; the same batch elsewhere is written (control)."""
    import blake3
    build = tmp_path / "build"
    build.mkdir()
    (build / "manifest.json").write_bytes(b'{"caps": []}')
    pkg = vfs.root / "app:pub.os" / "pkg"
    pkg.mkdir(parents=True)
    os.link(build / "manifest.json", pkg / "manifest.json")
    evil = b'{"caps": ["root"]}'
    batch = {"WriteMany": {"items": [["manifest.json", 0, len(evil), blake3.blake3(evil).hexdigest()]]}}
    e = err(vfs, P, "/app:pub.os/pkg", batch, evil)
    assert "WriteMany cannot write the pkg drive" in str(e)
    # a hard link elsewhere (the drive's own file linked from outside it) is refused too
    data_dir = vfs.root / "app:pub.os" / "data"
    os.link(build / "manifest.json", data_dir / "manifest.json")
    e = err(vfs, P, DRIVE, batch, evil)
    assert "refusing to write a file with other hard links: manifest.json" in str(e)
    assert (build / "manifest.json").read_bytes() == b'{"caps": []}'
    assert (pkg / "manifest.json").read_bytes() == b'{"caps": []}'
    # the control: a file of its own is written
    os.unlink(data_dir / "manifest.json")
    ok(vfs, P, DRIVE, batch, evil)
    assert (data_dir / "manifest.json").read_bytes() == evil
    assert (build / "manifest.json").read_bytes() == b'{"caps": []}'


def test_read_many_refuses_a_huge_or_overlong_read_before_allocating(vfs):
    from host.vfs.tree import MAX_READ_MANY
    root = vfs.root / "app:pub.os" / "data" / "t"
    root.mkdir()
    (root / "a").write_bytes(b"0123456789")
    body, listing = ok(vfs, P, f"{DRIVE}/t", {"WalkDir": {"max_depth": 4, "max_entries": 10}})
    (path, size, stamp), = json.loads(listing)["files"]
    # the control: a piece inside the file is read
    body, data = ok(vfs, P, f"{DRIVE}/t", {"ReadMany": {"items": [[path, 2, 5, stamp], [path, 0, 1, stamp]]}})
    assert data == b"234560"
    huge = [[path, 0, 1 << 62, stamp], [path, 0, 1, stamp]]
    e = err(vfs, P, f"{DRIVE}/t", {"ReadMany": {"items": huge}})
    assert "passes the file's end (10 bytes)" in str(e)
    many = [[path, 0, 1 << 20, "x"]] * (MAX_READ_MANY // (1 << 20) + 1)   # "x": no stamp, no size known
    e = err(vfs, P, f"{DRIVE}/t", {"ReadMany": {"items": many}})
    assert f"ReadMany asks for more than {MAX_READ_MANY} bytes" in str(e)
    e = err(vfs, P, f"{DRIVE}/t", {"ReadMany": {"items": [[path, 8, 5, stamp]]}})
    assert "the piece at 8 of 5 bytes passes the file's end" in str(e)
    assert ok(vfs, P, f"{DRIVE}/t/a", "Read")[1] == b"0123456789"   # the service keeps working


def test_walk_dir_holds_few_fds_whatever_the_number_of_subfolders(vfs):
    """A folder with 1,500 subfolders is listed under a limit of open files far below that."""
    import resource
    root = vfs.root / "app:pub.os" / "data" / "wide"
    for i in range(1500):
        (root / f"d{i:04}" / "inner").mkdir(parents=True)
    (root / "d0007" / "inner" / "f").write_bytes(b"x")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(open_fds() + 200, hard), hard))
    try:
        body, listing = ok(vfs, P, f"{DRIVE}/wide", {"WalkDir": {"max_depth": 4, "max_entries": 10_000}})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    found = json.loads(listing)
    assert body["WalkDir"] == {"dirs": 3000, "files": 1, "skipped": 0}
    assert found["dirs"][:4] == [f"d{i:04}" for i in range(4)] and found["dirs"][1500] == "d0000/inner"
    assert found["files"][0][0] == "d0007/inner/f"


def test_sync_tree_answers_with_the_last_write_behind_failure(vfs, monkeypatch):
    """A big WriteMany is written behind; SyncTree, the step before a tree takes its real name,
    reports its failure (and succeeds after a good one: the control)."""
    import blake3
    big = os.urandom(1 << 20)
    batch = {"WriteMany": {"items": [["t/big", 0, len(big), blake3.blake3(big).hexdigest()]], "dirs": ["t"]}}
    ok(vfs, P, DRIVE, batch, big)
    assert ok(vfs, P, f"{DRIVE}/t", "SyncTree")[0] == "Ok"
    assert (vfs.root / "app:pub.os" / "data" / "t" / "big").read_bytes() == big
    monkeypatch.setattr(os, "pwrite", _enospc)
    ok(vfs, P, DRIVE, batch, big)
    e = err(vfs, P, f"{DRIVE}/t", "SyncTree")
    assert "an earlier write failed: no space left on device" in str(e)
    monkeypatch.undo()
    assert ok(vfs, P, f"{DRIVE}/t", "SyncTree")[0] == "Ok"
    assert list(err(vfs, P, f"{DRIVE}/missing", "SyncTree")) == ["IOError"]


def test_folder_actions_open_their_folder_from_the_drive_without_following_a_symlink(tmp_path, outside):
    """A folder above the tree swapped for a symlink after its path was checked: the walk is
    refused (opened from the drive, component by component); before the swap it works (control)."""
    from host.vfs import tree as vfs_tree
    drive = tmp_path / "drive"
    (drive / "x" / "tree").mkdir(parents=True)
    (drive / "x" / "tree" / "f").write_bytes(b"in the drive")
    (outside / "tree").mkdir()
    (outside / "tree" / "secret2").write_bytes(b"outside")
    real = str(drive / "x" / "tree")
    assert [f[0] for f in vfs_tree.walk(real, 4, 10, str(drive))["files"]] == ["f"]
    os.rename(drive / "x", drive / "moved")
    os.symlink(outside, drive / "x")   # the checked path now leads outside through x
    with pytest.raises(OSError) as e:
        vfs_tree.walk(real, 4, 10, str(drive))
    assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)
    with pytest.raises(vfs_tree.TreeError):
        vfs_tree.walk(str(outside / "tree"), 4, 10, str(drive))   # not beneath the drive at all


def test_read_dir_of_the_root(vfs):
    """ReadDir of `/` lists the packages' folders, to a holder of the root cap only (kinode v0.9.5
    kinode/src/vfs.rs lines 297-340)."""
    ok(vfs, P, DRIVE + "/f", "Write", b"x")
    assert err(vfs, P, "/", "ReadDir") == {"NoCap": {"action": "ReadDir", "path": "/"}}
    body, _ = ok(vfs, P, "/", "ReadDir", has_cap=lambda params: params == {"root": True})
    assert {"path": str(P.package_id), "file_type": "Directory"} in body["ReadDir"]
