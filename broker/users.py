"""Creating tasync's broker users idempotently through ``rabbitmqctl``.

``tasync broker setup --users`` must be safe to run again and again: after the first run it
changes nothing, and it never changes a password it did not just generate (running nodes would
lose their connection at the next reconnect). So it reads the current users, permissions and
topic permissions once, and issues only the commands that close the difference.

Why ``rabbitmqctl`` rather than AMQP: user management is not part of AMQP, and the management
HTTP API is an optional plugin. ``rabbitmqctl`` authenticates with the Erlang cookie, so it runs
on a broker host as root or as the ``rabbitmq`` user (or through ``--rabbitmqctl`` with any
command prefix that reaches one, such as ``ssh broker1 sudo rabbitmqctl``). Passwords go to it
on standard input, never on a command line where ``ps`` would show them.

Generated passwords are written to a credentials file created with mode 0600; they are never
logged and never printed unless the operator asks.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from tasync.broker.errors import BrokerAdminError, ConfigError
from tasync.broker.permissions import Account, Permissions, permissions_for
from tasync.broker.settings import rabbitmqctl_from_env

#: 32 random bytes, URL-safe base64: no character needs escaping in a broker URL.
PASSWORD_BYTES = 32


def generate_password() -> str:
    """A fresh, strong password for a broker user."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


class RabbitCtl:
    """Runs ``rabbitmqctl`` (or a prefix such as ``docker exec ID rabbitmqctl``).

    Args:
        command: the command line to run, split shell-style; default ``$TASYNC_RABBITMQCTL``
            or ``rabbitmqctl``.
        timeout_s: how long one call may take (each starts an Erlang VM, about a second).
    """

    def __init__(self, command: str | Sequence[str] | None = None, *,
                 timeout_s: float = 120.0) -> None:
        raw = command if command is not None else rabbitmqctl_from_env()
        self.argv = shlex.split(raw) if isinstance(raw, str) else list(raw)
        if not self.argv:
            raise ConfigError("--rabbitmqctl is empty")
        self.timeout_s = timeout_s

    def check_available(self) -> None:
        """Fail early, with advice, when the command does not exist here."""
        exe = self.argv[0]
        if _which(exe) is None:
            raise BrokerAdminError(
                f"{exe} not found: run `tasync broker setup --users` on a RabbitMQ host as root "
                "or the rabbitmq user, or name a command that reaches one with --rabbitmqctl")

    def run(self, *args: str, stdin: str | None = None) -> str:
        """Run one command; returns stdout. ``stdin`` carries a password, never argv."""
        exe = _which(self.argv[0]) or self.argv[0]
        try:
            out = subprocess.run([exe, *self.argv[1:], *args], input=stdin, capture_output=True,
                                 text=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError:
            self.check_available()
            raise
        except subprocess.TimeoutExpired:
            raise BrokerAdminError(
                f"rabbitmqctl {args[0]} did not finish within {self.timeout_s:g} s") from None
        if out.returncode != 0:
            raise BrokerAdminError(f"rabbitmqctl {args[0]} failed: {_first_line(out)}")
        return out.stdout

    def json(self, *args: str) -> Any:
        """Run a ``list_*`` command with ``--formatter json`` and parse its output."""
        text = self.run(*args, "--formatter", "json", "--quiet")
        start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
        if start < 0:
            return []
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError as exc:
            raise BrokerAdminError(f"rabbitmqctl {args[0]} printed unexpected output: "
                                   f"{exc}") from None


def _which(exe: str) -> str | None:
    """Find ``exe`` also in the sbin directories a non-login PATH lacks."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which(exe, path=search)


def _first_line(out: subprocess.CompletedProcess[str]) -> str:
    for text in (out.stderr, out.stdout):
        for line in text.splitlines():
            line = line.strip()
            if line and not line.lower().startswith(("password", "listing", "adding")):
                return line.removeprefix("Error:").strip()[:300]
    return f"exit status {out.returncode}"


@dataclass
class Outcome:
    """What ``ensure_accounts`` did for one account.

    Attributes:
        account: the account.
        action: ``created``, ``password reset``, ``updated``, ``unchanged`` or ``failed``.
        password: the new password when one was set in this run, else None.
        changes: which parts changed (``permissions``, ``topic tasync.control``, ``tags``).
        error: why it failed (``rabbitmqctl``'s first error line), else None.
    """

    account: Account
    action: str
    password: str | None = None
    changes: list[str] = field(default_factory=list)
    error: str | None = None

    def __repr__(self) -> str:  # never show the password, even in a traceback
        return f"Outcome({self.account.name!r}, {self.action!r}, changes={self.changes!r})"

    def summary(self) -> dict[str, Any]:
        """JSON-ready, password-free."""
        row: dict[str, Any] = {"user": self.account.name, "role": self.account.label,
                               "action": self.action, "changes": self.changes}
        if self.error:
            row["error"] = self.error
        return row


@dataclass(frozen=True)
class _Current:
    """What the broker holds now, read with three list calls."""

    users: dict[str, tuple[str, ...]]
    perms: dict[str, tuple[str, str, str]]
    topics: dict[tuple[str, str], tuple[str, str]]


def _read_current(ctl: RabbitCtl, vhost: str) -> _Current:
    """Users, permissions and topic permissions, read side by side (each call is a VM start)."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        calls = [pool.submit(ctl.json, "list_users"),
                 pool.submit(ctl.json, "list_permissions", "-p", vhost),
                 pool.submit(ctl.json, "list_topic_permissions", "-p", vhost)]
        try:
            raw_users, raw_perms, raw_topics = (call.result() for call in calls)
        except BrokerAdminError as exc:
            if "does not exist" in str(exc):
                hint = f"rabbitmqctl add_vhost {shlex.quote(vhost)}"
                raise ConfigError(f"virtual host {vhost!r} does not exist on the broker: "
                                  f"create it first ({hint})") from None
            raise
    users = {str(u["user"]): tuple(sorted(_tags(u.get("tags")))) for u in raw_users}
    perms = {str(p["user"]): (str(p["configure"]), str(p["write"]), str(p["read"]))
             for p in raw_perms}
    topics = {(str(t["user"]), str(t["exchange"])): (str(t["write"]), str(t["read"]))
              for t in raw_topics}
    return _Current(users, perms, topics)


def refuse_shared(ctl: RabbitCtl, vhost: str, existing: Sequence[str]) -> None:
    """Refuse, before changing anything, users that already have rights on another vhost.

    RabbitMQ users belong to the whole broker, not to a virtual host; permissions are per
    vhost. Two tasync networks (two vhosts) on one broker with the same node names would
    otherwise share the user ``a``: node ``a`` of one network could log in to the other, and
    the second setup would write no password for ``a`` (it keeps an existing user's), leaving
    that network without working credentials. Each network therefore needs its own names.

    Raises:
        ConfigError: naming the first such user and the vhosts it already has rights on.
    """
    if not existing:
        return
    with ThreadPoolExecutor(max_workers=min(4, len(existing))) as pool:
        rights = list(pool.map(lambda u: ctl.json("list_user_permissions", u), existing))
    for user, entries in zip(existing, rights, strict=True):
        others = sorted({str(e.get("vhost")) for e in entries} - {vhost})
        if others:
            raise ConfigError(
                f"broker user {user!r} already has permissions on virtual host "
                f"{', '.join(repr(o) for o in others)}: RabbitMQ users are broker-wide, so "
                f"a second tasync network on this broker needs its own node, admin and sender "
                f"names (nothing was changed)")


def _tags(raw: Any) -> list[str]:
    if isinstance(raw, list):
        return [str(t) for t in raw]
    return [t for t in str(raw or "").replace(",", " ").split() if t]


def ensure_accounts(ctl: RabbitCtl, vhost: str, accounts: Iterable[Account], *,
                    reset_passwords: bool = False, parallel: int = 4) -> list[Outcome]:
    """Create or update every account so the broker matches ``permissions_for`` exactly.

    Existing users keep their password unless ``reset_passwords``; tags, permissions and topic
    permissions on ``vhost`` are set only where they differ, and topic permissions this module
    does not want (for example left from an earlier role) are cleared.

    A command that fails marks its account ``failed`` (with the reason) without stopping the
    others, so that the caller can still save every password that was set before it reports
    the failure.

    Raises:
        ConfigError: the virtual host does not exist, or a wanted user already belongs to
            another virtual host (``refuse_shared``); nothing was changed then.
        BrokerAdminError: ``rabbitmqctl`` is missing or cannot list users.
    """
    ctl.check_available()
    current = _read_current(ctl, vhost)
    wanted = list(accounts)
    refuse_shared(ctl, vhost, [a.name for a in wanted if a.name in current.users])
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(lambda a: _ensure_one(ctl, vhost, a, current, reset_passwords),
                             wanted))


def _ensure_one(ctl: RabbitCtl, vhost: str, account: Account, current: _Current,
                reset: bool) -> Outcome:
    outcome = Outcome(account, "unchanged")
    try:
        _converge(ctl, vhost, account, current, reset, outcome)
    except BrokerAdminError as exc:
        outcome.action, outcome.error = "failed", str(exc)
    return outcome


def _converge(ctl: RabbitCtl, vhost: str, account: Account, current: _Current, reset: bool,
              outcome: Outcome) -> None:
    want = permissions_for(account)
    name = account.name
    if name not in current.users:
        outcome.password = generate_password()
        ctl.run("add_user", name, stdin=outcome.password + "\n")
        outcome.action = "created"
    elif reset:
        outcome.password = generate_password()
        ctl.run("change_password", name, stdin=outcome.password + "\n")
        outcome.action = "password reset"
    if current.users.get(name, ()) != tuple(sorted(want.tags)):
        ctl.run("set_user_tags", name, *want.tags)
        outcome.changes.append("tags")
    if current.perms.get(name) != (want.configure, want.write, want.read):
        ctl.run("set_permissions", "-p", vhost, name, want.configure, want.write, want.read)
        outcome.changes.append("permissions")
    _ensure_topics(ctl, vhost, name, want, current, outcome)
    if outcome.action == "unchanged" and outcome.changes:
        outcome.action = "updated"


def _ensure_topics(ctl: RabbitCtl, vhost: str, name: str, want: Permissions,
                   current: _Current, outcome: Outcome) -> None:
    wanted = {t.exchange: (t.write, t.read) for t in want.topics}
    for exchange, (write, read) in wanted.items():
        if current.topics.get((name, exchange)) != (write, read):
            ctl.run("set_topic_permissions", "-p", vhost, name, exchange, write, read)
            outcome.changes.append(f"topic {exchange}")
    for user, exchange in current.topics:
        if user == name and exchange not in wanted:
            ctl.run("clear_topic_permissions", "-p", vhost, name, exchange)
            outcome.changes.append(f"topic {exchange} cleared")


# -- credentials file ---------------------------------------------------------------------------


def user_urls(broker_urls: Sequence[str], user: str, password: str) -> str:
    """The ``;``-separated broker URLs with ``user:password`` in place of their credentials."""
    out = []
    for url in broker_urls:
        parts = urlsplit(url)
        host = parts.netloc.rsplit("@", 1)[-1]
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        out.append(urlunsplit(parts._replace(netloc=f"{auth}@{host}")))
    return ";".join(out)


def load_credentials(path: Path) -> dict[str, Any]:
    """Read a credentials file written earlier (empty when it does not exist)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read credentials file {path}: {type(exc).__name__}") from None
    if not isinstance(data, dict) or not isinstance(data.get("users", {}), dict):
        raise ConfigError(f"{path} is not a tasync credentials file")
    return data


def write_credentials(path: Path, *, vhost: str, broker_urls: Sequence[str],
                      outcomes: Iterable[Outcome]) -> int:
    """Merge the passwords set in this run into ``path`` (mode 0600); returns how many.

    Entries of users whose password did not change are kept as they are. The file is replaced
    atomically and is never readable by others, not even for a moment.
    """
    data = load_credentials(path)
    users: dict[str, Any] = dict(data.get("users", {}))
    fresh = [o for o in outcomes if o.password is not None]
    for outcome in fresh:
        assert outcome.password is not None
        users[outcome.account.name] = {
            "role": outcome.account.label,
            "password": outcome.password,
            "url": user_urls(broker_urls, outcome.account.name, outcome.password),
        }
    document = {
        "comment": "tasync broker credentials; keep this file secret (mode 0600). Each node "
                   "uses its url as TASYNC_BROKER_URL or --broker.",
        "vhost": vhost,
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "users": dict(sorted(users.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(path, 0o600)
    return len(fresh)
