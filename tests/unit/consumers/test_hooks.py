"""Named hooks between a node's parts: subscribers called in order with the event's value."""

from __future__ import annotations

from tasync.broker.epochs import EpochHistory
from tasync.consumers.hooks import Hook, NodeHooks


def test_subscribers_are_called_in_order_with_the_value() -> None:
    hook: Hook[int] = Hook("numbers")
    seen: list[tuple[str, int]] = []
    hook(0)  # nobody listens yet: nothing happens
    hook.subscribe(lambda n: seen.append(("first", n)))
    hook.subscribe(lambda n: seen.append(("second", n)))
    hook(7)
    assert seen == [("first", 7), ("second", 7)]


def test_each_node_has_hooks_of_its_own() -> None:
    one, two = NodeHooks(), NodeHooks()
    told: list[EpochHistory] = []
    one.newer_epoch.subscribe(told.append)
    two.newer_epoch(EpochHistory())
    assert told == []
    one.newer_epoch(EpochHistory())
    assert len(told) == 1
