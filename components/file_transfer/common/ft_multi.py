"""From every node that has it: one file fetched in pieces from several providers at once
(`download NAME A,B,C`), two sans-I/O machines (MultiRequestor, MultiProvider), conventions as
ft_protocol's. Built on ft_delta's chunk lists, pieces and host checks.

Negotiated in metadata, as delta is, so a plain peer and one without it never see it:
- A provider that can send only what changed offers `{"ft":1, "delta":1, "multi":1}` in Size (files
  over DELTA_MIN only). The requestor asks every listed node for the file and answers each such
  Size with `{"ft":1, "offset":0, "delta": {"avg": A, "multi": 1}}` (A: MULTI_AVG); a
  MultiProvider takes over there. A Size without the offer (a plain peer, an older one, a small file)
  is not answered: the node is named ("does not support multi-source downloads") and skipped (an
  extended one is told to stop; a plain one's pushed chunks are dropped unread). A node that is busy
  (queued) is skipped; all of them busy is a clear error (no waiting in several queues). A Size that
  shows a folder fails the download: a folder comes from one node.
- Each provider sends its chunk list (ft_delta, chunks of MULTI_AVG); the requestor answers it with an
  empty want (`{"ft":1, "want": []}`): a MultiProvider then waits for more instead of ending. The
  requestor keeps the providers whose list is that of the most nodes, as soon as more than half of
  the listed nodes agree, else once every node has answered or dropped out: the same list is the
  same content, chunk by chunk (BLAKE3). A tie between different lists fails, naming each side. Any
  other is named ("has different content") and told to stop; one of the same list that comes later
  joins (its share of the pieces is kept for it while it chunks, PROVIDER_STALL at most). A node
  that sends no list within PROVIDER_STALL of the first one (or of the choice) is dropped.
- The file's pieces (whole chunks, at most EXT_CHUNK_SIZE each) wait in one pool, in file order. Each
  provider is asked for a few at a time (a `Progress` request `{"ft":1, "want": [[offset, length]]}`,
  appended to what it was asked before; its Chunks name pieces by their index in that whole list), at
  most DEPTH outstanding, and for more as each arrives: a faster provider is asked more often.
- A provider that goes offline, stops answering, sends nothing for PROVIDER_STALL seconds while it
  owes pieces, or sends a piece that fails the host's check against the list (WriteRanges), or pieces
  out of file order in one message, is named and dropped, its outstanding pieces back in the pool for
  the others. With no provider left, the download fails (the partial kept to resume). A write refused for
  another reason is this node's (its disk) and fails the download.
- Each provider hashes its file whole once pieces travel (ft_delta's final hash). All pieces written,
  the requestor hashes the file whole (CHECKED) and compares it with the hashes of the chosen list's
  providers: one that differs is named and dropped, and a matching one awaited; only a match lets the
  file take its name. None left that could match, or none sent for STALL_TIMEOUT: a clear failure.
  It tells each provider it is done (`{"ft":1, "done": true}`), which ends the provider, and prints
  how much each one served. A MultiProvider counts only want lists and acks as activity (not
  keepalives) and ends a session idle for STALL_TIMEOUT.
- Resume: while pieces arrive (once a tick) and when the download stops for any reason but a cancel
  or a whole file that fails its check, the partial is synced, then a resume point saved beside it
  (SavePieces: `{"multi":1, "size", "list": BLAKE3 of the chosen list's bytes, "written": [[offset,
  length]]}`, at most MAX_STATE). It is read at the start (LoadState); once a list is chosen, the same
  list's written pieces lying within the partial are not asked for again (one piece at least is: a
  provider hashes its file whole only once pieces travel); else point and partial are dropped. The
  final whole-file check is unchanged, so a wrong point can only fail it.
- If no node can serve pieces but one answered Size (a plain peer, a file of one chunk), the download
  starts again from the first such node alone (FetchSingle): an ordinary download.
- An older copy here (the file of that name in the files drive, as ft_delta's; the worker passes it in
  StateLoaded) is chunked at MULTI_AVG (ChunkBasis) once every listed node has answered Size, so at
  the same time as the providers chunk theirs (or, at the latest, before the pool is made). Once a list
  is chosen, ft_delta.plan splits it: only the chunks the old copy lacks become pieces in the pool (one
  piece at least, for a provider's hash); the rest is copied from the old copy when every piece is in
  (CopyRanges with `whole`: the host copies, hashes the new file read back and syncs it), and that hash
  is compared as VerifyWhole's would be. The old copy changed since (the host refuses the copy) or the
  copy failed: those chunks are fetched from the providers instead, then the file hashed again. The file
  built matching no provider's hash (once all that were asked for pieces sent theirs): the old copy (or
  its kept list, then forgotten: ForgetBasis) may be wrong, so nobody is dropped; those chunks are
  fetched and the check is made again, by the usual rule. A resume point names only fetched pieces: a
  resumed download copies from the old copy again at the end. The old copy is only read; it is replaced
  only when the file takes its name. The end line adds what came from it, and the report `moved`.
"""
from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from typing import Any

from ft_common import (
    ACK_TIMEOUT,
    DELTA_MIN,
    HANDSHAKE_TIMEOUT,
    STALL_TIMEOUT,
    TICK,
    human_size,
    window_in,
)
from ft_delta import (
    INTEGRITY,
    MAX_CHUNKS,
    MAX_PIECES,
    RECORD,
    BasisChunked,
    ChunkBasis,
    ChunkFile,
    CopyRanges,
    DeltaProvider,
    ForgetBasis,
    ListRead,
    RangesCopied,
    ReadChunkList,
    VerifyWhole,
    WriteRanges,
    _int,
    batches,
    parse_list,
    pieces_fit,
    plan,
)
from ft_protocol import (
    DELTA_MACHINES,
    DELTA_MAX,
    DELTA_MAX_AVG,
    HEX,
    QUEUE_META,
    ArmTimer,
    ChunkWritten,
    Exit,
    FileVerified,
    GotRequest,
    GotResponse,
    IoFailed,
    LoadState,
    Log,
    OpenPartial,
    PartialOpened,
    RemoveFiles,
    Rename,
    Renamed,
    Reply,
    Requestor,
    Send,
    SendFailed,
    Start,
    StateLoaded,
    address_json,
)

SEP = ","               # between the nodes of a multi-source download (a node name has none)
DEPTH = 4               # pieces asked of one provider and not yet received, at most
PROVIDER_STALL = STALL_TIMEOUT // 3   # seconds a provider may owe pieces and send none before it is dropped
# the chunks' average size: the biggest (chunking is then a third of the work of delta's 64 KiB, and the
# list the shortest), so an old copy here is matched more coarsely; its chunks still fit a piece (at most 4 x avg)
MULTI_AVG = DELTA_MAX_AVG
MAX_STATE = 1 << 20     # bytes of a resume point, at most: a bigger one is not written, and not read
UNREADABLE = "unreadable"   # what the worker passes for a resume point it could not read


def nodes_of(text: str) -> list | None:
    """The providers of a multi-source download named `text` ("A,B,C"), or None for a single node."""
    return text.split(SEP) if SEP in text else None


def partial_folder(text: str) -> str:
    """The folder of a multi-source download's partial under PARTIAL_DIR: short (a long list of nodes
    would pass a file name's 255 bytes) and the same for the same nodes in any order (FNV-1a)."""
    h = 0xcbf29ce484222325
    for b in SEP.join(sorted(text.split(SEP))).encode():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"multi-{h:016x}"


def check_nodes(text: str, our: str) -> str:
    """Why `text` is not a usable list of providers (or '' when it is, or is one node)."""
    nodes = nodes_of(text)
    if nodes is None:
        return ""
    if any(not n for n in nodes):
        return f"bad list of nodes {text!r}: a name between two commas is missing"
    if len(set(nodes)) != len(nodes):
        return f"bad list of nodes {text!r}: a node is named twice"
    if our in nodes:
        return f"{our} is this node; list only the other nodes that have the file"
    return ""


# ---- actions -----------------------------------------------------------------------------------
@dataclass
class FetchSingle:
    """No listed node can serve pieces of the file, but `node` can send it whole: start the download
    again from it alone (an ft_protocol.Requestor, reporting under `key`); requests still coming from
    the `stale` addresses (the first sessions) are dropped unread."""
    node: str
    key: str
    stale: list


@dataclass
class SavePieces:
    """Sync the partial, then write `data` (the resume point, JSON) as the state file: it never names
    a piece that is not on disk."""
    data: bytes


class AloneRequestor(Requestor):
    """An ordinary download from one node of a multi-source list: it reports as the whole list, which
    is how its parent knows the download."""

    def __init__(self, *args: Any, key: str, **kw: Any):
        super().__init__(*args, **kw)
        self.key = key

    def _report(self, actions: list, now: float, **extra: Any) -> None:
        n = len(actions)
        super()._report(actions, now, **extra)
        for a in actions[n:]:
            if isinstance(a, Send) and a.target == self.parent and isinstance(a.metadata, dict):
                a.metadata["peer"] = self.key


# ---- the requestor -----------------------------------------------------------------------------
class Source:
    """One listed node, as the requestor sees it."""

    ASKING = "asking"      # Download sent, no Size yet
    SIZED = "sized"        # Size answered, its list not yet here
    READY = "ready"        # its list is here; waiting for the others
    ACTIVE = "active"      # serving pieces
    DROPPED = "dropped"

    def __init__(self, addr: Any, order: int, now: float):
        self.addr = addr
        self.node = addr.node
        self.order = order
        self.state = self.ASKING
        self.worker: Any = None     # its provider worker, once its Size came
        self.ext = False            # it speaks the extended protocol (can be told to stop)
        self.alone = False          # it answered Size but cannot serve pieces: it could send the file whole
        self.size: int | None = None
        self.records: bytes | None = None
        self.list_digest: str | None = None   # BLAKE3 of its list's bytes
        self.whole: str | None = None
        self.why = ""
        self.busy = 0               # its place in its queue, when it serves others first
        self.asked: list = []       # piece ids in the order asked: the provider's indices
        self.outstanding: set = set()
        self.last_piece = now
        self.keepalive_out = False
        self.pieces = 0
        self.bytes = 0

    def key(self) -> tuple:
        # the same list is the same content: every chunk's BLAKE3 (the whole file's hash comes later)
        return (self.size, self.records)


class MultiRequestor:
    """Fetches `name` in pieces from every listed node that has the same file."""

    ASKING = "asking"          # waiting for every node's Size, list and hash (or its dropping out)
    BASIS = "basis"            # the old copy is being chunked (no event comes meanwhile: BasisChunked ends it)
    RECEIVING = "receiving"    # taking pieces
    WRITING = "writing"        # a message of pieces is being checked and written
    COPYING = "copying"        # every piece written: the chunks the old copy has are copied, the file hashed
    VERIFYING = "verifying"    # the whole file is being hashed, then renamed
    CHECKED = "checked"        # hashed; waiting for a provider's hash of the whole file that matches
    HANDED = "handed"          # started again from one node alone (FetchSingle)
    DONE = "done"
    FAILED = "failed"
    STATES = frozenset({ASKING, BASIS, RECEIVING, WRITING, COPYING, VERIFYING, CHECKED, HANDED, DONE, FAILED})

    def __init__(self, name: str, peer: Any, parent: Any, now: float):
        self.name = name
        self.peer_node = peer.node           # "A,B,C": the key this download is known by
        self.parent = parent
        self.started = self.last_activity = now
        self.sources = [Source(type(peer)(n, peer.process), i, now) for i, n in enumerate(nodes_of(peer.node) or [peer.node])]
        self.state = self.ASKING
        self.window: int | None = None
        self.size = 0
        self.chosen: tuple | None = None    # the list chosen: (size, records)
        self.decided = now                  # when it was chosen
        self.first_ready: float | None = None   # when the first list came
        self.pieces: list = []              # (offset, length, [[offset, length, blake3]]) of each
        self.pool: list = []                # heap of piece ids not asked of anyone now
        self.left = 0                       # pieces not yet written
        self.file_open = False
        self.listing: Source | None = None  # whose list is being read
        self.writing: tuple | None = None   # (source, ids, wants_ack) of the message being written
        self.received = 0
        self.last_report = 0.0
        self.last_percent = -1
        self.verified_digest: str | None = None
        self.checked = now                  # when the whole file was hashed here
        self.saved: Any = None              # the resume point read at the start (None: none)
        self.partial_len: int | None = None
        self.done: set = set()              # piece ids written (and passed the host's check)
        self.resumed = 0                    # bytes of them found here at the start
        self.unsaved = False                # pieces written since the resume point was saved
        # the older copy of the file this node has (ft_delta's basis: {"size", "stamp"}), chunked at MULTI_AVG
        # while the providers chunk theirs; its chunks are copied, not fetched
        self.basis: dict | None = None
        self.basis_list: list | None = None  # its records, once chunked ([] when it cannot be used)
        self.basis_records = b""
        self.copies: list = []              # [old offset, new offset, length] to copy from it at the end
        self.copy_keys: set = set()         # the (length, digest) of the chunks those copies hold
        self.copied = 0                     # bytes built from it
        self.list_bytes = 0                 # bytes of chunk lists received

    # ---- events ----
    def handle(self, ev: Any) -> list:
        t = type(ev)
        if t is GotRequest:
            return self.request(ev.source, ev.body, ev.meta, ev.wants_answer, ev.blob_len, ev.now)
        if t is GotResponse:
            return self.response(ev.context, ev.body, ev.meta, ev.now)
        if t is SendFailed:
            return self.request_failed(ev.context, ev.kind, ev.now)
        if t is ListRead:
            return self.list_read(ev.data, ev.now, ev.digest)
        if t is StateLoaded:
            return self.state_loaded(ev.saved, ev.partial_len, ev.basis)
        if t is BasisChunked:
            return self.basis_chunked(ev.records, ev.info, ev.error, ev.now)
        if t is RangesCopied:
            return self.ranges_copied(ev.digest, ev.now)
        if t is PartialOpened:
            return self.partial_opened(ev.now)
        if t is ChunkWritten:
            return self.pieces_written(ev.now)
        if t is FileVerified:
            return self.file_verified(ev.digest, ev.now)
        if t is Renamed:
            return self.renamed(ev.replaced, ev.now)
        if t is IoFailed:
            return self.io_failed(ev.error, ev.now)
        if t is Start:
            return self.start()
        raise TypeError(f"a MultiRequestor takes no {t.__name__}")

    def start(self) -> list:
        actions: list = [ArmTimer(TICK),
                         Log(f"{self.name}: fetching it from {', '.join(s.node for s in self.sources)} at once")]
        self._report(actions, self.started, providers=len(self.sources))   # the parent knows its worker at once
        return actions + [LoadState()]

    def state_loaded(self, saved: Any, partial_len: int | None, basis: dict | None = None) -> list:
        """The resume point of an earlier run (used once the list is chosen) and the old copy (chunked
        once every node has answered Size), then ask every node."""
        self.saved, self.partial_len = saved, partial_len
        # an old copy too big to chunk before the providers' timeouts is not used (as ft_protocol's DELTA_MAX)
        if (isinstance(basis, dict) and isinstance(basis.get("stamp"), str) and not basis.get("partial")
                and _int(basis.get("size")) and basis["size"] <= DELTA_MAX):
            self.basis = basis
        actions: list = []
        for s in self.sources:
            actions.append(Send(s.addr, {"Download": {"name": self.name, "target": address_json(s.addr),
                                                      "is_requestor": False}},
                                # "folders": a folder shows itself in Size, to be refused clearly (not "no such file")
                                {"ft": 1, "folders": 1}, HANDSHAKE_TIMEOUT, f"download:{s.node}"))
        return actions

    def _source(self, node: str) -> Source | None:
        return next((s for s in self.sources if s.node == node), None)

    def response(self, context: Any, body: Any, meta: dict, now: float) -> list:
        kind, _, node = str(context).partition(":")
        s = self._source(node)
        if s is None or s.state == Source.DROPPED:
            return []
        if kind == "keepalive":
            s.keepalive_out = False
        elif kind == "download" and isinstance(body, dict) and isinstance(body.get("Download"), dict):
            result = body["Download"]
            if "Err" in result:
                return self._drop(s, f"{s.node}: {result['Err']}", now)
            place = meta.get("queued")
            if isinstance(place, int) and _int(place) and place >= 1:   # it serves others first: leave its queue, the others serve
                s.busy = place
                return [Send(s.addr, {"Progress": {"name": self.name, "progress": 0}},
                             {"ft": 1, QUEUE_META: True, "error": "the requestor fetches it from other nodes"})] + \
                    self._drop(s, f"{s.node} is busy serving others (place {place} in its queue); skipped", now,
                               tell=False)
        return []

    def request(self, source: Any, body: Any, meta: dict, wants_answer: bool, blob_len: int | None,
                now: float) -> list:
        if self.state in (self.DONE, self.FAILED, self.HANDED):
            return []
        if source == self.parent and meta.get("cancel"):
            return self.fail("cancelled", now, keep=False)
        if source == self.parent and window_in(meta):
            self.window = window_in(meta)
            return []
        s = self._source(source.node)
        if s is None:
            return [Log(f"worker: ignored a bad message from {source}: not a provider of this transfer")]
        if s.state == Source.DROPPED or not isinstance(body, dict):
            return []   # a node dropped may still be sending (a plain one pushes its whole file): unread
        if "Size" in body and s.worker is None:
            return self.size_announced(s, source, body["Size"], meta, now)
        if source != s.worker:
            return [Log(f"worker: ignored a bad message from {source}: not this transfer's provider")]
        if meta.get("error"):   # (a provider's error after Size comes as a second Size)
            return self._drop(s, f"{s.node}: {meta['error']}", now, tell=False)
        if "Progress" in body and isinstance(meta.get("chunks"), dict) and s.state == Source.SIZED:
            info = meta["chunks"]
            count = info.get("count")
            assert s.size is not None
            if not (_int(count) and count <= MAX_CHUNKS and blob_len == count * RECORD.size
                    and info.get("avg") == MULTI_AVG):
                return self._drop(s, f"{s.node} sent a malformed chunk list; dropped", now)
            self.listing = s
            return [ReadChunkList()]
        if "Progress" in body and meta.get("final") and s.whole is None:
            digest = meta.get("blake3")
            if not (isinstance(digest, str) and len(digest) == 64 and HEX.issuperset(digest)):
                return self._drop(s, f"{s.node} sent a malformed file hash; dropped", now)
            s.whole = digest
            return self._settle(now) if self.state == self.CHECKED else []
        if isinstance(body.get("Chunk"), dict) and isinstance(meta.get("pieces"), list):
            return self.chunk(s, body["Chunk"], meta["pieces"], wants_answer, blob_len, now)
        return [Log(f"worker: ignored a bad message from {source}: unknown request")]

    def size_announced(self, s: Source, source: Any, size: Any, meta: dict, now: float) -> list:
        s.worker = source
        s.ext = meta.get("ft") == 1
        if s.ext and meta.get("error"):
            return self._drop(s, f"{s.node}: {meta['error']}", now, tell=False)
        if not _int(size) or size >= 2**63:
            return self._drop(s, f"{s.node} sent an invalid size {size!r}; dropped", now)
        if isinstance(meta.get("folder"), dict):   # a folder's manifest and files are not split between nodes
            return self.fail(f"{self.name} is a folder on {s.node}: download a folder from one node (a list of "
                             f"nodes is for a file)", now)
        late = self.state not in (self.ASKING, self.RECEIVING, self.WRITING)
        if not (s.ext and meta.get("delta") == 1 and meta.get("multi") == 1) or late:
            s.alone = self.state == self.ASKING
            how = ("it speaks the seed's plain protocol" if not s.ext
                   else "the file is too small to split" if meta.get("delta") != 1 and size <= DELTA_MIN
                   else "too late: all is fetched" if late else "it cannot send pieces of it")
            return self._drop(s, f"{s.node} does not support multi-source downloads of {self.name} ({how}); "
                                 f"skipped", now)
        s.size = size
        s.state = Source.SIZED
        self.last_activity = now
        actions: list = [Reply("Progress", {"ft": 1, "offset": 0, "delta": {"avg": MULTI_AVG, "multi": 1},
                                            **self._window_meta()})]
        if not any(x.state == Source.ASKING for x in self.sources):
            # every node has answered and those that can are chunking: the old copy now, at the same time
            actions += self._chunk_basis()
        return actions

    def _chunk_basis(self) -> list:
        """Chunk the old copy, if there is one not yet chunked (the action's result comes at once:
        BASIS lasts until then, and it is the last action of its list)."""
        if self.basis is None or self.basis_list is not None or self.state != self.ASKING:
            return []
        self.state = self.BASIS
        return [ChunkBasis(MULTI_AVG)]

    def basis_chunked(self, records: bytes | None, info: dict | None, error: str | None, now: float) -> list:
        if self.state != self.BASIS:
            raise RuntimeError(f"BasisChunked in state {self.state}")
        self.state = self.ASKING
        self.last_activity = now
        actions: list = []
        try:
            assert self.basis is not None
            if records is None or not isinstance(info, dict) or info.get("stamp") != self.basis.get("stamp"):
                raise ValueError(error or "it changed meanwhile")
            self.basis_list = parse_list(records)
            self.basis_records = records
        except ValueError as e:
            self.basis_list = []
            actions.append(Log(f"{self.name}: the copy this node has cannot be used ({e}); fetching it whole"))
        return actions + self._maybe_decide(now)

    def list_read(self, data: bytes | None, now: float, digest: str | None = None) -> list:
        s, self.listing = self.listing, None
        assert s is not None
        try:
            records = parse_list(data or b"")
        except ValueError:
            records = None
        if records is None or sum(n for n, _ in records) != s.size:
            return self._drop(s, f"{s.node} sent a chunk list that does not add up to the file; dropped", now)
        s.records = data
        s.list_digest = digest
        self.list_bytes += len(data or b"")
        s.state = Source.READY
        self.last_activity = now
        if self.first_ready is None:
            self.first_ready = now
        # an empty want for now: the pieces are handed out once every node is heard from
        return [Reply("Progress", {"ft": 1, "want": [], **self._window_meta()})] + self._maybe_decide(now)

    def _maybe_decide(self, now: float) -> list:
        if self.state != self.ASKING:
            return self._maybe_join(now)
        ready = [s for s in self.sources if s.state == Source.READY]
        groups: dict = {}
        for s in ready:
            groups.setdefault(s.key(), []).append(s)
        # more than half of all listed nodes agree: no node still to answer can outvote them (it joins
        # when its list comes, if the same); else every node is waited for
        early = any(2 * len(g) > len(self.sources) for g in groups.values())
        if not early and any(s.state in (Source.ASKING, Source.SIZED) for s in self.sources):
            return []
        if not ready:
            alone = next((s for s in self.sources if s.alone), None)
            if alone is not None:
                self.state = self.HANDED
                return [Log(f"{self.name}: no listed node can send pieces of it; fetching it whole from "
                            f"{alone.node} alone"),
                        FetchSingle(alone.node, self.peer_node, [s.worker for s in self.sources if s.worker])]
            if all(s.busy for s in self.sources):   # (waiting in several queues at once is not done)
                places = ", ".join(f"{s.node} place {s.busy}" for s in self.sources)
                return self.fail(f"every listed node is busy serving others ({places} in its queue); try again "
                                 f"later, or download {self.name} from one node alone to wait in its queue", now)
            return self.fail(f"no listed node can send {self.name}: " + "; ".join(s.why for s in self.sources), now)
        most = max(len(g) for g in groups.values())
        tied = [g for g in groups.values() if len(g) == most]
        if len(tied) > 1:   # no majority to go by: guessing would pick the content by the order of the list
            versions = " and ".join(", ".join(s.node for s in g) for g in sorted(tied, key=lambda g: g[0].order))
            return self.fail(f"the listed nodes have different content of {self.name} and none is in the majority "
                             f"({versions}); list only nodes with the same file", now)
        best = tied[0]
        if self.basis is not None and self.basis_list is None:   # which chunks to fetch depends on it
            return self._chunk_basis()
        first = best[0]
        self.chosen = first.key()
        self.decided = now
        assert first.size is not None and first.records is not None
        self.size = first.size
        self.copies, self.pieces = self._plan(parse_list(first.records))
        self.copied = 0
        self.list_digest = first.list_digest
        resume, why = self._resume_point()
        if len(resume) == len(self.pieces):   # one piece fetched again: its provider then hashes the file whole
            resume.discard(len(self.pieces) - 1)
        self.done = resume
        self.resumed = self.received = sum(self.pieces[i][1] for i in resume)
        self.pool = [i for i in range(len(self.pieces)) if i not in resume]   # in file order: a heap already
        self.left = len(self.pool)
        for s in best:
            s.state = Source.ACTIVE
            s.last_piece = now
        self.state = self.RECEIVING
        actions: list = []
        for s in ready:
            if s not in best:
                actions += self._drop(s, f"{s.node} has different content ({self.name} differs from the one "
                                         f"{', '.join(b.node for b in best)} ha{'s' if len(best) == 1 else 've'}); "
                                         f"not used", now)
        if self.copies:
            have = sum(n for _, _, n in self.copies)
            actions.append(Log(f"{self.name}: {human_size(have)} of {human_size(self.size)} are in the copy this "
                               f"node has; fetching {human_size(self.size - have)} in {len(self.pieces)} pieces from "
                               f"{', '.join(s.node for s in best)}"))
        else:
            actions.append(Log(f"{self.name}: {human_size(self.size)} in {len(self.pieces)} pieces from "
                               f"{', '.join(s.node for s in best)}"))
        if self.done:
            actions.append(Log(f"{self.name}: resuming, {human_size(self.resumed)} of {human_size(self.size)} "
                               f"already here"))
            # cut after the last piece kept (what lies beyond was never claimed)
            return actions + [OpenPartial(max(self.pieces[i][0] + self.pieces[i][1] for i in self.done))]
        if why:
            actions.append(Log(f"{self.name}: the resume point here is {why}; starting from zero"))
        if self.saved is not None:   # gone before the partial is truncated: never a point naming other bytes
            actions.append(RemoveFiles(state=True, partial=False))
        return actions + [OpenPartial(0)]

    def _plan(self, new: list) -> tuple:
        """-> (copies from the old copy, pieces to fetch) for the chosen list `new`. At least one piece
        is fetched (a provider hashes its file whole only once pieces travel): with every chunk in the
        old copy, the last is fetched."""
        old = list(self.basis_list or [])
        copies, pieces = plan(new, old)
        if not pieces and new:
            old = [r for r in old if r != new[-1]]
            copies, pieces = plan(new, old)
        self.copy_keys = set(old) & set(new)
        return copies, list(pieces)

    def _resume_point(self) -> tuple:
        """-> (ids of the pieces the saved resume point shows written, or an empty set; why it is not
        used, or ''). Used only for the same chosen list (its BLAKE3), and only pieces whose bytes lie
        within the partial on disk: a wrong point can only fail the final check, never pass a file."""
        saved = self.saved
        if saved is None:
            return set(), ""
        ranges = saved.get("written") if isinstance(saved, dict) and saved.get("multi") == 1 else None
        # (a point saved with or without an old copy here: its pieces may have been cut otherwise)
        if not (isinstance(ranges, list) and len(ranges) <= MAX_PIECES
                and all(isinstance(r, list) and len(r) == 2 and _int(r[0]) and _int(r[1]) and r[1] >= 1
                        for r in ranges)):
            return set(), "unreadable"
        if self.list_digest is None or saved.get("list") != self.list_digest or saved.get("size") != self.size:
            return set(), "for other content (another chunk list)"
        end = 0
        for offset, length in ranges:
            if offset < end:
                return set(), "unreadable"
            end = offset + length
        if end > self.size or self.partial_len is None or end > self.partial_len:
            return set(), "more than the partial on disk holds"
        ids: set = set()
        k = 0
        for i, (offset, length, _) in enumerate(self.pieces):
            while k < len(ranges) and ranges[k][0] + ranges[k][1] <= offset:
                k += 1
            if k < len(ranges) and ranges[k][0] <= offset and offset + length <= ranges[k][0] + ranges[k][1]:
                ids.add(i)
        return ids, ""

    def _save(self, actions: list) -> None:
        """The resume point: the chosen list's BLAKE3 and the written pieces as sorted [offset, length]
        ranges (neighbours merged), written after the partial is synced (SavePieces)."""
        if not (self.unsaved and self.file_open and self.list_digest):
            return
        ranges: list = []
        for i in sorted(self.done, key=lambda i: self.pieces[i][0]):   # fetched copies have later ids
            offset, length, _ = self.pieces[i]
            if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                ranges[-1][1] += length
            else:
                ranges.append([offset, length])
        data = json.dumps({"multi": 1, "size": self.size, "list": self.list_digest, "written": ranges},
                          separators=(",", ":")).encode()
        if len(data) <= MAX_STATE:   # else the older point stays: what it names is still on disk
            actions.append(SavePieces(data))
            self.unsaved = False

    def _maybe_join(self, now: float) -> list:
        """A list that came after the choice: the same list joins the providers in use, another is named."""
        actions: list = []
        for s in self.sources:
            if s.state != Source.READY:
                continue
            if s.key() != self.chosen:
                actions += self._drop(s, f"{s.node} has different content ({self.name} differs from the one "
                                         f"the other nodes have); not used", now)
            elif self.state in (self.RECEIVING, self.WRITING):
                s.state = Source.ACTIVE
                s.last_piece = now
                actions.append(Log(f"{self.name}: {s.node} joins"))
                self._top_up(actions, now, joiner=s)
        return actions

    def partial_opened(self, now: float) -> list:
        self.file_open = True
        self.last_activity = now
        actions: list = []
        self._report(actions, now)
        return self._top_up(actions, now) + self._maybe_finish()

    def _active(self) -> list:
        return [s for s in self.sources if s.state == Source.ACTIVE]

    def _window_meta(self) -> dict:
        # the node's share for this download, split between its providers
        n = max(len(self._active()), 1)
        return {"window": max(2, self.window // n)} if self.window else {}

    def _top_up(self, actions: list, now: float, joiner: Source | None = None) -> list:
        """Ask each provider for more pieces while it owes fewer than DEPTH, a piece to each in turn (the
        one that owes fewest first): the faster a provider delivers, the more often it is asked."""
        if not self.file_open or self.state not in (self.RECEIVING, self.WRITING):
            return actions
        # who owes least, then who served least, first
        active = sorted(self._active(), key=lambda x: (len(x.outstanding), x.bytes))
        # a node not yet heard from, or still chunking its file, has its share kept for it (20 s at most)
        pending = sum(1 for s in self.sources if s.state in (Source.ASKING, Source.SIZED))
        reserve = len(self.pieces) * pending // (len(active) + pending) if pending else 0
        grants: dict = {s.node: [] for s in active}
        if joiner is not None:   # the share kept for it, at once
            share = min(DEPTH, len(self.pieces) // len(active))
            while len(self.pool) > reserve and len(joiner.outstanding) + len(grants[joiner.node]) < share:
                grants[joiner.node].append(heapq.heappop(self.pool))
        more = True
        while len(self.pool) > reserve and more:
            more = False
            for s in active:
                if len(self.pool) > reserve and len(s.outstanding) + len(grants[s.node]) < DEPTH:
                    grants[s.node].append(heapq.heappop(self.pool))
                    more = True
        for s in active:
            ids = sorted(grants[s.node])   # a message's pieces must be in file order (the host's check)
            if not ids:
                continue
            if not s.outstanding:
                s.last_piece = now   # its clock starts when it owes something
            s.asked.extend(ids)
            s.outstanding.update(ids)
            actions.append(Send(s.worker, {"Progress": {"name": self.name, "progress": max(self.last_percent, 0)}},
                                {"ft": 1, "want": [[self.pieces[i][0], self.pieces[i][1]] for i in ids],
                                 **self._window_meta()}, ACK_TIMEOUT, f"want:{s.node}"))
        return actions

    def chunk(self, s: Source, chunk: dict, pieces: list, wants_ack: bool, blob_len: int | None, now: float) -> list:
        if self.state != self.RECEIVING or s.state != Source.ACTIVE:
            return [Log(f"worker: ignored a bad message from {s.node}: a Chunk in state {self.state}")]
        first, count = (pieces + [None, None])[:2]
        if not (len(pieces) == 2 and _int(first) and _int(count) and count >= 1 and first + count <= len(s.asked)):
            return self._drop(s, f"{s.node} sent pieces that were not asked for; dropped", now)
        ids = s.asked[first:first + count]
        if any(i not in s.outstanding for i in ids):
            return self._drop(s, f"{s.node} sent a piece twice; dropped", now)
        if any(a >= b for a, b in zip(ids, ids[1:])):   # the host writes a message's pieces in file order only
            return self._drop(s, f"{s.node} sent pieces out of file order in one message; dropped", now)
        if not pieces_fit(chunk, blob_len, self.name, self.pieces, ids):
            return self._drop(s, f"{s.node} sent pieces that do not fit what was asked; dropped", now)
        self.writing = (s, ids, wants_ack)
        self.state = self.WRITING
        return [WriteRanges([c for i in ids for c in self.pieces[i][2]], self.size)]

    def pieces_written(self, now: float) -> list:
        assert self.writing is not None
        s, ids, wants_ack = self.writing
        self.writing = None
        self.state = self.RECEIVING
        for i in ids:
            s.outstanding.discard(i)
            self.done.add(i)
            n = self.pieces[i][1]
            s.pieces += 1
            s.bytes += n
            self.received += n
        self.left -= len(ids)
        self.unsaved = True
        s.last_piece = self.last_activity = now
        actions: list = []
        if wants_ack:
            actions.append(Reply("Progress", {"ft": 1, "ack": self.pieces[ids[0]][0], **self._window_meta()}))
        self._report(actions, now)
        self._keepalives(actions)
        return self._top_up(actions, now) + self._maybe_finish()

    def _maybe_finish(self) -> list:
        if self.state == self.RECEIVING and self.file_open and self.left == 0:
            if self.copies:   # the rest from the old copy, the new file hashed as it is built (ft_delta's)
                assert self.basis is not None
                self.state = self.COPYING
                return [CopyRanges(self.copies, self.basis["stamp"], self.size, whole=True)]
            self.state = self.VERIFYING
            return [VerifyWhole()]
        return []

    def ranges_copied(self, digest: str | None, now: float) -> list:
        if self.state != self.COPYING:
            raise RuntimeError(f"RangesCopied in state {self.state}")
        self.copied = sum(n for _, _, n in self.copies)
        self.state = self.VERIFYING
        return self.file_verified(digest, now)

    def _fetch_copies(self, why: str, now: float) -> list:
        """The old copy could not give its chunks (it changed, the copy failed, or the file built from it
        matches no provider's hash): fetch them from the providers like the rest, then check again."""
        assert self.chosen is not None
        new = parse_list(self.chosen[1])
        pieces = plan(new, [r for r in new if r not in self.copy_keys])[1]
        self.copies, self.copy_keys, self.copied = [], set(), 0
        self.verified_digest = None
        actions: list = [ForgetBasis(),
                         Log(f"{self.name}: {why}; fetching those {human_size(sum(p[1] for p in pieces))} from the "
                             f"providers instead")]
        if not self._active():
            return actions + self.fail("every provider dropped out: " + "; ".join(x.why for x in self.sources if x.why),
                                       now)
        base = len(self.pieces)
        self.pieces.extend(pieces)
        for i in range(base, len(self.pieces)):
            heapq.heappush(self.pool, i)
        self.left += len(pieces)
        self.state = self.RECEIVING
        self.last_activity = now
        return self._top_up(actions, now) + self._maybe_finish()

    def file_verified(self, digest: str | None, now: float) -> list:
        if digest is None:
            return self.fail("the host did not hash the file built from the pieces; nothing was saved", now)
        self.verified_digest = digest
        self.checked = self.last_activity = now
        self.state = self.CHECKED
        return self._settle(now)

    def _settle(self, now: float) -> list:
        """The file is built and hashed here: a provider of the chosen list whose hash of the whole file
        matches lets it take its name; one whose hash differs is named and dropped (a hash alone fails
        nothing); with none left that could still send a matching one, the download fails."""
        digest = self.verified_digest
        same = [s for s in self.sources if s.key() == self.chosen and s.whole is not None]
        if self.copied and same and not any(s.whole == digest for s in same):
            # built partly from the old copy: it (or its kept list) may be what is wrong, not the providers;
            # once every provider in use that was asked for pieces (only those hash the file) has sent its
            # hash, those chunks are fetched from them instead
            if any(s.whole is None and s.asked for s in self._active()):
                return []
            return self._fetch_copies("the file built with the copy this node has matches no provider's hash "
                                      "of the whole file", now)
        actions: list = []
        for s in same:
            if s.whole != digest and s.state != Source.DROPPED:
                actions += self._drop(s, f"{s.node} sent a hash of the whole file that does not match the file "
                                         f"its chunk list built; dropped", now, then=False)
        if any(s.whole == digest for s in same):
            self.state = self.VERIFYING
            # the old copy, replaced, had this content if every chunk is the same (no need to hash it)
            basis = None
            if self.copied and self.basis is not None and self.chosen is not None:
                basis = (self.basis["stamp"], self.basis_records == self.chosen[1])
            return actions + [Rename(digest, basis=basis)]
        if not self._active():
            liars = [s.node for s in same]
            why = (f"the hash of the whole file from {', '.join(liars)} does not match the file built from "
                   f"pieces that each passed their check" if liars else
                   "no provider sent a hash of the whole file: " + "; ".join(x.why for x in self.sources if x.why))
            # a file built from pieces that each passed, yet not the file: no resume point is trusted
            return actions + self.fail(f"{why}; nothing was saved", now, keep=not liars)
        return actions   # one still in use has not sent its hash: wait for it

    def renamed(self, replaced: bool, now: float) -> list:
        actions: list = []
        for s in self.sources:   # a MultiProvider ends only when told (one that listed late, too)
            if s.state in (Source.ACTIVE, Source.READY, Source.SIZED):
                actions.append(Send(s.worker, {"Progress": {"name": self.name, "progress": 100}},
                                    {"ft": 1, "done": True}))
        served = ", ".join(f"{s.node} {s.pieces} pieces ({human_size(s.bytes)})" for s in self.sources if s.pieces)
        here = f"; {human_size(self.resumed)} was here already" if self.resumed else ""
        old = f"; {human_size(self.copied)} came from the copy this node had" if self.copied else ""
        actions.append(Log(f"{self.name}: served by {served}{here}{old}"))
        actions.append(RemoveFiles(state=True, partial=False))
        # as ft_delta's: what came over the links (the lists and the pieces) when the old copy gave the rest
        moved = {"moved": self.list_bytes + sum(s.bytes for s in self.sources)} if self.copied else {}
        self._report(actions, now, done=True, hash=self.verified_digest,
                     served={s.node: s.bytes for s in self.sources if s.bytes}, **moved,
                     **({"replaced": True} if replaced else {}))
        self.state = self.DONE
        actions.append(Exit())
        return actions

    def io_failed(self, error: str, now: float) -> list:
        if self.state == self.COPYING:   # the old copy changed (the host refuses it), or the copy failed
            return self._fetch_copies(f"copying from the copy this node has failed ({error})", now)
        if self.state == self.WRITING and self.writing is not None and INTEGRITY in error:
            s = self.writing[0]   # the host refused a piece: that provider lied, or its file differs
            self.writing = None
            self.state = self.RECEIVING
            return self._drop(s, f"{s.node} sent a chunk that failed its integrity check; dropped", now)
        if self.state == self.WRITING:   # pieces were checked here before: the fault is this node's (its disk)
            return self.fail(f"writing {self.name} on this node failed: {error}", now)
        return self.fail(error, now)

    def request_failed(self, context: Any, kind: str, now: float) -> list:
        if context == "tick":
            return self.tick(now)
        what, _, node = str(context).partition(":")
        s = self._source(node)
        if s is None or s.state == Source.DROPPED or what not in ("download", "keepalive", "want"):
            return []
        if what == "download":
            reason = "is offline" if kind == "offline" else f"did not answer within {HANDSHAKE_TIMEOUT} s"
        else:
            reason = "went offline" if kind == "offline" else "stopped answering"
        return self._drop(s, f"{s.node} {reason}; dropped", now, tell=kind != "offline")

    def tick(self, now: float) -> list:
        if self.state in (self.DONE, self.FAILED, self.HANDED):
            return []
        actions: list = []
        # a node's list is awaited PROVIDER_STALL after the choice, or before it after the first list came:
        # one that never lists must not hold the others
        listed = self.decided if self.state != self.ASKING else self.first_ready
        was = self.state
        for s in self.sources:
            if self.state != was:   # a drop decided (its last action opens the partial), or ended it
                break
            if s.state == Source.ASKING and now - self.started > 2 * HANDSHAKE_TIMEOUT:
                actions += self._drop(s, f"{s.node} did not start sending within {2 * HANDSHAKE_TIMEOUT} s; "
                                         f"dropped", now)
            elif s.state == Source.SIZED and listed is not None and now - listed > PROVIDER_STALL:
                actions += self._drop(s, f"{s.node} sent no list of {self.name} within {PROVIDER_STALL} s of the "
                                         f"others; dropped", now)
            elif s.state == Source.ACTIVE and s.outstanding and now - s.last_piece > PROVIDER_STALL:
                actions += self._drop(s, f"{s.node} sent nothing for {PROVIDER_STALL} s; dropped", now)
        if self.state in (self.DONE, self.FAILED, self.HANDED):
            return actions
        if self.state != was:
            return [ArmTimer(TICK), *actions]
        if self.state == self.CHECKED and now - self.checked > STALL_TIMEOUT:
            waiting = ", ".join(s.node for s in self._active())
            return actions + self.fail(f"every piece was written and passed its check, but {waiting} sent no hash "
                                       f"of the whole file within {STALL_TIMEOUT} s to confirm it; nothing was "
                                       f"saved (download it again)", now)
        if now - self.last_activity > STALL_TIMEOUT:
            return actions + self.fail(f"no progress for {STALL_TIMEOUT} s; giving up", now)
        self._keepalives(actions)
        self._report(actions, now)
        self._save(actions)   # once a tick at most: each save syncs the partial first
        actions.append(ArmTimer(TICK))
        return actions

    def _keepalives(self, actions: list) -> None:
        """One request outstanding to each provider: if its node goes away, the kernel fails it at once."""
        for s in self.sources:
            if s.worker is not None and s.ext and not s.keepalive_out and s.state not in (Source.DROPPED, Source.ASKING):
                actions.append(Send(s.worker, {"Progress": {"name": self.name, "progress": max(self.last_percent, 0)}},
                                    {"ft": 1}, ACK_TIMEOUT, f"keepalive:{s.node}"))
                s.keepalive_out = True

    def _drop(self, s: Source, why: str, now: float, tell: bool = True, then: bool = True) -> list:
        """Name the node and stop using it; its outstanding pieces go back to the pool; `then`: and
        carry on without it (decide, hand out its pieces, or fail if none is left)."""
        if s.state == Source.DROPPED:
            return []
        s.state = Source.DROPPED
        s.why = why
        for i in s.outstanding:
            heapq.heappush(self.pool, i)
        s.outstanding.clear()
        actions: list = [Log(f"{self.name}: {why}")]
        if tell and s.worker is not None and s.ext:
            actions.append(Send(s.worker, {"Progress": {"name": self.name, "progress": 0}}, {"ft": 1, "error": why}))
        if not then:
            return actions
        if self.state == self.ASKING:
            return actions + self._maybe_decide(now)
        if self.state == self.CHECKED:
            return actions + self._settle(now)
        if self.state in (self.RECEIVING, self.WRITING) and not self._active():
            return actions + self.fail("every provider dropped out: " + "; ".join(x.why for x in self.sources if x.why),
                                       now)
        return self._top_up(actions, now)

    def fail(self, error: str, now: float, keep: bool = True) -> list:
        """Tell the providers still in use, keep the partial and its resume point (or, not `keep`,
        remove both), tell the parent, end."""
        if self.state in (self.DONE, self.FAILED):
            return []
        resumable = keep and self.file_open and bool(self.done)
        actions: list = []
        if keep:
            self._save(actions)   # what was written since the last tick, synced first
        self.state = self.FAILED
        for s in self.sources:
            if s.worker is not None and s.ext and s.state != Source.DROPPED:
                actions.append(Send(s.worker, {"Progress": {"name": self.name, "progress": max(self.last_percent, 0)}},
                                    {"ft": 1, "error": error}))
        if not keep:
            actions.append(RemoveFiles(state=True, partial=self.file_open))
        elif not resumable:   # nothing written to resume: no partial left (failed before opening it: as it was)
            actions.append(RemoveFiles(state=False, partial=self.file_open))
        self._report(actions, now, error=error + (" (run the download again to resume)" if resumable else ""))
        actions.append(Exit(error))
        return actions

    def _report(self, actions: list, now: float, **extra: Any) -> None:
        percent = int((self.received + self.copied) * 100 / self.size) if self.size else 0
        if not extra and percent == self.last_percent and now - self.last_report < 1.0:
            return
        self.last_percent, self.last_report = percent, now
        secs = max(now - self.started, 1e-6)
        meta = {"ft": 1, "peer": self.peer_node, "bytes": self.received + self.copied,
                "rate": (self.received - self.resumed) / secs, "secs": secs,
                **({"total": self.size} if self.size else {})}
        meta.update(extra)
        actions.append(Send(self.parent, {"Progress": {"name": self.name, "progress": percent}}, meta, 5, "progress"))


# ---- the provider ------------------------------------------------------------------------------
class MultiProvider(DeltaProvider):
    """A DeltaProvider that takes its want list a part at a time and ends only when the requestor says
    it is done (or stops, or goes silent)."""

    def __init__(self, prov: Any, avg: int, now: float):
        super().__init__(prov, avg, now)
        self.closing = False

    def start(self) -> list:
        if self.avg != MULTI_AVG:   # another average would be a fresh chunking of the whole file, never cached
            return self._error("bad delta request", f"peer asked for chunks of average size {self.avg}, not {MULTI_AVG}")
        return [ChunkFile(self.avg)]

    def _extend(self, want: list) -> None:
        base = len(self.want)
        self.want.extend(want)
        self.plan.extend([base + first, count] for first, count in batches(want))

    def response(self, context: str | None, meta: dict, now: float) -> list:
        if context == "chunks" and self.state == self.LISTED:
            want = meta.get("want")
            if not (isinstance(want, list) and self._valid(want)):
                return self._error("bad list of pieces", "peer asked for a bad list of pieces")
            self._extend(want)
            self.peer_window = window_in(meta) or self.peer_window
            self.last_activity = now
            self.state = self.SENDING
            return self._fill([])
        return super().response(context, meta, now)

    def request(self, source: Any, body: Any, meta: dict, now: float) -> list:
        if (self.state not in (self.DONE, self.FAILED) and source == self.target and isinstance(body, dict)
                and "Progress" in body and not meta.get("error")):
            # only what asks for work counts as activity, not keepalives: a requestor cannot hold this
            # serving slot by keepalives alone (an idle session ends after STALL_TIMEOUT; see tick)
            if meta.get("done"):
                self.closing = True
                return [Reply("Progress"), *super()._done()]
            if "want" in meta:
                if not self._valid(meta["want"]) or self.state == self.LISTED:
                    return self._error("bad list of pieces", "peer asked for a bad list of pieces")
                self.last_activity = now
                self._extend(meta["want"])
                self.peer_window = window_in(meta) or self.peer_window
                actions: list = [Reply("Progress", {"ft": 1})]
                return self._fill(actions) if self.state == self.SENDING else actions
        return super().request(source, body, meta, now)

    def tick(self, now: float) -> list:
        limit = self._stall_limit()
        if self.state not in (self.DONE, self.FAILED) and now - self.last_activity > limit:
            return self._error(f"{self.parent.node} ended its part: asked for nothing for {limit} s",
                               f"asked for nothing for {limit} s; ended")
        return super().tick(now)

    def _fill(self, actions: list) -> list:
        if not self.plan and not self.hashed:
            return actions   # nothing asked yet: the whole file is hashed once pieces travel (DeltaProvider)
        return super()._fill(actions)

    def _done(self) -> list:
        # all asked for is sent: more may be asked for, until the requestor says it is done
        return super()._done() if self.closing else []


# ft_protocol's Provider hands over to this when the requestor asks for pieces (SwitchToDelta)
DELTA_MACHINES.update(multi_provider=MultiProvider)

# the names the worker carries out (so a linter sees them used)
__all__ = ["UNREADABLE", "AloneRequestor", "FetchSingle", "MultiProvider", "MultiRequestor", "SavePieces",
           "VerifyWhole", "check_nodes", "nodes_of", "partial_folder"]
