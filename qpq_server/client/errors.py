"""The client library's errors, under the server's `QpqError` so callers catch one base.

    QpqError
    ├── ClientError              a request failed (`code`: the server's stable code)
    │   └── KtViolation          the key-transparency log failed verification
    │       └── IdentityChanged  a contact's key differs from the one pinned
    ├── DecryptError             an envelope is malformed, not for us, or tampered with
    │   └── ForgedSender         not sealed with the claimed sender's identity key
    └── FileDecryptError         an attachment is truncated, tampered with, or not ours
"""

from __future__ import annotations

from qpq_server.errors import QpqError

__all__ = ["ClientError", "DecryptError", "FileDecryptError", "ForgedSender",
           "IdentityChanged", "KtViolation"]


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


class IdentityChanged(KtViolation):
    """A contact's identity key is not the one pinned in the profile: nothing is sent
    to it (or accepted from it) until the user runs `qpq-client trust USER`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


class DecryptError(QpqError):
    """The envelope is malformed, not for us, or was tampered with."""

    code = "undecryptable"


class ForgedSender(DecryptError):
    """The envelope does not authenticate under the claimed sender's identity key."""

    code = "forged_sender"


class FileDecryptError(QpqError):
    """The attachment is truncated, tampered with, or not for this key."""

    code = "file_undecryptable"
