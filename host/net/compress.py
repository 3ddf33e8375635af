"""Compression of big message blobs between two of our nodes (zstd), where it pays.

A blob is judged by its start: the first `SAMPLE` bytes are compressed, and only if they shrank
below `SAMPLE_KEEP` of their size is the whole blob compressed, and sent so only if that saved at
least `WHOLE_KEEP`. Incompressible data (already compressed media, archives, random bytes) thus
costs one small sample per blob. Small blobs are sent as they are.

The receiver bounds what it inflates: a frame must state its content size, equal to the size the
message announces, at most the message limit, and at most `RATIO` times the frame's own length
(or `RATIO_FLOOR`); anything else is refused (`CompressError`). So a small message cannot make a node
allocate more than a big one could, and a peer's few bytes cannot cost much more work than raw
bytes would. Our sender sends raw a blob that would pass that ratio, so our nodes never trip it.
"""
from __future__ import annotations

import threading

import zstandard

MIN_BLOB = 16 << 10        # smaller blobs are not worth a frame
SAMPLE = 64 << 10          # the start of a blob compressed first to judge it
SAMPLE_KEEP = 0.90         # the sample must shrink below this share of its size ...
WHOLE_KEEP = 0.95          # ... and the whole blob below this, or it goes raw
LEVEL = 1                  # the fastest standard level: on logs and CSV it kept nearly all of level 3's ratio, faster
RATIO = 1024               # a frame may inflate to at most this many times its length ...
RATIO_FLOOR = 1 << 20      # ... or to this size, whatever its length (only zero-like data goes past it)

_local = threading.local()   # zstd contexts are not thread-safe: one pair per thread


class CompressError(Exception):
    """A compressed blob the receiver refuses (malformed, or inflating past the limit)."""


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True, write_checksum=False)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def within_ratio(size: int, frame_len: int) -> bool:
    """Whether a frame of `frame_len` bytes may inflate to `size` (the receiver's cap, the sender's too)."""
    return size <= max(RATIO_FLOOR, RATIO * frame_len)


def pays(data: bytes | memoryview) -> bool:
    """Whether the start of `data` shrinks enough to try the whole."""
    if len(data) < MIN_BLOB:
        return False
    sample = memoryview(data)[:SAMPLE]
    return len(_compressor().compress(sample)) < SAMPLE_KEEP * len(sample)


def compress_blob(data: bytes | memoryview) -> bytes | None:
    """`data` as one zstd frame (stating its content size), or None: send it raw."""
    if not pays(data):
        return None
    frame = _compressor().compress(data)
    if len(frame) >= WHOLE_KEEP * len(data) or not within_ratio(len(data), len(frame)):
        return None   # too little gained, or so much that the receiver would refuse it as a bomb
    return frame


def decompress_blob(frame: bytes | memoryview, size: int, limit: int) -> bytes:
    """The `size` bytes a frame from a peer holds; CompressError unless it is one well-formed frame
    whose content size is stated, equal to `size`, at most `limit` and within the ratio cap."""
    if not 0 <= size <= limit:
        raise CompressError(f"compressed blob announces {size} bytes (limit {limit})")
    if not within_ratio(size, len(frame)):
        raise CompressError(f"compressed blob of {len(frame)} bytes announces {size} bytes "
                            f"(more than {RATIO} times its length)")
    try:
        stated = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise CompressError(f"not a zstd frame ({e})") from None
    if stated in (-1, zstandard.CONTENTSIZE_UNKNOWN):   # the C backend answers -1
        raise CompressError("zstd frame does not state its content size")
    if stated < 0 or stated == zstandard.CONTENTSIZE_ERROR:
        raise CompressError("not a zstd frame (unreadable header)")
    if stated != size:
        raise CompressError(f"zstd frame states {stated} bytes, the message {size}")
    try:
        # with the content size stated, zstd writes into a buffer of exactly that size and fails
        # on a frame that would inflate past it
        out = _decompressor().decompress(frame)
    except zstandard.ZstdError as e:
        raise CompressError(f"bad zstd frame ({e})") from None
    if len(out) != size:
        raise CompressError(f"zstd frame inflated to {len(out)} bytes, not the {size} stated")
    return out
