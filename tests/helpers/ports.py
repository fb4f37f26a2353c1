"""Free loopback ports for test servers (never fixed ports): see `qpq_server.devserver`."""

from __future__ import annotations

from qpq_server.devserver import free_port

__all__ = ["free_port"]
