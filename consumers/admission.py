"""Who may do what: the allow-list checks a node applies to what it receives.

Three lists share one format (``tasync.broker.allowlist``): ``tasync.hosts`` says who may act as
sync master, ``telaconf.hosts`` who may change configuration, ``telalert.hosts`` who may send
alerts. The identities checked are the ones a receiver can trust or at least cross-check: the
``user_id`` property (RabbitMQ refuses a publish whose ``user_id`` is not the connection's
user), the node or host name the sender states, and nothing the payload alone could forge
without also holding the cluster key when messages are signed.

A change batch is judged by its stated origin, which must be allowed as master. Its
``user_id``, when it differs from the origin, is a second witness: a user the list denies
refuses the batch, and so does a user that is another known node (with per-node broker users
that is a node posing as the master). A user the list does not mention and that names no node
is a shared account (``guest``, an operator's user) and adds nothing either way.

With neither a file nor ``--master`` a node runs open: it accepts any master of the newest
epoch, which suits a single-operator lab and the demo, and says so in its trail at start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasync.broker.allowlist import AllowList, Decision
from tasync.broker.errors import ConfigError, MessageError
from tasync.broker.messages import ChangeBatch, Request


def _sender_host(sender: str) -> str | None:
    """The host part of a CLI sender ``cli@host:pid``, or the sender itself for a node."""
    if "@" in sender:
        return sender.split("@", 1)[1].rsplit(":", 1)[0] or None
    return sender or None


def _user_id(message: Any) -> str | None:
    props = getattr(message, "properties", None) or {}
    user = props.get("user_id")
    return str(user) if user else None


@dataclass(frozen=True)
class Admission:
    """The allow-lists one node enforces; ``None`` for a list means open.

    Attributes:
        masters: who may act as sync master (``tasync.hosts`` or ``--master``).
        configurers: who may change configuration (``telaconf.hosts``).
        senders: who may send alerts (``telalert.hosts``).
        is_node: whether a name is a node of the network (the replicated ``node`` objects).
    """

    masters: AllowList | None = None
    configurers: AllowList | None = None
    senders: AllowList | None = None
    is_node: Callable[[str], bool] = field(default=lambda _name: False, compare=False)

    @classmethod
    def from_options(cls, *, hosts_file: Path | None, single_master: str | None,
                     conf_hosts_file: Path | None = None,
                     alert_hosts_file: Path | None = None,
                     is_node: Callable[[str], bool] | None = None) -> Admission:
        """Build from the worker's options; ``--hosts-file`` and ``--master`` exclude each other."""
        if hosts_file is not None and single_master is not None:
            raise ConfigError("give either --hosts-file or --master, not both")
        masters = None
        if hosts_file is not None:
            masters = AllowList.load(hosts_file)
        elif single_master is not None:
            masters = AllowList.single(single_master)
        return cls(
            masters=masters,
            configurers=AllowList.load(conf_hosts_file) if conf_hosts_file else None,
            senders=AllowList.load(alert_hosts_file) if alert_hosts_file else None,
            is_node=is_node or (lambda _name: False),
        )

    @property
    def open(self) -> bool:
        """True when no master allow-list is set: any master of the newest epoch is accepted."""
        return self.masters is None

    def may_be_master(self, node: str, *extra: str | None) -> Decision | None:
        """The decision for ``node`` acting as master, or None when running open."""
        if self.masters is None:
            return None
        return self.masters.check(node, *extra)

    def admit_batch(self, batch: ChangeBatch, message: Any) -> None:
        """Refuse a batch whose origin, or whose broker user, may not act as master.

        Raises:
            MessageError: naming the origin or user and the deciding rule (the trail shows it).
        """
        user = _user_id(message)
        other_user = user if user and user.lower() != batch.origin.lower() else None
        if other_user and self.is_node(other_user):
            raise MessageError(f"broker user {other_user!r} is another node; it may not publish "
                               f"changes of origin {batch.origin!r}")
        decision = self.may_be_master(batch.origin)
        if decision is not None and not decision.allowed:
            raise MessageError(f"origin {batch.origin!r} may not act as master: {decision.reason}")
        by_user = self.may_be_master(other_user) if other_user else None
        if by_user is not None and by_user.entry is not None and not by_user.allowed:
            raise MessageError(f"broker user {other_user!r} may not act as master: "
                               f"{by_user.reason}")

    def admit_config_request(self, request: Request, message: Any) -> None:
        """Refuse a configuration change from a requester ``telaconf.hosts`` does not allow."""
        self._check(self.configurers, request.sender, message, "change configuration")

    def admit_alert(self, source_host: str | None, message: Any) -> None:
        """Refuse an alert from a sender ``telalert.hosts`` does not allow."""
        self._check(self.senders, source_host or "", message, "send alerts")

    @staticmethod
    def _check(allow: AllowList | None, sender: str, message: Any, what: str) -> None:
        if allow is None:
            return
        identities: Iterable[str | None] = (_user_id(message), _sender_host(sender))
        decision = allow.check(*identities)
        if not decision.allowed:
            raise MessageError(f"{sender or 'an unnamed sender'} may not {what}: "
                               f"{decision.reason}")
