"""The node directory: registration rules, staleness, the static peers file."""
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from host.net import directory as dirmod
from host.net.directory import Directory, NameTaken, NodeRecord

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


@pytest.fixture
def clock(monkeypatch):
    """A controllable clock for the directory's notion of time."""
    now = [1_000_000.0]
    monkeypatch.setattr(dirmod, "_now", lambda: now[0])
    return now


@pytest.fixture
def d(tmp_path):
    return Directory(tmp_path / "dir" / "directory.sqlite")


def test_register_and_lookup(d):
    assert d.lookup("a.os") is None
    d.register("a.os", KEY_A, "127.0.0.1", 9000)
    assert d.lookup("a.os") == NodeRecord("a.os", KEY_A, "127.0.0.1", 9000, True)
    assert (d.path.parent).is_dir()
    with d._connect() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        pid, online = db.execute("SELECT pid, online FROM nodes").fetchone()
    assert pid == os.getpid() and online == 1


def test_same_key_may_reregister_any_time(d):
    d.register("a.os", KEY_A, "127.0.0.1", 9000)
    d.register("a.os", KEY_A, "127.0.0.1", 9001)  # a restart on another port
    assert d.lookup("a.os").port == 9001


def test_name_taken_while_holder_alive(d, clock):
    d.register("a.os", KEY_A, "127.0.0.1", 9000)
    clock[0] += 10
    assert d.heartbeat("a.os", KEY_A)
    clock[0] += 14  # 14 s since the heartbeat: still alive
    with pytest.raises(NameTaken) as e:
        d.register("a.os", KEY_B, "127.0.0.1", 9100)
    assert "a.os" in str(e.value) and "already registered" in str(e.value)
    assert e.value.name == "a.os"
    assert d.lookup("a.os").public_key == KEY_A


def test_reregister_after_clean_stop(d, clock, caplog):
    d.register("a.os", KEY_A, "127.0.0.1", 9000)
    d.unregister("a.os", KEY_B)  # someone else's key: no effect
    assert d.lookup("a.os").online
    d.unregister("a.os", KEY_A)
    assert not d.lookup("a.os").online
    with caplog.at_level(logging.WARNING, logger="host.net.directory"):
        d.register("a.os", KEY_B, "10.0.0.2", 9100)
    assert d.lookup("a.os") == NodeRecord("a.os", KEY_B, "10.0.0.2", 9100, True)
    assert any("a.os re-registered with a new key; previous holder gone" in r.getMessage()
               for r in caplog.records)


def test_reregister_after_staleness(d, clock, caplog):
    d.register("a.os", KEY_A, "127.0.0.1", 9000)
    clock[0] += dirmod.STALE_AFTER + 1
    with caplog.at_level(logging.WARNING, logger="host.net.directory"):
        d.register("a.os", KEY_B, "127.0.0.1", 9100)
    assert d.lookup("a.os").public_key == KEY_B
    assert any("re-registered with a new key" in r.getMessage() for r in caplog.records)
    # The old holder's heartbeat no longer touches the record, nor does its unregister.
    assert not d.heartbeat("a.os", KEY_A)
    d.unregister("a.os", KEY_A)
    assert d.lookup("a.os").online


def test_bad_key_rejected(d):
    with pytest.raises(ValueError):
        d.register("a.os", b"short", "127.0.0.1", 9000)


def test_concurrent_claims_one_winner(tmp_path):
    path = tmp_path / "directory.sqlite"
    Directory(path)
    keys = [bytes([i]) * 32 for i in range(8)]
    results = []

    def claim(key):
        try:
            Directory(path).register("race.os", key, "127.0.0.1", 9000)
            results.append(("ok", key))
        except NameTaken:
            results.append(("taken", key))

    threads = [threading.Thread(target=claim, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [k for r, k in results if r == "ok"]
    assert len(winners) == 1
    assert Directory(path).lookup("race.os").public_key == winners[0]


def test_peers_file(tmp_path, caplog):
    peers = tmp_path / "peers.json"
    good = [{"name": "far.os", "public_key": KEY_B.hex(), "host": "192.0.2.7", "port": 9300},
            {"name": "both.os", "public_key": KEY_B.hex(), "host": "192.0.2.8", "port": 9301}]
    peers.write_text(json.dumps(good))
    problems = []
    d = Directory(tmp_path / "directory.sqlite", peers_file=peers, on_problem=problems.append)
    d.register("both.os", KEY_A, "127.0.0.1", 9000)
    assert d.lookup("far.os") == NodeRecord("far.os", KEY_B, "192.0.2.7", 9300, True)
    assert d.lookup("far.os").source == "peers file"
    # a key in the peers file always wins over the directory (test_a_peers_file_key_beats_the_directory)
    assert d.lookup("both.os") == NodeRecord("both.os", KEY_B, "192.0.2.8", 9301, True)
    assert d.lookup("nobody.os") is None
    assert problems == []
    # A bad entry: the whole file is refused, the entry named, the last good entries kept.
    for bad, says in [({"name": "broken.os", "public_key": "zz", "host": "192.0.2.9", "port": 9302},
                       "entry 3 (broken.os): public_key must be 64 hex digits"),
                      ({"name": "noport.os", "public_key": KEY_B.hex(), "host": "192.0.2.9"},
                       "entry 3 (noport.os): missing port")]:
        peers.write_text(json.dumps(good + [bad]))
        os.utime(peers, ns=(len(problems) + 1, len(problems) + 1))
        with caplog.at_level(logging.WARNING, logger="host.net.directory"):
            assert d.lookup("far.os").port == 9300
            assert d.lookup(bad["name"]) is None
        assert says in problems[-1] and "still using the last good peers (2 entries)" in problems[-1]
    assert len(problems) == 2  # told once per bad version, not at every lookup
    # The file is re-read when it changes.
    peers.write_text(json.dumps([
        {"name": "new.os", "public_key": KEY_A.hex(), "host": "192.0.2.10", "port": 9400}]))
    os.utime(peers, ns=(9, 9))
    assert d.lookup("new.os").port == 9400
    assert d.lookup("far.os") is None
    assert d.changed_peers() == {"far.os", "both.os", "new.os"} and d.changed_peers() == set()


def test_nodes_starting_at_once_on_a_new_database(tmp_path):
    """Several processes opening a brand-new directory at the same moment all succeed."""
    import subprocess
    import sys
    db = tmp_path / "fresh.sqlite"
    code = ("import sys; sys.path.insert(0, %r); from host.net.directory import Directory; "
            "d = Directory(%r); d.register(sys.argv[1], bytes([int(sys.argv[2])]) * 32, '127.0.0.1', 1)")
    repo = str(Path(__file__).resolve().parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", code % (repo, str(db)), f"n{i}.dev", str(i)],
                              stderr=subprocess.PIPE, text=True) for i in range(6)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    d = Directory(db)
    assert all(d.lookup(f"n{i}.dev") is not None for i in range(6))


def test_indirect_nodes_in_the_peers_file_and_the_database(tmp_path):
    """An indirect node's entry names its routers instead of an address; the database keeps a
    registered node's routers too (and an older database gains the column)."""
    import sqlite3
    db = tmp_path / "directory.sqlite"
    with sqlite3.connect(db) as old:  # a database made before routers existed
        old.execute(dirmod._SCHEMA)
        old.execute("INSERT INTO nodes VALUES ('old.os', ?, '127.0.0.1', 1, 1, 0, 1)", (KEY_A,))
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps([{"name": "nat.os", "public_key": KEY_B.hex(), "routers": ["r1.os", "r2.os"]}]))
    d = Directory(db, peers_file=peers)
    assert d.lookup("old.os").routers == ()
    rec = d.lookup("nat.os")
    assert rec.routers == ("r1.os", "r2.os") and rec.where == "via r1.os, r2.os"
    assert "nat.os via r1.os, r2.os" in d.reload_peers()
    d.register("home.os", KEY_A, "10.0.0.2", 9000, routers=("r1.os",))
    assert d.lookup("home.os").routers == ("r1.os",)
    assert dirmod.peers_entry("nat.os", KEY_B, None, None, ("r1.os",)) == \
        {"name": "nat.os", "public_key": KEY_B.hex(), "routers": ["r1.os"]}
    for bad, says in [({"name": "x.os", "public_key": KEY_B.hex(), "routers": "r1.os"},
                       "routers must be a list of node names"),
                      ({"name": "x.os", "public_key": KEY_B.hex(), "routers": ["x.os"]},
                       "a node cannot be its own router"),
                      ({"name": "x.os", "public_key": KEY_B.hex(), "routers": []}, "missing host, port")]:
        with pytest.raises(dirmod.PeersFileError, match=says):
            dirmod.parse_peers(json.dumps([bad]))


def test_a_peers_file_key_beats_the_directory(tmp_path, caplog):
    """A name re-registered in the shared directory with another key does not override the key the
    user wrote in the peers file; with the same key, the directory's fresher address is used."""
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps([{"name": "b.os", "public_key": KEY_B.hex(), "host": "192.0.2.8", "port": 9301}]))
    d = Directory(tmp_path / "directory.sqlite", peers_file=peers)
    d.register("b.os", KEY_B, "127.0.0.1", 9000)          # control: same key, the directory's address
    rec = d.lookup("b.os")
    assert (rec.public_key, rec.host, rec.port, rec.source) == (KEY_B, "127.0.0.1", 9000, "directory")
    d.unregister("b.os", KEY_B)
    d.register("b.os", KEY_A, "203.0.113.5", 9999)        # taken over with another key
    with caplog.at_level(logging.WARNING, logger="host.net.directory"):
        rec = d.lookup("b.os")
    assert (rec.public_key, rec.host, rec.port, rec.source) == (KEY_B, "192.0.2.8", 9301, "peers file")
    assert "the peers file wins" in caplog.text
