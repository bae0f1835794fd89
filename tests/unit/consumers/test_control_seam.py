"""The control server on the in-process broker: answers, commits through its committer, refuses.

The server runs in its thread as in a node; requests go through ``tasync.broker.rpc.RpcClient`` as
the CLI sends them. The committer is the one the node would hand in, played here by an object that
commits to the store the way the relay does (without a seat or publishing).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tasync.broker import topology
from tasync.broker.commits import Committed, Op, parse_ops
from tasync.broker.connection import connect
from tasync.broker.consumer import ConsumerLoop
from tasync.broker.errors import NoAnswer, RemoteError
from tasync.broker.messages import Change
from tasync.broker.protocol import ControlOp, Role
from tasync.broker.rpc import RpcClient
from tasync.broker.settings import Settings
from tasync.broker.store import NodeStore
from tasync.consumers.context import NodeContext
from tasync.consumers.control import ControlServer
from tests.unit.consumers.conftest import MakeContext, batch, change, events
from tests.waiting import wait_for


class StoreCommitter:
    """Commits operations to the store in one transaction, numbered after its last seq."""

    def __init__(self, store: NodeStore, node: str) -> None:
        self.store = store
        self.node = node
        self.submitted: list[list[Op]] = []

    def submit(self, parsed: list[Op], *, request_id: str | None = None,
               staged: str | None = None) -> Committed:
        self.submitted.append(parsed)
        done = self.store.request(request_id) if request_id else None
        if done is not None:
            return Committed.from_request(done)
        seq, epoch = self.store.last_seq, max(1, self.store.epoch)
        changes = [Change(epoch=epoch, seq=seq + i, ts=time.time(), origin=self.node, op=o.op,
                          kind=o.kind, name=o.name, body=o.body)
                   for i, o in enumerate(parsed, 1)]
        self.store.commit(changes, request_id=request_id, staged=staged)
        return Committed(seq + 1, seq + len(changes), len(changes), epoch)


@pytest.fixture
def rpc(memory_settings: Settings) -> Iterator[RpcClient]:
    conn = connect(memory_settings)
    yield RpcClient(conn, sender="test")
    conn.release()


def serve(ctx: NodeContext, run: Callable[[ConsumerLoop], ConsumerLoop], *,
          master: bool) -> tuple[ControlServer, StoreCommitter, list[bool]]:
    committer = StoreCommitter(ctx.store, ctx.node)
    committed: list[bool] = []
    # The node object exists already, so the server's start-up hello commits nothing.
    ctx.store.apply(batch(Change(epoch=1, seq=1, ts=time.time(), origin="a", op="set",
                                 kind="node", name=ctx.node, body={})))
    server = ControlServer(ctx, committer=committer, keep_seat=lambda: master,
                           on_committed=lambda: committed.append(True))
    run(server)
    return server, committer, committed


def test_status_and_show_answer_from_the_store(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        rpc: RpcClient) -> None:
    ctx = make_context("b")
    serve(ctx, run, master=False)
    ctx.store.apply(batch(change(2, "d1"), change(3, "d2")))
    status = rpc.call_one(topology.node_key("b"), "status", timeout_s=5.0)
    assert (status["node"], status["role"], status["applied_seq"]) == ("b", "backup", 3)
    assert status["nodes"] == ["b"]
    shown = rpc.call_one(topology.node_key("b"), "show",
                         {"kind": "destination", "name": "d2"}, timeout_s=5.0)
    assert shown == {"objects": [{"kind": "destination", "name": "d2",
                                  "body": {"url": "file:///tmp/d2"}}], "applied_seq": 3}


def test_a_config_set_is_committed_through_the_committer(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        rpc: RpcClient) -> None:
    ctx = make_context("a", role=Role.MASTER)
    _server, committer, committed = serve(ctx, run, master=True)
    ops = [{"op": "set", "kind": "destination", "name": "pager",
            "body": {"url": "file:///tmp/pager"}}]
    answer = wait_for(lambda: _call_master(rpc, "commit", {"ops": ops, "request_id": "r-1"}),
                      timeout_s=10.0, what="the master's answer")
    assert answer == {"first_seq": 2, "last_seq": 2, "count": 1, "epoch": 1, "repeated": False}
    assert committer.submitted == [parse_ops(ops)]  # checked and normalised by the server
    assert ctx.store.get("destination", "pager") == parse_ops(ops)[0].body
    assert committed == [True]
    again = rpc.call_one(topology.MASTER, "commit", {"ops": ops, "request_id": "r-1"},
                         timeout_s=5.0)
    assert again["repeated"] is True and committed == [True]  # nothing new to announce


def test_a_bad_operation_is_refused_with_its_field_errors_before_any_commit(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        rpc: RpcClient) -> None:
    ctx = make_context("a", role=Role.MASTER)
    _server, committer, _committed = serve(ctx, run, master=True)
    bad = [{"op": "set", "kind": "destination", "name": "pager", "body": {"typo": 1}}]
    wait_for(lambda: _call_master(rpc, "head", {}), timeout_s=10.0, what="master bound")
    with pytest.raises(RemoteError, match="url: Missing data") as info:
        rpc.call_one(topology.MASTER, "commit", {"ops": bad}, timeout_s=5.0)
    assert info.value.error_type == "InvalidObject"
    assert committer.submitted == [] and ctx.store.get("destination", "pager") is None


def test_a_backup_refuses_what_only_the_master_answers(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        rpc: RpcClient) -> None:
    ctx = make_context("b")
    _server, committer, _committed = serve(ctx, run, master=False)
    ops = [{"op": "set", "kind": "destination", "name": "x", "body": {"url": "file:///tmp/x"}}]
    with pytest.raises(RemoteError, match="b is not the master"):
        rpc.call_one(topology.node_key("b"), "commit", {"ops": ops}, timeout_s=5.0)
    with pytest.raises(NoAnswer):  # a backup never binds the master's key
        rpc.call_one(topology.MASTER, "commit", {"ops": ops}, timeout_s=5.0)
    assert committer.submitted == [] and ctx.store.get("destination", "x") is None


def _call_master(rpc: RpcClient, op: str, args: dict[str, object]) -> dict[str, object] | None:
    """The master's answer, or None while no node has bound the master's key yet."""
    try:
        return rpc.call_one(topology.MASTER, op, args, timeout_s=5.0)
    except NoAnswer:
        return None


def test_a_commit_for_a_named_person_is_audited_once_with_their_name(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        rpc: RpcClient) -> None:
    ctx = make_context("a", role=Role.MASTER)
    serve(ctx, run, master=True)
    ops = [{"op": "set", "kind": "destination", "name": "pager",
            "body": {"url": "file:///tmp/pager"}}]
    args = {"ops": ops, "request_id": "r-by", "by": "console:alice"}
    wait_for(lambda: _call_master(rpc, "commit", args), timeout_s=10.0, what="the answer")
    rpc.call_one(topology.MASTER, "commit", args, timeout_s=5.0)  # a repeat: no second line
    rpc.call_one(topology.MASTER, "commit", {"ops": ops, "request_id": "r-cli"},
                 timeout_s=5.0)  # nobody named: no line
    lines = events(ctx, "change.committed")
    assert [(t["by"], t["op"], t["kind"], t["name"], t["first_seq"]) for t in lines] == [
        ("console:alice", "set", "destination", "pager", "2")]
    with pytest.raises(RemoteError, match="by must be"):
        rpc.call_one(topology.MASTER, "commit", {"ops": ops, "by": "eve\nforged line"},
                     timeout_s=5.0)


def test_a_failing_handler_answers_with_its_error_and_the_server_goes_on(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        rpc: RpcClient) -> None:
    ctx = make_context("b")

    def broken(_args: dict[str, object]) -> dict[str, object]:
        raise ValueError("a bug in a handler")

    committer = StoreCommitter(ctx.store, ctx.node)
    ctx.store.apply(batch(Change(epoch=1, seq=1, ts=time.time(), origin="a", op="set",
                                 kind="node", name=ctx.node, body={})))
    run(ControlServer(ctx, committer=committer, keep_seat=lambda: False,
                      handlers={ControlOp.TOTALS: broken}))
    with pytest.raises(RemoteError) as failed:
        rpc.call_one(topology.node_key("b"), "totals", timeout_s=5.0)
    assert failed.value.error_type == "InternalError"
    assert "ValueError: a bug in a handler" in str(failed.value)
    assert rpc.call_one(topology.node_key("b"), "status", timeout_s=5.0)["node"] == "b"
