"""The change history and the comparison of two nodes, as the commands read them.

The history is the change log as ``tasync replay --since T --dry-run`` lists it
(``tasync.cli_replay.read_log``): every legitimate change after the point, judged by the
master's eras. The comparison reads each node's canonical export as ``tasync config export
--node N`` does (``tasync.cli_config.write_export``) and compares them object by object, so
what the page shows is what ``diff <(tasync config export --node a) <(... --node b)`` would.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from tasync.broker.messages import Change
from tasync.broker.settings import Settings
from tasync.broker.since import Since
from tasync.cli_config import write_export
from tasync.cli_replay import LogRead, read_log

#: The history page's point when none is given: the last day.
DEFAULT_SINCE = "24h"
#: Changes shown, at most, on the history page (the newest).
SHOWN = 1000
#: How long a node's export may stay silent (``tasync config export --timeout``'s default).
EXPORT_TIMEOUT_S = 60.0


def history(settings: Settings, since: Since) -> tuple[list[Change], LogRead]:
    """The changes after ``since``, newest first (at most ``SHOWN``), and the whole read."""
    log = read_log(settings, since)
    return list(reversed(log.changes))[:SHOWN], log


def export_of(settings: Settings, node: str, *,
              timeout_s: float = EXPORT_TIMEOUT_S) -> dict[str, dict[str, Any]]:
    """``node``'s whole configuration as ``tasync config export --node`` prints it, parsed."""
    out = io.BytesIO()
    write_export(settings, node, out, idle_timeout_s=timeout_s)
    data: dict[str, dict[str, Any]] = json.loads(out.getvalue())
    return data


@dataclass
class Difference:
    """How two exports differ, by kind: names only in a, only in b, and with other bodies."""

    only_a: list[tuple[str, str, str]] = field(default_factory=list)
    only_b: list[tuple[str, str, str]] = field(default_factory=list)
    different: list[tuple[str, str, str, str]] = field(default_factory=list)
    same: int = 0

    @property
    def empty(self) -> bool:
        """No object differs."""
        return not (self.only_a or self.only_b or self.different)


def _text(body: Any) -> str:
    return json.dumps(body, sort_keys=True, ensure_ascii=False, indent=1)


def compare(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> Difference:
    """Object by object: (kind, name, body) only in ``a``, only in ``b``, or different."""
    out = Difference()
    for kind in sorted(set(a) | set(b)):
        mine, theirs = a.get(kind, {}), b.get(kind, {})
        for name in sorted(set(mine) | set(theirs)):
            if name not in theirs:
                out.only_a.append((kind, name, _text(mine[name])))
            elif name not in mine:
                out.only_b.append((kind, name, _text(theirs[name])))
            elif mine[name] != theirs[name]:
                out.different.append((kind, name, _text(mine[name]), _text(theirs[name])))
            else:
                out.same += 1
    return out
