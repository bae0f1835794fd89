"""Every command's ``--help`` shows examples, and every example is a command line that parses.

The walk covers every console script of pyproject.toml (``tasync`` and ``tasync-worker``) and
every group and subcommand below them, so a command added later without examples fails here.
"""

from __future__ import annotations

import re

import click
import pytest

from tests.cli_contract import (
    check_argv,
    commands_in,
    console_scripts,
    root_command,
)


def every_command() -> list[tuple[str, click.Command, click.Context]]:
    found: list[tuple[str, click.Command, click.Context]] = []

    def walk(command: click.Command, path: str, parent: click.Context | None) -> None:
        # With the command's own context settings (``-h`` as well as ``--help``), as click
        # makes them when it runs: click keeps the first help option it builds per command.
        ctx = click.Context(command, info_name=path.rsplit(" ", 1)[-1], parent=parent,
                            **command.context_settings)
        found.append((path, command, ctx))
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(sub, f"{path} {name}", ctx)

    for script in console_scripts():
        walk(root_command(script), script, None)
    return found


COMMANDS = every_command()


def examples(help_text: str) -> list[str]:
    """The examples of the ``Examples:`` block, each on one line, without its explanation.

    The block is indented below its heading and ends at the next line that is not; a line
    indented deeper than the examples continues the one above (a long quoted argument), and
    two or more spaces separate an example from what it explains (a backslash at the end of a
    line continues it, as in a shell).
    """
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Examples:")
    heading = len(lines[start]) - len(lines[start].lstrip())
    block: list[str] = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= heading:
            break
        block.append(line.rstrip())
    base = min(len(line) - len(line.lstrip()) for line in block if line)
    joined: list[str] = []
    for line in block:
        if joined and len(line) - len(line.lstrip()) > base:
            joined[-1] = joined[-1].removesuffix("\\").rstrip() + " " + line.strip()
        elif line:
            joined.append(line.strip())
    return [re.split(r"\s{2,}", line)[0] for line in joined]


def test_the_walk_sees_every_command() -> None:
    paths = {path for path, _, _ in COMMANDS}
    assert {"tasync", "tasync-worker", "tasync config set", "tasync broker setup",
            "tasync hosts check"} <= paths
    assert len(paths) >= 20


@pytest.mark.parametrize(("path", "command", "ctx"), COMMANDS, ids=[p for p, _, _ in COMMANDS])
def test_help_has_examples_that_parse(path: str, command: click.Command,
                                      ctx: click.Context) -> None:
    text = command.get_help(ctx)
    assert re.search(r"^\s*Examples:\s*$", text, re.MULTILINE), f"{path} --help has no Examples:"
    argvs = [argv for line in examples(text) for argv in commands_in(line)]
    assert argvs, f"{path}: no example runs a tasync command"
    for argv in argvs:
        verdict = check_argv(argv)
        assert verdict.error is None, f"{path} --help example: {' '.join(argv)}: {verdict.error}"
