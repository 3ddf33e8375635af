"""A second package builds file transfer in through the worker API: courier moves a file between two
nodes into its own drive while file_transfer keeps working beside it."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

from conftest import REPO

COURIER_FILES = "vfs/courier:example.os/files"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_courier_sends_a_file_into_its_own_drive_beside_file_transfer(two_nodes):
    fake, fake2 = two_nodes
    src = fake.home / COURIER_FILES
    src.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(9 << 20)
    (src / "report.pdf").write_bytes(payload)
    fake.files.mkdir(parents=True, exist_ok=True)
    ft_payload = os.urandom(7 << 20)
    (fake.files / "side.bin").write_bytes(ft_payload)
    # file_transfer download from fake, started at the same time as the courier send
    fake2.type("download:file_transfer:template.os side.bin fake.dev")
    code, lines = fake.run("send:courier:example.os fake2.dev report.pdf the quarterly report", timeout=30)
    assert code == 0 and "courier:example.os: offered report.pdf to fake2.dev" in lines, lines
    fake2.expect(r"courier:example.os: report\.pdf from fake\.dev arrived in /courier:example\.os/files", 60)
    fake2.expect(r"side\.bin downloaded from fake\.dev", 60) if not any("side.bin downloaded" in ln for ln in fake2.lines) else None
    got = (fake2.home / COURIER_FILES / "report.pdf").read_bytes()
    assert sha(got) == sha(payload)
    assert not (fake2.files / "report.pdf").exists()  # not in file_transfer's drive
    assert sha((fake2.files / "side.bin").read_bytes()) == sha(ft_payload)
    code, lines = fake2.run("inbox:courier:example.os")
    assert any("report.pdf (9437184 bytes) from fake.dev: 'the quarterly report'" in ln for ln in lines), lines


def test_courier_without_its_library_fails_to_start_naming_the_interface(node_factory, tmp_path):
    pkgs = tmp_path / "pkgs"
    shutil.copytree(REPO / "components" / "courier", pkgs / "courier")
    (pkgs / "courier" / "pkg" / "file_transfer_worker_api.wasm").unlink()
    node = node_factory("fake.dev", extra_args=["--packages", str(pkgs)])
    line = node.expect(r"^error: could not install package courier", 10) if not any(
        "could not install package courier" in ln for ln in node.lines) else next(
        ln for ln in node.lines if "could not install package courier" in ln)
    assert "imports kinode:process/file-transfer-worker@0.8.0" in line, line
    assert "file_transfer_worker_api.wasm is missing" in line, line
    assert "courier:courier:example.os" not in node.processes()


def test_courier_with_no_library_declared_names_the_interface(node_factory, tmp_path):
    pkgs = tmp_path / "pkgs"
    shutil.copytree(REPO / "components" / "courier", pkgs / "courier")
    manifest = pkgs / "courier" / "pkg" / "manifest.json"
    entries = json.loads(manifest.read_text())
    del entries[0]["libraries"]
    manifest.write_text(json.dumps(entries))
    node = node_factory("fake.dev", extra_args=["--packages", str(pkgs)])
    lines = [ln for ln in node.lines if "could not install package courier" in ln]
    assert lines and "which no library linked into its package exports" in lines[0], node.lines
