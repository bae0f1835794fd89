"""Named points where one part of a node tells the others that something happened.

A part that must react to another's event subscribes when it is built (``Roles`` to
``newer_epoch``); the part that sees the event calls the hook. Neither holds the other, so
the sync consumer's recovery does not need the roles that are built after it, and nothing is
assigned into another object after construction. Every hook a node has is listed here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tasync.broker.epochs import EpochHistory

T = TypeVar("T")


class Hook(Generic[T]):
    """Subscribers called in the order they subscribed, each with the event's value."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._subscribers: list[Callable[[T], None]] = []

    def subscribe(self, subscriber: Callable[[T], None]) -> None:
        """Call ``subscriber`` on every later event."""
        self._subscribers.append(subscriber)

    def __call__(self, value: T) -> None:
        """Tell every subscriber; one that raises stops the rest (and the caller sees it)."""
        for subscriber in list(self._subscribers):
            subscriber(value)


@dataclass
class NodeHooks:
    """The hooks of one node.

    Attributes:
        newer_epoch: the node learned an epoch newer than its own, before it keeps
            conflicts (the roles step a master down there).
    """

    newer_epoch: Hook[EpochHistory] = field(default_factory=lambda: Hook("newer_epoch"))
