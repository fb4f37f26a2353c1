"""Secret rotation (`qpq-ops rotate …`): one module per secret kind, each returning a
`RotationResult` and appending to the audit log under the data dir (`audit`)."""

from qpq_ops.rotate.audit import AuditRecord, append_audit, audit_path, read_audit
from qpq_ops.rotate.auth_token import finish_auth_token, rotate_auth_token
from qpq_ops.rotate.db_key import rotate_db_key
from qpq_ops.rotate.federation import rotate_federation
from qpq_ops.rotate.opaque import finish_opaque, rotate_opaque
from qpq_ops.rotate.result import RotationResult
from qpq_ops.rotate.tls import rotate_tls

__all__ = [
    "AuditRecord",
    "RotationResult",
    "append_audit",
    "audit_path",
    "finish_auth_token",
    "finish_opaque",
    "read_audit",
    "rotate_auth_token",
    "rotate_db_key",
    "rotate_federation",
    "rotate_opaque",
    "rotate_tls",
]
