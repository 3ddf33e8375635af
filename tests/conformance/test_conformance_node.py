"""What a guest built against plain `process-v0` sees on a real node (the probe package, built
without the host extension): the `our` alias, the VFS's upstream shapes, SendError kinds, an
awaited request without a timeout, and that the probe imports nothing but Kinode's ABI and WASI."""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile

import pytest
from conftest import REPO

PROBE_PKG = REPO / "tests" / "conformance" / "packages"
PROBE = "probe:probe:test.os"
FIX = json.loads((REPO / "tests" / "conformance" / "fixtures" / "vfs.json").read_text())


@pytest.fixture
def node(node_factory):
    n = node_factory("fake.dev", extra_args=["--packages", str(REPO / "components"),
                                              "--packages", str(PROBE_PKG)])
    if not any("probe:test.os: probe ready" in ln for ln in n.lines):
        n.expect(r"probe:test.os: probe ready", 60)
    return n


def probe_lines(node, what: str, count: int, timeout: float = 30) -> dict:
    """Wait for `count` lines `probe:test.os: WHAT... JSON`; -> {step: parsed JSON}."""
    out = {}
    for _ in range(count):
        line = node.expect(rf"probe:test.os: {re.escape(what)}", timeout)
        m = re.search(rf"probe:test.os: {re.escape(what)}(.*?) (\{{.*\}})$", line)
        assert m, line
        out[m.group(1).strip()] = json.loads(m.group(2))
    return out


def test_our_alias_and_vfs_shapes_from_a_guest(node):
    node.type(f'm our@{PROBE} "ping"')   # the terminal too reads `our` as this node
    assert probe_lines(node, "pong", 1)[""]["source"].startswith("fake.dev@terminal")
    node.type(f'm fake.dev@{PROBE} "vfs"')
    got = probe_lines(node, "vfs ", 10)
    assert got["create-drive"]["source"] == "fake.dev@vfs:distro:sys"    # sent to our@vfs:distro:sys
    assert got["create-drive"]["body"] == "Ok"
    assert sorted(got["read-dir"]["body"]["ReadDir"], key=lambda e: e["path"]) == [
        {"path": "probe:test.os/d/f", "file_type": "File"},
        {"path": "probe:test.os/d/sub", "file_type": "Directory"}]
    assert got["metadata-dir"]["body"]["Metadata"]["file_type"] == "Directory"
    assert got["read"]["body"] == "Read"
    assert got["read"]["blob"] == {"mime": FIX["read_blob_mime"], "bytes": "hello"}
    assert got["hash"]["body"] == {"Hash": list(hashlib.sha256(b"hello").digest())}
    for step in ("read-missing", "open-missing", "create-dir-twice"):
        err = got[step]["body"]["Err"]
        assert list(err) == ["IOError"] and sorted(err["IOError"]) == ["error", "path"], (step, err)
    assert got["no-blob"]["body"] == {"Err": {"BadRequest": {"error": "blob needs to exist for Write"}}}
    assert list(got["other-drive"]["body"]["Err"]) == ["NoCap"]


def test_add_zip_from_a_guest(node):
    drive = node.home / "vfs" / "probe:test.os" / "d"
    drive.mkdir(parents=True, exist_ok=True)
    for name, entries in (("good.zip", {"a.txt": b"A", "sub/b.txt": b"B"}),
                          ("evil.zip", {"fine.txt": b"x", "../../escape.txt": b"evil"})):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for n, data in entries.items():
                z.writestr(n, data)
        (drive / name).write_bytes(buf.getvalue())
    node.type(f'm fake.dev@{PROBE} "addzip good.zip"')
    assert probe_lines(node, "addzip good.zip", 1)[""]["body"] == "Ok"
    assert (drive / "unz" / "a.txt").read_bytes() == b"A"
    assert (drive / "unz" / "sub" / "b.txt").read_bytes() == b"B"
    node.type(f'm fake.dev@{PROBE} "addzip evil.zip"')
    err = probe_lines(node, "addzip evil.zip", 1)[""]["body"]["Err"]
    assert "BadRequest" in err and "zip entry" in err["BadRequest"]["error"]
    assert not (drive / "unz" / "fine.txt").exists()
    assert not list(node.home.rglob("escape.txt"))


def test_send_error_kinds_as_kinode(node):
    node.type(f'm fake.dev@{PROBE} "senderr"')
    got = probe_lines(node, "senderr ", 2)
    # a missing local process: timeout, at once (not after the request's 20 s)
    assert got["missing-local"]["kind"] == "timeout" and got["missing-local"]["seconds"] < 5
    assert got["missing-local"]["target"] == "fake.dev@nosuch:probe:test.os"
    assert got["unknown-node"]["kind"] == "offline" and got["unknown-node"]["seconds"] < 5


def test_await_without_a_timeout_ends_the_process(node):
    node.type(f'm fake.dev@{PROBE} "await-without-timeout"')
    line = node.expect(r"probe:probe:test.os trapped", 20)
    assert "send-and-await-response needs expects-response (a timeout)" in line, line
    node.expect(r"probe:test.os: probe ready", 30)        # on_exit Restart
    assert not any("await-without-timeout {" in ln for ln in node.lines)


def test_a_portable_component_imports_only_kinodes_abi_and_wasi():
    from host.runtime.wasm import Runtime
    from host.settings import runtime_from_environment
    rt = Runtime(runtime_from_environment())
    probe = rt.load_file(PROBE_PKG / "probe" / "pkg" / "probe.wasm")
    allowed = {"kinode:process/standard@0.8.0"}
    assert "kinode:process/standard@0.8.0" in probe.imports
    assert {i for i in probe.imports if not i.startswith("wasi:")} <= allowed, probe.imports
    # the check can fail: an -ext component imports the host's own package
    worker = rt.load_file(REPO / "components" / "file_transfer" / "pkg" / "file_transfer_worker.wasm")
    assert "kinode-py:host-ext/blobs@0.1.0" in worker.imports
    assert not any(i.startswith("kinode:process/blobs") for i in worker.imports)
