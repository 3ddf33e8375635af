# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""file_transfer_worker: moves one file, or one folder (ft_folder), then exits.

A requestor worker asks the serving node's file_transfer for a file, receives its chunks into a
partial file inside the drive, verifies every chunk and the whole file, and renames the partial
to the real name only when all is verified. A provider worker reads the file in chunks and sends
them with at most WINDOW unacknowledged. Both end on completion, on error and after a stall; file
data stays in the host (VFS reads and network chunks are forwarded as host-held blobs).

The protocol itself is ft_protocol's Requestor and Provider, and ft_folder's machines when a
machine hands over to them (SwitchToFolder); this module feeds every machine the same way, messages
and I/O results as events to `handle`, and carries out the actions with process_lib calls.
"""
import json
import time

import ft_delta
import ft_folder
import ft_multi
import ft_protocol as ft
import wit_world
from ft_common import DELTA_MIN, MAX_FOLDER_DEPTH, MAX_FOLDER_ENTRIES, PARTIAL_DIR, START_WINDOW, check_name
from process_lib import (
    HAS_BLOBS,
    Address,
    Message,
    ProcessId,
    Request,
    Response,
    SendError,
    await_message,
    current_blob_hash,
    current_blob_hash_chained,
    current_blob_len,
    get_blob,
    println,
    run,
    vfs,
)

# The extended protocol hashes in the host through its blobs extension; a portable build (without
# it) speaks the seed's plain protocol, and its machines then ask for no hash at all.
EXTENDED = HAS_BLOBS

_HASHERS = {  # how a ReadChunk's bytes are hashed
    ft.HASH_NONE: lambda: None,
    ft.HASH_WHOLE: current_blob_hash,
    ft.HASH_CHAIN: lambda: current_blob_hash_chained(False),
    ft.HASH_CHAIN_RESTART: lambda: current_blob_hash_chained(True),
}


DIRS_PER_CALL = 2000  # folders created per VFS call when a partial tree is prepared
DELTA_TIMEOUT = 600   # seconds for the host to chunk, copy or hash a big file (ft_delta)


def _addr(d: dict) -> Address:
    p = d["process"]
    return Address(d["node"], ProcessId(p["process_name"], p["package_name"], p["publisher_node"]))


class Worker:
    def __init__(self, our: Address):
        self.our = our
        self.drive = f"/{our.package_id()}/files"
        self.started = time.monotonic()
        self.machine = None      # an ft.Requestor or ft.Provider once Download has come
        self.requestor = False
        self.own_partial_dir = False   # its partial folder is this download's alone (a list of nodes): removed after
        self.name = ""
        self.file = None         # the partial (requestor) or the file being sent (provider)
        self.stale: set = set()  # earlier sessions' providers, whose messages are dropped (ft_multi)
        self.perform = {
            ft.Send: self.send, ft.Reply: self.reply, ft.ArmTimer: self.arm_timer, ft.Log: self.log,
            ft.LoadState: self.load_state, ft.OpenPartial: self.open_partial, ft.SaveState: self.save_state,
            ft.HashChunk: self.hash_chunk, ft.WriteChunk: self.write_chunk, ft.VerifyFile: self.verify_file,
            ft.Rename: self.rename, ft.RemoveFiles: self.remove_files, ft.KeepForResume: self.keep_for_resume,
            ft.OpenFile: self.open_file, ft.Seek: self.seek, ft.ReadChunk: self.read_chunk,
            ft.CheckFile: self.check_file, ft.SwitchToFolder: self.switch_to_folder,
            ft.ReadManifest: self.read_manifest,
            # only what changed (ft_delta)
            ft.SwitchToDelta: self.switch_to_delta, ft_delta.ChunkBasis: self.chunk_basis,
            ft_delta.ReadChunkList: self.read_chunk_list, ft_delta.CopyRanges: self.copy_ranges,
            ft_delta.WriteRanges: self.write_ranges, ft_delta.VerifyWhole: self.verify_whole,
            ft_delta.ChunkFile: self.chunk_file, ft_delta.ReadPieces: self.read_pieces,
            ft_delta.HashWhole: self.hash_whole, ft_delta.MoveBasisAside: self.move_basis_aside,
            ft_delta.RemoveBasis: self.remove_basis, ft_delta.ForgetBasis: self.forget_basis,
            ft_delta.FetchWhole: self.fetch_whole, ft_delta.RestoreBasis: self.restore_basis,
            # from several nodes at once (ft_multi)
            ft_multi.FetchSingle: self.fetch_single, ft_multi.SavePieces: self.save_pieces,
            # folders (ft_folder)
            ft_folder.SendBlob: self.send_blob, ft_folder.WalkTree: self.walk_tree,
            ft_folder.ReadBatch: self.read_batch, ft_folder.LoadFolderState: self.load_folder_state,
            ft_folder.PrepareTree: self.prepare_tree, ft_folder.WriteBatch: self.write_batch,
            ft_folder.FinishTree: self.finish_tree, ft_folder.RemoveTree: self.remove_tree,
        }

    # ---- messages to events ----------------------------------------------------------------------
    def on_message(self, msg: Message) -> list:
        body = msg.json()
        if msg.is_request and msg.source == self.our:
            return []  # our own tick: leave it unanswered
        if self.machine is None:
            # the first Download comes from the process that spawned us, on this node (other nodes
            # may message any process holding the network cap)
            if msg.is_request and msg.source.node == self.our.node and isinstance(body, dict) and "Download" in body:
                return self.begin(msg, body["Download"])
            raise ValueError(f"unexpected message before Download from {msg.source}")
        now = time.monotonic()
        if msg.is_request and self.stale and str(msg.source) in self.stale:
            return []
        if msg.is_request:
            return self.machine.handle(ft.GotRequest(msg.source, body, msg.meta(), now, msg.expects_response is not None,
                                                     current_blob_len() if self.requestor else None))
        context = json.loads(msg.context) if msg.context else None
        return self.machine.handle(ft.GotResponse(context, body, msg.meta(), now))

    def on_send_error(self, err: SendError) -> list:
        if self.machine is None:
            return []
        context = json.loads(err.context) if err.context else None
        return self.machine.handle(ft.SendFailed(context, err.kind, time.monotonic()))

    def begin(self, msg: Message, req: dict) -> list:
        self.parent = msg.source
        if msg.expects_response is not None:
            Response().body({"Download": {"Ok": None}}).send()
        problem = check_name(req.get("name"))
        if problem:
            return [ft.Log(f"error: transfer of ? failed: {problem}"), ft.Exit(problem)]
        name, peer = req["name"], _addr(req["target"])
        self.name = name
        if req.get("is_requestor"):
            self.requestor = True
            multi = ft_multi.nodes_of(peer.node) is not None
            # a list of nodes ("A,B,C") could pass a file name's length: a short name for it
            folder = ft_multi.partial_folder(peer.node) if multi else peer.node
            self.partial_dir = f"{self.drive}/{PARTIAL_DIR}/{folder}"
            self.own_partial_dir = multi
            self.partial = f"{self.partial_dir}/{name}.part"
            self.state_path = f"{self.partial_dir}/{name}.state"
            self.basis_path = f"{self.drive}/{name}"   # the old copy a delta download starts from (ft_delta)
            if multi and EXTENDED:   # "A,B,C": from each at once
                self.machine = ft_multi.MultiRequestor(name, peer, self.parent, self.started)
            else:
                self.machine = ft.Requestor(name, peer, self.parent, self.started, extended=EXTENDED)
        else:
            # a share of the node's budget until file_transfer (told by start()) gives ours
            self.machine = ft.Provider(name, peer, self.parent, self.started, extended=EXTENDED, window=START_WINDOW)
        return self.machine.handle(ft.Start())

    def switch_to_folder(self, a: ft.SwitchToFolder) -> None:
        self.machine = a.machine
        if self.requestor:
            self.tree = f"{self.name}.tree"
            self.tree_state = f"{self.partial_dir}/{self.name}.tree-state"

    def read_manifest(self, a: ft.ReadManifest) -> list:
        blob = get_blob()
        text = blob.bytes.decode("utf-8", "replace") if blob is not None else None
        digest = current_blob_hash() if blob is not None else None
        return self.machine.handle(ft_folder.ManifestRead(a.source, a.size, a.meta, text, digest, a.wants_answer,
                                                          time.monotonic()))

    def run(self, actions: list) -> bool:
        """Carry out the actions (and those their results lead to); True once the job has ended."""
        while actions:
            follow = None
            for action in actions:
                if type(action) is ft.Exit:
                    return True
                try:
                    follow = self.perform[type(action)](action)
                except (vfs.VfsError, SendError) as e:
                    if self.machine is not None and self.machine.state == self.machine.FAILED:
                        continue  # winding down: what can be tidied up, is
                    # a VFS call that outlasted its timeout is a failure like any: no silent death
                    error = f"the node did not finish {type(action).__name__} in time ({e.kind})" \
                        if isinstance(e, SendError) else str(e)
                    follow = self.machine.handle(ft.IoFailed(error, time.monotonic()))
                    break
            actions = follow
        return False

    # ---- actions to calls ------------------------------------------------------------------------
    def send(self, a: ft.Send) -> None:
        req = Request.to(a.target).body(a.body)
        if a.metadata is not None:
            req.metadata(a.metadata)
        if a.timeout is not None:
            req.expects_response(a.timeout)
        if a.context is not None:
            req.context(a.context)
        if a.forward_blob:
            req.forward_current_blob()
        req.send()

    def reply(self, a: ft.Reply) -> None:
        Response().body(a.body).metadata(a.metadata).send()

    def arm_timer(self, a: ft.ArmTimer) -> None:
        Request.to(self.our).body("Tick").expects_response(a.seconds).context("tick").send()

    def log(self, a: ft.Log) -> None:
        println(a.text)

    def load_state(self, a: ft.LoadState) -> list:
        if isinstance(self.machine, ft_multi.MultiRequestor):
            return self.load_multi_state()
        try:
            saved = json.loads(vfs.open_file(self.state_path).read_to_string())
            partial_len = vfs.metadata(self.partial).len
        except (vfs.VfsError, ValueError):
            saved = partial_len = None
        aside = f"{self.partial_dir}/{self.name}.basis"
        named, moved = self._probe(f"{self.drive}/{self.name}"), self._probe(aside)
        if moved is not None:
            if saved is not None:   # a download with a resume state came since: it goes on
                self._remove(aside)
                moved = None
            else:
                # a delta download stopped without putting its old copy back (the node was killed):
                # the partial is its half-built file
                self._remove(self.partial)
                if named is not None:   # the file of this name is the better old copy
                    self._remove(aside)
                    moved = None
        # an older copy to fetch only the changes against (refused where the host cannot chunk): the
        # file of this name, else a partial download moved aside before, else the partial (used only
        # if it cannot be resumed)
        if named is not None:
            basis = dict(named, partial=False)
        elif moved is not None:
            self.basis_path = aside
            basis = dict(moved, partial=True, aside=True)
        else:
            info = self._probe(self.partial)
            basis = dict(info, partial=True) if info is not None else None
        return self.machine.handle(ft.StateLoaded(saved, partial_len, time.monotonic(), basis))

    def load_multi_state(self) -> list:
        """A multi-source download's resume point (ft_multi): its JSON, UNREADABLE if too big or not
        JSON, None if there is none; the partial's length; and the old copy, if any."""
        saved = partial_len = None
        try:
            partial_len = vfs.metadata(self.partial).len
        except vfs.VfsError:
            pass
        try:
            if vfs.metadata(self.state_path).len > ft_multi.MAX_STATE:
                saved = ft_multi.UNREADABLE
            else:
                saved = json.loads(vfs.open_file(self.state_path).read_to_string())
        except vfs.VfsError:
            pass
        except ValueError:
            saved = ft_multi.UNREADABLE
        # an older copy of the file (the file of this name), whose chunks are copied, not fetched (refused
        # where the host cannot chunk)
        basis = self._probe(self.basis_path)
        return self.machine.handle(ft.StateLoaded(saved, partial_len, time.monotonic(),
                                                  dict(basis, partial=False) if basis is not None else None))

    def save_pieces(self, a: ft_multi.SavePieces) -> None:
        self.file.sync_all()   # the pieces it names are on disk before it says so
        vfs.create_file(self.state_path).write(a.data)

    def _probe(self, path: str):
        """{"size", "stamp"} of a regular file the host can chunk, else None."""
        try:
            return dict(vfs.vfs_request(path, {"ChunkList": {"avg": 0}})["ChunkList"])
        except (vfs.VfsError, KeyError, TypeError):
            return None

    def _remove(self, path: str) -> None:
        try:
            vfs.remove_file(path)
        except vfs.VfsError:
            pass

    def open_partial(self, a: ft.OpenPartial) -> list:
        if a.offset:
            self.file = vfs.open_file(self.partial, create=True)
            self.file.set_len(a.offset)
            self.file.seek(a.offset)
        else:
            try:  # truncates any older, longer leftover
                self.file = vfs.create_file(self.partial)
            except vfs.VfsError:
                vfs.open_dir(self.partial_dir, create=True)  # the first download from this peer
                self.file = vfs.create_file(self.partial)
        return self.machine.handle(ft.PartialOpened(time.monotonic()))

    def save_state(self, a) -> None:
        vfs.create_file(self.state_path).write(json.dumps({"size": a.size, "verified": a.verified}).encode())

    def hash_chunk(self, a: ft.HashChunk) -> list:
        return self.machine.handle(ft.ChunkHashed(current_blob_hash_chained(a.restart), time.monotonic()))

    def write_chunk(self, a: ft.WriteChunk) -> list:
        if a.seek:
            self.file.seek(a.offset)
        self.file.write_all_current_blob()
        return self.machine.handle(ft.ChunkWritten(time.monotonic()))

    def verify_file(self, a: ft.VerifyFile) -> list:
        self.file.sync_all()  # durable before it takes the real name
        digest = self.file.blake3() if a.read_back else None
        return self.machine.handle(ft.FileVerified(digest, time.monotonic()))

    def rename(self, a: ft.Rename) -> list:
        final = f"{self.drive}/{self.name}"
        replaced = self._differs(final, a.digest, a.basis)
        vfs.rename(self.partial, final)  # the VFS closes handles on it
        return self.machine.handle(ft.Renamed(replaced, time.monotonic()))

    def _differs(self, final: str, digest, basis=None) -> bool:
        """Whether a file of other content than the partial has the name `final` now."""
        try:
            old = vfs.metadata(final)
        except vfs.VfsError:
            return False  # none
        if old.file_type != vfs.FILE or old.len != self.file.metadata().len:
            return True
        if digest is None:
            return False  # a plain transfer has no hash to compare: same size, taken as the same
        if basis is not None and old.stamp == basis[0]:
            return not basis[1]  # known from its chunks (ft_delta), unchanged since
        try:
            f = vfs.open_file(final)
            try:
                return f.blake3() != digest
            finally:
                f.close()
        except vfs.VfsError:
            return True

    def remove_files(self, a: ft.RemoveFiles) -> None:
        for path, remove in ((self.state_path, a.state), (self.partial, a.partial)):
            if remove:
                try:
                    vfs.remove_file(path)
                except vfs.VfsError:
                    pass
        if self.own_partial_dir:   # once empty (a plain resume's state kept in it keeps it)
            try:
                vfs.vfs_request(self.partial_dir, "RemoveDir")
            except vfs.VfsError:
                pass

    def keep_for_resume(self, a: ft.KeepForResume) -> None:
        try:
            self.file.sync_all()
            # a write that failed (a full disk) may have left less on disk than was counted
            on_disk = vfs.metadata(self.partial).len
            self.save_state(ft.KeepForResume(a.size, min(a.verified, on_disk)))
        except vfs.VfsError:
            pass

    def open_file(self, a: ft.OpenFile) -> list:
        try:
            self.file = vfs.open_file(f"{self.drive}/{self.name}", create=False)
        except vfs.VfsError:
            if vfs.metadata(f"{self.drive}/{self.name}").file_type != vfs.DIRECTORY:
                raise
            return self.machine.handle(ft.Opened(None, None, time.monotonic(), folder=True))
        found = self.file.metadata()
        delta = False
        if EXTENDED and found.len > DELTA_MIN:
            try:  # whether this host can chunk it (ft_delta), a probe that reads nothing
                vfs.vfs_request(f"{self.drive}/{self.name}", {"ChunkList": {"avg": 0}})
                delta = True
            except vfs.VfsError:
                pass
        return self.machine.handle(ft.Opened(found.len, found.stamp, time.monotonic(), delta=delta))

    def seek(self, a: ft.Seek) -> None:
        self.file.seek(a.offset)

    def read_chunk(self, a: ft.ReadChunk) -> list:
        got = self.file.read_at_to_blob(a.length)
        return self.machine.handle(ft.ChunkRead(got, _HASHERS[a.hash](), time.monotonic()))

    def check_file(self, a: ft.CheckFile) -> list:
        stamp = self.file.metadata().stamp
        digest = self.file.blake3() if a.read_back else None
        return self.machine.handle(ft.FileChecked(stamp, digest, time.monotonic()))

    # ---- only what changed (ft_delta) ---------------------------------------------------------------
    def switch_to_delta(self, a: ft.SwitchToDelta) -> None:
        self.machine = a.machine

    def fetch_whole(self, a: ft_delta.FetchWhole) -> list:
        old = self.machine
        self.basis_path = f"{self.drive}/{self.name}"
        self.machine = ft.Requestor(self.name, old.peer, self.parent, self.started, extended=EXTENDED, delta=False)
        self.machine.window = old.window
        return self.machine.handle(ft.Start())

    def fetch_single(self, a: ft_multi.FetchSingle) -> list:
        old = self.machine
        self.stale = {str(w) for w in a.stale}
        peer = Address(a.node, old.sources[0].addr.process)
        self.machine = ft_multi.AloneRequestor(self.name, peer, self.parent, self.started, extended=EXTENDED,
                                               delta=False, key=a.key)
        self.machine.window = old.window
        return self.machine.handle(ft.Start())

    def move_basis_aside(self, a: ft_delta.MoveBasisAside) -> list:
        self.basis_path = f"{self.partial_dir}/{self.name}.basis"
        vfs.rename(self.partial, self.basis_path)   # a failure fails the download, the partial left as it is
        try:
            stamp = vfs.vfs_request(self.basis_path, {"ChunkList": {"avg": 0}})["ChunkList"]["stamp"]
        except (vfs.VfsError, KeyError, TypeError):
            stamp = None
        return self.machine.handle(ft_delta.BasisMoved(stamp, time.monotonic()))

    def remove_basis(self, a: ft_delta.RemoveBasis) -> None:
        try:
            vfs.remove_file(self.basis_path)
        except vfs.VfsError:
            pass

    def forget_basis(self, a: ft_delta.ForgetBasis) -> None:
        try:
            vfs.vfs_request(self.basis_path, {"ChunkList": {"avg": 0, "forget": True}})
        except vfs.VfsError:
            pass

    def restore_basis(self, a: ft_delta.RestoreBasis) -> None:
        try:
            vfs.rename(self.basis_path, self.partial)
        except vfs.VfsError:
            pass

    def chunk_basis(self, a: ft_delta.ChunkBasis) -> list:
        try:
            # no whole-file hash: the chunks tell whether the new file differs from it
            copy = {"copy_to": self.partial, "copy_size": a.copy_size} if a.copy_size else {}
            info = vfs.vfs_request(self.basis_path, {"ChunkList": {"avg": a.avg, "whole": False, **copy}},
                                   timeout=DELTA_TIMEOUT)["ChunkList"]
            blob = get_blob()
            records, error = (blob.bytes if blob is not None else b""), None
        except (vfs.VfsError, KeyError, TypeError) as e:
            info, records, error = None, None, str(e)
        except SendError as e:   # the node took too long: fetch it whole rather than fail
            info, records, error = None, None, f"the node did not chunk it in time ({e.kind})"
        return self.machine.handle(ft_delta.BasisChunked(records, info, error, time.monotonic()))

    def read_chunk_list(self, a: ft_delta.ReadChunkList) -> list:
        blob = get_blob()
        return self.machine.handle(ft_delta.ListRead(blob.bytes if blob is not None else None, time.monotonic(),
                                                     current_blob_hash() if blob is not None else None))

    def copy_ranges(self, a: ft_delta.CopyRanges) -> list:
        # with `whole` the host also hashes the new file as it builds it, and syncs it
        answer = vfs.vfs_request(self.partial, {"CopyRanges": {"from": self.basis_path, "stamp": a.stamp,
                                                               "size": a.size, "items": a.items,
                                                               **({"whole": True} if a.whole else {}),
                                                               **({"in_place": a.in_place} if a.in_place else {})}},
                                 timeout=DELTA_TIMEOUT)
        digest = answer.get("Blake3") if a.whole and isinstance(answer, dict) else None
        return self.machine.handle(ft_delta.RangesCopied(time.monotonic(), digest))

    def write_ranges(self, a: ft_delta.WriteRanges) -> list:
        vfs.vfs_request(self.partial, {"WriteRanges": {"size": a.size, "items": a.items}}, forward_blob=True, timeout=120)
        return self.machine.handle(ft.ChunkWritten(time.monotonic()))

    def verify_whole(self, a: ft_delta.VerifyWhole) -> list:
        # hashed whole, and made durable meanwhile, before it takes the real name
        digest = vfs.vfs_request(self.partial, {"Blake3": {"sync": True}}, timeout=DELTA_TIMEOUT)["Blake3"]
        return self.machine.handle(ft.FileVerified(digest, time.monotonic()))

    def chunk_file(self, a: ft_delta.ChunkFile) -> list:
        # the whole file's hash from the same read as the chunks; HashWhole then finds it kept by the stamp
        info = vfs.vfs_request(f"{self.drive}/{self.name}", {"ChunkList": {"avg": a.avg, "whole": True}},
                               timeout=DELTA_TIMEOUT)["ChunkList"]
        return self.machine.handle(ft_delta.FileChunked(info, time.monotonic()))  # the list stays the blob

    def hash_whole(self, a: ft_delta.HashWhole) -> list:
        digest = vfs.vfs_request(f"{self.drive}/{self.name}", {"Blake3": {"stamp": a.stamp}},
                                 timeout=DELTA_TIMEOUT)["Blake3"]
        return self.machine.handle(ft_delta.WholeHashed(digest, time.monotonic()))

    def read_pieces(self, a: ft_delta.ReadPieces) -> list:
        vfs.vfs_request(self.drive, {"ReadMany": {"items": [[self.name, off, n, a.stamp] for off, n in a.items]}},
                        timeout=120)
        return self.machine.handle(ft_delta.PiecesRead(time.monotonic()))

    # ---- folders -----------------------------------------------------------------------------------
    def send_blob(self, a: ft_folder.SendBlob) -> None:
        (Request.to(a.target).body(a.body).metadata(a.metadata).expects_response(a.timeout).context(a.context)
         .blob_bytes(a.blob).send())

    def walk_tree(self, a: ft_folder.WalkTree) -> list:
        vfs.vfs_request(f"{self.drive}/{self.name}",
                        {"WalkDir": {"max_depth": MAX_FOLDER_DEPTH, "max_entries": MAX_FOLDER_ENTRIES}}, timeout=120)
        blob = get_blob()  # the listing (a body crosses into Wasm only up to 2 MiB, a blob whole)
        return self.machine.handle(ft_folder.Walked(json.loads(blob.bytes) if blob is not None else None,
                                                      time.monotonic()))

    def read_batch(self, a: ft_folder.ReadBatch) -> list:
        hashes = vfs.vfs_request(f"{self.drive}/{self.name}", {"ReadMany": {"items": a.items}})["ReadMany"]
        return self.machine.handle(ft_folder.BatchRead(a.items, hashes, time.monotonic()))

    def load_folder_state(self, a: ft_folder.LoadFolderState) -> list:
        try:
            saved = json.loads(vfs.open_file(self.tree_state).read_to_string())
        except (vfs.VfsError, ValueError):
            saved = None
        on_disk: dict = {}
        if saved is not None:  # a resume trusts the state only as far as the partial tree bears it out
            try:
                vfs.vfs_request(f"{self.partial_dir}/{self.tree}",
                                {"WalkDir": {"max_depth": MAX_FOLDER_DEPTH, "max_entries": MAX_FOLDER_ENTRIES}},
                                timeout=120)
                blob = get_blob()
                listing = json.loads(blob.bytes) if blob is not None else {}
                on_disk = {f[0]: f[1] for f in listing.get("files", [])}
            except (vfs.VfsError, ValueError, TypeError, KeyError, IndexError, AttributeError):
                on_disk = {}  # no partial tree (or an unreadable one): start afresh
        return self.machine.handle(ft_folder.FolderStateLoaded(saved, on_disk, time.monotonic()))

    def _write_many(self, items: list, dirs: list, state: dict, forward: bool) -> None:
        """Pieces and folders beneath the partial tree, and the state beside it, in one VFS call."""
        tree = self.tree
        vfs.vfs_request(self.partial_dir, {"WriteMany": {
            "items": [[f"{tree}/{p}", off, n, h] for p, off, n, h in items],
            "dirs": dirs, "state": {"path": f"{self.name}.tree-state", "text": json.dumps(state)}}},
            forward_blob=forward, timeout=120)

    def prepare_tree(self, a: ft_folder.PrepareTree) -> list:
        if a.fresh:
            try:
                vfs.vfs_request(f"{self.partial_dir}/{self.tree}", "RemoveDirAll")
            except vfs.VfsError:
                pass  # none yet
        dirs = [self.tree] + [f"{self.tree}/{d}" for d in a.dirs]
        for i in range(0, len(dirs), DIRS_PER_CALL):  # each request body stays well under 2 MiB
            self._write_many([], dirs[i:i + DIRS_PER_CALL], a.state, False)
        return self.machine.handle(ft_folder.TreePrepared(time.monotonic()))

    def write_batch(self, a: ft_folder.WriteBatch) -> list:
        self._write_many(a.items, [], a.state, any(n for _, _, n, _ in a.items))
        return self.machine.handle(ft_folder.BatchWritten(time.monotonic()))

    def finish_tree(self, a: ft_folder.FinishTree) -> list:
        tree, final = f"{self.partial_dir}/{self.tree}", f"{self.drive}/{self.name}"
        # the last batch may still be being written: this answers with its failure (a full disk),
        # and makes every file durable before the tree takes its real name
        vfs.vfs_request(tree, "SyncTree", timeout=300)
        # the state goes first: a crash from here on leaves a tree without a state, fetched afresh
        # next time, never a state that claims a tree no longer there
        try:
            vfs.remove_file(self.tree_state)
        except vfs.VfsError:
            pass
        try:
            old = vfs.metadata(final).file_type
        except vfs.VfsError:
            old = None  # (no write of ours is pending any more: only a missing folder lands here)
        if old == vfs.DIRECTORY:  # an older copy is replaced only now, all of the new one verified
            vfs.vfs_request(final, "RemoveDirAll")
        elif old is not None:
            vfs.remove_file(final)
        vfs.rename(tree, final)
        return self.machine.handle(ft_folder.TreeFinished(old is not None, time.monotonic()))

    def remove_tree(self, a: ft_folder.RemoveTree) -> None:
        # the state first: a state without its tree could otherwise be trusted on the next download
        for path, action in ((self.tree_state, "RemoveFile"), (f"{self.partial_dir}/{self.tree}", "RemoveDirAll")):
            try:
                vfs.vfs_request(path, action)
            except vfs.VfsError:
                pass


def main(our: Address) -> None:
    w = Worker(our)
    while True:
        try:
            msg = await_message()
        except SendError as err:
            actions = w.on_send_error(err)
        else:
            try:
                actions = w.on_message(msg)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                println(f"worker: ignored a bad message from {msg.source}: {e}")
                continue
        if w.run(actions):
            return


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
