"""Where a recovering node gets a snapshot: the named node, else the master, else a peer.

A snapshot is the whole configuration as of one seq (``NodeStore.snapshot``), answered over
the control exchange. The master is the natural source; when none answers (it died and nobody
was promoted yet) the most advanced live peer serves, so a node can still join or recover.
Sources that cannot be trusted are passed over: a node that holds conflicting changes refuses
to serve, and a snapshot from an epoch older than the requester's comes from a stale node.
"""

from __future__ import annotations

from typing import Any

from tasync.broker import topology
from tasync.broker.errors import ConfigError, NoAnswer, RemoteError
from tasync.broker.rpc import RpcClient

#: A snapshot of 100,000 objects is about 10 MB; serving and sending it takes a few seconds.
SNAPSHOT_TIMEOUT_S = 120.0


def fetch_snapshot(rpc: RpcClient, *, node: str, epoch: int,
                   source: str | None) -> dict[str, Any]:
    """A snapshot for ``node`` (at ``epoch``) from ``source``, else the master, else a peer.

    Raises:
        NoAnswer, RemoteError, ConfigError: ``source`` failed or is stale; or no source at all.
    """
    keys = [topology.node_key(source)] if source else [topology.MASTER]
    tried: list[str] = []
    while keys:
        key = keys.pop(0)
        try:
            data = rpc.call_one(key, "snapshot", timeout_s=SNAPSHOT_TIMEOUT_S)
        except (NoAnswer, RemoteError) as exc:
            if source:
                raise
            tried.append(f"{key}: {exc}")
            data = None
        if data is not None and int(data["epoch"]) >= epoch:
            return data
        if data is not None:
            if source:
                raise ConfigError(f"{source} is at epoch {data['epoch']}, older than this "
                                  f"node's {epoch}: it is stale")
            tried.append(f"{key}: stale epoch {data['epoch']}")
        if key == topology.MASTER:
            keys = [topology.node_key(p) for p in peers_by_seq(rpc, node=node, epoch=epoch)]
    raise NoAnswer("no master and no up-to-date peer can serve a snapshot"
                   + (f" ({'; '.join(tried)})" if tried else ""))


def peers_by_seq(rpc: RpcClient, *, node: str, epoch: int) -> list[str]:
    """Live peers that could serve ``node`` a snapshot, the most advanced first."""
    try:
        replies = rpc.call(topology.ALL, "status", timeout_s=2.0, expect=None)
    except NoAnswer:
        return []
    peers = [r.data for r in replies if r.ok and r.node != node
             and not r.data.get("diverged") and int(r.data.get("epoch", 0)) >= epoch]
    peers.sort(key=lambda d: int(d.get("applied_seq", 0)), reverse=True)
    return [str(p["node"]) for p in peers]
