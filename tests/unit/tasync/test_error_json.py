"""Errors as ``--json`` prints them: one object with the message, the type and field errors."""

from __future__ import annotations

import json

import amqp.exceptions
import click
from click.testing import CliRunner

from tasync.broker import topology
from tasync.broker.errors import InvalidObject, NoAnswer, RemoteError
from tasync.options import error_json, handle_errors, json_option


def command_raising(error: Exception) -> click.Command:
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


def test_a_404_for_a_tasync_object_is_the_topology_missing_said_once_for_everyone() -> None:
    not_found = amqp.exceptions.NotFound(
        "NOT_FOUND - no exchange 'tasync.control' in vhost 'v1'", (60, 40), 404)
    result = CliRunner().invoke(command_raising(not_found), ["--json"])
    advice = topology.setup_advice("v1", "exchange tasync.control")
    assert result.exit_code == 1
    assert result.stderr == f"tasync: {advice}\n"
    assert json.loads(result.stdout) == {"error": advice, "type": "TopologyMissing",
                                         "errors": {}, "exit_code": 1}


def test_a_connection_broken_mid_command_is_exit_3_in_one_line() -> None:
    result = CliRunner().invoke(command_raising(ConnectionResetError("reset by peer")), [])
    assert result.exit_code == 3
    assert result.stderr.startswith("tasync: lost the connection to the broker (")
    assert result.stderr.count("\n") == 1


def test_any_other_failure_stays_a_traceback_to_report() -> None:
    result = CliRunner().invoke(command_raising(KeyError("bug")), [])
    assert isinstance(result.exception, KeyError)
