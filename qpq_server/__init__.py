"""qpq server: end-to-end-encrypted messaging over QUIC, and its client library."""

from qpq_server.errors import QpqError

__all__ = ["QpqError", "__version__"]

__version__ = "0.1.0"
