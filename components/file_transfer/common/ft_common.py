"""What file_transfer's processes share: the protocol's constants (the file-name rule is kinode_types').

The seed's WIT is the wire protocol. This package's additions ride in request `metadata` JSON
(marked `"ft": 1`), so a peer that speaks only the plain protocol still works with us:
- Size carries `{"ft":1}` and expects an answer; our requestor answers `{"ft":1, "offset": N}`
  (resume point). No answer means a plain peer: chunks are pushed unacked.
- After the last chunk the provider sends a `Progress` request with `{"ft":1, "final": true,
  "blake3": whole-file hash}`; the requestor renames its partial only if its own hash of the file
  matches. (A one-chunk file's hash rides in Size instead.)
- Chunk carries `{"ft":1, "upto": BLAKE3 of this session's bytes up to the chunk's end}` (from
  offset 0, or from the resume point) and expects an ack (a `Progress` response), so the provider
  keeps at most WINDOW chunks in flight. Each chunk is thus checked by a hash that covers it, and
  both sides hash the data once: from 0, the last chunk's `upto` is the whole file's hash. A file
  of up to CHUNK_SIZE is sent whole right behind Size, unacked: the Size answer is its ack.
- A worker built without the host's blobs extension (a portable build) cannot hash in the host,
  so it speaks only the plain protocol: no `ft` in its Download or Size, a plain Size answer
  (which tells our provider to push plainly), no hash checks.
- Queue (extended requestors only): a provider serving MAX_SERVING files answers a Download with
  `{"ft":1, "queued": K}` (place K in its queue); the requestor waits, asking its place every TICK
  (a `Progress` request with `{"ft":1, "queue": true}`, answered `{"ft":1, "queued": K}`, K = 0 once
  its worker starts, null if unknown, with `"error"` if its worker could not be started) and leaves
  the queue with `{"ft":1, "queue": true, "error"}`.
  A plain requestor cannot be told to wait (it gives up when no Size comes): with no slot free, or
  others waiting, its Download is answered with an Err saying the node is busy.
- A provider worker tells its parent every TICK that it still serves, and when it ends
  (`Progress` with `{"ft":1, "serving": true|false, "peer"}`), so the parent knows its free slots.
- Progress to the parent carries `{"ft":1, "bytes", "total", "rate", "done", "error", "hash"}`.
- Window: a node keeps at most NODE_BUDGET bytes in flight for all its transfers together (serving
  and receiving). Its file_transfer tells each worker its share as a window of chunks (a `Progress`
  request `{"ft":1, "window": W}`, again whenever the number of transfers changes); a requestor
  passes its window on in every ack (`"window"`), and a provider keeps at most the smaller of its
  own and its requestor's in flight. A provider starts at START_WINDOW until it is told.
  Windows count EXT_CHUNK_SIZE units of bytes, whatever the chunks' size.
- Chunk size: a file over BIG_MIN is sent in chunks of BIG_CHUNK_SIZE only while each node has a
  transfer's whole share (WINDOW: it runs that one transfer alone); the requestor's acks ask for it
  (`"chunk": BIG_CHUNK_SIZE`), else chunks are EXT_CHUNK_SIZE. So a busy node's memory per transfer
  (the chunks in flight, the one written behind, the next one taken) stays that of small chunks.
"""
from __future__ import annotations

# one file-name rule for every package; build.sh stages host.kinode_types beside the guests
from host.kinode_types import check_file_name as check_name  # noqa: F401
from host.kinode_types import check_node_name, check_relative_path, nfc  # noqa: F401

CHUNK_SIZE = 1024 * 1024       # the seed's chunk size: used with peers that speak only the plain protocol
EXT_CHUNK_SIZE = 4 * CHUNK_SIZE  # with our peers: fewer, larger chunks (each costs a fixed overhead in
                                 # both nodes); also the unit of windows
BIG_CHUNK_SIZE = 8 * CHUNK_SIZE  # a lone transfer's chunks (less CPU per byte); with several transfers
                                 # at once each would hold twice the memory (see "Chunk size" above)
BIG_MIN = 64 * CHUNK_SIZE        # files up to this size keep EXT_CHUNK_SIZE: a few chunks save little
WINDOW = 8                 # EXT_CHUNK_SIZE units in flight per transfer, at most (a lone transfer's: NODE_BUDGET)
NODE_BUDGET = 32 * CHUNK_SIZE  # bytes in flight for all of a node's transfers together (a lone one: WINDOW chunks)
DELTA_MIN = 4 * CHUNK_SIZE   # a file over this size is offered only what changed (ft_delta), if its host can
START_WINDOW = 2           # a provider's window until its file_transfer gives it its share
MAX_DOWNLOADS = 4          # downloads a node runs at once; more wait their turn in file_transfer
MAX_SERVING = 4            # files a node sends at once; more requestors wait in its queue (each
                           # serving worker is a Wasm instance plus its chunks in flight)
SERVING_LEASE = 20         # seconds a serving slot is held without word from its worker
STATE_EVERY = 4            # EXT_CHUNK_SIZE units between saves of a big download's resume point (16 MiB)
ACK_TIMEOUT = 60           # seconds a provider waits for an ack before giving up
HANDSHAKE_TIMEOUT = 10     # seconds to wait for the other side's Download answer / Size
STALL_TIMEOUT = 60         # seconds without progress before a worker gives up
TICK = 5                   # seconds between a worker's stall checks
PARTIAL_DIR = ".partial"   # inside the files drive; hidden from ListFiles (only files are listed)


def window_for(transfers: int) -> int:
    """Each transfer's window (in chunks or batches of EXT_CHUNK_SIZE) when a node runs `transfers`."""
    return max(1, min(WINDOW, NODE_BUDGET // (max(transfers, 1) * EXT_CHUNK_SIZE)))


def window_in(meta: dict):
    """A window given in metadata (an int from 1, bool is no int here), or None."""
    w = meta.get("window")
    return w if isinstance(w, int) and not isinstance(w, bool) and w >= 1 else None


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

# folders (ft_folder): a tree beyond these is refused by both sides, with an error saying which
MAX_FOLDER_DEPTH = 32
MAX_FOLDER_ENTRIES = 50_000
BATCH_BYTES = 4 * CHUNK_SIZE   # a folder's files are sent in batches of up to this many bytes ...
BATCH_FILES = 256              # ... and files (a big file is cut into pieces of BATCH_BYTES)
FOLDER_WINDOW = 8              # batches in flight per folder transfer (as a file's chunks)
