"""`qpq_scram_matches`: does a PostgreSQL SCRAM-SHA-256 verifier belong to a password?

The verifier (`pg_authid.rolpassword`) is `SCRAM-SHA-256$ITER:SALT$STOREDKEY:SERVERKEY`
(RFC 5802/7677, PostgreSQL's documented format); checking it takes the same PBKDF2 and
HMAC a login does, from Python's standard library. The role sets the password only when
this is false, so an unchanged vault password changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any


def qpq_scram_matches(verifier: Any, password: str) -> bool:
    try:
        method, params, keys = str(verifier).split("$")
        iterations, salt = params.split(":")
        stored_key, server_key = keys.split(":")
        if method != "SCRAM-SHA-256":
            return False
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt),
                                     int(iterations))
    except (ValueError, TypeError):
        return False  # none (no role, or no password) or another method (md5)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return (hmac.compare_digest(hashlib.sha256(client_key).digest(),
                                base64.b64decode(stored_key))
            and hmac.compare_digest(server, base64.b64decode(server_key)))


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"qpq_scram_matches": qpq_scram_matches}
