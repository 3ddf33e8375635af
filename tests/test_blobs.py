"""The host side of the `blobs` extension: functions a process calls on the blob it holds."""
from __future__ import annotations

import os

import blake3
import pytest

from host.kernel import standard_host as hp
from host.kernel.process import current
from host.messages import Blob


class _Proc:
    """Just the fields the blob functions use."""
    def __init__(self):
        self.current_blob = None
        self.blob_chain = None


@pytest.fixture()
def proc():
    p = _Proc()
    current.proc = p
    yield p
    del current.proc


def test_len_and_hash_of_the_current_blob(proc):
    assert hp.current_blob_len() is None and hp.current_blob_hash() is None
    proc.current_blob = Blob(None, b"hello")
    assert hp.current_blob_len() == 5
    assert hp.current_blob_hash() == blake3.blake3(b"hello").hexdigest()


def test_chained_hash_covers_every_blob_fed_since_the_restart(proc):
    parts = [os.urandom(n) for n in (4 << 20, 1000, 0, 3 << 20)]
    assert hp.current_blob_hash_chained(True) is None     # no blob: nothing fed
    for i, part in enumerate(parts):
        proc.current_blob = Blob(None, part)
        got = hp.current_blob_hash_chained(i == 0)
        assert got == blake3.blake3(b"".join(parts[:i + 1])).hexdigest()
    proc.current_blob = None
    assert hp.current_blob_hash_chained(False) is None    # and the chain is left as it was
    proc.current_blob = Blob(None, b"tail")
    assert hp.current_blob_hash_chained(False) == blake3.blake3(b"".join(parts) + b"tail").hexdigest()
    assert hp.current_blob_hash_chained(True) == blake3.blake3(b"tail").hexdigest()  # restart
