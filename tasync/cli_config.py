"""``tasync config``: change, show and export the configuration.

Changes go to whichever node is the master and return once the broker confirmed them;
``--wait-applied`` also waits until every live backup applied them. Reads go to the master,
to a named node (``--node``), or straight to a local store (``--data-dir``).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tasync.broker import kinds
from tasync.broker.collector import BULK_OPS, collector_paused
from tasync.broker.errors import (
    ConfigError,
    ImportMismatch,
    InvalidObject,
    NoAnswer,
    NotApplied,
    RemoteError,
)
from tasync.broker.rpc import RpcClient
from tasync.broker.settings import Settings
from tasync.broker.store import NodeStore
from tasync.client import MasterSession, rpc_client, target_key
from tasync.config_files import load_import_file, objects_to_ops
from tasync.known_nodes import check_known
from tasync.options import (
    json_option,
    make_settings,
    print_json,
    timeout_option,
)
from tasync.progress import ProgressBar

KIND_CHOICE = click.Choice(list(kinds.KINDS))
IMPORT_PART = 1000
#: Parts of an import sent before the first is answered. One at a time, the CLI waited a round
#: trip and the master's staging (an fsync) per part while the other stood idle; a window keeps
#: the master staging. The master's control server takes 16 requests at a time (its prefetch),
#: and a window of parts of about 100 kB each stays well under a message's size limit.
IMPORT_WINDOW = 8


@click.group()
def config() -> None:
    """Change the master's configuration, or look at what a node holds.

    \b
    Examples:
      tasync config set destination ops --url file:///var/spool/alerts.jsonl
      tasync config show route
      tasync config export --node b > b.json
      tasync config import config.yaml --wait-applied
    """


#: Largest ``--json`` body: an object's fields, not a bulk load (that is ``config import``).
MAX_JSON_OPTION_BYTES = 1 << 20


def _body_from_options(kind: str, body_json: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if body_json:
        if len(body_json.encode()) > MAX_JSON_OPTION_BYTES:
            raise ConfigError(f"--json is larger than {MAX_JSON_OPTION_BYTES >> 10} KiB; use "
                              "tasync config import FILE for bulk loads")
        try:
            body = json.loads(body_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--json is not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError("--json is nested too deeply to be an object's fields") from None
        except ValueError as exc:  # an integer of more than 4,300 digits
            raise ConfigError(f"--json is not valid JSON: {str(exc)[:120]}") from None
        if not isinstance(body, dict):
            raise ConfigError("--json must be a JSON object")
    for key, value in fields.items():
        if value not in (None, ()):
            body[key] = list(value) if isinstance(value, tuple) else value
    return body


def commit_once(settings: Settings, ops: list[dict[str, Any]], *, timeout_s: float,
                by: str | None = None) -> dict[str, Any]:
    """Commit ``ops`` on the master exactly once, across a lost connection or a restart.

    One request id, sent again after a lost answer and answered from the master's record of
    the first attempt. ``by`` names whom the change is made for (the console's user); the
    master writes it to its trail.
    """
    request_id = uuid.uuid4().hex
    session = MasterSession(settings, timeout_s=max(timeout_s, settings.confirm_timeout_s))
    args: dict[str, Any] = {"ops": ops, "request_id": request_id}
    if by is not None:
        args["by"] = by

    def step(rpc: RpcClient, resumed: bool) -> dict[str, Any]:
        if resumed:
            known = _committed(session, rpc, request_id)
            if known is not None:
                return known
        return session.call(rpc, "commit", args)

    return _no_master_hint(session, step)


def _commit(settings: Settings, ops: list[dict[str, Any]], *, wait_applied: bool,
            strict: bool, timeout_s: float) -> dict[str, Any]:
    """Commit ``ops`` (``commit_once``), then wait for the backups when asked."""
    result = commit_once(settings, ops, timeout_s=timeout_s)
    if wait_applied and result["count"]:
        with rpc_client(settings) as rpc:
            _wait_applied(rpc, result["last_seq"], timeout_s=timeout_s, strict=strict)
    return result


def _no_master_hint(session: MasterSession, step: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = session.run(step)
    except NoAnswer as exc:
        if session.resumed or session.answered:
            raise NoAnswer(f"{exc}; the change may or may not have been committed: check "
                           "with tasync config show") from None
        raise NoAnswer(f"{exc} (is a node running with --role master?)") from None
    return result


def _committed(session: MasterSession, rpc: RpcClient, request_id: str) -> dict[str, Any] | None:
    """The result of an earlier attempt of this request, once the broker confirmed it."""
    while True:
        status = session.call(rpc, "request", {"request_id": request_id})
        if status["state"] != "committed":
            return None
        if status["confirmed"]:
            return {**status, "repeated": True}
        time.sleep(0.2)  # committed, not yet confirmed: the master is publishing it


def _wait_applied(rpc: Any, seq: int, *, timeout_s: float, strict: bool) -> None:
    """Wait until every live backup applied ``seq``; name the known nodes that did not answer.

    A node that does not answer (down, or hung) is not waited for: it applies the change from
    its sync queue when it returns. It is named on stderr, or, with ``strict``, the command
    fails (exit 1) so that a script knows not every backup has the change yet.
    """
    from tasync.health import ago, gather_status  # only ``--wait`` asks every node

    deadline = time.monotonic() + timeout_s
    while True:
        report = gather_status(rpc, timeout_s=1.0)
        behind = [r["node"] for r in report.live() if int(r.get("applied_seq") or 0) < seq]
        if not behind:
            break
        if time.monotonic() > deadline:
            raise ConfigError(f"committed, but not yet applied on: {', '.join(behind)}")
        time.sleep(0.05)
    silent = [f"{r['node']} (does not answer: down or hung"
              + (f", last seen {ago(r['last_seen'])})" if r.get("last_seen") else ")")
              for r in report.rows if not r.get("alive")]
    if not silent:
        return
    if strict:
        raise NotApplied(f"committed, but not applied everywhere: {', '.join(silent)}")
    click.echo(f"tasync: warning: committed; not waited for {', '.join(silent)}: a node "
               "applies the change from its sync queue when it returns", err=True)


def _report(result: dict[str, Any], what: str, as_json: bool) -> None:
    if as_json:
        print_json(result)
    elif result["count"]:
        click.echo(f"{what}: committed seq {result['first_seq']}..{result['last_seq']} "
                   f"(epoch {result['epoch']})")
    else:
        click.echo(f"{what}: nothing to change")


def wait_option(fn: Any) -> Any:
    """``--wait-applied`` and ``--strict`` for the commands that change configuration."""
    fn = click.option("--strict", is_flag=True,
                      help="With --wait-applied: fail (exit 1) when a known backup does not "
                           "answer, instead of naming it and going on.")(fn)
    return click.option("--wait-applied", is_flag=True,
                        help="Also wait until every live backup has applied the change; "
                             "backups that do not answer are named.")(fn)


@config.command("set")
@click.argument("kind", type=KIND_CHOICE)
@click.argument("name")
@click.option("--json", "body_json", metavar="JSON", help="The object's fields as a JSON object.")
@click.option("--url", help="destination: delivery URL (file://, https://, mailto:, ...).")
@click.option("--schedule", help="destination: name of the schedule that gates it.")
@click.option("--subject", help="destination: subject template.")
@click.option("--member", "members", multiple=True, help="group: a member (repeat).")
@click.option("--mode", type=click.Choice(["all", "sequence"]), help="group: delivery mode.")
@click.option("--host", "hosts", multiple=True, help="route: a node, in precedence order (repeat).")
@click.option("--timezone", help="schedule: IANA time zone, e.g. Europe/Berlin.")
@click.option("--description", help="node: free text.")
@wait_option
@timeout_option(30.0)
def config_set(*, kind: str, name: str, body_json: str | None, wait_applied: bool,
               strict: bool, timeout_s: float, **fields: Any) -> None:
    """Create or replace one object on the master.

    \b
    Examples:
      tasync config set destination ops-mail --url mailto:ops@example.com
      tasync config set group oncall --member ops-mail --member pager --mode sequence
      tasync config set route remedy --host a --host b
      tasync config set schedule office --json '{"timezone": "Europe/Berlin",
          "windows": [{"days": ["mon","tue","wed","thu","fri"], "start": "08:00", "end": "18:00"}]}'
    """
    body = kinds.load_body(kind, name, _body_from_options(kind, body_json, fields))
    settings = make_settings()
    result = _commit(settings, [{"op": "set", "kind": kind, "name": name, "body": body}],
                     wait_applied=wait_applied, strict=strict, timeout_s=timeout_s)
    _report(result, f"{kind} {name}", False)


@config.command("delete")
@click.argument("kind", type=KIND_CHOICE)
@click.argument("name")
@wait_option
@timeout_option(30.0)
@json_option
def config_delete(*, kind: str, name: str, wait_applied: bool, strict: bool,
                  timeout_s: float, as_json: bool) -> None:
    """Delete one object on the master (refused while others refer to it).

    \b
    Examples:
      tasync config delete route remedy
      tasync config delete destination old-pager --wait-applied
    """
    kinds.check_name(kind, name)
    result = _commit(make_settings(), [{"op": "delete", "kind": kind, "name": name}],
                     wait_applied=wait_applied, strict=strict, timeout_s=timeout_s)
    _report(result, f"{kind} {name} deleted", as_json)


@config.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@wait_option
@timeout_option(300.0)
@json_option
def config_import(*, file: Path, wait_applied: bool, strict: bool, timeout_s: float,
                  as_json: bool) -> None:
    """Load many objects from a JSON or YAML file, all or nothing.

    The file is either an export (``{kind: {name: body}}``) or a list of
    ``{"kind": ..., "name": ..., "body": ..., "op": "set"|"delete"}``. Every object is checked
    before anything is sent; the master commits the whole file in one transaction.

    \b
    Examples:
      tasync config import config.yaml
      tasync config import export-of-b.json --wait-applied --timeout 600
    """
    ops = objects_to_ops(load_import_file(file))
    settings = make_settings()
    with ProgressBar(not as_json, "sending") as bar:
        result = import_ops(settings, ops, timeout_s=timeout_s,
                            shown=lambda n: bar.update({"done": n, "total": len(ops)}))
    check_import(result, ops)
    if wait_applied and result.get("count"):
        with rpc_client(settings) as rpc:
            _wait_applied(rpc, result["last_seq"], timeout_s=timeout_s, strict=strict)
    _report(result, f"imported {len(ops)} objects from {file.name}", as_json)


def import_ops(settings: Settings, ops: list[dict[str, Any]], *, timeout_s: float,
               shown: Callable[[int], None], by: str | None = None) -> dict[str, Any]:
    """Send ``ops`` in parts, then have the master commit them all at once (``_Import``).

    ``shown`` is called with the number of operations the master holds after each part (the
    command's progress bar, the console's import page). ``by`` names whom the import is for
    (the console's user); the master writes it to its trail. Check the result with
    ``check_import``.
    """
    session = MasterSession(settings, timeout_s=timeout_s)
    return _no_master_hint(session, _Import(session, ops, shown, by).step)


class _Import:
    """One import's parts, sent to the master and committed there in one transaction.

    The master stages each part durably. After a lost connection ``step`` first asks what it
    holds: the import already committed (done), some parts staged (send the rest), or nothing
    (the master changed, or dropped the parts: send everything again). The commit is refused
    unless every part is there, so the import is applied whole or not at all.
    """

    def __init__(self, session: MasterSession, ops: list[dict[str, Any]],
                 shown: Callable[[int], None], by: str | None = None) -> None:
        self.session = session
        self.by = by
        self.ops = ops
        self.shown = shown
        self.import_id = uuid.uuid4().hex
        self.parts = [ops[i:i + IMPORT_PART] for i in range(0, len(ops), IMPORT_PART)] or [[]]

    def step(self, rpc: RpcClient, resumed: bool) -> dict[str, Any]:
        """Send what the master lacks, then commit; see the class docstring."""
        have: set[int] = set()
        if resumed:
            status = self.session.call(rpc, "request", {"request_id": self.import_id})
            known = _committed(self.session, rpc, self.import_id) \
                if status["state"] == "committed" else None
            if known is not None:
                return {**known, "ops": len(self.ops)}
            if status["state"] == "staged":
                have = set(status["staged"])
            else:
                click.echo("tasync: the master holds no part of this import (it changed or "
                           "restarted without them); sending it again from the start", err=True)
        self._send(rpc, [i for i in range(len(self.parts)) if i not in have], have)
        while True:
            try:
                args: dict[str, Any] = {"import_id": self.import_id,
                                        "parts": len(self.parts), "ops": len(self.ops)}
                if self.by is not None:
                    args["by"] = self.by
                return self.session.call(rpc, "import_commit", args)
            except RemoteError as exc:
                if exc.error_type != "ImportIncomplete":
                    raise
                missing = [int(str(i)) for i in exc.data.get("missing") or []]  # type: ignore[attr-defined]
                click.echo(f"tasync: {exc}; sending those parts again", err=True)
                self._send(rpc, missing, have - set(missing))

    def _send(self, rpc: RpcClient, todo: list[int], have: set[int]) -> None:
        """Send the parts ``todo``, ``IMPORT_WINDOW`` in flight; ``have`` grows as they land.

        A part is keyed by the import id and its index, so a copy sent again (no answer in
        time) replaces itself on the master; whether every part arrived is the commit's to say.
        """
        held = [sum(len(self.parts[i]) for i in have)]

        def staged(position: int, _data: dict[str, Any]) -> None:
            index = todo[position]
            if index not in have:
                have.add(index)
                held[0] += len(self.parts[index])
            self.shown(held[0])

        self.session.call_window(
            rpc, "import", [{"import_id": self.import_id, "part": i, "parts": len(self.parts),
                             "ops": self.parts[i]} for i in todo],
            window=IMPORT_WINDOW, on_answer=staged)


def check_import(result: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """Fail unless the master committed what the file holds (never report a part as whole)."""
    received = result.get("ops")
    if received != len(ops):
        raise ImportMismatch(f"the master received {received} of the file's {len(ops)} "
                             "operations; the import is not complete")
    if all(op["op"] == "set" for op in ops):
        with collector_paused(len(ops) >= BULK_OPS):  # 100,000 tuples: a bulk step
            expected = len({(op["kind"], op["name"]) for op in ops})
        if result.get("count") != expected:
            raise ImportMismatch(f"the master committed {result.get('count')} changes for the "
                                 f"file's {expected} objects")




def _local_or_remote(node: str | None, data_dir: Path | None, op: str,
                     args: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    if data_dir is not None:
        if not (data_dir / "node.db").exists():
            raise ConfigError(f"{data_dir} holds no tasync node (no node.db)")
        store = NodeStore(data_dir, durable=False)
        try:
            return {"objects": [{"kind": k, "name": n, "body": b}
                                for k, n, b in store.objects(args.get("kind"))
                                if args.get("name") in (None, n)]}
        finally:
            store.close()
    with rpc_client(make_settings()) as rpc:
        check_known(rpc, [node])
        return rpc.call_one(target_key(node), op, args, timeout_s=timeout_s)


node_option = click.option("--node", metavar="NAME", help="Ask this node (default: the master).")
data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                               help="Read a local node's store directly, without the broker.")


@config.command("show")
@click.argument("kind", type=KIND_CHOICE, required=False)
@click.argument("name", required=False)
@node_option
@data_dir_option
@timeout_option(10.0)
@json_option
def config_show(*, kind: str | None, name: str | None, node: str | None, data_dir: Path | None,
                timeout_s: float, as_json: bool) -> None:
    """Show what a node holds: everything, one kind, or one object.

    \b
    Examples:
      tasync config show                      everything the master holds
      tasync config show route remedy --node b
      tasync config show destination --data-dir /var/lib/tasync/b   without the broker
    """
    data = _local_or_remote(node, data_dir, "show",
                            {"kind": kind, "name": name}, timeout_s)
    objects = data["objects"]
    if name and not objects:
        raise InvalidObject(f"{kind} {name} does not exist")
    if as_json:
        print_json(objects)
        return
    for obj in objects:
        body = json.dumps(obj["body"], sort_keys=True, separators=(", ", ": "))
        click.echo(f"{obj['kind']} {obj['name']} {body}")


@config.command("export")
@node_option
@data_dir_option
@timeout_option(60.0)
def config_export(*, node: str | None, data_dir: Path | None, timeout_s: float) -> None:
    """Print a node's whole configuration as canonical JSON (nodes in sync print equal bytes).

    \b
    Examples:
      tasync config export > config.json      the master's
      tasync config export --node b | sha256sum
      tasync config export --data-dir /var/lib/tasync/b   a stopped node's
    """
    out = sys.stdout.buffer
    if data_dir is not None:
        _export_local(data_dir, out)
    else:
        _export_remote(node, timeout_s, out)
    out.flush()


def _export_local(data_dir: Path, out: Any) -> None:
    """Write a stopped or running node's export from its store, piece by piece."""
    if not (data_dir / "node.db").exists():
        raise ConfigError(f"{data_dir} holds no tasync node (no node.db)")
    store = NodeStore(data_dir, durable=False)
    try:
        for chunk in store.export_chunks():
            out.write(chunk)
    finally:
        store.close()


def _export_remote(node: str | None, idle_timeout_s: float, out: Any) -> None:
    """Write a node's export as its interim replies bring it (flat memory at any size)."""
    write_export(make_settings(), node, out, idle_timeout_s=idle_timeout_s)


def write_export(settings: Settings, node: str | None, out: Any, *,
                 idle_timeout_s: float) -> None:
    """Write ``node``'s export (the master's when None) to the binary file ``out``.

    The node sends it piece by piece as interim replies, so memory stays flat at any size;
    the console's comparison of two nodes reads the same export.

    Raises:
        UnknownNode, NoAnswer: the node is not known, or does not answer.
    """
    from tasync.progress import progress_rpc

    def write(data: dict[str, Any]) -> None:
        out.write(str(data.get("piece", "")).encode())

    with progress_rpc(settings) as rpc:
        check_known(rpc, [node])
        data = rpc.call_with_progress(target_key(node), "export", {},
                                      idle_timeout_s=idle_timeout_s, on_progress=write)
    out.write(str(data["export"]).encode())
