"""The package's import boundaries, checked over the real import graph.

Every `import`/`from … import` in qpq_server, qpq_ops, scripts and bench counts: module
level, inside `if TYPE_CHECKING:` and inside functions (a lazy import still couples the
two modules). A failure names the offending import as `file:line importer -> imported`.
Rules that are about what gets *loaded* (a backend, aioquic) run the import for real in a
fresh interpreter, where lazy imports are allowed by design.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qpq_server", "qpq_ops")


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str

    def __str__(self) -> str:
        return f"{self.where} {self.importer} -> {self.imported}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _python_files(*tops: str) -> Iterator[Path]:
    for top in tops:
        base = ROOT / top
        yield from sorted(p for p in base.rglob("*.py") if "templates" not in p.parts)


def _known_modules() -> set[str]:
    return {module_name(p) for p in _python_files(*PACKAGES, "tests")}


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    keep = len(base) - node.level + (1 if is_package else 0)
    return ".".join(base[:keep] + ([node.module] if node.module else []))


def edges_of(path: Path, known: set[str], importer: str | None = None) -> Iterator[Edge]:
    importer = importer or module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Edge(importer, alias.name, f"{rel}:{node.lineno}")
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, importer, path.name == "__init__.py")
            for alias in node.names:
                # `from pkg import submodule` imports the submodule itself.
                sub = f"{target}.{alias.name}"
                yield Edge(importer, sub if sub in known else target, f"{rel}:{node.lineno}")


def all_edges(*tops: str) -> list[Edge]:
    known = _known_modules()
    return [e for p in _python_files(*tops) for e in edges_of(p, known)]


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(edges: Iterable[Edge], importer: tuple[str, ...],
               forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    return [str(e) for e in edges
            if _under(e.importer, *importer) and _under(e.imported, *forbidden)
            and not _under(e.imported, *allowed)]


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return all_edges(*PACKAGES)


def find_cycle(edges: Iterable[Edge], scope: str) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for e in edges:
        if _under(e.importer, scope) and _under(e.imported, scope) and e.importer != e.imported:
            graph.setdefault(e.importer, set()).add(e.imported)
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


# -- the rules -------------------------------------------------------------------------

@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_type_checking_and_lazy_imports_included(
        edges: list[Edge], package: str) -> None:
    cycle = find_cycle(edges, package)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_protocol_core_imports_no_network_and_no_storage(edges: list[Edge]) -> None:
    bad = violations(edges, ("qpq_server.protocol",),
                     ("aioquic", "websockets", "asyncio", "socket", "ssl",
                      "qpq_server.storage", "qpq_server.transport", "sqlcipher3", "psycopg"))
    assert not bad, "\n".join(bad)


def test_storage_backends_import_nothing_from_transports(edges: list[Edge]) -> None:
    bad = violations(edges, ("qpq_server.storage",),
                     ("qpq_server.transport", "qpq_server.app", "qpq_server.service",
                      "aioquic", "websockets"))
    assert not bad, "\n".join(bad)


def test_server_never_imports_ops(edges: list[Edge]) -> None:
    bad = violations(edges, ("qpq_server",), ("qpq_ops",))
    assert not bad, "\n".join(bad)


# What qpq_ops may take from the server: configuration, data-dir layout, secrets, storage,
# the error tree and file helpers, key/cert helpers for rotation (federation certificates
# included), the version; the client
# library and the throwaway launcher only for the commands that talk QUIC (lazily).
OPS_MAY_USE = (
    "qpq_server.config", "qpq_server.datadir", "qpq_server.secrets", "qpq_server.storage",
    "qpq_server.errors", "qpq_server.fsutil", "qpq_server.tls", "qpq_server.auth.opaque",
    "qpq_server.metrics", "qpq_server.devserver", "qpq_server.client",
    "qpq_server.federation.certs",  # one builder of federation certificates (rotation)
)


def test_ops_uses_only_the_servers_public_pieces(edges: list[Edge]) -> None:
    bad = [str(e) for e in edges
           if _under(e.importer, "qpq_ops") and _under(e.imported, "qpq_server")
           and e.imported != "qpq_server" and not _under(e.imported, *OPS_MAY_USE)]
    assert not bad, "\n".join(bad)


# STYLE.md: transport code in one place. The QUIC glue (aioquic.asyncio) is imported by
# the server's listener, the one client-side helper (the client library and federation
# links both connect through it) and the federation listener.
QUIC_GLUE = ("qpq_server.transport.quic", "qpq_server.transport.quic_client",
             "qpq_server.federation.listener")


def test_quic_client_connections_come_from_one_helper(edges: list[Edge]) -> None:
    bad = [str(e) for e in edges if _under(e.imported, "aioquic.asyncio")
           and e.importer not in QUIC_GLUE]
    assert not bad, "\n".join(bad)


def test_triggers_definition_imports_no_cli_or_renderer(edges: list[Edge]) -> None:
    bad = violations(edges, ("qpq_ops.triggers",),
                     ("qpq_ops.cli", "qpq_ops.render", "qpq_ops.evaluate", "typer", "rich"))
    assert not bad, "\n".join(bad)


def test_renderers_and_check_triggers_never_import_each_other(edges: list[Edge]) -> None:
    check = ("qpq_ops.cli.triggers", "qpq_ops.evaluate")
    bad = violations(edges, ("qpq_ops.render",), check)
    bad += violations(edges, check, ("qpq_ops.render", "qpq_ops.cli.render"))
    assert not bad, "\n".join(bad)


def test_client_library_imports_only_codec_and_kt_verification(edges: list[Edge]) -> None:
    bad = violations(edges, ("qpq_server.client",), ("qpq_server",),
                     allowed=("qpq_server.client", "qpq_server.protocol.codec",
                              "qpq_server.transport.quic_client",
                              "qpq_server.kt.merkle", "qpq_server.kt.sth",
                              "qpq_server.kt.keymap", "qpq_server.identity",
                              "qpq_server.devices",  # pure: device ids, sets, link codes
                              "qpq_server.errors", "qpq_server.fsutil"))
    assert not bad, "\n".join(bad)


def test_nothing_outside_tests_imports_tests() -> None:
    bad = violations(all_edges(*PACKAGES, "scripts", "bench"),
                     ("qpq_server", "qpq_ops", "scripts", "bench"), ("tests",))
    assert not bad, "\n".join(sorted(set(bad)))


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, cwd=ROOT).stdout
    return set(out.split())


def test_importing_the_service_loads_no_storage_backend() -> None:
    loaded = _loaded_after("import qpq_server.service")
    backends = {m for m in loaded if _under(m, "qpq_server.storage.sqlcipher",
                                            "qpq_server.storage.filestore",
                                            "qpq_server.storage.postgres", "sqlcipher3",
                                            "psycopg")}
    assert not backends


def test_importing_the_ops_cli_loads_no_quic_or_websockets() -> None:
    loaded = _loaded_after("import qpq_ops.cli")
    assert not {m for m in loaded if _under(m, "aioquic", "websockets")}


# Issue 17: the deploy and the tests run qpq-ops hundreds of times; a command pays only
# for the libraries it uses (qpq_ops.cli loads each command's module on demand).
# pydantic: typer 0.29 coerces every parameter through it (~0.15 CPU-s per run); qpq
# pins typer below that (pyproject.toml).
HEAVY = ("psycopg", "requests", "prometheus_api_client", "httpx", "jinja2", "matplotlib",
         "numpy", "scipy", "qpq_server.storage.postgres", "qpq_server.storage.sqlcipher",
         "pydantic")


def _run_ops(*argv: str) -> str:
    """Run qpq-ops in-process in this fresh interpreter; stdout is its output."""
    return ("import contextlib, io\nfrom qpq_ops.cli import main\n"
            f"sys.argv = ['qpq-ops', *{list(argv)!r}]\n"
            "with contextlib.redirect_stdout(io.StringIO()) as help_text:\n"
            "    try:\n        main()\n    except SystemExit as exc:\n"
            "        assert exc.code == 0, exc.code\n"
            "assert 'Usage: qpq-ops' in help_text.getvalue(), help_text.getvalue()")


@pytest.mark.parametrize("statement", [
    "import qpq_ops.cli", _run_ops("--help"), _run_ops("tune", "sysctl", "--help"),
], ids=["import", "root-help", "tune-sysctl-help"])
def test_the_ops_cli_loads_no_heavy_library_a_command_does_not_use(statement: str) -> None:
    loaded = _loaded_after(statement)
    assert not {m for m in loaded if _under(m, *HEAVY)}
    if "tune" not in statement:  # listing the commands imports none of their modules
        assert not {m for m in loaded if _under(m, "qpq_ops.cli")} - {
            "qpq_ops.cli", "qpq_ops.cli._lazy"}


def test_a_command_with_options_parses_them_without_pydantic() -> None:
    """What the qpq_sysctl role runs on every deploy: options parsed, JSON printed."""
    statement = ("import contextlib, io, json\nfrom qpq_ops.cli import main\n"
                 "sys.argv = ['qpq-ops', 'tune', 'sysctl', '--json']\n"
                 "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
                 "    try:\n        main()\n    except SystemExit as exc:\n"
                 "        assert exc.code == 0, exc.code\n"
                 "assert json.loads(out.getvalue())['settings']")
    loaded = _loaded_after(statement)
    assert not {m for m in loaded if _under(m, "pydantic", "pydantic_core")}


@pytest.mark.parametrize(("argv", "not_loaded"), [
    (("capacity", "plan", "--help"), HEAVY),  # forecast's numpy/Prometheus stay out
    (("capacity", "--help"), HEAVY),  # ...also when the group lists its commands
    (("backup", "prune", "--help"), ("psycopg", "qpq_server.storage.postgres", "httpx",
                                     "requests", "jinja2", "numpy")),
    (("rotate", "tls", "--help"), ("psycopg", "qpq_server.storage.postgres", "httpx",
                                   "requests", "jinja2", "numpy")),
], ids=["capacity-plan", "capacity-help", "backup-prune", "rotate-tls"])
def test_an_ops_command_loads_only_its_own_heavy_libraries(
        argv: tuple[str, ...], not_loaded: tuple[str, ...]) -> None:
    loaded = _loaded_after(_run_ops(*argv))
    assert not {m for m in loaded if _under(m, *not_loaded)}


def test_the_graph_walker_sees_type_checking_and_lazy_imports(tmp_path: Path) -> None:
    """The rules above are only as good as the walker: it must report every kind."""
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a.b\n"
           "def f() -> None:\n    from c import d\n")
    path = tmp_path / "probe.py"
    path.write_text(src)
    found = {e.imported for e in edges_of(path, set(), importer="qpq_server.probe")}
    assert found == {"typing", "a.b", "c"}
    graph = [Edge("x.a", "x.b", ""), Edge("x.b", "x.c", ""), Edge("x.c", "x.a", "")]
    assert find_cycle(graph, "x") == ["x.a", "x.b", "x.c", "x.a"]
