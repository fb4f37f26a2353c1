"""The qpq error tree. Every class has a stable string `code`.

    QpqError
    ├── ConfigError              bad or missing configuration / secrets
    ├── StorageError             the database cannot be opened or used
    │   ├── WrongDatabaseKey     SQLCipher key does not open the database
    │   └── StorageUnavailable   the database server is away (also a ServerBusy: the
    │                            client is told to retry, the detail stays in the log)
    └── RequestError             a client request answered with an error
        ├── BadFrame             malformed, truncated or oversize frame
        ├── BadRequest           unknown op, missing field, wrong type
        ├── Unauthenticated      missing/wrong access token
        ├── InvalidSession       missing, tampered or expired session token
        ├── LoginFailed          wrong password or unknown user (indistinguishable)
        ├── UserExists           registration of a taken username
        ├── UnknownUser          enqueue/key fetch for a user that does not exist
        ├── RateLimited          token bucket empty
        ├── TooLarge             payload above a configured limit
        │   └── QuotaExceeded    blob upload beyond the account's quota
        │       └── TooManyDevices  a device beyond the account's bound
        ├── HashMismatch         uploaded blob does not hash to its declared id
        ├── UploadStalled        blob upload stopped sending before it was complete
        ├── NotFound             referenced object does not exist
        │   └── DeviceUnlinked   the device is not (or no longer) one of the account's
        ├── ProofRequired        an identity change without proof of the account
        │   └── LinkRequired     a new device without a link code from an existing one
        ├── ServerBusy           server draining or at a limit
        └── Internal             unexpected failure (details only in the log)

The `code` is used verbatim in wire error responses, in the `code` label of
`qpq_rpc_errors_total` and in logs.
"""

from __future__ import annotations

__all__ = [
    "BadFrame",
    "BadRequest",
    "ConfigError",
    "DeviceUnlinked",
    "HashMismatch",
    "Internal",
    "InvalidSession",
    "LinkRequired",
    "LoginFailed",
    "NotFound",
    "ProofRequired",
    "QpqError",
    "QuotaExceeded",
    "RateLimited",
    "RequestError",
    "ServerBusy",
    "StorageError",
    "StorageUnavailable",
    "TooLarge",
    "TooManyDevices",
    "Unauthenticated",
    "UnknownUser",
    "UploadStalled",
    "UserExists",
    "WrongDatabaseKey",
]


class QpqError(Exception):
    code = "error"


class ConfigError(QpqError):
    code = "config_error"


class StorageError(QpqError):
    code = "storage_error"


class WrongDatabaseKey(StorageError):
    code = "wrong_db_key"


class RequestError(QpqError):
    code = "bad_request"


class BadFrame(RequestError):
    code = "bad_frame"


class BadRequest(RequestError):
    code = "bad_request"


class Unauthenticated(RequestError):
    code = "unauthenticated"


class InvalidSession(RequestError):
    code = "invalid_session"


class LoginFailed(RequestError):
    code = "login_failed"


class UserExists(RequestError):
    code = "user_exists"


class UnknownUser(RequestError):
    code = "unknown_user"


class RateLimited(RequestError):
    code = "rate_limited"


class TooLarge(RequestError):
    code = "too_large"


class QuotaExceeded(TooLarge):
    code = "quota_exceeded"


class HashMismatch(BadRequest):
    code = "hash_mismatch"


class UploadStalled(BadRequest):
    code = "upload_stalled"


class NotFound(RequestError):
    code = "not_found"


class ProofRequired(RequestError):
    code = "proof_required"


class LinkRequired(ProofRequired):
    code = "link_required"


class DeviceUnlinked(NotFound):
    code = "device_unlinked"


class TooManyDevices(QuotaExceeded):
    code = "too_many_devices"


class ServerBusy(RequestError):
    code = "server_busy"


class StorageUnavailable(StorageError, ServerBusy):
    """The database server is away: a StorageError to the server, a ServerBusy ("retry
    shortly") to the client, whose answer never names the database host."""

    code = "server_busy"

    def __init__(self, detail: str) -> None:
        super().__init__("the server's database is unavailable; retry shortly")
        self.detail = detail  # for the server's log only


class Internal(RequestError):
    code = "internal"
