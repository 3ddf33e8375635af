"""The plain-socket reference for bench/throughput.py: one file over one TCP connection, no
encryption, no hash. The receiver takes an 8-byte length, then that many raw bytes into a file, and
fsyncs it at the end, as our download does.

    plainsock.py recv DEST          # listens on 127.0.0.1, prints its port, receives one file
    plainsock.py send PORT SRC      # sends SRC to 127.0.0.1:PORT

With `--sealed` (on both ends) it also does the work our download may not drop, and nothing else:
AES-256-GCM in frames of the size our transport uses (encrypted by the sender, decrypted by the
receiver) and a BLAKE3 of the bytes on each end (each prints its digest). Its CPU is the least any
transfer that keeps encryption and hashing on both ends can spend with these libraries.
"""
from __future__ import annotations

import os
import socket
import struct
import sys

import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

BLOCK = 1 << 20
_LEN = struct.Struct(">Q")
FRAME = 65535 - 16             # plaintext per frame, as host/net/noise.py's CHUNK
GROUP = 16                     # frames per read and write
KEY = bytes(range(32))         # a benchmark's key: the cost is the same for any
_NONCE = struct.Struct(">4xQ")


def recv_sealed(conn: socket.socket, f, left: int) -> str:
    dec, h = AESGCM(KEY), blake3.blake3()
    ct = bytearray(GROUP * (FRAME + 16))
    pt = bytearray(GROUP * FRAME)
    cmv, pmv = memoryview(ct), memoryview(pt)
    n = 0
    while left:
        plain = min(left, GROUP * FRAME)
        frames = -(-plain // FRAME)
        want = plain + 16 * frames
        have = 0
        while have < want:
            got = conn.recv_into(cmv[have:want])
            if got == 0:
                raise SystemExit(f"closed with {left} bytes to go")
            have += got
        at = 0
        for i in range(frames):
            size = min(FRAME, plain - i * FRAME)
            dec.decrypt_into(_NONCE.pack(n), cmv[at:at + size + 16], None, pmv[i * FRAME:i * FRAME + size])
            at += size + 16
            n += 1
        h.update(pmv[:plain])
        f.write(pmv[:plain])
        left -= plain
    return h.hexdigest()


def send_sealed(s: socket.socket, f) -> str:
    enc, h = AESGCM(KEY), blake3.blake3()
    pt = bytearray(GROUP * FRAME)
    ct = bytearray(GROUP * (FRAME + 16))
    pmv, cmv = memoryview(pt), memoryview(ct)
    n = 0
    while plain := f.readinto(pt):
        h.update(pmv[:plain])
        at = 0
        for i in range(-(-plain // FRAME)):
            size = min(FRAME, plain - i * FRAME)
            enc.encrypt_into(_NONCE.pack(n), pmv[i * FRAME:i * FRAME + size], None, cmv[at:at + size + 16])
            at += size + 16
            n += 1
        s.sendall(cmv[:at])
    return h.hexdigest()


def recv(dest: str, sealed: bool = False) -> int:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        print(srv.getsockname()[1], flush=True)
        conn, _ = srv.accept()
    buf = bytearray(BLOCK)
    mv = memoryview(buf)
    with conn, open(dest, "wb") as f:
        head = b""
        while len(head) < _LEN.size:
            more = conn.recv(_LEN.size - len(head))
            if not more:
                raise SystemExit("closed before the length")
            head += more
        left = _LEN.unpack(head)[0]
        if sealed:
            digest = recv_sealed(conn, f, left)
            left = 0
        while left:
            n = conn.recv_into(mv[:min(BLOCK, left)])
            if n == 0:
                raise SystemExit(f"closed with {left} bytes to go")
            f.write(mv[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    if sealed:
        print(digest, flush=True)
    return 0


def send(port: int, src: str, sealed: bool = False) -> int:
    with open(src, "rb", buffering=0) as f, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(_LEN.pack(os.fstat(f.fileno()).st_size))
        if sealed:
            print(send_sealed(s, f), flush=True)
            return 0
        buf = bytearray(BLOCK)
        mv = memoryview(buf)
        while n := f.readinto(buf):
            s.sendall(mv[:n])
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--sealed"]
    sealed = len(args) < len(sys.argv) - 1
    if len(args) == 2 and args[0] == "recv":
        sys.exit(recv(args[1], sealed))
    if len(args) == 3 and args[0] == "send":
        sys.exit(send(int(args[1]), args[2], sealed))
    sys.exit(__doc__)
