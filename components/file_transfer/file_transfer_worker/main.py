# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""file_transfer_worker: moves one file, then exits.

A requestor worker asks the serving node's file_transfer for a file, receives its chunks into a
partial file inside the drive, verifies every chunk and the whole file, and renames the partial
to the real name only when all is verified. A provider worker reads the file in chunks and sends
them with at most WINDOW unacknowledged. Both end on completion, on error and after a stall; file
data stays in the host (VFS reads and network chunks are forwarded as host-held blobs).

The protocol itself is ft_protocol's Requestor and Provider; this module maps messages to their
events and their actions to process_lib calls.
"""
import json
import time

import wit_world

import ft_protocol as ft
from ft_common import PARTIAL_DIR, check_name
from process_lib import (HAS_BLOBS, Address, Message, ProcessId, Request, Response, SendError, await_message,
                         current_blob_hash, current_blob_hash_chained, current_blob_len, println, run, vfs)

# The extended protocol hashes in the host through its blobs extension; a portable build (without
# it) speaks the seed's plain protocol, and its machines then ask for no hash at all.
EXTENDED = HAS_BLOBS

_HASHERS = {  # how a ReadChunk's bytes are hashed
    ft.HASH_NONE: lambda: None,
    ft.HASH_WHOLE: current_blob_hash,
    ft.HASH_CHAIN: lambda: current_blob_hash_chained(False),
    ft.HASH_CHAIN_RESTART: lambda: current_blob_hash_chained(True),
}


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
        self.name = ""
        self.file = None         # the partial (requestor) or the file being sent (provider)
        self.perform = {
            ft.Send: self.send, ft.Reply: self.reply, ft.ArmTimer: self.arm_timer, ft.Log: self.log,
            ft.LoadState: self.load_state, ft.OpenPartial: self.open_partial, ft.SaveState: self.save_state,
            ft.HashChunk: self.hash_chunk, ft.WriteChunk: self.write_chunk, ft.VerifyFile: self.verify_file,
            ft.Rename: self.rename, ft.RemoveFiles: self.remove_files, ft.KeepForResume: self.keep_for_resume,
            ft.OpenFile: self.open_file, ft.Seek: self.seek, ft.ReadChunk: self.read_chunk,
            ft.CheckFile: self.check_file,
        }

    # ---- messages to events ----------------------------------------------------------------------
    def on_message(self, msg: Message) -> list:
        body = msg.json()
        if msg.is_request and msg.source == self.our:
            return []  # our own tick: leave it unanswered
        m = self.machine
        if m is None:
            if msg.is_request and isinstance(body, dict) and "Download" in body:
                return self.begin(msg, body["Download"])
            raise ValueError(f"unexpected message before Download from {msg.source}")
        now = time.monotonic()
        if msg.is_request:
            if self.requestor:
                return m.request(msg.source, body, msg.meta(), msg.expects_response is not None,
                                 current_blob_len(), now)
            return m.request(msg.source, body, msg.meta(), now)
        context = json.loads(msg.context) if msg.context else None
        if self.requestor:
            return m.response(context, body, now, msg.meta())
        return m.response(context, msg.meta(), now)

    def on_send_error(self, err: SendError) -> list:
        if self.machine is None:
            return []
        context = json.loads(err.context) if err.context else None
        return self.machine.request_failed(context, err.kind, time.monotonic())

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
            self.partial_dir = f"{self.drive}/{PARTIAL_DIR}/{peer.node}"
            self.partial = f"{self.partial_dir}/{name}.part"
            self.state_path = f"{self.partial_dir}/{name}.state"
            self.machine = ft.Requestor(name, peer, self.parent, self.started, extended=EXTENDED)
        else:
            self.machine = ft.Provider(name, peer, self.parent, self.started, extended=EXTENDED)
        return self.machine.start()

    def run(self, actions: list) -> bool:
        """Carry out the actions (and those their results lead to); True once the job has ended."""
        while actions:
            follow = None
            for action in actions:
                if type(action) is ft.Exit:
                    return True
                try:
                    follow = self.perform[type(action)](action)
                except vfs.VfsError as e:
                    if self.machine is not None and self.machine.state == self.machine.FAILED:
                        continue  # winding down: what can be tidied up, is
                    follow = self.machine.io_failed(str(e), time.monotonic())
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
        try:
            saved = json.loads(vfs.open_file(self.state_path).read_to_string())
            partial_len = vfs.metadata(self.partial).len
        except (vfs.VfsError, ValueError):
            saved = partial_len = None
        return self.machine.state_loaded(saved, partial_len, time.monotonic())

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
        return self.machine.partial_opened(time.monotonic())

    def save_state(self, a) -> None:
        vfs.create_file(self.state_path).write(json.dumps({"size": a.size, "verified": a.verified}).encode())

    def hash_chunk(self, a: ft.HashChunk) -> list:
        return self.machine.chunk_hashed(current_blob_hash_chained(a.restart), time.monotonic())

    def write_chunk(self, a: ft.WriteChunk) -> list:
        if a.seek:
            self.file.seek(a.offset)
        self.file.write_all_current_blob()
        return self.machine.chunk_written(time.monotonic())

    def verify_file(self, a: ft.VerifyFile) -> list:
        self.file.sync_all()  # durable before it takes the real name
        digest = self.file.blake3() if a.read_back else None
        return self.machine.file_verified(digest, time.monotonic())

    def rename(self, a: ft.Rename) -> None:
        vfs.rename(self.partial, f"{self.drive}/{self.name}")  # the VFS closes handles on it

    def remove_files(self, a: ft.RemoveFiles) -> None:
        for path, remove in ((self.state_path, a.state), (self.partial, a.partial)):
            if remove:
                try:
                    vfs.remove_file(path)
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
        self.file = vfs.open_file(f"{self.drive}/{self.name}", create=False)
        found = self.file.metadata()
        return self.machine.opened(found.len, found.stamp, time.monotonic())

    def seek(self, a: ft.Seek) -> None:
        self.file.seek(a.offset)

    def read_chunk(self, a: ft.ReadChunk) -> list:
        got = self.file.read_at_to_blob(a.length)
        return self.machine.chunk_read(got, _HASHERS[a.hash](), time.monotonic())

    def check_file(self, a: ft.CheckFile) -> list:
        stamp = self.file.metadata().stamp
        digest = self.file.blake3() if a.read_back else None
        return self.machine.file_checked(stamp, digest, time.monotonic())


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
