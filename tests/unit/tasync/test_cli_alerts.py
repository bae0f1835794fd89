import pytest
from click.testing import CliRunner

from tasync.cli import cli as alerts_cli
from tasync.host_args import normalise_host_args


@pytest.mark.parametrize(("argv", "expected"), [
    (["send", "-i", "d", "-m", "t", "-host", "a", "b", "c"],
     ["send", "-i", "d", "-m", "t", "--host", "a", "--host", "b", "--host", "c"]),
    (["--broker", "u", "send", "-host", "a", "b", "-m", "t"],
     ["--broker", "u", "send", "--host", "a", "--host", "b", "-m", "t"]),
    (["send", "--host", "a", "b"], ["send", "--host", "a", "--host", "b"]),
    (["send", "-host=a,b"], ["send", "--host=a,b"]),
    (["send", "-host"], ["send", "--host"]),
    (["send", "--", "-host", "a", "b"], ["send", "--", "-host", "a", "b"]),
    (["config", "set", "route", "r", "--host", "a", "b"],
     ["config", "set", "route", "r", "--host", "a", "b"]),
    # a value that happens to be the word send leaves other commands alone
    (["config", "set", "route", "send", "--host", "a", "b"],
     ["config", "set", "route", "send", "--host", "a", "b"]),
    (["status", "--json", "send", "-host", "a", "b"],
     ["status", "--json", "send", "-host", "a", "b"]),
])
def test_normalise_host_args(argv: list[str], expected: list[str]) -> None:
    assert normalise_host_args(argv) == expected


@pytest.mark.parametrize(("args", "message"), [
    (["send", "-m", "t", "--host", "a"], "exactly one of -i DEST or -g GROUP"),
    (["send", "-i", "d", "-g", "g", "-m", "t", "--host", "a"], "exactly one of"),
    (["send", "-i", "d", "--host", "a"], "-m TEXT"),
    (["send", "-i", "d", "-m", "t"], "--host A B ... or --route NAME"),
    (["send", "-i", "d", "-m", "t", "--host", "a", "--route", "r"], "not both"),
    (["send", "-i", "d", "-m", "t", "--priority", "12", "--host", "a"], "0<=x<=9"),
    (["totals", "--since", "soon"], "duration"),
    (["intake", "--listen", "nowhere"], "HOST:PORT"),
    (["intake", "--route-for", "remedy"], "SOURCE=ROUTE"),
])
def test_usage_errors_exit_2_without_a_traceback(args: list[str], message: str) -> None:
    result = CliRunner().invoke(alerts_cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_broker_url_is_a_usage_error() -> None:
    result = CliRunner().invoke(alerts_cli, ["send", "-i", "d", "-m", "t", "--host", "a",
                                             "--broker", "http://x"])
    assert result.exit_code == 2 and "unsupported broker URL scheme" in result.output


@pytest.mark.parametrize("subject", ["P1\r\nBcc: all@example.com", "P1\nsecond line",
                                     "bell\x07"])
def test_send_refuses_a_subject_with_control_characters_before_publishing(subject: str) -> None:
    result = CliRunner().invoke(alerts_cli, ["send", "-i", "ops", "-m", "disk full", "--host",
                                             "a", "--subject", subject,
                                             "--broker", "amqp://guest:guest@127.0.0.1:1/x"])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and "subject: a subject is one line" in result.stderr
