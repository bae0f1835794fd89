"""Click options shared by every command, and the one place errors become exit codes.

Commands take ``--broker`` and ``--json`` the same way everywhere; a
``TasyncError`` raised anywhere below becomes a one-line message on stderr and its exit code,
never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import amqp.exceptions
import click

from broker.connection import RECOVERABLE, describe
from broker.errors import ConfigError, ExitCode, RemoteError, TasyncError
from broker.settings import DEFAULT_BROKER_URL, ENV_BROKER_URL, Settings
from broker.since import Since
from broker.tls import check_tls_urls, tls_files

F = TypeVar("F", bound=Callable[..., Any])


#: Where ``--connect-timeout`` keeps its value for ``make_settings`` (the click context's meta).
_CONNECT_TIMEOUT_KEY = "tasync.connect_timeout_s"
#: A person is waiting: give up on an unreachable broker after this long (loopback answers
#: or refuses within milliseconds; a remote broker within a second or so).
DEFAULT_CONNECT_TIMEOUT_S = 2.0


def _remember_connect_timeout(ctx: click.Context, _param: click.Parameter,
                              value: float) -> float:
    ctx.meta[_CONNECT_TIMEOUT_KEY] = value
    return value


def broker_url_option(fn: F) -> F:
    """``--broker URL``: several URLs separated by ``;`` are tried in order."""
    return click.option(
        "--broker", "broker_url", envvar=ENV_BROKER_URL, default=DEFAULT_BROKER_URL,
        show_default="$TASYNC_BROKER_URL or " + DEFAULT_BROKER_URL.replace("guest:guest@", ""),
        metavar="URL", help="Broker URL(s); separate several with ';' to fail over in order.",
    )(fn)


def broker_option(fn: F) -> F:
    """``--broker URL`` and ``--connect-timeout SECONDS``, for commands a person waits on.

    The timeout is not passed to the command: ``make_settings`` reads it, so every command
    that connects honours it without a parameter of its own.
    """
    fn = click.option(
        "--connect-timeout", type=click.FloatRange(min=0.1), default=DEFAULT_CONNECT_TIMEOUT_S,
        show_default=True, metavar="SECONDS", expose_value=False,
        callback=_remember_connect_timeout,
        help="How long to keep trying to reach the broker before giving up (exit 3).",
    )(fn)
    return broker_url_option(fn)


def json_option(fn: F) -> F:
    """``--json``: machine-readable output for scripts."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON instead of text (for scripts).")(fn)


def timeout_option(default_s: float,
                   text: str = "How long to wait for nodes to answer.") -> Callable[[F], F]:
    """``--timeout SECONDS`` for commands that wait for nodes to answer (or for anything)."""
    def wrap(fn: F) -> F:
        return click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1),
                            default=default_s, show_default=True, metavar="SECONDS",
                            help=text)(fn)
    return wrap


def since_option(*, allow_seq: bool, required: bool = False,
                 what: str = "from") -> Callable[[F], F]:
    """``--since T`` in the forms ``broker.since`` reads; the command receives a ``Since``.

    Every command that looks back in time takes the same forms, so one help text and one
    parser serve them all; ``allow_seq`` says whether ``seq:K`` means something to it.
    """
    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Since | None:
        if value is None:
            return None
        try:
            return Since.parse(value, allow_seq=allow_seq)
        except ConfigError as exc:
            raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None

    text = (f"{what.capitalize()} TIME on: an ISO time (2026-01-31T14:05:00Z; local time "
            "without a zone), seconds since the epoch, or a duration ago (30m, 2h, 7d)")
    text += "; or seq:K, the changes after seq K." if allow_seq else "."

    def wrap(fn: F) -> F:
        return click.option("--since", "since", required=required, callback=parse,
                            metavar="TIME|seq:K" if allow_seq else "TIME", help=text)(fn)
    return wrap


def make_settings(broker_url: str, **overrides: Any) -> Settings:
    """Settings from ``--broker`` and the TLS environment; bad input is a usage error.

    Every command and the worker build their settings here, so ``$TASYNC_SSL_CA_FILE``,
    ``$TASYNC_SSL_CERT_FILE`` and ``$TASYNC_SSL_KEY_FILE`` reach each of them the same way: a
    process pointed at ``amqps://`` in its environment needs no TLS options on its command
    line. TLS files given as options (``tls=tls_files(...)``) win over the environment.
    """
    tls = overrides.pop("tls", None)
    ctx = click.get_current_context(silent=True)
    if ctx is not None and _CONNECT_TIMEOUT_KEY in ctx.meta:
        timeout_s = float(ctx.meta[_CONNECT_TIMEOUT_KEY])
        overrides.setdefault("connect_timeout_s", timeout_s)
        overrides.setdefault("connect_retry_s", timeout_s)
    try:
        if tls is None or not tls.given:
            tls = tls_files()
        settings = Settings.from_env(broker_url, tls=tls, **overrides)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        check_tls_urls(settings.broker_urls, settings.tls)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    return settings


def handle_errors(fn: F) -> F:
    """Turn ``TasyncError`` into ``tasync: <message>`` on stderr and the error's exit code.

    A connection that breaks in the middle of a command (the broker restarted or dropped it)
    surfaces from the client library as an ``OSError`` or an AMQP connection error: it is the
    broker being unreachable, exit 3, said in one line.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TasyncError as exc:
            click.echo(f"tasync: {exc}", err=True)
            if _wants_json():
                print_json(error_json(exc))
            sys.exit(int(exc.exit_code))
        except amqp.exceptions.NotFound as exc:
            if "'tasync." not in str(exc):
                raise
            missing = str(exc).split("NOT_FOUND - ", 1)[-1].splitlines()[0][:200]
            click.echo(f"tasync: the virtual host has no tasync topology ({missing}): run "
                       "tasync broker setup", err=True)
            sys.exit(int(ExitCode.FAILED))
        except RECOVERABLE as exc:
            click.echo(f"tasync: lost the connection to the broker ({describe(exc)})", err=True)
            sys.exit(int(ExitCode.BROKER_UNREACHABLE))
        except KeyboardInterrupt:
            click.echo("tasync: interrupted", err=True)
            sys.exit(int(ExitCode.FAILED))
    return wrapper  # type: ignore[return-value]


def error_json(exc: TasyncError) -> dict[str, Any]:
    """An error as ``--json`` prints it: the message, its type and any field errors.

    A node's answer keeps the type it had on that node (``InvalidObject``, ``ConfigError``)
    and the field errors it sent, so a script sees which field of which object was wrong.
    """
    if isinstance(exc, RemoteError):
        kind = exc.error_type or type(exc).__name__
        errors = exc.data.get("errors") or {}
    else:
        kind = type(exc).__name__
        errors = getattr(exc, "errors", None) or {}
    return {"error": str(exc), "type": kind, "errors": errors, "exit_code": int(exc.exit_code)}


def _wants_json() -> bool:
    """Whether the running command was given ``--json``."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("as_json"))


def print_json(data: Any) -> None:
    """Print ``data`` as stable, indented JSON."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
