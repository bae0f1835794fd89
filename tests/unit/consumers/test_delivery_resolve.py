import datetime as dt
from typing import Any

import pytest

from tasync.broker.errors import ResolveError
from tasync.consumers.delivery.resolve import (
    Group,
    Leaf,
    closed_reason,
    in_window,
    leaves,
    resolve,
)


class Store:
    def __init__(self, objects: dict[str, dict[str, dict[str, Any]]]) -> None:
        self.objects = objects

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.objects.get(kind, {}).get(name)


STORE = Store({
    "destination": {
        "mail": {"url": "mailto:ops@example.com", "schedule": "office"},
        "hook": {"url": "https://example.com/h", "subject": "[{source}] {subject}"},
        "file": {"url": "file:///tmp/x"},
        "ghost-sched": {"url": "file:///tmp/y", "schedule": "gone"},
    },
    "group": {
        "oncall": {"members": ["mail", "hook"], "mode": "sequence"},
        "everyone": {"members": ["oncall", "file", "hook"], "mode": "all"},
        "loop1": {"members": ["loop2"]},
        "loop2": {"members": ["loop1"]},
    },
    "schedule": {
        "office": {"timezone": "Europe/Berlin",
                   "windows": [{"days": ["mon", "tue", "wed", "thu", "fri"],
                                "start": "08:00", "end": "18:00"}]},
    },
})


def test_destination_resolves_to_a_leaf_without_showing_its_url() -> None:
    plan = resolve(STORE, "destination", "hook")
    assert plan == Leaf("hook", "https://example.com/h", "[{source}] {subject}", None)
    assert "example.com" not in repr(plan)


def test_nested_groups_keep_modes_and_drop_repeated_destinations() -> None:
    plan = resolve(STORE, "group", "everyone")
    assert isinstance(plan, Group) and plan.mode == "all"
    assert [leaf.name for leaf in leaves(plan)] == ["mail", "hook", "file"]
    inner = plan.members[0]
    assert isinstance(inner, Group) and inner.mode == "sequence"


@pytest.mark.parametrize(("kind", "name", "reason"), [
    ("destination", "nope", "unknown destination 'nope'"),
    ("group", "nope", "unknown group 'nope'"),
    ("group", "loop1", "contains itself"),
    ("route", "x", "cannot deliver to a 'route'"),
])
def test_unresolvable_targets(kind: str, name: str, reason: str) -> None:
    with pytest.raises(ResolveError, match=reason):
        resolve(STORE, kind, name)


def berlin(day: int, hour: int, minute: int = 0) -> dt.datetime:
    # 2025-01-06 is a Monday; Berlin is UTC+1 in January
    return dt.datetime(2025, 1, day, hour, minute, tzinfo=dt.UTC) - dt.timedelta(hours=1)


def test_schedule_windows_use_the_schedule_time_zone() -> None:
    office = STORE.objects["schedule"]["office"]
    assert in_window(office, berlin(6, 8))            # Monday 08:00 Berlin: start inclusive
    assert in_window(office, berlin(6, 17, 59))
    assert not in_window(office, berlin(6, 18))       # end exclusive
    assert not in_window(office, berlin(6, 7, 59))
    assert not in_window(office, berlin(11, 12))      # Saturday


def test_end_of_day_window() -> None:
    sched = {"timezone": "UTC", "windows": [{"days": ["sun"], "start": "20:00", "end": "24:00"}]}
    assert in_window(sched, dt.datetime(2025, 1, 12, 23, 59, tzinfo=dt.UTC))
    assert not in_window(sched, dt.datetime(2025, 1, 13, 0, 0, tzinfo=dt.UTC))


def test_closed_reason_and_dangling_schedule() -> None:
    mail = resolve(STORE, "destination", "mail")
    assert isinstance(mail, Leaf)
    assert closed_reason(STORE, mail, berlin(11, 12)) == "outside schedule office"
    assert closed_reason(STORE, mail, berlin(6, 12)) is None
    ghost = resolve(STORE, "destination", "ghost-sched")
    assert isinstance(ghost, Leaf)
    assert closed_reason(STORE, ghost, berlin(11, 12)) is None
