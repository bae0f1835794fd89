"""The node's control server: answers status, export and show; on the master, commits changes.

Each running node holds an exclusive queue bound to ``all`` and ``node.<name>`` on the control
exchange; the master binds ``master`` too, so ``tasync config set`` reaches whichever node is the
master without knowing its name, and learns at once (a returned message) when none runs. The
queue is exclusive, so it disappears with the node's connection and never collects requests for
a dead node.

Before it binds ``master``, and before it answers any request only a master answers, the
server has the node's roles confirm that it still holds the master's seat (``keep_seat``): a
master that was stopped or cut off never acts on a request addressed to the role it lost.

Configuration requests are idempotent by their request id: a client that lost its answer
sends the same request again and gets the first result (the master's change relay). A bulk import
arrives part by part; each part is checked and staged durably in the master's store, so a
restart of the master loses nothing the client sent, and the import commits only when every
part is there, all of it in one transaction.

The server checks each operation's schema (``tasync.broker.commits.parse_ops``) and hands the
operations to a ``Committer``: what it needs of the master's change relay, declared here so that
consumers never import producers. The node hands its relay in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import amqp

from tasync.broker import messages, topology
from tasync.broker.collector import collector_paused
from tasync.broker.commits import Committed, Op, decode_staged, encode_staged, parse_ops
from tasync.broker.consumer import ConsumerLoop, message_body
from tasync.broker.errors import ImportIncomplete, MessageError, SeatLost, TasyncError
from tasync.broker.events import Event
from tasync.broker.messages import MAX_REQUEST_ID_CHARS, Reply, Request, request_actor
from tasync.broker.protocol import CONFIG_OPS, MASTER_OPS, NO_ANSWER_OPS, ControlOp, Handler, Role
from tasync.broker.rpc import reply_to
from tasync.consumers.context import NodeContext
from tasync.consumers.peers import BEACON_EVERY_S

log = logging.getLogger("tasync.control")
#: Staged parts of an import nobody touched for this long are dropped.
IMPORT_STALE_S = 24 * 3600.0
#: How often arriving import parts look for stale ones: the search reads every staged part,
#: so doing it for each of an import's parts would make staging quadratic in its size.
IMPORT_SWEEP_EVERY_S = 600.0
#: Refused imports remembered, so that their parts still in flight are not staged.
REFUSED_IMPORTS_KEPT = 256
#: How often a node not yet registered asks the master again.
HELLO_EVERY_S = 3.0
#: Bytes of export per interim reply of a streamed export (``_export``).
EXPORT_PIECE_BYTES = 256 << 10


class Committer(Protocol):
    """What the control server needs of the master's change relay (``tasync.producers.relay``)."""

    def submit(self, parsed: list[Op], *, request_id: str | None = None,
               staged: str | None = None) -> Committed:
        """Check references, commit and publish ``parsed``; return once the broker confirmed.

        A ``request_id`` committed before returns that first result and commits nothing;
        ``staged`` names the import whose staged parts the commit drops. Raises a
        ``TasyncError`` (``SeatLost`` among them) when nothing was reported committed.
        """


class ControlServer(ConsumerLoop):
    """Dispatches control requests to handlers.

    Args:
        ctx: the node context.
        committer: commits and publishes changes while this node is the master.
        keep_seat: confirms (or regains) the master's seat; False when the node is not the
            master (``tasync.consumers.roles.Roles.keep_seat``).
        handlers: requests other parts of the node answer (roles, delivery), by name.
        authorize: checks a configuration request's sender (telaconf.hosts); raises
            ``MessageError`` to refuse.
        on_committed: called after a commit, so the runtime refreshes ``status.json``.
        status_extra: more fields for ``status`` answers.
    """

    name = "tasync-control"

    def __init__(self, ctx: NodeContext, *, committer: Committer, keep_seat: Callable[[], bool],
                 handlers: Mapping[ControlOp, Handler] | None = None,
                 authorize: Callable[[Request, amqp.Message], None] | None = None,
                 on_committed: Callable[[], None] | None = None,
                 status_extra: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__(ctx.settings, prefetch=16)
        self.ctx = ctx
        self.name = f"tasync-control-{ctx.node}"
        self.committer = committer
        self.keep_seat = keep_seat
        self.authorize = authorize or (lambda _r, _m: None)
        self.on_committed = on_committed or (lambda: None)
        self.status_extra = status_extra or dict
        self.handlers: dict[ControlOp, Handler] = {
            ControlOp.STATUS: self._status,
            ControlOp.EXPORT: self._export,
            ControlOp.SHOW: self._show,
            ControlOp.HEAD: lambda _a: {"seq": ctx.store.last_seq, "epoch": ctx.store.epoch},
            ControlOp.COMMIT: self._commit,
            ControlOp.IMPORT: self._import,
            ControlOp.IMPORT_COMMIT: self._import_commit,
            ControlOp.REQUEST: self._request,
            ControlOp.HELLO: self._hello,
            ControlOp.BEACON: self._beacon,
            **(handlers or {}),
        }
        self._next_hello = 0.0
        self._next_beacon = 0.0
        self._next_sweep = 0.0
        self._bound_master = False
        #: Imports with a refused part, so that the parts the client had in flight behind it
        #: are refused too rather than staged for nobody (``_import``).
        self._refused_imports: dict[str, None] = {}

    def setup(self, channel: Any) -> None:
        """Declare the exclusive control queue and bind it by this node's role."""
        topology.declare_control(channel)
        queue = topology.control_queue(self.ctx.node)
        channel.queue_declare(queue, exclusive=True, auto_delete=True)
        self._bound_master = False
        for key in (topology.ALL, topology.node_key(self.ctx.node)):
            channel.queue_bind(queue, topology.CONTROL_EXCHANGE, key)
        self._follow_role()
        channel.basic_consume(queue, callback=self._on_request, on_cancel=self.cancelled)

    def on_connected(self) -> None:
        """Announce this node to the master so routes may name it."""
        self.send_hello()

    def on_idle(self) -> None:
        """Follow role changes and the seat; beacon; announce this node until registered."""
        self._follow_role()
        now = time.monotonic()
        if now >= self._next_beacon:
            self._next_beacon = now + BEACON_EVERY_S
            self.send_beacon()
        if now >= self._next_hello:
            self.send_hello()

    def send_beacon(self) -> None:
        """Tell every node (this one included) who this node is and where it stands.

        A request to ``all`` that wants no answer (``tasync.consumers.peers``): peers learn when
        this node was last seen, and from the master's beacon how far behind they are.
        """
        store = self.ctx.store
        master = self._bound_master
        args = {"node": self.ctx.node, "role": Role.MASTER if master else Role.BACKUP,
                "epoch": store.epoch, "ready": self.ctx.ready.is_set(),
                "seq": store.published_seq if master else store.last_seq}
        body = messages.encode(Request(op="beacon", sender=self.ctx.node, args=args))
        self.channel.basic_publish(
            amqp.Message(body, content_type="application/json",
                         expiration=str(int(BEACON_EVERY_S * 5000))),
            exchange=topology.CONTROL_EXCHANGE, routing_key=topology.ALL)

    def _follow_role(self, *, seat_checked: bool = False) -> None:
        """Bind ``master`` while this node is the master with the seat, else unbind it.

        A master whose seat was lost takes it back or steps down here (``keep_seat``), within
        ``poll_s`` of noticing, before it binds or answers anything. ``seat_checked``: the
        request just answered was a master's request, so ``keep_seat`` asked the broker moments
        ago; asking again after every part of an import was a second round trip per part, and
        the next master's request is checked again before it is answered.
        """
        master = self.ctx.is_master and (seat_checked or self.keep_seat())
        if master == self._bound_master:
            return
        queue = topology.control_queue(self.ctx.node)
        if master:
            self.channel.queue_bind(queue, topology.CONTROL_EXCHANGE, topology.MASTER)
        else:
            self.channel.queue_unbind(queue, topology.CONTROL_EXCHANGE, topology.MASTER)
        self._bound_master = master

    def _progress(self, request: amqp.Message, data: dict[str, Any]) -> None:
        """Send an interim answer to ``request``; it also keeps this connection alive."""
        if self.conn is not None:
            self.conn.heartbeat_check()
        reply_to(self.channel, request, Reply(ok=True, node=self.ctx.node,
                                              data={"progress": data}))

    def send_hello(self) -> None:
        """Ask the master to register this node (a ``node`` object), unless it already exists.

        Repeated every ``HELLO_EVERY_S`` until the node object arrives, because a backup may
        start before any master runs, and a hello sent then reaches nobody.
        """
        self._next_hello = time.monotonic() + HELLO_EVERY_S
        if self.ctx.store.get("node", self.ctx.node) is not None:
            self._next_hello = float("inf")
            return
        if self._bound_master:
            self._hello({"node": self.ctx.node})
            return
        body = messages.encode(Request(op="hello", sender=self.ctx.node,
                                       args={"node": self.ctx.node}))
        self.channel.basic_publish(amqp.Message(body, content_type="application/json"),
                                   exchange=topology.CONTROL_EXCHANGE,
                                   routing_key=topology.MASTER)

    def _on_request(self, message: amqp.Message) -> None:
        try:
            request: Request = messages.decode(
                message_body(message), max_bytes=self.settings.max_message_bytes,
                expect="request")
        except MessageError as exc:
            log.warning("refused a control message: %s", exc)
            self.channel.basic_ack(message.delivery_tag)
            return
        if _op(request.op) in CONFIG_OPS:
            try:
                self.authorize(request, message)
            except MessageError as exc:
                self.ctx.trail.event(Event.CHANGE_REJECTED, reason=str(exc), sender=request.sender)
                reply_to(self.channel, message, Reply(ok=False, node=self.ctx.node,
                                                      error=str(exc), error_type="MessageError"))
                self.channel.basic_ack(message.delivery_tag)
                return
        if request.args.get("progress"):
            with self.ctx.progress.attached(lambda data: self._progress(message, data)):
                reply = self._dispatch(request)
        else:
            reply = self._dispatch(request)
        reply_to(self.channel, message, reply)
        self.channel.basic_ack(message.delivery_tag)
        self._follow_role(seat_checked=reply.ok and _op(request.op) in MASTER_OPS)

    def _dispatch(self, request: Request) -> Reply:
        op = _op(request.op)
        handler = self.handlers.get(op) if op is not None else None
        if op is None or handler is None:
            return Reply(ok=False, node=self.ctx.node, error=f"unknown request {request.op!r}",
                         error_type="ConfigError")
        try:
            if op in MASTER_OPS and not (self.ctx.is_master and self.keep_seat()):
                return Reply(ok=False, node=self.ctx.node, error_type="RemoteError",
                             error=f"{self.ctx.node} is not the master")
            if op not in NO_ANSWER_OPS:
                log.debug("request %s from %s", request.op, request.sender)
            return Reply(ok=True, node=self.ctx.node, data=handler(request.args))
        except TasyncError as exc:
            data = {"errors": getattr(exc, "errors", {}), **getattr(exc, "data", {})}
            return Reply(ok=False, node=self.ctx.node, error=str(exc), data=data,
                         error_type=type(exc).__name__)
        except Exception as exc:  # a handler's bug answers the asker; it must not wedge the queue
            log.exception("request %s from %s failed", request.op, request.sender)
            return Reply(ok=False, node=self.ctx.node, error_type="InternalError",
                         error=f"{self.ctx.node} could not answer {request.op!r}: "
                               f"{type(exc).__name__}: {exc}")

    def _status(self, _args: dict[str, Any]) -> dict[str, Any]:
        nodes = [name for _k, name, _b in self.ctx.store.objects("node")]
        return {**self.ctx.status(), "nodes": nodes, "diverged": self.ctx.store.diverged,
                "peers": self.ctx.peers.view(), **self.status_extra()}

    def _export(self, args: dict[str, Any]) -> dict[str, Any]:
        """The canonical export; streamed in interim replies when the asker wants progress.

        A whole export in one reply is as large as the configuration (about 150 MB at
        1,000,000 objects, beyond any message limit); in pieces of ``EXPORT_PIECE_BYTES`` the
        node holds one piece at a time and the asker writes each as it arrives.
        """
        chunks = self.ctx.store.export_chunks()
        if not args.get("progress"):
            return {"export": b"".join(chunks).decode()}
        piece: list[bytes] = []
        size = 0
        for chunk in chunks:
            piece.append(chunk)
            size += len(chunk)
            if size >= EXPORT_PIECE_BYTES:
                self.ctx.progress({"stage": "export", "piece": b"".join(piece).decode()})
                piece, size = [], 0
        return {"export": b"".join(piece).decode(), "streamed": True}

    def _beacon(self, args: dict[str, Any]) -> dict[str, Any]:
        self.ctx.peers.saw(args)
        return {}

    def _show(self, args: dict[str, Any]) -> dict[str, Any]:
        kind, name = args.get("kind"), args.get("name")
        objects = [
            {"kind": k, "name": n, "body": b}
            for k, n, b in self.ctx.store.objects(kind)
            if name is None or n == name
        ]
        return {"objects": objects, "applied_seq": self.ctx.store.last_seq}

    # -- configuration changes ----------------------------------------------------------------

    def _commit(self, args: dict[str, Any]) -> dict[str, Any]:
        """Commit a client's operations; the master writes who asked when the request says.

        A client acting for a person (the web console, for its logged-in user) names them in
        ``by``, and the master writes ``change.committed`` with the name. The line is written
        once per change, not for a repeat of the same request id, so the trail names each
        person once for what they changed; a request that changed nothing writes none.
        """
        ops = args.get("ops")
        if not isinstance(ops, list):
            raise MessageError("commit needs a list of operations")
        by = request_actor(args)
        parsed = parse_ops(ops)
        result = self._submit(parsed, request_id=_request_id(args, "request_id"))
        if by is not None and result["count"] and not result["repeated"]:
            what = ({"op": parsed[0].op, "kind": parsed[0].kind, "name": parsed[0].name}
                    if len(parsed) == 1 else {})
            self.ctx.trail.event(Event.CHANGE_COMMITTED, by=by, first_seq=result["first_seq"],
                                 last_seq=result["last_seq"], count=result["count"],
                                 epoch=result["epoch"], **what)
        return result

    def _submit(self, ops: list[Op], *, request_id: str | None,
                staged: str | None = None) -> dict[str, Any]:
        try:
            committed = self.committer.submit(ops, request_id=request_id, staged=staged)
        except SeatLost as exc:
            committed = self._after_seat_lost(exc, request_id)
        if committed.count and not committed.repeated:
            self.on_committed()
        return {"first_seq": committed.first_seq, "last_seq": committed.last_seq,
                "count": committed.count, "epoch": committed.epoch,
                "repeated": committed.repeated}

    def _after_seat_lost(self, exc: SeatLost, request_id: str | None) -> Committed:
        """A commit lost the seat before its confirm: report it only if the seat came back.

        Regaining the seat publishes the outbox, the commit included; otherwise the node
        stepped down and its unconfirmed change becomes a conflict, never "committed".
        """
        done = self.ctx.store.request(request_id) if request_id else None
        if done is not None and self.keep_seat() and done.last_seq <= self.ctx.store.published_seq:
            return Committed.from_request(done)
        raise SeatLost(f"{self.ctx.node} lost the master's seat before the broker confirmed "
                       f"the change ({exc}); it was not committed to the network (see tasync "
                       f"recover --node {self.ctx.node} for changes it kept)") from None

    def _import(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check one part of a bulk import and stage it durably; nothing is committed yet.

        Each part's schema is checked when it arrives, so a bad object is reported before the
        client sends the rest; references are checked and everything is committed only by
        ``import_commit``, so an import is applied whole or not at all.
        """
        import_id = _request_id(args, "import_id", required=True)
        assert import_id is not None
        part, parts, ops = args.get("part"), args.get("parts"), args.get("ops")
        if not (_count(parts) and _count(part, zero=True) and part < parts  # type: ignore[operator]
                and isinstance(ops, list)):
            raise MessageError("import needs import_id, part (0-based) < parts, and a list ops")
        if import_id in self._refused_imports:
            raise MessageError(f"import {import_id[:12]}: an earlier part was refused; nothing "
                               "of it is staged")
        try:
            with collector_paused():
                parsed = parse_ops(ops)
                text = encode_staged(parsed)
        except TasyncError:
            self.ctx.store.drop_staged(import_id=import_id)
            self._refused_imports[import_id] = None
            while len(self._refused_imports) > REFUSED_IMPORTS_KEPT:
                del self._refused_imports[next(iter(self._refused_imports))]
            raise
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + IMPORT_SWEEP_EVERY_S
            self.ctx.store.drop_staged(older_than_s=IMPORT_STALE_S)
        staged = self.ctx.store.stage(import_id, int(part), int(parts),  # type: ignore[arg-type]
                                      text)
        return {"import_id": import_id, "staged": staged, "parts": parts}

    def _import_commit(self, args: dict[str, Any]) -> dict[str, Any]:
        """Commit a staged import in one transaction, only when every part is there.

        As for ``commit``, a ``by`` naming whom the import is for (the console's user) is
        written to the trail with the import's seqs, once.
        """
        import_id = _request_id(args, "import_id", required=True)
        assert import_id is not None
        parts, expected = args.get("parts"), args.get("ops")
        if not (_count(parts) and _count(expected, zero=True)):
            raise MessageError("import_commit needs import_id, parts and ops (counts)")
        done = self.ctx.store.request(import_id)
        if done is not None:
            return {**self._submit([], request_id=import_id), "ops": expected}
        staged = self.ctx.store.staged_parts(import_id)
        missing = sorted(set(range(int(parts))) - set(staged))  # type: ignore[arg-type]
        if missing:
            raise ImportIncomplete(
                f"import {import_id[:12]}: {self.ctx.node} holds {len(staged)} of {parts} "
                f"parts (the master may have restarted or changed); missing part "
                f"{missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
                missing=missing)
        with collector_paused():
            ops = [o for text in self.ctx.store.staged_ops(import_id)
                   for o in decode_staged(text)]
        if len(ops) != expected:
            self.ctx.store.drop_staged(import_id=import_id)
            raise ImportIncomplete(f"import {import_id[:12]}: {len(ops)} operations arrived, "
                                   f"the client sent {expected}; nothing was committed",
                                   missing=list(range(int(parts))))  # type: ignore[arg-type]
        by = request_actor(args)
        result = self._submit(ops, request_id=import_id, staged=import_id)
        if by is not None and result["count"] and not result["repeated"]:
            self.ctx.trail.event(Event.CHANGE_COMMITTED, by=by, first_seq=result["first_seq"],
                                 last_seq=result["last_seq"], count=result["count"],
                                 epoch=result["epoch"], op="import")
        return {**result, "ops": len(ops)}

    def _request(self, args: dict[str, Any]) -> dict[str, Any]:
        """What became of a request id: committed (with its seqs), staged parts, or unknown."""
        request_id = _request_id(args, "request_id", required=True)
        assert request_id is not None
        store = self.ctx.store
        done = store.request(request_id)
        if done is not None:
            return {"state": "committed", "first_seq": done.first_seq,
                    "last_seq": done.last_seq, "count": done.count, "epoch": done.epoch,
                    "confirmed": done.last_seq <= store.published_seq}
        staged = store.staged_parts(request_id)
        if staged:
            return {"state": "staged", "staged": staged}
        return {"state": "unknown"}

    def _hello(self, args: dict[str, Any]) -> dict[str, Any]:
        node = str(args.get("node", ""))
        if self.ctx.store.get("node", node) is not None:
            return {}
        topology.check_node_name(node)
        self._commit({"ops": [{"op": "set", "kind": "node", "name": node, "body": {}}]})
        self.ctx.trail.event(Event.NODE_REGISTERED, name=node)
        return {}


def _request_id(args: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REQUEST_ID_CHARS \
            or not value.isprintable():
        raise MessageError(f"{key} must be 1-{MAX_REQUEST_ID_CHARS} printable characters")
    return value


def _count(value: Any, *, zero: bool = False) -> bool:
    return type(value) is int and value >= (0 if zero else 1)


def _op(name: str) -> ControlOp | None:
    """The request's operation, or None for one no node answers (said as "unknown")."""
    try:
        return ControlOp(name)
    except ValueError:
        return None
