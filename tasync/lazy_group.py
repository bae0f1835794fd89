"""A click group that imports a command's module only when that command runs.

``tasync --help`` used to import every command's module (the schema library, the broker
client, the store, the demo) before printing a line: a third of a second for a listing.
Here each command is named by ``module:attribute`` with its summary (the first paragraph of
its help), so the listing needs no import, and running ``tasync send`` imports what ``send``
uses and nothing else. ``tests/unit/tasync/test_lazy_cli.py`` checks that every summary is still the
command's own.

A loaded command passes through the group's ``prepare`` before it runs or shows its help: the
one place where what every command shares (the group's global options, the error handling) is
given to each, instead of a stack of decorators repeated on every command.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import click


class LazyCommand(NamedTuple):
    """Where a command lives and what ``--help`` of its group says about it."""

    target: str  # "module:attribute"
    summary: str  # the first paragraph of the command's help, on one line
    connects: bool = True  # talks to the broker: takes the group's global options too


#: What a ``LazyGroup`` does to a command it loads (see ``tasync.options.prepare``).
Prepare = Callable[[click.Command, LazyCommand], click.Command]


def _as_is(command: click.Command, _entry: LazyCommand) -> click.Command:
    return command


class LazyGroup(click.Group):
    """A ``click.Group`` whose commands are imported on first use (see the module)."""

    def __init__(self, *args: Any, lazy: dict[str, LazyCommand], prepare: Prepare = _as_is,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)
        self.prepare = prepare

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, loaded or not, sorted as click sorts them."""
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, imported now if it was not yet."""
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in self.lazy:
            command = self.load(cmd_name)
        return command

    def load(self, name: str) -> click.Command:
        """Import the command ``name``, prepare it and keep it, as if it had been added eagerly."""
        entry = self.lazy[name]
        module_name, _, attribute = entry.target.partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{entry.target} is not a click command")
        command = self.prepare(command, entry)
        self.add_command(command, name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the summaries, importing only commands already loaded."""
        names = self.list_commands(ctx)
        rows: list[tuple[str, str]] = []
        if names:
            limit = formatter.width - 6 - max(len(name) for name in names)
            for name in names:
                loaded = self.commands.get(name)
                if loaded is not None:
                    if not loaded.hidden:
                        rows.append((name, loaded.get_short_help_str(limit)))
                else:
                    # click shortens a summary exactly as it shortens the command's own help
                    stand_in = click.Command(name, help=self.lazy[name].summary)
                    rows.append((name, stand_in.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
