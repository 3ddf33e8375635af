# world: kinode-py:host-ext/file-transfer-worker-api-ext@0.1.0
"""file_transfer_worker_api: a library component exporting `file-transfer-worker`.

`start-download` runs inside the importing process (the host links it there), so the spawn, the
answer and the request below all act as that process: a worker is spawned in the importer's
package, the importer's current request is answered (unless the importer itself started a queued
download), and the worker is told what to do.
"""
from componentize_py_types import Err
from process_lib import Address, OnExit, Request, Response, SpawnError, from_wit_address, our_capabilities, spawn
from wit_world.exports import FileTransferWorker as Exports


def start_download(our: Address, source: Address, name: str, target: Address, is_requestor: bool) -> None:
    worker = spawn(None, f"{our.package_id()}/pkg/file_transfer_worker.wasm", OnExit.NONE,
                   our_capabilities(), [], False)
    peer = target if is_requestor else source
    if source != our:  # our own process starting a queued download has no request to answer
        Response().body({"Download": {"Ok": None}}).send()
    # no answer asked: the worker reports to its parent with Progress, failures included
    (Request.to(Address(our.node, worker))
     .body({"Download": {"name": name, "target": _wit_json(peer), "is_requestor": is_requestor}})
     .send())


def _wit_json(a: Address) -> dict:
    p = a.process
    return {"node": a.node, "process": {"process_name": p.process_name, "package_name": p.package_name,
                                        "publisher_node": p.publisher_node}}


class FileTransferWorker(Exports):
    def start_download(self, our, source, name, target, is_requestor) -> None:
        try:
            start_download(from_wit_address(our), from_wit_address(source), name, from_wit_address(target),
                           is_requestor)
        except (SpawnError, ValueError) as e:
            raise Err(str(e)) from None
