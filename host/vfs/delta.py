"""The VFS's delta actions (this host's extension, beside upstream's): what a download needs to move
only the parts of a file that changed, with the file's bytes kept in the host.

- `chunk_list`: a file's content-defined chunks (FastCDC) with each one's BLAKE3 and the whole
  file's, cached by the file's stamp (device, inode, size, mtime, ctime: a changed file is chunked
  afresh). Both ends chunk with the same average size, so a chunk that did not change has the same
  hash on both, wherever an insertion or a removal moved it. A requestor chunking its old copy can
  have it copied into the new partial at the same offsets meanwhile (`copy_to`), handed to the disk as
  it goes: whatever of the new file lies where it was in the old one (all of it before the first
  insertion or removal) is then on its way to the disk while both ends still chunk, instead of
  waiting for the build.
- `copy_ranges`: ranges of the old copy into the new file, in the kernel (copy_file_range) where it
  can, the old copy checked unchanged before and after.
- `write_ranges`: received pieces, each checked against the hash the provider's list gave it before
  any is written.
- `build_file`: the same copy, once every fetched piece is written, with the new file read back and
  hashed whole in order right behind it by a second thread, and written out to the disk as it goes,
  then synced: the copy, the hash and the disk's work at once, where they took turns.
- `blake3_file`: a whole file's BLAKE3, with threads.

The chunk list is one 36-byte record per chunk, in file order: its length (4 bytes, little-endian)
and its BLAKE3 digest (32 bytes); offsets are the running sum of the lengths.
"""
from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import blake3
from pyfastcdc import FastCDC

from host import fsutil

RECORD = struct.Struct("<I32s")
MIN_AVG, MAX_AVG = 4096, 1 << 20     # the averages a caller may ask for (FastCDC takes 256 to 4 MiB)
CACHE_BYTES = 64 << 20                # chunk lists kept in memory, in all
MAX_CHUNKS = 1 << 18                  # a longer list is refused unread (it travels as one message; ft_delta's bound)
MAX_FILE = 8 << 30                    # the biggest file CopyRanges and WriteRanges build (ft_protocol.DELTA_MAX)
DIGESTS = 1024                        # whole-file hashes kept by stamp
COPY_PIECE = 4 << 20                  # bytes per copy_file_range call
READ_PIECE = 16 << 20                 # bytes read at a time for a whole file's hash
BUILD_PIECE = 8 << 20                 # bytes per copy, and per read back to hash, of build_file
WRITE_BEHIND = 64 << 20               # build_file starts the disk's writing of each such stretch behind it
PRECOPY_STEP = 16 << 20               # chunk_and_copy copies this much at a time, behind its reader
PRECOPY_LAG = 8                       # ... and stops copying when that many steps are queued
FLUSH_QUEUE = 16                      # write-behind hints queued at most (each holds a file descriptor)
_KERNEL_COPY = hasattr(os, "copy_file_range")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)

_cache: OrderedDict = OrderedDict()   # (stamp, avg) -> (records, whole hex)
_cache_bytes = 0
_cache_lock = threading.Lock()
_digests: OrderedDict = OrderedDict()   # stamp -> whole-file BLAKE3 hex (under _cache_lock)


class DeltaError(Exception):
    """A refusal or a failure, said plainly."""


def stamp_of(st: os.stat_result) -> str:
    """The same token as the VFS's Metadata `stamp`."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def open_regular(real: str, flags: int = os.O_RDONLY) -> int:
    fd = os.open(real, flags | _NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DeltaError("not a regular file")
    return fd


def _cached(key: tuple):
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
        return hit


def _remember(key: tuple, value: tuple) -> None:
    global _cache_bytes
    size = len(value[0])
    if size > CACHE_BYTES // 4:
        return
    with _cache_lock:
        if key in _cache:   # kept, or given the whole file's hash it lacked
            _cache_bytes -= len(_cache.pop(key)[0])
        _cache[key] = value
        _cache_bytes += size
        while _cache_bytes > CACHE_BYTES:
            _, old = _cache.popitem(last=False)
            _cache_bytes -= len(old[0])


def forget(stamp: str) -> None:
    """Drop the lists (at every average) and the hash kept for `stamp`: after a failure a stale one
    could explain (coarse timestamps; a same-size rewrite in place)."""
    global _cache_bytes
    with _cache_lock:
        for key in [k for k in _cache if k[0] == stamp]:
            _cache_bytes -= len(_cache.pop(key)[0])
        _digests.pop(stamp, None)


class _Reader:
    """The file from its start, read with pread (for FastCDC's stream cutter): the file is read
    through a small buffer, not mapped, so its pages never count in the node's memory. With `whole`
    (a hasher) each read is hashed too: the whole file's hash from the same pass as the chunks."""

    def __init__(self, fd: int, whole=None, copy=None):
        self.fd, self.pos, self.whole, self.copy = fd, 0, whole, copy

    def readinto(self, buf) -> int:
        n = os.preadv(self.fd, [buf], self.pos)
        if self.whole is not None and n > 0:
            self.whole.update(buf[:n])
        self.pos += n
        if self.copy is not None:
            self.copy.read_to(self.pos)
        return n


class _Precopy:
    """The old copy's bytes copied into another file at the same offsets, up to `limit`, by a thread
    trailing the chunker's reads (the pages are still cached), each WRITE_BEHIND stretch then handed to
    the disk by another thread that nobody waits for (a busy disk must not stall the chunking). A copy
    that fails (a full disk) stops the copying, not the chunking, and so does a copier PRECOPY_LAG
    steps behind the reader: what was copied before counts, the build copies the rest."""

    def __init__(self, src: int, dst: int, limit: int):
        self.src, self.dst, self.limit = src, dst, limit
        self.sent = self.copied = self.behind = 0
        self.failed = self.stopped = False
        self.copier = ThreadPoolExecutor(1, thread_name_prefix="vfs-precopy")

    def read_to(self, pos: int) -> None:
        pos = min(pos, self.limit)
        if self.failed or self.stopped or not (pos - self.sent >= PRECOPY_STEP or self.sent < pos == self.limit):
            return
        if self.sent - self.copied >= PRECOPY_LAG * PRECOPY_STEP:
            self.stopped = True    # the disk is slower than the reading: the build copies the rest
            return
        self.copier.submit(self._copy, self.sent, pos - self.sent)
        self.sent = pos

    def _copy(self, at: int, n: int) -> None:
        if self.failed:
            return
        try:
            done = 0
            while done < n:
                got = os.copy_file_range(self.src, self.dst, n - done, at + done, at + done)
                if got <= 0:
                    raise OSError(errno.EIO, "the old copy ended early")
                done += got
        except OSError:
            self.failed = True
            return
        self.copied = at + n
        if self.copied - self.behind >= WRITE_BEHIND or self.copied == self.limit:
            _flush_later(self.dst, self.behind, self.copied - self.behind)
            self.behind = self.copied

    def finish(self) -> int:
        """The chunking is done: wait for the copies queued (PRECOPY_LAG steps at most, so a slow disk
        holds up the answer little): -> bytes copied, from 0."""
        self.copier.shutdown(wait=True)
        return self.copied

    def close(self) -> None:
        """No copy runs on after this (the caller closes the files)."""
        self.copier.shutdown(wait=True, cancel_futures=True)


def _known_digest(stamp: str) -> str | None:
    with _cache_lock:
        hit = _digests.get(stamp)
        if hit is not None:
            _digests.move_to_end(stamp)
        return hit


def _note_digest(stamp: str, digest: str) -> None:
    with _cache_lock:
        _digests[stamp] = digest
        _digests.move_to_end(stamp)
        while len(_digests) > DIGESTS:
            _digests.popitem(last=False)


def _hash(fd: int, size: int) -> str:
    """BLAKE3 of the file's first `size` bytes, read READ_PIECE at a time, hashed with threads."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    view = memoryview(bytearray(min(READ_PIECE, max(size, 1))))
    pos = 0
    while pos < size:
        n = os.preadv(fd, [view[:min(READ_PIECE, size - pos)]], pos)
        if n <= 0:
            raise DeltaError("the file ended early while it was being hashed")
        h.update(view[:n])
        pos += n
    return h.hexdigest()


def chunk_list(fd: int, avg: int, whole: bool = True) -> tuple:
    """-> (records, whole-file BLAKE3 hex or None without `whole`, stamp, size) of the open file `fd`."""
    records, digest, stamp, size, _ = _chunk(fd, avg, whole, None, 0)
    return records, digest, stamp, size


def chunk_and_copy(fd: int, avg: int, copy_to: int, copy_limit: int) -> tuple:
    """chunk_list without the whole-file hash, the bytes read copied meanwhile into `copy_to` (open for
    writing) at the same offsets, up to `copy_limit`: -> (records, stamp, size, bytes copied). Nothing
    is copied when the list was kept (nothing was read)."""
    records, _, stamp, size, copied = _chunk(fd, avg, False, copy_to, copy_limit)
    return records, stamp, size, copied


def _chunk(fd: int, avg: int, whole: bool, copy_to: int | None, copy_limit: int) -> tuple:
    if not MIN_AVG <= avg <= MAX_AVG:
        raise DeltaError(f"the average chunk size must be between {MIN_AVG} and {MAX_AVG}")
    before = os.fstat(fd)
    stamp = stamp_of(before)
    # every chunk but the last is at least min_size: the most the list can hold, known before any read
    min_size = avg * 3 // 4
    bound = before.st_size // min_size + 1
    if bound > MAX_CHUNKS:
        raise DeltaError(f"a file of {before.st_size} bytes is too big for chunks of average size {avg} "
                         f"(over {MAX_CHUNKS} chunks)")
    hit = _cached((stamp, avg))
    if hit is not None and (hit[1] is not None or not whole):
        return hit[0], hit[1], stamp, before.st_size, 0   # nothing read, so nothing copied meanwhile
    limit = min(copy_limit, before.st_size)
    copy = _Precopy(fd, copy_to, limit) if copy_to is not None and limit > 0 and _KERNEL_COPY else None
    buf = bytearray(bound * RECORD.size)
    n = 0
    digest = _known_digest(stamp) if whole else None
    copied = 0
    # the whole file's hash, if wanted and not known, from the same read as the chunks (one pass, not two)
    reader = _Reader(fd, blake3.blake3() if whole and digest is None else None, copy)
    try:
        for c in FastCDC(avg, min_size=min_size, max_size=avg * 4).cut_stream(reader):
            if n == bound:
                raise DeltaError("the file changed while it was being chunked")
            RECORD.pack_into(buf, n * RECORD.size, c.length, blake3.blake3(c.data).digest())
            n += 1
        if copy is not None:
            copied = copy.finish()
    finally:
        if copy is not None:
            copy.close()
    records = bytes(memoryview(buf)[:n * RECORD.size])
    del buf
    if reader.whole is not None:
        if reader.pos != before.st_size:
            raise DeltaError("the file changed while it was being chunked")
        digest = reader.whole.hexdigest()
    if stamp_of(os.fstat(fd)) != stamp:
        raise DeltaError("the file changed while it was being chunked")
    _remember((stamp, avg), (records, digest))
    if digest is not None:
        _note_digest(stamp, digest)
    return records, digest, stamp, before.st_size, copied


def blake3_file(fd: int, sync: bool = False, want_stamp: str | None = None) -> str:
    """The file's BLAKE3; with `sync`, an fsync runs meanwhile (the disk's work beside the CPU's); with
    `want_stamp`, the file must have it before and after, and its hash is kept by that stamp (a
    requestor answering that it wants nothing must not make the provider read the file again)."""
    if want_stamp is not None and stamp_of(os.fstat(fd)) != want_stamp:
        raise DeltaError("the file changed since it was opened")
    if want_stamp is not None and not sync:
        known = _known_digest(want_stamp)
        if known is not None:
            return known
    failed: list = []

    def flush() -> None:
        try:
            os.fsync(fd)
        except OSError as e:
            failed.append(e)
    syncing = threading.Thread(target=flush, name="vfs-fsync") if sync else None
    if syncing is not None:
        syncing.start()
    try:
        digest = _hash(fd, os.fstat(fd).st_size)
    finally:
        if syncing is not None:
            syncing.join()
    if failed:
        raise failed[0]
    if want_stamp is not None and stamp_of(os.fstat(fd)) != want_stamp:
        raise DeltaError("the file changed while it was being hashed")
    if want_stamp is not None:
        _note_digest(want_stamp, digest)
    return digest


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_size(size) -> None:
    if not (_int(size) and size <= MAX_FILE):
        raise DeltaError(f"the new file's size must be an integer from 0 to {MAX_FILE}")


def _in_order(at: int, n: int, end: int, size: int) -> int:
    """The range [at, at + n) of the new file comes after `end` and within `size`: -> its end. So one
    message writes at most `size` bytes, and no sparse giant."""
    if at < end:
        raise DeltaError(f"the ranges must be in order and must not overlap (the range at {at} starts before {end})")
    if at + n > size:
        raise DeltaError(f"the range at {at} of {n} bytes passes the new file's size ({size} bytes)")
    return at + n


def _copy_plan(src: int, items: list, want_stamp: str, size: int) -> list:
    """The checked (src offset, dst offset, length) ranges of a CopyRanges: `src` still has
    `want_stamp`, each range lies within it, and the destinations are in order, apart, within `size`."""
    _check_size(size)
    if stamp_of(os.fstat(src)) != want_stamp:
        raise DeltaError("the old copy changed since it was chunked")
    old_size = os.fstat(src).st_size
    plan = []
    end = 0
    for item in items:
        if not (isinstance(item, list) and len(item) == 3 and all(_int(v) for v in item)):
            raise DeltaError("CopyRanges items are [source offset, destination offset, length]")
        s, d, n = item
        if s + n > old_size:
            raise DeltaError(f"the range at {s} of {n} bytes passes the old copy's end ({old_size} bytes)")
        end = _in_order(d, n, end, size)
        plan.append((s, d, n))
    return plan


def copy_ranges(src: int, dst: int, items: list, want_stamp: str, size: int) -> int:
    """Copy [src offset, dst offset, length] ranges from `src` (which must have `want_stamp`
    throughout) into `dst`, whose ranges are in order, apart, and within `size`. -> bytes copied."""
    plan = _copy_plan(src, items, want_stamp, size)
    total = 0
    kernel = hasattr(os, "copy_file_range")
    for s, d, n in plan:
        done = 0
        while done < n:
            step = min(COPY_PIECE, n - done)
            got = 0
            if kernel:
                try:
                    got = os.copy_file_range(src, dst, step, s + done, d + done)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                        raise
                    kernel = False    # another filesystem, or none here: through user space
            if not kernel:
                data = os.pread(src, min(step, 8 << 20), s + done)
                fsutil.pwrite_all(dst, data, d + done)
                got = len(data)
            if got <= 0:
                raise DeltaError("the old copy ended early while being copied")
            done += got
        total += n
    if stamp_of(os.fstat(src)) != want_stamp:
        raise DeltaError("the old copy changed while it was being copied")
    return total


def write_ranges(dst: int, items: list, data: bytes, size: int) -> int:
    """Check every [offset, length, blake3] piece of `data` (back to back; in order, apart, within
    `size`), then write them all. A piece that fails its check raises before anything is written.
    -> bytes written."""
    _check_size(size)
    plan = []
    view = memoryview(data)
    pos = end = 0
    for item in items:
        if not (isinstance(item, list) and len(item) == 3 and _int(item[0]) and _int(item[1])
                and isinstance(item[2], str)):
            raise DeltaError("WriteRanges items are [offset, length, blake3]")
        offset, length, digest = item
        end = _in_order(offset, length, end, size)
        piece = view[pos:pos + length]
        if len(piece) != length:
            raise DeltaError(f"the data is shorter than its pieces ({len(data)} bytes)")
        if blake3.blake3(piece).hexdigest() != digest:
            raise DeltaError(f"the piece at offset {offset} ({length} bytes) failed its integrity check")
        plan.append((offset, piece))
        pos += length
    if pos != len(data):
        raise DeltaError(f"the data is longer than its pieces ({len(data)} bytes, pieces {pos})")
    for offset, piece in plan:
        fsutil.pwrite_all(dst, piece, offset)
    return pos


def _libc_sync_file_range():
    try:
        import ctypes
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):
        return None


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2   # start writing the range's dirty pages out; do not wait


def _write_behind(fd: int, start: int, n: int) -> None:
    """Start the disk's work on what was written, while the copy goes on (the fsync at the end then
    waits for less); a hint only, where the system has it."""
    if _sync_file_range is not None and n > 0:
        _sync_file_range(fd, start, n, _SYNC_FILE_RANGE_WRITE)


_flusher = ThreadPoolExecutor(1, thread_name_prefix="vfs-flush")
_flush_lock = threading.Lock()
_flushes = 0          # queued for _flusher, each holding a duplicate file descriptor


def _flush_later(fd: int, start: int, n: int) -> None:
    """_write_behind on a duplicate of `fd`, in a thread of its own: started, never waited for. Only a
    hint: with FLUSH_QUEUE already queued (a slow disk, many copies at once) it is skipped."""
    global _flushes
    if _sync_file_range is None or n <= 0:
        return
    with _flush_lock:
        if _flushes >= FLUSH_QUEUE:
            return
        _flushes += 1
    try:
        dup = os.dup(fd)
    except OSError:     # out of descriptors: no hint
        with _flush_lock:
            _flushes -= 1
        return

    def run() -> None:
        global _flushes
        try:
            _write_behind(dup, start, n)
        finally:
            os.close(dup)
            with _flush_lock:
                _flushes -= 1
    try:
        _flusher.submit(run)
    except RuntimeError:    # the interpreter is shutting down: no hint
        os.close(dup)
        with _flush_lock:
            _flushes -= 1


def build_file(src: int, dst: int, items: list, want_stamp: str, size: int, in_place: int = 0) -> str:
    """Copy [src offset, dst offset, length] ranges from `src` (which must have `want_stamp`
    throughout) into `dst`, as copy_ranges does, once the rest of `dst` (the fetched pieces) is
    written; meanwhile a second thread reads `dst` back in order right behind the copy and hashes it,
    and the disk writes each stretch out behind; then fsync. -> the BLAKE3 of the `size` bytes read
    back from `dst` after they were written (a range never written reads as zeros, or short).
    `in_place`: `dst`'s first bytes hold `src`'s (chunk_and_copy put them there): a range copied to
    where it was is not copied again below that. Whatever was claimed, the hash is of what is read back."""
    plan = _copy_plan(src, items, want_stamp, size)
    h = blake3.blake3()
    buf = memoryview(bytearray(min(BUILD_PIECE, max(size, 1))))

    def hash_back(at: int, n: int) -> None:
        """Read [at, at + n) of the new file back and hash it (in order: one thread does all)."""
        done = 0
        while done < n:
            got = os.preadv(dst, [buf[:min(len(buf), n - done)]], at + done)
            if got <= 0:
                raise DeltaError(f"the new file ends at {at + done} bytes, before its size {size}")
            h.update(buf[:got])
            done += got
    kernel = hasattr(os, "copy_file_range")
    behind = 0     # the new file's bytes below this were handed to the disk
    pos = 0        # the new file's bytes below this are written, or were there before
    # the copy in this thread (in the kernel where it can), the read-back and hash in another
    with ThreadPoolExecutor(1, thread_name_prefix="vfs-build-hash") as hasher:
        hashed: list = []
        for s, d, n in plan + [(0, size, 0)]:
            if d > pos:                                   # a fetched piece (or several), written already
                hashed.append(hasher.submit(hash_back, pos, d - pos))
            done = 0
            if s == d and s < in_place:                    # there already
                done = min(n, in_place - s)
                hashed.append(hasher.submit(hash_back, d, done))
                behind = max(behind, d + done)
            while done < n:
                step = min(BUILD_PIECE, n - done)
                got = 0
                if kernel:
                    try:
                        got = os.copy_file_range(src, dst, step, s + done, d + done)
                    except OSError as e:
                        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                            raise
                        kernel = False
                if not kernel:
                    data = os.pread(src, step, s + done)
                    fsutil.pwrite_all(dst, data, d + done)
                    got = len(data)
                if got <= 0:
                    raise DeltaError("the old copy ended early while being copied")
                hashed.append(hasher.submit(hash_back, d + done, got))
                done += got
                if d + done - behind >= WRITE_BEHIND:
                    _write_behind(dst, behind, d + done - behind)
                    behind = d + done
            pos = max(pos, d + n)
            if hashed and hashed[0].done():              # surface a failed read-back early
                hashed.pop(0).result()
        if stamp_of(os.fstat(src)) != want_stamp:
            raise DeltaError("the old copy changed while it was being copied")
        os.fsync(dst)                                     # while the last of the hashing runs
        for f in hashed:
            f.result()
    if os.fstat(dst).st_size != size:
        raise DeltaError(f"the new file is {os.fstat(dst).st_size} bytes, not {size}")
    return h.hexdigest()
