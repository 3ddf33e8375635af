"""Transfers people can trust: resume, concurrency, changing files, cancel, hostile names, and
workers that always end. Real nodes, real files, bytes compared."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import time

import pytest
from conftest import (
    REPO,
    TEST_PACKAGES,
    no_workers,
    partial_size,
    paused,
    release,
    saved_resume_point,
    stop_mid_transfer,
    wait_for,
)

sys.path.insert(0, str(REPO / "components" / "file_transfer" / "common"))
from ft_common import check_name  # noqa: E402  (the guest's own name rule, plain Python)


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def put(node, name: str, size: int) -> str:
    node.files.mkdir(parents=True, exist_ok=True)
    path = node.files / name
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
        f.write(os.urandom(size & ((1 << 20) - 1)))
    return sha(path)


def download(node, name: str, peer: str, timeout: float = 120) -> list[str]:
    code, lines = node.run(f"download:file_transfer:template.os {name} {peer}",
                           until=rf"{re.escape(name)} downloaded|error:", timeout=timeout)
    assert code == 0, lines
    return lines


@pytest.mark.parametrize("victim", ["provider", "requestor"])
def test_resume_after_a_node_is_killed_mid_transfer(held_nodes, victim):
    fake, fake2 = held_nodes
    size = 40 << 20
    digest = put(fake2, "resume.bin", size)
    stop_mid_transfer(fake, fake2, "resume.bin", size, need_resume_point=True)
    if victim == "provider":
        fake2.kill()
        fake.expect(r"error: download of resume\.bin from fake2\.dev failed: fake2\.dev went offline during the "
                    r"transfer \(run the download again to resume\)$", 30)
        # the failing worker saved every byte it had verified
        resume_at = partial_size(fake, "fake2.dev", "resume.bin")
        assert saved_resume_point(fake, "fake2.dev", "resume.bin") == resume_at
    else:
        resume_at = saved_resume_point(fake, "fake2.dev", "resume.bin")  # the last periodic save
        fake.kill()
    release(fake2)  # the resumed transfer is not held
    assert not (fake.files / "resume.bin").exists()  # never a partial file under the real name
    (fake2 if victim == "provider" else fake).start()
    lines = download(fake, "resume.bin", "fake2.dev")
    assert f"file_transfer:template.os: resume.bin: resuming at {resume_at} of {size} bytes" in lines, lines
    assert 0 < resume_at < size
    assert sha(fake.files / "resume.bin") == digest
    no_workers(fake, fake2, within=30)


def test_same_file_twice_at_once_second_is_refused(held_nodes):
    fake, fake2 = held_nodes
    size = 40 << 20
    digest = put(fake2, "twice.bin", size)
    stop_mid_transfer(fake, fake2, "twice.bin", size)  # the first held part way, on any machine
    try:
        code, lines = fake.run("download:file_transfer:template.os twice.bin fake2.dev", timeout=20)
        assert code == 1 and lines == ["file_transfer:template.os: error: download of twice.bin from fake2.dev "
                                       "failed: twice.bin is already being downloaded from fake2.dev"], lines
    finally:
        release(fake2)
    fake.expect(r"twice\.bin downloaded", 60)
    assert sha(fake.files / "twice.bin") == digest
    no_workers(fake, fake2)


def test_eight_files_at_once_from_two_peers(node_factory):
    fake = node_factory("fake.dev")
    peers = [node_factory("p1.dev"), node_factory("p2.dev")]
    want = {}
    for i in range(8):
        peer = peers[i % 2]
        want[f"f{i}.bin"] = (peer.name, put(peer, f"f{i}.bin", (3 + i) << 20))
    for name, (peer, _) in want.items():
        fake.type(f"download:file_transfer:template.os {name} {peer}")
    for _ in want:
        fake.expect(r"f\d\.bin downloaded", 120)
    for name, (_, digest) in want.items():
        assert sha(fake.files / name) == digest, name
    no_workers(fake, *peers)


def test_a_file_that_changes_while_being_sent_is_detected(held_nodes):
    fake, fake2 = held_nodes
    size = 40 << 20
    put(fake2, "moving.bin", size)
    stop_mid_transfer(fake, fake2, "moving.bin", size)
    with open(fake2.files / "moving.bin", "r+b") as f:  # overwrite the tail, same size, while held
        f.seek(size - (10 << 20))
        f.write(os.urandom(10 << 20))
    release(fake2)
    line = fake.expect(r"moving\.bin (downloaded|.*failed)", 120)
    assert line.endswith("error: download of moving.bin from fake2.dev failed: fake2.dev: moving.bin changed on "
                         "fake2.dev during the transfer; nothing was saved"), line
    assert not (fake.files / "moving.bin").exists()
    no_workers(fake, fake2, within=30)


def test_cancel_and_list_transfers(held_nodes):
    fake, fake2 = held_nodes
    size = 40 << 20
    put(fake2, "slow.bin", size)
    stop_mid_transfer(fake, fake2, "slow.bin", size)  # the provider held: the download cannot finish first
    try:
        held = partial_size(fake, "fake2.dev", "slow.bin")
        code, lines = fake.run("transfers:file_transfer:template.os")
        listed = [ln for ln in lines if "slow.bin from fake2.dev: " in ln]
        assert code == 0 and len(listed) == 1 and re.search(rf"\b{held / 2**20:.1f} MiB of 40\.0 MiB\b", listed[0]), lines
        assert "file_transfer:template.os: 1 transfer in progress:" in lines, lines
        code, lines = fake.run("cancel:file_transfer:template.os slow.bin fake2.dev")
        assert code == 0, lines
        line = fake.expect(r"slow\.bin from fake2\.dev (failed|cancelled)|slow\.bin downloaded", 30)
        assert line == "file_transfer:template.os: download of slow.bin from fake2.dev cancelled", line
    finally:
        release(fake2)
    assert not (fake.files / "slow.bin").exists()
    assert not (fake.files / ".partial" / "fake2.dev" / "slow.bin.part").exists()  # its partial removed
    no_workers(fake, fake2)
    code, lines = fake.run("transfers:file_transfer:template.os")
    assert any("no transfers in progress" in ln for ln in lines), lines
    code, lines = fake.run("cancel:file_transfer:template.os nothing.bin")
    assert code == 1 and any("no transfer of nothing.bin" in ln for ln in lines), lines


def test_many_files_in_one_command_wait_their_turn(node_factory):
    """`download A B C... NODE`: at most 4 run at once, the rest are queued (listed by `transfers`,
    cancellable), and every file arrives intact."""
    fake, fake2 = node_factory("fake.dev"), node_factory("fake2.dev", pause_after=1)
    from ft_common import EXT_CHUNK_SIZE
    digests = {f"m{i}.bin": put(fake2, f"m{i}.bin", EXT_CHUNK_SIZE + (1 << 20)) for i in range(16)}  # 2 chunks each
    fake.type("verbosity 1")
    fake.type(f"download:file_transfer:template.os {' '.join(digests)} fake2.dev")
    fake.expect(r"m\d+\.bin from fake2\.dev: queued \(\d+ waiting, 4 downloads at once\)", 30)
    # the provider holds the first four after a chunk each, so the queue cannot drain under us
    for _ in range(4):
        paused(fake2)
    try:
        code, lines = fake.run("transfers:file_transfer:template.os")
        waiting = [m.group(1) for ln in lines if (m := re.search(r"(m\d+\.bin) from fake2\.dev: queued", ln))]
        assert code == 0 and len(waiting) == len(digests) - 4, lines
        victim = waiting[-1]
        code, lines = fake.run(f"cancel:file_transfer:template.os {victim} fake2.dev")
        assert code == 0, lines
        fake.expect(rf"{re.escape(victim)} from fake2\.dev cancelled", 30)
        assert not any("downloaded" in ln for ln in fake.lines)
    finally:
        release(fake2)
    wait_for(lambda: len({m.group(1) for ln in fake.lines if (m := re.search(r"(m\d+\.bin) downloaded", ln))})
             == len(digests) - 1 or any("error:" in ln for ln in fake.lines), 120, "every other file downloaded")
    done = {m.group(1) for ln in fake.lines if (m := re.search(r"(m\d+\.bin) downloaded", ln))}
    assert not any("error:" in ln for ln in fake.lines), fake.lines[-20:]
    assert done == set(digests) - {victim}, sorted(done)
    for name, digest in digests.items():
        if name != victim:
            assert sha(fake.files / name) == digest, name
    assert not (fake.files / victim).exists()
    no_workers(fake, fake2)


def test_provider_refuses_hostile_names_from_a_peer(node_factory):
    """A peer's Download naming a path is refused by the provider's file_transfer itself (its answer
    is checked, not only that no worker started); the same request with a plain name is served."""
    args = ["--packages", str(REPO / "components"), "--packages", str(TEST_PACKAGES)]
    fake, fake2 = node_factory("fake.dev", extra_args=args), node_factory("fake2.dev", extra_args=args)
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / "plain.txt").write_text("plain\n")
    provider = "fake2.dev@file_transfer:file_transfer:template.os"
    # quiet (on fake) sends the request as a peer's worker would, and prints the answer and what
    # follows; the target of the transfer is quiet itself
    target = {"node": "fake.dev", "process": {"process_name": "quiet", "package_name": "misbehave",
                                              "publisher_node": "test.os"}}

    def ask(name: str) -> None:
        body = json.dumps({"Download": {"name": name, "target": target, "is_requestor": False}})
        fake.type(f"m fake.dev@quiet:misbehave:test.os ask {provider} {body}")

    # the positive control: a plain name is accepted, and fake2's worker sends quiet the file's Size
    ask("plain.txt")
    fake.expect(rf"quiet got a message from {provider}: b'{{\"Download\":{{\"Ok\":null}}}}'", 20)
    fake.expect(r"quiet got a message from fake2\.dev@\d+:file_transfer:template\.os: b'{\"Size\":6}'", 20)
    for name in ["../../etc/passwd", "a/b", "..", "bad\u0007name", "x\x1b[31m"]:
        ask(name)
        line = fake.expect(rf"quiet got a message from {re.escape(provider)}: ", 20)
        answer = json.loads(ast.literal_eval(line.split(": ", 2)[2]))  # quiet prints the bytes' repr
        assert answer == {"Download": {"Err": check_name(name)}}, (name, line)
    no_workers(fake2, within=30)  # the plain name's worker too (quiet never answers its Size)
    assert fake2.alive()
    assert not any("\x1b" in ln or "\x07" in ln for ln in fake2.lines + fake.lines)


def test_a_provider_at_its_process_limit_says_so_and_keeps_serving(node_factory):
    """--max-processes caps the Wasm instances a node runs at once: the uploads past it fail with
    a clear error on both sides, the ones within it complete, and the node serves again after."""
    fake = node_factory("fake.dev")
    fake2 = node_factory("fake2.dev", extra_args=["--max-processes", "6"])  # 4 at rest: 2 workers fit
    digests = {f"cap{i}.bin": put(fake2, f"cap{i}.bin", 64 << 20) for i in range(4)}
    fake.type(f"download:file_transfer:template.os {' '.join(digests)} fake2.dev")
    fake2.expect(r"could not start: the node already runs its maximum of 6 Wasm instances \(--max-processes\)", 30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ended = [ln for ln in fake.lines if re.search(r"cap\d\.bin downloaded|download of cap\d\.bin .*failed", ln)]
        if len(ended) == len(digests):
            break
        time.sleep(0.2)
    assert len(ended) == len(digests), fake.lines[-20:]
    failed = [ln for ln in ended if "failed" in ln]
    assert failed and all(re.search(r"fake2\.dev did not (answer|start sending)", ln) for ln in failed), failed
    for ln in ended:
        if "downloaded" in ln:
            name = re.search(r"(cap\d\.bin)", ln).group(1)
            assert sha(fake.files / name) == digests[name]
    retry = re.search(r"(cap\d\.bin)", failed[0]).group(1)
    download(fake, retry, "fake2.dev")
    assert sha(fake.files / retry) == digests[retry]
    no_workers(fake, fake2)


def test_one_bad_name_in_a_multi_file_download_starts_none(two_nodes):
    fake, fake2 = two_nodes
    put(fake2, "good.bin", 4096)
    code, lines = fake.run("download:file_transfer:template.os good.bin ../up.bin fake2.dev", wait=1.0)
    assert code == 1 and lines == ["file_transfer:template.os: error: file name '../up.bin' may not start with '.'"], lines
    # the control: the same command without the bad name fetches good.bin, and only once: had the
    # first command started it, a second "downloaded" line (or an "already being downloaded") would show
    download(fake, "good.bin", "fake2.dev")
    assert (fake.files / "good.bin").stat().st_size == 4096
    no_workers(fake, fake2)
    assert sum("good.bin downloaded" in ln for ln in fake.lines) == 1, fake.lines
    assert not any("already being" in ln for ln in fake.lines), fake.lines


def test_a_lone_big_download_moves_to_large_chunks_and_arrives_intact(two_nodes):
    """A file over BIG_MIN, the only transfer on both nodes: its chunks go from EXT_CHUNK_SIZE to
    BIG_CHUNK_SIZE once both nodes' file_transfer gave their workers the whole share (ft_common), each
    checked by the running hash across the change of size, and the whole file by its hash."""
    from ft_common import BIG_CHUNK_SIZE, BIG_MIN
    fake, fake2 = two_nodes
    size = BIG_MIN + BIG_CHUNK_SIZE + 12345  # the last chunk a short one
    digest = put(fake2, "big.bin", size)
    lines = download(fake, "big.bin", "fake2.dev")
    assert any("big.bin downloaded from fake2.dev" in ln for ln in lines), lines
    assert sha(fake.files / "big.bin") == digest
    no_workers(fake, fake2)
