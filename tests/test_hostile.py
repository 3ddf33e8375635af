"""Hostile input, access rules and faults: the node holds, loses nothing, lets no one in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, TEST_PACKAGES

sys.path.insert(0, str(REPO / "components" / "file_transfer" / "common"))
from ft_common import check_name  # noqa: E402  (the guest's own name rule, plain Python)

WITH_TESTS = ["--packages", str(REPO / "components"), "--packages", str(TEST_PACKAGES)]


# ---- the file-name rule, as property tests -------------------------------------------------------
@settings(max_examples=2000, deadline=None)
@given(st.text(min_size=0, max_size=300))
def test_an_accepted_name_always_stays_inside_its_folder(name):
    if check_name(name) == "":
        base = "/drive/files"
        joined = os.path.normpath(os.path.join(base, name))
        assert os.path.dirname(joined) == base, name
        assert name == os.path.basename(name) and not name.startswith(".")
        assert not any(ord(c) < 32 or ord(c) == 127 for c in name)
        assert len(name.encode("utf-8", "surrogatepass")) <= 255


@given(st.sampled_from(["..", "../../etc/passwd", "/etc/passwd", "a/../../b", "a\\b", "x\x00y", "x\x1b[31m",
                        "bell\x07", ".hidden", "", "a" * 4096, "nl\nname", "\ud800"]))
def test_known_hostile_names_are_refused(name):
    assert check_name(name) != ""


# ---- who may download ----------------------------------------------------------------------------
def test_allow_list_refuses_other_nodes_and_survives_a_restart(node_factory):
    fake, fake2, fake3 = node_factory("fake.dev"), node_factory("fake2.dev"), node_factory("fake3.dev")
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / "shared.txt").write_text("for fake only\n")
    code, lines = fake2.run("allow:file_transfer:template.os fake.dev")
    assert code == 0 and any("may be listed and downloaded by: fake.dev" in ln for ln in lines), lines
    for node in (fake2,):
        node.stop()
        node.start()
    code, lines = fake3.run("list_files:file_transfer:template.os fake2.dev")
    assert code == 1 and any("not allowed: fake2.dev does not share files with fake3.dev" in ln for ln in lines), lines
    code, lines = fake3.run("download:file_transfer:template.os shared.txt fake2.dev", until=r"error:", timeout=30)
    assert code == 1 and any("not allowed" in ln for ln in lines), lines
    assert not (fake3.files / "shared.txt").exists()
    assert any("refused ListFiles from fake3.dev" in ln for ln in fake2.lines)
    assert any("refused Download of shared.txt from fake3.dev" in ln for ln in fake2.lines)
    code, lines = fake.run("download:file_transfer:template.os shared.txt fake2.dev",
                           until=r"shared\.txt downloaded|error:", timeout=30)
    assert code == 0, lines
    assert (fake.files / "shared.txt").read_text() == "for fake only\n"
    code, lines = fake2.run("allow:file_transfer:template.os *")
    assert any("by: everyone" in ln for ln in lines), lines
    assert fake3.run("list_files:file_transfer:template.os fake2.dev")[0] == 0


# ---- capabilities ----------------------------------------------------------------------------------
def test_unsolicited_remote_request_to_a_private_process_is_dropped(node_factory):
    fake = node_factory("fake.dev", extra_args=WITH_TESTS)
    fake2 = node_factory("fake2.dev", extra_args=WITH_TESTS)
    fake2.expect(r"quiet begin", 20) if not any("quiet begin" in ln for ln in fake2.lines) else None
    fake.type('m fake2.dev@quiet:misbehave:test.os "hello"')
    time.sleep(1.5)
    assert not any("quiet got a message" in ln for ln in fake2.lines), fake2.lines[-5:]


def test_a_process_cannot_message_a_private_process_it_holds_no_capability_for(node_factory):
    fake = node_factory("fake.dev", extra_args=WITH_TESTS)
    fake.type('m fake.dev@misbehave:misbehave:test.os "poke"')
    fake.expect(r"^error: misbehave:misbehave:test.os may not message quiet:misbehave:test.os", 10)
    fake.expect(r"send error timeout .*context b'poke'", 10)  # Kinode: a refused send is a timeout
    assert not any("quiet got a message" in ln for ln in fake.lines)


# ---- symlinks and escapes in the files drive ------------------------------------------------------
def test_symlink_in_the_files_drive_is_neither_listed_nor_served(two_nodes, tmp_path):
    fake, fake2 = two_nodes
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / "link.txt").symlink_to(secret)
    (fake2.files / "real.txt").write_text("fine\n")
    code, lines = fake.run("list_files:file_transfer:template.os fake2.dev")
    assert code == 0 and not any("link.txt" in ln for ln in lines), lines
    code, lines = fake.run("download:file_transfer:template.os link.txt fake2.dev", until=r"error:", timeout=30)
    assert code == 1 and any("no such file: link.txt" in ln for ln in lines), lines
    assert not (fake.files / "link.txt").exists()
    assert secret.read_text() == "top secret\n"


# ---- malformed bodies ------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                           | st.text(max_size=20), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.sampled_from(["Download", "Progress", "ListFiles", "Chunk", "Size",
                                                              "name", "target", "is_requestor", "progress"]), c,
                                             max_size=3), max_leaves=8)


def test_random_bodies_to_file_transfer_never_stop_it(node_factory):
    node = node_factory("fake.dev")
    node.files.mkdir(parents=True, exist_ok=True)
    (node.files / "keep.txt").write_text("kept\n")
    bodies = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(json_values)
    def collect(value):
        bodies.append(json.dumps(value))
    collect()
    bodies += ["{", "\u0000", "[[[[[[[[[[", '{"Download": {"name": "x", "target": 5, "is_requestor": true}}']
    for body in bodies:
        node.type(f"m fake.dev@file_transfer:file_transfer:template.os {body}")
    # (the run may also show the refusals of the last bodies, so only its listing is checked)
    _, lines = node.run("list_files:file_transfer:template.os fake.dev", timeout=30)
    assert "file_transfer:template.os: keep.txt\t\t5" in lines, lines
    assert "file_transfer:file_transfer:template.os" in node.processes()
    assert not any("crashed" in ln or "trapped" in ln for ln in node.lines)


# ---- a full disk -------------------------------------------------------------------------------------
@pytest.fixture
def small_files_drive(tmp_path):
    """fake.dev's home whose file_transfer `files` drive is a 24 MB filesystem."""
    home = tmp_path / "fake.dev"
    mnt = home / "vfs" / "file_transfer:template.os" / "files"
    mnt.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield home
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_full_disk_fails_the_download_clearly_and_keeps_the_node(node_factory, small_files_drive):
    fake = node_factory("fake.dev", home=small_files_drive)
    fake2 = node_factory("fake2.dev")
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / "huge.bin").write_bytes(os.urandom(40 << 20))
    (fake2.files / "small.txt").write_text("fits\n")
    code, lines = fake.run("download:file_transfer:template.os huge.bin fake2.dev",
                           until=r"huge\.bin downloaded|error:", timeout=60)
    assert code == 1 and any("no space left on device" in ln.lower() for ln in lines), lines
    assert not (fake.files / "huge.bin").exists()
    # the partial is removed or kept for resume, but never under the real name; the node keeps working
    for p in (fake.files / ".partial").rglob("*.part"):
        p.unlink()
    code, lines = fake.run("download:file_transfer:template.os small.txt fake2.dev",
                           until=r"small\.txt downloaded|error:", timeout=30)
    assert code == 0, lines
    assert (fake.files / "small.txt").read_text() == "fits\n"


# ---- SIGKILL and restart ----------------------------------------------------------------------------
def test_sigkill_and_restart_keeps_files_identity_and_state(node_factory):
    node = node_factory("fake.dev")
    node.files.mkdir(parents=True, exist_ok=True)
    (node.files / "a.txt").write_text("A\n")
    node.run("allow:file_transfer:template.os someone.dev")
    key = (node.home / ".keys" / "networking.key").read_bytes()
    node.kill()
    node.start()
    assert (node.home / ".keys" / "networking.key").read_bytes() == key
    assert (node.files / "a.txt").read_text() == "A\n"
    code, lines = node.run("allow:file_transfer:template.os")
    assert any("by: someone.dev" in ln for ln in lines), lines


# ---- a provider that lies ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, why, verified", [
    ("size-lies", "does not fit the file", b""),
    ("length-lies", "does not fit the file", b""),
    ("bad-offset", "chunk at offset 1000, expected 0", b""),
    ("bad-hash", "chunk at offset 0 failed its integrity check", b""),
    ("no-hash", "chunk at offset 0 failed its integrity check", b""),
    ("chunk-hash-only", "chunk at offset 1000 failed its integrity check", b"x" * 1000),
    ("bad-final", "does not match the provider's hash", b""),
    ("garbled-final", "malformed file hash", b""),
])
def test_a_lying_provider_fails_the_download_and_leaves_nothing(node_factory, name, why, verified):
    fake = node_factory("fake.dev")
    node_factory("liar.dev", extra_args=["--packages", str(REPO / "tests" / "liar")])
    code, lines = fake.run(f"download:file_transfer:template.os {name} liar.dev", until=r"error:", timeout=30)
    assert code == 1 and any(why in ln for ln in lines), lines
    assert not (fake.files / name).exists()
    # a bad chunk is never written: a partial kept for resuming holds only verified bytes
    assert all(p.read_bytes() in (b"", verified) for p in (fake.files / ".partial").rglob("*.part"))
    time.sleep(0.5)
    assert [p for p in fake.processes() if p.split(":")[0].isdigit()] == []
