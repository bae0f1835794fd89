"""What a node knows of its peers from their beacons (consumers/peers.py)."""

from __future__ import annotations

from tasync.consumers.peers import HEAD_FRESH_S, Peers


def beacon(node: str, role: str = "backup", seq: int = 3, epoch: int = 1) -> dict[str, object]:
    return {"node": node, "role": role, "epoch": epoch, "seq": seq, "ready": True}


def test_ages_include_known_nodes_never_heard_from() -> None:
    peers = Peers("a")
    peers.saw(beacon("a"), now=100.0)
    peers.saw(beacon("b"), now=104.0)
    assert peers.ages(now=110.0) == {"a": 10.0, "b": 6.0}
    assert peers.ages(known=["a", "b", "c"], listening_since=90.0, now=110.0) == \
        {"a": 10.0, "b": 6.0, "c": 20.0}


def test_the_newest_recent_master_gives_the_head() -> None:
    peers = Peers("b")
    assert peers.master_seq(now=0.0) is None
    peers.saw(beacon("a", role="master", seq=7, epoch=1), now=100.0)
    peers.saw(beacon("c", role="master", seq=9, epoch=2), now=101.0)
    assert peers.master_seq(now=102.0) == 9
    assert peers.master_seq(now=101.0 + HEAD_FRESH_S + 1) is None


def test_a_malformed_beacon_is_ignored() -> None:
    peers = Peers("a")
    peers.saw({"node": "x", "role": "backup", "epoch": "not a number", "seq": 1, "ready": 1})
    peers.saw({"node": "y"})
    assert peers.view() == {}
