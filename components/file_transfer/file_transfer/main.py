# world: kinode-py:host-ext/file-transfer-ext@0.1.0
"""file_transfer: the package's main process.

Answers ListFiles with the files in its `files` drive, starts a worker (through the imported
`file-transfer-worker` API) for each Download, asked by a local script (we download) or by a
remote worker (we serve), and shows the workers' progress.
"""
import json
import time

import ft_folder
import ft_multi
import ft_schedule
import serving
import web
import wit_world
from componentize_py_types import Err
from ft_common import MAX_DOWNLOADS, MAX_FOLDER_DEPTH, PARTIAL_DIR, check_name, human_size
from process_lib import (
    Address,
    Message,
    ProcessId,
    Request,
    Response,
    SendError,
    await_message,
    get_blob,
    get_state,
    print_to_terminal,
    println,
    run,
    set_state,
    to_wit_address,
    vfs,
)
from wit_world.imports import file_transfer_worker as worker_api

from host.kinode_types import DOWNLOADING_DIR, UPLOADING_DIR


class Transfers(ft_schedule.Transfers):
    """ft_schedule's Transfers, with each name being downloaded marked in the files drive, so the
    HTTP server refuses an upload of it (and we, a download of a name being uploaded)."""

    def __init__(self, drive: str):
        super().__init__()
        self.drive = drive

    def end(self, key: tuple) -> None:
        super().end(key)
        if self.fetching(key[1], time.monotonic()) is None:
            self._unmark(key[1])
        if not self.active and not self.waiting:
            # no download of ours runs: leave no empty folders behind (one in use is not empty)
            for folder in (f"{self.drive}/{DOWNLOADING_DIR}", f"{self.drive}/{PARTIAL_DIR}"):
                try:
                    vfs.vfs_request(folder, "RemoveDir")
                except vfs.VfsError:
                    break

    def take_name(self, name: str, node: str) -> str:
        """Mark `name` as being downloaded from `node`, unless the web page is uploading it: then
        an error. The mark comes first, then the look for an upload (which does the reverse), so
        of a download and an upload racing for one name at least one is refused."""
        mark = f"{self.drive}/{DOWNLOADING_DIR}/{name}"
        try:
            f = vfs.create_file(mark)
        except vfs.VfsError:
            vfs.open_dir(f"{self.drive}/{DOWNLOADING_DIR}", create=True)  # the first download
            f = vfs.create_file(mark)
        try:
            f.write(node.encode())
        finally:
            f.close()
        try:
            vfs.metadata(f"{self.drive}/{UPLOADING_DIR}/{name}")
        except vfs.VfsError:
            return ""
        self._unmark(name)
        return f"{name} is being uploaded from the web page: download it when that upload ends"

    def _unmark(self, name: str) -> None:
        try:
            vfs.remove_file(f"{self.drive}/{DOWNLOADING_DIR}/{name}")
        except vfs.VfsError:
            pass  # none

    def clear_marks(self) -> None:
        """At start: no download survives a restart, so no mark does either."""
        try:
            vfs.vfs_request(f"{self.drive}/{DOWNLOADING_DIR}", "RemoveDirAll")
        except vfs.VfsError:
            pass  # none


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


class NoFolder(ValueError):
    """ListFiles of a folder that is not there or cannot be: answered as an error, not logged here
    as a bad message (a typo is the asker's)."""


def ls_listing(files_dir: vfs.Directory, folder) -> list:
    """ListFiles with folders: the files and folders in the drive, or in `folder` inside it; a
    folder's row is `NAME/` with its file count and total size (as its download would fetch it)."""
    base = files_dir.path
    if folder is not None:
        problem = "folder must be a string" if not isinstance(folder, str) else ft_folder.check_path(folder.strip("/"))
        if problem:
            raise NoFolder(f"bad folder: {problem}")
        base = f"{base}/{folder.strip('/')}"
    try:
        entries = vfs.open_dir(base).read()
    except vfs.VfsError as e:
        if folder is None:
            raise
        # a typo in the folder's name is the asker's, said plainly; not a bad message to log here
        why = "no such folder" if "no such file" in str(e).lower() else f"cannot list it ({str(e).rsplit(': ', 1)[-1]})"
        raise NoFolder(f"{why}: {folder.strip('/')}") from None
    rows = []
    for entry in entries:
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
    problem = ft_multi.check_nodes(target_addr.node, our.node)   # "A,B,C": from each at once
    if problem:
        return problem, False
    key = (target_addr.node, name)
    running = transfers.fetching(name, time.monotonic())
    if running is not None:
        return f"{name} is already being downloaded from {running}", False
    problem = transfers.take_name(name, target_addr.node)
    if problem:
        return problem, False
    if transfers.full(time.monotonic(), target_addr.node):
        transfers.waiting[key] = target_addr
        print_to_terminal(1, f"{name} from {target_addr.node}: queued ({len(transfers.waiting)} waiting, "
                             f"{MAX_DOWNLOADS} downloads at once)")
        return "", False
    transfers.touch(key, time.monotonic(), worker=None)
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
    """Tell each running transfer's worker its window when it changes (ft_schedule.budget)."""
    window, told = ft_schedule.budget(transfers, serving.SLOTS, time.monotonic())
    for worker, name in told:
        # no answer wanted: a worker that has just ended misses nothing
        (Request.to(worker).body({"Progress": {"name": name, "progress": 0}})
         .metadata({"ft": 1, "window": window}).send())


def start_waiting(our: Address, transfers: Transfers) -> None:
    """Start queued downloads while slots are free (after one ends, or one went silent)."""
    for key, target in transfers.next_waiting(time.monotonic()):
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
        t = transfers.touch(key, time.monotonic(), worker=msg.source, bytes=meta.get("bytes", 0), total=meta.get("total"),
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
                + (f"; only {human_size(meta['moved'])} moved, the rest came from the copy this node had"
                   if isinstance(meta.get("moved"), int) else "")
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
        Response().body({"Transfers": transfers.table(time.monotonic())}).send()
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
            try:
                listing = ls_listing(files_dir, msg.meta().get("folder")) if msg.meta().get("ft") == 1 \
                    else ls_files(files_dir)
            except NoFolder as e:
                Response().body({"Err": str(e)}).send()
                return
            Response().body({"ListFiles": listing}).send()
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
    transfers = Transfers(drive)
    transfers.clear_marks()
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
