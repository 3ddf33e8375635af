"""Two real nodes on this machine: the seed's Example Usage and what can go wrong around it."""
from __future__ import annotations

import hashlib
import os
import re
import socket
import time

import pytest

from conftest import no_workers


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_seed_example_usage(two_nodes):
    fake, fake2 = two_nodes
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / "my_file.txt").write_text("hello world\n")  # echo 'hello world' > ...
    code, lines = fake.run("list_files:file_transfer:template.os fake2.dev")
    assert code == 0, lines
    assert "file_transfer:template.os: fake2.dev available files:" in lines
    assert "file_transfer:template.os: my_file.txt\t\t12" in lines
    code, lines = fake.run("download:file_transfer:template.os my_file.txt fake2.dev",
                           until=r"my_file\.txt downloaded|error:")
    assert code == 0, lines
    assert (fake.files / "my_file.txt").read_bytes() == b"hello world\n"
    no_workers(fake, fake2)


def test_50_mib_random_file_arrives_identical(two_nodes):
    fake, fake2 = two_nodes
    fake2.files.mkdir(parents=True, exist_ok=True)
    src = fake2.files / "big.bin"
    src.write_bytes(os.urandom(50 << 20))
    code, lines = fake.run("download:file_transfer:template.os big.bin fake2.dev",
                           until=r"big\.bin downloaded|error:", timeout=120)
    assert code == 0, lines
    assert sha256(fake.files / "big.bin") == sha256(src)
    assert any(re.search(r"big\.bin progress: \d+% \(.* of 50\.0 MiB, .* MiB/s, ETA", ln) for ln in lines), lines
    assert any(re.search(r"big\.bin downloaded from fake2\.dev: 50\.0 MiB in .* s \(.* MiB/s\), blake3 [0-9a-f]{64}", ln)
               for ln in lines), lines


def test_download_from_a_node_that_is_not_running(node_factory):
    fake = node_factory("fake.dev")
    gone = node_factory("gone.dev")
    gone.stop()  # registered in the directory, but not running
    t0 = time.monotonic()
    code, lines = fake.run("download:file_transfer:template.os my_file.txt gone.dev", until=r"error:", timeout=30)
    assert code == 1
    assert any("gone.dev" in ln and "offline" in ln for ln in lines), lines
    assert time.monotonic() - t0 < 15
    time.sleep(0.5)
    no_workers(fake)
    assert not (fake.files / "my_file.txt").exists()
    assert not list((fake.files / ".partial").rglob("*.part")) if (fake.files / ".partial").exists() else True


def test_download_from_an_unknown_node_is_offline_at_once(node_factory):
    fake = node_factory("fake.dev")
    code, lines = fake.run("list_files:file_transfer:template.os nobody.dev", timeout=10)
    assert code == 1
    assert any("nobody.dev did not answer (offline)" in ln for ln in lines), lines


def test_missing_file_is_a_clear_error_and_creates_nothing(two_nodes):
    fake, fake2 = two_nodes
    code, lines = fake.run("download:file_transfer:template.os nothere.txt fake2.dev",
                           until=r"error:", timeout=30)
    assert code == 1
    assert any("no such file: nothere.txt" in ln for ln in lines), lines
    assert not (fake2.files / "nothere.txt").exists()
    assert not (fake.files / "nothere.txt").exists()
    time.sleep(0.5)
    no_workers(fake, fake2)


def test_empty_file_completes(two_nodes):
    fake, fake2 = two_nodes
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / "empty.txt").write_bytes(b"")
    code, lines = fake.run("download:file_transfer:template.os empty.txt fake2.dev",
                           until=r"empty\.txt downloaded|error:", timeout=30)
    assert code == 0, lines
    assert (fake.files / "empty.txt").read_bytes() == b""
    time.sleep(0.5)
    no_workers(fake, fake2)


def test_older_longer_file_is_replaced_not_appended(two_nodes):
    fake, fake2 = two_nodes
    fake.files.mkdir(parents=True, exist_ok=True)
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake.files / "f.txt").write_bytes(b"an older and much longer version of the file\n")
    (fake2.files / "f.txt").write_bytes(b"short\n")
    code, lines = fake.run("download:file_transfer:template.os f.txt fake2.dev", until=r"f\.txt downloaded|error:")
    assert code == 0, lines
    assert (fake.files / "f.txt").read_bytes() == b"short\n"


def test_garbage_on_the_port_is_dropped_and_the_node_keeps_serving(two_nodes):
    fake, fake2 = two_nodes
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / "ok.txt").write_text("still here\n")
    for payload in (os.urandom(5000), b"\x00\x20" + b"half a handshake", (0xFFFF).to_bytes(2, "big") + b"x" * 70000):
        with socket.create_connection(("127.0.0.1", fake2.port), timeout=5) as s:
            try:
                s.sendall(payload)
                s.settimeout(3)
                s.recv(100)
            except OSError:
                pass
    code, lines = fake.run("list_files:file_transfer:template.os fake2.dev")
    assert code == 0, lines
    assert "file_transfer:template.os: ok.txt\t\t11" in lines
    assert fake2.alive()


def test_a_node_claiming_another_nodes_name_is_refused(node_factory, tmp_path):
    real = node_factory("fake2.dev")
    # an impostor with its own key and home cannot take a name whose holder is running
    impostor = node_factory("fake2.dev", start=False, home=tmp_path / "impostor")
    with pytest.raises(RuntimeError, match="fake2.dev"):
        impostor.start(timeout=30)
    assert real.alive()


def test_network_capability_is_enforced_both_ways(node_factory):
    from conftest import REPO, TEST_PACKAGES
    args = ["--packages", str(REPO / "components"), "--packages", str(TEST_PACKAGES)]
    fake = node_factory("fake.dev", extra_args=args)
    fake2 = node_factory("fake2.dev", extra_args=args)
    # outgoing: misbehave did not request networking, so its request is refused at once
    fake.type('m fake.dev@misbehave:misbehave:test.os "remote fake2.dev"')
    fake.expect(r"^error: misbehave:misbehave:test.os has no network capability", 10)
    fake.expect(r"misbehave:test.os: send error timeout .*context b'remote'", 10)  # as Kinode
    # incoming: a remote request to a process without the network capability is dropped
    fake.type('m fake2.dev@misbehave:misbehave:test.os "ping"')
    fake.type('m fake.dev@misbehave:misbehave:test.os "ping"')
    fake.expect(r"misbehave:test.os: pong", 10)
    time.sleep(1)
    assert not any("pong" in ln for ln in fake2.lines)


def test_peer_restart_is_redialled(two_nodes):
    fake, fake2 = two_nodes
    assert fake.run("list_files:file_transfer:template.os fake2.dev")[0] == 0
    fake2.stop()
    code, lines = fake.run("list_files:file_transfer:template.os fake2.dev", timeout=20)
    assert code == 1 and any("fake2.dev did not answer" in ln for ln in lines), lines
    fake2.start()
    code, lines = fake.run("list_files:file_transfer:template.os fake2.dev", timeout=20)
    assert code == 0, lines


def test_provider_vanishing_mid_transfer_fails_clearly_and_node_keeps_running(two_nodes):
    fake, fake2 = two_nodes
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / "big.bin").write_bytes(os.urandom(300 << 20))
    fake.type("download:file_transfer:template.os big.bin fake2.dev")
    fake.expect(r"big\.bin progress: [1-9]", 60)
    fake2.kill()
    line = fake.expect(r"error: download of big\.bin from fake2\.dev failed", 90)
    assert "resume" in line or "offline" in line or "acknowledg" in line or "no progress" in line, line
    assert not (fake.files / "big.bin").exists()
    time.sleep(0.5)
    no_workers(fake)
    assert fake.run("list_files:file_transfer:template.os fake.dev")[0] == 0


def test_an_idle_library_is_not_mistaken_for_a_spinning_guest(node_factory):
    """The worker API library runs only inside start-download calls: a long idle gap between two
    downloads must not count as compute time (it did once: the second call trapped)."""
    fake = node_factory("fake.dev", extra_args=["--compute-limit", "1"])
    fake2 = node_factory("fake2.dev")
    fake2.files.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        (fake2.files / f"f{i}.txt").write_text(f"file {i}\n")
        code, lines = fake.run(f"download:file_transfer:template.os f{i}.txt fake2.dev",
                               until=rf"f{i}\.txt downloaded|error:", timeout=30)
        assert code == 0, lines
        time.sleep(2.5)
    assert not any("trapped" in ln for ln in fake.lines)
