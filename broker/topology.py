"""Every exchange, queue and routing key of a tasync network, derived in one place.

Names are functions of node names and precedence lists so that producers, consumers, the CLI
and ``tasync broker setup`` can never disagree. The shapes:

* ``tasync.config`` (fanout) -> one quorum queue ``tasync.sync.<node>`` per node, and the stream
  ``tasync.changelog``, the durable replicated change log that recovery and gap filling read.
* ``tasync.alerts`` (direct) -> one quorum queue per precedence list, routing key ``a.b.c``.
* ``tasync.control`` (topic) -> one exclusive queue per running node for requests (status,
  export, configuration changes to the master, recovery); replies use direct reply-to.
* ``tasync.quarantine`` -> messages a node refused, with the reason in their headers.
* ``tasync.dead`` (fanout) -> ``tasync.dead-letter``: alerts whose delivery failed.
* ``tasync.hostlists`` (stream): every precedence list that has a queue, so every node learns
  the lists that name it whatever created the queue.
* ``tasync.handled`` (stream): which alert ids each node settled, so that every node judges
  duplicates against what the whole network delivered, not only what it saw itself.

The ``declare_*`` functions are idempotent and work for users without configure permission on
the shared topology (per-node broker users): they fall back to passive declares (``_declare``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

import amqp.exceptions

from tasync.broker.errors import ConfigError, TopologyMissing
from tasync.broker.settings import Settings

log = logging.getLogger("tasync.broker")
T = TypeVar("T")

CONFIG_EXCHANGE = "tasync.config"
CHANGELOG_STREAM = "tasync.changelog"
ALERTS_EXCHANGE = "tasync.alerts"
CONTROL_EXCHANGE = "tasync.control"
DEAD_LETTER_EXCHANGE = "tasync.dead"
DEAD_LETTER_QUEUE = "tasync.dead-letter"
QUARANTINE_QUEUE = "tasync.quarantine"
HOSTLISTS_QUEUE = "tasync.hostlists"
#: The master's seat: an exclusive queue only one connection can hold (``tasync.broker.seat``).
MASTER_SEAT = "tasync.master.seat"
HANDLED_STREAM = "tasync.handled"

#: Control routing keys: every node binds ``ALL`` and ``node_key(name)``; the master also
#: binds ``MASTER``.
ALL = "all"
MASTER = "master"

#: A node name is one routing-key word: it becomes part of queue names and precedence lists.
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z")


def check_node_name(name: str) -> str:
    """Return ``name`` if it can name a node, else raise ``ConfigError`` saying why."""
    if not isinstance(name, str) or not NODE_NAME_RE.match(name):
        raise ConfigError(
            f"invalid node name {name!r}: use letters, digits, '-' and '_' "
            "(it becomes part of queue names and routing keys)"
        )
    return name


def sync_queue(node: str) -> str:
    """The durable quorum queue through which ``node`` receives every configuration change."""
    return f"tasync.sync.{check_node_name(node)}"


def control_queue(node: str) -> str:
    """The exclusive queue on which a running ``node`` answers requests."""
    return f"tasync.control.{check_node_name(node)}"


def node_key(node: str) -> str:
    """The control routing key that reaches exactly ``node``."""
    return f"node.{check_node_name(node)}"


def precedence_key(hosts: list[str] | tuple[str, ...]) -> str:
    """The routing key of a precedence list: node names joined by dots, in order."""
    if not hosts:
        raise ConfigError("a precedence list needs at least one node")
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"a precedence list names a node twice: {' '.join(hosts)}")
    return ".".join(check_node_name(h) for h in hosts)


def alert_queue(hosts: list[str] | tuple[str, ...]) -> str:
    """The quorum queue that holds the alerts addressed to one precedence list."""
    return f"tasync.alerts.{precedence_key(hosts)}"


def consumer_priority(position: int, length: int) -> int:
    """``x-priority`` for the node at ``position`` (0-based) of a list of ``length`` nodes.

    The first node gets the highest priority so the broker hands it every alert while it has
    prefetch room; the broker moves queued and unacknowledged alerts to the next one when it dies.
    """
    return length - position


def sync_queue_arguments() -> dict[str, Any]:
    """Arguments of every sync queue: quorum for durability across broker-node loss."""
    return {"x-queue-type": "quorum"}


def alert_queue_arguments() -> dict[str, Any]:
    """Arguments of every alert queue: quorum, with failed deliveries dead-lettered."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def changelog_arguments(settings: Settings) -> dict[str, Any]:
    """Stream arguments: retention by age and size, with segments small enough to trim by age."""
    return {
        "x-queue-type": "stream",
        "x-max-age": settings.changelog_max_age,
        "x-max-length-bytes": settings.changelog_max_bytes,
        "x-stream-max-segment-size-bytes": settings.changelog_segment_bytes,
    }


def handled_arguments(settings: Settings) -> dict[str, Any]:
    """Arguments of the handled-ids stream: retention by age and size.

    The age must stay well above every node's duplicate window; segments are small enough that
    age retention trims.
    """
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{int(settings.handled_max_age_s)}s",
        "x-max-length-bytes": settings.handled_max_bytes,
        "x-stream-max-segment-size-bytes": settings.handled_segment_bytes,
    }


def _declare(channel: Any, what: str, active: Callable[[Any], T],
             passive: Callable[[Any], T]) -> T:
    """Run ``active`` on a scratch channel; when the broker refuses it, run ``passive`` instead.

    With per-node broker users (``tasync broker setup --users``) a worker may not configure the
    shared topology, and RabbitMQ refuses even an idempotent re-declare of an existing exchange
    without configure permission. A passive declare needs no permission and still proves that
    the admin's ``broker setup`` created what the worker relies on (bindings cannot be checked
    passively; ``broker setup`` makes them). Scratch channels, because a refusal closes the
    channel it happens on, and the caller's channel must keep its prefetch and confirm mode.

    Raises:
        TopologyMissing: refused, and the object does not exist either.
    """
    connection = channel.connection
    scratch = connection.channel()
    try:
        return active(scratch)
    except amqp.exceptions.AccessRefused as exc:
        refused = str(exc).split("ACCESS_REFUSED - ", 1)[-1]
    finally:
        _close(scratch)
    log.debug("may not declare %s (%s); checking that it exists", what, refused)
    scratch = connection.channel()
    try:
        return passive(scratch)
    except amqp.exceptions.NotFound as exc:
        log.warning("%s does not exist and this user may not declare it (%s)", what, refused)
        raise (missing_error(exc, connection.virtual_host)
               or TopologyMissing(setup_advice(connection.virtual_host, what))) from None
    finally:
        _close(scratch)


def _close(channel: Any) -> None:
    with contextlib.suppress(Exception):
        channel.close()


def declare_config(channel: Any, settings: Settings) -> None:
    """Declare the configuration fanout and the change-log stream bound to it (idempotent)."""
    def active(ch: Any) -> None:
        ch.exchange_declare(CONFIG_EXCHANGE, "fanout", durable=True, auto_delete=False)
        ch.queue_declare(CHANGELOG_STREAM, durable=True, auto_delete=False,
                         arguments=changelog_arguments(settings))
        ch.queue_bind(CHANGELOG_STREAM, CONFIG_EXCHANGE, "")

    def passive(ch: Any) -> None:
        ch.exchange_declare(CONFIG_EXCHANGE, "fanout", passive=True)
        ch.queue_declare(CHANGELOG_STREAM, passive=True)

    _declare(channel, "the configuration exchange", active, passive)


def declare_sync_queue(channel: Any, node: str) -> int:
    """Declare and bind ``node``'s sync queue; returns its message count."""
    name = sync_queue(node)

    def active(ch: Any) -> int:
        ok = ch.queue_declare(name, durable=True, auto_delete=False,
                              arguments=sync_queue_arguments())
        ch.queue_bind(name, CONFIG_EXCHANGE, "")
        return int(ok.message_count)

    def passive(ch: Any) -> int:
        return int(ch.queue_declare(name, passive=True).message_count)

    return _declare(channel, f"queue {name}", active, passive)


def declare_control(channel: Any) -> None:
    """Declare the control exchange and the quarantine queue."""
    def active(ch: Any) -> None:
        ch.exchange_declare(CONTROL_EXCHANGE, "topic", durable=True, auto_delete=False)
        ch.queue_declare(QUARANTINE_QUEUE, durable=True, auto_delete=False,
                         arguments={"x-queue-type": "quorum"})

    def passive(ch: Any) -> None:
        ch.exchange_declare(CONTROL_EXCHANGE, "topic", passive=True)
        ch.queue_declare(QUARANTINE_QUEUE, passive=True)

    _declare(channel, "the control exchange", active, passive)


def declare_alerts(channel: Any, settings: Settings | None = None) -> None:
    """Declare the alert exchange, the dead-letter path, the host-list and handled streams.

    ``settings`` gives the handled stream's retention; without them (a sender, which never
    uses that stream) it is left alone, so a network whose nodes retain it differently never
    sees a sender's declare refused for unequal arguments.
    """

    def active(ch: Any) -> None:
        ch.exchange_declare(ALERTS_EXCHANGE, "direct", durable=True, auto_delete=False)
        ch.exchange_declare(DEAD_LETTER_EXCHANGE, "fanout", durable=True, auto_delete=False)
        ch.queue_declare(DEAD_LETTER_QUEUE, durable=True, auto_delete=False,
                         arguments={"x-queue-type": "quorum"})
        ch.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, "")
        ch.queue_declare(HOSTLISTS_QUEUE, durable=True, auto_delete=False,
                         arguments={"x-queue-type": "stream"})
        if settings is not None:
            ch.queue_declare(HANDLED_STREAM, durable=True, auto_delete=False,
                             arguments=handled_arguments(settings))

    def passive(ch: Any) -> None:
        ch.exchange_declare(ALERTS_EXCHANGE, "direct", passive=True)
        ch.exchange_declare(DEAD_LETTER_EXCHANGE, "fanout", passive=True)
        ch.queue_declare(DEAD_LETTER_QUEUE, passive=True)
        ch.queue_declare(HOSTLISTS_QUEUE, passive=True)
        if settings is not None:
            ch.queue_declare(HANDLED_STREAM, passive=True)

    _declare(channel, "the alert exchange", active, passive)


def declare_alert_queue(channel: Any, hosts: list[str] | tuple[str, ...]) -> str:
    """Declare the quorum queue of one precedence list and bind it by its routing key."""
    name = alert_queue(hosts)

    def active(ch: Any) -> None:
        ch.queue_declare(name, durable=True, auto_delete=False,
                         arguments=alert_queue_arguments())
        ch.queue_bind(name, ALERTS_EXCHANGE, precedence_key(hosts))

    def passive(ch: Any) -> None:
        ch.queue_declare(name, passive=True)

    _declare(channel, f"queue {name}", active, passive)
    return name


def declare_all(channel: Any, settings: Settings) -> None:
    """Declare the whole shared topology; ``tasync broker setup`` and every node call this."""
    declare_config(channel, settings)
    declare_control(channel)
    declare_alerts(channel, settings)


#: What sending an alert needs in a virtual host, in the order it is checked.
_ALERT_PATH = (("exchange", ALERTS_EXCHANGE), ("exchange", CONTROL_EXCHANGE),
               ("queue", HOSTLISTS_QUEUE))


def missing_for_alerts(connection: Any) -> str | None:
    """The first exchange or queue of the alert path that the virtual host lacks, or None.

    Passive declares need no permission, so any sender may ask. Each runs on a scratch
    channel: a missing object closes the channel it was asked on.
    """
    for what, name in _ALERT_PATH:
        channel = connection.channel()
        try:
            if what == "exchange":
                channel.exchange_declare(name, "direct", passive=True)
            else:
                channel.queue_declare(name, passive=True)
        except amqp.exceptions.NotFound:
            return f"{what} {name}"
        finally:
            _close(channel)
    return None


def setup_advice(vhost: str, missing: str) -> str:
    """The one wording of "this virtual host has no tasync topology", wherever it is said.

    ``missing`` names the first object found absent (``exchange tasync.alerts``). The
    command line, the HTTP intake and a node's log all say it with these words, so an
    operator who has read it once recognises it everywhere.
    """
    return (f"virtual host {vhost!r} has no tasync topology ({missing} does not exist): run "
            "`tasync broker setup` against it")


_NOT_FOUND = re.compile(r"no (exchange|queue) '(tasync\.[^']*)' in vhost '([^']*)'")


def missing_error(exc: amqp.exceptions.NotFound,
                  vhost: str | None = None) -> TopologyMissing | None:
    """The ``TopologyMissing`` a broker's 404 means, or None when it names no tasync object.

    RabbitMQ says which object is absent (``no exchange 'tasync.control' in vhost 't1'``);
    a caller that knows its settings passes ``vhost`` to name it as they spell it.
    """
    found = _NOT_FOUND.search(str(exc))
    if found is None:
        return None
    what, name, named_vhost = found.groups()
    return TopologyMissing(setup_advice(vhost or named_vhost, f"{what} {name}"))
