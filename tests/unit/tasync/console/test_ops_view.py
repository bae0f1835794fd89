"""What the promotion's confirmation says, from a status report, and what it reports after."""

from __future__ import annotations

from typing import Any

from tasync.console.ops_view import plan, summary
from tasync.health import NetworkStatus


def row(node: str, role: str = "backup", *, alive: bool = True, epoch: int = 1,
        seq: int = 7, lag: int = 0) -> dict[str, Any]:
    return {"node": node, "role": role, "alive": alive, "ready": alive, "epoch": epoch,
            "applied_seq": seq, "lag": lag}


def test_the_confirmation_names_the_new_epoch_and_the_master_that_steps_down() -> None:
    report = NetworkStatus(rows=[row("a", "master"), row("b", seq=5, lag=2), row("c")])
    said = plan(report, "b")
    assert said["can"] and said["epoch"] == 2 and said["master"] == "a"
    text = " ".join(said["steps"])
    assert "b becomes the master of the network with a new epoch, 2" in text
    assert "The current master, a, is asked to step down" in text
    assert "at seq 5, 2 behind the master" in text
    assert said["warnings"] == []


def test_without_a_master_or_with_a_silent_node_the_confirmation_says_so() -> None:
    report = NetworkStatus(rows=[row("a", "master", alive=False), row("b", alive=False)])
    said = plan(report, "b")
    assert "No master answers now" in " ".join(said["steps"])
    assert said["warnings"] == ["b does not answer: the promotion will fail until its worker "
                                "runs."]
    assert not plan(NetworkStatus(rows=[row("a", "master")]), "a")["can"]
    assert plan(NetworkStatus(rows=[row("a", "master")]), "<zz>")["warnings"] == [
        "the network knows no node '<zz>'"]


def test_the_summary_reads_as_tasync_promote_prints_it() -> None:
    result = {"node": "b", "epoch": 2, "base_seq": 1200, "already": False, "previous": "a",
              "fenced": "stepped_down", "drained": 3, "nodes_behind": ["c"]}
    assert summary(result) == [
        "b is the master now: epoch 2 from seq 1,200 (drained 3 changes); a stepped down",
        "not yet at epoch 2: c (each learns it from its sync queue)"]
