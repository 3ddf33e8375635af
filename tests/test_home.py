"""A home is private: made 0700, what the node makes in it 0600/0700 (and still served to peers); a
home, vfs/ or .keys/ another user owns or others may write is refused at start with the path, its
mode and owner and the fix. As root, and as an unprivileged user (nobody) the node runs as."""
from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, NodeProc, free_port

from host import fsutil

DL = "download:file_transfer:template.os"


def modes_under(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of root and everything beneath it (symlinks skipped)."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(top, name)
            if not p.is_symlink():
                out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def test_a_new_home_is_private_and_so_is_everything_the_node_makes(two_nodes):
    fake, fake2 = two_nodes
    (fake2.files / "shared.txt").write_text("served to peers\n")
    (fake2.files / "album" / "2024").mkdir(parents=True)
    (fake2.files / "album" / "2024" / "a.txt").write_text("in a folder\n")
    for name, done in (("shared.txt", r"shared\.txt downloaded"), ("album", r"album.*downloaded")):
        code, lines = fake.run(f"{DL} {name} fake2.dev", until=rf"{done}|error:")
        assert code == 0 and not any("error:" in ln for ln in lines), lines
    # the peer served its files (control: the node's privacy did not stop the node itself)
    assert (fake.files / "shared.txt").read_text() == "served to peers\n"
    assert (fake.files / "album" / "2024" / "a.txt").read_text() == "in a folder\n"
    modes = modes_under(fake.home)
    pkg = [p for p in modes if "/pkg/" in p or p.endswith("/pkg")]  # installed package files: hard links
    made = {p: m for p, m in modes.items() if p not in pkg and not (fake.home / p).is_socket()}
    assert made["."] == 0o700 and made[".keys"] == 0o700 and made[".keys/http-token"] == 0o600
    assert made["vfs/file_transfer:template.os/files/shared.txt"] == 0o600
    assert made["vfs/file_transfer:template.os/files/album/2024"] == 0o700
    wrong = {p: f"{m:04o}" for p, m in made.items()
             if m & 0o077 or (m != 0o700 if (fake.home / p).is_dir() else m & 0o700 not in (0o600, 0o700))}
    assert not wrong, wrong
    assert len(made) > 10, made  # the walk really saw the node's files
    sockets = [p for p in modes if (fake.home / p).is_socket()]
    assert sockets and all(modes[p] & 0o077 == 0 for p in sockets), {p: oct(modes[p]) for p in sockets}


def start_fails(node: NodeProc) -> str:
    with pytest.raises(RuntimeError) as info:
        node.start(timeout=60)
    return str(info.value)


def test_a_home_others_can_change_is_refused_with_the_fix(node_factory, tmp_path):
    nobody = pwd.getpwnam("nobody")
    # a home another user made first (0777, as in a shared /tmp): refused, nothing written in it
    home = tmp_path / "theirs"
    home.mkdir()
    os.chmod(home, 0o777)
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    node = node_factory("fake.dev", start=False, home=home)
    out = start_fails(node)
    assert f"home not private: {home} (mode rwxrwxrwx 0777, owner nobody (uid {nobody.pw_uid})) belongs to another user" in out
    assert "--home DIR" in out and f"chown -R root {home} && chmod 700 {home}" in out
    assert list(home.iterdir()) == []
    # an own home, vfs/ or .keys/ that group or others may write: refused, naming it and the fix
    for inner in ("", "vfs", ".keys"):
        home = tmp_path / f"open{inner}"
        (home / inner).mkdir(parents=True, exist_ok=True)
        os.chmod(home / inner, 0o775 if inner else 0o757)
        node = node_factory("fake.dev", start=False, home=home)
        out = start_fails(node)
        path = home / inner if inner else home
        assert f"{path} (mode " in out and "owner root (uid 0)) may be written by" in out, out
        assert f"fix: chmod 700 {path}" in out, out
    # a symbolic link another user owns, pointing at a home of ours: refused (they could re-point it)
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(ours)
    os.lchown(link, nobody.pw_uid, nobody.pw_gid)
    out = start_fails(node_factory("fake.dev", start=False, home=link))
    assert f"{link} is a symbolic link owned by nobody" in out
    # control: the fix given works, and an own home others could read is made 0700 with a word
    os.chmod(tmp_path / "open", 0o755)
    node = node_factory("fake.dev", start=False, home=tmp_path / "open")
    node.start()
    assert f"home {tmp_path / 'open'} was open to others (mode 0755): made it 0700" in "\n".join(node.lines)
    assert stat.S_IMODE((tmp_path / "open").stat().st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a node as nobody: needs root to switch users")
def test_as_an_unprivileged_user(tmp_path):
    """The node run as nobody (setpriv): its new home is 0700 with its key and token private; a home
    root owns, or its own home opened to others, is refused."""
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv (util-linux)")
    nobody = pwd.getpwnam("nobody")
    probe = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                            sys.executable, "-c", "import host.node"], cwd=REPO, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run the repository's Python here: {probe.stderr[-300:]}")
    # pytest's tmp_path is root's alone: nobody gets a folder of its own beside it
    base = Path(tempfile.mkdtemp(prefix="kinode-nobody-"))
    os.chown(base, nobody.pw_uid, nobody.pw_gid)
    empty = base / "no-packages"
    try:
        env = dict(os.environ, HOME=str(base), KINODE_DIRECTORY=str(base / "directory.sqlite"),
                   KINODE_CACHE=str(base / "cache"), PYTHONUNBUFFERED="1")
        wrap = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]

        def node(home: Path) -> NodeProc:
            n = NodeProc("fake.dev", home, free_port(), env, ["--packages", str(empty)])
            n.wrap = wrap
            return n

        subprocess.run([*wrap, "mkdir", str(empty)], check=True)
        fresh = node(base / "home")
        fresh.start()
        try:
            st = (base / "home").stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, 0o700)
            for p in (base / "home" / ".keys").iterdir():
                assert p.stat().st_uid == nobody.pw_uid and stat.S_IMODE(p.stat().st_mode) == 0o600, p
            assert stat.S_IMODE((base / "home" / ".keys").stat().st_mode) == 0o700
        finally:
            fresh.stop()
        # a home root made: refused for nobody, naming root and the fix
        root_home = base / "roots"
        root_home.mkdir(mode=0o755)
        out = start_fails(node(root_home))
        assert f"{root_home} (mode rwxr-xr-x 0755, owner root (uid 0)) belongs to another user" in out, out
        assert f"you are nobody (uid {nobody.pw_uid})" in out
        # its own home made group-writable: refused; after the fix given, it starts
        os.chmod(base / "home", 0o770)
        out = start_fails(node(base / "home"))
        assert "may be written by its group" in out and f"fix: chmod 700 {base / 'home'}" in out, out
        os.chmod(base / "home", 0o700)
        again = node(base / "home")
        again.start()
        again.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_private_problem_unit(tmp_path):
    """fsutil.private_problem on real folders with real owners (chown as root)."""
    me = os.geteuid()
    d = tmp_path / "d"
    assert fsutil.private_problem(d, me) == ""  # missing: nothing to refuse
    d.mkdir(mode=0o700)
    assert fsutil.private_problem(d, me) == ""
    os.chmod(d, 0o750)
    assert fsutil.private_problem(d, me) == ""  # readable by the group, not writable
    os.chmod(d, 0o720)
    assert "may be written by its group" in fsutil.private_problem(d, me)
    os.chmod(d, 0o702)
    assert "may be written by others" in fsutil.private_problem(d, me)
    os.chmod(d, 0o700)
    (tmp_path / "f").write_text("x")
    assert "is not a folder" in fsutil.private_problem(tmp_path / "f", me)
    assert "belongs to another user" in fsutil.private_problem(d, me + 1)
    if me == 0:
        nobody = pwd.getpwnam("nobody").pw_uid
        os.chown(d, nobody, -1)
        assert "owner nobody" in fsutil.private_problem(d, me)
        assert fsutil.private_problem(d, nobody) == ""
