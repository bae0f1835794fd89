"""``tasync``'s lazy command group: the listing imports nothing, and says what the commands say.

The summaries in ``tasync.cli.COMMANDS`` are copies of each command's first help paragraph, so
``tasync --help`` can list them without importing a command's module; these tests fail when a
command's help changes and its copy does not, or when ``--help`` starts importing again.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import click
import pytest

from tasync.cli import COMMANDS, cli
from tasync.lazy_group import LazyGroup


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_summary_is_the_commands_own(name: str) -> None:
    command = LazyGroup(lazy=COMMANDS).load(name)
    assert command.short_help is None, f"{name}: set its summary in COMMANDS instead"
    first = inspect.cleandoc(command.help or "").split("\n\n")[0].replace("\n", " ")
    assert COMMANDS[name].summary == first
    stand_in = click.Command(name, help=COMMANDS[name].summary)
    for limit in (20, 45, 70, 120):
        assert stand_in.get_short_help_str(limit) == command.get_short_help_str(limit)


def test_help_lists_every_command_without_importing_them() -> None:
    code = ("import sys\nfrom tasync.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('marshmallow', 'amqp', 'kombu', 'tasync.broker.store', 'yaml', "
            "'rich', 'tasync.cli_config', 'tasync.demo') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "HEAVY []" in out
    for name in COMMANDS:
        assert f"\n  {name} " in out


def test_a_command_runs_from_its_module_once_loaded() -> None:
    ctx = click.Context(cli)
    command = cli.get_command(ctx, "status")
    assert command is not None and command.name == "status"
    assert cli.get_command(ctx, "status") is command
    assert cli.get_command(ctx, "no-such-command") is None
    assert set(COMMANDS) <= set(cli.list_commands(ctx))
