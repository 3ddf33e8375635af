"""Folder transfers as two sans-I/O machines, FolderRequestor and FolderProvider (conventions as
ft_protocol's: `handle(event)` returns the actions, an action with a result last in its list). They
take over from ft_protocol's Requestor and Provider, which say so with a SwitchToFolder action.

One worker on each side moves a whole tree; small files travel many to a message. Between our
peers only: the requestor's Download carries `{"ft": 1, "folders": 1}`, and a provider serves a
folder only to such a request (a plain peer asking for a folder's name gets "no such file").
- The provider lists the tree (no symlink followed or sent) and answers with `Size` (its total
  bytes), metadata `{"ft":1, "folder": {"files", "dirs", "bytes"}}` and the manifest as the blob:
  `{"dirs": [path], "files": [[path, size, stamp]]}` (paths relative to the folder, depth first).
- The requestor answers `{"ft":1, "resume": [file index, offset]}`: where what it has verified
  ends. Files go in manifest order, so that is a prefix; it is saved with every batch written,
  so a resumed download fetches neither a file done nor the done part of a half file.
- Batches: `Chunk {name, offset: first file index, length: blob bytes}` with metadata
  `{"ft":1, "batch": [[index, offset, length, blake3]]}` and the pieces back to back as the blob; a
  big file is cut into pieces. Each batch is acked once written; FOLDER_WINDOW are in flight.
- Every piece is hashed where it is read and checked before anything of its batch is written.
- The folder is sent as it was listed: a piece is read only while its file has the stamp it had in
  the listing, so a file changed, removed or replaced since fails the transfer cleanly (nothing is
  kept); files added after the listing are not part of it.
- The tree is built under `.partial/` and takes its real name only when every file is written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ft_common import (
    ACK_TIMEOUT,
    BATCH_BYTES,
    BATCH_FILES,
    FOLDER_WINDOW,
    HANDSHAKE_TIMEOUT,
    MAX_FOLDER_DEPTH,
    MAX_FOLDER_ENTRIES,
    STALL_TIMEOUT,
    TICK,
    check_relative_path,
    window_in,
)
from ft_protocol import (
    FOLDER_MACHINES,
    ArmTimer,
    Exit,
    GotRequest,
    GotResponse,
    IoFailed,
    Log,
    Reply,
    Send,
    SendFailed,
    Start,
    screen_request,
)

HEX = frozenset("0123456789abcdef")
# The listing travels as one message's blob; a node refuses a message over 10,485,800 bytes
# (host/net/network.py MAX_MESSAGE), body and metadata included.
MAX_LISTING_BYTES = 10_000_000


# ---- events (besides ft_protocol's) ---------------------------------------------------------------
@dataclass
class ManifestRead:
    """The Size of a folder (ft_protocol.ReadManifest's result): its listing's text and BLAKE3."""
    source: Any
    size: Any
    meta: dict
    text: str | None
    digest: str | None
    wants_answer: bool
    now: float


@dataclass
class FolderStateLoaded:
    saved: Any
    on_disk: dict | None
    now: float


@dataclass
class TreePrepared:
    now: float


@dataclass
class BatchWritten:
    now: float


@dataclass
class TreeFinished:
    replaced: bool
    now: float


@dataclass
class Walked:
    found: Any
    now: float


@dataclass
class BatchRead:
    items: list
    hashes: Any
    now: float


# ---- actions -----------------------------------------------------------------------------------
@dataclass
class SendBlob:
    """Send a request carrying `blob` (bytes made by the machine, not a held blob)."""
    target: Any
    body: Any
    metadata: dict
    timeout: int
    context: str
    blob: bytes


@dataclass
class WalkTree:
    """List the folder (VFS WalkDir); -> Walked(found)."""


@dataclass
class ReadBatch:
    """Read [path, offset, length, stamp] pieces into the blob (VFS ReadMany); -> BatchRead(hashes)."""
    items: list


@dataclass
class LoadFolderState:
    """Read the resume state (JSON object or None) and what the partial tree holds; -> FolderStateLoaded."""


@dataclass
class PrepareTree:
    """Create the partial tree's folders (after removing any older tree if `fresh`) and save
    `state`; -> TreePrepared."""
    fresh: bool
    dirs: list
    state: dict


@dataclass
class WriteBatch:
    """Check and write the received blob's pieces [path, offset, length, blake3], then save
    `state`; -> BatchWritten."""
    items: list
    state: dict


@dataclass
class FinishTree:
    """Give the partial tree its real name (replacing an older one) and drop the state; -> TreeFinished."""


@dataclass
class RemoveTree:
    """Remove the partial tree and its state; a missing one is no error."""


# ---- the manifest ------------------------------------------------------------------------------
def check_path(path: Any) -> str:
    """Why a tree-relative path may not be sent or written, or ''."""
    if not isinstance(path, str) or not path:
        return "a path that is not a non-empty string"
    return check_relative_path(path, MAX_FOLDER_DEPTH)


def check_manifest(manifest: Any) -> str:
    """Why a manifest is unusable (entries, names, depth, sizes, a file outside a listed folder), or ''."""
    if not isinstance(manifest, dict):
        return "the folder's listing is malformed"
    dirs, files = manifest.get("dirs"), manifest.get("files")
    if not isinstance(dirs, list) or not isinstance(files, list):
        return "the folder's listing is malformed"
    if len(dirs) + len(files) > MAX_FOLDER_ENTRIES:
        return f"the folder has more than {MAX_FOLDER_ENTRIES} entries (the limit)"
    seen: set = set()
    for d in dirs:
        problem = check_path(d)
        if problem:
            return problem
        if d in seen or ("/" in d and d.rsplit("/", 1)[0] not in seen):
            return f"the folder's listing is malformed at {d[:200]!r}"
        seen.add(d)
    names: set = set()
    for f in files:
        if not (isinstance(f, list) and len(f) == 3 and isinstance(f[1], int) and not isinstance(f[1], bool)
                and 0 <= f[1] < 2**63):
            return "the folder's listing is malformed"
        problem = check_path(f[0])
        if problem:
            return problem
        if f[0] in seen or f[0] in names or ("/" in f[0] and f[0].rsplit("/", 1)[0] not in seen):
            return f"the folder's listing is malformed at {f[0][:200]!r}"
        names.add(f[0])
    return ""


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _progress_meta(peer: str, done: int, total: int, resumed: int, started: float, now: float,
                   files: int, of: int) -> dict:
    secs = max(now - started, 1e-6)
    return {"ft": 1, "peer": peer, "bytes": done, "total": total, "rate": (done - resumed) / secs, "secs": secs,
            "files": files, "of": of, "folder": True}


# ---- the requestor -----------------------------------------------------------------------------
class FolderRequestor:
    """Takes over from a Requestor whose Size said "folder": receives the tree into a partial tree."""

    OPENING, RECEIVING, WRITING, FINISHING, DONE, FAILED = ("opening", "receiving", "writing", "finishing",
                                                            "done", "failed")

    def __init__(self, name: str, peer: Any, parent: Any, started: float):
        self.name = name
        self.peer = peer
        self.peer_node = peer.node
        self.parent = parent
        self.window: int | None = None  # batches the provider may keep in flight, once our parent said
        self.started = self.last_activity = started
        self.state = self.OPENING
        self.provider: Any = None
        self.digest: str | None = None
        self.dirs: list = []
        self.files: list = []       # [path, size]
        self.total = 0
        self.index = self.offset = 0  # the verified prefix: files before `index`, `offset` bytes of it
        self.done_bytes = self.resumed = 0
        self.wants_answer = False
        self.pending: tuple | None = None  # (new index, new offset, bytes, first index, wants_ack)
        self.keepalive_out = False
        self.last_report = float("-inf")

    def handle(self, ev: Any) -> list:
        """The one entry: an event in, the actions out."""
        if type(ev) is GotRequest:
            return self.request(ev.source, ev.body, ev.meta, ev.wants_answer, ev.blob_len, ev.now)
        if type(ev) is BatchWritten:
            return self.batch_written(ev.now)
        if type(ev) is GotResponse:
            return self.response(ev.context, ev.body, ev.now, ev.meta)
        if type(ev) is SendFailed:
            return self.request_failed(ev.context, ev.kind, ev.now)
        if type(ev) is ManifestRead:
            return self.size_announced(ev.source, ev.size, ev.meta, ev.text, ev.digest, ev.wants_answer, ev.now)
        if type(ev) is FolderStateLoaded:
            return self.state_loaded(ev.saved, ev.now, ev.on_disk)
        if type(ev) is TreePrepared:
            return self.tree_prepared(ev.now)
        if type(ev) is TreeFinished:
            return self.tree_finished(ev.now, replaced=ev.replaced)
        if type(ev) is IoFailed:
            return self.io_failed(ev.error, ev.now)
        raise TypeError(f"a FolderRequestor takes no {type(ev).__name__}")

    def size_announced(self, source: Any, size: Any, meta: dict, manifest_text: str | None, digest: str | None,
                       wants_answer: bool, now: float) -> list:
        self.provider = source
        self.wants_answer = wants_answer
        self.last_activity = now
        try:
            manifest = json.loads(manifest_text or "")
        except ValueError:
            manifest = None
        problem = check_manifest(manifest)
        if not problem and (not _is_count(size) or size != sum(f[1] for f in manifest["files"])):
            problem = "the folder's size does not match its listing"
        if problem or not digest:
            return self.fail(f"refused the folder: {problem or 'no listing'}", keep=False, now=now)
        self.digest = digest
        self.dirs = manifest["dirs"]
        self.files = [(f[0], f[1]) for f in manifest["files"]]
        self.total = size
        return [LoadFolderState()]

    def _state(self, index: int, offset: int) -> dict:
        return {"digest": self.digest, "index": index, "offset": offset}

    def state_loaded(self, saved: Any, now: float, on_disk: dict | None = None) -> list:
        """`on_disk`: the partial tree's files and their sizes ({path: size}). The saved point is
        kept only if every file before it is there whole and the file it is in has its offset."""
        if self.state != self.OPENING:
            raise RuntimeError(f"state_loaded in state {self.state}")
        fresh = True
        on_disk = on_disk or {}
        if isinstance(saved, dict) and saved.get("digest") == self.digest and _is_count(saved.get("index")) \
                and _is_count(saved.get("offset")):
            i, off = saved["index"], saved["offset"]
            if (i < len(self.files) and off <= self.files[i][1] or i == len(self.files) and off == 0) \
                    and all(on_disk.get(p) == s for p, s in self.files[:i]) \
                    and (off == 0 or on_disk.get(self.files[i][0], -1) >= off):
                self.index, self.offset, fresh = i, off, False
        return [PrepareTree(fresh, self.dirs, self._state(self.index, self.offset))]

    def tree_prepared(self, now: float) -> list:
        if self.state != self.OPENING:
            raise RuntimeError(f"tree_prepared in state {self.state}")
        self.done_bytes = self.resumed = sum(s for _, s in self.files[:self.index]) + self.offset
        self.state = self.RECEIVING
        actions: list = []
        if self.wants_answer:
            actions.append(Reply("Progress", {"ft": 1, "resume": [self.index, self.offset], **self._window_meta()}))
        if self.index or self.offset:
            actions.append(Log(f"{self.name}: resuming at file {self.index + 1} of {len(self.files)} "
                               f"({self.done_bytes} of {self.total} bytes)"))
        if self.index >= len(self.files):
            return self._finish(actions)
        self._report(actions, now)
        return actions

    def request(self, source: Any, body: Any, meta: dict, wants_answer: bool, blob_len: int | None,
                now: float) -> list:
        screened = screen_request(self, source, meta, now)
        if screened is not None:
            return screened
        if isinstance(body, dict) and isinstance(body.get("Chunk"), dict) and source == self.provider:
            return self.batch(meta.get("batch"), wants_answer, blob_len or 0, now)
        return [Log(f"worker: ignored a bad message from {source}: unknown request")]

    def batch(self, batch: Any, wants_ack: bool, blob_len: int, now: float) -> list:
        if self.state != self.RECEIVING:
            return self.fail(f"a batch came out of turn ({self.state})", keep=True, now=now)
        if not isinstance(batch, list) or not batch:
            return self.fail("peer sent a malformed batch", keep=True, now=now)
        i, off, length_sum = self.index, self.offset, 0
        items = []
        for piece in batch:
            if not (isinstance(piece, list) and len(piece) == 4 and all(_is_count(v) for v in piece[:3])
                    and isinstance(piece[3], str) and len(piece[3]) == 64 and set(piece[3]) <= HEX):
                return self.fail("peer sent a malformed batch", keep=True, now=now)
            pi, poff, plen, digest = piece
            if pi != i or poff != off or i >= len(self.files) or poff + plen > self.files[i][1]:
                return self.fail(f"peer sent a piece out of order (file {pi} at {poff}, expected file {i} at {off})",
                                 keep=True, now=now)
            items.append([self.files[i][0], poff, plen, digest])
            length_sum += plen
            off += plen
            if off == self.files[i][1]:
                i, off = i + 1, 0
        if length_sum != blob_len:
            return self.fail(f"peer sent a batch whose data ({blob_len} bytes) does not match its pieces "
                             f"({length_sum})", keep=True, now=now)
        self.pending = (i, off, length_sum, batch[0][0], wants_ack)
        self.state = self.WRITING
        return [WriteBatch(items, self._state(i, off))]

    def batch_written(self, now: float) -> list:
        if self.state != self.WRITING:
            raise RuntimeError(f"batch_written in state {self.state}")
        assert self.pending is not None   # set when the batch went to be written
        self.index, self.offset, nbytes, first, wants_ack = self.pending
        self.pending = None
        self.done_bytes += nbytes
        self.last_activity = now
        self.state = self.RECEIVING
        actions: list = [Reply("Progress", {"ft": 1, "ack": first, **self._window_meta()})] if wants_ack else []
        if self.index >= len(self.files):
            return self._finish(actions)
        self._report(actions, now)
        self._keepalive(actions)
        return actions

    def _window_meta(self) -> dict:
        return {"window": self.window} if self.window else {}

    def _keepalive(self, actions: list) -> None:
        """Keep one request outstanding to the provider: if its node goes away, we learn of it."""
        if not self.keepalive_out and self.provider is not None:
            actions.append(Send(self.provider, {"Progress": {"name": self.name, "progress": self._percent()}},
                                {"ft": 1}, ACK_TIMEOUT, "keepalive"))
            self.keepalive_out = True

    def _finish(self, actions: list) -> list:
        self.state = self.FINISHING
        actions.append(FinishTree())
        return actions

    def tree_finished(self, now: float, replaced: bool = False) -> list:
        """`replaced`: an older file or folder had the name (Kinode overwrites; the download says so)."""
        self.state = self.DONE
        actions: list = []
        self._report(actions, now, done=True, **({"replaced": True} if replaced else {}))
        actions.append(Exit())
        return actions

    def response(self, context: str | None, body: Any, now: float, meta: dict | None = None) -> list:
        """An answer to one of our requests (as Requestor.response, whose place this takes)."""
        if context == "keepalive":
            self.keepalive_out = False
        return []

    def tick(self, now: float) -> list:
        if self.state in (self.DONE, self.FAILED):
            return []
        if now - self.last_activity > STALL_TIMEOUT:
            return self.fail(f"no progress for {STALL_TIMEOUT} s; giving up", keep=True, now=now)
        # a provider can vanish between two keepalives: ask again (an offline node fails it at once)
        actions: list = []
        if self.state == self.RECEIVING:
            self._keepalive(actions)
        actions.append(ArmTimer(TICK))
        return actions

    def request_failed(self, context: str | None, kind: str, now: float) -> list:
        if context == "tick":
            return self.tick(now)
        if context == "keepalive":
            reason = "went offline" if kind == "offline" else "stopped answering"
            return self.fail(f"{self.peer_node} {reason} during the transfer", keep=True, now=now)
        return []

    def io_failed(self, error: str, now: float) -> list:
        # a batch that failed its check wrote nothing: what was saved before stays good
        return self.fail(error, keep=True, now=now)

    def fail(self, error: str, keep: bool, now: float) -> list:
        if self.state in (self.DONE, self.FAILED):
            return []
        self.state = self.FAILED
        actions: list = []
        if self.provider is not None:
            actions.append(Send(self.provider, {"Progress": {"name": self.name, "progress": self._percent()}},
                                {"ft": 1, "error": error}))
        if not keep:
            actions.append(RemoveTree())
        resumable = keep and (self.index or self.offset)
        self._report(actions, now, error=error + (" (run the download again to resume)" if resumable else ""))
        actions.append(Exit(error))
        return actions

    def _percent(self) -> int:
        return 100 if not self.total else int(self.done_bytes * 100 / self.total)

    def _report(self, actions: list, now: float, **extra) -> None:
        """Progress to the parent: at most once a second, always with `extra`."""
        if not extra and now - self.last_report < 1.0:
            return
        self.last_report = now
        meta = _progress_meta(self.peer_node, self.done_bytes, self.total, self.resumed, self.started, now,
                              self.index, len(self.files))
        meta.update(extra)
        actions.append(Send(self.parent, {"Progress": {"name": self.name, "progress": self._percent()}}, meta, 5,
                            "progress"))


# ---- the provider ------------------------------------------------------------------------------
class FolderProvider:
    """Sends the folder `name` to the requestor worker `target`, FOLDER_WINDOW batches in flight."""

    LISTING, OFFERED, SENDING, READING, DONE, FAILED = "listing", "offered", "sending", "reading", "done", "failed"

    def __init__(self, name: str, target: Any, parent: Any, started: float, window: int = FOLDER_WINDOW):
        self.name = name
        self.target = target
        self.parent = parent
        self.started = self.last_activity = started
        self.window = window               # our share of the node's budget, in batches (our parent says)
        self.peer_window = FOLDER_WINDOW   # the requestor's share of its node's (its acks say)
        self.state = self.LISTING
        self.files: list = []      # [path, size, stamp]
        self.index = self.offset = 0  # where the next batch starts
        self.in_flight = 0
        self.reading: list | None = None  # the indices of the batch being read

    def handle(self, ev: Any) -> list:
        """The one entry: an event in, the actions out."""
        if type(ev) is GotResponse:
            return self.response(ev.context, ev.meta, ev.now)
        if type(ev) is BatchRead:
            return self.batch_read(ev.items, ev.hashes, ev.now)
        if type(ev) is GotRequest:
            return self.request(ev.source, ev.body, ev.meta, ev.now)
        if type(ev) is SendFailed:
            return self.request_failed(ev.context, ev.kind, ev.now)
        if type(ev) is Walked:
            return self.walked(ev.found, ev.now)
        if type(ev) is IoFailed:
            return self.io_failed(ev.error, ev.now)
        if type(ev) is Start:
            return self.start()
        raise TypeError(f"a FolderProvider takes no {type(ev).__name__}")

    def start(self) -> list:
        return [WalkTree()]

    def _error_to_peer(self, text: str) -> Send:
        return Send(self.target, {"Size": 0}, {"ft": 1, "error": text, "keep": False})

    def walked(self, found: Any, now: float) -> list:
        if self.state != self.LISTING:
            raise RuntimeError(f"walked in state {self.state}")
        manifest: dict[str, Any] | None = ({"dirs": found.get("dirs"), "files": found.get("files")}
                                           if isinstance(found, dict) else None)
        problem = check_manifest(manifest)
        if problem or manifest is None:
            return [self._error_to_peer(f"cannot send folder {self.name}: {problem}")] + \
                self._failed(f"cannot send: {problem}")
        self.files = manifest["files"]
        actions: list = []
        skipped = found.get("skipped") or []
        if skipped:
            actions.append(Log(f"{self.name}: not sending {len(skipped)} symlink(s) or special file(s), "
                               f"e.g. {skipped[0][:200]!r}"))
        total = sum(f[1] for f in self.files)
        listing = json.dumps(manifest, separators=(",", ":")).encode("utf-8")
        if len(listing) > MAX_LISTING_BYTES:
            problem = (f"its listing is {len(listing)} bytes, more than one message carries ({MAX_LISTING_BYTES}); "
                       f"download its subfolders one at a time")
            return [self._error_to_peer(f"cannot send folder {self.name}: {problem}")] + \
                self._failed(f"cannot send: {problem}")
        self.state = self.OFFERED
        actions.append(SendBlob(self.target, {"Size": total},
                                {"ft": 1, "folder": {"files": len(self.files), "dirs": len(manifest["dirs"]),
                                                     "bytes": total}},
                                HANDSHAKE_TIMEOUT, "size", listing))
        return actions

    def response(self, context: str | None, meta: dict, now: float) -> list:
        if context == "size" and self.state == self.OFFERED:
            resume = meta.get("resume")
            if not (isinstance(resume, list) and len(resume) == 2 and all(_is_count(v) for v in resume)
                    and (resume[0] < len(self.files) and resume[1] <= self.files[resume[0]][1]
                         or resume == [len(self.files), 0])):
                return [self._error_to_peer("bad resume point")] + self._failed(f"peer asked to resume at {resume!r}")
            self.index, self.offset = resume
            self.state = self.SENDING
            self.last_activity = now
            self.peer_window = window_in(meta) or self.peer_window
            return self._fill([])
        if context == "chunk" and self.state in (self.SENDING, self.READING):
            self.in_flight -= 1
            self.last_activity = now
            self.peer_window = window_in(meta) or self.peer_window
            return self._fill([])
        return []

    def _fill(self, actions: list) -> list:
        if self.state != self.SENDING:
            return actions
        if self.in_flight < min(self.window, self.peer_window) and self.index < len(self.files):
            items: list[list] = []
            indices: list[int] = []
            budget = BATCH_BYTES
            while self.index < len(self.files) and len(items) < BATCH_FILES and budget > 0:
                path, size, stamp = self.files[self.index]
                take = min(size - self.offset, budget)
                items.append([path, self.offset, take, stamp])
                indices.append(self.index)
                budget -= take
                if self.offset + take == size:
                    self.index, self.offset = self.index + 1, 0
                else:
                    self.offset += take
            self.reading = indices
            self.state = self.READING
            actions.append(ReadBatch(items))
            return actions
        if self.in_flight == 0 and self.index >= len(self.files):
            self.state = self.DONE
            actions += [self._serving(False), Exit()]
        return actions

    def _serving(self, still: bool) -> Send:
        """Tell the parent we hold (or gave up) one of its serving slots, as a file's provider does."""
        percent = 100 if not self.files else int(self.index * 100 / len(self.files))
        return Send(self.parent, {"Progress": {"name": self.name, "progress": percent}},
                    {"ft": 1, "serving": still, "peer": self.target.node})

    def batch_read(self, items: list, hashes: Any, now: float) -> list:
        if self.state != self.READING:
            raise RuntimeError(f"batch_read in state {self.state}")
        if not isinstance(hashes, list) or len(hashes) != len(items):
            return self.io_failed("the VFS answered ReadMany with a malformed list", now)
        assert self.reading is not None   # set when the batch went to be read
        pieces = [[i, item[1], item[2], h] for i, item, h in zip(self.reading, items, hashes)]
        nbytes = sum(item[2] for item in items)
        self.reading = None
        self.in_flight += 1
        self.state = self.SENDING
        return self._fill([Send(self.target, {"Chunk": {"name": self.name, "offset": pieces[0][0], "length": nbytes}},
                                {"ft": 1, "batch": pieces}, ACK_TIMEOUT, "chunk", forward_blob=nbytes > 0)])

    def request(self, source: Any, body: Any, meta: dict, now: float) -> list:
        if self.state in (self.DONE, self.FAILED):
            return []
        if source == self.parent and meta.get("cancel"):
            return [self._error_to_peer("the sender cancelled")] + self._failed("cancelled")
        if source == self.parent and window_in(meta):
            self.window = window_in(meta)
            return self._fill([])  # (only while sending: a batch being read fills it when sent)
        if source == self.target and isinstance(body, dict) and "Progress" in body:
            if meta.get("error"):
                return self._failed(f"the requestor stopped: {meta['error']}")
            return [Reply("Progress")]
        return [Log(f"worker: ignored a bad message from {source}: a provider takes only keepalives "
                    f"from its requestor")]

    def tick(self, now: float) -> list:
        if self.state in (self.DONE, self.FAILED):
            return []
        if now - self.last_activity > STALL_TIMEOUT:
            return self._failed(f"no progress for {STALL_TIMEOUT} s; giving up")
        return [self._serving(True), ArmTimer(TICK)]

    def request_failed(self, context: str | None, kind: str, now: float) -> list:
        if context == "tick":
            return self.tick(now)
        if context in ("size", "chunk") and self.state not in (self.DONE, self.FAILED):
            return self._failed(f"{self.target.node} stopped answering ({kind})")
        return []

    def io_failed(self, error: str, now: float) -> list:
        """A read failed: the folder changed since it was listed, or became unreadable."""
        if self.state in (self.DONE, self.FAILED):
            return []
        text = error.split(": ", 2)[-1] if ": " in error else error
        return [self._error_to_peer(f"folder {self.name} changed on {self.parent.node} during the transfer: {text}; "
                                    f"nothing was saved")] + self._failed(error)

    def _failed(self, error: str) -> list:
        self.state = self.FAILED
        return [Log(f"upload of folder {self.name} to {self.target.node} stopped: {error}"), self._serving(False),
                Exit(error)]


# ft_protocol's Requestor and Provider hand a folder over to these (SwitchToFolder)
FOLDER_MACHINES.update(requestor=FolderRequestor, provider=FolderProvider)
