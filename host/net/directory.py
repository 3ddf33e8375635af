"""The node directory: a local stand-in for Kinode's chain.

Each node registers its name, networking public key (32-byte X25519), host and port here when it
starts, refreshes ``last_seen`` while it runs and marks itself offline when it stops cleanly. Peers
look names up here to know where to dial and which static key the Noise handshake must present.

The directory is an SQLite file (WAL mode) shared by every node on the machine; several machines can
share one by pointing at the same file, or list each other in a static peers file (JSON list of
``{"name", "public_key" (hex), "host", "port"}``). The database wins for the names it holds; the
peers file supplies the rest. The peers file is re-read whenever it changes; a bad one is reported
(naming the bad entry) and the last good one stays in use.

Every call opens its own short-lived connection, so one ``Directory`` may be used from any thread,
and any number of processes may use the same file at once.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("host.net.directory")

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
# added later: an indirect node's routers, comma-joined ('' for a direct node)
_ADD_ROUTERS = "ALTER TABLE nodes ADD COLUMN routers TEXT NOT NULL DEFAULT ''"


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
    source: str = field(default="directory", compare=False)  # or "peers file": named in errors
    routers: tuple[str, ...] = ()  # an indirect node: reached only through these nodes (host unused)

    @property
    def where(self) -> str:
        """How the node is reached, for listings and errors."""
        if self.routers:
            return "via " + ", ".join(self.routers)
        return host_port(self.host, self.port)


def _check_key(public_key: bytes) -> bytes:
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != KEY_LEN:
        raise ValueError(f"public key must be {KEY_LEN} bytes")
    return bytes(public_key)


class Directory:
    """Node name registry backed by an SQLite file; safe to use from many threads and processes."""

    def __init__(self, path: str | Path, peers_file: str | Path | None = None,
                 on_problem: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.peers_file = Path(peers_file) if peers_file is not None else None
        self.on_problem = on_problem       # also told of a bad peers file (e.g. the terminal)
        self._peers_lock = threading.Lock()
        self._pin_lock = threading.Lock()    # pairings write the peers file one at a time
        self._peers_stamp: object = None
        self._peers_good: dict[str, NodeRecord] = {}
        self.peers_error: str | None = None
        self._changed: set[str] = set()
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
                    columns = [row[1] for row in db.execute("PRAGMA table_info(nodes)")]
                    if "routers" not in columns:
                        try:
                            db.execute(_ADD_ROUTERS)
                        except sqlite3.OperationalError as e:
                            if "duplicate column" not in str(e):  # else a node starting with us added it
                                raise
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # ---- plumbing --------------------------------------------------------------------------------
    def _connect(self) -> _Conn:
        return _Conn(self.path)

    # ---- registration ----------------------------------------------------------------------------
    def register(self, name: str, public_key: bytes, host: str, port: int,
                 routers: tuple[str, ...] = ()) -> None:
        """Claim ``name`` for ``public_key`` at host:port (or through ``routers``: an indirect
        node) and mark it online.

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
                "INSERT INTO nodes (name, public_key, host, port, pid, last_seen, online, routers) "
                "VALUES (?, ?, ?, ?, ?, ?, 1, ?) ON CONFLICT(name) DO UPDATE SET "
                "public_key = excluded.public_key, host = excluded.host, port = excluded.port, "
                "pid = excluded.pid, last_seen = excluded.last_seen, online = 1, routers = excluded.routers",
                (name, key, host, int(port), os.getpid(), now, ",".join(routers)))
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
    def lookup(self, name: str) -> NodeRecord | None:
        """The record for ``name``. A peers-file entry's key always wins: the database's record is
        used (for its fresher address) only if it has the same key, else the peers file's."""
        with self._connect() as db:
            row = db.execute("SELECT name, public_key, host, port, online, routers FROM nodes WHERE name = ?",
                             (name,)).fetchone()
        pinned = self._peers().get(name)
        if row is not None and (pinned is None or pinned.public_key == bytes(row[1])):
            return NodeRecord(row[0], bytes(row[1]), row[2], int(row[3]), bool(row[4]),
                              routers=tuple(r for r in (row[5] or "").split(",") if r))
        if row is not None:
            log.warning("the directory maps %s to key %s, but the peers file to %s: the peers file wins",
                        name, fingerprint(bytes(row[1])), fingerprint(pinned.public_key) if pinned else "?")
        return pinned

    def _peers(self, force: bool = False) -> dict[str, NodeRecord]:
        """The peers file's entries, re-read when the file changes (or when forced). A bad file is
        reported once, naming the bad entry, and the last good entries stay in use."""
        if self.peers_file is None:
            return {}
        with self._peers_lock:
            problem: str | None
            try:
                st = self.peers_file.stat()
                stamp: object = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError as e:
                stamp, problem = "missing", f"peers file {self.peers_file} unreadable: {e.strerror or e}"
            else:
                problem = None
            if stamp == self._peers_stamp and not force:
                return self._peers_good
            self._peers_stamp = stamp
            if problem is None:
                try:
                    peers = parse_peers(self.peers_file.read_text(), str(self.peers_file))
                except OSError as e:
                    problem = f"peers file {self.peers_file} unreadable: {e.strerror or e}"
                except PeersFileError as e:
                    problem = str(e)
            if problem is not None:
                if problem != self.peers_error or force:
                    self._problem(f"{problem}; still using the last good peers "
                                  f"({len(self._peers_good)} entries)")
                self.peers_error = problem
                return self._peers_good
            old = self._peers_good
            self._changed |= {n for n in old.keys() | peers.keys() if old.get(n) != peers.get(n)}
            if self.peers_error is not None or old != peers:
                log.info("peers file %s read: %d entries", self.peers_file, len(peers))
            self._peers_good, self.peers_error = peers, None
            return peers

    def _problem(self, text: str) -> None:
        log.error("%s", text)
        if self.on_problem is not None:
            self.on_problem(text)

    def check_peers_file(self) -> None:
        """Raise PeersFileError if the peers file (if any) is missing or bad: for start-up."""
        self._peers(force=True)
        if self.peers_error is not None:
            raise PeersFileError(self.peers_error)

    def changed_peers(self) -> set[str]:
        """Names whose peers-file entry was added, removed or changed since the last call
        (re-reading the file if it changed)."""
        self._peers()
        with self._peers_lock:
            changed, self._changed = self._changed, set()
        return changed

    def reload_peers(self) -> str:
        """Re-read the peers file now; a description of its entries (or of its problem)."""
        if self.peers_file is None:
            return "no peers file (start the node with --peers FILE)"
        peers = self._peers(force=True)
        head = (f"peers file {self.peers_file}: {len(peers)} entries"
                if self.peers_error is None else
                f"peers file {self.peers_file} NOT loaded ({self.peers_error}); "
                f"using the last good one, {len(peers)} entries")
        return "\n".join([head] + [f"  {r.name} {r.where} key {fingerprint(r.public_key)}"
                                   for r in sorted(peers.values(), key=lambda r: r.name)])


    def pin_peer(self, entry: dict, default_file: Path) -> Path:
        """Write `entry` (a peers-file entry) into the peers file, replacing one of the same name
        and key (a new address), as pairing does; the file is `default_file` (made now) if the node
        had none. An entry of that name with another key is not replaced (KeyPinned): whoever knows
        a pairing code must not take over a name already paired. The file is replaced atomically;
        one that is not a valid peers file is left as it is (PeersFileError)."""
        from host import fsutil
        with self._pin_lock:
            known = entry["name"] in self._peers()
            path = self.peers_file or Path(default_file)
            text = self._peers_text(path)
            old = parse_peers(text, str(path)).get(entry["name"])   # a broken file is not overwritten
            if old is not None and old.public_key.hex() != entry["public_key"]:
                raise KeyPinned(f"{entry['name']} is already paired with another key ({fingerprint(old.public_key)}, "
                                f"in {path}); `unpair {entry['name']}` there first to pair it anew")
            entries = [e for e in json.loads(text) if e.get("name") != entry["name"]] + [entry]
            parse_peers(json.dumps(entries), str(path))
            fsutil.write_atomic(path, (json.dumps(entries, indent=1) + "\n").encode(), fsync=True)
            self.peers_file = path
            self._peers(force=True)
            if not known:
                # a new name has no connection to retire, and one the network accepts from it
                # before it next checks the file must not be retired as "changed"
                with self._peers_lock:
                    self._changed.discard(entry["name"])
        return path

    def unpin_peer(self, name: str) -> Path | None:
        """Remove `name`'s entry from the peers file (`unpair`); the file, or None if it had none."""
        from host import fsutil
        with self._pin_lock:
            path = self.peers_file
            if path is None:
                return None
            text = self._peers_text(path)
            parse_peers(text, str(path))
            entries = json.loads(text)
            kept = [e for e in entries if e.get("name") != name]
            if len(kept) == len(entries):
                return None
            fsutil.write_atomic(path, (json.dumps(kept, indent=1) + "\n").encode(), fsync=True)
            self._peers(force=True)
        return path

    @staticmethod
    def _peers_text(path: Path) -> str:
        try:
            return path.read_text()
        except FileNotFoundError:
            return "[]"
        except OSError as e:
            raise PeersFileError(f"peers file {path} unreadable: {e.strerror or e}") from None


class PeersFileError(ValueError):
    """The peers file is not a valid list of entries; the message names the bad entry."""


class KeyPinned(ValueError):
    """Pairing would replace the key pinned for a name."""


def fingerprint(public_key: bytes) -> str:
    """A short form of a networking key for messages: the first 16 hex digits, as a peers file
    entry's public_key begins."""
    return bytes(public_key).hex()[:16]


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(text: str, default_port: int | None) -> tuple[str, int | None]:
    """`HOST`, `HOST:PORT`, `[IPV6]`, `[IPV6]:PORT` or a bare IPv6 address -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPV6] or [IPV6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""   # a name, an IPv4 address, or an IPv6 address without a port
    if not host:
        raise ValueError(f"{text!r}: no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    return host, int(port_text)


def peers_entry(name: str, public_key: bytes, host: str | None, port: int | None,
                routers: tuple[str, ...] = ()) -> dict:
    """This node's entry for other nodes' peers files; an indirect node's names its routers
    (and an address only if it has one to give)."""
    entry: dict = {"name": name, "public_key": bytes(public_key).hex()}
    if host is not None and port is not None:
        entry.update(host=host, port=port)
    if routers:
        entry["routers"] = list(routers)
    return entry


def parse_peers(text: str, source: str = "peers file") -> dict[str, NodeRecord]:
    """Parse a peers file: a JSON list of {"name", "public_key" (64 hex digits), "host", "port"},
    or, for an indirect node, {"name", "public_key", "routers": [NAME, ...]} (host and port may
    then be left out)."""
    try:
        entries = json.loads(text)
    except ValueError as e:
        raise PeersFileError(f"peers file {source} is not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise PeersFileError(f"peers file {source} must be a JSON list of entries, not a "
                             f"{type(entries).__name__}")
    peers: dict[str, NodeRecord] = {}
    for i, ent in enumerate(entries):
        label = f"entry {i + 1}"
        try:
            if not isinstance(ent, dict):
                raise ValueError("must be an object {name, public_key, host, port}")
            if isinstance(ent.get("name"), str):
                label += f" ({ent['name']})"
            routers = ent.get("routers", [])
            if not isinstance(routers, list) or not all(isinstance(r, str) and r and "," not in r
                                                        for r in routers):
                raise ValueError("routers must be a list of node names")
            needed = ("name", "public_key") if routers else ("name", "public_key", "host", "port")
            missing = [k for k in needed if k not in ent]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            name, key = ent["name"], ent["public_key"]
            host, port = ent.get("host", ""), ent.get("port", 0)
            if not isinstance(name, str) or not name:
                raise ValueError("name must be a non-empty string")
            if name in routers:
                raise ValueError("a node cannot be its own router")
            if not isinstance(host, str) or not (host or routers):
                raise ValueError("host must be a non-empty string")
            if isinstance(port, bool) or not isinstance(port, int) or not (0 < port < 65536 or (routers and not port)):
                raise ValueError(f"port {port!r} is not a number from 1 to 65535")
            if not isinstance(key, str) or len(key) != 2 * KEY_LEN:
                raise ValueError(f"public_key must be {2 * KEY_LEN} hex digits")
            try:
                key_bytes = bytes.fromhex(key)
            except ValueError:
                raise ValueError(f"public_key {key[:16]}... is not hex") from None
            if name in peers:
                raise ValueError("the same name appears twice")
        except ValueError as e:
            raise PeersFileError(f"peers file {source}, {label}: {e}") from None
        peers[name] = NodeRecord(name, key_bytes, host, port, True, source="peers file", routers=tuple(routers))
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
