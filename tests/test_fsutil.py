"""host/fsutil.py: atomic writes leave the old file or the whole new one, and no temporary files."""
from __future__ import annotations

import os
import threading

import pytest

from host.fsutil import atomic_writer, create_atomic, write_atomic


def test_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old" * 1000)
    write_atomic(path, b"new", fsync=True)
    assert path.read_bytes() == b"new"
    write_atomic(path, b"", mode=0o600)
    assert path.read_bytes() == b"" and path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["f"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_writer(path) as fd:
            os.write(fd, b"half of the new")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_a_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "f", b"x")


def test_create_never_replaces_and_racers_agree(tmp_path):
    path = tmp_path / "key"
    assert create_atomic(path, b"first", fsync=True, mode=0o600)
    assert not create_atomic(path, b"second")
    assert path.read_bytes() == b"first" and path.stat().st_mode & 0o777 == 0o600

    racy = tmp_path / "racy"
    won: list[bytes] = []
    start = threading.Barrier(8)

    def racer(i: int) -> None:
        start.wait()
        if create_atomic(racy, bytes([i]) * 32):
            won.append(bytes([i]) * 32)
    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and racy.read_bytes() == won[0]
    assert sorted(os.listdir(tmp_path)) == ["key", "racy"]
