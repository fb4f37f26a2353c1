"""The qpq client library: QUIC connection, end-to-end crypto, profiles, high-level API."""

from qpq_server.client.api import QpqClient, ReceivedMessage
from qpq_server.client.connection import ClientError, QpqConnection, connect

__all__ = ["ClientError", "QpqClient", "QpqConnection", "ReceivedMessage", "connect"]
