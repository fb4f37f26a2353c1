"""The archive container: an uncompressed POSIX tar, read and written in one pass.

Uncompressed because the database is already encrypted (incompressible) and blobs are
end-to-end-encrypted ciphertext: compression would cost CPU and win nothing. Members are
hashed while they stream, and `manifest.json` goes last.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qpq_ops.backup.age import AGE_SUFFIX, AgeReader
from qpq_ops.backup.layout import safe_member_path
from qpq_ops.backup.manifest import MANIFEST_NAME, Manifest
from qpq_ops.errors import ArchiveDamaged, Refused

__all__ = ["ArchiveWriter", "ExtractedMember", "extract_archive", "is_encrypted",
           "read_manifest"]

ProgressFn = Callable[[int], None]
_CHUNK = 1 << 20


class _HashingReader(io.RawIOBase):
    """Wrap a file: every read feeds sha256 and reports progress."""

    def __init__(self, fh: BinaryIO, progress: ProgressFn | None) -> None:
        self._fh = fh
        self._progress = progress
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self.digest.update(data)
        if self._progress is not None and data:
            self._progress(len(data))
        return data


class ArchiveWriter:
    """Append files to a tar, returning (size, sha256) for each."""

    def __init__(self, fh: BinaryIO | io.RawIOBase) -> None:
        # 1 MiB copies: fewer Python-level hash/progress calls than tarfile's 16 KiB.
        self._tar = tarfile.TarFile(
            fileobj=fh, mode="w", format=tarfile.PAX_FORMAT,  # type: ignore[arg-type]
            copybufsize=_CHUNK)

    def add_file(self, name: str, path: Path, progress: ProgressFn | None = None,
                 ) -> tuple[int, str]:
        with path.open("rb") as src:
            size = os.fstat(src.fileno()).st_size
            info = self._info(name, size)
            reader = _HashingReader(src, progress)
            self._tar.addfile(info, reader)  # type: ignore[arg-type]
        return size, reader.digest.hexdigest()

    def add_bytes(self, name: str, data: bytes) -> None:
        self._tar.addfile(self._info(name, len(data)), io.BytesIO(data))

    @staticmethod
    def _info(name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o600
        info.mtime = int(time.time())
        return info

    def close(self) -> None:
        self._tar.close()


@dataclass(frozen=True)
class ExtractedMember:
    name: str
    path: Path
    size: int
    sha256: str


def is_encrypted(archive: Path) -> bool:
    return archive.name.endswith(AGE_SUFFIX)


@contextmanager
def _open_tar(archive: Path, identities: Sequence[X25519PrivateKey] = (),
              ) -> Iterator[tarfile.TarFile]:
    """The archive's tar; an `.age` archive is decrypted as it streams (sequential only)."""
    if is_encrypted(archive) and not identities:
        raise Refused(f"{archive.name} is encrypted (age): pass --identity FILE")
    try:
        raw = archive.open("rb")
    except FileNotFoundError:
        raise Refused(f"archive not found: {archive}") from None
    except OSError as exc:
        raise Refused(f"cannot read {archive}: {exc.strerror}") from None
    try:
        if is_encrypted(archive):
            stream = io.BufferedReader(AgeReader(raw, list(identities)), _CHUNK)
            tar = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115 (closed below)
        else:
            tar = tarfile.open(fileobj=raw, mode="r:")  # noqa: SIM115 (closed below)
    except (tarfile.TarError, OSError) as exc:
        raw.close()
        raise ArchiveDamaged(f"{archive.name} is not a readable qpq backup "
                             f"(truncated or not a tar archive): {exc}") from None
    except BaseException:
        raw.close()
        raise
    try:
        yield tar
    finally:
        tar.close()
        raw.close()


def extract_archive(archive: Path, dest: Path, progress: ProgressFn | None = None,
                    identities: Sequence[X25519PrivateKey] = (),
                    ) -> tuple[Manifest, list[ExtractedMember]]:
    """Stream every member into `dest/<name>` (hashing it) and parse the manifest.

    Refuses unsafe paths and non-regular members. Does not compare with the manifest:
    `verify` does that, so that it can report every problem at once.
    """
    members: list[ExtractedMember] = []
    manifest_raw: bytes | None = None
    with _open_tar(archive, identities) as tar:
        try:
            for info in tar:
                if not info.isfile():
                    raise ArchiveDamaged(f"archive member {info.name!r} is not a regular file")
                src = tar.extractfile(info)
                assert src is not None
                if info.name == MANIFEST_NAME:
                    manifest_raw = src.read()
                    continue
                rel = safe_member_path(info.name)
                target = dest.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                digest = hashlib.sha256()
                size = 0
                with target.open("xb") as out:
                    os.fchmod(out.fileno(), 0o600)
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                        if progress is not None:
                            progress(len(chunk))
                if size != info.size:
                    raise ArchiveDamaged(f"archive is truncated inside member {info.name!r}")
                members.append(ExtractedMember(info.name, target, size, digest.hexdigest()))
        except FileExistsError as exc:
            raise ArchiveDamaged(f"archive holds member {exc.filename} twice") from None
        except (tarfile.TarError, EOFError) as exc:
            raise ArchiveDamaged(f"{archive.name} is truncated or damaged: {exc}") from None
    if manifest_raw is None:
        raise ArchiveDamaged(f"{archive.name} has no manifest.json (truncated archive?)")
    return Manifest.from_json(manifest_raw), members


def read_manifest(archive: Path, identities: Sequence[X25519PrivateKey] = ()) -> Manifest:
    """Only the manifest: a plain archive is skipped over (seeks), an encrypted one read."""
    with _open_tar(archive, identities) as tar:
        try:
            raw = None
            for info in tar:
                if info.name == MANIFEST_NAME:
                    src = tar.extractfile(info)
                    raw = src.read() if src is not None else b""
            if raw is None:
                raise ArchiveDamaged(f"{archive.name} has no manifest.json")
        except (tarfile.TarError, EOFError) as exc:
            raise ArchiveDamaged(f"{archive.name} is truncated or damaged: {exc}") from None
    return Manifest.from_json(raw)
