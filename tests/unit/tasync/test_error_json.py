"""Errors as ``--json`` prints them: one object with the message, the type and field errors."""

from __future__ import annotations

import json

import click
from click.testing import CliRunner

from broker.errors import InvalidObject, NoAnswer, RemoteError, TasyncError
from tasync.options import error_json, handle_errors, json_option


def command_raising(error: TasyncError) -> click.Command:
    @click.command()
    @json_option
    @handle_errors
    def failing(as_json: bool) -> None:
        raise error

    return failing


def test_a_remote_error_keeps_the_type_and_field_errors_of_the_node_that_raised_it() -> None:
    remote = RemoteError("destination x: url: needs a scheme", error_type="InvalidObject",
                         data={"errors": {"url": ["needs a scheme"]}})
    result = CliRunner().invoke(command_raising(remote), ["--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "error": "destination x: url: needs a scheme", "type": "InvalidObject",
        "errors": {"url": ["needs a scheme"]}, "exit_code": 1}
    assert "tasync: destination x: url: needs a scheme" in result.stderr


def test_without_json_an_error_is_one_line_on_stderr_and_nothing_on_stdout() -> None:
    result = CliRunner().invoke(command_raising(NoAnswer("b does not answer")), [])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "tasync: b does not answer"


def test_a_local_error_is_named_by_its_class() -> None:
    found = error_json(InvalidObject("bad", errors={"name": ["too long"]}))
    assert (found["type"], found["errors"]) == ("InvalidObject", {"name": ["too long"]})
    assert error_json(NoAnswer("x"))["errors"] == {}
