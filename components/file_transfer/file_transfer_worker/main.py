# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""file_transfer_worker: moves one file, then exits.

A requestor worker asks the serving node's file_transfer for a file, receives its chunks into a
partial file inside the drive, verifies every chunk and the whole file, and renames the partial
to the real name only when all is verified. A provider worker reads the file in chunks and sends
them with at most WINDOW unacknowledged. Both end on completion, on error and after a stall; file
data stays in the host (VFS reads and network chunks are forwarded as host-held blobs).
"""
import json
import time

import wit_world

from ft_common import (ACK_TIMEOUT, CHUNK_SIZE, EXT_CHUNK_SIZE, HANDSHAKE_TIMEOUT, PARTIAL_DIR, STALL_TIMEOUT,
                       STATE_EVERY, TICK, WINDOW, check_name)
from process_lib import (HAS_BLOBS, Address, Message, ProcessId, Request, Response, SendError, await_message,
                         current_blob_hash, current_blob_hash_chained, current_blob_len, println, run, vfs)

# The extended protocol (acks, resume, BLAKE3 checks) needs the host's blob extension to hash in the
# host; a portable build (PORTABLE=1 ./build.sh) speaks the seed's plain protocol.
EXT = HAS_BLOBS


class Done(Exception):
    """The worker's job has ended (successfully or not)."""


class Failed(Exception):
    """The transfer failed; `keep` says whether the partial may be resumed later."""

    def __init__(self, message: str, keep: bool = True):
        super().__init__(message)
        self.keep = keep


def _addr(d: dict) -> Address:
    p = d["process"]
    return Address(d["node"], ProcessId(p["process_name"], p["package_name"], p["publisher_node"]))


def _addr_json(a: Address) -> dict:
    p = a.process
    return {"node": a.node, "process": {"process_name": p.process_name, "package_name": p.package_name,
                                        "publisher_node": p.publisher_node}}


class Worker:
    def __init__(self, our: Address):
        self.our = our
        self.drive = f"/{our.package_id()}/files"
        self.parent = None
        self.role = None
        self.name = ""
        self.last_activity = time.monotonic()
        self.started = time.monotonic()

    # ---- shared ------------------------------------------------------------------------------
    def tick(self) -> None:
        """A request to ourselves that we never answer: its timeout is our timer."""
        Request.to(self.our).body("Tick").expects_response(TICK).context("tick").send()

    def handle(self, msg: Message) -> None:
        body = msg.json()
        if msg.is_request and msg.source == self.our:
            return  # our own tick: leave it unanswered
        if msg.is_request and isinstance(body, dict) and "Download" in body and self.role is None:
            self.parent = msg.source
            req = body["Download"]
            if msg.expects_response is not None:
                Response().body({"Download": {"Ok": None}}).send()
            problem = check_name(req.get("name"))
            if problem:
                raise Failed(problem, keep=False)
            self.name = req["name"]
            self.peer = _addr(req["target"])
            self.tick()
            self.role = Requestor(self) if req.get("is_requestor") else Provider(self)
            self.role.begin()
            return
        if self.role is None:
            raise ValueError(f"unexpected message before Download from {msg.source}")
        if msg.is_request and msg.source == self.parent and msg.meta().get("cancel"):
            raise Failed("cancelled", keep=False)
        self.role.handle(msg, body)

    def on_error(self, err: SendError) -> None:
        what = json.loads(err.context) if err.context else None
        if what == "tick":
            if time.monotonic() - self.last_activity > STALL_TIMEOUT:
                raise Failed(f"no progress for {STALL_TIMEOUT} s; giving up")
            if isinstance(self.role, Requestor):
                if self.role.size is None and time.monotonic() - self.started > HANDSHAKE_TIMEOUT:
                    # the peer accepted but its worker never began (it may be at its process limit)
                    raise Failed(f"{self.peer.node} did not start sending within {HANDSHAKE_TIMEOUT} s")
                # a provider can vanish between two keepalives: ask again, and an offline node
                # fails the request at once rather than after the stall timeout
                self.role.keepalive()
            self.tick()
        elif what == "progress":
            pass  # the parent is busy or gone: progress is advisory
        elif self.role is not None:
            self.role.on_error(what, err)


class Requestor:
    def __init__(self, w: Worker):
        self.w = w
        self.peer_node = w.peer.node
        base = f"{w.drive}/{PARTIAL_DIR}/{self.peer_node}"
        self.partial_dir = base
        self.partial = f"{base}/{w.name}.part"
        self.state_path = f"{base}/{w.name}.state"
        self.provider = None
        self.file = None
        self.size = None
        self.file_hash = None
        self.received = 0
        self.cursor = 0
        self.ext = False
        self.chunks_since_save = 0
        self.last_report = 0.0
        self.last_percent = -1
        self.resumed_from = 0
        self.keepalive_out = False
        self.has_state = False
        self.chain_end = None      # where the bytes hashed in order from the resume point end, if they do
        self.chain_digest = None   # their BLAKE3: from offset 0, the whole file's once all have arrived
        self.hash_follows = False  # the provider sends the file's hash after the last chunk

    def begin(self) -> None:
        (Request.to(self.w.peer)
         .body({"Download": {"name": self.w.name, "target": _addr_json(self.w.peer), "is_requestor": False}})
         .metadata({"ft": 1} if EXT else None)
         .expects_response(HANDSHAKE_TIMEOUT)
         .context("download")
         .send())

    def handle(self, msg: Message, body) -> None:
        w = self.w
        if not msg.is_request:
            if msg.context and json.loads(msg.context) == "keepalive":
                self.keepalive_out = False
                return
            if isinstance(body, dict) and isinstance(body.get("Download"), dict):
                result = body["Download"]
                if "Err" in result:
                    raise Failed(str(result["Err"]), keep=False)
                w.last_activity = time.monotonic()
            return
        if msg.source.node != self.peer_node:
            raise ValueError(f"{msg.source} is not the peer of this transfer")
        meta = msg.meta()
        if meta.get("error"):
            # keep the partial for a resume, unless the provider says it is of no use
            raise Failed(f"{self.peer_node}: {meta['error']}", keep=meta.get("keep") is not False)
        if isinstance(body, dict) and "Size" in body:
            self.on_size(msg, body["Size"], meta)
        elif isinstance(body, dict) and isinstance(body.get("Chunk"), dict):
            self.on_chunk(msg, body["Chunk"], meta)
        elif isinstance(body, dict) and "Progress" in body and meta.get("final") and self.hash_follows:
            self.on_final_hash(msg, meta)
        else:
            raise ValueError("unknown request")

    def on_size(self, msg: Message, size, meta: dict) -> None:
        if self.size is not None:
            raise ValueError("second Size for this transfer")
        if not isinstance(size, int) or size < 0 or size >= 2**63:
            raise Failed(f"peer sent an invalid size {size!r}", keep=False)
        self.provider = msg.source
        self.size = size
        self.ext = EXT and meta.get("ft") == 1
        self.file_hash = meta.get("blake3") if self.ext else None
        self.hash_follows = self.ext and self.file_hash is None
        # a file of one chunk has nothing to resume: no state file for it
        self.has_state = self.ext and size > EXT_CHUNK_SIZE
        offset = self.resume_offset() if self.has_state else 0
        if offset:
            self.file = vfs.open_file(self.partial, create=True)
            self.file.set_len(offset)
            self.file.seek(offset)
        else:
            self.file = self.create_partial()  # truncates any older, longer leftover
            if self.has_state:
                self.save_state(0)
        self.received = self.cursor = self.resumed_from = self.chain_end = offset
        if msg.expects_response is not None:   # a plain answer tells an ext provider to go plain
            Response().body("Progress").metadata({"ft": 1, "offset": offset} if self.ext else None).send()
        self.w.last_activity = time.monotonic()
        if offset:
            println(f"{self.w.name}: resuming at {offset} of {size} bytes")
        self.maybe_finish()

    def create_partial(self) -> vfs.File:
        try:
            return vfs.create_file(self.partial)
        except vfs.VfsError:
            vfs.open_dir(self.partial_dir, create=True)  # the first download from this peer
            return vfs.create_file(self.partial)

    def resume_offset(self) -> int:
        try:
            state = json.loads(vfs.open_file(self.state_path).read_to_string())
            partial_len = vfs.metadata(self.partial).len
        except (vfs.VfsError, ValueError):
            return 0
        # The provider's whole-file hash comes only after the last chunk, so a partial is resumed
        # on its size alone: if the file changed in between, that final check fails the download
        # and removes the partial (the next run starts from zero).
        if (state.get("size") == self.size and isinstance(state.get("verified"), int)
                and 0 <= state["verified"] <= min(partial_len, self.size)):
            return state["verified"]
        return 0

    def save_state(self, verified: int) -> None:
        data = json.dumps({"size": self.size, "verified": verified}).encode()
        vfs.create_file(self.state_path).write(data)

    def on_chunk(self, msg: Message, chunk: dict, meta: dict) -> None:
        if self.size is None or self.file is None:
            raise ValueError("Chunk before Size")
        if msg.source != self.provider:
            raise ValueError(f"Chunk from {msg.source}, not from this transfer's provider")
        offset, length = chunk.get("offset"), chunk.get("length")
        blob_len = current_blob_len()
        if chunk.get("name") != self.w.name or not isinstance(offset, int) or not isinstance(length, int):
            raise Failed("peer sent a malformed chunk", keep=True)
        if blob_len is None or blob_len != length or offset < 0 or offset + length > self.size:
            raise Failed(f"peer sent a chunk that does not fit the file (offset {offset}, length {length}, "
                         f"{blob_len} bytes, size {self.size})")
        if self.ext and offset != self.received:
            raise Failed(f"chunk at offset {offset}, expected {self.received}")
        self.hash_chunk(offset, length)
        if self.ext and (self.chain_digest is None or meta.get("upto") != self.chain_digest):
            raise Failed(f"chunk at offset {offset} failed its integrity check")
        if offset != self.cursor:
            self.file.seek(offset)
        self.file.write_all_current_blob()
        self.cursor = offset + length
        self.received = max(self.received, self.cursor) if not self.ext else self.cursor
        if msg.expects_response is not None:
            Response().body("Progress").metadata({"ft": 1, "ack": offset}).send()
        self.w.last_activity = time.monotonic()
        self.maybe_finish()
        self.chunks_since_save += 1
        if self.has_state and self.chunks_since_save >= STATE_EVERY:
            # Not synced first: a node that is killed keeps its written pages (the OS has them),
            # and after an OS crash the read-back hash in finish() catches a hole behind the
            # state; an fsync per save halved the speed of a big download.
            self.save_state(self.received)
            self.chunks_since_save = 0
        self.report()
        self.keepalive()

    def hash_chunk(self, offset: int, length: int) -> None:
        """Extend the running hash of this session's bytes, which an ext provider's `upto` must
        match. It starts at the resume point; while it holds every byte from 0 in order, its
        digest at the end is the whole file's."""
        if self.ext and self.chain_end is not None and offset == self.chain_end:
            self.chain_digest = current_blob_hash_chained(offset == self.resumed_from)
            self.chain_end = offset + length
        else:  # out of order (a plain peer may): no running hash from here on
            self.chain_end = self.chain_digest = None

    def keepalive(self) -> None:
        """Keep one Progress request outstanding to the provider (ext peers only): if the
        provider's node goes away, the kernel fails it at once and we learn of it."""
        if self.ext and not self.keepalive_out and self.provider is not None:
            (Request.to(self.provider).body({"Progress": {"name": self.w.name, "progress": self.last_percent}})
             .metadata({"ft": 1}).expects_response(ACK_TIMEOUT).context("keepalive").send())
            self.keepalive_out = True

    def report(self, **extra) -> None:
        now = time.monotonic()
        percent = 100 if not self.size else int(self.received * 100 / self.size)
        if not extra and percent == self.last_percent and now - self.last_report < 1.0:
            return
        self.last_percent, self.last_report = percent, now
        secs = max(now - self.w.started, 1e-6)
        meta = {"ft": 1, "peer": self.peer_node, "bytes": self.received, "total": self.size or 0,
                "rate": (self.received - self.resumed_from) / secs, "secs": secs}
        meta.update(extra)
        (Request.to(self.w.parent).body({"Progress": {"name": self.w.name, "progress": percent}})
         .metadata(meta).expects_response(5).context("progress").send())

    def on_final_hash(self, msg: Message, meta: dict) -> None:
        if msg.source != self.provider:
            raise ValueError(f"{msg.source} is not this transfer's provider")
        digest = meta.get("blake3")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise Failed("peer sent a malformed file hash", keep=False)
        self.file_hash = digest
        self.hash_follows = False
        self.w.last_activity = time.monotonic()
        self.maybe_finish()

    def maybe_finish(self) -> None:
        """All bytes are here and the provider's file hash too (unless it sends none)."""
        if self.size is not None and self.received >= self.size and not self.hash_follows:
            self.finish()

    def finish(self) -> None:
        self.file.sync_all()  # durable before it takes the real name
        whole = self.resumed_from == 0 and self.chain_end == self.size and self.size
        digest = None if not self.ext else self.chain_digest if whole else self.file.blake3()  # a resumed file is read back
        if self.file_hash and digest != self.file_hash:
            raise Failed("the downloaded file does not match the provider's hash (it changed while being "
                         "sent, or was corrupted); nothing was saved", keep=False)
        vfs.rename(self.partial, f"{self.w.drive}/{self.w.name}")  # the VFS closes handles on it
        self.cleanup(partial=False)
        self.report(done=True, hash=digest)
        raise Done()

    def cleanup(self, partial: bool = True) -> None:
        targets = [self.state_path] if self.has_state else []
        if partial:
            targets.append(self.partial)
        for path in targets:
            try:
                vfs.remove_file(path)
            except vfs.VfsError:
                pass

    def fail(self, error: Failed) -> None:
        if self.provider is not None and self.ext:
            # tell the provider to stop now rather than after its ack timeout
            (Request.to(self.provider).body({"Progress": {"name": self.w.name, "progress": max(self.last_percent, 0)}})
             .metadata({"ft": 1, "error": str(error)}).send())
        if self.file is not None and error.keep and self.ext:
            try:
                self.file.sync_all()
                self.save_state(self.received)
            except vfs.VfsError:
                pass
        else:
            self.cleanup()
        try:
            self.report(error=str(error) + (" (run the download again to resume)" if error.keep and self.ext and self.received else ""))
        except Exception:
            pass

    def on_error(self, what, err: SendError) -> None:
        if what == "download":
            reason = "is offline" if err.kind == "offline" else f"did not answer within {HANDSHAKE_TIMEOUT} s"
            raise Failed(f"{self.peer_node} {reason}", keep=True)
        if what == "keepalive":
            reason = "went offline" if err.kind == "offline" else "stopped answering"
            raise Failed(f"{self.peer_node} {reason} during the transfer", keep=True)


class Provider:
    def __init__(self, w: Worker):
        self.w = w
        self.target = w.peer
        self.file = None
        self.size = 0
        self.next_offset = 0
        self.in_flight = 0
        self.ext = False
        self.pipelined = False  # a one-chunk file's chunk went out right behind Size
        self.hash_sent = False  # the whole-file hash, sent after the last chunk
        self.stamp = None       # the file's VFS stamp when we began: it changes if the file does
        self.first_offset = 0   # where this session's chunks begin (a resume point)
        self.chain_digest = None  # BLAKE3 of the bytes sent from first_offset on

    def error_to_peer(self, text: str, keep: bool = True) -> None:
        """`keep`: whether the requestor's partial may still serve a resume."""
        Request.to(self.target).body({"Size": 0}).metadata({"ft": 1, "error": text, "keep": keep}).send()

    def begin(self) -> None:
        path = f"{self.w.drive}/{self.w.name}"
        try:
            self.file = vfs.open_file(path, create=False)
            found = self.file.metadata()
            self.size, self.stamp = found.len, found.stamp
            # up to the seed's chunk size, which any requestor takes in one piece (a portable one too)
            one_chunk = EXT and 0 < self.size <= CHUNK_SIZE
            meta = {"ft": 1} if EXT else None
            if one_chunk:
                # a small file is read whole now: the chunk's hash is the file's hash, and the
                # chunk follows Size without waiting for its answer (a one-chunk file has no
                # resume point, so the answer can only be offset 0)
                if self.file.read_at_to_blob(self.size) != self.size:
                    raise vfs.VfsError(f"{self.w.name} changed while being read")
                meta["blake3"] = digest = current_blob_hash()
            # else the whole-file hash follows the last chunk: hashing first would hold the first
            # byte back by a read of the whole file (seconds for a big one)
        except vfs.VfsError as e:
            self.error_to_peer(f"cannot read {self.w.name}", keep=False)
            raise Failed(str(e), keep=False)
        (Request.to(self.target).body({"Size": self.size}).metadata(meta)
         .expects_response(HANDSHAKE_TIMEOUT).context("size").send())
        if one_chunk:
            (Request.to(self.target)
             .body({"Chunk": {"name": self.w.name, "offset": 0, "length": self.size}})
             .metadata({"ft": 1, "upto": digest})
             .forward_current_blob()
             .send())
            self.next_offset = self.size
            self.pipelined = True

    def handle(self, msg: Message, body) -> None:
        if msg.is_request:
            if msg.source == self.target and isinstance(body, dict) and "Progress" in body:
                if msg.meta().get("error"):
                    raise Failed(f"the requestor stopped: {msg.meta()['error']}", keep=False)
                Response().body("Progress").send()  # the requestor's keepalive
                return
            raise ValueError("a provider takes only keepalives from its requestor")
        meta = msg.meta()
        what = json.loads(msg.context) if msg.context else None
        if what == "size":
            offset = meta.get("offset", 0)
            if self.pipelined:
                if offset not in (0, self.size):
                    raise Failed(f"peer asked to resume a one-chunk file at {offset!r}", keep=False)
                raise Done()
            if not isinstance(offset, int) or not 0 <= offset <= self.size:
                self.error_to_peer("bad resume offset", keep=False)
                raise Failed(f"peer asked for a bad resume offset {offset!r}", keep=False)
            if not (EXT and meta.get("ft") == 1):
                self.push_plain()   # a plain answer: the requestor speaks the seed's protocol
            self.ext = True
            self.next_offset = self.first_offset = offset
            if offset:
                self.file.seek(offset)
            self.fill_window()
        elif what == "chunk":
            self.in_flight -= 1
            self.w.last_activity = time.monotonic()
            self.fill_window()

    def push_plain(self) -> None:
        """The seed's protocol: every chunk at once, unacknowledged."""
        self.ext = False
        while self.next_offset < self.size:
            self.send_chunk()
        raise Done()

    def fill_window(self) -> None:
        while self.in_flight < WINDOW and self.next_offset < self.size:
            self.send_chunk()
        if self.next_offset >= self.size and not self.hash_sent:
            self.send_file_hash()
        if self.in_flight == 0 and self.next_offset >= self.size:
            raise Done()

    def send_file_hash(self) -> None:
        """After the last chunk: the hash of the whole file. The chunks' running hash is that hash
        if they began at 0 and the file's VFS stamp (size, mtime, ctime) is unchanged since Size;
        a transfer that resumed part way reads the whole file for it."""
        try:
            changed = self.stamp is not None and self.file.metadata().stamp != self.stamp
            if changed:
                digest = None
            elif self.first_offset == 0 and self.size:
                digest = self.chain_digest  # the file unchanged, what was sent is the whole file
            else:
                digest = self.file.blake3()  # a resumed transfer: read the whole file
        except vfs.VfsError as e:
            self.error_to_peer(f"{self.w.name} became unreadable while being sent")
            raise Failed(str(e), keep=False)
        if changed:  # even where no byte already sent differs: the copy would be of no one instant
            self.error_to_peer(f"{self.w.name} changed while being sent; nothing was saved", keep=False)
            raise Failed("file changed while being sent", keep=False)
        (Request.to(self.target).body({"Progress": {"name": self.w.name, "progress": 100}})
         .metadata({"ft": 1, "final": True, "blake3": digest}).send())
        self.hash_sent = True

    def send_chunk(self) -> None:
        offset = self.next_offset
        length = min(EXT_CHUNK_SIZE if self.ext else CHUNK_SIZE, self.size - offset)
        try:
            got = self.file.read_at_to_blob(length)
        except vfs.VfsError as e:
            self.error_to_peer(f"{self.w.name} changed or became unreadable while being sent", keep=False)
            raise Failed(str(e), keep=False)
        if got != length:
            self.error_to_peer(f"{self.w.name} changed while being sent", keep=False)
            raise Failed("file changed while being sent", keep=False)
        req = (Request.to(self.target)
               .body({"Chunk": {"name": self.w.name, "offset": offset, "length": length}})
               .forward_current_blob())
        if self.ext:
            self.chain_digest = current_blob_hash_chained(offset == self.first_offset)
            req.metadata({"ft": 1, "upto": self.chain_digest}).expects_response(ACK_TIMEOUT).context("chunk")
            self.in_flight += 1
        req.send()
        self.next_offset = offset + length

    def on_error(self, what, err: SendError) -> None:
        if what == "size":
            # no answer to Size: a peer speaking only the plain protocol; push every chunk unacked
            if self.pipelined:
                raise Done()
            self.push_plain()
        if what == "chunk":
            raise Failed(f"{self.target.node} stopped acknowledging chunks ({err.kind})", keep=False)


def main(our: Address) -> None:
    w = Worker(our)
    while True:
        try:
            try:
                msg = await_message()
            except SendError as err:
                w.on_error(err)
                continue
            try:
                w.handle(msg)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                println(f"worker: ignored a bad message from {msg.source}: {e}")
        except Done:
            return
        except (Failed, vfs.VfsError) as e:
            failure = e if isinstance(e, Failed) else Failed(str(e))
            if isinstance(w.role, Requestor):
                w.role.fail(failure)
            elif isinstance(w.role, Provider):
                println(f"upload of {w.name} to {w.peer.node} stopped: {failure}")
            else:
                println(f"error: transfer of {w.name or '?'} failed: {failure}")
            return


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
