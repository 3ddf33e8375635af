# world: example:courier/courier-process@0.1.0
"""courier: send a file with a note to another node.

`send NODE FILE NOTE...` offers a file from this node's courier drive (`courier:example.os/files`)
to NODE's courier, which pulls it with file_transfer's worker API (`start-download`) into its own
courier drive and records the note in its inbox. Serving the file is the same API call on this side.
"""

import wit_world
from componentize_py_types import Err
from process_lib import (
    Address,
    Message,
    Request,
    Response,
    SendError,
    await_message,
    check_file_name,
    println,
    run,
    to_wit_address,
    vfs,
)
from wit_world.imports import file_transfer_worker as worker_api

MAX_NOTE = 1000


def plain_name(name) -> bool:
    return not check_file_name(name)


class Courier:
    def __init__(self, our: Address):
        self.our = our
        self.drive = vfs.create_drive(our.package_id(), "files")
        self.inbox: list = []        # delivered: {"from", "name", "note", "size"}
        self.expected: dict = {}     # (node, name) -> note, for offers being pulled

    def courier_at(self, node: str) -> Address:
        return Address(node, self.our.process)

    def handle(self, msg: Message) -> None:
        body = msg.json()
        local = msg.source.node == self.our.node and msg.source.package_id() == self.our.package_id()
        if msg.is_request and local and isinstance(body, dict) and "Send" in body:
            self.send(body["Send"])
        elif msg.is_request and local and body == "Inbox":
            Response().body({"Inbox": self.inbox}).send()
        elif msg.is_request and isinstance(body, dict) and "Offer" in body:
            self.offered(msg, body["Offer"])
        elif msg.is_request and isinstance(body, dict) and isinstance(body.get("Download"), dict):
            self.serve(msg, body["Download"])
        elif msg.is_request and local and isinstance(body, dict) and isinstance(body.get("Progress"), dict):
            self.progress(msg, body["Progress"])
        elif not msg.is_request:
            pass  # acks from workers
        else:
            raise ValueError("unknown request")

    def send(self, req: dict) -> None:
        node, name, note = req.get("node"), req.get("name"), str(req.get("note", ""))[:MAX_NOTE]
        if not plain_name(name) or not isinstance(node, str):
            Response().body({"Send": {"Err": f"bad file name {name!r}"}}).send()
            return
        try:
            size = vfs.metadata(f"{self.drive}/{name}").len
        except vfs.VfsError:
            Response().body({"Send": {"Err": f"no file {name} in {self.drive}"}}).send()
            return
        try:
            answer = (Request.to(self.courier_at(node)).body({"Offer": {"name": name, "size": size, "note": note}})
                      .send_and_await_response(10).json())
        except SendError as e:
            Response().body({"Send": {"Err": f"{node} did not answer ({e.kind})"}}).send()
            return
        result = answer.get("Offer") if isinstance(answer, dict) else None
        if isinstance(result, dict) and "Err" in result:
            Response().body({"Send": {"Err": f"{node} refused: {result['Err']}"}}).send()
        else:
            Response().body({"Send": {"Ok": None}}).send()

    def offered(self, msg: Message, offer: dict) -> None:
        name, note = offer.get("name"), str(offer.get("note", ""))[:MAX_NOTE]
        if not plain_name(name):
            Response().body({"Offer": {"Err": "bad file name"}}).send()
            return
        sender = msg.source.node
        println(f"{sender} sends you {name} ({offer.get('size')} bytes): {note!r}")
        self.expected[(sender, name)] = note
        Response().body({"Offer": {"Ok": None}}).send()
        # pull it: the API spawns a worker in *our* package, which saves into *our* drive
        try:
            worker_api.start_download(to_wit_address(self.our), to_wit_address(self.our), name,
                                      to_wit_address(self.courier_at(sender)), True)
        except Err as e:
            println(f"error: could not fetch {name} from {sender}: {e.value}")

    def serve(self, msg: Message, req: dict) -> None:
        name = req.get("name")
        if req.get("is_requestor") or not plain_name(name):
            Response().body({"Download": {"Err": "bad request"}}).send()
            return
        try:
            vfs.metadata(f"{self.drive}/{name}")
        except vfs.VfsError:
            Response().body({"Download": {"Err": f"no such file: {name}"}}).send()
            return
        try:
            worker_api.start_download(to_wit_address(self.our), to_wit_address(msg.source), name,
                                      to_wit_address(self.our), False)
        except Err as e:
            println(f"error: could not serve {name}: {e.value}")

    def progress(self, msg: Message, req: dict) -> None:
        Response().body("Progress").send()
        meta, name = msg.meta(), req.get("name")
        peer = meta.get("peer")
        if meta.get("error"):
            self.expected.pop((peer, name), None)
            println(f"error: {name} from {peer} did not arrive: {meta['error']}")
        elif meta.get("done"):
            note = self.expected.pop((peer, name), "")
            self.inbox.append({"from": peer, "name": name, "note": note, "size": meta.get("total", 0)})
            println(f"{name} from {peer} arrived in {self.drive} (blake3 {meta.get('hash', '?')[:16]}...)")


def main(our: Address) -> None:
    courier = Courier(our)
    println("ready")
    while True:
        try:
            msg = await_message()
        except SendError:
            continue
        try:
            courier.handle(msg)
        except (ValueError, KeyError, TypeError, AttributeError, vfs.VfsError) as e:
            println(f"error: bad message from {msg.source}: {e}")
            if msg.is_request and msg.expects_response is not None:
                Response().body({"Err": str(e)}).send()


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
