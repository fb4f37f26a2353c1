"""The client library's errors, under the server's `QpqError` so callers catch one base.

    QpqError
    ├── ClientError              a request failed (`code`: the server's stable code)
    │   └── KtViolation          the key-transparency log failed verification
    ├── DecryptError             an envelope is malformed, not for us, or tampered with
    └── FileDecryptError         an attachment is truncated, tampered with, or not ours
"""

from __future__ import annotations

from qpq_server.errors import QpqError

__all__ = ["ClientError", "DecryptError", "FileDecryptError", "KtViolation"]


class ClientError(QpqError):
    """A request failed: `code` is the server's stable error code (or a client one)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class KtViolation(ClientError):
    """The server's key-transparency log failed verification (possible attack)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, "SECURITY: " + message)


class DecryptError(QpqError):
    """The envelope is malformed, not for us, or was tampered with."""

    code = "undecryptable"


class FileDecryptError(QpqError):
    """The attachment is truncated, tampered with, or not for this key."""

    code = "file_undecryptable"
