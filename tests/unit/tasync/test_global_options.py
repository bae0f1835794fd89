"""``--broker`` and ``--connect-timeout``: declared once, taken before or after the command.

Scripts run ``tasync status --broker URL --json``, people type ``tasync --broker URL status``;
both must reach the settings a command builds, and a value after the command wins. A URL with
a scheme tasync refuses is a usage error (exit 2) before any connection, and a closed port on
the loopback is refused at once (exit 3), so which URL won shows in the exit code without a
broker.
"""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from tasync.cli import COMMANDS, cli
from tasync.options import is_offline

BAD = "http://x"  # refused by the settings: exit 2
CLOSED = "amqp://guest:guest@127.0.0.1:1/x"  # nothing listens on port 1: exit 3


def run(*args: str, env: dict[str, str] | None = None) -> int:
    result = CliRunner().invoke(cli, [*args], env=env)
    assert "Traceback" not in result.output
    return result.exit_code


@pytest.mark.parametrize("argv", [
    ["--broker", BAD, "status", "--json"],
    ["status", "--broker", BAD, "--json"],
    ["--broker", CLOSED, "status", "--broker", BAD],
    ["wait", "master", "--broker", BAD],
    ["--broker", BAD, "config", "show", "route"],
])
def test_the_broker_url_reaches_the_command_before_or_after_its_name(argv: list[str]) -> None:
    assert run(*argv) == 2


def test_a_url_after_the_command_wins_over_one_before_it() -> None:
    assert run("--broker", BAD, "status", "--broker", CLOSED, "--connect-timeout", "0.1") == 3


def test_the_environment_gives_way_to_an_option_in_either_place() -> None:
    env = {"TASYNC_BROKER_URL": BAD}
    assert run("status", env=env) == 2
    assert run("--broker", CLOSED, "--connect-timeout", "0.1", "status", env=env) == 3
    assert run("status", "--broker", CLOSED, "--connect-timeout", "0.1", env=env) == 3


def test_a_bad_connect_timeout_is_a_usage_error_in_either_place() -> None:
    assert run("--connect-timeout", "0", "status") == 2
    assert run("status", "--connect-timeout", "0") == 2


def leaves(command: click.Command, path: str) -> list[tuple[str, click.Command]]:
    if not isinstance(command, click.Group):
        return [(path, command)]
    ctx = click.Context(command)
    # A group that also runs on its own (tasync console) is a command a user runs.
    found = [(path, command)] if command.invoke_without_command else []
    for name in command.list_commands(ctx):
        sub = command.get_command(ctx, name)
        assert sub is not None
        found += leaves(sub, f"{path} {name}")
    return found


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_lists_the_global_options_it_takes_once(name: str) -> None:
    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    for path, leaf in leaves(command, name):
        options = [o for p in leaf.params for o in p.opts]
        taken = [o for o in options if o in ("--broker", "--connect-timeout")]
        connects = COMMANDS[name].connects and not is_offline(leaf)
        expected = ["--broker", "--connect-timeout"] if connects else []
        assert taken == expected, path
        text = CliRunner().invoke(cli, [*path.split(), "--help"]).output
        rows = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
        assert [r for r in rows if r in ("--broker", "--connect-timeout")] == expected, text
