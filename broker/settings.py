"""Typed, frozen settings built from a URL or the environment.

Every process of tasync (worker, CLI, benchmarks) builds one ``Settings`` and passes it down, so
timeouts and limits have one home and carry their unit in their name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/%2F"
ENV_BROKER_URL = "TASYNC_BROKER_URL"
ENV_CLUSTER_KEY_FILE = "TASYNC_CLUSTER_KEY_FILE"
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
class Settings:
    """Everything a tasync process needs to reach the broker and pace its work.

    Attributes:
        broker_urls: broker URLs tried in order; ``repr`` shows them without passwords.
        heartbeat_s: AMQP heartbeat; a hung peer is detected after about two of these.
        connect_timeout_s: how long one connection attempt may take.
        connect_retry_s: how long a process keeps retrying before it reports the broker down.
        confirm_timeout_s: how long a publish may wait for the broker's confirm.
        rpc_timeout_s: how long a CLI request waits for a node's answer.
        prefetch: unacknowledged messages a consumer may hold.
        batch_max_changes: changes per replication message in bulk.
        batch_max_bytes: upper bound on one replication message's body.
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
    connect_timeout_s: float = 5.0
    connect_retry_s: float = 30.0
    confirm_timeout_s: float = 30.0
    rpc_timeout_s: float = 10.0
    prefetch: int = 64
    batch_max_changes: int = 1000
    batch_max_bytes: int = 1 << 20
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
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

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
