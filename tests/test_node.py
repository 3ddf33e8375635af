"""One real node: start-up, the terminal, list_files, refusals, and the CLI's errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port


def test_help_text():
    out = subprocess.run([sys.executable, "-m", "host", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0
    assert "--node" in out.stdout and "--port" in out.stdout and "/tmp/kinode-fake-node" in out.stdout


def test_list_files_shows_each_file_with_its_size(node_factory):
    node = node_factory("fake.dev")
    node.files.mkdir(parents=True, exist_ok=True)
    (node.files / "my_file.txt").write_text("hello world\n")
    (node.files / "b.bin").write_bytes(b"\0" * 4096)
    (node.files / "subdir").mkdir()
    code, lines = node.run("list_files:file_transfer:template.os fake.dev")
    assert code == 0, lines
    assert "file_transfer:template.os: fake.dev available files:" in lines
    rows = [ln.split(": ", 1)[1] for ln in lines if "\t\t" in ln]
    # a folder is listed too, with a trailing `/`, its total size and file count
    assert rows == ["File\t\tSize (bytes)", "b.bin\t\t4096", "my_file.txt\t\t12", "subdir/\t\t0\t(0 files)"]


def test_terminal_typed_lines_and_unknown_command(node_factory):
    node = node_factory("fake.dev")
    node.type("help")
    node.expect(r"list_files:file_transfer:template.os fake2.dev")
    node.type("frobnicate now")
    node.expect(r"^error: unknown command 'frobnicate'; type `help`")
    # a script by its short name: the full name and the alias that shortens it
    node.type("list_files fake2.dev")
    node.expect(r"^error: unknown command 'list_files'; did you mean list_files:file_transfer:template\.os\? "
                r"\(`alias list_files list_files:file_transfer:template\.os` makes `list_files` work\)")
    node.type("alias list_files list_files:file_transfer:template.os")
    node.type("list_files")
    node.expect(r"file_transfer:template.os: error: usage: list_files")   # the script ran
    node.type("nosuch:file_transfer:template.os x")
    node.expect(r"^error: .*has no script 'nosuch'")
    node.type("list_files:file_transfer:template.os")
    node.expect(r"file_transfer:template.os: error: usage: list_files")
    assert node.alive()


def test_download_from_yourself_is_refused_clearly(node_factory):
    node = node_factory("fake.dev")
    node.files.mkdir(parents=True, exist_ok=True)
    (node.files / "a.txt").write_text("x")
    code, lines = node.run("download:file_transfer:template.os a.txt fake.dev")
    assert code == 1
    assert any("a.txt is on this node already" in ln for ln in lines), lines
    assert node.workers() == []


def test_download_refuses_hostile_names_before_anything_starts(node_factory):
    node = node_factory("fake.dev")
    sys.path.insert(0, str(REPO / "components" / "file_transfer" / "common"))
    from ft_common import check_name  # the guest's own rule, as plain Python
    for name in ["../../etc/passwd", "a/b", ".hidden", "..", "a\\b"]:
        code, lines = node.run(f"download:file_transfer:template.os {name} fake2.dev")
        assert code == 1 and f"file_transfer:template.os: error: {check_name(name)}" in lines, (name, lines)
    assert node.workers() == []


def test_home_in_use_by_another_node_is_a_clear_error(node_factory):
    first = node_factory("fake.dev")
    out = subprocess.run([sys.executable, "-m", "host", "--node", "other.dev", "--home", str(first.home),
                          "--port", str(free_port())], cwd=REPO, env=first.env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert "is in use by another running node" in out.stderr


def test_port_in_use_is_a_clear_error(node_factory, tmp_path):
    first = node_factory("fake.dev")
    out = subprocess.run([sys.executable, "-m", "host", "--node", "other.dev", "--home", str(tmp_path / "other"),
                          "--port", str(first.port)], cwd=REPO, env=first.env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert f"cannot listen on port {first.port}" in out.stderr


def test_run_against_no_node_says_so(tmp_path):
    out = subprocess.run([sys.executable, "-m", "host", "run", "--home", str(tmp_path), "ps"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "no node is running with home" in out.stderr


def test_restart_keeps_files_and_identity(node_factory):
    node = node_factory("fake.dev")
    key = (node.home / ".keys" / "networking.key").read_bytes()
    node.stop()
    node.start()
    assert (node.home / ".keys" / "networking.key").read_bytes() == key
    assert "file_transfer:file_transfer:template.os" in node.processes()


def test_a_node_whose_stdout_nobody_reads_keeps_working(tmp_path):
    """A full stdout pipe must not stall the node: output is queued, and dropped if need be."""
    import os
    import time

    from conftest import run_remote
    home = tmp_path / "fake.dev"
    files = home / "vfs/file_transfer:template.os/files"
    files.mkdir(parents=True)
    (files / "a.txt").write_text("a\n")
    env = dict(os.environ, KINODE_DIRECTORY=str(tmp_path / "d.sqlite"))
    proc = subprocess.Popen([sys.executable, "-m", "host", "--node", "fake.dev", "--home", str(home), "--port",
                             str(free_port())], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # never read
    try:
        deadline = time.monotonic() + 60
        while run_remote(home, "ps", wait=0.05)[0] == 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        for _ in range(150):  # ~2,500 lines of help: far past a pipe's 64 KiB
            run_remote(home, "help", wait=0.02)
        code, lines = run_remote(home, "list_files:file_transfer:template.os fake.dev", timeout=20)
        assert code == 0 and "file_transfer:template.os: a.txt\t\t2" in lines, lines
    finally:
        proc.kill()
        proc.wait()


def test_capabilities_to_finished_scripts_do_not_pile_up(node_factory):
    """Each script run grants file_transfer a capability to the script; once the script is gone the
    capability goes too (else every worker would inherit an ever longer list)."""
    from host.kernel.kernel import Kernel  # noqa: F401  (the rule lives in Kernel.process_exited)
    node = node_factory("fake.dev", extra_args=["-v"])
    for _ in range(5):
        node.run("transfers:file_transfer:template.os", wait=0.2)
    code, lines = node.run("caps file_transfer:file_transfer:template.os", wait=0.2)
    assert code == 0, lines
    held = [ln for ln in lines if ln.startswith("  ")]
    assert held and not any(ln.strip().split("@")[1].split(":")[0].isdigit() for ln in held), held


def _thread_cpus(pid: int) -> set[str]:
    """Each thread's allowed-CPU list, as the kernel reports it."""
    lists = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            lines = status.read_text().splitlines()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        lists.update(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Cpus_allowed_list:"))
    return lists


def test_cpus_keeps_every_thread_of_the_node_there(node_factory):
    """--cpus 0: the node's threads, those started later for processes and the network included,
    run on CPU 0 only, and a download between a pinned and an unpinned node works."""
    fake = node_factory("fake.dev", extra_args=["--cpus", "0"])
    fake2 = node_factory("fake2.dev")
    fake2.files.mkdir(parents=True, exist_ok=True)
    data = os.urandom(3 << 20)
    (fake2.files / "pinned.bin").write_bytes(data)
    code, lines = fake.run("download:file_transfer:template.os pinned.bin fake2.dev",
                           until=r"pinned\.bin downloaded|error:", timeout=60)
    assert code == 0, lines
    assert (fake.files / "pinned.bin").read_bytes() == data
    assert _thread_cpus(fake.proc.pid) == {"0"}


@pytest.mark.parametrize("value, error", [
    ("a", "'a' is not a CPU list such as 0 or 0-3,6"),
    ("3-1", "'3-1' names no CPU"),
    ("4096", "--cpus: CPU 4096 is not available here"),
])
def test_bad_cpus_is_a_clear_error(tmp_path, value, error):
    out = subprocess.run([sys.executable, "-m", "host", "--node", "x.dev", "--home", str(tmp_path / "x"),
                          "--cpus", value], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert error in out.stderr
    assert not (tmp_path / "x").exists()  # refused before anything starts
