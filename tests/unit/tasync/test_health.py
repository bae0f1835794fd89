"""The health verdict of ``tasync status`` from nodes' answers (tasync/health.py)."""

from __future__ import annotations

from typing import Any

from tasync.broker.errors import ExitCode
from tasync.health import NetworkStatus, _judge, _silent_row, ago


def answer(node: str, *, seq: int = 5, checksum: str = "c5", ready: bool = True,
           role: str = "backup", **extra: Any) -> dict[str, Any]:
    return {"node": node, "role": role, "applied_seq": seq, "checksum": checksum,
            "ready": ready, "alive": True, "epoch": 1, "era_owner": "a", "nodes": ["a", "b"],
            **extra}


def judged(rows: list[dict[str, Any]], master: dict[str, Any] | None,
           max_lag: int = 0, stranded: list[dict[str, Any]] | None = None) -> NetworkStatus:
    status = NetworkStatus(rows=rows, stranded=stranded or [])
    _judge(status, master, max_lag=max_lag)
    return status


def test_a_healthy_network_is_ok() -> None:
    master = answer("a", role="master")
    assert judged([master, answer("b")], master).code == ExitCode.OK


def test_behind_not_ready_diverged_or_different_is_not_in_sync() -> None:
    master = answer("a", role="master")
    for row in (answer("b", seq=4, checksum="c4"), answer("b", ready=False),
                answer("b", diverged=True), answer("b", checksum="other")):
        status = judged([master, row], master)
        assert status.code == ExitCode.NOT_IN_SYNC, row
    assert judged([master, answer("b", seq=4, checksum="c4")], master,
                  max_lag=1).code == ExitCode.OK


def test_severity_order_and_stranded_lists() -> None:
    master = answer("a", role="master")
    dead = _silent_row("c", [master])
    status = judged([master, answer("b", seq=4, checksum="c4"), dead], master,
                    stranded=[{"list": "a.b", "messages": 3}])
    assert sorted(c for c, _ in status.problems) == [ExitCode.NODE_DOWN, ExitCode.NOT_IN_SYNC,
                                                     ExitCode.STRANDED_LISTS]
    assert status.code == ExitCode.NODE_DOWN
    assert status.stranded == [{"list": "a.b", "messages": 3}]
    assert judged([answer("b"), dead], None).code == ExitCode.NO_MASTER


def test_a_silent_node_takes_its_last_beacon_and_the_era_owner_is_the_master() -> None:
    peers = {"a": {"role": "master", "epoch": 1, "seq": 9, "seen_at": 100.0},
             "c": {"role": "backup", "epoch": 1, "seq": 7, "seen_at": 90.0}}
    answers = [answer("b", peers=peers)]
    assert _silent_row("a", answers)["role"] == "master"
    row = _silent_row("c", answers)
    assert (row["applied_seq"], row["last_seen"], row["alive"]) == (7, 90.0, False)
    assert _silent_row("z", answers)["last_seen"] is None


def test_ago_reads_like_a_person_would_say_it() -> None:
    assert [ago(1000.0 - s, now=1000.0) for s in (5, 125, 7200, 200_000)] == \
        ["5s ago", "2m ago", "2h ago", "2d ago"]
