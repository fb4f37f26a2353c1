"""End-to-end encryption of attachments, streamed: no file is ever held whole in memory.

Format: MAGIC (5 bytes) || nonce prefix (7 bytes), then the plaintext in 64 KiB
segments, each sealed with ChaCha20-Poly1305 under a fresh random file key; segment
i's nonce is prefix || i (4 bytes) || last-flag (1 byte), so segments cannot be
reordered, dropped or cut off at the end without failing authentication (the STREAM
construction). The file key travels inside the end-to-end-encrypted message; the
server stores only the ciphertext, named by its SHA-256.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from qpq_server.client.errors import FileDecryptError

__all__ = ["EncryptedFile", "FileDecryptError", "decrypt_stream", "encrypt_stream"]

MAGIC = b"QPQF1"
SEGMENT = 64 * 1024
_TAG = 16
_PREFIX = 7


@dataclass(frozen=True)
class EncryptedFile:
    key: bytes
    sha256: bytes  # of the ciphertext: the blob id
    size: int  # ciphertext bytes
    plain_size: int


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def encrypt_stream(src: BinaryIO, dst: BinaryIO) -> EncryptedFile:
    key = ChaCha20Poly1305.generate_key()
    aead = ChaCha20Poly1305(key)
    prefix = os.urandom(_PREFIX)
    digest = hashes.Hash(hashes.SHA256())
    header = MAGIC + prefix
    dst.write(header)
    digest.update(header)
    size, plain_size, index = len(header), 0, 0
    segment = src.read(SEGMENT)
    while True:
        following = src.read(SEGMENT) if len(segment) == SEGMENT else b""
        last = not following
        sealed = aead.encrypt(_nonce(prefix, index, last), segment, MAGIC)
        dst.write(sealed)
        digest.update(sealed)
        size += len(sealed)
        plain_size += len(segment)
        if last:
            break
        segment, index = following, index + 1
    return EncryptedFile(key, digest.finalize(), size, plain_size)


def decrypt_stream(src: BinaryIO, key: bytes, dst: BinaryIO) -> int:
    """Decrypt to dst; return the plaintext size. Raise FileDecryptError on any fault."""
    header = src.read(len(MAGIC) + _PREFIX)
    if len(header) != len(MAGIC) + _PREFIX or not header.startswith(MAGIC):
        raise FileDecryptError("not a qpq attachment")
    prefix = header[len(MAGIC):]
    aead = ChaCha20Poly1305(key)
    plain_size, index = 0, 0
    sealed = src.read(SEGMENT + _TAG)
    while True:
        following = src.read(SEGMENT + _TAG) if len(sealed) == SEGMENT + _TAG else b""
        last = not following
        try:
            segment = aead.decrypt(_nonce(prefix, index, last), sealed, MAGIC)
        except (InvalidTag, ValueError):
            raise FileDecryptError("attachment failed authentication (tampered or cut "
                                   "short)") from None
        dst.write(segment)
        plain_size += len(segment)
        if last:
            return plain_size
        sealed, index = following, index + 1
