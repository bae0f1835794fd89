"""Click options shared by the commands, and the one place errors become exit codes.

``--broker URL`` and ``--connect-timeout SECONDS`` belong to the whole command line, not to one
command, so they are declared once here (``GLOBAL_OPTIONS``) and given to the ``tasync`` group:
``tasync --broker URL status``. Scripts also put them after the command (``tasync status
--broker URL --json``), so ``prepare`` hands the same two options to every command that talks
to the broker when the group loads it. Wherever they are given, their values go to the click
context (``ctx.meta``), a value given after the command wins over one given before it, and
``make_settings`` reads them there: no command takes them as parameters of its own.

``prepare`` also wraps every command in ``handle_errors``: a ``TasyncError`` raised anywhere
below becomes a one-line message on stderr and its exit code, never a traceback.

Imports are kept light (the broker client is imported when a command needs it), because the
``tasync`` group imports this module to list its commands.
"""

from __future__ import annotations

import functools
import json
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tasync.broker.errors import ConfigError, ConnectionLost, ExitCode, RemoteError, TasyncError
from tasync.broker.settings import DEFAULT_BROKER_URL, ENV_BROKER_URL

if TYPE_CHECKING:
    from tasync.broker.settings import Settings
    from tasync.broker.since import Since

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=click.Command)


#: Where the global options keep their values in the click context's ``meta``.
_BROKER_URL_KEY = "tasync.broker_url"
_CONNECT_TIMEOUT_KEY = "tasync.connect_timeout_s"
#: A person is waiting: give up on an unreachable broker after this long (loopback answers
#: or refuses within milliseconds; a remote broker within a second or so).
DEFAULT_CONNECT_TIMEOUT_S = 2.0


def _remember(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback that keeps an option's value in ``ctx.meta`` under ``key``.

    The group parses its options before the command does, so the command's own value replaces
    the group's only when it was typed on the command line; an unset one (its default, or the
    environment) leaves what the group found.
    """
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        typed = ctx.get_parameter_source(str(param.name)) is click.core.ParameterSource.COMMANDLINE
        if typed or key not in ctx.meta:
            ctx.meta[key] = value
        return value
    return callback


def broker_url_param() -> click.Option:
    """``--broker URL``: several URLs separated by ``;`` are tried in order."""
    return click.Option(
        ["--broker", "broker_url"], envvar=ENV_BROKER_URL, default=DEFAULT_BROKER_URL,
        show_default="$TASYNC_BROKER_URL or " + DEFAULT_BROKER_URL.replace("guest:guest@", ""),
        metavar="URL", help="Broker URL(s); separate several with ';' to fail over in order.",
        expose_value=False, callback=_remember(_BROKER_URL_KEY))


def connect_timeout_param() -> click.Option:
    """``--connect-timeout SECONDS``: how long a person waits for an unreachable broker."""
    return click.Option(
        ["--connect-timeout", "connect_timeout_s"], type=click.FloatRange(min=0.1),
        default=DEFAULT_CONNECT_TIMEOUT_S, show_default=True, metavar="SECONDS",
        help="How long to keep trying to reach the broker before giving up (exit 3).",
        expose_value=False, callback=_remember(_CONNECT_TIMEOUT_KEY))


#: The options of the ``tasync`` group that every command talking to the broker also takes.
GLOBAL_OPTIONS: tuple[Callable[[], click.Option], ...] = (broker_url_param,
                                                          connect_timeout_param)


def with_options(*params: Callable[[], click.Parameter]) -> Callable[[C], C]:
    """Add a fresh copy of each of ``params`` after the options ``command`` has (once)."""
    def add(command: C) -> C:
        have = {p.name for p in command.params}
        command.params.extend(p for p in (make() for make in params) if p.name not in have)
        return command
    return add


_prepared: weakref.WeakSet[click.Command] = weakref.WeakSet()
_offline: weakref.WeakSet[click.Command] = weakref.WeakSet()


def offline(command: C) -> C:
    """Mark a command of a connecting group that never talks to the broker (no global options)."""
    _offline.add(command)
    return command


def is_offline(command: click.Command) -> bool:
    """Whether ``command`` was marked ``offline``."""
    return command in _offline


def prepare(command: click.Command, *, connects: bool) -> click.Command:
    """Give ``command`` and every command below it what each tasync command has.

    Every callback runs under ``handle_errors``; with ``connects``, every command that runs
    (not the groups between, unless a group runs without a subcommand too), except those
    marked ``offline``, also takes ``GLOBAL_OPTIONS``, listed after its own options.
    Safe to call again on the same command: it is changed once.
    """
    for each in _walk(command):
        if each in _prepared:
            continue
        _prepared.add(each)
        if each.callback is not None:
            each.callback = handle_errors(each.callback)
        runs = not isinstance(each, click.Group) or each.invoke_without_command
        if connects and runs and each not in _offline:
            with_options(*GLOBAL_OPTIONS)(each)
    return command


def _walk(command: click.Command) -> Iterator[click.Command]:
    yield command
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _walk(sub)


def broker_url() -> str | None:
    """The ``--broker`` URL(s) of the running command.

    None outside a command that takes ``--broker``; ``Settings.from_env`` then reads
    ``$TASYNC_BROKER_URL``.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is None or _BROKER_URL_KEY not in ctx.meta:
        return None
    return str(ctx.meta[_BROKER_URL_KEY])


def connect_timeout_s() -> float | None:
    """The ``--connect-timeout`` of the running command, or None where it takes none."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or _CONNECT_TIMEOUT_KEY not in ctx.meta:
        return None
    return float(ctx.meta[_CONNECT_TIMEOUT_KEY])


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
    """``--since T`` in the forms ``tasync.broker.since`` reads; the command receives a ``Since``.

    Every command that looks back in time takes the same forms, so one help text and one
    parser serve them all; ``allow_seq`` says whether ``seq:K`` means something to it.
    """
    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Since | None:
        from tasync.broker.since import Since

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


def make_settings(**overrides: Any) -> Settings:
    """Settings from ``--broker``, ``--connect-timeout`` and the TLS environment.

    Every command and the worker build their settings here, so ``$TASYNC_SSL_CA_FILE``,
    ``$TASYNC_SSL_CERT_FILE`` and ``$TASYNC_SSL_KEY_FILE`` reach each of them the same way: a
    process pointed at ``amqps://`` in its environment needs no TLS options on its command
    line. TLS files given as options (``tls=tls_files(...)``) win over the environment. Bad
    input is a usage error (exit 2).
    """
    from tasync.broker.settings import Settings
    from tasync.broker.tls import check_tls_urls, tls_files

    tls = overrides.pop("tls", None)
    timeout_s = connect_timeout_s()
    if timeout_s is not None:
        overrides.setdefault("connect_timeout_s", timeout_s)
        overrides.setdefault("connect_retry_s", timeout_s)
    try:
        if tls is None or not tls.given:
            tls = tls_files()
        settings = Settings.from_env(broker_url(), tls=tls, **overrides)
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

    With ``--json`` the error is also printed on stdout (``error_json``). Two failures of the
    client library are said the same way: a 404 for one of tasync's exchanges or queues is
    the virtual host lacking the topology (``TopologyMissing``, exit 1), and a connection that
    breaks in the middle of a command (an ``OSError`` or an AMQP connection error) is the
    broker lost (``ConnectionLost``, exit 3).
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("tasync: interrupted", err=True)
            sys.exit(int(ExitCode.FAILED))
        except Exception as exc:
            error = _as_tasync_error(exc)
            if error is None:
                raise
            click.echo(f"tasync: {error}", err=True)
            if _wants_json():
                print_json(error_json(error))
            sys.exit(int(error.exit_code))
    return wrapper  # type: ignore[return-value]


def _as_tasync_error(exc: Exception) -> TasyncError | None:
    """``exc`` as the ``TasyncError`` it means, or None for a bug (shown as a traceback)."""
    if isinstance(exc, TasyncError):
        return exc
    import amqp.exceptions

    from tasync.broker import topology
    from tasync.broker.connection import RECOVERABLE, describe

    if isinstance(exc, amqp.exceptions.NotFound):
        return topology.missing_error(exc)
    if isinstance(exc, RECOVERABLE):
        return ConnectionLost(f"lost the connection to the broker ({describe(exc)})")
    return None


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
