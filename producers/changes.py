"""Turning requested operations into validated changes, before the master commits them.

A request carries operations ``{"op": "set"|"delete", "kind", "name", "body"}``. The control
server checks each body against its kind's schema as the request arrives
(``tasync.broker.commits.parse_ops``); ``check_references`` checks references
(``tasync.broker.kinds.REFERENCES``, the one description of them) against the master's stored
configuration overlaid with the request's own earlier operations, so a bulk import may define a
destination and the group that uses it in one request. Nothing is written here: the relay
commits the result in one transaction, or not at all.
"""

from __future__ import annotations

from typing import Any

from tasync.broker import kinds
from tasync.broker.commits import Op
from tasync.broker.errors import InvalidObject
from tasync.broker.store import NodeStore


def net_effect(store: NodeStore, ops: list[Op]) -> list[Op]:
    """One operation per object: the last one asked for, in order of first mention.

    "delete X; set X" replaces X, and "set X; delete X" of an X that did not exist before does
    nothing. Reordering by dependencies is only safe once each object has one operation.
    """
    last: dict[tuple[str, str], Op] = {}
    set_first: set[tuple[str, str]] = set()
    for op in ops:
        key = (op.kind, op.name)
        if key in last and last[key].op == "set":
            set_first.add(key)
        last[key] = op
    return [op for key, op in last.items()
            if not (op.op == "delete" and key in set_first and store.get(*key) is None)]


def dependency_sorted(ops: list[Op]) -> list[Op]:
    """Sets ordered so referenced kinds come first, deletes after in reverse; stable otherwise.

    A bulk import file may list groups before their destinations; applying in this order means
    every backup passes only through states whose references hold.
    """
    sets = [o for o in ops if o.op == "set"]
    deletes = [o for o in ops if o.op == "delete"]
    sets.sort(key=lambda o: kinds.DEPENDENCY_ORDER[o.kind])
    deletes.sort(key=lambda o: -kinds.DEPENDENCY_ORDER[o.kind])
    return sets + deletes


class _Overlay:
    """The stored configuration with the request's pending operations laid over it."""

    def __init__(self, store: NodeStore) -> None:
        self.store = store
        self.pending: dict[tuple[str, str], dict[str, Any] | None] = {}

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        if (kind, name) in self.pending:
            return self.pending[(kind, name)]
        return self.store.get(kind, name)

    def exists(self, kind: str, name: str) -> bool:
        return self.get(kind, name) is not None

    def referrers(self, kind: str, name: str) -> list[str]:
        """Stored and pending objects that still refer to ``(kind, name)``."""
        found = []
        for ref in self.store.referrers(kind, name):
            ref_kind, ref_name = ref.split(" ", 1)
            body = self.get(ref_kind, ref_name)
            if body is not None and kinds.refers(ref_kind, body, kind, name):
                found.append(ref)
        for (ref_kind, ref_name), body in self.pending.items():
            ref = f"{ref_kind} {ref_name}"
            if (body is not None and ref not in found
                    and kinds.refers(ref_kind, body, kind, name)):
                found.append(ref)
        return found






def check_references(store: NodeStore, parsed: list[Op]) -> list[Op]:
    """Check operations against the stored configuration; all of them, or raise.

    Raises:
        InvalidObject: the first problems found, in one line, with every problem listed in
            ``errors`` for ``--json`` callers.
    """
    ops = dependency_sorted(net_effect(store, parsed))
    view = _Overlay(store)
    problems: list[str] = []
    for op in ops:
        if op.op == "delete" and not view.exists(op.kind, op.name):
            problems.append(f"{op.kind} {op.name}: does not exist")
        view.pending[(op.kind, op.name)] = op.body
    for op in ops:
        if op.op == "set":
            problems += kinds.outgoing_errors(op.kind, op.name, op.body or {}, view.exists)
            if op.kind == "group" and (cycle := kinds.group_cycle(op.name, view.get)):
                problems.append(cycle)
        elif users := view.referrers(op.kind, op.name):
            problems.append(f"{op.kind} {op.name}: still used by {', '.join(sorted(users)[:5])}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InvalidObject("; ".join(problems[:3]) + more, errors={"references": problems})
    return ops
