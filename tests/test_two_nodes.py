"""Two real nodes on this machine: the seed's Example Usage and what can go wrong around it."""
from __future__ import annotations

import os
import re
import socket
import time

import pytest
from conftest import no_workers, sha256, stop_mid_transfer


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
    assert "file_transfer:template.os: error: download of my_file.txt from gone.dev failed: gone.dev is offline" \
        in lines, lines
    assert time.monotonic() - t0 < 15  # at once, not after the 10 s handshake or 60 s stall timeouts (slack: a busy box)
    no_workers(fake)
    assert not (fake.files / "my_file.txt").exists()
    assert list(fake.files.rglob("*")) == []  # no partial, no state, not even the partials' folder


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
    no_workers(fake, fake2)


def test_empty_file_completes(two_nodes):
    fake, fake2 = two_nodes
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / "empty.txt").write_bytes(b"")
    code, lines = fake.run("download:file_transfer:template.os empty.txt fake2.dev",
                           until=r"empty\.txt downloaded|error:", timeout=30)
    assert code == 0, lines
    assert (fake.files / "empty.txt").read_bytes() == b""
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


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True if the other side closes `sock` (EOF or reset) within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_garbage_on_the_port_is_dropped_and_the_node_keeps_serving(two_nodes):
    fake, fake2 = two_nodes
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / "ok.txt").write_text("still here\n")
    assert fake.run("list_files:file_transfer:template.os fake2.dev")[0] == 0  # the control: served before
    # each payload, and why the node must drop it (its handshake timeout is 5 s)
    cases = [
        (b"\x00\x05hello", "bad handshake"),                             # a Noise message too short to be one
        (b"\x00\x20" + b"half a handshake", "handshake timed out"),       # half a frame, then silence
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad handshake (handshake message of 18245 bytes (limit 4096))"),
    ]
    for payload, reason in cases:
        with socket.create_connection(("127.0.0.1", fake2.net_port), timeout=5) as s:
            port = s.getsockname()[1]
            s.sendall(payload)
            t0 = time.monotonic()
            assert _closed_by_peer(s, within=60), (payload, "not dropped")
            took = time.monotonic() - t0
        line = fake2.expect(rf"dropping unauthenticated connection from 127\.0\.0\.1:{port}\b", 10)
        assert reason in line, (payload, line)
        if reason == "handshake timed out":
            assert took >= 4.5, took  # kept until the timeout, not before
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
    # incoming, the positive control first: a remote request to fake2's pinger (public, networked)
    # arrives and is acted on (it pings fake.dev back and reports)
    fake.type("m fake2.dev@pinger:misbehave:test.os ping fake.dev 1")
    fake2.expect(r"misbehave:test.os: pinged 1: 1 answered, 0 failed", 20)
    # the same path to misbehave, which has no network capability: fake2 drops it and says so
    fake.type('m fake2.dev@misbehave:misbehave:test.os "ping"')
    fake2.expect(r"misbehave:misbehave:test.os has no network capability: request from "
                 r"fake\.dev@terminal:terminal:sys dropped", 20)
    fake2.type('m fake2.dev@misbehave:misbehave:test.os "ping"')  # misbehave itself answers a local ping
    fake2.expect(r"misbehave:test.os: pong", 10)
    assert sum("pong" in ln for ln in fake2.lines) == 1, fake2.lines[-20:]


def test_peer_restart_is_redialled(two_nodes):
    fake, fake2 = two_nodes
    assert fake.run("list_files:file_transfer:template.os fake2.dev")[0] == 0
    fake2.stop()
    code, lines = fake.run("list_files:file_transfer:template.os fake2.dev", timeout=20)
    assert code == 1 and any("fake2.dev did not answer" in ln for ln in lines), lines
    fake2.start()
    code, lines = fake.run("list_files:file_transfer:template.os fake2.dev", timeout=20)
    assert code == 0, lines


def test_provider_vanishing_mid_transfer_fails_clearly_and_node_keeps_running(held_nodes):
    fake, fake2 = held_nodes
    fake2.files.mkdir(parents=True, exist_ok=True)
    size = 40 << 20
    (fake2.files / "big.bin").write_bytes(os.urandom(size))
    stop_mid_transfer(fake, fake2, "big.bin", size)  # held part way: the provider holds
    fake2.kill()
    line = fake.expect(r"error: download of big\.bin from fake2\.dev failed", 90)
    assert line.endswith("failed: fake2.dev went offline during the transfer (run the download again to resume)"), line
    assert not (fake.files / "big.bin").exists()
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


def test_a_typed_decomposed_name_fetches_the_file_and_a_disguised_one_is_refused(two_nodes):
    """`cafe\u0301.txt` typed (NFD) is the provider's `caf\u00e9.txt` (NFC); a bidi override is refused
    before anything is asked."""
    fake, fake2 = two_nodes
    (fake2.files / "caf\u00e9.txt").write_text("one spelling\n")
    code, lines = fake.run("download:file_transfer:template.os cafe\u0301.txt fake2.dev",
                           until=r"downloaded|error:")
    assert code == 0 and not any("error:" in ln for ln in lines), lines
    assert (fake.files / "caf\u00e9.txt").read_text() == "one spelling\n"
    assert not (fake.files / "cafe\u0301.txt").exists() or (fake.files / "cafe\u0301.txt").samefile(fake.files / "caf\u00e9.txt")
    code, lines = fake.run("download:file_transfer:template.os invoice\u202etxt.exe fake2.dev", until=r"error|U\+202E")
    assert any("U+202E" in ln for ln in lines), lines
