"""file_transfer's web page and JSON API, under /file_transfer:file_transfer:template.os/.

    GET files [?node=NODE]     {"ListFiles": [...]}: ours, or NODE's (asked over the network)
    POST files                 multipart, field `files`: streamed into the files drive by http_server
    GET files/NAME             one of our files, streamed from disk
    POST download              {"name", "node"}: start (or queue) a download
    GET transfers              {"Transfers": [...], "history": [...]}
    DELETE transfers/NAME      [?node=NODE]: cancel a download or drop it from the queue
    GET allow, PUT allow       {"allow": null | [nodes]}: who may list and download our files
    ws                         pushes {"kind": "state", "data": {transfers, history, allow}} on changes
"""
import json
import time

from ft_common import check_name
from process_lib import Message, Request, SendError, get_blob, http, print_to_terminal, sibling

PUSH_EVERY = 0.25  # seconds between state pushes while downloads report progress
JSON = {"Content-Type": "application/json"}


def start(our, files_dir, transfers, access, request_download, start_worker, cancel, ls_files):
    """Bind the page; None if this node has no web server (the package works without it)."""
    page = Page(our, files_dir, transfers, access, request_download, start_worker, cancel, ls_files)
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
    def __init__(self, our, files_dir, transfers, access, request_download, start_worker, cancel, ls_files):
        self.our = our
        self.files_dir = files_dir
        self.transfers = transfers
        self.access = access
        self.request_download = request_download
        self.start_worker = start_worker
        self.cancel = cancel
        self.ls_files = ls_files
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
        if path == "/files" and method == "GET":
            node = req.query_params.get("node")
            if not node or node == self.our.node:
                return http.send_json(200, {"ListFiles": self.ls_files(self.files_dir)})
            return self.peer_files(node)
        if path == "/files" and method == "POST":
            summary = json.loads(body)["Uploaded"]
            for f in summary["files"]:
                print_to_terminal(0, f"uploaded {f['name']} ({f['size']} bytes) from the web page")
            self.push_state(force=True)
            return http.send_json(200 if summary["files"] or not summary["refused"] else 400, summary)
        if path == "/files/:name" and method == "GET":
            name = req.url_params.get("name", "")
            if check_name(name):
                return http.send_json(400, {"error": check_name(name)})
            return http.send_file(f"{self.files_dir.path}/{name}",
                                  {"Content-Disposition": "attachment"})
        if path == "/download" and method == "POST":
            args = json.loads(body)
            name, node = args.get("name"), args.get("node")
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
            self.access.set(nodes)
            self.push_state(force=True)
            return http.send_json(200, {"allow": nodes})
        http.send_json(405, {"error": f"{method} {path} is not part of this API"})

    def peer_files(self, node: str) -> None:
        target = sibling(self.our, "file_transfer", node)
        try:
            answer = Request.to(target).body("ListFiles").send_and_await_response(5).json()
        except SendError as e:
            return http.send_json(502, {"error": f"{node} did not answer ({e.kind}): is it online?"})
        except ValueError:
            return http.send_json(502, {"error": f"{node} sent a malformed answer"})
        if isinstance(answer, dict) and "ListFiles" in answer:
            return http.send_json(200, answer)
        return http.send_json(403, {"error": str(answer.get("Err") if isinstance(answer, dict) else answer)})

    def state(self) -> dict:
        return {"Transfers": self.transfers.table(), "history": self.transfers.history[::-1],
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
