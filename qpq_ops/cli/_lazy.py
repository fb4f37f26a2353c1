"""A Typer group that imports a command's module only when that command runs.

`qpq-ops` is run hundreds of times by the deploy playbook and the tests; importing every
command group up front pulls in psycopg, httpx, jinja2, requests and rich.progress for
a `tune sysctl --check` that needs none of them. Each entry names the module that builds
the command and keeps the one-line help the root `--help` shows, so listing the commands
imports nothing (tests/ops/test_cli_lazy.py pins that the line equals the real help).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import typer
import typer.main
from typer import _click
from typer.core import TyperCommand, TyperGroup


@dataclass(frozen=True)
class LazyEntry:
    """One command of the root group: `module:attribute` is a Typer app (a group) or a
    command function; `short` is the first paragraph of its help."""

    target: str
    short: str

    def build(self, name: str) -> _click.Command:
        module, _, attribute = self.target.partition(":")
        obj = getattr(importlib.import_module(module), attribute)
        # Build it exactly as `add_typer`/`command` on the root would have: as a member of
        # a throwaway group with Typer's default settings, then take it out.
        holder = typer.Typer(add_completion=False)
        holder.callback()(_no_op)
        if isinstance(obj, typer.Typer):
            holder.add_typer(obj, name=name)
        else:
            holder.command(name)(obj)
        return typer.main.get_group(holder).commands[name]


def _no_op() -> None:
    """Forces Typer to build a group (a lone command would become the root itself)."""


class _LazyCommands(MutableMapping[str, _click.Command]):
    """The group's `commands`: every name is known up front, a lazy one is built (its
    module imported) the first time it is looked up. Eager commands (a group's own,
    given to it by Typer) come first, in their order, then the lazy ones."""

    def __init__(self, entries: Mapping[str, LazyEntry],
                 eager: Mapping[str, _click.Command]) -> None:
        self.entries = entries
        self.loaded: dict[str, _click.Command] = dict(eager)
        self.names = [*eager, *(name for name in entries if name not in eager)]

    def __getitem__(self, name: str) -> _click.Command:
        if name not in self.loaded:
            if name not in self.entries:
                raise KeyError(name)
            self.loaded[name] = self.entries[name].build(name)
        return self.loaded[name]

    def __setitem__(self, name: str, command: _click.Command) -> None:
        if name not in self.names:
            self.names.append(name)
        self.loaded[name] = command

    def __delitem__(self, name: str) -> None:
        if name in self.entries:
            raise KeyError(f"{name} is a lazy command: it cannot be removed")
        del self.loaded[name]
        self.names.remove(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.names))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names


class LazyGroup(TyperGroup):
    """TyperGroup with lazy `entries` (set by `lazy_group`) besides its own commands: its
    help lists each from the entry's short help; running one imports only its module."""

    entries: Mapping[str, LazyEntry] = {}

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _LazyCommands(self.entries, dict(self.commands))
        self._listing = False

    def list_commands(self, ctx: _click.Context) -> list[str]:
        return list(self.commands)  # TyperGroup's walks .items(), which builds them all

    def get_command(self, ctx: _click.Context, cmd_name: str) -> _click.Command | None:
        commands = self.commands
        if (self._listing and isinstance(commands, _LazyCommands)
                and cmd_name in commands.entries and cmd_name not in commands.loaded):
            # A stand-in that only carries the help line: nothing is imported to list it.
            return TyperCommand(cmd_name, help=commands.entries[cmd_name].short)
        return commands.get(cmd_name)

    def format_help(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def lazy_group(entries: Mapping[str, LazyEntry]) -> type[LazyGroup]:
    """A LazyGroup class bound to `entries` (Typer takes a class, not an instance)."""
    return type("LazyTyperGroup", (LazyGroup,), {"entries": entries})
