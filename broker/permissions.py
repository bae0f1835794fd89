"""Least-privilege RabbitMQ permissions for each kind of tasync broker user.

RabbitMQ grants three regular expressions per user and virtual host (configure, write, read)
plus, for topic exchanges, a write and a read expression matched against routing keys. What
each operation needs was measured on RabbitMQ 3.10.8 and shapes every expression below:

* ``basic.publish`` checks *write* on the exchange only, never on the queues it routes to. The
  default exchange is the resource ``amq.default``; direct reply-to answers and the quarantine
  go through it, so every node needs it. Consuming ``amq.rabbitmq.reply-to`` needs nothing.
* ``exchange.declare`` and ``queue.declare`` of an object that already exists still need
  *configure*; passive declares need no permission at all (``tasync.broker.topology`` falls back to
  them when a node may not configure the shared topology).
* ``queue.bind`` needs *write* on the queue and *read* on the exchange, and on a topic exchange
  also the topic *read* permission for the binding key.
* Declaring a queue with ``x-dead-letter-exchange`` (every alert queue) needs *configure* and
  *read* on the queue and *write* on the dead-letter exchange.
* A publish whose ``user_id`` property is not the connection's user is refused by the broker
  (``PRECONDITION_FAILED``): that property is the identity receivers check.

Resulting guarantees: only master-capable node users can write to ``tasync.config`` and take
the master's seat (an exclusive queue, which needs *configure*); a backup's
user reads only its own sync and control queues, the alert queues of precedence lists that name
it, the change-log, host-list and handled streams; it may bind its control queue to ``all`` and
``node.<itself>`` but not to ``master``, so it cannot receive what is meant for the master
(configuration requests). Senders write to ``tasync.alerts`` and nothing else.

Known limit (RabbitMQ has no per-queue publish permission): whoever may write to
``amq.default`` can put a message into any queue by name. Nodes need that for replies, so a
node's user could inject into another node's sync queue; receivers must therefore admit a
change only when its broker-validated ``user_id`` is master-capable
(``tasync.consumers.admission``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from tasync.broker import topology

Role = Literal["node", "admin", "sender"]

DEFAULT_EXCHANGE = "amq.default"
#: Tags per role: nodes and senders get none (no management UI or HTTP API access); admins get
#: ``management`` so they may look at their own virtual hosts if the management plugin runs.
ROLE_TAGS: dict[Role, tuple[str, ...]] = {"node": (), "sender": (), "admin": ("management",)}

_SEGMENT = r"[A-Za-z0-9_-]+"
NOTHING = "^$"
EVERYTHING = ".*"


def _name(literal: str) -> str:
    """A resource name as a regex atom (``.`` and ``-`` escaped)."""
    return re.escape(literal)


def _one_of(*atoms: str) -> str:
    """An anchored alternation; RabbitMQ matches permissions with unanchored PCRE."""
    return "^(" + "|".join(atoms) + ")$"


def alert_queues_of(node: str) -> str:
    """Regex atom for the alert queues of every precedence list that names ``node``."""
    topology.check_node_name(node)
    prefix = _name(topology.alert_queue([node])[: -len(node)])
    me = _name(node)
    return f"{prefix}(?:{_SEGMENT}\\.)*{me}(?:\\.{_SEGMENT})*"


ANY_ALERT_QUEUE = _name(topology.alert_queue(["x"])[:-1]) + f"{_SEGMENT}(?:\\.{_SEGMENT})*"


@dataclass(frozen=True)
class TopicPermission:
    """Routing-key expressions on one topic exchange."""

    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class Permissions:
    """Everything RabbitMQ stores about one user's rights in one virtual host.

    Attributes:
        configure: regex of resources the user may declare or delete.
        write: regex of exchanges it may publish to and queues it may bind.
        read: regex of queues it may consume and exchanges it may bind from.
        topics: routing-key limits on topic exchanges (none: unrestricted).
        tags: user tags (management access); nodes and senders have none.
    """

    configure: str
    write: str
    read: str
    topics: tuple[TopicPermission, ...] = ()
    tags: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Account:
    """One broker user that ``tasync broker setup --users`` manages.

    Attributes:
        name: the RabbitMQ user name; for a node it is the node name, so the ``user_id`` that
            receivers see matches the names in ``tasync.hosts``.
        role: ``node``, ``admin`` or ``sender``.
        master_capable: for a node, whether ``tasync.hosts`` (or ``--master``) allows it to act
            as master; only such users may write to ``tasync.config``.
        create_lists: for a sender, whether it may create the queue of a new ad-hoc list.
    """

    name: str
    role: Role
    master_capable: bool = False
    create_lists: bool = False

    @property
    def label(self) -> str:
        """``node (master-capable)``, ``sender (creates lists)``, ``admin``: for reports."""
        if self.role == "node" and self.master_capable:
            return "node (master-capable)"
        if self.role == "sender" and self.create_lists:
            return "sender (creates lists)"
        return self.role


def node_permissions(node: str, *, master_capable: bool) -> Permissions:
    """What a ``tasync-worker --node NODE`` needs, and no more.

    Its own queues are configurable (declared at start); the shared topology is not (the
    admin's ``broker setup`` declares it, workers check it passively).
    """
    own = [_name(topology.sync_queue(node)), _name(topology.control_queue(node)),
           alert_queues_of(node)]
    writable = [_name(DEFAULT_EXCHANGE), _name(topology.CONTROL_EXCHANGE),
                _name(topology.DEAD_LETTER_EXCHANGE), *own]
    configurable = list(own)
    if master_capable:
        writable.insert(0, _name(topology.CONFIG_EXCHANGE))
        configurable.append(_name(topology.MASTER_SEAT))  # only it may take the master's seat
    readable = [_name(topology.CONFIG_EXCHANGE), _name(topology.CONTROL_EXCHANGE),
                _name(topology.ALERTS_EXCHANGE), _name(topology.CHANGELOG_STREAM),
                _name(topology.HOSTLISTS_QUEUE), _name(topology.HANDLED_STREAM), *own]
    my_key = _name(topology.node_key(node))
    peer_key = _name(topology.node_key("x"))[:-1] + _SEGMENT
    binds = [_name(topology.ALL), my_key]
    if master_capable:
        binds.append(_name(topology.MASTER))
    # Requests go to the master, to one peer (snapshots), or to all (recovery asks every node
    # for its seq), so the send side is limited to well-formed keys only.
    sends = [_name(topology.MASTER), _name(topology.ALL), peer_key]
    control = TopicPermission(topology.CONTROL_EXCHANGE, write=_one_of(*sends),
                              read=_one_of(*binds))
    return Permissions(configure=_one_of(*configurable), write=_one_of(*writable),
                       read=_one_of(*readable), topics=(control,), tags=ROLE_TAGS["node"])


def sender_permissions(*, create_lists: bool = False) -> Permissions:
    """What ``tasync send`` needs: publish to ``tasync.alerts``; optionally create list queues.

    A strict sender (the default) reaches every list whose queue exists: named routes (the
    nodes declare their queues) and ad-hoc lists used before. Creating the queue of a new
    ad-hoc list costs more than one would like, because RabbitMQ demands *read* on a queue to
    declare it with a dead-letter exchange: such a sender could also consume alerts. The
    host-list record currently goes through the default exchange, hence ``amq.default``.
    """
    if not create_lists:
        return Permissions(configure=NOTHING, write=_one_of(_name(topology.ALERTS_EXCHANGE)),
                           read=NOTHING, tags=ROLE_TAGS["sender"])
    return Permissions(
        configure=_one_of(ANY_ALERT_QUEUE),
        write=_one_of(_name(topology.ALERTS_EXCHANGE), _name(topology.DEAD_LETTER_EXCHANGE),
                      _name(DEFAULT_EXCHANGE), ANY_ALERT_QUEUE),
        read=_one_of(_name(topology.ALERTS_EXCHANGE), ANY_ALERT_QUEUE),
        tags=ROLE_TAGS["sender"],
    )


def admin_permissions() -> Permissions:
    """An operator: runs ``broker setup`` and every CLI command, but never writes changes.

    Configuration changes reach ``tasync.config`` only through the master (``tasync config``
    asks it over the control exchange), so even an admin's user may not publish there.
    """
    return Permissions(configure=EVERYTHING,
                       write=f"^(?!{_name(topology.CONFIG_EXCHANGE)}$).*",
                       read=EVERYTHING, tags=ROLE_TAGS["admin"])


def permissions_for(account: Account) -> Permissions:
    """The permissions of one account, by role."""
    if account.role == "node":
        return node_permissions(account.name, master_capable=account.master_capable)
    if account.role == "sender":
        return sender_permissions(create_lists=account.create_lists)
    return admin_permissions()
