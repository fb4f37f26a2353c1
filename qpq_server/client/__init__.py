"""The qpq client library: QUIC connection, end-to-end crypto, profiles, high-level API."""

from qpq_server.client.api import QpqClient, ReceivedMessage
from qpq_server.client.connection import QpqConnection, connect
from qpq_server.client.errors import ClientError, DecryptError, FileDecryptError, KtViolation

__all__ = ["ClientError", "DecryptError", "FileDecryptError", "KtViolation", "QpqClient",
           "QpqConnection", "ReceivedMessage", "connect"]
