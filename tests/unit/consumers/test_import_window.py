"""An import's parts sent several at a time: every part staged once, the import whole or not.

The CLI keeps ``IMPORT_WINDOW`` parts in flight (``tasync.cli_config._Import``) through the
control server on the in-process broker. A client that loses some parts' first copies and sends
others twice stands for a master that died with requests in its queue and a resend that crossed
an answer: the import still commits once, with every operation once and in the file's order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tasync import cli_config, client
from tasync.broker.connection import connect
from tasync.broker.consumer import ConsumerLoop
from tasync.broker.errors import RemoteError
from tasync.broker.protocol import Role
from tasync.broker.rpc import RpcClient
from tasync.broker.settings import Settings
from tasync.client import MasterSession
from tasync.consumers.context import NodeContext
from tests.unit.consumers.conftest import MakeContext
from tests.unit.consumers.test_control_seam import StoreCommitter, serve

PARTS = 23  # not a multiple of the window, so the last window is a partial one


class LossyClient(RpcClient):
    """Drops the first copy of the parts in ``lose`` and sends those in ``twice`` twice."""

    def __init__(self, *args: Any, lose: set[int], twice: set[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lose, self.twice = set(lose), twice
        self.in_flight = 0
        self.most_in_flight = 0
        self.import_sends: list[int] = []

    def send(self, corr: str, routing_key: str, body: bytes, *, ttl_s: float) -> None:
        request = json.loads(body)
        if request["op"] == "import":
            part = request["args"]["part"]
            self.import_sends.append(part)
            if corr not in self._sent_at:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            if part in self.lose:
                self.lose.discard(part)
                self._sent_at.setdefault(corr, 0.0)
                return
            if part in self.twice:
                super().send(corr, routing_key, body, ttl_s=ttl_s)
        super().send(corr, routing_key, body, ttl_s=ttl_s)

    def forget(self, corr: str) -> None:
        if corr in self._sent_at and self._replies.get(corr) is not None:
            self.in_flight -= 1
        super().forget(corr)


@pytest.fixture
def lossy(memory_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[
        Callable[..., LossyClient]]:
    monkeypatch.setattr(client, "RESEND_S", 0.3)  # a lost part is sent again soon
    conns = []

    def make(**kwargs: Any) -> LossyClient:
        conn = connect(memory_settings)
        conns.append(conn)
        return LossyClient(conn, sender="test", **kwargs)

    yield make
    for conn in conns:
        conn.release()


def ops(count: int) -> list[dict[str, Any]]:
    return [{"op": "set", "kind": "destination", "name": f"w-{i:05d}",
             "body": {"url": f"file:///tmp/w/{i}"}} for i in range(count)]


def import_master(make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
                  settings: Settings, monkeypatch: pytest.MonkeyPatch
                  ) -> tuple[NodeContext, StoreCommitter, MasterSession]:
    """A master serving control requests, imports cut in parts of 10, and a CLI session."""
    monkeypatch.setattr(cli_config, "IMPORT_PART", 10)
    ctx = make_context("a", role=Role.MASTER)
    _server, committer, _ = serve(ctx, run, master=True)
    return ctx, committer, MasterSession(settings, timeout_s=60)


def test_lost_and_repeated_parts_stage_once_and_commit_whole(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        memory_settings: Settings, lossy: Callable[..., LossyClient],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, committer, session = import_master(make_context, run, memory_settings, monkeypatch)
    rpc = lossy(lose={2, 9, PARTS - 1}, twice={0, 5, 16})
    sent = ops(PARTS * 10 - 4)
    shown: list[int] = []
    job = cli_config._Import(session, sent, shown.append)
    result = job.step(rpc, False)
    cli_config.check_import(result, sent)
    assert result["ops"] == len(sent) and result["count"] == len(sent)
    imported = [batch for batch in committer.submitted if len(batch) > 1]
    assert len(imported) == 1, "the import was committed more than once"
    assert [o.name for o in imported[0]] == [o["name"] for o in sent]  # each once, in order
    assert ctx.store.staged_parts(job.import_id) == []  # dropped with the commit
    assert shown == sorted(shown) and shown[-1] == len(sent)  # progress only ever grows
    assert len(shown) == PARTS  # one step per part, a repeated answer not counted twice
    assert 1 < rpc.most_in_flight <= cli_config.IMPORT_WINDOW
    assert sorted(set(rpc.import_sends)) == list(range(PARTS))


def test_a_refused_part_fails_the_import_and_commits_nothing(
        make_context: MakeContext, run: Callable[[ConsumerLoop], ConsumerLoop],
        memory_settings: Settings, lossy: Callable[..., LossyClient],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, committer, session = import_master(make_context, run, memory_settings, monkeypatch)
    sent = ops(200)
    sent[125]["body"] = {"url": "no scheme"}  # the CLI checks first; this stands for an older one
    job = cli_config._Import(session, sent, lambda _n: None)
    rpc = lossy(lose=set(), twice=set())
    with pytest.raises(RemoteError, match="w-00125"):
        job.step(rpc, False)
    # The server answers in order: once this is answered, the parts behind the refused one
    # were handled too, and none of them was staged for an import nobody will commit.
    status = session.call(rpc, "request", {"request_id": job.import_id})
    assert status == {"state": "unknown"}
    assert [b for b in committer.submitted if len(b) > 1] == []
    assert ctx.store.get("destination", "w-00000") is None
