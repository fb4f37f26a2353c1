"""qpq server: end-to-end-encrypted messaging over QUIC, and its client library.

The public names are listed in `__all__`. The client library and the config loader are
imported on first use (PEP 562), so `import qpq_server` (which every `qpq-ops` command
does, through the config and storage modules) loads neither aioquic nor a database
driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qpq_server.errors import QpqError

if TYPE_CHECKING:
    from qpq_server.client import (
        ClientError,
        DecryptError,
        FileDecryptError,
        KtViolation,
        QpqClient,
        QpqConnection,
        ReceivedMessage,
        connect,
    )
    from qpq_server.config import Config, load_config

__all__ = [
    "ClientError",
    "Config",
    "DecryptError",
    "FileDecryptError",
    "KtViolation",
    "QpqClient",
    "QpqConnection",
    "QpqError",
    "ReceivedMessage",
    "__version__",
    "connect",
    "load_config",
]

__version__ = "0.1.0"

_LAZY = {
    "ClientError": "qpq_server.client",
    "DecryptError": "qpq_server.client",
    "FileDecryptError": "qpq_server.client",
    "KtViolation": "qpq_server.client",
    "QpqClient": "qpq_server.client",
    "QpqConnection": "qpq_server.client",
    "ReceivedMessage": "qpq_server.client",
    "connect": "qpq_server.client",
    "Config": "qpq_server.config",
    "load_config": "qpq_server.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qpq_server' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
