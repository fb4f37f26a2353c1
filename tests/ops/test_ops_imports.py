"""qpq_ops's import rules (issue 10), read from the source, `TYPE_CHECKING` imports included.

- qpq_ops takes from qpq_server only the small public pieces it needs, never the
  transport, the service or `app.py`;
- `qpq_ops.triggers` imports no CLI and no renderer; renderers and check-triggers
  (`qpq_ops.cli.triggers`, `qpq_ops.evaluate`) never import each other;
- importing the CLI loads neither aioquic nor websockets (no command talks QUIC today).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import qpq_ops

PACKAGE = Path(qpq_ops.__file__).parent
ROOT = PACKAGE.parent

# What qpq_ops may take from qpq_server (a module or anything under it), besides
# `from qpq_server import __version__`.
SERVER_PIECES = (
    "qpq_server.config",
    "qpq_server.datadir",
    "qpq_server.errors",
    "qpq_server.fsutil",
    "qpq_server.secrets",
    "qpq_server.storage",
    "qpq_server.tls",  # write_private_file for rotated keys
    "qpq_server.auth.opaque",  # create_setup for `rotate opaque`
    "qpq_server.metrics",  # the metric registry the catalogue is read from (issue 10)
    "qpq_server.client",  # `capacity calibrate` drives a throwaway server (lazy import)
    "qpq_server.devserver",  # ...started by the project's one launcher (lazy import)
    "qpq_server.federation.certs",  # one builder of federation certificates (rotation)
)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in the file; `from a import b` yields a and a.b."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def offending(files: list[Path], forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    return [
        f"{path.relative_to(root)}:{line} imports {module}"
        for path in files
        for line, module in imports(path, root)
        if any(within(module, prefix) for prefix in forbidden)
    ]


def sources(*prefixes: str) -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    return [f for f in files if any(within(module_name(f), p) for p in prefixes)]


def test_qpq_ops_takes_only_the_small_public_server_pieces() -> None:
    allowed = {"qpq_server", "qpq_server.__version__"}
    problems = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources("qpq_ops")
        for line, module in imports(path)
        if within(module, "qpq_server") and module not in allowed
        and not any(within(module, piece) for piece in SERVER_PIECES)
    ]
    assert problems == []


def test_triggers_import_no_cli_and_no_renderer() -> None:
    assert offending(sources("qpq_ops.triggers"), ("qpq_ops.cli", "qpq_ops.render")) == []


def test_renderers_and_check_triggers_never_import_each_other() -> None:
    check_triggers = ("qpq_ops.cli.triggers", "qpq_ops.evaluate")
    assert offending(sources("qpq_ops.render"), check_triggers) == []
    assert offending(sources(*check_triggers), ("qpq_ops.render", "qpq_ops.cli.render")) == []


def test_the_checker_names_a_forbidden_import_even_under_type_checking(tmp_path: Path) -> None:
    planted = tmp_path / "qpq_ops" / "render" / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("from typing import TYPE_CHECKING\n"
                       "if TYPE_CHECKING:\n"
                       "    from ..evaluate import model\n")
    assert offending([planted], ("qpq_ops.evaluate",), root=tmp_path) == [
        "qpq_ops/render/planted.py:3 imports qpq_ops.evaluate",
        "qpq_ops/render/planted.py:3 imports qpq_ops.evaluate.model",
    ]


EVERY_MODULE = ("import importlib, pkgutil, qpq_ops\n"
                "for m in pkgutil.walk_packages(qpq_ops.__path__, 'qpq_ops.'):\n"
                "    importlib.import_module(m.name)\n")


@pytest.mark.parametrize("imports_code", ["import qpq_ops.cli\n", EVERY_MODULE],
                         ids=["cli", "every-module"])
def test_qpq_ops_loads_no_quic_or_websocket_stack(imports_code: str) -> None:
    """No qpq-ops command talks QUIC, so none pays for aioquic or websockets."""
    code = imports_code + (
        "import json, sys\n"
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('aioquic', 'websockets') "
        "or m in ('qpq_server.app', 'qpq_server.service') "
        "or m.startswith('qpq_server.transport'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert json.loads(result.stdout) == []
