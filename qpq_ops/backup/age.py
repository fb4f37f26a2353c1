"""Streaming encryption to an age recipient (age-encryption.org/v1, X25519 stanzas).

Written from the format specification (C2SP age) with `cryptography` only, so archives
made with `backup create --encrypt-to age1...` decrypt with the standard `age -d -i
KEY` tool, and `verify`/`restore --identity KEY` read archives encrypted by `age -r`.

    header:  "age-encryption.org/v1\\n"
             "-> X25519 " b64(ephemeral share) "\\n" b64(wrapped file key) "\\n"
             "--- " b64(HMAC-SHA256(HKDF(file key, "header"), header up to "---")) "\\n"
    payload: 16-byte nonce, then 64 KiB ChaCha20-Poly1305 chunks (STREAM: 11-byte
             counter + last-chunk flag as the nonce) under HKDF(file key, nonce, "payload")
"""

from __future__ import annotations

import base64
import hmac
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qpq_ops.errors import ArchiveDamaged, Refused, WrongKey

__all__ = ["AGE_SUFFIX", "AgeReader", "AgeWriter", "decode_identity", "decode_recipient",
           "encode_identity", "encode_recipient", "load_identities"]

AGE_SUFFIX = ".age"
_INTRO = b"age-encryption.org/v1\n"
_X25519_INFO = b"age-encryption.org/v1/X25519"
_CHUNK = 64 * 1024
_TAG = 16
_B32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


# -- Bech32 (BIP 173), as age uses it for keys ------------------------------------------
def _polymod(values: Iterable[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= _GEN[i] if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert(data: Iterable[int], from_bits: int, to_bits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out = []
    for value in data:
        acc = (acc << from_bits) | value
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append((acc >> bits) & ((1 << to_bits) - 1))
    if pad and bits:
        out.append((acc << (to_bits - bits)) & ((1 << to_bits) - 1))
    elif not pad and (bits >= from_bits or (acc << (to_bits - bits)) & ((1 << to_bits) - 1)):
        raise ValueError("invalid padding")
    return out


def _bech32_encode(hrp: str, data: bytes) -> str:
    five = _convert(data, 8, 5, True)
    checksum = _polymod([*_hrp_expand(hrp), *five, 0, 0, 0, 0, 0, 0]) ^ 1
    five += [(checksum >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_B32[d] for d in five)


def _bech32_decode(text: str, hrp: str) -> bytes:
    lowered = text.strip().lower()
    sep = lowered.rfind("1")
    if lowered[:sep] != hrp or len(lowered) - sep < 7:
        raise ValueError(f"not an {hrp} key")
    try:
        data = [_B32.index(c) for c in lowered[sep + 1:]]
    except ValueError:
        raise ValueError("invalid character") from None
    if _polymod([*_hrp_expand(hrp), *data]) != 1:
        raise ValueError("bad checksum")
    return bytes(_convert(data[:-6], 5, 8, False))


def encode_recipient(key: X25519PublicKey) -> str:
    return _bech32_encode("age", key.public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw))


def encode_identity(key: X25519PrivateKey) -> str:
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return _bech32_encode("age-secret-key-", raw).upper()


def decode_recipient(text: str) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(_bech32_decode(text, "age"))
    except ValueError as exc:
        raise Refused(f"--encrypt-to {text!r} is not an age X25519 recipient (age1...): "
                      f"{exc}") from None


def decode_identity(text: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(_bech32_decode(text, "age-secret-key-"))


def load_identities(path: Path) -> list[X25519PrivateKey]:
    """An age identity file (`age-keygen` output): AGE-SECRET-KEY-1... lines."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise Refused(f"cannot read identity file {path}: {exc.strerror}") from None
    keys = []
    for line in lines:
        if line.strip().upper().startswith("AGE-SECRET-KEY-1"):
            try:
                keys.append(decode_identity(line))
            except ValueError:
                raise Refused(f"{path}: an AGE-SECRET-KEY line does not decode") from None
    if not keys:
        raise Refused(f"{path} holds no AGE-SECRET-KEY-1... identity")
    return keys


# -- primitives -----------------------------------------------------------------------
def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _stream_nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


# -- writing --------------------------------------------------------------------------
class AgeWriter(io.RawIOBase):
    """A write-only file object: what is written to it lands encrypted in `out`.

    One chunk is held back until `close()`, which encrypts it as the last chunk.
    """

    def __init__(self, out: BinaryIO, recipients: list[X25519PublicKey]) -> None:
        super().__init__()
        self._out = out
        file_key = os.urandom(16)
        header = bytearray(_INTRO)
        for recipient in recipients:
            ephemeral = X25519PrivateKey.generate()
            share = _raw(ephemeral.public_key())
            shared = ephemeral.exchange(recipient)
            wrap = _hkdf(shared, share + _raw(recipient), _X25519_INFO)
            body = ChaCha20Poly1305(wrap).encrypt(bytes(12), file_key, None)
            header += b"-> X25519 " + _b64(share) + b"\n" + _b64(body) + b"\n"
        header += b"---"
        mac = hmac.new(_hkdf(file_key, b"", b"header"), bytes(header), "sha256").digest()
        nonce = os.urandom(16)
        out.write(bytes(header) + b" " + _b64(mac) + b"\n" + nonce)
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._buffer = bytearray()
        self._counter = 0
        self._written = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        """Plaintext bytes written so far (tarfile asks at open)."""
        return self._written

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._written += len(data)
        self._buffer += data
        while len(self._buffer) > _CHUNK:  # keep at least one byte for the last chunk
            chunk = bytes(self._buffer[:_CHUNK])
            del self._buffer[:_CHUNK]
            self._out.write(self._aead.encrypt(_stream_nonce(self._counter, False), chunk,
                                               None))
            self._counter += 1
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._out.write(self._aead.encrypt(_stream_nonce(self._counter, True),
                                               bytes(self._buffer), None))
            self._buffer.clear()
        super().close()


# -- reading --------------------------------------------------------------------------
class AgeReader(io.RawIOBase):
    """A read-only, sequential file object decrypting an age file as it is read."""

    def __init__(self, src: BinaryIO, identities: list[X25519PrivateKey]) -> None:
        super().__init__()
        self._src = src
        file_key = self._unwrap(identities)
        self._pending = b""
        self._counter = 0
        self._done = False
        nonce = src.read(16)
        if len(nonce) != 16:
            raise ArchiveDamaged("age file truncated after its header")
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._next = src.read(_CHUNK + _TAG)

    def _unwrap(self, identities: list[X25519PrivateKey]) -> bytes:
        if self._src.readline() != _INTRO:
            raise ArchiveDamaged("not an age-encrypted file (no age-encryption.org/v1 header)")
        header = bytearray(_INTRO)
        stanzas: list[tuple[bytes, bytes]] = []
        while True:
            line = self._src.readline(4096)
            if line.startswith(b"--- "):
                header += b"---"
                mac = _unb64(line[4:].rstrip(b"\n"))
                break
            if not line.startswith(b"-> "):
                raise ArchiveDamaged("malformed age header")
            header += line
            args = line[3:].rstrip(b"\n").split(b" ")
            body = b""
            while True:  # body lines of 64 columns, ended by a shorter one
                part = self._src.readline(4096)
                header += part
                body += part.rstrip(b"\n")
                if len(part.rstrip(b"\n")) < 64:
                    break
            if args[0] == b"X25519" and len(args) == 2:
                stanzas.append((_unb64(args[1]), _unb64(body)))
        for identity in identities:
            mine = _raw(identity.public_key())
            for share, body in stanzas:
                try:
                    shared = identity.exchange(X25519PublicKey.from_public_bytes(share))
                    wrap = _hkdf(shared, share + mine, _X25519_INFO)
                    file_key = ChaCha20Poly1305(wrap).decrypt(bytes(12), body, None)
                except (InvalidTag, ValueError):
                    continue
                expected = hmac.new(_hkdf(file_key, b"", b"header"), bytes(header),
                                    "sha256").digest()
                if not hmac.compare_digest(expected, mac):
                    raise ArchiveDamaged("age header MAC does not match (tampered header)")
                return file_key
        raise WrongKey("none of the given age identities can decrypt this archive")

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        chunk, self._next = self._next, self._src.read(_CHUNK + _TAG)
        last = not self._next
        if not chunk:
            raise ArchiveDamaged("age payload truncated (no final chunk)")
        try:
            self._pending = self._aead.decrypt(_stream_nonce(self._counter, last), chunk, None)
        except InvalidTag:
            raise ArchiveDamaged("age payload damaged or truncated "
                                 f"(chunk {self._counter} fails authentication)") from None
        self._counter += 1
        self._done = last

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._done:
            self._fill()
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
