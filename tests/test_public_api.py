"""The public surface of `qpq_server` is pinned: a change to it is a deliberate one."""

from __future__ import annotations

import subprocess
import sys

import qpq_server
from qpq_server.errors import QpqError

PUBLIC = [
    "ClientError", "Config", "DecryptError", "FileDecryptError", "KtViolation", "QpqClient",
    "QpqConnection", "QpqError", "ReceivedMessage", "__version__", "connect", "load_config",
]


def test_all_is_pinned_and_sorted() -> None:
    assert qpq_server.__all__ == PUBLIC
    assert sorted(qpq_server.__all__) == qpq_server.__all__


def test_every_public_name_resolves() -> None:
    for name in qpq_server.__all__:
        assert getattr(qpq_server, name) is not None, name


def test_client_errors_hang_under_qpq_error() -> None:
    for name in ("ClientError", "DecryptError", "FileDecryptError", "KtViolation"):
        assert issubclass(getattr(qpq_server, name), QpqError), name
    assert issubclass(qpq_server.KtViolation, qpq_server.ClientError)


def test_importing_the_package_loads_no_quic_stack() -> None:
    code = "import sys, qpq_server; print('aioquic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "False"
