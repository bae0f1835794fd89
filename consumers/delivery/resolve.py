"""From an alert's target to a delivery plan, and from a schedule to "open now or not".

Resolution happens on the delivering node, at delivery time, from its replicated store: an
alert queued during an outage is delivered to the destinations configured when it is handled,
which is what an operator who fixed a wrong address in the meantime expects.

A plan is a tree: a ``Leaf`` is one destination, a ``Group`` has members and a mode (``all``:
each member; ``sequence``: one member after another until one succeeds). A destination reached
twice through an ``all`` tree is kept once so nobody is paged twice for one alert.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from tasync.broker.errors import ResolveError

MAX_DEPTH = 16
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Lookup(Protocol):
    """What resolution needs from a store: ``NodeStore`` fits, and so does a dict in tests."""

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        """One object's body, or None."""


@dataclass(frozen=True)
class Leaf:
    """One destination to deliver to.

    Attributes:
        name: the destination's name (what trail lines and files show; never the URL).
        url: the delivery URL, which may hold credentials: never log it.
        subject: the destination's subject template, if any.
        schedule: the name of the schedule limiting when it may be used, if any.
    """

    name: str
    url: str
    subject: str | None = None
    schedule: str | None = None

    def __repr__(self) -> str:
        return f"Leaf({self.name!r})"


@dataclass(frozen=True)
class Group:
    """Members delivered together (``all``) or in turn until one succeeds (``sequence``)."""

    name: str
    mode: str
    members: tuple[Leaf | Group, ...]


Plan = Leaf | Group


def resolve(store: Lookup, kind: str, name: str) -> Plan:
    """The delivery plan for destination or group ``name``.

    Raises:
        ResolveError: the name is unknown, the kind is wrong, or groups nest too deep.
    """
    if kind not in ("destination", "group"):
        raise ResolveError(f"cannot deliver to a {kind!r}; use a destination or a group")
    plan = _resolve(store, kind, name, depth=0, path=())
    return _dedupe(plan, set()) or plan


def _resolve(store: Lookup, kind: str, name: str, *, depth: int, path: tuple[str, ...]) -> Plan:
    if depth > MAX_DEPTH or name in path:
        raise ResolveError(f"group {path[0]!r} nests too deep or contains itself")
    body = store.get(kind, name)
    if body is None:
        raise ResolveError(f"unknown {kind} {name!r}")
    if kind == "destination":
        return Leaf(name=name, url=str(body["url"]), subject=body.get("subject"),
                    schedule=body.get("schedule"))
    members: list[Plan] = []
    for member in body.get("members", []):
        member_kind = "destination" if store.get("destination", member) is not None else "group"
        members.append(_resolve(store, member_kind, member, depth=depth + 1,
                                path=(*path, name)))
    return Group(name=name, mode=str(body.get("mode", "all")), members=tuple(members))


def _dedupe(plan: Plan, seen: set[str]) -> Plan | None:
    """Drop destinations already reached through an earlier branch of an ``all`` tree.

    Members of a ``sequence`` are alternatives, not additional recipients, so their subtrees
    keep their own set of seen destinations.
    """
    if isinstance(plan, Leaf):
        if plan.name in seen:
            return None
        seen.add(plan.name)
        return plan
    kept: list[Plan] = []
    if plan.mode == "sequence":
        branch_seen: set[str] = set()
        for member in plan.members:
            local = set(seen)
            pruned = _dedupe(member, local)
            if pruned is not None:
                kept.append(pruned)
                branch_seen |= local
        seen |= branch_seen
    else:
        for member in plan.members:
            pruned = _dedupe(member, seen)
            if pruned is not None:
                kept.append(pruned)
    if not kept:
        return None
    return Group(name=plan.name, mode=plan.mode, members=tuple(kept))


def leaves(plan: Plan) -> Iterator[Leaf]:
    """Every destination of a plan, depth first."""
    if isinstance(plan, Leaf):
        yield plan
        return
    for member in plan.members:
        yield from leaves(member)


def in_window(schedule: dict[str, Any], when: dt.datetime) -> bool:
    """Whether an aware datetime falls inside one of a schedule's weekly windows.

    Windows are ``{"days": ["mon", ...], "start": "HH:MM", "end": "HH:MM"}`` in the schedule's
    ``timezone``; ``end`` is exclusive and may be ``24:00``. A window across midnight is written
    as two windows, which keeps "which day does it belong to" unambiguous.
    """
    try:
        zone = zoneinfo.ZoneInfo(str(schedule.get("timezone") or "UTC"))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        zone = zoneinfo.ZoneInfo("UTC")
    local = when.astimezone(zone)
    day = DAY_NAMES[local.weekday()]
    minute = f"{local.hour:02d}:{local.minute:02d}"
    for window in schedule.get("windows", []):
        if day in window.get("days", ()) and window["start"] <= minute < window["end"]:
            return True
    return False


def closed_reason(store: Lookup, leaf: Leaf, when: dt.datetime) -> str | None:
    """Why ``leaf`` may not be used at ``when`` (outside its schedule), or None when it may.

    A destination whose schedule no longer exists is used: an alert delivered outside hours is
    better than one silently dropped because of a dangling reference.
    """
    if not leaf.schedule:
        return None
    schedule = store.get("schedule", leaf.schedule)
    if schedule is None or in_window(schedule, when):
        return None
    return f"outside schedule {leaf.schedule}"
