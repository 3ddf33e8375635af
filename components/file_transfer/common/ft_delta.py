"""Only what changed: a download that finds an older copy of the file moves only the chunks that
differ (two sans-I/O machines, DeltaRequestor and DeltaProvider, conventions as ft_protocol's). They
take over from ft_protocol's Requestor and Provider, which say so with a SwitchToDelta action.

Negotiated in metadata, as folders are, so a plain peer and one without it never see it:
- A provider that can chunk (its host has the delta actions) offers it in Size: `{"ft":1, "delta":1}`
  (files over DELTA_MIN and up to ft_protocol.DELTA_MAX only).
- A requestor with no resume point for the file but an older copy of it (the same name in its files
  drive, else a partial download of another version, which is first moved aside to `NAME.basis`,
  removed at the end and put back after a failure) answers Size with `{"ft":1, "offset":0, "delta": {"avg": A}}` instead of a plain offset.
  Both ends then cut their own copy into content-defined chunks (FastCDC, average A bytes, in the
  host) at the same time: an unchanged chunk has the same BLAKE3 on both, wherever an insertion or a
  removal moved it.
- The provider sends its list: a `Progress` request with `{"ft":1, "chunks": {"count", "avg"}}` and
  the records (length, BLAKE3) as the blob. The requestor answers `{"ft":1, "want": [[offset,
  length]]}`: pieces of whole chunks it lacks, each at most EXT_CHUNK_SIZE.
- The provider sends the pieces in order, several to a message up to EXT_CHUNK_SIZE: `Chunk {name,
  offset, length}` with `{"ft":1, "pieces": [first index, count]}` and their bytes as the blob, at
  most its window unacknowledged. The requestor's host checks every chunk of a piece against the
  list's hash before writing any of it. Once its window is full (or all is sent) the provider sends
  its file's hash (its host took it in the same read as the chunks; HashWhole finds it kept) in
  `Progress` with `{"ft":1, "final": true, "blake3"}`.
- Once every piece is written the requestor copies the chunks it has from its old copy into the
  partial in the host, which reads the new file back in order right behind the copy, hashes it and
  syncs it (CopyRanges with `whole`; VerifyWhole when nothing is copied). It compares that hash with
  the provider's, whichever comes first; only then does it take the file's
  real name (the old copy is replaced as in any download). A failure
  removes the partial: the old copy is untouched, and the next run starts again. A failure on this
  node's side (not a hash's) first fetches the file whole once, plain (FetchWhole).
- Bounds: the provider takes only avg_for(size) (another average would be a fresh chunking of the
  whole file); the host refuses a list that could pass MAX_CHUNKS before reading, and ranges out of
  order, overlapping or past the new file's size.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ft_common import ACK_TIMEOUT, EXT_CHUNK_SIZE, STALL_TIMEOUT, TICK, WINDOW, window_in
from ft_protocol import (
    DELTA_MACHINES,
    HEX,
    ArmTimer,
    ChunkWritten,
    Exit,
    FileVerified,
    GotRequest,
    GotResponse,
    IoFailed,
    Log,
    OpenPartial,
    PartialOpened,
    RemoveFiles,
    Rename,
    Renamed,
    Reply,
    Send,
    SendFailed,
    Start,
    screen_request,
)

RECORD = struct.Struct("<I32s")   # one chunk of a list: its length, its BLAKE3 digest
MAX_CHUNKS = 1 << 18              # a longer list is refused (it travels as one message's blob)
MAX_PIECES = 1 << 17              # a longer want list is refused
INTEGRITY = "failed its integrity check"   # the host's WriteRanges refusal of a piece that does not match


LIST_RATE = 50 << 20   # bytes/s: the slowest disk a requestor may chunk its old copy from


def list_wait(size: int) -> int:
    """Seconds a provider waits for the want list after sending its chunk list: the requestor chunks
    its old copy (about as big) meanwhile, blocked, and cannot send keepalives."""
    return ACK_TIMEOUT + size // LIST_RATE


def avg_for(size: int) -> int:
    """The average chunk size both ends use for a file of `size` bytes: 64 KiB, doubled while the list
    would pass 128 Ki chunks (a piece of whole chunks then still fits in EXT_CHUNK_SIZE)."""
    avg = 64 << 10
    while size // avg > (1 << 17) and avg < (1 << 20):
        avg *= 2
    return avg


def pieces_fit(chunk: dict, blob_len: int | None, name: str, pieces: list, ids) -> bool:
    """Whether a Chunk {name, offset, length} and its blob carry exactly the pieces `ids` (in file
    order, back to back) of `name`, each piece (offset, length, chunks)."""
    total = sum(pieces[i][1] for i in ids)
    return (blob_len == total and chunk.get("name") == name and chunk.get("offset") == pieces[ids[0]][0]
            and chunk.get("length") == total)


def parse_list(data: bytes) -> list:
    """[(length, digest bytes)] of a chunk list's records."""
    if len(data) % RECORD.size:
        raise ValueError(f"a chunk list of {len(data)} bytes is not whole records")
    return list(RECORD.iter_unpack(data))


def plan(new: list, old: list, piece_max: int = EXT_CHUNK_SIZE) -> tuple:
    """How to build the new file from the old copy: -> (copies [[old offset, new offset, length]],
    pieces [(offset, length, [[offset, length, blake3 hex]] of its chunks)]). A chunk of the new file
    found anywhere in the old (same length and hash) is copied, the rest fetched; neighbours merge."""
    old_at: dict = {}
    pos = 0
    for length, digest in old:
        old_at.setdefault((length, digest), pos)
        pos += length
    copies: list = []
    pieces: list = []
    pos = 0
    for length, digest in new:
        src = old_at.get((length, digest))
        if src is not None:
            last = copies[-1] if copies else None
            if last is not None and last[0] + last[2] == src and last[1] + last[2] == pos:
                last[2] += length
            else:
                copies.append([src, pos, length])
        else:
            last = pieces[-1] if pieces else None
            if last is not None and last[0] + last[1] == pos and last[1] + length <= piece_max:
                last[1] += length
                last[2].append([pos, length, digest.hex()])
            else:
                pieces.append([pos, length, [[pos, length, digest.hex()]]])
        pos += length
    return copies, [tuple(p) for p in pieces]


def batches(want: list, limit: int = EXT_CHUNK_SIZE) -> list:
    """The provider's messages: runs of consecutive pieces [first, count] of at most `limit` bytes
    (a piece alone may be bigger)."""
    out: list = []
    total = 0
    for i, (_, length) in enumerate(want):
        if out and total + length <= limit:
            out[-1][1] += 1
            total += length
        else:
            out.append([i, 1])
            total = length
    return out


# ---- events ------------------------------------------------------------------------------------
@dataclass
class BasisChunked:
    """The old copy's chunk list (records), or None if it could not be read (`error`)."""
    records: bytes | None
    info: dict | None
    error: str | None
    now: float


@dataclass
class ListRead:
    """The provider's chunk list, from its message's blob; `digest`: the list's BLAKE3 (ft_multi's
    resume point names the list it was built from)."""
    data: bytes | None
    now: float
    digest: str | None = None


@dataclass
class RangesCopied:
    """`digest`: the new file's BLAKE3, where the copy built it whole (CopyRanges with `whole`)."""
    now: float
    digest: str | None = None


@dataclass
class BasisMoved:
    """The partial was moved aside to serve as the old copy; `stamp` is its stamp there."""
    stamp: str | None
    now: float


@dataclass
class FileChunked:
    """The file to send is chunked: the list is the blob held; `info` {"count", "size", "stamp"}."""
    info: dict
    now: float


@dataclass
class PiecesRead:
    now: float


@dataclass
class WholeHashed:
    """The file being sent, hashed whole (it still had the stamp it was opened with)."""
    digest: str
    now: float


# ---- actions -----------------------------------------------------------------------------------
@dataclass
class MoveBasisAside:
    """The old copy is a partial download: rename it to `NAME.basis` beside it (the new partial is
    built where it was); -> BasisMoved."""


@dataclass
class ChunkBasis:
    """Chunk the old copy (the file of this name in the files drive, or the partial moved aside);
    -> BasisChunked. With `copy_size`, the host copies the old copy into the partial meanwhile, at the
    same offsets, up to that many bytes (BasisChunked's info says how many: "copied")."""
    avg: int
    copy_size: int = 0


@dataclass
class ReadChunkList:
    """Take the blob of the request being handled (the provider's list); -> ListRead."""


@dataclass
class CopyRanges:
    """Copy [old offset, new offset, length] ranges of the old copy (which must still have `stamp`)
    into the partial (of `size` bytes when done), in the host; -> RangesCopied. With `whole` (every
    other byte is written already) the host also hashes the new file whole in order as it builds it,
    and syncs it: RangesCopied has its digest. `in_place`: the partial's first bytes are the old
    copy's already (ChunkBasis copied them): a range to where it was is not copied again below that."""
    items: list
    stamp: str
    size: int
    whole: bool = False
    in_place: int = 0


@dataclass
class FetchWhole:
    """Start the download again, plain (it never hands over to a delta machine again): fetching only
    what changed failed on this node's side, not for a hash."""


@dataclass
class ForgetBasis:
    """Have the host drop the old copy's chunk list kept by its stamp (a stale one may be why the file
    built from it failed its hash)."""


@dataclass
class RemoveBasis:
    """Remove the partial moved aside (MoveBasisAside); a missing one is no error."""


@dataclass
class RestoreBasis:
    """Move the partial moved aside back to its place (after the new partial was removed), for the
    next download to start from; a missing one is no error."""


@dataclass
class WriteRanges:
    """Check the blob of the request being handled against `items` [[offset, length, blake3]] (back to
    back), then write them into the partial (of `size` bytes when done), in the host;
    -> ft_protocol.ChunkWritten."""
    items: list
    size: int


@dataclass
class VerifyWhole:
    """Sync the partial and hash it whole in the host; -> ft_protocol.FileVerified."""


@dataclass
class ChunkFile:
    """Chunk the file being sent (the list stays in the host as the current blob); -> FileChunked."""
    avg: int


@dataclass
class HashWhole:
    """Hash the file being sent whole, in the host; it must keep `stamp`; -> WholeHashed."""
    stamp: Any


@dataclass
class ReadPieces:
    """Read [offset, length] ranges of the file being sent, which must still have `stamp`, into one
    blob; -> PiecesRead."""
    items: list
    stamp: Any


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# ---- the requestor -----------------------------------------------------------------------------
class DeltaRequestor:
    """Builds the new file from the old copy's chunks and the pieces the provider sends."""

    MOVING = "moving"          # moving a partial aside, to serve as the old copy
    OPENING = "opening"        # answering Size, opening the partial
    BASIS = "basis"            # chunking the old copy
    LISTING = "listing"        # waiting for the provider's chunk list
    PLANNING = "planning"      # reading the list
    RECEIVING = "receiving"    # taking pieces
    WRITING = "writing"        # a piece is being checked and written
    COPYING = "copying"        # every piece written: copying the chunks we have, the new file hashed as it is built
    BUILT = "built"            # built and hashed; waiting for the provider's hash
    VERIFYING = "verifying"    # the whole file is being hashed (nothing was copied), then compared and renamed
    DONE = "done"
    FAILED = "failed"
    STATES = frozenset({MOVING, OPENING, BASIS, LISTING, PLANNING, RECEIVING, WRITING, COPYING, BUILT, VERIFYING,
                        DONE, FAILED})

    def __init__(self, req: Any, basis: dict, now: float):
        self.name = req.name
        self.peer = req.peer
        self.peer_node = req.peer_node
        self.parent = req.parent
        self.provider = req.provider
        self.size = req.known_size
        self.window = req.window
        self.started = req.started
        self.last_activity = now
        # {"size", "stamp", "partial": the old copy is a partial download, "aside": moved aside already}
        self.basis = dict(basis)
        self.aside = bool(basis.get("partial"))
        self.avg = avg_for(self.size)
        self.state = self.OPENING
        self.file_open = False
        self.basis_list: list = []
        self.whole: str | None = None   # the provider's file hash, sent after its list
        self.want: list = []            # [offset, length] of the pieces asked for
        self.pieces: list = []          # (offset, length, [[offset, length, blake3]]) of each
        self.left: set = set()          # pieces not yet written
        self.copies: list = []
        self.copy_done = False
        self.built: str | None = None   # the new file's hash, as this node's host built it
        self.copied = 0                 # bytes taken from the old copy
        self.in_place = 0               # the partial's first bytes the host copied there from the old copy
        self.fetched = 0                # bytes of pieces written
        self.moved = 0                  # bytes that came over the link: the list and the pieces
        self.writing: tuple | None = None  # (first, count, wants_ack) of the pieces being written
        self.keepalive_out = False
        self.last_report = 0.0
        self.last_percent = -1
        self.verified_digest: str | None = None

    def _window_meta(self) -> dict:
        return {"window": self.window} if self.window else {}

    def start(self) -> list:
        """Answer the provider's Size (we want its list), and open a fresh partial."""
        actions = [Reply("Progress", {"ft": 1, "offset": 0, "delta": {"avg": self.avg}, **self._window_meta()}),
                   Log(f"{self.name}: fetching only what changed since the copy this node has"),
                   RemoveFiles(state=True, partial=False)]   # no plain resume over what this run writes
        if self.aside and not self.basis.get("aside"):
            self.state = self.MOVING
            return actions + [MoveBasisAside()]
        return actions + [OpenPartial(0)]

    def basis_moved(self, stamp: str | None, now: float) -> list:
        if stamp is None:   # gone meanwhile: every chunk is fetched
            self.basis["stamp"] = ""
        else:
            self.basis["stamp"] = stamp   # a rename changes a file's stamp (its ctime)
        self.state = self.OPENING
        return [OpenPartial(0)]

    def handle(self, ev: Any) -> list:
        t = type(ev)
        if t is GotRequest:
            return self.request(ev.source, ev.body, ev.meta, ev.wants_answer, ev.blob_len, ev.now)
        if t is GotResponse:
            if ev.context == "keepalive":
                self.keepalive_out = False
            return []
        if t is SendFailed:
            return self.request_failed(ev.context, ev.kind, ev.now)
        if t is BasisMoved:
            return self._expect(self.MOVING, ev) or self.basis_moved(ev.stamp, ev.now)
        if t is PartialOpened:
            return self._expect(self.OPENING, ev) or self.partial_opened(ev.now)
        if t is BasisChunked:
            return self._expect(self.BASIS, ev) or self.basis_chunked(ev.records, ev.info, ev.error, ev.now)
        if t is ListRead:
            return self._expect(self.PLANNING, ev) or self.list_read(ev.data, ev.now)
        if t is RangesCopied:
            return self._expect(self.COPYING, ev) or self.ranges_copied(ev.now, ev.digest)
        if t is ChunkWritten:
            return self._expect(self.WRITING, ev) or self.pieces_written(ev.now)
        if t is FileVerified:
            return self._expect(self.VERIFYING, ev) or self.file_hashed(ev.digest, ev.now)
        if t is Renamed:
            return self._expect(self.VERIFYING, ev) or self.renamed(ev.replaced, ev.now)
        if t is IoFailed:
            if self.state == self.MOVING:   # the partial was not moved: there is nothing to put back
                self.aside = False
            if self.state == self.WRITING and INTEGRITY in ev.error:  # the host refused a piece: the peer's fault
                return self.fail(f"{self.peer_node} sent data that does not match its chunk list ({ev.error})",
                                 keep=False, now=ev.now)
            # a failure here (a host call timed out, the old copy changed): once more, whole; not when the
            # partial could not be moved aside (it stays as it is)
            return self.fail(ev.error, keep=False, now=ev.now, whole=self.state != self.MOVING)
        raise TypeError(f"a DeltaRequestor takes no {t.__name__}")

    def _expect(self, state: str, ev: Any) -> list:
        if self.state != state:
            raise RuntimeError(f"{type(ev).__name__} in state {self.state}")
        return []

    def partial_opened(self, now: float) -> list:
        self.file_open = True
        self.state = self.BASIS
        # the old copy goes into the partial as it is read: what did not move is on its way to the disk
        # while both ends still chunk (pieces and moved chunks then overwrite the rest)
        return [ChunkBasis(self.avg, copy_size=self.size)]

    def basis_chunked(self, records: bytes | None, info: dict | None, error: str | None, now: float) -> list:
        self.state = self.LISTING
        actions: list = []
        try:
            if records is None or not isinstance(info, dict) or info.get("stamp") != self.basis.get("stamp"):
                raise ValueError(error or "the copy changed meanwhile")
            self.basis_list = parse_list(records)
            copied = info.get("copied", 0)
            self.in_place = copied if _int(copied) and copied <= self.size else 0
        except ValueError as e:
            # the provider was asked for its list already: go on, fetching every chunk
            self.basis_list = []
            actions.append(Log(f"{self.name}: the copy this node has cannot be used ({e}); fetching it whole"))
        self._keepalive(actions)
        return actions

    def request(self, source: Any, body: Any, meta: dict, wants_answer: bool, blob_len: int | None,
                now: float) -> list:
        screened = screen_request(self, source, meta, now)
        if screened is not None:
            return screened
        if source != self.provider or not isinstance(body, dict):
            return [Log(f"worker: ignored a bad message from {source}: not this transfer's provider")]
        if "Progress" in body and isinstance(meta.get("chunks"), dict) and self.state == self.LISTING:
            info = meta["chunks"]
            count = info.get("count")
            if not (_int(count) and count <= MAX_CHUNKS and blob_len == count * RECORD.size
                    and info.get("avg") == self.avg):
                return self.fail("peer sent a malformed chunk list", keep=False, now=now)
            self.moved += count * RECORD.size
            self.last_activity = now
            self.state = self.PLANNING
            return [ReadChunkList()]
        if isinstance(body.get("Chunk"), dict) and isinstance(meta.get("pieces"), list):
            return self.chunk(body["Chunk"], meta["pieces"], wants_answer, blob_len, now)
        if "Progress" in body and meta.get("final") and self.whole is None:
            digest = meta.get("blake3")
            if not (isinstance(digest, str) and len(digest) == 64 and HEX.issuperset(digest)):
                return self.fail("peer sent a malformed file hash", keep=False, now=now)
            self.whole = digest
            self.last_activity = now
            if self.state == self.BUILT:
                self.state = self.VERIFYING
                return self.file_verified(self.built, now)
            return []
        return [Log(f"worker: ignored a bad message from {source}: unknown request")]

    def list_read(self, data: bytes | None, now: float) -> list:
        try:
            new = parse_list(data or b"")
        except ValueError:
            new = None
        if new is None or sum(n for n, _ in new) != self.size:
            return self.fail("peer sent a chunk list that does not add up to the file", keep=False, now=now)
        self.copies, self.pieces = plan(new, self.basis_list)
        self.want = [[off, n] for off, n, _ in self.pieces]
        self.left = set(range(len(self.pieces)))
        actions: list = [Reply("Progress", {"ft": 1, "want": self.want, **self._window_meta()})]
        wanted = sum(n for _, n in self.want)
        actions.append(Log(f"{self.name}: {self.size - wanted} of {self.size} bytes are in the copy this node "
                           f"has; fetching {wanted} bytes in {len(self.want)} pieces"))
        self.state = self.RECEIVING
        self.last_activity = now
        return self._maybe_finish(actions)

    def ranges_copied(self, now: float, digest: str | None) -> list:
        self.copy_done = True
        self.copied = sum(n for _, _, n in self.copies)
        if digest is None:
            return self.fail("the host did not hash the file it built", keep=False, now=now)
        return self.file_hashed(digest, now)

    def file_hashed(self, digest: str | None, now: float) -> list:
        """The new file is built, synced and hashed here: compare when the provider's hash is in."""
        self.built = digest
        self.last_activity = now
        actions: list = []
        self._report(actions, now)
        if self.whole is None:
            self.state = self.BUILT
            return actions
        self.state = self.VERIFYING
        return actions + self.file_verified(digest, now)

    def chunk(self, chunk: dict, pieces: list, wants_ack: bool, blob_len: int | None, now: float) -> list:
        if self.state != self.RECEIVING:
            return [Log(f"worker: ignored a bad message from {self.provider}: a Chunk in state {self.state}")]
        first, count = (pieces + [None, None])[:2]
        if not (len(pieces) == 2 and _int(first) and _int(count) and count >= 1
                and first + count <= len(self.pieces)):
            return self.fail("peer sent pieces that were not asked for", keep=False, now=now)
        idx = range(first, first + count)
        if any(i not in self.left for i in idx):
            return self.fail("peer sent a piece twice", keep=False, now=now)
        if not pieces_fit(chunk, blob_len, self.name, self.pieces, idx):
            return self.fail(f"peer sent pieces that do not fit what was asked (at offset {chunk.get('offset')}, "
                             f"{blob_len} bytes)", keep=False, now=now)
        self.writing = (first, count, wants_ack)
        self.state = self.WRITING
        return [WriteRanges([c for i in idx for c in self.pieces[i][2]], self.size)]

    def pieces_written(self, now: float) -> list:
        assert self.writing is not None
        first, count, wants_ack = self.writing
        self.writing = None
        for i in range(first, first + count):
            self.left.discard(i)
            self.fetched += self.pieces[i][1]
            self.moved += self.pieces[i][1]
        actions: list = []
        if wants_ack:
            actions.append(Reply("Progress", {"ft": 1, "ack": self.pieces[first][0], **self._window_meta()}))
        self.state = self.RECEIVING
        self.last_activity = now
        self._report(actions, now)
        self._keepalive(actions)
        return self._maybe_finish(actions)

    def _maybe_finish(self, actions: list) -> list:
        """Every piece written: build the rest from the old copy, hashing the whole as it is built (one
        pass over the file, not a copy then a re-read; after the pieces, so the hash runs in order)."""
        if self.state != self.RECEIVING or self.left:
            return actions
        if self.copies:
            self.state = self.COPYING
            actions.append(CopyRanges(self.copies, self.basis["stamp"], self.size, whole=True,
                                      in_place=self.in_place))
        else:
            self.state = self.VERIFYING
            actions.append(VerifyWhole())
        return actions

    def file_verified(self, digest: str | None, now: float) -> list:
        if digest != self.whole:
            return [ForgetBasis()] + self.fail("the file built from the local copy and the fetched pieces does not match the "
                             "provider's hash (the provider's list lied, or a file changed meanwhile); nothing "
                             "was saved, the local copy is unchanged", keep=False, now=now)
        self.verified_digest = digest
        # the old copy had the new content if every chunk was copied to where it was (no need to hash it)
        same = not self.pieces and self.basis.get("size") == self.size and all(s == d for s, d, _ in self.copies)
        return [Rename(digest, basis=(self.basis["stamp"], same))]

    def renamed(self, replaced: bool, now: float) -> list:
        actions: list = [RemoveFiles(state=True, partial=False)] + ([RemoveBasis()] if self.aside else [])
        self._report(actions, now, done=True, hash=self.verified_digest, moved=self.moved,
                     **({"replaced": True} if replaced else {}))
        self.state = self.DONE
        actions.append(Exit())
        return actions

    def tick(self, now: float) -> list:
        if self.state in (self.DONE, self.FAILED):
            return []
        if now - self.last_activity > STALL_TIMEOUT:
            return self.fail(f"no progress for {STALL_TIMEOUT} s; giving up", keep=False, now=now)
        actions: list = []
        self._keepalive(actions)
        actions.append(ArmTimer(TICK))
        return actions

    def request_failed(self, context: str | None, kind: str, now: float) -> list:
        if context == "tick":
            return self.tick(now)
        if context == "keepalive":
            reason = "went offline" if kind == "offline" else "stopped answering"
            return self.fail(f"{self.peer_node} {reason} during the transfer", keep=False, now=now)
        return []

    def fail(self, error: str, keep: bool, now: float, whole: bool = False) -> list:
        """Tell the provider, remove the partial (the old copy is untouched), tell the parent, end; with
        `whole`, fetch the file whole instead of ending."""
        if self.state in (self.DONE, self.FAILED):
            return []
        self.state = self.FAILED
        actions: list = [Send(self.provider, {"Progress": {"name": self.name, "progress": max(self.last_percent, 0)}},
                              {"ft": 1, "error": error})]
        actions.append(RemoveFiles(state=True, partial=self.file_open))
        if self.aside:   # nothing lost: the next download starts from it again
            actions.append(RestoreBasis())
        if whole:
            return actions + [Log(f"{self.name}: fetching only what changed failed ({error}); fetching it whole"),
                              FetchWhole()]
        self._report(actions, now, error=error)
        actions.append(Exit(error))
        return actions

    def _keepalive(self, actions: list) -> None:
        if not self.keepalive_out:
            actions.append(Send(self.provider, {"Progress": {"name": self.name, "progress": max(self.last_percent, 0)}},
                                {"ft": 1}, ACK_TIMEOUT, "keepalive"))
            self.keepalive_out = True

    def _report(self, actions: list, now: float, **extra) -> None:
        done = self.copied + self.fetched
        percent = 100 if not self.size else int(done * 100 / self.size)
        if not extra and percent == self.last_percent and now - self.last_report < 1.0:
            return
        self.last_percent, self.last_report = percent, now
        secs = max(now - self.started, 1e-6)
        meta = {"ft": 1, "peer": self.peer_node, "bytes": done, "total": self.size, "rate": done / secs,
                "secs": secs}
        meta.update(extra)
        actions.append(Send(self.parent, {"Progress": {"name": self.name, "progress": percent}}, meta, 5, "progress"))


# ---- the provider ------------------------------------------------------------------------------
class DeltaProvider:
    """Sends the chunk list of its file, then the pieces the requestor asks for."""

    CHUNKING = "chunking"      # the file is being chunked
    LISTED = "listed"          # the list is sent; waiting for what the requestor wants
    SENDING = "sending"        # pieces in flight
    READING = "reading"        # pieces are being read
    HASHING = "hashing"        # the file is being hashed whole
    DONE = "done"
    FAILED = "failed"
    STATES = frozenset({CHUNKING, LISTED, SENDING, READING, HASHING, DONE, FAILED})

    def __init__(self, prov: Any, avg: int, now: float):
        self.name = prov.name
        self.target = prov.target
        self.parent = prov.parent
        self.size = prov.size
        self.stamp = prov.stamp
        self.window = prov.window
        self.peer_window = prov.peer_window or WINDOW
        self.started = prov.started
        self.last_activity = now
        self.avg = avg
        self.state = self.CHUNKING
        self.want: list = []
        self.plan: list = []        # [first, count] of each message
        self.next = 0               # the next message of the plan
        self.reading: list | None = None
        self.in_flight = 0
        self.sent = 0
        self.hashed = False         # the whole file's hash is sent

    def start(self) -> list:
        want = avg_for(self.size)
        if self.avg != want:   # any other average would be a fresh chunking of the whole file, never cached
            return self._error("bad delta request", f"peer asked for chunks of average size {self.avg}, not {want}")
        return [ChunkFile(self.avg)]

    def handle(self, ev: Any) -> list:
        t = type(ev)
        if t is FileChunked:
            return self.file_chunked(ev.info, ev.now)
        if t is PiecesRead:
            return self.pieces_read(ev.now)
        if t is WholeHashed:
            return self.whole_hashed(ev.digest, ev.now)
        if t is GotResponse:
            return self.response(ev.context, ev.meta, ev.now)
        if t is GotRequest:
            return self.request(ev.source, ev.body, ev.meta, ev.now)
        if t is SendFailed:
            return self.request_failed(ev.context, ev.kind, ev.now)
        if t is IoFailed:
            return self.io_failed(ev.error, ev.now)
        if t is Start:
            return self.start()
        raise TypeError(f"a DeltaProvider takes no {t.__name__}")

    def file_chunked(self, info: dict, now: float) -> list:
        if self.state != self.CHUNKING:
            raise RuntimeError(f"file_chunked in state {self.state}")
        if info.get("stamp") != self.stamp or info.get("size") != self.size:
            return self._error(f"{self.name} changed on {self.parent.node} during the transfer; nothing was saved",
                               "file changed while being chunked")
        self.state = self.LISTED
        self.last_activity = now
        return [Send(self.target, {"Progress": {"name": self.name, "progress": 0}},
                     {"ft": 1, "chunks": {"count": info.get("count"), "avg": self.avg}},
                     list_wait(self.size), "chunks", forward_blob=True)]

    def whole_hashed(self, digest: str, now: float) -> list:
        if self.state != self.HASHING:
            raise RuntimeError(f"whole_hashed in state {self.state}")
        self.hashed = True
        self.state = self.SENDING
        self.last_activity = now
        return self._fill([Send(self.target, {"Progress": {"name": self.name, "progress": 100}},
                                {"ft": 1, "final": True, "blake3": digest})])

    def response(self, context: str | None, meta: dict, now: float) -> list:
        if context == "chunks" and self.state == self.LISTED:
            want = meta.get("want")
            if not (isinstance(want, list) and self._valid(want)):
                return self._error("bad list of pieces", "peer asked for a bad list of pieces")
            self.want = want
            self.plan = batches(want)
            self.peer_window = window_in(meta) or self.peer_window
            self.last_activity = now
            self.state = self.SENDING
            return self._fill([])
        if context == "piece" and self.state in (self.SENDING, self.READING, self.HASHING):
            self.in_flight -= 1
            self.last_activity = now
            self.peer_window = window_in(meta) or self.peer_window
            return self._fill([]) if self.state == self.SENDING else []
        return []

    def _fill(self, actions: list) -> list:
        if self.in_flight < min(self.window, self.peer_window) and self.next < len(self.plan):
            first, count = self.plan[self.next]
            self.reading = [first, count]
            self.state = self.READING
            actions.append(ReadPieces([list(self.want[i]) for i in range(first, first + count)], self.stamp))
            return actions
        if not self.hashed:
            # the window is full, or all is sent: the whole file's hash now, while the pieces travel
            self.state = self.HASHING
            actions.append(HashWhole(self.stamp))
            return actions
        if self.next >= len(self.plan) and self.in_flight == 0:
            return actions + self._done()
        return actions

    def pieces_read(self, now: float) -> list:
        if self.state != self.READING or self.reading is None:
            raise RuntimeError(f"pieces_read in state {self.state}")
        first, count = self.reading
        self.reading = None
        total = sum(self.want[i][1] for i in range(first, first + count))
        self.next += 1
        self.in_flight += 1
        self.sent += total
        self.state = self.SENDING
        return self._fill([Send(self.target, {"Chunk": {"name": self.name, "offset": self.want[first][0],
                                                         "length": total}},
                                {"ft": 1, "pieces": [first, count]}, ACK_TIMEOUT, "piece", forward_blob=True)])

    def request(self, source: Any, body: Any, meta: dict, now: float) -> list:
        if self.state in (self.DONE, self.FAILED):
            return []
        if source == self.parent and meta.get("cancel"):
            return self._failed("cancelled")
        if source == self.parent and window_in(meta):
            self.window = window_in(meta)
            return self._fill([]) if self.state == self.SENDING else []
        if source == self.target and isinstance(body, dict) and "Progress" in body:
            if meta.get("error"):
                return self._failed(f"the requestor stopped: {meta['error']}")
            return [Reply("Progress")]
        return [Log(f"worker: ignored a bad message from {source}: a provider takes only keepalives "
                    f"from its requestor")]

    def request_failed(self, context: str | None, kind: str, now: float) -> list:
        if context == "tick":
            return self.tick(now)
        if context in ("chunks", "piece") and self.state not in (self.DONE, self.FAILED):
            return self._failed(f"{self.target.node} stopped acknowledging ({kind})")
        return []

    def _valid(self, want: Any) -> bool:
        """A want list: pieces [offset, length] within the file, each at most a message's worth (honest
        pieces are whole chunks of at most EXT_CHUNK_SIZE), with those asked before at most MAX_PIECES."""
        return isinstance(want, list) and len(self.want) + len(want) <= MAX_PIECES and all(
            isinstance(p, list) and len(p) == 2 and _int(p[0]) and _int(p[1])
            and 1 <= p[1] <= EXT_CHUNK_SIZE and p[0] + p[1] <= self.size for p in want)

    def _stall_limit(self) -> int:
        """Seconds without activity before giving up: the first want list may wait for the requestor's
        chunking of its old copy (list_wait)."""
        return list_wait(self.size) if self.state == self.LISTED else STALL_TIMEOUT

    def tick(self, now: float) -> list:
        if self.state in (self.DONE, self.FAILED):
            return []
        limit = self._stall_limit()
        if now - self.last_activity > limit:
            return self._failed(f"no progress for {limit} s; giving up")
        return [self._serving(True), ArmTimer(TICK)]

    def io_failed(self, error: str, now: float) -> list:
        if self.state in (self.DONE, self.FAILED):
            return []
        return self._error(f"{self.name} changed on {self.parent.node} during the transfer (it is gone or "
                           f"unreadable); nothing was saved", error)

    def _serving(self, still: bool) -> Send:
        percent = 100 if not self.size else min(100, int(self.sent * 100 / self.size))
        return Send(self.parent, {"Progress": {"name": self.name, "progress": percent}},
                    {"ft": 1, "serving": still, "peer": self.target.node})

    def _error(self, text: str, log: str) -> list:
        return [Send(self.target, {"Size": 0}, {"ft": 1, "error": text, "keep": False})] + self._failed(log)

    def _done(self) -> list:
        self.state = self.DONE
        return [self._serving(False), Exit()]

    def _failed(self, error: str) -> list:
        self.state = self.FAILED
        return [Log(f"upload of {self.name} to {self.target.node} stopped: {error}"), self._serving(False),
                Exit(error)]


# ft_protocol's Requestor and Provider hand over to these (SwitchToDelta)
DELTA_MACHINES.update(requestor=DeltaRequestor, provider=DeltaProvider)
