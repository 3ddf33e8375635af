"""file_transfer's web page and JSON API, under /file_transfer:file_transfer:template.os/.

    GET files [?node=NODE] [&folder=PATH]
                               {"ListFiles": [...]}: ours, or NODE's (asked over the network; of a list
                               A,B,C, A's); a folder
                               is a row {"name": "NAME/", "size", "files"}; with PATH, what is inside it
    POST files                 multipart, field `files`: streamed into the files drive by http_server
    GET files/NAME [?path=P]   one of our files (with P, the file P inside the folder NAME), from disk
    POST download              {"name", "node"}: start (or queue) a download (node "A,B,C": from each)
    GET transfers              {"Transfers": [...], "history": [...]}
    DELETE transfers/NAME      [?node=NODE]: cancel a download or drop it from the queue
    GET allow, PUT allow       {"allow": null | [nodes]}: who may list and download our files
    ws                         pushes {"kind": "state", "data": {transfers, history, allow}} on changes
"""
import json
import time

from ft_common import check_name, check_node_name, nfc
from ft_folder import check_path
from ft_multi import check_nodes, nodes_of
from process_lib import Message, Request, SendError, get_blob, http, print_to_terminal, sibling, vfs

PUSH_EVERY = 0.25  # seconds between state pushes while downloads report progress
JSON = {"Content-Type": "application/json"}


def start(our, files_dir, transfers, access, request_download, start_worker, cancel, ls_listing):
    """Bind the page; None if this node has no web server (the package works without it)."""
    page = Page(our, files_dir, transfers, access, request_download, start_worker, cancel, ls_listing)
    try:
        http.serve_ui(our)
        http.bind_http_path("/files", upload_to="files")
        http.bind_http_path("/files/:name")
        http.bind_http_path("/download")
        http.bind_http_path("/transfers")
        http.bind_http_path("/transfers/:name")
        http.bind_http_path("/allow")
        http.bind_ws_path("/ws")
    except (SendError, http.HttpServerError, ValueError) as e:
        print_to_terminal(1, f"no web page: {e}")
        return None
    return page


class Page:
    def __init__(self, our, files_dir, transfers, access, request_download, start_worker, cancel, ls_listing):
        self.our = our
        self.files_dir = files_dir
        self.transfers = transfers
        self.access = access
        self.request_download = request_download
        self.start_worker = start_worker
        self.cancel = cancel
        self.ls_listing = ls_listing
        self.channels: set = set()
        self.last_state = ""
        self.last_push = 0.0
        self.last_shape = None

    def handles(self, msg: Message) -> bool:
        return msg.is_request and msg.source.node == self.our.node and msg.source.process == http.HTTP_SERVER

    def handle(self, msg: Message) -> None:
        kind, value = http.parse_server_request(msg)
        if kind == "WebSocketOpen":
            self.channels.add(value["channel_id"])
            self.push_state(force=True, only=value["channel_id"])
        elif kind == "WebSocketClose":
            self.channels.discard(value)
        elif kind == "Http":
            blob = get_blob()
            try:
                self.route(value, blob.bytes if blob else b"")
            except (ValueError, KeyError, TypeError) as e:
                http.send_json(400, {"error": f"bad request: {e}"})

    def route(self, req, body: bytes) -> None:
        path, method = req.path(self.our.process), req.method
        if path in ("/download", "/allow") and method not in ("GET", "HEAD") and \
                req.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            # a form another page posts can only be text/plain, urlencoded or multipart
            return http.send_json(415, {"error": "send the JSON body with Content-Type: application/json"})
        if path == "/files" and method == "GET":
            node, folder = req.query_params.get("node"), req.query_params.get("folder") or None
            if folder is not None:
                folder = folder.strip("/")
                problem = check_path(folder)
                if problem:
                    return http.send_json(400, {"error": f"bad folder name: {problem}"})
            if node and node != self.our.node:
                if nodes_of(node) is not None:   # "A,B,C": they share the file, so the first one's listing shows it
                    problem = check_nodes(node, self.our.node)
                    if problem:
                        return http.send_json(400, {"error": problem})
                    node = nodes_of(node)[0]
                return self.peer_files(node, folder)
            try:
                return http.send_json(200, {"ListFiles": self.ls_listing(self.files_dir, folder)})
            except (vfs.VfsError, ValueError):   # (main's NoFolder)
                return http.send_json(404, {"error": f"no such folder on {self.our.node}: {folder}"})
        if path == "/files" and method == "POST":
            summary = json.loads(body)["Uploaded"]
            files = summary["files"]
            if len(files) > 5:  # a folder upload: one line, not one per file
                print_to_terminal(0, f"uploaded {len(files)} files ({sum(f['size'] for f in files)} bytes, "
                                     f"{files[0]['name']} first) from the web page")
            else:
                for f in files:
                    print_to_terminal(0, f"uploaded {f['name']} ({f['size']} bytes) from the web page")
            self.push_state(force=True)
            return http.send_json(200 if summary["files"] or not summary["refused"] else 400, summary)
        if path == "/files/:name" and method == "GET":
            name = req.url_params.get("name", "")
            inner = req.query_params.get("path")  # a file inside the folder `name`
            full = name if inner is None else f"{name}/{inner}"
            problem = check_name(name) or (check_path(full) if inner is not None else "")
            if problem:
                return http.send_json(400, {"error": problem})
            try:
                kind = vfs.metadata(f"{self.files_dir.path}/{full}").file_type
            except vfs.VfsError:
                kind = None
            if kind != "File":
                problem = f"{full} is a folder: open it on the page" if kind == "Directory" else f"no such file: {full}"
                return http.send_json(404 if kind is None else 400, {"error": problem})
            return http.send_file(f"{self.files_dir.path}/{full}",
                                  {"Content-Disposition": "attachment"})
        if path == "/download" and method == "POST":
            args = json.loads(body)
            name, node = nfc(args.get("name")), args.get("node")
            problem = check_name(name) or ("" if isinstance(node, str) and node else "no node given")
            if not problem:
                target = sibling(self.our, "file_transfer", node)
                problem, start = self.request_download(self.our, name, target, self.transfers)
                if start:
                    self.start_worker(self.our, self.our, name, target, True, self.transfers)
            if problem:
                return http.send_json(400, {"error": problem})
            self.push_state(force=True)
            return http.send_json(200, {"Download": {"Ok": None}})
        if path == "/transfers" and method == "GET":
            return http.send_json(200, self.state())
        if path == "/transfers/:name" and method == "DELETE":
            problem = self.cancel(req.url_params.get("name"), req.query_params.get("node") or None, self.transfers)
            self.push_state(force=True)
            return http.send_json(400 if problem else 200, {"error": problem} if problem else {"Cancel": {"Ok": None}})
        if path == "/allow" and method == "GET":
            return http.send_json(200, {"allow": None if self.access.allow is None else sorted(self.access.allow)})
        if path == "/allow" and method in ("PUT", "POST"):
            nodes = json.loads(body).get("allow")
            if nodes is not None and not (isinstance(nodes, list) and all(isinstance(n, str) and n for n in nodes)):
                return http.send_json(400, {"error": "allow takes a list of node names, or null for everyone"})
            problem = next((p for p in map(check_node_name, nodes or ()) if p), "")
            if problem:
                return http.send_json(400, {"error": problem})
            self.access.set(nodes)
            self.push_state(force=True)
            return http.send_json(200, {"allow": nodes})
        http.send_json(405, {"error": f"{method} {path} is not part of this API"})

    def peer_files(self, node: str, folder) -> None:
        target = sibling(self.our, "file_transfer", node)
        # "ft": our peers answer with folders (a plain peer ignores the metadata and lists its files)
        meta = {"ft": 1} if folder is None else {"ft": 1, "folder": folder}
        try:
            answer = Request.to(target).body("ListFiles").metadata(meta).send_and_await_response(5).json()
        except SendError as e:
            return http.send_json(502, {"error": f"{node} did not answer ({e.kind}): is it online?"})
        except ValueError:
            return http.send_json(502, {"error": f"{node} sent a malformed answer"})
        if isinstance(answer, dict) and isinstance(answer.get("ListFiles"), list):
            # a plain peer ignores `folder` and lists its drive (with full paths): not what was asked
            if folder is not None and any("/" in str(f.get("name", "")).rstrip("/") for f in answer["ListFiles"]
                                          if isinstance(f, dict)):
                return http.send_json(400, {"error": f"{node} does not list folders"})
            return http.send_json(200, answer)
        err = str(answer.get("Err") if isinstance(answer, dict) else answer)[:500]
        if err.startswith("not allowed"):
            return http.send_json(403, {"error": err})
        if folder is not None:  # the peer could not list it: it has no such folder
            why = "" if "no such f" in err or "not a directory" in err.lower() else f" ({err})"
            return http.send_json(404, {"error": f"{node} has no folder {folder}{why}"})
        return http.send_json(502, {"error": f"{node}: {err}"})

    def state(self) -> dict:
        return {"Transfers": self.transfers.table(time.monotonic()), "history": self.transfers.history[::-1],
                "allow": None if self.access.allow is None else sorted(self.access.allow), "node": self.our.node}

    def push_state(self, force: bool = False, only=None) -> None:
        """Send the transfers to every open page when they changed, at most every PUSH_EVERY."""
        if not self.channels:
            return
        now = time.monotonic()
        # a download started, ended or was queued: push at once; progress alone: throttled
        shape = (len(self.transfers.history), tuple(self.transfers.active), tuple(self.transfers.waiting))
        if not force and shape == self.last_shape and now - self.last_push < PUSH_EVERY:
            return
        self.last_shape = shape
        text = json.dumps({"kind": "state", "data": self.state()})
        if text == self.last_state and only is None:
            return
        self.last_state, self.last_push = text, now
        for cid in ([only] if only is not None else list(self.channels)):
            http.send_ws_push(cid, text)
