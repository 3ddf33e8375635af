"""process_lib: the guest-side library every Python process uses; the twin of Rust's
`kinode_process_lib`.

A process's app module implements the world's `init` by handing control to `run`:

    import wit_world
    from process_lib import Address, await_message, run

    def main(our: Address) -> None:
        while True:
            message = await_message()
            ...

    class WitWorld(wit_world.WitWorld):
        def init(self, our: str) -> None:
            run(main, our)

Bodies are bytes; `Message.json()` parses JSON bodies, and builders' `.body(obj)` writes JSON in
serde's externally tagged form when given a dict, list, str or number. When the host offers the
`kinode-py:host-ext/blobs` extension, blob bytes travel through it (in bulk, or not at all when a blob
is only forwarded); otherwise through `standard`.
"""
from process_lib import (
    http,  # noqa: F401
    vfs,  # noqa: F401
)
from process_lib.core import (  # noqa: F401
    HAS_BLOBS,
    Address,
    Blob,
    Capability,
    Message,
    OnExit,
    PackageId,
    ParseError,
    ProcessId,
    Request,
    Response,
    SendError,
    SpawnError,
    ask,
    await_message,
    check_file_name,
    clear_state,
    current_blob_hash,
    current_blob_hash_chained,
    current_blob_len,
    from_wit_address,
    get_blob,
    get_state,
    our,
    our_capabilities,
    print_to_terminal,
    println,
    run,
    script,
    set_on_exit,
    set_state,
    sibling,
    spawn,
    to_wit_address,
)
