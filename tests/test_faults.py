"""Faults stay contained: a guest that raises, traps, spins or sends garbage does not stop the node
or other processes; the VFS answers malformed requests and path escapes with errors."""
from __future__ import annotations

import pytest
from conftest import REPO, TEST_PACKAGES, wait_for

MIS = "m fake.dev@misbehave:misbehave:test.os"


@pytest.fixture
def node(node_factory):
    n = node_factory("fake.dev", extra_args=["--packages", str(REPO / "components"), "--packages",
                                              str(TEST_PACKAGES), "--compute-limit", "2"])
    n.files.mkdir(parents=True, exist_ok=True)
    (n.files / "my_file.txt").write_text("hello world\n")
    return n


def still_serving(node) -> None:
    code, lines = node.run("list_files:file_transfer:template.os fake.dev")
    assert code == 0 and "file_transfer:template.os: my_file.txt\t\t12" in lines, lines
    assert node.alive()


@pytest.mark.parametrize("cmd, reason", [
    ("raise", r"misbehave:misbehave:test.os crashed: RuntimeError: asked to raise"),
    ("spin", r"misbehave:misbehave:test.os trapped: used more than 2 s of compute"),
    # 3 MiB through `standard` rather than the blobs interface: wasmtime's own limit, its reason shown
    ("bigblob", r"misbehave:misbehave:test.os trapped: too much data is being copied between the host and the "
                r"guest: fuel allocated for hostcalls has been exhausted$"),
])
def test_a_failing_guest_is_contained_and_restarted(node, cmd, reason):
    node.expect(r"misbehave:test.os: begin", 30) if not any("misbehave:test.os: begin" in ln for ln in node.lines) else None
    node.type(f'{MIS} "{cmd}"')
    line = node.expect(r"^error: misbehave:misbehave:test.os", 20)
    import re
    assert re.search(reason, line), line
    node.expect(r"misbehave:test.os: begin", 20)  # on_exit Restart
    node.type(f'{MIS} "ping"')
    node.expect(r"misbehave:test.os: pong", 10)
    still_serving(node)


def test_garbage_bodies_get_errors_not_crashes(node):
    node.type(f'{MIS} "garbage"')
    node.expect(r"misbehave:test.os: garbage done", 60)
    answers = [ln for ln in node.lines if "answered" in ln]
    ft = [ln for ln in answers if "file_transfer answered" in ln]
    vfs = [ln for ln in answers if "vfs answered" in ln]
    assert len(ft) == 10 and len(vfs) == 5
    assert all('"Err"' in ln for ln in vfs), vfs
    # file_transfer answers each malformed request with an error, and prints what it refused
    assert [ln for ln in ft if "Err" not in ln] == []
    assert "file_transfer:file_transfer:template.os" in node.processes()
    still_serving(node)


def test_vfs_paths_cannot_escape_their_drive(node):
    node.type(f'{MIS} "escape"')
    node.expect(r"misbehave:test.os: escape done", 30)
    escapes = [ln for ln in node.lines if "misbehave:test.os: escape /" in ln]
    assert len(escapes) == 4
    for ln in escapes:
        assert '"Err"' in ln and "hello world" not in ln and "root:" not in ln, ln
    assert any("NoCap" in ln for ln in escapes if "file_transfer:template.os/files" in ln)
    still_serving(node)


def test_state_survives_a_crash_and_a_node_restart(node):
    node.expect(r"misbehave:test.os: begin", 30) if not any("misbehave:test.os: begin" in ln for ln in node.lines) else None
    node.type(f'{MIS} "setstate seven"')
    node.expect(r"misbehave:test.os: state saved")
    node.type(f'{MIS} "raise"')
    node.expect(r"misbehave:test.os: begin", 20)
    node.type(f'{MIS} "getstate"')
    node.expect(r"misbehave:test.os: state is seven")
    node.stop()
    node.start()
    node.type(f'{MIS} "getstate"')
    node.expect(r"misbehave:test.os: state is seven")


def test_unanswered_request_times_out_with_its_context(node):
    node.type(f'{MIS} "timeout"')
    line = node.expect(r"misbehave:test.os: send error", 10)
    assert "timeout" in line and "misbehave:misbehave:test.os" in line and "b'ctx-123'" in line


def test_on_exit_requests_are_sent_when_the_process_ends(node):
    node.expect(r"misbehave:test.os: begin", 30) if not any("misbehave:test.os: begin" in ln for ln in node.lines) else None
    node.type(f'{MIS} "farewell"')
    node.expect(r"misbehave:test.os: on-exit set", 10)
    node.type(f'{MIS} "raise"')
    node.expect(r"^misbehave:test.os: farewell from misbehave$", 10)
    # requests, not restart: the process is gone and stays gone (a restart would print "begin" again)
    wait_for(lambda: "misbehave:misbehave:test.os" not in node.processes(), 30, "the process gone")
    assert "misbehave:misbehave:test.os" not in node.processes()
    assert not any("misbehave:test.os: begin" in ln for ln in node.lines[node.lines.index(
        "misbehave:test.os: farewell from misbehave"):])
