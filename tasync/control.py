"""The node's control server: answers status, export and show; on the master, commits changes.

Each running node holds an exclusive queue bound to ``all`` and ``node.<name>`` on the control
exchange; the master binds ``master`` too, so ``tasync config set`` reaches whichever node is the
master without knowing its name, and learns at once (a returned message) when none runs. The
queue is exclusive, so it disappears with the node's connection and never collects requests for
a dead node.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import amqp

from broker import messages, topology
from broker.consumer import ConsumerLoop, message_body
from broker.errors import MessageError, TasyncError
from broker.messages import Reply, Request
from broker.rpc import reply_to
from consumers.context import NodeContext
from producers.changes import Op, parse_ops
from producers.relay import ChangeRelay

log = logging.getLogger("tasync.control")
Handler = Callable[[dict[str, Any]], dict[str, Any]]
#: Requests only the master answers (a backup refuses them).
MASTER_OPS = frozenset({"commit", "import", "head", "hello", "step_down"})
#: Requests that change configuration, checked against telaconf.hosts.
CONFIG_OPS = frozenset({"commit", "import"})
#: A bulk import waits at most this long between two of its parts before it is dropped.
IMPORT_STALE_S = 600.0
#: How often a node not yet registered asks the master again.
HELLO_EVERY_S = 3.0


class ControlServer(ConsumerLoop):
    """Dispatches control requests to handlers; other components add theirs to ``handlers``."""

    name = "tasync-control"

    def __init__(self, ctx: NodeContext, *, relay: ChangeRelay | None) -> None:
        super().__init__(ctx.settings, prefetch=16)
        self.ctx = ctx
        self.name = f"tasync-control-{ctx.node}"
        self.relay = relay
        self.handlers: dict[str, Handler] = {
            "status": self._status,
            "export": lambda _a: {"export": ctx.store.export_bytes().decode()},
            "show": self._show,
            "head": lambda _a: {"seq": ctx.store.last_seq, "epoch": ctx.store.epoch},
            "commit": self._commit,
            "import": self._import,
            "hello": self._hello,
        }
        self.on_committed: Callable[[], None] = lambda: None
        #: Checks a configuration request's sender (telaconf.hosts); raises MessageError.
        self.authorize: Callable[[Request, amqp.Message], None] = lambda _r, _m: None
        #: More fields for ``status`` answers (conflicts kept, ...).
        self.status_extra: Callable[[], dict[str, Any]] = dict
        #: Run before binding ``master`` on every (re)connect; may step the node down.
        self.before_master_bind: Callable[[], None] = lambda: None
        self._imports: dict[str, tuple[float, list[Op]]] = {}
        self._next_hello = 0.0
        #: The request being handled, when its sender asked for progress answers.
        self._progress_to: amqp.Message | None = None
        self._role_changed = threading.Event()

    def setup(self, channel: Any) -> None:
        """Declare the exclusive control queue and bind it by this node's roles."""
        topology.declare_control(channel)
        queue = topology.control_queue(self.ctx.node)
        channel.queue_declare(queue, exclusive=True, auto_delete=True)
        if self.ctx.is_master:
            self.before_master_bind()  # after a partition, a newer epoch may run: step down
        keys = [topology.ALL, topology.node_key(self.ctx.node)]
        if self.ctx.is_master:
            keys.append(topology.MASTER)
        for key in keys:
            channel.queue_bind(queue, topology.CONTROL_EXCHANGE, key)
        channel.basic_consume(queue, callback=self._on_request, on_cancel=self.cancelled)

    def on_connected(self) -> None:
        """Announce this node to the master so routes may name it."""
        self.send_hello()

    def on_idle(self) -> None:
        """Follow a role change; keep the master's publisher connection alive."""
        if self._role_changed.is_set():
            self._apply_role()
        if self.relay is not None:
            self.relay.heartbeat()
        if time.monotonic() >= self._next_hello:
            self.send_hello()

    def role_changed(self) -> None:
        """The node's role changed (promotion, step-down): rebind ``master``, drop the relay.

        Safe from any thread: the binding changes in this server's own thread, at once when
        called from a request handler, else within ``poll_s``. Requests for the master are
        refused from the moment the store says so, whatever the binding still is.
        """
        self._role_changed.set()
        if threading.current_thread() is self._thread and self.channel is not None:
            self._apply_role()

    def _apply_role(self) -> None:
        self._role_changed.clear()
        queue = topology.control_queue(self.ctx.node)
        if self.ctx.is_master:
            self.channel.queue_bind(queue, topology.CONTROL_EXCHANGE, topology.MASTER)
            return
        self.channel.queue_unbind(queue, topology.CONTROL_EXCHANGE, topology.MASTER)
        if self.relay is not None:
            self.relay.close()
            self.relay = None

    def progress(self, data: dict[str, Any]) -> None:
        """Send an interim answer to the request being handled, if its sender asked for them.

        A long recovery reports how far it got this way, and the answers keep this server's
        connection alive while the handler runs.
        """
        if self.conn is not None:
            self.conn.heartbeat_check()
        if self._progress_to is not None:
            reply_to(self.channel, self._progress_to,
                     Reply(ok=True, node=self.ctx.node, data={"progress": data}))

    def send_hello(self) -> None:
        """Ask the master to register this node (a ``node`` object), unless it already exists.

        Repeated every ``HELLO_EVERY_S`` until the node object arrives, because a backup may
        start before any master runs, and a hello sent then reaches nobody.
        """
        self._next_hello = time.monotonic() + HELLO_EVERY_S
        if self.ctx.store.get("node", self.ctx.node) is not None:
            self._next_hello = float("inf")
            return
        if self.ctx.is_master:
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
        if request.op in CONFIG_OPS:
            try:
                self.authorize(request, message)
            except MessageError as exc:
                self.ctx.trail.event("change_rejected", reason=str(exc), sender=request.sender)
                reply_to(self.channel, message, Reply(ok=False, node=self.ctx.node,
                                                      error=str(exc), error_type="MessageError"))
                self.channel.basic_ack(message.delivery_tag)
                return
        self._progress_to = message if request.args.get("progress") else None
        try:
            reply = self._dispatch(request)
        finally:
            self._progress_to = None
        reply_to(self.channel, message, reply)
        self.channel.basic_ack(message.delivery_tag)
        if self._role_changed.is_set():
            self._apply_role()

    def _dispatch(self, request: Request) -> Reply:
        handler = self.handlers.get(request.op)
        if handler is None:
            return Reply(ok=False, node=self.ctx.node, error=f"unknown request {request.op!r}",
                         error_type="ConfigError")
        if request.op in MASTER_OPS and not self.ctx.is_master:
            return Reply(ok=False, node=self.ctx.node, error_type="RemoteError",
                         error=f"{self.ctx.node} is not the master")
        log.debug("request %s from %s", request.op, request.sender)
        try:
            return Reply(ok=True, node=self.ctx.node, data=handler(request.args))
        except TasyncError as exc:
            data = {"errors": getattr(exc, "errors", {})}
            return Reply(ok=False, node=self.ctx.node, error=str(exc), data=data,
                         error_type=type(exc).__name__)

    def _status(self, _args: dict[str, Any]) -> dict[str, Any]:
        nodes = [name for _k, name, _b in self.ctx.store.objects("node")]
        return {**self.ctx.status(), "nodes": nodes, "diverged": self.ctx.store.diverged,
                **self.status_extra()}

    def _show(self, args: dict[str, Any]) -> dict[str, Any]:
        kind, name = args.get("kind"), args.get("name")
        objects = [
            {"kind": k, "name": n, "body": b}
            for k, n, b in self.ctx.store.objects(kind)
            if name is None or n == name
        ]
        return {"objects": objects, "applied_seq": self.ctx.store.last_seq}

    def _commit(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.relay is not None
        ops = args.get("ops")
        if not isinstance(ops, list):
            raise MessageError("commit needs a list of operations")
        return self._submit(parse_ops(ops))

    def _submit(self, ops: list[Op]) -> dict[str, Any]:
        assert self.relay is not None
        committed = self.relay.submit(ops)
        if committed.count:
            self.on_committed()
        return {"first_seq": committed.first_seq, "last_seq": committed.last_seq,
                "count": committed.count, "epoch": committed.epoch}

    def _import(self, args: dict[str, Any]) -> dict[str, Any]:
        """Stage a bulk import part by part; commit all of it in one transaction at the end.

        Each part's schema is checked when it arrives, so a bad object is reported before the
        client sends the rest; references are checked and everything is committed only with
        the final part, so an import is applied whole or not at all.
        """
        now = time.monotonic()
        for key in [k for k, (ts, _) in self._imports.items() if now - ts > IMPORT_STALE_S]:
            del self._imports[key]
        import_id = str(args.get("import_id", ""))
        ops = args.get("ops")
        if not import_id or not isinstance(ops, list):
            raise MessageError("import needs an import_id and a list of operations")
        try:
            parsed = parse_ops(ops)
        except TasyncError:
            self._imports.pop(import_id, None)
            raise
        staged = self._imports.setdefault(import_id, (now, []))[1]
        staged.extend(parsed)
        self._imports[import_id] = (now, staged)
        if not args.get("final"):
            return {"staged": len(staged)}
        del self._imports[import_id]
        return self._submit(staged)

    def _hello(self, args: dict[str, Any]) -> dict[str, Any]:
        node = str(args.get("node", ""))
        if self.relay is None or self.ctx.store.get("node", node) is not None:
            return {}
        topology.check_node_name(node)
        self._commit({"ops": [{"op": "set", "kind": "node", "name": node, "body": {}}]})
        self.ctx.trail.event("node_registered", name=node)
        return {}
