"""Which nodes the network knows, so a command can reject a mistyped node name at once.

Every node registers itself as a ``node`` object, which replicates like all configuration, so
the master's store (else any live node's) lists the network's nodes. A name that is not among
them and that no running node answers to is a typo or a node never started: the command says
so with the known names, instead of waiting for an answer and then calling the node dead. A
known node that does not answer still gets the command's own "does not answer" message.
"""

from __future__ import annotations

from collections.abc import Iterable

from tasync.broker import topology
from tasync.broker.errors import NoAnswer, RemoteError, UnknownNode
from tasync.broker.rpc import RpcClient

#: How long to wait for the master's (or else any node's) list; either answers in
#: milliseconds when it runs, and an unrouted request comes back at once when none does.
LIST_TIMEOUT_S = 2.0
#: How long a node missing from the list gets to answer for itself: one that runs but has not
#: registered yet (it just started, or started while no master ran) answers in milliseconds.
PROBE_TIMEOUT_S = 0.5


def known_nodes(rpc: RpcClient) -> list[str] | None:
    """The names of the network's ``node`` objects: the master's, else a live node's.

    Returns None when no node answers at all: then nothing can be said about any name.
    """
    for key, expect in ((topology.MASTER, 1), (topology.ALL, 1)):
        try:
            replies = rpc.call(key, "status", timeout_s=LIST_TIMEOUT_S, expect=expect)
        except NoAnswer:
            continue
        for reply in replies:
            if reply.ok:
                return sorted(str(n) for n in reply.data.get("nodes", []))
    return None


def _answers(rpc: RpcClient, name: str) -> bool:
    try:
        rpc.call_one(topology.node_key(name), "status", timeout_s=PROBE_TIMEOUT_S)
    except (NoAnswer, RemoteError):
        return False
    return True


def check_known(rpc: RpcClient, names: Iterable[str | None]) -> None:
    """Raise ``UnknownNode`` for the first name that is neither known nor running.

    Raises:
        UnknownNode: ``unknown node 'zz' (known nodes: a, b, c)``.
    """
    wanted = [n for n in names if n]
    if not wanted:
        return
    known = known_nodes(rpc)
    if known is None:
        return
    for name in wanted:
        if name not in known and not _answers(rpc, name):
            listed = ", ".join(known) or "none yet"
            raise UnknownNode(f"unknown node {name!r} (known nodes: {listed})")
