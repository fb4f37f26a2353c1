"""Every `qpq-ops`, `qpq-server` and `qpq-client` command line the docs show exists.

Reads README.md, docs/**/*.md, playbooks/README.md and the alerts' descriptions; takes
each command from fenced code blocks (line continuations joined, `sudo`, `VAR=value`
prefixes, `.venv/bin/` paths and `C="qpq-client ..."; $C send` shorthands understood) and
from inline code (and `# or: ...` alternatives in comments), then walks the real Click
trees Typer builds: every subcommand must exist, every `--option` must belong to the
command (or group) it is given to, and no command gets more positional arguments than
it takes. An ALL-CAPS word where a
subcommand goes (`qpq-ops rotate KIND`) stands for any of them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from qpq_ops.cli import app as ops_app
from qpq_server.cli import app as server_app
from qpq_server.client.cli import app as client_app

REPO = Path(__file__).resolve().parents[2]
TREES: dict[str, Any] = {  # typer's (vendored) click objects: duck-typed
    "qpq-ops": typer.main.get_command(ops_app),
    "qpq-server": typer.main.get_command(server_app),
    "qpq-client": typer.main.get_command(client_app),
}
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_OPERATORS = {"&&", "||", "|", ";", "&", "(", ")", "$(", "`"}


def doc_files(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", repo / "playbooks" / "README.md",
            *sorted((repo / "docs").rglob("*.md"))]


def _simple_commands(line: str) -> list[list[str]]:
    """Shell words of each simple command on one line (comments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote in prose: not a command line
        return []
    commands: list[list[str]] = [[]]
    for token in tokens:
        if token in _OPERATORS or set(token) <= set(";&|()"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _qpq_words(words: list[str], shorthands: dict[str, list[str]]) -> list[str] | None:
    """The words from the qpq-* program on, or None when this command runs something else."""
    while words and (_ASSIGN.match(words[0]) or words[0] in ("sudo", "env", "time")):
        if words[0] == "sudo" and len(words) > 2 and words[1] in ("-u", "-g"):
            words = words[2:]
        words = words[1:]
    if not words:
        return None
    if words[0].startswith("$") and words[0][1:] in shorthands:
        return shorthands[words[0][1:]] + words[1:]
    program = words[0].rsplit("/", 1)[-1]
    return [program, *words[1:]] if program in TREES else None


def commands_in(text: str) -> list[str]:
    """The qpq command lines in one Markdown (or plain) text, as single lines."""
    found: list[str] = []
    shorthands: dict[str, list[str]] = {}
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            # "cmd  # or: other cmd" shows an alternative: check that one too
            alternative = re.search(r"#\s*or:\s*(.*)$", line)
            lines = [line] + ([alternative.group(1)] if alternative else [])
            for words in (w for part in lines for w in _simple_commands(part)):
                # C="qpq-client --server ..." names a shorthand used as $C below
                if len(words) == 1 and _ASSIGN.match(words[0]):
                    name, _, value = words[0].partition("=")
                    expanded = shlex.split(value)
                    if expanded and expanded[0] in TREES:
                        shorthands[name] = expanded
                    continue
                qpq = _qpq_words(words, shorthands)
                if qpq is not None and len(qpq) > 1:
                    found.append(shlex.join(qpq))
    for snippet in _INLINE.findall(_FENCE.sub("", text)):
        commands = _simple_commands(snippet)
        qpq = _qpq_words(commands[0], {}) if commands else None
        if qpq is not None and len(qpq) > 1:  # a bare program name is prose, not a command
            found.append(shlex.join(qpq))
    return found


def documented_commands(repo: Path = REPO) -> list[tuple[str, str]]:
    """(where, command line) for every qpq command in the docs and alert descriptions."""
    found = [(str(path.relative_to(repo)), line)
             for path in doc_files(repo) for line in commands_in(path.read_text())]
    alerts = yaml.safe_load((repo / "prometheus/alerts/qpq-alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            found += [(f"alert {rule['alert']}", line)
                      for line in commands_in(rule["annotations"]["description"])]
    return sorted(set(found))


def _options(command: Any) -> dict[str, bool]:
    """Each option string of a command -> whether it takes a value."""
    options: dict[str, bool] = {"--help": False}
    for param in command.params:
        if param.param_type_name == "option":
            takes_value = not (param.is_flag or param.count)
            for opt in param.opts:
                options[opt] = takes_value
            for opt in param.secondary_opts:
                options[opt] = False
    return options


def _positional_capacity(command: Any) -> float:
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    return sum(float("inf") if p.nargs < 0 else p.nargs for p in arguments)


def check(line: str) -> None:
    """Raise AssertionError naming what does not exist in `line`."""
    words = [w.strip("[]") for w in shlex.split(line)]
    words = [w for w in words if w and w not in ("...", "…")]
    command = TREES[words[0]]
    path = [words[0]]
    rest = words[1:]
    positionals = 0
    while rest:
        word = rest.pop(0)
        if word.startswith("-") and len(word) > 1:
            name = word.split("=", 1)[0]
            options = _options(command)
            assert name in options, f"{line!r}: {' '.join(path)} has no option {name}"
            if options[name] and "=" not in word and rest:
                rest.pop(0)  # the option's value
        elif hasattr(command, "commands"):
            if word.isupper():  # a placeholder for any subcommand: nothing more to check
                return
            sub = command.commands.get(word)
            assert sub is not None, f"{line!r}: {' '.join(path)} has no command {word!r}"
            command = sub
            path.append(word)
        else:
            positionals += 1
    assert positionals <= _positional_capacity(command), (
        f"{line!r}: {' '.join(path)} takes {_positional_capacity(command):g} arguments, "
        f"not {positionals}")


def test_every_doc_names_its_commands_and_there_are_many() -> None:
    found = documented_commands()
    assert len(found) >= 60
    where = {w.split(" ")[0] for w, _ in found}
    assert {"README.md", "playbooks/README.md", "docs/protocol.md", "alert"} <= where
    assert {line.split()[0] for _, line in found} == set(TREES)


@pytest.mark.parametrize(("where", "line"), documented_commands(),
                         ids=[f"{w}: {ln}" for w, ln in documented_commands()])
def test_documented_command_line_exists(where: str, line: str) -> None:
    check(line)


def test_the_reader_understands_shell_shorthands() -> None:
    text = ('```sh\nC="qpq-client --server 127.0.0.1:7000"\n$C register alice && '
            "QPQ_PASSWORD='x' $C recv bob --wait 30  # comment --nope\n"
            "sudo -u qpq /opt/qpq/venv/bin/qpq-ops backup list \\\n  --config c.toml\n"
            "journalctl -u qpq-server --since -15min\n"
            "qpq-ops doctor  # or: qpq-ops tune sysctl --check\n```\n"
            "Prose `qpq-server`, inline `qpq-ops doctor --config X`.")
    assert commands_in(text) == [
        "qpq-client --server 127.0.0.1:7000 register alice",
        "qpq-client --server 127.0.0.1:7000 recv bob --wait 30",
        "qpq-ops backup list --config c.toml",
        "qpq-ops doctor",
        "qpq-ops tune sysctl --check",
        "qpq-ops doctor --config X",
    ]


@pytest.mark.parametrize(("line", "error"), [
    ("qpq-ops backup explode --config x", "has no command 'explode'"),
    ("qpq-ops tune sysctl --force", "qpq-ops tune sysctl has no option --force"),
    ("qpq-client --nope register alice", "qpq-client has no option --nope"),
    ("qpq-server check-config a.toml b.toml", "takes 1 arguments, not 2"),
])
def test_checker_rejects_what_does_not_exist(line: str, error: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(error)):
        check(line)


def test_checker_accepts_group_options_values_and_placeholders() -> None:
    check("qpq-client --server 127.0.0.1:7000 --ca data/tls/cert.pem recv bob --wait 30")
    check("qpq-ops rotate KIND --config PATH")
    check("qpq-ops restore ARCHIVE --config data/qpq-server.toml")
