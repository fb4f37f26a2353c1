"""A Typer group that imports a command's module only when that command runs.

`qpq-ops` is run hundreds of times by the deploy playbook and the tests; importing every
command group up front pulls in psycopg, httpx, jinja2, requests and rich.progress for
a `tune sysctl --check` that needs none of them. Each entry names the module that builds
the command and keeps the one-line help the root `--help` shows, so listing the commands
imports nothing (tests/ops/test_cli_lazy.py pins that the line equals the real help).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
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
    setup: Callable[[Any], None] | None = None  # e.g. adds `capacity forecast` to the app

    def build(self, name: str) -> _click.Command:
        module, _, attribute = self.target.partition(":")
        obj = getattr(importlib.import_module(module), attribute)
        if self.setup is not None:
            self.setup(obj)
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
    """The group's `commands`: every name is known up front, a command is built (its
    module imported) the first time it is looked up."""

    def __init__(self, entries: Mapping[str, LazyEntry]) -> None:
        self.entries = entries
        self.loaded: dict[str, _click.Command] = {}

    def __getitem__(self, name: str) -> _click.Command:
        if name not in self.loaded:
            if name not in self.entries:
                raise KeyError(name)
            self.loaded[name] = self.entries[name].build(name)
        return self.loaded[name]

    def __setitem__(self, name: str, command: _click.Command) -> None:
        self.loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self.loaded[name]

    def __iter__(self) -> Iterator[str]:
        yield from self.entries
        yield from (name for name in self.loaded if name not in self.entries)

    def __len__(self) -> int:
        return len(set(self.entries) | set(self.loaded))

    def __contains__(self, name: object) -> bool:
        return name in self.entries or name in self.loaded


class LazyGroup(TyperGroup):
    """TyperGroup over `ENTRIES` (set by `lazy_group`); the root help lists each command
    from its entry's short help, running a command imports only its own module."""

    entries: Mapping[str, LazyEntry] = {}

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _LazyCommands(self.entries)
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
    return type("QpqOpsGroup", (LazyGroup,), {"entries": entries})
