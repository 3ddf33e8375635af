# world: kinode-py:host-ext/process-v0-ext@0.1.0
"""A lying provider, posing as file_transfer (test-only): it answers a peer's Download itself and
sends what the file name asks for: `size-lies` (chunks past the announced size), `bad-offset`
(a chunk at the wrong offset), `bad-hash` (a chunk whose hash does not match), `no-hash` (a chunk
with no hash), `chunk-hash-only` (a second chunk whose `upto` hashes that chunk alone, not the
file up to its end), `bad-final` and `garbled-final` (good bytes, then a wrong or malformed
whole-file hash), `stranger` (a chunk from a process that never sent Size: a child of the liar,
before the true chunk; the download must ignore it and complete)."""
import wit_world
from process_lib import (
    Address,
    OnExit,
    ProcessId,
    Request,
    Response,
    SendError,
    await_message,
    our_capabilities,
    println,
    run,
    spawn,
)

DATA_HASH = "ff6f2cf7750b0d32858b758ef1cd7971064f53e81ec62ff560a953792599ca69"  # BLAKE3 of b"x" * 1000
Y_HASH = "2ea5a8a36ffa187910093ac95efa7fc1d451a867d14a45adc03a8b6c574c3e72"     # BLAKE3 of b"y" * 1000


def stranger(our: Address) -> None:
    """The spawned child: send one chunk to the worker its parent names, then say it is done."""
    msg = await_message()
    to = msg.json()["Stranger"]
    worker = Address(to["node"], ProcessId.parse(to["process"]))
    Request.to(worker).body({"Chunk": {"name": "stranger", "offset": 0, "length": 1000}}) \
        .metadata({"ft": 1, "upto": Y_HASH}).blob_bytes(b"y" * 1000).send()
    Response().body("Sent").send()


def main(our: Address) -> None:
    if our.process.process_name != "file_transfer":
        stranger(our)
        return
    println("liar begin")
    while True:
        try:
            msg = await_message()
        except SendError:
            continue
        if not msg.is_request:
            continue
        body = msg.json()
        req = body.get("Download") if isinstance(body, dict) else None
        if not isinstance(req, dict):
            continue
        name, worker = req["name"], msg.source
        Response().body({"Download": {"Ok": None}}).send()
        data = b"x" * 1000
        wrong_hash = {"ft": 1, "upto": "00" * 32}
        if name == "size-lies":
            Request.to(worker).body({"Size": 500}).send()
            Request.to(worker).body({"Chunk": {"name": name, "offset": 0, "length": 1000}}).blob_bytes(data).send()
        elif name == "bad-offset":
            Request.to(worker).body({"Size": 2000}).metadata({"ft": 1}).send()
            Request.to(worker).body({"Chunk": {"name": name, "offset": 1000, "length": 1000}}) \
                .metadata(wrong_hash).blob_bytes(data).send()  # the offset is checked first
        elif name == "bad-hash":
            Request.to(worker).body({"Size": 1000}).metadata({"ft": 1}).send()
            Request.to(worker).body({"Chunk": {"name": name, "offset": 0, "length": 1000}}) \
                .metadata(wrong_hash).blob_bytes(data).send()
        elif name in ("bad-final", "garbled-final"):  # good chunk, then a wrong or malformed file hash
            Request.to(worker).body({"Size": 1000}).metadata({"ft": 1}).send()
            Request.to(worker).body({"Chunk": {"name": name, "offset": 0, "length": 1000}}) \
                .metadata({"ft": 1, "upto": DATA_HASH}).blob_bytes(data).send()
            final = "00" * 32 if name == "bad-final" else "not a hash"
            Request.to(worker).body({"Progress": {"name": name, "progress": 100}}) \
                .metadata({"ft": 1, "final": True, "blake3": final}).send()
        elif name == "no-hash":
            Request.to(worker).body({"Size": 1000}).metadata({"ft": 1}).send()
            Request.to(worker).body({"Chunk": {"name": name, "offset": 0, "length": 1000}}) \
                .metadata({"ft": 1}).blob_bytes(data).send()
        elif name == "chunk-hash-only":  # a good first chunk, then one hashed on its own
            Request.to(worker).body({"Size": 2000}).metadata({"ft": 1}).send()
            Request.to(worker).body({"Chunk": {"name": name, "offset": 0, "length": 1000}}) \
                .metadata({"ft": 1, "upto": DATA_HASH}).blob_bytes(data).send()
            Request.to(worker).body({"Chunk": {"name": name, "offset": 1000, "length": 1000}}) \
                .metadata({"ft": 1, "upto": Y_HASH}).blob_bytes(b"y" * 1000).send()
        elif name == "stranger":  # the true Size (its hash included), a stranger's chunk, the true chunk
            Request.to(worker).body({"Size": 1000}).metadata({"ft": 1, "blake3": DATA_HASH}).send()
            child = spawn(None, f"{our.package_id()}/pkg/file_transfer.wasm", OnExit.NONE, our_capabilities())
            # its chunk is sent before its answer, so it reaches the worker before the true one
            Request.to(Address(our.node, child)).body({"Stranger": {"node": worker.node, "process": str(worker.process)}}) \
                .send_and_await_response(10)
            Request.to(worker).body({"Chunk": {"name": name, "offset": 0, "length": 1000}}) \
                .metadata({"ft": 1, "upto": DATA_HASH}).blob_bytes(data).send()
        elif name == "length-lies":
            Request.to(worker).body({"Size": 1000}).send()
            Request.to(worker).body({"Chunk": {"name": name, "offset": 0, "length": 999}}).blob_bytes(data).send()


class WitWorld(wit_world.WitWorld):
    def init(self, our: str) -> None:
        run(main, our)
