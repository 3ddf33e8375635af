"""The node's networking identity: an X25519 keypair kept in HOME/.keys."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from host import fsutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """The node's networking keypair (raw X25519 bytes)."""
    private: bytes = field(repr=False)
    public: bytes


def _public_of(private: bytes) -> bytes:
    key = x25519.X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_or_create_identity(home: Path) -> Identity:
    """Load ``home/.keys/networking.key`` (32 raw private bytes), creating it on first use.

    The directory is kept at mode 0700 and the file at 0600. Creation is atomic and exclusive, so
    two processes starting on one home at once end up with the same key.
    """
    keys = Path(home) / ".keys"
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(keys, 0o700)
    path = keys / "networking.key"
    if not path.exists():
        private = x25519.X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())
        if fsutil.create_atomic(path, private, fsync=True, mode=0o600):  # else a racing process made it: use its key
            log.info("created networking key %s", path)
    mode = path.stat().st_mode & 0o777
    if mode != 0o600:
        log.warning("networking key %s had mode %o; setting 0600", path, mode)
        os.chmod(path, 0o600)
    private = path.read_bytes()
    if len(private) != 32:
        raise ValueError(f"{path}: expected 32 raw bytes of X25519 private key, found {len(private)}")
    return Identity(private, _public_of(private))

