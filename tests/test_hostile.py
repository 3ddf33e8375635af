"""Hostile input, access rules and faults: the node holds, loses nothing, lets no one in."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TEST_PACKAGES, no_workers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    # a name that cannot be a node's (a typo, a comma list) is refused, the rule left as it was
    for bad in ("Fake.dev", "fake.dev,fake3.dev", "fake..dev"):
        code, lines = fake2.run(f"allow:file_transfer:template.os {bad}")
        assert code == 1 and any(f"node name {bad!r} may hold only lowercase letters" in ln for ln in lines), lines
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
def _userns_tmpfs_works() -> str:
    """'' if this machine lets us mount a tmpfs in a user namespace of our own (as root or not)."""
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, timeout=30)
    except FileNotFoundError:
        return "unshare is not installed"
    return done.stderr.decode().strip() if done.returncode else ""


def test_a_full_disk_fails_the_download_clearly_and_the_partial_resumes_when_space_returns(node_factory, request):
    """fake.dev runs in its own user and mount namespace whose `files` drive is a 48 MiB tmpfs, a
    24 MiB file already on it: a real ENOSPC (not a monkeypatch; the VFS unit tests have those)."""
    fake = node_factory("fake.dev", start=False)
    fake.files.mkdir(parents=True)
    problem = _userns_tmpfs_works()
    if not problem:
        fake.wrap = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                     'mount -t tmpfs -o size=48m tmpfs "$0" && exec "$@"', str(fake.files)]
    else:  # (a container that forbids user namespaces may still let root mount)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(fake.files)],
                                 capture_output=True)
        if mounted.returncode:
            pytest.skip(f"cannot mount a tmpfs, in a user namespace ({problem}) or not "
                        f"({mounted.stderr.decode().strip()})")
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(fake.files)]))
    fake.start()
    fake2 = node_factory("fake2.dev")
    drive = Path(f"/proc/{fake.proc.pid}/root") / str(fake.files).lstrip("/")  # the drive as the node sees it
    assert os.statvfs(drive).f_blocks * os.statvfs(drive).f_frsize == 48 << 20  # (the control: it is the tmpfs)
    (drive / "ballast.bin").write_bytes(b"\xaa" * (24 << 20))  # 24 MiB left: full part way through 40 MiB
    fake2.files.mkdir(parents=True, exist_ok=True)
    data = os.urandom(40 << 20)
    (fake2.files / "huge.bin").write_bytes(data)
    (fake2.files / "small.txt").write_text("fits\n")
    code, lines = fake.run("download:file_transfer:template.os huge.bin fake2.dev",
                           until=r"huge\.bin downloaded|error:", timeout=60)
    # (a 4 MiB chunk is written behind: its failure is reported by the next operation on the file)
    assert code == 1 and re.fullmatch(
        r"file_transfer:template\.os: error: download of huge\.bin from fake2\.dev failed: "
        r"/file_transfer:template\.os/files/\.partial/fake2\.dev/huge\.bin\.part: IOError: (an earlier write failed: )?"
        r"no space left on device: file_transfer:template\.os/files/\.partial/fake2\.dev/huge\.bin\.part "
        r"\(run the download again to resume\)", lines[-1]), lines
    assert not (drive / "huge.bin").exists()  # nothing under the real name
    part = drive / ".partial" / "fake2.dev" / "huge.bin.part"
    held = json.loads((drive / ".partial" / "fake2.dev" / "huge.bin.state").read_text())["verified"]
    # the resume point counts only bytes on disk (the chunk whose write failed is not among them)
    assert 0 < held <= part.stat().st_size < len(data) and part.read_bytes()[:held] == data[:held]
    # the node keeps working: a file that fits arrives
    code, lines = fake.run("download:file_transfer:template.os small.txt fake2.dev",
                           until=r"small\.txt downloaded|error:", timeout=30)
    assert code == 0 and (drive / "small.txt").read_text() == "fits\n", lines
    # space returns: the download resumes where it stopped and completes
    (drive / "ballast.bin").unlink()
    code, lines = fake.run("download:file_transfer:template.os huge.bin fake2.dev",
                           until=r"huge\.bin downloaded|error:", timeout=60)
    assert code == 0 and f"file_transfer:template.os: huge.bin: resuming at {held} of {len(data)} bytes" in lines, lines
    assert (drive / "huge.bin").read_bytes() == data
    assert not part.exists()


def test_a_full_disk_at_start_is_a_clear_error_and_the_node_starts_once_there_is_room(node_factory, tmp_path):
    """The home is a 256 KiB tmpfs (in a user and mount namespace of the node's own), filled before the
    node starts: it exits 1 with one line naming the cause, the places and the fix, no traceback."""
    problem = _userns_tmpfs_works()
    if problem:
        pytest.skip(f"cannot mount a tmpfs in a user namespace ({problem})")

    empty = tmp_path / "no-packages"   # the files drive would be inside the node's namespace, out of sight
    empty.mkdir()

    def node(ballast: bool):
        fill = 'head -c 262144 /dev/zero > "$0/ballast" 2>/dev/null; ' if ballast else ""
        n = node_factory("fake.dev", start=False, extra_args=["--packages", str(empty)])
        n.home.mkdir(parents=True, exist_ok=True)
        n.wrap = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                  f'mount -t tmpfs -o size=256k,mode=700 tmpfs "$0" && {fill}exec "$@"', str(n.home)]
        return n
    full = node(ballast=True)
    with pytest.raises(RuntimeError) as info:
        full.start(timeout=60)
    out = str(info.value)
    assert (f"error: fake.dev could not start: the disk is full (home {full.home}, directory "
            f"{full.env['KINODE_DIRECTORY']}); free some space and start it again") in out, out
    assert "Traceback" not in out and full.proc.returncode == 1, out
    # the control: the same tmpfs with room, and the node starts (its control socket is in the home,
    # inside the node's mount namespace: the ready line is what this side can see)
    roomy = node(ballast=False)
    roomy.start()
    assert roomy.proc.poll() is None and any("fake.dev: ready in" in ln for ln in roomy.lines), roomy.lines


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
    no_workers(fake, within=30)


def test_a_chunk_from_a_stranger_is_ignored_and_the_true_one_completes(node_factory):
    """The liar's child, which never sent Size, sends a chunk (of other bytes, hashed correctly)
    before the provider's own: the worker ignores it, says so, and saves only the provider's bytes."""
    fake = node_factory("fake.dev")
    node_factory("liar.dev", extra_args=["--packages", str(REPO / "tests" / "liar")])
    code, lines = fake.run("download:file_transfer:template.os stranger liar.dev",
                           until=r"stranger downloaded|error:", timeout=30)
    assert code == 0, lines
    assert (fake.files / "stranger").read_bytes() == b"x" * 1000
    ignored = [ln for ln in fake.lines if "ignored a bad message" in ln]
    assert len(ignored) == 1, fake.lines[-20:]
    assert re.search(r"worker: ignored a bad message from liar\.dev@\d+:file_transfer:template\.os: "
                     r"a Chunk not from this transfer's provider", ignored[0]), ignored
    no_workers(fake, within=30)
