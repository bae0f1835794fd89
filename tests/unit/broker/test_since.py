"""``--since``: one parser for every command that looks back, and the same forms everywhere."""

from __future__ import annotations

import datetime as dt

import click
import pytest
from click.testing import CliRunner

from tasync.broker.errors import ConfigError
from tasync.broker.since import Since
from tasync.cli import cli

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("text", "ts"), [
    ("90s", NOW - 90),
    ("30m", NOW - 1800),
    ("2h", NOW - 7200),
    ("1.5h", NOW - 5400),
    ("7d", NOW - 7 * 86400),
    ("1w", NOW - 7 * 86400),
    (" 2h ", NOW - 7200),
    ("1769868300", 1769868300.0),
    ("123.5", 123.5),
    ("2026-01-31T14:05:00Z", dt.datetime(2026, 1, 31, 14, 5, tzinfo=dt.UTC).timestamp()),
    ("2026-01-31T15:05:00+01:00", dt.datetime(2026, 1, 31, 14, 5, tzinfo=dt.UTC).timestamp()),
    ("2026-01-31 14:05", dt.datetime(2026, 1, 31, 14, 5).astimezone().timestamp()),
    ("2026-01-31", dt.datetime(2026, 1, 31).astimezone().timestamp()),
])
def test_times_and_durations(text: str, ts: float) -> None:
    assert Since.parse(text, now=NOW) == Since(ts=ts)
    assert Since.parse(text, now=NOW, allow_seq=False) == Since(ts=ts)


def test_seq_where_it_makes_sense_and_a_clear_refusal_elsewhere() -> None:
    assert Since.parse("seq:42") == Since(seq=42)
    assert Since.parse("SEQ:0") == Since(seq=0)
    with pytest.raises(ConfigError, match="counts by time, not by seq"):
        Since.parse("seq:42", allow_seq=False)


@pytest.mark.parametrize("bad", ["seq:x", "seq:-1", "yesterday", "", "2h ago", "-5m", "3y"])
def test_bad_values_name_the_forms(bad: str) -> None:
    with pytest.raises(ConfigError, match="--since") as caught:
        Since.parse(bad)
    assert "\n" not in str(caught.value)


def test_round_trip_through_request_arguments() -> None:
    for since in (Since(seq=3), Since(ts=NOW)):
        assert Since.from_args(since.to_args()) == since
    assert Since(seq=3).describe() == "seq 3"
    assert Since(ts=86400.0).describe() == "1970-01-02T00:00:00.000+00:00"


def commands_with_since() -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}

    def walk(command: click.Command, path: str) -> None:
        if any("--since" in p.opts for p in command.params):
            found[path] = command
        if isinstance(command, click.Group):  # through the group, which loads lazy commands
            ctx = click.Context(command, info_name=path)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None:
                    walk(sub, f"{path} {name}")

    walk(cli, "tasync")
    return found


def test_every_command_with_since_takes_the_same_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.time", lambda: NOW)
    commands = commands_with_since()
    assert {"tasync replay", "tasync totals"} <= set(commands)
    # Under the root's context, as the real command line runs them: click remembers the help
    # option a command was first asked for, and a bare context would give it other names.
    root = click.Context(cli, info_name="tasync", **cli.context_settings)
    for path, command in commands.items():
        for text, ts in [("2h", NOW - 7200), ("1769868300", 1769868300.0),
                         ("2026-01-31T14:05:00Z", 1769868300.0)]:
            ctx = command.make_context(path, ["--since", text], parent=root)
            assert ctx.params["since"] == Since(ts=ts), path
    replay = commands["tasync replay"].make_context("replay", ["--since", "seq:5"],
                                                    parent=root)
    assert replay.params["since"] == Since(seq=5)


def test_totals_refuses_a_seq_in_one_line() -> None:
    result = CliRunner().invoke(cli, ["totals", "--since", "seq:5"])
    assert result.exit_code == 2
    assert "counts by time, not by seq" in result.output
    assert "Traceback" not in result.output
