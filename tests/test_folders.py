"""Folders: one download moves a whole tree (nested and empty folders), verified file by file,
resumable, cancellable, refusing hostile names, symlinks and trees beyond the limits; a folder
that changes while being sent fails cleanly. Real nodes, real files, bytes compared."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, no_workers, paused, rearm, release, wait_for

sys.path.insert(0, str(REPO / "components" / "file_transfer" / "common"))
import ft_folder  # noqa: E402  (the guest's own manifest check, plain Python)
from ft_common import BATCH_BYTES, MAX_FOLDER_DEPTH, MAX_FOLDER_ENTRIES  # noqa: E402

PEER = "fake2.dev"


def tree(root: Path) -> dict:
    """Every folder and regular file beneath `root`: {relative path: bytes, or None for a folder}."""
    found = {}
    for top, dirs, files in os.walk(root):
        for d in dirs:
            p = Path(top, d)
            if not p.is_symlink():
                found[str(p.relative_to(root))] = None
        for f in files:
            p = Path(top, f)
            if not p.is_symlink():
                found[str(p.relative_to(root))] = p.read_bytes()
    return found


def with_parents(spec: dict) -> dict:
    """spec plus every folder its paths imply (as tree() reports them)."""
    out = dict(spec)
    for rel in spec:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            out.setdefault("/".join(parts[:i]), None)
    return out


def make_files(root: Path, spec: dict) -> None:
    """spec: relative path -> bytes (a file) or None (a folder)."""
    for rel, data in spec.items():
        p = root / rel
        if data is None:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


def fetch(node, name: str, timeout: float = 120) -> list[str]:
    code, lines = node.run(f"download:file_transfer:template.os {name} {PEER}",
                           until=rf"{re.escape(name)} downloaded|error:", timeout=timeout)
    assert code == 0, lines
    return lines


def tree_state(node, name: str):
    try:
        return json.loads((node.files / ".partial" / PEER / f"{name}.tree-state").read_text())
    except (FileNotFoundError, ValueError):
        return None


def big_folder(node, name: str) -> dict:
    """Two big files first (in manifest order), then small ones: a transfer held in the second has
    one file done and one part done."""
    spec = {"a1.bin": os.urandom(A1), "a2.bin": os.urandom(20 << 20), "empty": None}
    spec.update({f"s/{i:03}.txt": os.urandom(3000) for i in range(30)})
    make_files(node.files / name, spec)
    return spec


A1 = 12 << 20           # big_folder's first file: three batches
HELD_BATCHES = 5        # a provider started with pause_after=HELD_BATCHES holds two batches into a2.bin


@pytest.fixture
def held_nodes(node_factory):
    return node_factory("fake.dev"), node_factory(PEER, pause_after=HELD_BATCHES)


def hold_in_second_file(fake, fake2, name: str) -> dict:
    """Start downloading `name` from fake2 (held after HELD_BATCHES batches) and wait until the
    requestor has written every batch sent: the first file and a piece of the second; return the
    requestor's saved point."""
    fake.type(f"download:file_transfer:template.os {name} {PEER}")
    paused(fake2)
    want = HELD_BATCHES * BATCH_BYTES - A1

    def held():
        saved = tree_state(fake, name) or {}
        return saved if (saved.get("index"), saved.get("offset")) == (1, want) else None
    return wait_for(held, 60, "the batches sent written", every=0.05)


def test_folder_download_with_nested_and_empty_folders_and_listing(two_nodes, tmp_path):
    fake, fake2 = two_nodes
    spec = {
        "a.txt": b"hello folder\n", "zero.txt": b"", "empty": None, "sub/emptier": None,
        "sub/b.bin": os.urandom(300_000), "sub/deeper/c.bin": os.urandom(9 << 20),  # c.bin: three pieces
        "sub/deeper/d.txt": b"d" * 5000,
    }
    make_files(fake2.files / "photos", spec)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not to be served")
    os.symlink(outside / "secret.txt", fake2.files / "photos" / "link.txt")     # a file symlink
    os.symlink(outside, fake2.files / "photos" / "sub" / "linkdir")              # a folder symlink
    (fake2.files / "single.txt").write_bytes(b"one file")

    code, lines = fake.run(f"list_files:file_transfer:template.os {PEER}", wait=1.0)
    text = "\n".join(lines)
    assert code == 0 and f"photos/\t\t{sum(len(v) for v in spec.values() if v)}\t(5 files)" in text, text
    assert "single.txt\t\t8" in text, text
    code, lines = fake.run(f"list_files:file_transfer:template.os {PEER} photos/sub", wait=1.0)
    text = "\n".join(lines)
    assert code == 0 and "in photos/sub:" in text and "b.bin\t\t300000" in text and f"deeper/\t\t{(9 << 20) + 5000}\t(2 files)" in text and "emptier/\t\t0\t(0 files)" in text, text

    for bad, why in (("../etc", "may not start with '.'"), ("nothere", f"error: {PEER}: no such folder: nothere"),
                     ("single.txt", f"error: {PEER}: cannot list it (")):
        code, lines = fake.run(f"list_files:file_transfer:template.os {PEER} {bad}", wait=1.0)
        assert code == 1 and any(why in ln for ln in lines), lines
    # a typo in a folder's name is the asker's: the provider does not log it as a bad message
    assert not any("bad message" in ln for ln in fake2.lines), fake2.lines[-5:]

    lines = fetch(fake, "photos")
    done = [ln for ln in lines if "photos downloaded" in ln]
    assert done and "folder of 5 files" in done[0] and "every file verified" in done[0], lines
    got = tree(fake.files / "photos")
    assert got == with_parents(spec)  # every file's bytes, the empty folders, and no symlink nor what it points at
    assert not any(p.is_symlink() for p in (fake.files / "photos").rglob("*"))
    assert not (fake.files / ".partial" / PEER / "photos.tree").exists()
    assert not (fake.files / ".partial" / PEER / "photos.tree-state").exists()
    assert fake2.lines and any("not sending 2 symlink(s)" in ln for ln in fake2.lines), fake2.lines[-10:]

    # again, named as list_files shows it (`photos/`): the older copy is replaced only by a complete new one
    (fake2.files / "photos" / "a.txt").write_bytes(b"changed\n")
    code, lines = fake.run(f"download:file_transfer:template.os photos/ {PEER}",
                           until=r"photos downloaded|error:", timeout=120)
    assert code == 0 and any("photos downloaded" in ln for ln in lines), lines
    assert (fake.files / "photos" / "a.txt").read_bytes() == b"changed\n"
    # a single file still downloads as before
    fetch(fake, "single.txt")
    assert (fake.files / "single.txt").read_bytes() == b"one file"

    # a requestor that did not ask for folders (a plain peer) is refused a folder, served a file
    target = json.dumps({"node": "fake.dev", "process": {"process_name": "file_transfer", "package_name":
                                                         "file_transfer", "publisher_node": "template.os"}})
    fake.type('m -a 5 fake2.dev@file_transfer:file_transfer:template.os '
              '{"Download": {"name": "photos", "target": %s, "is_requestor": false}}'.replace("%s", target))
    fake.expect(r'no such file: photos', 20)
    no_workers(fake, fake2, within=20)


@pytest.mark.parametrize("victim", ["provider", "requestor"])
def test_folder_resumes_after_a_node_is_killed(held_nodes, victim):
    fake, fake2 = held_nodes
    spec = big_folder(fake2, "data")
    held = hold_in_second_file(fake, fake2, "data")  # a1 done, a2 part done
    first = fake.files / ".partial" / PEER / "data.tree" / "a1.bin"
    first_inode = first.stat().st_ino
    if victim == "provider":
        fake2.kill()
        fake.expect(r"error: download of data from fake2\.dev failed: fake2\.dev went offline during the transfer "
                    r"\(run the download again to resume\)$", 30)
        release(fake2)  # the resumed transfer is not held
        fake2.start()
    else:
        fake.kill()
        release(fake2)
        fake.start()
    saved = tree_state(fake, "data")
    assert saved["index"] == 1 and saved["offset"] >= held["offset"], (saved, held)
    assert not (fake.files / "data").exists()  # never a partial tree under the real name
    lines = fetch(fake, "data")
    resumed = [ln for ln in lines if "data: resuming at file 2 of 32" in ln]
    assert resumed and f"({A1 + saved['offset']} of " in resumed[0], lines
    assert tree(fake.files / "data") == with_parents(spec)
    assert (fake.files / "data" / "a1.bin").stat().st_ino == first_inode  # the file done was not fetched again
    no_workers(fake, fake2, within=30)


def test_folder_cancel_then_download_again(held_nodes):
    fake, fake2 = held_nodes
    spec = big_folder(fake2, "data")
    hold_in_second_file(fake, fake2, "data")
    try:
        code, lines = fake.run("transfers:file_transfer:template.os", until="data")
        assert code == 0 and any(re.search(r"data from fake2\.dev: folder, \d+ of 32 files, ", ln) for ln in lines), lines
        code, lines = fake.run("cancel:file_transfer:template.os data fake2.dev")
        assert code == 0, lines
        fake.expect(r"download of data from fake2\.dev cancelled", 30)
    finally:
        release(fake2)
    wait_for(lambda: not (fake.files / ".partial" / PEER / "data.tree").exists(), 10, "the partial tree removed")
    assert not (fake.files / "data").exists() and tree_state(fake, "data") is None
    fetch(fake, "data")  # positive control: the same folder, whole
    assert tree(fake.files / "data") == with_parents(spec)
    no_workers(fake, fake2, within=30)


def test_folder_that_changes_while_being_sent_fails_cleanly(held_nodes):
    """The folder is sent as it was listed: a file added after the listing is not sent; a file
    changed after it fails the transfer and nothing is kept; the next download takes both."""
    fake, fake2 = held_nodes
    spec = big_folder(fake2, "moving")
    # a file added after the listing is not part of this download (which completes)
    fake.type(f"download:file_transfer:template.os moving {PEER}")
    paused(fake2)  # (the listing is taken before any batch is read)
    (fake2.files / "moving" / "s" / "new.txt").write_bytes(b"added later")
    release(fake2)
    fake.expect(r"moving downloaded", 60)
    assert tree(fake.files / "moving") == with_parents(spec)
    spec["s/new.txt"] = b"added later"
    # a file changed after the listing fails the download, and nothing is kept
    rearm(fake2)
    fake.type(f"download:file_transfer:template.os moving {PEER}")
    paused(fake2)  # s/029.txt, in the last batch, is not read yet
    (fake2.files / "moving" / "s" / "029.txt").write_bytes(b"new content")
    release(fake2)
    line = fake.expect(r"moving downloaded|error: download of moving", 60)
    assert re.search(r"error: download of moving from fake2\.dev failed: fake2\.dev: folder moving changed on fake2\.dev "
                     r"during the transfer: s/029\.txt changed since the folder was listed.*; nothing was saved$", line), line
    wait_for(lambda: not (fake.files / ".partial" / PEER / "moving.tree").exists(), 10, "the partial tree removed")
    assert not (fake.files / "moving" / "s" / "new.txt").exists()  # the older copy is kept as it was
    fetch(fake, "moving")
    spec["s/029.txt"] = b"new content"
    assert tree(fake.files / "moving") == with_parents(spec)


def test_hostile_names_symlinks_and_limits_are_refused(two_nodes):
    fake, fake2 = two_nodes
    make_files(fake2.files / "hidden", {"ok.txt": b"ok", "sub/.secret": b"x"})
    make_files(fake2.files / "ctrl", {"ok.txt": b"ok", "bad\nname.txt": b"x"})
    deep = "/".join(["d"] * (MAX_FOLDER_DEPTH + 1))
    make_files(fake2.files / "deep", {deep: None})
    make_files(fake2.files / "good", {"ok.txt": b"ok", "sub/fine.txt": b"fine"})
    os.symlink(fake2.files / "good", fake2.files / "linked")  # the folder itself a symlink
    for name, why in (("hidden", r"'sub/\.secret': file name '\.secret' may not start with '\.'"),
                      ("ctrl", r"bad\\nname\.txt"),
                      ("deep", rf"deeper than {MAX_FOLDER_DEPTH} levels"),
                      ("linked", r"no such file: linked|symlink")):
        code, lines = fake.run(f"download:file_transfer:template.os {name} {PEER}",
                               until=rf"{name} downloaded|error:", timeout=60)
        text = "\n".join(lines)
        assert re.search(rf"error: download of {name} from fake2\.dev failed: .*({why})", text), text
        assert not (fake.files / name).exists()
    fetch(fake, "good")  # positive control
    assert tree(fake.files / "good") == {"ok.txt": b"ok", "sub": None, "sub/fine.txt": b"fine"}
    assert fake.alive() and fake2.alive()
    no_workers(fake, fake2, within=20)


def test_requestor_refuses_a_hostile_listing():
    """The requestor checks the provider's listing itself (a hostile provider may send anything)."""
    good = {"dirs": ["a", "a/b"], "files": [["a/b/x.txt", 3, "s"], ["y", 0, "s"]]}
    assert ft_folder.check_manifest(good) == ""
    for bad, why in (
        ({"dirs": [], "files": [["../x", 1, "s"]]}, "may not start with '.'"),
        ({"dirs": [], "files": [["a/x", 1, "s"]]}, "malformed at 'a/x'"),            # outside a listed folder
        ({"dirs": ["a"], "files": [["a", 1, "s"]]}, "malformed at 'a'"),             # a file and a folder
        ({"dirs": [], "files": [["x", 1, "s"], ["x", 1, "s"]]}, "malformed at 'x'"),  # twice
        ({"dirs": [], "files": [["x\\y", 1, "s"]]}, "x\\\\y"),
        ({"dirs": [], "files": [["x", -1, "s"]]}, "malformed"),
        ({"dirs": ["/".join(["d"] * i) for i in range(1, MAX_FOLDER_DEPTH + 2)], "files": []}, "deeper than"),
        ({"dirs": [f"d{i}" for i in range(MAX_FOLDER_ENTRIES + 1)], "files": []}, "more than"),
    ):
        problem = ft_folder.check_manifest(bad)
        assert why in problem, (bad if len(str(bad)) < 300 else why, problem)


def test_a_folder_of_2000_files(two_nodes):
    fake, fake2 = two_nodes
    spec = {f"d{i % 10}/f{i:04}.txt": os.urandom(1024) for i in range(2000)}
    make_files(fake2.files / "many", spec)
    start = time.monotonic()
    lines = fetch(fake, "many", timeout=120)
    took = time.monotonic() - start
    assert any("folder of 2000 files" in ln for ln in lines), lines
    got = tree(fake.files / "many")
    assert {k: v for k, v in got.items() if v is not None} == spec
    assert took < 60, took  # generous: one transfer, not 2,000


def test_a_folder_whose_listing_is_over_2_mib(two_nodes):
    """A listing (and a tree's folders) too big to cross into Wasm as one message body still goes:
    16,000 files with long names and 2,500 empty folders (the listing is about 2.4 MB)."""
    fake, fake2 = two_nodes
    root = fake2.files / "wide"
    names = [f"d{i % 10}/{'n' * 60}{i:05}.txt" for i in range(16000)]
    for d in range(10):
        (root / f"d{d}").mkdir(parents=True)
    for n in names:
        (root / n).touch()
    for e in range(2500):
        (root / "empty" / f"e{e:04}").mkdir(parents=True)
    lines = fetch(fake, "wide", timeout=120)
    assert any("folder of 16000 files" in ln for ln in lines), lines
    got = tree(fake.files / "wide")
    assert len(got) == 16000 + 10 + 1 + 2500
    assert all(got[n] == b"" for n in names) and got["empty/e2499"] is None


def test_a_full_disk_fails_a_folder_download_and_nothing_takes_its_name(node_factory, request):
    """The requestor's drive is an 8 MiB tmpfs with 6 MiB taken: the folder's one (last) batch of
    3 MiB is written behind and fails with a real ENOSPC. The failure is reported, the partial tree
    never takes the real name; with space back, the same download completes (the control)."""
    from test_hostile import _userns_tmpfs_works
    fake = node_factory("fake.dev", start=False)
    fake.files.mkdir(parents=True)
    problem = _userns_tmpfs_works()
    if not problem:
        fake.wrap = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                     'mount -t tmpfs -o size=8m tmpfs "$0" && exec "$@"', str(fake.files)]
    else:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(fake.files)],
                                 capture_output=True)
        if mounted.returncode:
            pytest.skip(f"cannot mount a tmpfs ({problem}; {mounted.stderr.decode().strip()})")
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(fake.files)]))
    fake.start()
    fake2 = node_factory(PEER)
    drive = Path(f"/proc/{fake.proc.pid}/root") / str(fake.files).lstrip("/")  # the drive as the node sees it
    assert os.statvfs(drive).f_blocks * os.statvfs(drive).f_frsize == 8 << 20  # (it is the tmpfs)
    (drive / "ballast.bin").write_bytes(b"\xaa" * (6 << 20))
    spec = {"a.txt": b"small", "b.bin": os.urandom(3 << 20)}
    make_files(fake2.files / "full", spec)
    code, lines = fake.run(f"download:file_transfer:template.os full {PEER}", until=r"full downloaded|error:",
                           timeout=60)
    assert code == 1 and re.search(r"error: download of full from fake2\.dev failed: .*no space left on device",
                                   lines[-1]), lines
    assert not (drive / "full").exists()  # nothing under the real name
    assert fake.alive()
    (drive / "ballast.bin").unlink()
    code, lines = fake.run(f"download:file_transfer:template.os full {PEER}", until=r"full downloaded|error:",
                           timeout=60)
    assert code == 0, lines
    assert tree(drive / "full") == spec


def _manifest_digest(folder: Path) -> str:
    """The BLAKE3 of the listing the provider sends for `folder` (its resume states name it)."""
    import blake3

    from host.vfs import tree as vfs_tree
    found = vfs_tree.walk(str(folder), MAX_FOLDER_DEPTH, MAX_FOLDER_ENTRIES)
    text = json.dumps({"dirs": found["dirs"], "files": found["files"]}, separators=(",", ":"))
    return blake3.blake3(text.encode("utf-8")).hexdigest()


def test_a_resume_state_the_partial_tree_does_not_bear_out_starts_afresh(two_nodes):
    """A crash between a tree's rename and its state's removal (or a partial tree damaged) left a
    state that does not match the disk: the next download starts afresh and the folder is whole;
    a state the tree bears out is resumed (the control)."""
    fake, fake2 = two_nodes
    spec = {"a.txt": b"a" * 1000, "b.bin": os.urandom(300_000), "empty": None, "sub/c.txt": b"c" * 5000}
    make_files(fake2.files / "kept", spec)
    digest = _manifest_digest(fake2.files / "kept")
    part = fake.files / ".partial" / PEER
    part.mkdir(parents=True)
    state = part / "kept.tree-state"
    partial = part / "kept.tree"

    # the control: file 1 whole in the partial tree, the state says so: resumed at file 2
    make_files(partial, {"a.txt": spec["a.txt"], "empty": None, "sub": None})
    state.write_text(json.dumps({"digest": digest, "index": 1, "offset": 0}))
    inode = (partial / "a.txt").stat().st_ino
    lines = fetch(fake, "kept")
    assert any("kept: resuming at file 2 of 3" in ln for ln in lines), lines
    assert tree(fake.files / "kept") == with_parents(spec)
    assert (fake.files / "kept" / "a.txt").stat().st_ino == inode

    # case A: the folder is complete, its state still says "all done" and no partial tree is left
    state.write_text(json.dumps({"digest": digest, "index": 3, "offset": 0}))
    lines = fetch(fake, "kept")
    assert not any("resuming" in ln for ln in lines), lines
    assert tree(fake.files / "kept") == with_parents(spec)

    # case B: the state says two files done, but the first is missing and the second is short
    make_files(partial, {"b.bin": spec["b.bin"][:10], "empty": None, "sub": None})
    state.write_text(json.dumps({"digest": digest, "index": 2, "offset": 0}))
    fetch(fake, "kept")
    assert tree(fake.files / "kept") == with_parents(spec)
    # ... and a state in the middle of a file the tree holds less of
    make_files(partial, {"a.txt": spec["a.txt"], "b.bin": spec["b.bin"][:10], "empty": None, "sub": None})
    state.write_text(json.dumps({"digest": digest, "index": 1, "offset": 200_000}))
    fetch(fake, "kept")
    assert tree(fake.files / "kept") == with_parents(spec)
    assert not state.exists() and not partial.exists()


def test_a_folder_download_queued_at_a_busy_provider_completes(node_factory):
    """A provider serving MAX_SERVING files queues the next requestor; a folder asked for then is
    told it waits, and is received whole once a slot frees (a queued requestor's Size is a folder's)."""
    from ft_common import EXT_CHUNK_SIZE, MAX_SERVING
    from test_transfers import put, sha
    provider, busy, late = (node_factory("prov.dev", pause_after=1), node_factory("busy.dev"),
                            node_factory("late.dev"))
    spec = {"x.txt": b"x" * 100, "d/y.bin": os.urandom(1 << 20), "d/e": None}
    make_files(provider.files / "pics", spec)
    big = {f"big{i}.bin": put(provider, f"big{i}.bin", EXT_CHUNK_SIZE + (1 << 20)) for i in range(MAX_SERVING)}  # 2 chunks
    busy.type(f"download:file_transfer:template.os {' '.join(big)} prov.dev")
    for _ in big:
        paused(provider)  # every serving slot held, part way
    late.type("download:file_transfer:template.os pics prov.dev")
    line = late.expect(r"pics: queued at", 30)
    assert line == "file_transfer:template.os: pics: queued at prov.dev, position 1", line
    assert not any("downloaded" in ln for ln in busy.lines)
    release(provider)
    late.expect(r"pics downloaded|error:", 120)
    assert tree(late.files / "pics") == with_parents(spec), late.lines[-5:]
    wait_for(lambda: sum("downloaded" in ln for ln in busy.lines) == len(big), 120, "the big files")
    for name, digest in big.items():
        assert sha(busy.files / name) == digest, name
    no_workers(provider, busy, late, within=30)


def test_a_listing_too_big_for_one_message_is_refused_clearly():
    """Sans-I/O: a provider whose listing would not fit in one message tells both sides why; a
    listing that fits is offered (the control)."""
    from types import SimpleNamespace
    target = SimpleNamespace(node="fake.dev")

    def walked(files: list) -> list:
        p = ft_folder.FolderProvider("wide", target, "parent", 0.0)
        p.start()
        return p.walked({"dirs": [], "files": files, "skipped": []}, 0.0)

    small = walked([["a.txt", 1, "1:2:1:4:5"]])
    assert [type(a).__name__ for a in small] == ["SendBlob"]
    long_name = "n" * 240
    actions = walked([[f"{long_name}{i:05}", 1, "64769:123456789:1:1700000000000000000:1700000000000000000"]
                      for i in range(40_000)])
    errors = [a for a in actions if isinstance(a, ft_folder.Send) and a.metadata and a.metadata.get("error")]
    assert errors and "listing is" in errors[0].metadata["error"] and \
        f"more than one message carries ({ft_folder.MAX_LISTING_BYTES})" in errors[0].metadata["error"], actions[:2]
    assert any(type(a).__name__ == "Exit" for a in actions)
    assert not any(type(a).__name__ == "SendBlob" for a in actions)


def test_a_listing_counts_at_most_1000_entries_of_a_folder(two_nodes):
    """ListFiles walks each folder only up to 1000 entries: a bigger one shows "1000+ entries";
    one of exactly 1000 files is counted (the control)."""
    fake, fake2 = two_nodes
    make_files(fake2.files / "thousand", {f"f{i:04}": b"x" for i in range(1000)})
    make_files(fake2.files / "more", {f"f{i:04}": b"x" for i in range(1001)})
    code, lines = fake.run(f"list_files:file_transfer:template.os {PEER}", wait=1.0)
    text = "\n".join(lines)
    assert code == 0 and "thousand/\t\t1000\t(1000 files)" in text, text
    assert "more/\t\t0\t(1000+ entries)" in text, text


# ---- the folder machines on plain CPython, through the one entry `handle(event)` -------------------
def _machines():
    import ft_protocol as ft

    from host.kinode_types import Address
    req_parent = Address.parse("fake.dev@file_transfer:file_transfer:template.os")
    peer_main = Address.parse("fake2.dev@file_transfer:file_transfer:template.os")
    prov_worker = Address.parse("fake2.dev@w2:file_transfer:template.os")
    return ft, req_parent, peer_main, prov_worker


H = "ab" * 32  # a piece's digest: checked where it is read, only its form here
MANIFEST = {"dirs": ["sub"], "files": [["a.bin", 10, "s1"], ["sub/b.bin", 5, "s2"]]}


def _folder_requestor(window=None, saved=None, on_disk=None):
    """A Requestor that took a folder's Size and handed over; its FolderRequestor, with the tree
    prepared (the resume point as `saved` and `on_disk` allow). Returns (machine, PrepareTree, actions)."""
    ft, parent, peer, prov = _machines()
    req = ft.Requestor("trip", peer, parent, 0.0, extended=True)
    req.handle(ft.Start())
    if window:
        assert req.handle(ft.GotRequest(parent, {"Progress": {"name": "trip", "progress": 0}}, {"ft": 1, "window": window},
                                        0.1)) == []
    meta = {"ft": 1, "folder": {"files": 2, "dirs": 1, "bytes": 15}}
    switch, read = req.handle(ft.GotRequest(prov, {"Size": 15}, meta, 0.2, True, 100))
    assert type(switch) is ft.SwitchToFolder and type(read) is ft.ReadManifest
    m = switch.machine
    assert type(m) is ft_folder.FolderRequestor and m.window == window and read.size == 15 and read.wants_answer
    assert m.handle(ft_folder.ManifestRead(read.source, read.size, read.meta, json.dumps(MANIFEST), "d" * 64,
                                           read.wants_answer, 0.3)) == [ft_folder.LoadFolderState()]
    (prepare,) = m.handle(ft_folder.FolderStateLoaded(saved, on_disk, 0.4))
    return m, prepare, m.handle(ft_folder.TreePrepared(0.5))


def test_a_requestor_and_a_provider_hand_a_folder_over_as_an_action():
    ft, parent, peer, prov = _machines()
    # the control: a file's Size keeps the Requestor
    req = ft.Requestor("f.bin", peer, parent, 0.0, extended=True)
    req.handle(ft.Start())
    assert not any(type(a) is ft.SwitchToFolder for a in req.handle(ft.GotRequest(prov, {"Size": 3}, {"ft": 1}, 0.1, True, 0)))
    m, _, _ = _folder_requestor(window=3)  # the folder's: a FolderRequestor with the window the parent gave
    assert m.window == 3
    # the provider: its file turns out to be a folder
    requestor_worker = _addr("fake.dev@w1:file_transfer:template.os")
    p = ft.Provider("trip", requestor_worker, peer, 0.0, extended=True, window=2)
    assert type(p.handle(ft.Start())[-1]) is ft.OpenFile
    switch, walk = p.handle(ft.Opened(None, None, 0.1, folder=True))
    assert type(switch.machine) is ft_folder.FolderProvider and switch.machine.window == 2
    assert switch.machine.target == requestor_worker and walk == ft_folder.WalkTree()
    assert p.handle(ft.Opened(7, "stamp", 0.1)) != [], "the control: a file is sent by the Provider"
    with pytest.raises(TypeError):
        switch.machine.handle(ft.ChunkRead(1, None, 0.2))  # an event it does not take is said, not ignored


def _addr(text):
    from host.kinode_types import Address
    return Address.parse(text)


def test_folder_requestor_receives_a_tree_acks_its_batches_and_finishes():
    ft, parent, peer, prov = _machines()
    m, prepare, actions = _folder_requestor(window=4)
    assert prepare == ft_folder.PrepareTree(True, ["sub"], {"digest": "d" * 64, "index": 0, "offset": 0})
    assert actions[0] == ft.Reply("Progress", {"ft": 1, "resume": [0, 0], "window": 4})
    # one batch: all of a.bin and b.bin, its blob their bytes back to back
    batch = [[0, 0, 10, H], [1, 0, 5, H]]
    (write,) = m.handle(ft.GotRequest(prov, {"Chunk": {"name": "trip", "offset": 0, "length": 15}},
                                      {"ft": 1, "batch": batch}, 1.0, True, 15))
    assert write == ft_folder.WriteBatch([["a.bin", 0, 10, H], ["sub/b.bin", 0, 5, H]],
                                         {"digest": "d" * 64, "index": 2, "offset": 0})
    ack, finish = m.handle(ft_folder.BatchWritten(1.1))
    assert ack == ft.Reply("Progress", {"ft": 1, "ack": 0, "window": 4}) and finish == ft_folder.FinishTree()
    *report, end = m.handle(ft_folder.TreeFinished(True, 1.2))
    assert end == ft.Exit() and report[-1].metadata["done"] and report[-1].metadata["replaced"]
    assert m.state == m.DONE


def test_folder_requestor_resumes_only_where_the_partial_tree_bears_it_out():
    saved = {"digest": "d" * 64, "index": 1, "offset": 2}
    m, prepare, actions = _folder_requestor(saved=saved, on_disk={"a.bin": 10, "sub/b.bin": 2})
    assert not prepare.fresh and prepare.state["index"] == 1 and prepare.state["offset"] == 2
    assert actions[0].metadata["resume"] == [1, 2] and m.done_bytes == 12
    # the partial tree lacks a.bin whole, or the listing changed: start afresh
    for on_disk, digest in (({"a.bin": 9, "sub/b.bin": 2}, "d" * 64), ({"a.bin": 10, "sub/b.bin": 2}, "e" * 64)):
        _, prepare, actions = _folder_requestor(saved=dict(saved, digest=digest), on_disk=on_disk)
        assert prepare.fresh and prepare.state["index"] == 0 and actions[0].metadata["resume"] == [0, 0]


def test_folder_requestor_refuses_a_bad_listing_bad_batches_strangers_and_a_stall():
    ft, parent, peer, prov = _machines()
    from ft_common import STALL_TIMEOUT
    # a listing whose size is not its files' total: refused, nothing kept
    m = ft_folder.FolderRequestor("trip", peer, parent, 0.0)
    actions = m.handle(ft_folder.ManifestRead(prov, 99, {"ft": 1}, json.dumps(MANIFEST), "d" * 64, True, 0.1))
    assert ft_folder.RemoveTree() in actions and actions[-1] == ft.Exit("refused the folder: the folder's size does "
                                                                        "not match its listing")
    chunk = {"Chunk": {"name": "trip", "offset": 0, "length": 10}}
    for batch, blob_len, why in (([[1, 0, 5, H]], 5, "out of order"), ([[0, 0, 10, H]], 9, "does not match"),
                                 ([[0, 0, 10, "xyz"]], 10, "malformed")):
        m, _, _ = _folder_requestor()
        actions = m.handle(ft.GotRequest(prov, chunk, {"ft": 1, "batch": batch}, 1.0, True, blob_len))
        assert why in actions[-1].error and ft_folder.RemoveTree() not in actions, (why, actions)  # kept for a resume
        assert actions[0].target == prov and why in actions[0].metadata["error"]  # the provider is told
    m, _, _ = _folder_requestor()
    stranger = _addr("evil.dev@w9:file_transfer:template.os")
    (log,) = m.handle(ft.GotRequest(stranger, chunk, {"ft": 1, "batch": [[0, 0, 10, H]]}, 1.0, True, 10))
    assert type(log) is ft.Log and "not the peer" in log.text and m.state == m.RECEIVING
    assert m.handle(ft.SendFailed("tick", "timeout", 2.0)) == [ft.Send(prov, {"Progress": {"name": "trip", "progress": 0}},
                                                                        {"ft": 1}, ft.ACK_TIMEOUT, "keepalive"),
                                                                ft.ArmTimer(ft.TICK)]  # the control: alive
    actions = m.handle(ft.SendFailed("tick", "timeout", 1.0 + STALL_TIMEOUT + 1))
    assert actions[-1] == ft.Exit(f"no progress for {STALL_TIMEOUT} s; giving up")
