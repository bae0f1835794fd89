"""``tasync console``: serve the web console; ``tasync console add-user``: give someone access."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tasync.broker.errors import ConfigError
from tasync.options import make_settings, offline, timeout_option

if TYPE_CHECKING:
    from tasync.console.proxy_auth import ProxyAuth

#: A header's name: letters, digits and dashes (what proxies set and every server passes on).
_HEADER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
USERS_HELP = "The users file (NAME:ROLE:ARGON2-HASH lines; tasync console add-user writes it)."


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{value!r}: use HOST:PORT", param_hint="--listen")
    return host.strip("[]") or "127.0.0.1", int(port)


@click.group(invoke_without_command=True)
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Where to serve the console (port 0 picks a free one and prints it).")
@click.option("--users-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help=USERS_HELP + "  Required to serve.")
@click.option("--secure-cookie", is_flag=True,
              help="Mark the session cookie Secure although the console serves plain HTTP "
                   "(behind a proxy that terminates TLS). Over HTTPS it always is.")
@click.option("--poll", "poll_s", type=click.FloatRange(min=0.5), default=2.0,
              show_default=True, metavar="SECONDS",
              help="How often the network page refreshes itself.")
@click.option("--auth-header", metavar="HEADER",
              help="Believe this header (e.g. X-Remote-User), set by a reverse proxy that "
                   "authenticated the user, as the user's name; the users file gives the role. "
                   "Only from --trusted-proxy peers, or from loopback when listening on it.")
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="ADDRESS",
              help="A proxy address or network allowed to send --auth-header (repeat). "
                   "Required with --auth-header unless the console listens on loopback.")
@timeout_option(2.0, "How long to wait for nodes to answer (as tasync status --timeout).")
@click.pass_context
def console(ctx: click.Context, *, listen: str, users_file: Path | None, secure_cookie: bool,
            poll_s: float, auth_header: str | None, trusted_proxies: tuple[str, ...],
            timeout_s: float) -> None:
    """Serve the web console: the network's health and its configuration, in a browser.

    Users log in with a name and password from --users-file; viewers read (traces and dead
    letters included), operators also send test alerts and re-send dead letters, admins also
    change the configuration (through the master, as tasync config does) and promote a
    backup. What they do goes to the trail with their name. Put it behind a TLS-terminating
    proxy (with --secure-cookie) to reach it from elsewhere than this host; that proxy may
    also authenticate users and name them in --auth-header.

    \b
    Examples:
      tasync console add-user alice --role admin --users-file console.users
      tasync console --listen 127.0.0.1:8080 --users-file console.users
      tasync console --listen 0.0.0.0:8443 --users-file /etc/tasync/console.users --secure-cookie
      tasync console --users-file console.users --auth-header X-Remote-User --secure-cookie
    """
    if ctx.invoked_subcommand is not None:
        return
    if users_file is None:
        raise click.UsageError("give --users-file (make one with tasync console add-user)")
    from tasync.console.app import console_part
    from tasync.console.users import UsersFile
    from tasync.web import bind, build_app, serve

    if UsersFile(users_file).count() == 0:
        raise ConfigError(f"{users_file} has no users: add one with tasync console add-user")
    host, port = _listen(listen)
    proxy_auth = _proxy_auth(auth_header, trusted_proxies, host)
    _log_to_stderr()
    part = console_part(make_settings(), users_file, secure_cookie=secure_cookie,
                        timeout_s=timeout_s, poll_s=poll_s, proxy_auth=proxy_auth)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    click.echo(f"console listening on http://{bound_host!s}:{bound_port}", err=True)
    click.echo(f"{bound_host!s}:{bound_port}")
    sys.stdout.flush()
    serve(build_app([part]), sock, proxy_headers=proxy_auth is None)


def _proxy_auth(header: str | None, proxies: tuple[str, ...], host: str) -> ProxyAuth | None:
    """The ``ProxyAuth`` the options ask for (None without ``--auth-header``), checked."""
    from tasync.console.proxy_auth import ProxyAuth, is_loopback, parse_proxies

    if header is None:
        if proxies:
            raise click.UsageError("--trusted-proxy only means something with --auth-header")
        return None
    if not _HEADER_RE.fullmatch(header):
        raise click.BadParameter(f"{header!r} is not a header name", param_hint="--auth-header")
    if not proxies and not is_loopback(host):
        raise click.UsageError(f"--auth-header on {host}, which is not loopback, needs "
                               "--trusted-proxy: otherwise anyone reaching the console could "
                               "name any user")
    try:
        trusted = parse_proxies(proxies)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--trusted-proxy") from None
    return ProxyAuth(header.lower(), trusted)


def _log_to_stderr() -> None:
    """Logins, refusals and changes as lines on stderr (names quoted; never a password)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("tasync.console")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@offline
@console.command("add-user")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), required=True,
              help="viewer reads; operator also sends and re-sends alerts; admin also "
                   "changes the configuration and promotes.")
@click.option("--users-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              metavar="FILE", help=USERS_HELP)
def add_user(*, name: str, role: str, users_file: Path) -> None:
    """Add a console user, or set a user's role and password anew.

    The password is asked for twice on a terminal, or read as the first line of standard
    input (for scripts). Only its argon2 hash is written, to a file only its owner can read.

    \b
    Examples:
      tasync console add-user alice --role admin --users-file console.users
      tasync console add-user bob --role viewer --users-file console.users < password.txt
    """
    from tasync.console.users import add_user as add

    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ConfigError("no password given on standard input")
    new = add(users_file, name, role, password)
    click.echo(f"{'added' if new else 'updated'} {name} ({role}) in {users_file}")
