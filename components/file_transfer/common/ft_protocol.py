"""The transfer protocol (see ft_common) as two sans-I/O state machines, Requestor and Provider.

Every machine (these two and ft_folder's) has one entry, `handle(event) -> list of actions`: an
event is a small dataclass below (a message's parsed parts, an I/O result, a failed request or our
timer) carrying the time, and the actions are to be taken in order. An action that produces a
result (a hash, a read) is always the last of its list; the driver feeds that result back as the
event the action names. A machine may hand over to another (SwitchToFolder): the driver obeys and
feeds the new machine from then on. Addresses are opaque values compared with `==` (they need only
a `.node`); the machines do no I/O and import no process_lib.

`extended` says whether this side can speak the extended protocol, i.e. hash in the host (a worker
built with the blobs extension). Without it a machine speaks the seed's plain protocol and never
asks for a hash: no HashChunk, no read-back, ReadChunk only with HASH_NONE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ft_common import (
    ACK_TIMEOUT,
    BIG_CHUNK_SIZE,
    BIG_MIN,
    CHUNK_SIZE,
    DELTA_MIN,
    EXT_CHUNK_SIZE,
    HANDSHAKE_TIMEOUT,
    STALL_TIMEOUT,
    STATE_EVERY,
    TICK,
    WINDOW,
    window_in,
)

QUEUE_META = "queue"   # metadata key of a requestor's ask about its place in a provider's queue
DELTA_MAX = 8 << 30    # a bigger file is sent whole: chunking it could outlast the peers' timeouts (ft_delta)
DELTA_MIN_AVG, DELTA_MAX_AVG = 4096, 1 << 20   # the average chunk sizes a provider accepts (ft_delta)

HEX = frozenset("0123456789abcdef")


def _asks_big(meta: dict) -> bool:
    """The requestor's ack or Size answer asks for large chunks (its node gives the transfer a whole share)."""
    chunk = meta.get("chunk")
    return type(chunk) is int and chunk == BIG_CHUNK_SIZE


def _place(v: Any) -> bool:
    """A place in a queue: an int from 1 (bool is no int here)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# ---- events ------------------------------------------------------------------------------------
@dataclass
class Start:
    """The job begins (the machine's first actions)."""


@dataclass
class GotRequest:
    """A request came: `blob_len` is its blob's length (None without one; a requestor's only)."""
    source: Any
    body: Any
    meta: dict
    now: float
    wants_answer: bool = False
    blob_len: int | None = None


@dataclass
class GotResponse:
    """The answer to one of our requests, by the context we gave it."""
    context: str | None
    body: Any
    meta: dict
    now: float


@dataclass
class SendFailed:
    """One of our requests failed (`kind`: "timeout" or "offline"); our timer comes so, as "tick"."""
    context: str | None
    kind: str
    now: float


@dataclass
class IoFailed:
    """An action's I/O failed."""
    error: str
    now: float


# results of the requestor's actions
@dataclass
class StateLoaded:
    """`basis`: an older copy of the file ({"size", "stamp", "partial"}: the file of that name in the
    files drive, else the partial download), if any and if this node's host can chunk it (ft_delta)."""
    saved: Any
    partial_len: int | None
    now: float
    basis: dict | None = None


@dataclass
class PartialOpened:
    now: float


@dataclass
class ChunkHashed:
    digest: str | None
    now: float


@dataclass
class ChunkWritten:
    now: float


@dataclass
class FileVerified:
    digest: str | None
    now: float


@dataclass
class Renamed:
    replaced: bool
    now: float


# results of the provider's actions
@dataclass
class Opened:
    """The file to send is open (`size`, `stamp`), or the name is a folder (`folder`)."""
    size: int | None
    stamp: Any
    now: float
    folder: bool = False
    delta: bool = False    # this node's host can chunk the file (ft_delta)


@dataclass
class ChunkRead:
    got: int
    digest: str | None
    now: float


@dataclass
class FileChecked:
    stamp: Any
    digest: str | None
    now: float


# The folder machines, registered by ft_folder when it is imported: it builds on this module, so this
# module names them only through this table (no import cycle). The same for ft_delta's.
FOLDER_MACHINES: dict[str, Any] = {}
DELTA_MACHINES: dict[str, Any] = {}


def _folder_machine(role: str) -> Any:
    try:
        return FOLDER_MACHINES[role]
    except KeyError:
        raise RuntimeError("ft_folder is not imported: its machines are not registered") from None


def _delta_machine(role: str) -> Any:
    try:
        return DELTA_MACHINES[role]
    except KeyError:
        raise RuntimeError("ft_delta is not imported: its machines are not registered") from None


# ---- actions -----------------------------------------------------------------------------------
@dataclass
class SwitchToFolder:
    """Hand the job over to `machine` (an ft_folder machine): the driver feeds it every event from
    now on, starting with the results of the actions that follow this one."""
    machine: Any


@dataclass
class SwitchToDelta:
    """Hand the job over to `machine` (an ft_delta machine), as SwitchToFolder."""
    machine: Any


@dataclass
class ReadManifest:
    """Read the folder's listing from the Size's blob (text, and its BLAKE3) for the folder requestor
    that took over; -> ft_folder.ManifestRead."""
    source: Any
    size: Any
    meta: dict
    wants_answer: bool


@dataclass
class Send:
    """Send a request; `forward_blob` carries the blob of the message or read being handled."""
    target: Any
    body: Any
    metadata: dict | None = None
    timeout: int | None = None
    context: str | None = None
    forward_blob: bool = False


@dataclass
class Reply:
    """Answer the request being handled."""
    body: Any
    metadata: dict | None = None


@dataclass
class ArmTimer:
    """A request to ourselves that nobody answers: its timeout comes back as `tick`."""
    seconds: int


@dataclass
class Log:
    text: str


@dataclass
class Exit:
    """The worker's job has ended; `error` is None on success."""
    error: str | None = None


# requestor side
@dataclass
class LoadState:
    """Read the resume state (JSON object or None) and the partial's length; -> StateLoaded."""


@dataclass
class OpenPartial:
    """Offset 0: create (or truncate) the partial, making its folder if need be. Else open it,
    cut it to `offset` and seek there; -> PartialOpened."""
    offset: int


@dataclass
class SaveState:
    size: int
    verified: int


@dataclass
class HashChunk:
    """Feed the chunk's blob to the running BLAKE3 (emptied first if `restart`); -> ChunkHashed."""
    restart: bool


@dataclass
class WriteChunk:
    """Write the chunk's blob at `offset` (seek first if `seek`); -> ChunkWritten."""
    offset: int
    seek: bool


@dataclass
class VerifyFile:
    """Sync the partial; with `read_back`, hash it whole; -> FileVerified(digest or None)."""
    read_back: bool


@dataclass
class Rename:
    """The partial takes the file's real name; -> Renamed(whether it replaced a file of other content,
    judged by size and by `digest`, the new file's BLAKE3, where there is one). `basis`: (stamp, same)
    of the file of that name (ft_delta): whether it has the new content is known already while it has
    that stamp, and it is not read again."""
    digest: str | None = None
    basis: tuple | None = None


@dataclass
class RemoveFiles:
    """Remove the state file and/or the partial; a missing one is no error."""
    state: bool
    partial: bool


@dataclass
class KeepForResume:
    """Sync the partial and save the state for a later resume; an I/O error here is no matter."""
    size: int
    verified: int


# provider side
@dataclass
class OpenFile:
    """Open the file to send; -> Opened(size, stamp)."""


@dataclass
class Seek:
    offset: int


# what ReadChunk hashes the bytes read with
HASH_NONE, HASH_WHOLE, HASH_CHAIN, HASH_CHAIN_RESTART = "none", "whole", "chain", "chain-restart"


@dataclass
class ReadChunk:
    """Read `length` bytes at the cursor into the blob and hash them as `hash` says;
    -> ChunkRead(bytes read, hex digest or None)."""
    length: int
    hash: str


@dataclass
class CheckFile:
    """Read the file's stamp, and with `read_back` its whole hash; -> FileChecked(stamp, digest)."""
    read_back: bool


def address_json(a: Any) -> dict:
    p = a.process
    return {"node": a.node, "process": {"process_name": p.process_name, "package_name": p.package_name,
                                        "publisher_node": p.publisher_node}}


# ---- the requestor -----------------------------------------------------------------------------
def screen_request(m: Any, source: Any, meta: dict, now: float) -> list | None:
    """What a requestor (a file's or a folder's) does with a request before looking at its body: the
    actions if it is an end, a cancel, a stranger's or the provider's error; None to go on."""
    if m.state in (m.DONE, m.FAILED):
        return []
    if source == m.parent and meta.get("cancel"):
        return m.fail("cancelled", keep=False, now=now)
    if source == m.parent and window_in(meta):
        m.window = window_in(meta)  # our share of the node's budget: passed on in our acks
        return []
    if source.node != m.peer_node:
        return [Log(f"worker: ignored a bad message from {source}: not the peer of this transfer")]
    if meta.get("error"):
        # keep the partial for a resume, unless the provider says it is of no use
        return m.fail(f"{m.peer_node}: {meta['error']}", keep=meta.get("keep") is not False, now=now)
    return None


class Requestor:
    """Fetches `name` from `peer` (its file_transfer, then its worker) into a partial file."""

    REQUESTING = "requesting"        # Download sent to the peer, waiting for Size
    QUEUED = "queued"                # the peer serves others first; waiting for our turn
    OPENING = "opening"              # Size taken, reading the resume state and opening the partial
    RECEIVING = "receiving"          # taking chunks
    HASHING = "hashing"              # a chunk passed its checks, its digest is being computed
    WRITING = "writing"              # a chunk passed its hash check, its bytes are being written
    AWAITING_HASH = "awaiting-hash"  # every byte is here, the provider's file hash is not yet
    VERIFYING = "verifying"          # the whole file is being checked
    DONE = "done"
    FAILED = "failed"
    STATES = frozenset({REQUESTING, QUEUED, OPENING, RECEIVING, HASHING, WRITING, AWAITING_HASH, VERIFYING, DONE,
                        FAILED})

    def __init__(self, name: str, peer: Any, parent: Any, now: float, *, extended: bool, delta: bool = True):
        self.name = name
        self.extended = extended     # we can speak the extended protocol
        self.delta = delta           # we may take an offer to send only what changed (not after it failed)
        self.peer = peer
        self.peer_node = peer.node
        self.parent = parent
        self.state = self.REQUESTING
        self.started = self.last_activity = now
        self.provider = None         # the peer's worker, once it sent Size
        self.size: int | None = None
        self.file_hash: str | None = None
        self.ext = False             # both sides speak the extended protocol
        self.hash_follows = False    # the provider sends the file's hash after the last chunk
        self.has_state = False       # a resume state file is kept (big ext files)
        self.delta_offered = False   # the provider can send only what changed (ft_delta)
        self.file_open = False
        self.wants_answer = False    # Size expects our answer (the resume offset)
        self.received = 0
        self.cursor = 0
        self.resumed_from = 0
        self.bytes_since_save = 0
        self.last_report = 0.0
        self.last_percent = -1
        self.keepalive_out = False
        self.chain_end: int | None = None  # where the bytes hashed in order since the resume point end
        self.chain_digest: str | None = None  # their BLAKE3: the whole file's once all arrived from 0
        self.pending: tuple | None = None  # (offset, length, upto, wants_ack) of the chunk being hashed
        self.handshake_from = now    # the Size is due HANDSHAKE_TIMEOUT after this (reset by the queue)
        self.queue_place: int | None = None  # our place in the provider's queue while QUEUED
        self.queue_ask_out = False   # an ask about our place is outstanding
        self.verified_digest: str | None = None  # the whole file's hash, once verified
        self.window: int | None = None  # EXT_CHUNK_SIZE units the provider may keep in flight, once our parent said

    # ---- events ----
    @property
    def known_size(self) -> int:
        """The file's size: known from the provider's Size on, before any state that uses it."""
        assert self.size is not None
        return self.size

    @property
    def pending_chunk(self) -> tuple:
        """(offset, length, upto, wants_ack) of the chunk being hashed or written."""
        assert self.pending is not None
        return self.pending

    def handle(self, ev: Any) -> list:
        """The one entry: an event in, the actions out."""
        if type(ev) is GotRequest:
            return self.request(ev.source, ev.body, ev.meta, ev.wants_answer, ev.blob_len, ev.now)
        if type(ev) is GotResponse:
            return self.response(ev.context, ev.body, ev.now, ev.meta)
        if type(ev) is SendFailed:
            return self.request_failed(ev.context, ev.kind, ev.now)
        if type(ev) is ChunkHashed:
            return self.chunk_hashed(ev.digest, ev.now)
        if type(ev) is ChunkWritten:
            return self.chunk_written(ev.now)
        if type(ev) is StateLoaded:
            return self.state_loaded(ev.saved, ev.partial_len, ev.now, ev.basis)
        if type(ev) is PartialOpened:
            return self.partial_opened(ev.now)
        if type(ev) is FileVerified:
            return self.file_verified(ev.digest, ev.now)
        if type(ev) is Renamed:
            return self.renamed(ev.replaced, ev.now)
        if type(ev) is IoFailed:
            return self.io_failed(ev.error, ev.now)
        if type(ev) is Start:
            return self.start()
        raise TypeError(f"a Requestor takes no {type(ev).__name__}")

    def start(self) -> list:
        return [ArmTimer(TICK),
                Send(self.peer, {"Download": {"name": self.name, "target": address_json(self.peer),
                                              "is_requestor": False}},
                     # "folders": a folder of that name may be sent (ft_folder)
                     {"ft": 1, "folders": 1} if self.extended else None, HANDSHAKE_TIMEOUT, "download")]

    def response(self, context: str | None, body: Any, now: float, meta: dict | None = None) -> list:
        """A response to one of our requests (the Download answer, a keepalive answer, our place in
        the provider's queue)."""
        if context == "keepalive":
            self.keepalive_out = False
        elif context == "queue":
            return self.queue_answer(meta or {}, now)
        elif isinstance(body, dict) and isinstance(body.get("Download"), dict):
            result = body["Download"]
            if "Err" in result:
                return self.fail(str(result["Err"]), keep=False, now=now)
            self.last_activity = now
            place = (meta or {}).get("queued")
            if self.extended and self.state == self.REQUESTING and isinstance(place, int) and _place(place):
                return self._wait_in_queue(place, now)
        return []

    # ---- the provider's queue ----
    def _wait_in_queue(self, place: int, now: float) -> list:
        self.state = self.QUEUED
        self.queue_place = place
        self.handshake_from = self.last_activity = now
        actions: list = []
        self._report(actions, now, queued=place)
        return actions

    def queue_answer(self, meta: dict, now: float) -> list:
        """The provider's answer to our ask about our place: K, 0 once our turn came, None if it
        does not know of us (then the Size is still due within HANDSHAKE_TIMEOUT of the last word)."""
        self.queue_ask_out = False
        if self.state != self.QUEUED:
            return []
        if isinstance(meta.get("error"), str):  # our turn came but the provider could not start its worker
            return self.fail(meta["error"], keep=True, now=now)
        place = meta.get("queued")
        if place == 0 and not isinstance(place, bool):
            if self.queue_place != 0:  # its worker is starting: the Size is due within the timeout
                self.queue_place = 0
                self.handshake_from = self.last_activity = now
            return []
        if not _place(place):
            return []
        self.handshake_from = self.last_activity = now
        if place == self.queue_place:
            return []
        self.queue_place = place
        actions: list = []
        self._report(actions, now, queued=place)
        return actions

    def _ask_queue_place(self, actions: list, **extra) -> None:
        if not self.queue_ask_out or extra:
            actions.append(Send(self.peer, {"Progress": {"name": self.name, "progress": 0}},
                                {"ft": 1, QUEUE_META: True, **extra}, None if extra else HANDSHAKE_TIMEOUT,
                                None if extra else "queue"))
            self.queue_ask_out = self.queue_ask_out or not extra

    def request(self, source: Any, body: Any, meta: dict, wants_answer: bool, blob_len: int | None,
                now: float) -> list:
        """A request from the peer's node: Size, Chunk, the final hash, or an error."""
        screened = screen_request(self, source, meta, now)
        if screened is not None:
            return screened
        if isinstance(body, dict):
            if "Size" in body and isinstance(meta.get("folder"), dict) and self.state in (self.REQUESTING, self.QUEUED):
                return self._to_folder(source, body["Size"], meta, wants_answer)
            if "Size" in body:
                return self.size_announced(source, body["Size"], meta, wants_answer, now)
            if isinstance(body.get("Chunk"), dict):
                return self.chunk(source, body["Chunk"], meta, wants_answer, blob_len, now)
            if "Progress" in body and meta.get("final") and self.hash_follows:
                return self.final_hash(source, meta, now)
        return [Log(f"worker: ignored a bad message from {source}: unknown request")]

    def _to_folder(self, source: Any, size: Any, meta: dict, wants_answer: bool) -> list:
        """The provider's Size says "folder": a FolderRequestor takes over, window and all."""
        folder = _folder_machine("requestor")(self.name, self.peer, self.parent, self.started)
        folder.window = self.window
        return [SwitchToFolder(folder), ReadManifest(source, size, meta, wants_answer)]

    def size_announced(self, source: Any, size: Any, meta: dict, wants_answer: bool, now: float) -> list:
        if self.size is not None:
            return [Log(f"worker: ignored a bad message from {source}: second Size for this transfer")]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size >= 2**63:
            return self.fail(f"peer sent an invalid size {size!r}", keep=False, now=now)
        self.provider = source
        self.size = size
        self.ext = self.extended and meta.get("ft") == 1
        self.file_hash = meta.get("blake3") if self.ext else None
        self.hash_follows = self.ext and self.file_hash is None
        # a file of one chunk has nothing to resume: no state file for it, unless it is big enough
        # to be sent only what changed (ft_delta), which keeps one
        self.has_state = self.ext and size > min(EXT_CHUNK_SIZE, DELTA_MIN)
        # the provider can send only what changed (ft_delta), if we hold an older copy
        self.delta_offered = self.delta and self.has_state and meta.get("delta") == 1
        self.wants_answer = wants_answer
        self.last_activity = now
        if self.has_state:
            self.state = self.OPENING
            return [LoadState()]
        return self._open(0, now)

    def state_loaded(self, saved: Any, partial_len: int | None, now: float, basis: dict | None = None) -> list:
        """The resume state file's content (None if absent or unreadable) and the partial's length.
        A partial is resumed on its size alone: if the file changed in between, the final check
        fails the download and removes the partial (the next run starts from zero). With nothing to
        resume, an older copy of the file (`basis`) lets ft_delta fetch only what changed."""
        if self.state != self.OPENING:
            raise RuntimeError(f"state_loaded in state {self.state}")
        offset = 0
        if (isinstance(saved, dict) and isinstance(partial_len, int) and saved.get("size") == self.size
                and isinstance(saved.get("verified"), int) and not isinstance(saved["verified"], bool)
                and 0 <= saved["verified"] <= min(partial_len, self.known_size)):
            offset = saved["verified"]
        if (offset == 0 and self.delta_offered and isinstance(basis, dict) and isinstance(basis.get("stamp"), str)
                and isinstance(basis.get("size"), int) and basis["size"] > 0):
            machine = _delta_machine("requestor")(self, basis, now)
            return [SwitchToDelta(machine), *machine.start()]
        return self._open(offset, now)

    def _open(self, offset: int, now: float) -> list:
        self.state = self.OPENING
        self.received = self.cursor = self.resumed_from = self.chain_end = offset
        return [OpenPartial(offset)]

    def partial_opened(self, now: float) -> list:
        if self.state != self.OPENING:
            raise RuntimeError(f"partial_opened in state {self.state}")
        self.file_open = True
        self.state = self.RECEIVING
        offset = self.resumed_from
        actions: list = []
        if not offset and self.has_state:
            actions.append(SaveState(self.known_size, 0))
        if self.wants_answer:  # a plain answer tells an extended provider to go plain
            actions.append(Reply("Progress", {"ft": 1, "offset": offset, **self._window_meta()} if self.ext else None))
        if offset:
            actions.append(Log(f"{self.name}: resuming at {offset} of {self.size} bytes"))
        return self._maybe_finish(actions, now)

    def chunk(self, source: Any, chunk: dict, meta: dict, wants_ack: bool, blob_len: int | None,
              now: float) -> list:
        if self.state not in (self.RECEIVING, self.AWAITING_HASH):
            return [Log(f"worker: ignored a bad message from {source}: Chunk before Size")]
        if source != self.provider:
            return [Log(f"worker: ignored a bad message from {source}: a Chunk not from this transfer's provider")]
        offset, length = chunk.get("offset"), chunk.get("length")
        if (chunk.get("name") != self.name or not isinstance(offset, int) or not isinstance(length, int)
                or isinstance(offset, bool) or isinstance(length, bool)):
            return self.fail("peer sent a malformed chunk", keep=True, now=now)
        if blob_len is None or blob_len != length or offset < 0 or offset + length > self.known_size:
            return self.fail(f"peer sent a chunk that does not fit the file (offset {offset}, length {length}, "
                             f"{blob_len} bytes, size {self.size})", keep=True, now=now)
        if self.ext and offset != self.received:
            return self.fail(f"chunk at offset {offset}, expected {self.received}", keep=True, now=now)
        most = BIG_CHUNK_SIZE if self.ext else EXT_CHUNK_SIZE   # a peer's chunks must fit the memory budget
        if length > most:
            return self.fail(f"peer sent a chunk of {length} bytes, over the {most} a chunk may have",
                             keep=True, now=now)
        self.pending = (offset, length, meta.get("upto"), wants_ack)
        if self.ext and offset == self.chain_end:
            self.state = self.HASHING
            return [HashChunk(offset == self.resumed_from)]
        # plain, or out of order (a plain peer may): no running hash from here on
        self.chain_end = self.chain_digest = None
        return self._chunk_checked(now)

    def chunk_hashed(self, digest: str | None, now: float) -> list:
        if self.state != self.HASHING:
            raise RuntimeError(f"chunk_hashed in state {self.state}")
        offset, length, _, _ = self.pending_chunk
        self.chain_digest = digest
        self.chain_end = offset + length
        self.state = self.RECEIVING
        return self._chunk_checked(now)

    def _chunk_checked(self, now: float) -> list:
        offset, _, upto, _ = self.pending_chunk
        if self.ext and (self.chain_digest is None or upto != self.chain_digest):
            self.pending = None
            return self.fail(f"chunk at offset {offset} failed its integrity check", keep=True, now=now)
        self.state = self.WRITING
        return [WriteChunk(offset, offset != self.cursor)]

    def chunk_written(self, now: float) -> list:
        if self.state != self.WRITING:
            raise RuntimeError(f"chunk_written in state {self.state}")
        offset, length, _, wants_ack = self.pending_chunk
        self.pending = None
        self.cursor = offset + length
        self.received = max(self.received, self.cursor) if not self.ext else self.cursor
        actions: list = []
        if wants_ack:
            actions.append(Reply("Progress", {"ft": 1, "ack": offset, **self._window_meta()}))
        self.last_activity = now
        if self._complete():
            return self._finish(actions)
        self.bytes_since_save += length
        if self.has_state and self.bytes_since_save >= STATE_EVERY * EXT_CHUNK_SIZE:
            # not synced first: a killed node's written pages survive in the OS, and after an OS
            # crash the final check catches a hole behind the state (an fsync per save halved the speed)
            actions.append(SaveState(self.known_size, self.received))
            self.bytes_since_save = 0
        self._report(actions, now)
        self._keepalive(actions)
        self.state = self.AWAITING_HASH if self.received >= self.known_size else self.RECEIVING
        return actions

    def final_hash(self, source: Any, meta: dict, now: float) -> list:
        if source != self.provider:
            return [Log(f"worker: ignored a bad message from {source}: a final hash not from this transfer's provider")]
        digest = meta.get("blake3")
        if not (isinstance(digest, str) and len(digest) == 64 and HEX.issuperset(digest)):
            return self.fail("peer sent a malformed file hash", keep=False, now=now)
        self.file_hash = digest
        self.hash_follows = False
        self.last_activity = now
        return self._maybe_finish([], now)

    def file_verified(self, read_back: str | None, now: float) -> list:
        if self.state != self.VERIFYING:
            raise RuntimeError(f"file_verified in state {self.state}")
        digest = read_back if read_back is not None else self.chain_digest
        if self.file_hash and digest != self.file_hash:
            return self.fail("the downloaded file does not match the provider's hash (it changed while being "
                             "sent, or was corrupted); nothing was saved", keep=False, now=now)
        self.verified_digest = digest
        return [Rename(digest)]

    def renamed(self, replaced: bool, now: float) -> list:
        """The file has its real name; `replaced`: an older file of other content had it (Kinode
        overwrites, so the download did too, and says so)."""
        if self.state != self.VERIFYING:
            raise RuntimeError(f"renamed in state {self.state}")
        actions: list = [RemoveFiles(state=self.has_state, partial=False)]
        self._report(actions, now, done=True, hash=self.verified_digest, **({"replaced": True} if replaced else {}))
        self.state = self.DONE
        actions.append(Exit())
        return actions

    def tick(self, now: float) -> list:
        if self.state in (self.DONE, self.FAILED):
            return []
        if now - self.last_activity > STALL_TIMEOUT:
            return self.fail(f"no progress for {STALL_TIMEOUT} s; giving up", keep=True, now=now)
        if self.size is None and now - self.handshake_from > HANDSHAKE_TIMEOUT:
            # the peer accepted but its worker never began (it may be at its process limit)
            if self.state == self.QUEUED and self.queue_place != 0:
                return self.fail(f"{self.peer_node} stopped answering while we waited in its queue",
                                 keep=True, now=now)
            return self.fail(f"{self.peer_node} did not start sending within {HANDSHAKE_TIMEOUT} s",
                             keep=True, now=now)
        # a provider can vanish between two keepalives: ask again, and an offline node fails the
        # request at once rather than after the stall timeout; while queued, ask our place instead
        actions: list = []
        if self.state == self.QUEUED:
            self._ask_queue_place(actions)
            # the parent drops a download it has not heard of for STALL_TIMEOUT: a long wait at one
            # place must not look like a dead worker (and let a second one start on the same partial)
            self._report(actions, now, **({"queued": self.queue_place} if self.queue_place else {}))
        else:
            self._keepalive(actions)
        actions.append(ArmTimer(TICK))
        return actions

    def request_failed(self, context: str | None, kind: str, now: float) -> list:
        """A request of ours got no answer: `kind` is "offline" or "timeout"."""
        if context == "tick":
            return self.tick(now)
        if context == "download":
            reason = "is offline" if kind == "offline" else f"did not answer within {HANDSHAKE_TIMEOUT} s"
            return self.fail(f"{self.peer_node} {reason}", keep=True, now=now)
        if context == "keepalive":
            reason = "went offline" if kind == "offline" else "stopped answering"
            return self.fail(f"{self.peer_node} {reason} during the transfer", keep=True, now=now)
        if context == "queue":
            self.queue_ask_out = False
            if kind == "offline" and self.state == self.QUEUED:
                return self.fail(f"{self.peer_node} went offline while we waited in its queue", keep=True, now=now)
        return []  # "progress": the parent is busy or gone, progress is advisory

    def io_failed(self, error: str, now: float) -> list:
        """An action's I/O failed: the partial is kept for a resume."""
        return self.fail(error, keep=True, now=now)

    def fail(self, error: str, keep: bool, now: float) -> list:
        """Tell the provider, keep or remove the partial, tell the parent, end."""
        if self.state in (self.DONE, self.FAILED):
            return []
        queued = self.state == self.QUEUED
        self.state = self.FAILED
        actions: list = []
        if queued:  # free our place for the next in line
            self._ask_queue_place(actions, error=error)
        if self.provider is not None and self.ext:
            # the provider stops now rather than after its ack timeout
            actions.append(Send(self.provider, {"Progress": {"name": self.name, "progress": max(self.last_percent, 0)}},
                                {"ft": 1, "error": error}))
        if self.file_open and keep and self.ext:
            actions.append(KeepForResume(self.known_size, self.received))
        elif self.file_open or not keep:
            actions.append(RemoveFiles(state=self.has_state, partial=True))
        # else: failed before the partial was opened (the provider offline, gone from its queue):
        # an older partial is left as it was, for a later resume
        resumable = keep and self.ext and self.received
        self._report(actions, now, error=error + (" (run the download again to resume)" if resumable else ""))
        actions.append(Exit(error))
        return actions

    # ---- helpers ----
    def _window_meta(self) -> dict:
        if not self.window:
            return {}
        # a whole share (we run this transfer alone): large chunks are welcome (ft_common)
        return {"window": self.window, "chunk": BIG_CHUNK_SIZE} if self.window >= WINDOW else {"window": self.window}

    def _complete(self) -> bool:
        """All bytes are here and the provider's file hash too (unless it sends none)."""
        return self.size is not None and self.received >= self.size and not self.hash_follows

    def _maybe_finish(self, actions: list, now: float) -> list:
        if self._complete():
            return self._finish(actions)
        self.state = self.AWAITING_HASH if self.received >= self.known_size else self.RECEIVING
        return actions

    def _finish(self, actions: list) -> list:
        # from offset 0 with every chunk hashed in order, the running hash is the file's; a resumed
        # file is read back whole. A plain transfer has no hash to check.
        whole = self.resumed_from == 0 and self.chain_end == self.size and self.size
        self.state = self.VERIFYING
        actions.append(VerifyFile(read_back=self.ext and not whole))
        return actions

    def _keepalive(self, actions: list) -> None:
        """Keep one request outstanding to the provider (ext peers only): if its node goes away,
        the kernel fails the request at once and we learn of it."""
        if self.ext and not self.keepalive_out and self.provider is not None:
            actions.append(Send(self.provider, {"Progress": {"name": self.name, "progress": self.last_percent}},
                                {"ft": 1}, ACK_TIMEOUT, "keepalive"))
            self.keepalive_out = True

    def _report(self, actions: list, now: float, **extra) -> None:
        """Progress to the parent: at most once a second or per percent, always with `extra`.
        (Holding back a new percent would leave a stalled download showing an old figure: the
        requestor hears nothing more to report until the next chunk.)"""
        percent = 100 if not self.size else int(self.received * 100 / self.size)
        if not extra and percent == self.last_percent and now - self.last_report < 1.0:
            return
        self.last_percent, self.last_report = percent, now
        secs = max(now - self.started, 1e-6)
        meta = {"ft": 1, "peer": self.peer_node, "bytes": self.received, "total": self.size or 0,
                "rate": (self.received - self.resumed_from) / secs, "secs": secs}
        meta.update(extra)
        actions.append(Send(self.parent, {"Progress": {"name": self.name, "progress": percent}}, meta, 5, "progress"))


# ---- the provider ------------------------------------------------------------------------------
class Provider:
    """Sends `name` to the requestor worker `target`, at most WINDOW chunks unacknowledged."""

    OPENING = "opening"          # opening the file (a one-chunk file is read and hashed whole)
    OFFERED = "offered"          # Size sent, waiting for the resume offset
    SENDING = "sending"          # chunks in flight; waiting for acks
    READING = "reading"          # a chunk is being read (and hashed)
    PUSHING = "pushing"          # a plain peer: every chunk sent unacked
    CHECKING = "checking"        # all sent: checking the file is unchanged, for the final hash
    DRAINING = "draining"        # final hash sent, waiting for the last acks
    DONE = "done"
    FAILED = "failed"
    STATES = frozenset({OPENING, OFFERED, SENDING, READING, PUSHING, CHECKING, DRAINING, DONE, FAILED})

    def __init__(self, name: str, target: Any, parent: Any, now: float, *, extended: bool, window: int = WINDOW):
        self.name = name
        self.extended = extended     # we can speak the extended protocol
        self.target = target
        self.parent = parent
        self.state = self.OPENING
        self.started = self.last_activity = now
        self.size = 0
        self.stamp: Any = None        # the file's VFS stamp when we began: it changes if the file does
        self.next_offset = 0
        self.in_flight = 0
        self.flight_bytes: list = []  # the lengths of the chunks in flight, oldest first
        self.ext = False
        self.pipelined = False       # a one-chunk file's chunk went out right behind Size
        self.hash_sent = False
        self.first_offset = 0        # where this session's chunks begin (a resume point)
        self.chain_digest: str | None = None  # BLAKE3 of the bytes sent from first_offset on
        self.reading: tuple | None = None  # (offset, length) of the chunk being read
        self.window = window         # our share of the node's budget, in EXT_CHUNK_SIZE units (our parent says)
        self.peer_window = WINDOW    # the requestor's share of its node's budget (its acks say)
        self.peer_big = False        # the requestor asks for large chunks (its acks say)
        self.delta = False           # we offered to send only what changed (ft_delta)

    def _error_to_peer(self, text: str, keep: bool = True) -> Send:
        """`keep`: whether the requestor's partial may still serve a resume."""
        return Send(self.target, {"Size": 0}, {"ft": 1, "error": text, "keep": keep})

    # ---- events ----
    @property
    def reading_chunk(self) -> tuple:
        """(offset, length) of the chunk being read."""
        assert self.reading is not None
        return self.reading

    def handle(self, ev: Any) -> list:
        """The one entry: an event in, the actions out."""
        if type(ev) is ChunkRead:
            return self.chunk_read(ev.got, ev.digest, ev.now)
        if type(ev) is GotResponse:
            return self.response(ev.context, ev.meta, ev.now)
        if type(ev) is GotRequest:
            return self.request(ev.source, ev.body, ev.meta, ev.now)
        if type(ev) is SendFailed:
            return self.request_failed(ev.context, ev.kind, ev.now)
        if type(ev) is Opened:
            if ev.folder:
                return self._to_folder()
            assert ev.size is not None   # a file's Opened has its size
            return self.opened(ev.size, ev.stamp, ev.now, ev.delta)
        if type(ev) is FileChecked:
            return self.file_checked(ev.stamp, ev.digest, ev.now)
        if type(ev) is IoFailed:
            return self.io_failed(ev.error, ev.now)
        if type(ev) is Start:
            return self.start()
        raise TypeError(f"a Provider takes no {type(ev).__name__}")

    def _to_delta(self, ask: dict, meta: dict, now: float) -> list:
        """The requestor holds an older copy: a DeltaProvider sends our chunk list, then what it lacks."""
        avg = ask.get("avg")
        if not (isinstance(avg, int) and not isinstance(avg, bool) and DELTA_MIN_AVG <= avg <= DELTA_MAX_AVG):
            return [self._error_to_peer("bad delta request", keep=False)] + \
                self._failed(f"peer asked for chunks of a bad average size {avg!r}")
        self.peer_window = window_in(meta) or self.peer_window
        # pieces for one of several providers (ft_multi), or all that changed
        machine = _delta_machine("multi_provider" if ask.get("multi") == 1 else "provider")(self, avg, now)
        return [SwitchToDelta(machine), *machine.start()]

    def _to_folder(self) -> list:
        """The name is a folder: a FolderProvider takes over (our file_transfer serves a folder only
        to a requestor that asked for folders)."""
        folder = _folder_machine("provider")(self.name, self.target, self.parent, self.started, window=self.window)
        return [SwitchToFolder(folder), *folder.start()]

    def start(self) -> list:
        # the parent hears of us at once, and answers with our window
        return [ArmTimer(TICK), self._serving(True), OpenFile()]

    def opened(self, size: int, stamp: Any, now: float, delta: bool = False) -> list:
        if self.state != self.OPENING:
            raise RuntimeError(f"opened in state {self.state}")
        self.size, self.stamp = size, stamp
        if self.extended and 0 < size <= CHUNK_SIZE:
            # a small file is read whole now: the chunk's hash is the file's, and the chunk follows
            # Size without waiting for its answer (a one-chunk file has no resume point). Up to the
            # seed's chunk size, which any requestor, a plain one too, takes in one piece.
            self.reading = (0, size)
            return [ReadChunk(size, HASH_WHOLE)]
        # else the whole-file hash follows the last chunk: hashing first would hold the first byte
        # back by a read of the whole file
        self.state = self.OFFERED
        meta: dict | None = None
        if self.extended:
            # an offer to send only what changed, to a requestor holding an older copy (ft_delta)
            self.delta = delta and DELTA_MIN < size <= DELTA_MAX and stamp is not None
            # ... and to send pieces of it as one of several providers (ft_multi)
            meta = {"ft": 1, "delta": 1, "multi": 1} if self.delta else {"ft": 1}
        return [Send(self.target, {"Size": size}, meta, HANDSHAKE_TIMEOUT, "size")]

    def chunk_read(self, got: int, digest: str | None, now: float) -> list:
        if self.state == self.OPENING:
            if got != self.size:
                return [self._error_to_peer(self._changed(), keep=False)] + self._failed("file changed while being read")
            self.next_offset = self.size
            self.pipelined = True
            self.state = self.OFFERED
            return [Send(self.target, {"Size": self.size}, {"ft": 1, "blake3": digest}, HANDSHAKE_TIMEOUT, "size"),
                    Send(self.target, {"Chunk": {"name": self.name, "offset": 0, "length": self.size}},
                         {"ft": 1, "upto": digest}, forward_blob=True)]
        if self.state not in (self.READING, self.PUSHING):
            raise RuntimeError(f"chunk_read in state {self.state}")
        offset, length = self.reading_chunk
        self.reading = None
        if got != length:
            return [self._error_to_peer(self._changed(), keep=False)] + self._failed("file changed while being sent")
        body = {"Chunk": {"name": self.name, "offset": offset, "length": length}}
        self.next_offset = offset + length
        if not self.ext:
            actions: list = [Send(self.target, body, forward_blob=True)]
            return actions + self._push_next()
        self.chain_digest = digest
        self.in_flight += 1
        self.flight_bytes.append(length)
        actions = [Send(self.target, body, {"ft": 1, "upto": digest}, ACK_TIMEOUT, "chunk", forward_blob=True)]
        self.state = self.SENDING
        return self._fill_window(actions)

    def response(self, context: str | None, meta: dict, now: float) -> list:
        """The answer to Size (the resume offset) or a chunk's ack."""
        if context == "size" and self.state == self.OFFERED:
            offset = meta.get("offset", 0)
            if self.pipelined:
                if offset not in (0, self.size) or isinstance(offset, bool):
                    return self._failed(f"peer asked to resume a one-chunk file at {offset!r}")
                return self._done()
            if not (self.extended and meta.get("ft") == 1):
                return self._push_plain()  # a plain answer: the requestor speaks the seed's protocol
            if self.delta and isinstance(meta.get("delta"), dict):
                return self._to_delta(meta["delta"], meta, now)
            if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= self.size:
                return [self._error_to_peer("bad resume offset", keep=False)] + \
                    self._failed(f"peer asked for a bad resume offset {offset!r}")
            self.ext = True
            self.peer_window = window_in(meta) or self.peer_window
            self.peer_big = _asks_big(meta)
            self.next_offset = self.first_offset = offset
            self.state = self.SENDING
            return self._fill_window([Seek(offset)] if offset else [])
        if context == "chunk" and self.state in (self.SENDING, self.DRAINING):
            self.in_flight -= 1
            if self.flight_bytes:
                self.flight_bytes.pop(0)
            self.last_activity = now
            self.peer_window = window_in(meta) or self.peer_window
            self.peer_big = _asks_big(meta)
            return self._fill_window([])
        return []

    def request(self, source: Any, body: Any, meta: dict, now: float) -> list:
        """A request from the requestor: a keepalive, or its error."""
        if self.state in (self.DONE, self.FAILED):
            return []
        if source == self.parent and meta.get("cancel"):
            return self._failed("cancelled")
        if source == self.parent and window_in(meta):
            self.window = window_in(meta)
            # (a read under way fills the window when its chunk is sent)
            return self._fill_window([]) if self.state == self.SENDING else []
        if source == self.target and isinstance(body, dict) and "Progress" in body:
            if meta.get("error"):
                return self._failed(f"the requestor stopped: {meta['error']}")
            return [Reply("Progress")]
        return [Log(f"worker: ignored a bad message from {source}: a provider takes only keepalives "
                    f"from its requestor")]

    def file_checked(self, stamp: Any, digest: str | None, now: float) -> list:
        if self.state != self.CHECKING:
            raise RuntimeError(f"file_checked in state {self.state}")
        if self.stamp is not None and stamp != self.stamp:
            # even where no byte already sent differs: the copy would be of no one instant
            return [self._error_to_peer(self._changed(), keep=False)] + self._failed("file changed while being sent")
        if digest is None:
            digest = self.chain_digest  # sent from 0, the file unchanged: what was sent is the whole file
        self.hash_sent = True
        self.state = self.DRAINING
        return self._fill_window([Send(self.target, {"Progress": {"name": self.name, "progress": 100}},
                                       {"ft": 1, "final": True, "blake3": digest})])

    def tick(self, now: float) -> list:
        if self.state in (self.DONE, self.FAILED):
            return []
        if now - self.last_activity > STALL_TIMEOUT:
            return self._failed(f"no progress for {STALL_TIMEOUT} s; giving up")
        return [self._serving(True), ArmTimer(TICK)]

    def _serving(self, still: bool) -> Send:
        """Tell the parent we hold (or gave up) one of its serving slots; no answer wanted."""
        percent = 100 if not self.size else int(self.next_offset * 100 / self.size)
        return Send(self.parent, {"Progress": {"name": self.name, "progress": percent}},
                    {"ft": 1, "serving": still, "peer": self.target.node})

    def request_failed(self, context: str | None, kind: str, now: float) -> list:
        if context == "tick":
            return self.tick(now)
        if context == "size" and self.state == self.OFFERED:
            # no answer to Size: a peer speaking only the plain protocol; push every chunk unacked
            if self.pipelined:
                return self._done()
            return self._push_plain()
        if context == "chunk" and self.state not in (self.DONE, self.FAILED):
            return self._failed(f"{self.target.node} stopped acknowledging chunks ({kind})")
        return []

    def io_failed(self, error: str, now: float) -> list:
        """An action's I/O failed (the error text is for our log; the peer gets a plain reason)."""
        if self.state in (self.DONE, self.FAILED):
            return []
        if self.state == self.OPENING:
            text, keep = f"cannot read {self.name}", False
        else:  # gone (deleted, replaced by a folder) or unreadable: what was sent is of no use either
            text, keep = self._changed(" (it is gone or unreadable)"), False
        return [self._error_to_peer(text, keep)] + self._failed(error)

    # ---- helpers ----
    def _changed(self, how: str = "") -> str:
        """The error for a file changed under the transfer: the requestor removes its partial (a
        resume would mix two versions; the final hash would refuse it, but it is of no use)."""
        return f"{self.name} changed on {self.parent.node} during the transfer{how}; nothing was saved"

    def _read(self, length: int, how: str) -> ReadChunk:
        self.reading = (self.next_offset, length)
        return ReadChunk(length, how)

    def _push_plain(self) -> list:
        """The seed's protocol: every chunk in its 1 MiB pieces, unacknowledged, then the end."""
        self.ext = False
        self.state = self.PUSHING
        return self._push_next()

    def _push_next(self) -> list:
        if self.next_offset < self.size:
            return [self._read(min(CHUNK_SIZE, self.size - self.next_offset), HASH_NONE)]
        return self._done()

    def _chunk_size(self) -> int:
        """Large chunks only for a big file while both nodes give this transfer a whole share."""
        if self.size > BIG_MIN and self.window >= WINDOW and self.peer_big:
            return BIG_CHUNK_SIZE
        return EXT_CHUNK_SIZE

    def _fill_window(self, actions: list) -> list:
        length = min(self._chunk_size(), self.size - self.next_offset)
        # the windows are bytes, counted in EXT_CHUNK_SIZE units; at least one chunk is in flight
        room = min(self.window, self.peer_window) * EXT_CHUNK_SIZE - sum(self.flight_bytes)
        if self.next_offset < self.size and (self.in_flight == 0 or length <= room):
            self.state = self.READING
            how = HASH_CHAIN_RESTART if self.next_offset == self.first_offset else HASH_CHAIN
            actions.append(self._read(length, how))
            return actions
        if self.next_offset >= self.size and not self.hash_sent:
            # the chunks' running hash is the file's if they began at 0 and the file's stamp is
            # unchanged; a resumed transfer reads the whole file for it
            self.state = self.CHECKING
            actions.append(CheckFile(read_back=not (self.first_offset == 0 and self.size)))
            return actions
        if self.in_flight == 0 and self.next_offset >= self.size:
            return actions + self._done()
        return actions

    def _done(self) -> list:
        self.state = self.DONE
        return [self._serving(False), Exit()]

    def _failed(self, error: str) -> list:
        self.state = self.FAILED
        return [Log(f"upload of {self.name} to {self.target.node} stopped: {error}"), self._serving(False),
                Exit(error)]
