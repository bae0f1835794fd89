"""Typed, frozen settings built from a URL or the environment.

Every process of tasync (worker, CLI, benchmarks) builds one ``Settings`` and passes it down, so
timeouts and limits have one home and carry their unit in their name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/%2F"
ENV_BROKER_URL = "TASYNC_BROKER_URL"
ENV_CLUSTER_KEY_FILE = "TASYNC_CLUSTER_KEY_FILE"
ENV_SMTP_URL = "TASYNC_SMTP_URL"
ENV_MAIL_HOSTNAME = "TASYNC_MAIL_HOSTNAME"
ENV_SSL_CA_FILE = "TASYNC_SSL_CA_FILE"
ENV_SSL_CERT_FILE = "TASYNC_SSL_CERT_FILE"
ENV_SSL_KEY_FILE = "TASYNC_SSL_KEY_FILE"
ENV_RABBITMQCTL = "TASYNC_RABBITMQCTL"
ENV_DEDUP_WINDOW = "TASYNC_DEDUP_WINDOW_S"
ENV_DELIVERY_ATTEMPTS = "TASYNC_DELIVERY_ATTEMPTS"
ENV_DELIVERY_BACKOFF = "TASYNC_DELIVERY_BACKOFF_S"
ENV_DELIVERY_TIMEOUT = "TASYNC_DELIVERY_TIMEOUT_S"
ENV_CACHE_DIR = "TASYNC_CACHE_DIR"
#: Fault injection for the recovery tests (``before-publish``), not a setting for operators.
ENV_FAILPOINT = "TASYNC_FAILPOINT"

#: How long a node remembers a settled alert id (``$TASYNC_DEDUP_WINDOW_S``), in seconds.
DEFAULT_DEDUP_WINDOW_S = 3600.0


#: Set by systemd to ``DEVICE:INODE`` of the journal stream it connected stdout/stderr to.
ENV_JOURNAL_STREAM = "JOURNAL_STREAM"


def stderr_is_journal() -> bool:
    """Whether stderr is systemd's journal stream (then lines may carry a ``<N>`` priority).

    systemd sets ``$JOURNAL_STREAM`` for the service's own stdout/stderr; comparing it with
    stderr's device and inode tells a redirected stderr (``2>file``) from the journal.
    """
    value = os.environ.get(ENV_JOURNAL_STREAM, "")
    device, _, inode = value.partition(":")
    try:
        info = os.fstat(2)
        return bool(value) and (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False

#: Alert sources every node names in its metrics; any other source is counted as ``other``.
DEFAULT_METRICS_SOURCES = ("alertmanager", "cli", "intake")


def split_urls(value: str) -> tuple[str, ...]:
    """Split a ``;``-separated list of broker URLs, dropping blanks.

    Several URLs name the nodes of one RabbitMQ cluster (or fallbacks); they are tried in order.
    """
    urls = tuple(part.strip() for part in value.split(";") if part.strip())
    if not urls:
        raise ValueError("no broker URL given")
    for url in urls:
        scheme = urlsplit(url).scheme
        if scheme not in ("amqp", "amqps", "memory"):
            raise ValueError(f"unsupported broker URL scheme {scheme!r} in {redact_url(url)}")
    return urls


def redact_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***`` so it can be logged or printed."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def vhost_of(url: str) -> str:
    """The virtual host a URL names (``/`` when the path is empty), percent-decoded."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """The files of TLS to the broker, for ``amqps://`` URLs (``tasync.broker.tls`` checks them).

    Attributes:
        ca_file: CA bundle that signed the broker's certificate (None: the system's CAs).
        cert_file: client certificate (PEM), for brokers that require one.
        key_file: the client certificate's private key (None when ``cert_file`` holds both).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def given(self) -> bool:
        """Whether any TLS file is set."""
        return bool(self.ca_file or self.cert_file or self.key_file)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TlsFiles:
        """``$TASYNC_SSL_CA_FILE``, ``$TASYNC_SSL_CERT_FILE`` and ``$TASYNC_SSL_KEY_FILE``."""
        env = os.environ if environ is None else environ
        return cls(ca_file=env.get(ENV_SSL_CA_FILE, "").strip() or None,
                   cert_file=env.get(ENV_SSL_CERT_FILE, "").strip() or None,
                   key_file=env.get(ENV_SSL_KEY_FILE, "").strip() or None)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a tasync process needs to reach the broker and pace its work.

    Attributes:
        broker_urls: broker URLs tried in order; ``repr`` shows them without passwords.
        heartbeat_s: AMQP heartbeat; a hung peer is detected after about two of these.
        seat_heartbeat_s: heartbeat of the master seat's connection: a hung master loses the
            seat (and a promotion can proceed) within about twice this.
        delivery_heartbeat_s: heartbeat of a node's alert-delivery connection: the broker moves
            a hung node's alerts to the next node of their list within about twice this.
        connect_timeout_s: how long one connection attempt may take.
        connect_retry_s: how long a process keeps retrying before it reports the broker down.
        confirm_timeout_s: how long a publish may wait for the broker's confirm.
        rpc_timeout_s: how long a CLI request waits for a node's answer.
        prefetch: unacknowledged messages a consumer may hold.
        batch_max_changes: changes per replication message in bulk.
        batch_max_bytes: upper bound on one replication message's body.
        publish_window_bytes: most replication bytes the master has published and the broker
            not yet confirmed; bounds the broker's and the master's memory in a bulk import.
        max_message_bytes: a consumer quarantines anything larger.
        changelog_max_age: stream retention by age (RabbitMQ ``x-max-age`` syntax).
        changelog_max_bytes: stream retention by size.
        changelog_segment_bytes: stream segment size; small so that age retention trims.
        handled_max_age_s: retention by age of ``tasync.handled``, the stream of alert ids
            the nodes settled; must stay well above every node's duplicate window.
        handled_max_bytes: retention by size of that stream.
        handled_segment_bytes: its segment size; small so that age retention trims.
        handled_catch_up_s: how long a starting node waits to have read that stream up to now
            before it takes alerts anyway (and says so in its trail).
        list_check_s: how often a node looks at every precedence list's queue (stranded
            lists), the dead-letter queue and the quarantine.
        metrics_sources: alert sources named in the metrics' ``source`` label; the rest are
            counted as ``other``, so a client cannot grow the number of series.
    """

    broker_urls: tuple[str, ...] = (DEFAULT_BROKER_URL,)
    heartbeat_s: float = 10.0
    seat_heartbeat_s: float = 2.0
    delivery_heartbeat_s: float = 1.0
    connect_timeout_s: float = 5.0
    connect_retry_s: float = 30.0
    confirm_timeout_s: float = 30.0
    rpc_timeout_s: float = 10.0
    prefetch: int = 64
    batch_max_changes: int = 1000
    batch_max_bytes: int = 1 << 20
    publish_window_bytes: int = 8 << 20
    max_message_bytes: int = 4 << 20
    changelog_max_age: str = "7D"
    changelog_max_bytes: int = 2 << 30
    changelog_segment_bytes: int = 8 << 20
    handled_max_age_s: int = 86_400
    handled_max_bytes: int = 1 << 30
    handled_segment_bytes: int = 4 << 20
    handled_catch_up_s: float = 30.0
    list_check_s: float = 5.0
    metrics_sources: tuple[str, ...] = DEFAULT_METRICS_SOURCES
    tls: TlsFiles = field(default_factory=lambda: TlsFiles(), compare=False)

    def __repr__(self) -> str:
        urls = ";".join(redact_url(u) for u in self.broker_urls)
        return f"Settings(broker_urls={urls!r}, heartbeat_s={self.heartbeat_s})"

    @property
    def vhost(self) -> str:
        """The virtual host of the first URL: one tasync network lives in one vhost."""
        return vhost_of(self.broker_urls[0])

    @property
    def display_urls(self) -> str:
        """The URLs as they may be shown to people and logs."""
        return ";".join(redact_url(u) for u in self.broker_urls)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Settings:
        """Build settings from one or several ``;``-separated broker URLs."""
        return cls(broker_urls=split_urls(url), **overrides)

    @classmethod
    def from_env(cls, url: str | None = None, **overrides: Any) -> Settings:
        """Build settings from ``url``, else ``$TASYNC_BROKER_URL``, else the default URL."""
        chosen = url or os.environ.get(ENV_BROKER_URL) or DEFAULT_BROKER_URL
        return cls.from_url(chosen, **overrides)

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (settings are frozen)."""
        return replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class MailSettings:
    """How a node sends mail when a destination's URL leaves it open.

    Attributes:
        smtp_url: the server for ``mailto:`` destinations without ``?smtp=`` (``HOST[:PORT]`` or
            ``smtp(s)://[user:pw@]host[:port]``); empty means localhost:25.
        hostname: the name this node gives itself in mail: the ``Message-ID`` domain, the
            default ``From`` (``tasync@<hostname>``) and the SMTP greeting. ``getfqdn()`` is
            often just "localhost" in containers, which makes every Message-ID look alike and
            some servers refuse the greeting, so it can be set; empty means the host name.
    """

    smtp_url: str = ""
    hostname: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MailSettings:
        """``$TASYNC_SMTP_URL`` and ``$TASYNC_MAIL_HOSTNAME``."""
        env = os.environ if environ is None else environ
        return cls(smtp_url=env.get(ENV_SMTP_URL, "").strip(),
                   hostname=env.get(ENV_MAIL_HOSTNAME, "").strip())


@dataclass(frozen=True, kw_only=True)
class IntakeSettings:
    """Limits and timings of the HTTP intake (``tasync intake``).

    The timings are short on purpose: a caller such as Alertmanager gives up on a request
    after its own deadline, so an intake that cannot reach the broker must say so (503 with
    ``Retry-After``) at once rather than when the caller stopped listening.

    Attributes:
        max_body_bytes: a larger request is refused with 413. Alertmanager's webhook has no
            size limit of its own and treats 413 as final, so the default takes several
            thousand alerts with large annotations.
        max_alerts: alerts per ``POST /alerts`` request; more is 413 (split the request).
            Alertmanager notifications are bounded by ``max_body_bytes`` only.
        senders: broker connections publishing side by side; a request borrows one.
        sender_wait_s: how long a request waits for a free connection before 503.
        connect_timeout_s: one connection attempt to one broker URL.
        connect_retry_s: how long a request keeps reconnecting before it answers 503.
        confirm_timeout_s: how long a publish waits for the broker's confirms.
        probe_interval_s: while the broker is away, how often the intake tries it again;
            requests meanwhile are answered 503 at once.
        retry_after_s: the ``Retry-After`` of a 503.
        route_cache_s: how long a route's hosts are reused before the master is asked again.
        retry_window_s: an Alertmanager notification seen again within this time of its last
            attempt is a retry and keeps its alert ids; later, it is a reminder with new ids.
            Shorter than the receivers' ``repeat_interval``, longer than Alertmanager's pause
            between two retries (one minute at most).
    """

    max_body_bytes: int = 16 << 20
    max_alerts: int = 10_000
    senders: int = 4
    sender_wait_s: float = 10.0
    connect_timeout_s: float = 1.0
    connect_retry_s: float = 0.5
    confirm_timeout_s: float = 5.0
    probe_interval_s: float = 2.0
    retry_after_s: int = 5
    route_cache_s: float = 10.0
    retry_window_s: float = 300.0

    def broker(self, settings: Settings) -> Settings:
        """The broker settings of the intake's connections: its own timeouts."""
        return settings.with_(connect_timeout_s=self.connect_timeout_s,
                              connect_retry_s=self.connect_retry_s,
                              confirm_timeout_s=self.confirm_timeout_s)


def key_file_from_env(environ: Mapping[str, str] | None = None) -> Path | None:
    """The key file named by ``$TASYNC_CLUSTER_KEY_FILE``, or ``None`` when unset or blank.

    Args:
        environ: the environment to read; ``os.environ`` by default (tests pass a dict).
    """
    value = (os.environ if environ is None else environ).get(ENV_CLUSTER_KEY_FILE, "").strip()
    return Path(value).expanduser() if value else None


def rabbitmqctl_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The command that runs ``rabbitmqctl``: ``$TASYNC_RABBITMQCTL``, else ``rabbitmqctl``."""
    return (os.environ if environ is None else environ).get(ENV_RABBITMQCTL, "rabbitmqctl")


def dedup_window_from_env(environ: Mapping[str, str] | None = None) -> float:
    """The duplicate window from ``$TASYNC_DEDUP_WINDOW_S`` (seconds), else one hour.

    Raises:
        ValueError: the variable is not a non-negative number (the message names it).
    """
    raw = (os.environ if environ is None else environ).get(ENV_DEDUP_WINDOW, "").strip()
    if not raw:
        return DEFAULT_DEDUP_WINDOW_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ValueError(f"{ENV_DEDUP_WINDOW} must be a number of seconds, got {raw!r}")
    return value


def delivery_retry_from_env(environ: Mapping[str, str] | None = None
                            ) -> tuple[str | None, str | None, str | None]:
    """``$TASYNC_DELIVERY_ATTEMPTS``, ``_BACKOFF_S`` and ``_TIMEOUT_S`` as set (None: unset).

    ``tasync.consumers.delivery.executor.RetryPolicy`` applies its defaults and checks the values.
    """
    env = os.environ if environ is None else environ
    return (env.get(ENV_DELIVERY_ATTEMPTS) or None, env.get(ENV_DELIVERY_BACKOFF) or None,
            env.get(ENV_DELIVERY_TIMEOUT) or None)


def cache_dir_from_env(environ: Mapping[str, str] | None = None) -> Path:
    """Where the command line keeps what it caches: ``$TASYNC_CACHE_DIR``, else the XDG cache."""
    env = os.environ if environ is None else environ
    base = env.get(ENV_CACHE_DIR) or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tasync")
    return Path(base)


def failpoint_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The fault the tests asked a worker to inject (``$TASYNC_FAILPOINT``), else ``""``.

    The names and what each does: ``tasync.producers.relay.RelayFaults``.
    """
    return (os.environ if environ is None else environ).get(ENV_FAILPOINT, "").strip()
