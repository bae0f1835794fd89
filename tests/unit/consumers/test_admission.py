"""Who a backup accepts changes from: the origin, and the broker-validated ``user_id``."""

from __future__ import annotations

from typing import Any

import amqp
import pytest

from tasync.broker.allowlist import AllowList
from tasync.broker.errors import MessageError
from tasync.broker.messages import ChangeBatch
from tasync.consumers.admission import Admission

NODES = {"a", "b", "c"}


def admission(text: str) -> Admission:
    return Admission(masters=AllowList.parse(text), is_node=lambda n: n in NODES)


def batch(origin: str) -> ChangeBatch:
    return ChangeBatch(epoch=1, origin=origin, changes=())


def message(user_id: str | None) -> Any:
    return amqp.Message(b"", **({"user_id": user_id} if user_id else {}))


@pytest.mark.parametrize(("origin", "user"), [
    ("a", None), ("a", "a"), ("a", "A"), ("a", "guest"), ("a", "ops"),
])
def test_allowed(origin: str, user: str | None) -> None:
    admission("a\nb\n").admit_batch(batch(origin), message(user))


@pytest.mark.parametrize(("origin", "user", "reason"), [
    ("c", None, "origin 'c' may not act as master"),
    ("c", "c", "origin 'c' may not act as master"),
    ("c", "a", "broker user 'a' is another node"),  # an allowed user cannot vouch for c
    ("c", "guest", "origin 'c' may not act as master"),
    ("a", "b", "broker user 'b' is another node"),  # even a master-capable one
    ("a", "c", "broker user 'c' is another node"),  # a node posing as the master
    ("a", "mallory", "broker user 'mallory' may not act as master: denied by line 1"),
])
def test_refused(origin: str, user: str | None, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        admission("!mallory\na\nb\n").admit_batch(batch(origin), message(user))


def test_open_mode_still_refuses_impersonation() -> None:
    open_mode = Admission(is_node=lambda n: n in NODES)
    open_mode.admit_batch(batch("rogue"), message("guest"))
    with pytest.raises(MessageError, match="another node"):
        open_mode.admit_batch(batch("a"), message("b"))
