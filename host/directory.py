"""The node directory: a local stand-in for Kinode's chain.

Each node registers its name, networking public key (32-byte X25519), host and port here when it
starts, refreshes ``last_seen`` while it runs and marks itself offline when it stops cleanly. Peers
look names up here to know where to dial and which static key the Noise handshake must present.

The directory is an SQLite file (WAL mode) shared by every node on the machine; several machines can
share one by pointing at the same file, or list each other in a static peers file (JSON list of
``{"name", "public_key" (hex), "host", "port"}``). The database wins for the names it holds; the
peers file supplies the rest.

Every call opens its own short-lived connection, so one ``Directory`` may be used from any thread,
and any number of processes may use the same file at once.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger("host.directory")

STALE_AFTER = 15.0
"""Seconds without a heartbeat after which a name's holder counts as gone."""

BUSY_TIMEOUT = 10.0
"""Seconds a call waits for another process's write lock before failing."""

KEY_LEN = 32

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name       TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    host       TEXT NOT NULL,
    port       INTEGER NOT NULL,
    pid        INTEGER,
    last_seen  REAL NOT NULL,
    online     INTEGER NOT NULL
)
"""


def _now() -> float:
    """The clock used for heartbeats and staleness (tests monkeypatch this)."""
    return time.time()


class NameTaken(Exception):
    """The name is registered to a different key whose holder is still alive."""

    def __init__(self, name: str, detail: str = ""):
        self.name = name
        msg = (f"node name {name!r} is already registered to a different networking key by a node "
               f"that is still running")
        if detail:
            msg += f" ({detail})"
        msg += ("; choose another name, stop that node, or reuse that node's home directory "
                "(its key lives in <home>/.keys/networking.key)")
        super().__init__(msg)


@dataclass(frozen=True)
class NodeRecord:
    name: str
    public_key: bytes
    host: str
    port: int
    online: bool = True  # False once the node stopped cleanly; peers-file entries are always True


def _check_key(public_key: bytes) -> bytes:
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != KEY_LEN:
        raise ValueError(f"public key must be {KEY_LEN} bytes")
    return bytes(public_key)


class Directory:
    """Node name registry backed by an SQLite file; safe to use from many threads and processes."""

    def __init__(self, path: Union[str, Path], peers_file: Union[str, Path, None] = None):
        self.path = Path(path)
        self.peers_file = Path(peers_file) if peers_file is not None else None
        self._peers_cache: tuple[object, dict[str, NodeRecord]] = (None, {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # switching to WAL takes an exclusive lock that SQLite's busy timeout does not wait for,
        # so nodes that start at the same moment on a new database retry here
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                with self._connect() as db:
                    mode = db.execute("PRAGMA journal_mode").fetchone()[0]
                    if str(mode).lower() != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                    db.execute(_SCHEMA)
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # ---- plumbing --------------------------------------------------------------------------------
    def _connect(self) -> "_Conn":
        return _Conn(self.path)

    # ---- registration ----------------------------------------------------------------------------
    def register(self, name: str, public_key: bytes, host: str, port: int) -> None:
        """Claim ``name`` for ``public_key`` at host:port and mark it online.

        Allowed when the name is free, already held by the same key, or held by a different key
        whose holder is gone (stopped cleanly, or silent for more than ``STALE_AFTER`` seconds).
        Raises ``NameTaken`` otherwise.
        """
        key = _check_key(public_key)
        now = _now()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT public_key, online, last_seen, host, port FROM nodes "
                             "WHERE name = ?", (name,)).fetchone()
            if row is not None and bytes(row[0]) != key:
                old_online, old_seen = bool(row[1]), float(row[2])
                age = now - old_seen
                if old_online and age <= STALE_AFTER:
                    db.execute("ROLLBACK")
                    raise NameTaken(name, f"held by {row[3]}:{row[4]}, last seen {age:.0f}s ago")
                log.warning("name %s re-registered with a new key; previous holder gone (%s)", name,
                            "stopped cleanly" if not old_online else f"silent for {age:.0f}s")
            db.execute(
                "INSERT INTO nodes (name, public_key, host, port, pid, last_seen, online) "
                "VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT(name) DO UPDATE SET "
                "public_key = excluded.public_key, host = excluded.host, port = excluded.port, "
                "pid = excluded.pid, last_seen = excluded.last_seen, online = 1",
                (name, key, host, int(port), os.getpid(), now))
            db.execute("COMMIT")
        static = self._peers().get(name)
        if static is not None and static.public_key != key:
            log.warning("name %s registered locally with a key that differs from the peers file %s; "
                        "the local registration wins", name, self.peers_file)

    def heartbeat(self, name: str, public_key: bytes) -> bool:
        """Refresh ``last_seen`` for our record; False if the name is no longer held by this key."""
        with self._connect() as db:
            cur = db.execute("UPDATE nodes SET last_seen = ?, online = 1 "
                             "WHERE name = ? AND public_key = ?", (_now(), name, bytes(public_key)))
            return cur.rowcount > 0

    def unregister(self, name: str, public_key: bytes) -> None:
        """Mark our record offline (clean shutdown); a record held by another key is left alone."""
        with self._connect() as db:
            db.execute("UPDATE nodes SET online = 0 WHERE name = ? AND public_key = ?",
                       (name, bytes(public_key)))

    # ---- lookup ----------------------------------------------------------------------------------
    def lookup(self, name: str) -> Optional[NodeRecord]:
        """The record for ``name``: from the database if it has one, else from the peers file."""
        with self._connect() as db:
            row = db.execute("SELECT name, public_key, host, port, online FROM nodes WHERE name = ?",
                             (name,)).fetchone()
        if row is not None:
            return NodeRecord(row[0], bytes(row[1]), row[2], int(row[3]), bool(row[4]))
        return self._peers().get(name)

    def _peers(self) -> dict[str, NodeRecord]:
        """The static peers file, re-read when it changes; a bad file or entry is logged and skipped."""
        if self.peers_file is None:
            return {}
        try:
            st = self.peers_file.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError as e:
            if self._peers_cache[0] != "missing":  # log once per disappearance, not every lookup
                log.warning("peers file %s unreadable: %s", self.peers_file, e)
            self._peers_cache = ("missing", {})
            return {}
        if stamp == self._peers_cache[0]:
            return self._peers_cache[1]
        peers: dict[str, NodeRecord] = {}
        try:
            entries = json.loads(self.peers_file.read_text())
            if not isinstance(entries, list):
                raise ValueError("expected a JSON list")
        except (OSError, ValueError) as e:
            log.warning("peers file %s ignored: %s", self.peers_file, e)
            entries = []
        for i, ent in enumerate(entries):
            try:
                name, host, port = ent["name"], ent["host"], ent["port"]
                if not isinstance(name, str) or not isinstance(host, str):
                    raise ValueError("name and host must be strings")
                if not isinstance(port, int) or not 0 < port < 65536:
                    raise ValueError(f"bad port {port!r}")
                key = _check_key(bytes.fromhex(ent["public_key"]))
            except (KeyError, TypeError, ValueError) as e:
                log.warning("peers file %s: entry %d ignored: %s", self.peers_file, i, e)
                continue
            peers[name] = NodeRecord(name, key, host, port, True)
        self._peers_cache = (stamp, peers)
        return peers


class _Conn:
    """A short-lived autocommit SQLite connection with a busy timeout; closes on exit."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT, isolation_level=None)

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and self.db.in_transaction:
                self.db.execute("ROLLBACK")
        finally:
            self.db.close()
