# world: kinode-py:host-ext/file-transfer-ext@0.1.0
"""file_transfer: the package's main process.

Answers ListFiles with the files in its `files` drive, starts a worker (through the imported
`file-transfer-worker` API) for each Download, asked by a local script (we download) or by a
remote worker (we serve), and shows the workers' progress.
"""
import json
import time
from collections import OrderedDict

import wit_world
from componentize_py_types import Err
from wit_world.imports import file_transfer_worker as worker_api

import serving
import web
import ft_folder
from ft_common import (MAX_DOWNLOADS, MAX_FOLDER_DEPTH, MAX_FOLDER_ENTRIES, STALL_TIMEOUT, check_name, human_size,
                       window_for)
from process_lib import (Address, Message, ProcessId, Request, Response, SendError, await_message, get_blob,
                         get_state, print_to_terminal, println, run, set_state, to_wit_address, vfs)


HISTORY = 50  # finished and failed downloads kept for the web page
# downloads waiting in their providers' queues: they do not hold one of the MAX_DOWNLOADS (a busy
# node must not stall downloads from idle ones), but each is a worker instance, so they are bounded:
# this many in all, MAX_DOWNLOADS at any one provider (more wait here, as workers would wait there)
MAX_QUEUED_AT_PEERS = 5


class Transfers:
    """Downloads in progress on this node, keyed by (peer node, file name): so the same file is not
    fetched twice at once, and so `transfers` can list them and `cancel` can stop one."""

    def __init__(self):
        self.active: dict[tuple, dict] = {}
        # downloads asked for while MAX_DOWNLOADS ran, in order: key -> target Address
        self.waiting: "OrderedDict[tuple, Address]" = OrderedDict()
        self.history: list[dict] = []

    def busy(self, key: tuple) -> bool:
        t = self.active.get(key)
        return key in self.waiting or (t is not None and time.monotonic() - t["seen"] < STALL_TIMEOUT)

    def fetching(self, name: str):
        """The node `name` is being downloaded from (or waits to be), if any: one name, one download
        at a time, whichever node it comes from, so no download silently replaces another."""
        return next((node for node, n in list(self.waiting) + list(self.active) if n == name
                     and self.busy((node, n))), None)

    def running(self) -> int:
        """Downloads that hold a slot: not those waiting in their provider's queue; one whose worker
        went silent gives it up after the stall timeout."""
        now = time.monotonic()
        return sum(1 for t in self.active.values() if now - t["seen"] < STALL_TIMEOUT and not _at_peer(t))

    def queued_at_peers(self, node=None) -> int:
        """Downloads waiting in their provider's queue (node's only, if given)."""
        now = time.monotonic()
        return sum(1 for (peer, _), t in self.active.items()
                   if now - t["seen"] < STALL_TIMEOUT and _at_peer(t) and node in (None, peer))

    def full(self, node=None) -> bool:
        """No new worker now (toward `node`): MAX_DOWNLOADS run, or MAX_QUEUED_AT_PEERS wait at their
        providers, or MAX_DOWNLOADS at that one. So at most MAX_DOWNLOADS + MAX_QUEUED_AT_PEERS
        requestor workers exist, and MAX_DOWNLOADS * 2 toward one provider."""
        return (self.running() >= MAX_DOWNLOADS or self.queued_at_peers() >= MAX_QUEUED_AT_PEERS
                or (node is not None and self.queued_at_peers(node) >= MAX_DOWNLOADS))

    def touch(self, key: tuple, **fields) -> dict:
        t = self.active.setdefault(key, {"worker": None, "bytes": 0, "total": None, "rate": 0.0, "printed": float("-inf")})
        t.update(fields, seen=time.monotonic())
        return t

    def end(self, key: tuple) -> None:
        self.active.pop(key, None)

    def finish(self, key: tuple, error: str = "", **fields) -> None:
        """Keep the outcome for the web page's finished/failed list (the last HISTORY)."""
        self.end(key)
        self.history.append(dict(node=key[0], name=key[1], ok=not error, error=error, **fields))
        del self.history[:-HISTORY]

    def table(self) -> list:
        now = time.monotonic()
        rows = [{"node": node, "name": name, "bytes": t["bytes"], "total": t["total"], "rate": t["rate"],
                 "queued_at": t.get("queued_at"),
                 **({"files": t["files"], "of": t["of"]} if t.get("of") is not None else {})}  # a folder
                for (node, name), t in sorted(self.active.items()) if now - t["seen"] < STALL_TIMEOUT]
        return rows + [{"node": node, "name": name, "queued": True} for node, name in self.waiting]


def _at_peer(t: dict) -> bool:
    """The download waits in its provider's queue (place 1 or more)."""
    place = t.get("queued_at")
    return isinstance(place, int) and not isinstance(place, bool) and place > 0


class Access:
    """Who may list and download this node's files: everyone (Kinode's default) or named nodes.
    Kept in the process state, so it survives restarts."""

    def __init__(self):
        state = get_state()
        try:
            saved = json.loads(state) if state else {}
        except ValueError:
            saved = {}
        allow = saved.get("allow") if isinstance(saved, dict) else None
        self.allow = set(allow) if isinstance(allow, list) else None

    def allows(self, node: str) -> bool:
        return self.allow is None or node in self.allow

    def set(self, nodes) -> None:
        self.allow = None if nodes is None else set(nodes)
        set_state(json.dumps({"allow": None if self.allow is None else sorted(self.allow)}).encode())

    def describe(self) -> str:
        return "everyone" if self.allow is None else ", ".join(sorted(self.allow)) or "no node"


def refuse(what: str, node: str, our: Address) -> str:
    println(f"refused {what} from {node}: not on this node's allow list")
    return f"not allowed: {our.node} does not share files with {node}"


def ls_files(files_dir: vfs.Directory) -> list:
    files = []
    for entry in files_dir.read():
        if entry.file_type != "File":
            continue
        try:
            files.append({"name": entry.path, "size": vfs.metadata(entry.path).len})
        except vfs.VfsError:
            continue  # removed meanwhile
    return files


def handle_download(our: Address, msg: Message, req: dict, files_dir: vfs.Directory, transfers: Transfers,
                    access: Access) -> None:
    name, target, is_requestor = req.get("name"), req.get("target"), req.get("is_requestor")
    problem = check_name(name)
    if not problem and not (isinstance(target, dict) and isinstance(is_requestor, bool)):
        problem = "malformed Download request"
    if not problem:
        try:
            target_addr = Address(target["node"], _pid(target["process"]))
        except (KeyError, TypeError, ValueError):
            problem = "malformed Download target"
    if problem:
        Response().body({"Download": {"Err": problem}}).send()
        return
    if is_requestor:
        if msg.source.node != our.node:
            Response().body({"Download": {"Err": "only local processes may start a download"}}).send()
            return
        problem, start = request_download(our, name, target_addr, transfers)
        Response().body({"Download": {"Err": problem} if problem else {"Ok": None}}).send()
        if start:  # after the answer, as before: the script hears first
            start_worker(our, our, name, target_addr, True, transfers)
        return
    else:
        if not access.allows(msg.source.node):
            Response().body({"Download": {"Err": refuse(f"Download of {name}", msg.source.node, our)}}).send()
            return
        # we serve: refuse a missing file here, before a worker exists, and create nothing
        try:
            meta = vfs.metadata(f"{files_dir.path}/{name}")
            if meta.file_type not in servable_types(msg):
                raise vfs.VfsError("not a file")
        except vfs.VfsError:
            Response().body({"Download": {"Err": f"no such file: {name}"}}).send()
            return
    serving.serve(our, msg, name, target_addr)  # now, or in its turn


def servable_types(msg: Message) -> tuple:
    """What a Download may fetch: a folder too if the requestor's worker can take one (ft_folder)."""
    meta = msg.meta()
    return ("File", "Directory") if meta.get("ft") == 1 and meta.get("folders") == 1 else ("File",)


# A remote may list as often as it likes: each folder's row counts at most this many entries
# (beyond, it shows "1000+ entries"), so one listing costs at most that per folder.
LIST_COUNT_MAX = 1000


def ls_listing(files_dir: vfs.Directory, folder) -> list:
    """ListFiles with folders: the files and folders in the drive, or in `folder` inside it; a
    folder's row is `NAME/` with its file count and total size (as its download would fetch it)."""
    base = files_dir.path
    if folder is not None:
        problem = "folder must be a string" if not isinstance(folder, str) else ft_folder.check_path(folder.strip("/"))
        if problem:
            raise ValueError(f"bad folder: {problem}")
        base = f"{base}/{folder.strip('/')}"
    rows = []
    for entry in vfs.open_dir(base).read():
        name = entry.path.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue  # .partial and other hidden entries are never served
        try:
            if entry.file_type == "File":
                rows.append({"name": name, "size": vfs.metadata(entry.path).len})
            elif entry.file_type == "Directory":
                vfs.vfs_request(entry.path, {"WalkDir": {"max_depth": MAX_FOLDER_DEPTH,
                                                         "max_entries": LIST_COUNT_MAX}})
                blob = get_blob()  # the listing rides in the blob
                found = json.loads(blob.bytes) if blob is not None else {"files": []}
                rows.append({"name": name + "/", "size": sum(f[1] for f in found["files"]),
                             "files": len(found["files"])})
        except vfs.VfsError as e:
            if entry.file_type == "Directory" and f"more than {LIST_COUNT_MAX} entries" in str(e):
                rows.append({"name": name + "/", "size": 0, "files": None, "error": f"{LIST_COUNT_MAX}+ entries"})
            elif entry.file_type == "Directory":  # too deep, unreadable: shown, not counted
                rows.append({"name": name + "/", "size": 0, "files": None, "error": str(e).rsplit(": ", 1)[-1]})
    return rows


def request_download(our: Address, name: str, target_addr: Address, transfers: Transfers) -> tuple:
    """Queue a download of `name` from `target_addr`, or take a slot for it: (error text or '',
    whether the caller must now start its worker)."""
    if target_addr.node == our.node:
        return f"{name} is on this node already ({our.node}); download from another node", False
    key = (target_addr.node, name)
    running = transfers.fetching(name)
    if running is not None:
        return f"{name} is already being downloaded from {running}", False
    if transfers.full(target_addr.node):
        transfers.waiting[key] = target_addr
        print_to_terminal(1, f"{name} from {target_addr.node}: queued ({len(transfers.waiting)} waiting, "
                             f"{MAX_DOWNLOADS} downloads at once)")
        return "", False
    transfers.touch(key, worker=None)
    return "", True


def start_worker(our: Address, source: Address, name: str, target: Address, is_requestor: bool,
                 transfers: Transfers) -> None:
    try:
        worker_api.start_download(to_wit_address(our), to_wit_address(source), name,
                                  to_wit_address(target), is_requestor)
    except Err as e:
        if is_requestor:
            transfers.end((target.node, name))
        println(f"error: could not start a worker for {name}: {e.value}")


def share_budget(transfers: Transfers) -> None:
    """Each running transfer's window, its share of the node's budget for bytes in flight (sending
    and receiving together, ft_common.NODE_BUDGET): told to its worker whenever it changes."""
    window = window_for(len(serving.SLOTS.slots) + transfers.running())
    now = time.monotonic()
    told = [(slot, slot[2], slot[0][1]) for slot in serving.SLOTS.slots if slot[2] is not None and slot[3] != window]
    for key, t in transfers.active.items():
        if t["worker"] is not None and t.get("window") != window and not _at_peer(t) and now - t["seen"] < STALL_TIMEOUT:
            told.append((t, t["worker"], key[1]))
    for holder, worker, _ in told:
        if isinstance(holder, list):
            holder[3] = window
        else:
            holder["window"] = window
    for holder, worker, name in told:
        # no answer wanted: a worker that has just ended misses nothing
        (Request.to(worker).body({"Progress": {"name": name, "progress": 0}})
         .metadata({"ft": 1, "window": window}).send())


def start_waiting(our: Address, transfers: Transfers) -> None:
    """Start queued downloads while slots are free (after one ends, or one went silent)."""
    for key, target in list(transfers.waiting.items()):
        if transfers.full():
            return
        if transfers.full(key[0]):
            continue  # its provider has enough of ours waiting; others may start
        del transfers.waiting[key]
        transfers.touch(key, worker=None)
        start_worker(our, our, key[1], target, True, transfers)


def _pid(p: dict) -> ProcessId:
    return ProcessId(p["process_name"], p["package_name"], p["publisher_node"])


def handle_progress(our: Address, msg: Message, req: dict, transfers: Transfers) -> None:
    name, progress = req.get("name"), req.get("progress")
    if msg.source.node != our.node or msg.source.package_id() != our.package_id():
        raise ValueError("Progress is taken only from this package's workers")
    if not isinstance(progress, int) or not 0 <= progress <= 100 or check_name(name):
        raise ValueError("malformed Progress")
    Response().body("Progress").send()
    meta = msg.meta()
    key = (meta.get("peer"), name)
    if meta.get("done") or meta.get("error"):
        transfers.finish(key, str(meta.get("error") or ""), bytes=meta.get("total") or meta.get("bytes", 0),
                         secs=meta.get("secs", 0), **({"files": meta.get("of")} if meta.get("folder") else {}),
                         **({"replaced": True} if meta.get("replaced") else {}))
        verbosity = 0
    else:
        was_at = transfers.active.get(key, {}).get("queued_at")
        t = transfers.touch(key, worker=msg.source, bytes=meta.get("bytes", 0), total=meta.get("total"),
                            rate=meta.get("rate", 0.0), queued_at=meta.get("queued"),
                            files=meta.get("files"), of=meta.get("of"))
        now = time.monotonic()
        # at most one progress line a second per transfer; every step at terminal verbosity 1
        verbosity = 1 if now - t["printed"] < 1.0 and progress < 100 else 0
        if verbosity == 0:
            t["printed"] = now
    if meta.get("folder") and not meta.get("error"):
        print_to_terminal(verbosity, folder_progress_line(name, progress, meta))
        if meta.get("done") and meta.get("replaced"):
            println(f"{name}: the download replaced the folder (or file) {name} this node had")
    elif meta.get("error") == "cancelled":
        println(f"download of {name} from {meta.get('peer')} cancelled")
    elif meta.get("error"):
        println(f"error: download of {name} from {meta.get('peer')} failed: {meta['error']}")
    elif isinstance(meta.get("queued"), int):
        if meta["queued"] != was_at:  # a queued worker reports every tick; its place is said once
            println(f"{name}: queued at {meta.get('peer')}, position {meta['queued']}")
    elif meta.get("done"):
        secs = max(meta.get("secs", 0), 1e-9)
        total = meta.get("total", 0)
        println(f"{name} downloaded from {meta.get('peer')}: {human_size(total)} in {secs:.2f} s "
                f"({total / secs / 2**20:.1f} MiB/s), blake3 {meta.get('hash', '?')}"
                + (f"; it replaced the {name} this node had, of other content" if meta.get("replaced") else ""))
    elif "total" in meta:
        rate = meta.get("rate", 0)
        left = (meta["total"] - meta.get("bytes", 0)) / rate if rate else 0
        print_to_terminal(verbosity, f"{name} progress: {progress}% ({human_size(meta.get('bytes', 0))} of "
                                     f"{human_size(meta['total'])}, {rate / 2**20:.1f} MiB/s, ETA {left:.0f} s)")
    else:
        print_to_terminal(verbosity, f"{name} progress: {progress}%")


def folder_progress_line(name: str, progress: int, meta: dict) -> str:
    total, done, files, of = meta.get("total", 0), meta.get("bytes", 0), meta.get("files", 0), meta.get("of", 0)
    if meta.get("done"):
        secs = max(meta.get("secs", 0), 1e-9)
        return (f"{name} downloaded from {meta.get('peer')}: folder of {of} files, {human_size(total)} in "
                f"{secs:.2f} s ({total / secs / 2**20:.1f} MiB/s), every file verified (blake3)")
    rate = meta.get("rate", 0)
    left = (total - done) / rate if rate else 0
    return (f"{name} progress: {progress}% ({files} of {of} files, {human_size(done)} of {human_size(total)}, "
            f"{rate / 2**20:.1f} MiB/s, ETA {left:.0f} s)")


def _matching(keys, name: str, node) -> list:
    """The (node, name) keys of transfers of `name`, from `node` if it is given."""
    return [k for k in keys if k[1] == name and (node is None or k[0] == node)]


def handle_local(our: Address, msg: Message, body, transfers: Transfers, access: Access) -> bool:
    """This package's own scripts on this node (never a peer): `Transfers` and `Cancel`."""
    if msg.source.node != our.node or msg.source.package_id() != our.package_id():
        return False
    if body == "Transfers":
        Response().body({"Transfers": transfers.table()}).send()
        return True
    if body == "Allow" or (isinstance(body, dict) and isinstance(body.get("Allow"), dict)):
        if body != "Allow":
            nodes = body["Allow"].get("nodes")
            if nodes is not None and not (isinstance(nodes, list) and all(isinstance(n, str) and n for n in nodes)):
                raise ValueError("Allow takes a list of node names or null")
            access.set(nodes)
        Response().body({"Allow": access.describe()}).send()
        return True
    if isinstance(body, dict) and isinstance(body.get("Cancel"), dict):
        problem = cancel(body["Cancel"].get("name"), body["Cancel"].get("node"), transfers)
        Response().body({"Cancel": {"Err": problem} if problem else {"Ok": None}}).send()
        return True
    return False


def cancel(name: str, node, transfers: Transfers) -> str:
    """Stop a download or drop it from the queue; an error text, or '' when done."""
    queued = _matching(transfers.waiting, name, node)
    if len(queued) == 1:
        del transfers.waiting[queued[0]]
        transfers.finish(queued[0], "cancelled (it had not started)")
        println(f"download of {name} from {queued[0][0]} cancelled (it had not started)")
        return ""
    matches = _matching(transfers.active, name, node)
    if len(matches) != 1:
        why = "no transfer of" if not matches else "several transfers of"
        return f"{why} {name}{' from ' + node if node else ''}"
    t = transfers.active[matches[0]]
    if t["worker"] is None:
        return f"{name} has not started yet; try again"
    (Request.to(t["worker"]).body({"Progress": {"name": name, "progress": 0}})
     .metadata({"ft": 1, "cancel": True}).send())
    return ""


def handle_message(our: Address, msg: Message, files_dir: vfs.Directory, transfers: Transfers,
                   access: Access) -> None:
    body = msg.json()
    if msg.is_request:
        if handle_local(our, msg, body, transfers, access):
            return
        if body == "ListFiles":
            if not access.allows(msg.source.node) and msg.source.node != our.node:
                Response().body({"Err": refuse("ListFiles", msg.source.node, our)}).send()
                return
            Response().body({"ListFiles": ls_listing(files_dir, msg.meta().get("folder"))
                             if msg.meta().get("ft") == 1 else ls_files(files_dir)}).send()
        elif isinstance(body, dict) and isinstance(body.get("Download"), dict):
            handle_download(our, msg, body["Download"], files_dir, transfers, access)
        elif isinstance(body, dict) and isinstance(body.get("Progress"), dict):
            handle_progress(our, msg, body["Progress"], transfers)
        else:
            raise ValueError(f"unknown request from {msg.source}")
    elif isinstance(body, dict) and "ListFiles" in body:
        rows = "".join(f"\n{f['name'].split('/')[-1]}\t\t{f['size']}" for f in body["ListFiles"])
        println(f"{msg.source} available files:\nFile\t\tSize (bytes){rows}")
    elif isinstance(body, dict) and isinstance(body.get("Download"), dict) and "Err" in body["Download"]:
        println(f"error: download failed: {body['Download']['Err']}")


def main(our: Address) -> None:
    println("begin")
    drive = vfs.create_drive(our.package_id(), "files")
    files_dir = vfs.open_dir(drive)
    transfers = Transfers()
    access = Access()
    page = web.start(our, files_dir, transfers, access, request_download, start_worker, cancel, ls_listing)
    while True:
        try:
            msg = await_message()
        except SendError as e:
            println(f"got SendError: {e}")
            continue
        try:
            if page is not None and page.handles(msg):
                page.handle(msg)
            elif not serving.handles(our, msg):
                handle_message(our, msg, files_dir, transfers, access)
            serving.after_message(our)
            if transfers.waiting:
                start_waiting(our, transfers)
            share_budget(transfers)
            if page is not None:
                page.push_state()
        except (ValueError, KeyError, TypeError, AttributeError, vfs.VfsError) as e:
            # a malformed body from anyone: say so, keep serving
            detail = e if not isinstance(e, json.JSONDecodeError) else "body is not JSON"
            println(f"error: bad message from {msg.source}: {detail}")
            if msg.is_request and msg.expects_response is not None:
                Response().body({"Err": f"bad request: {detail}"}).send()


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
