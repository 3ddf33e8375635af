"""The plain-socket reference for bench/throughput.py: one file over one TCP connection, no
encryption, no hash. The receiver takes an 8-byte length, then that many raw bytes into a file, and
fsyncs it at the end, as our download does.

    plainsock.py recv DEST          # listens on 127.0.0.1, prints its port, receives one file
    plainsock.py send PORT SRC      # sends SRC to 127.0.0.1:PORT
"""
from __future__ import annotations

import os
import socket
import struct
import sys

BLOCK = 1 << 20
_LEN = struct.Struct(">Q")


def recv(dest: str) -> int:
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
        while left:
            n = conn.recv_into(mv[:min(BLOCK, left)])
            if n == 0:
                raise SystemExit(f"closed with {left} bytes to go")
            f.write(mv[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return 0


def send(port: int, src: str) -> int:
    with open(src, "rb", buffering=0) as f, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(_LEN.pack(os.fstat(f.fileno()).st_size))
        buf = bytearray(BLOCK)
        mv = memoryview(buf)
        while n := f.readinto(buf):
            s.sendall(mv[:n])
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "recv":
        sys.exit(recv(sys.argv[2]))
    if len(sys.argv) == 4 and sys.argv[1] == "send":
        sys.exit(send(int(sys.argv[2]), sys.argv[3]))
    sys.exit(__doc__)
