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
from pathlib import Path
from typing import Any

import click

from broker import kinds, topology
from broker.errors import ConfigError, NoAnswer, ValidationError
from broker.settings import Settings
from broker.store import NodeStore
from tasync.client import gather_status, rpc_client, target_key
from tasync.config_files import load_import_file, objects_to_ops
from tasync.known_nodes import check_known
from tasync.options import (
    broker_option,
    handle_errors,
    json_option,
    make_settings,
    print_json,
    timeout_option,
)

KIND_CHOICE = click.Choice(list(kinds.KINDS))
IMPORT_PART = 1000


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


def _body_from_options(kind: str, body_json: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if body_json:
        try:
            body = json.loads(body_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--json is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ConfigError("--json must be a JSON object")
    for key, value in fields.items():
        if value not in (None, ()):
            body[key] = list(value) if isinstance(value, tuple) else value
    return body


def _commit(settings: Settings, ops: list[dict[str, Any]], *, wait_applied: bool,
            timeout_s: float) -> dict[str, Any]:
    with rpc_client(settings) as rpc:
        try:
            result = rpc.call_one(topology.MASTER, "commit", {"ops": ops},
                                  timeout_s=max(timeout_s, settings.confirm_timeout_s))
        except NoAnswer as exc:
            raise NoAnswer(f"{exc} (is a node running with --role master?)") from None
        if wait_applied and result["count"]:
            _wait_applied(rpc, result["last_seq"], timeout_s=timeout_s)
    return result


def _wait_applied(rpc: Any, seq: int, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [r for r in gather_status(rpc, timeout_s=1.0) if r.get("alive")]
        behind = [r["node"] for r in rows if int(r.get("applied_seq", 0)) < seq]
        if not behind:
            return
        if time.monotonic() > deadline:
            raise ConfigError(f"committed, but not yet applied on: {', '.join(behind)}")
        time.sleep(0.05)


def _report(result: dict[str, Any], what: str, as_json: bool) -> None:
    if as_json:
        print_json(result)
    elif result["count"]:
        click.echo(f"{what}: committed seq {result['first_seq']}..{result['last_seq']} "
                   f"(epoch {result['epoch']})")
    else:
        click.echo(f"{what}: nothing to change")


wait_option = click.option("--wait-applied", is_flag=True,
                           help="Also wait until every live backup has applied the change.")


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
@broker_option
@handle_errors
def config_set(*, kind: str, name: str, body_json: str | None, wait_applied: bool,
               timeout_s: float, broker_url: str, **fields: Any) -> None:
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
    settings = make_settings(broker_url)
    result = _commit(settings, [{"op": "set", "kind": kind, "name": name, "body": body}],
                     wait_applied=wait_applied, timeout_s=timeout_s)
    _report(result, f"{kind} {name}", False)


@config.command("delete")
@click.argument("kind", type=KIND_CHOICE)
@click.argument("name")
@wait_option
@timeout_option(30.0)
@json_option
@broker_option
@handle_errors
def config_delete(*, kind: str, name: str, wait_applied: bool, timeout_s: float, as_json: bool,
                  broker_url: str) -> None:
    """Delete one object on the master (refused while others refer to it).

    \b
    Examples:
      tasync config delete route remedy
      tasync config delete destination old-pager --wait-applied
    """
    kinds.check_name(kind, name)
    result = _commit(make_settings(broker_url), [{"op": "delete", "kind": kind, "name": name}],
                     wait_applied=wait_applied, timeout_s=timeout_s)
    _report(result, f"{kind} {name} deleted", as_json)


@config.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@wait_option
@timeout_option(300.0)
@json_option
@broker_option
@handle_errors
def config_import(*, file: Path, wait_applied: bool, timeout_s: float, as_json: bool,
                  broker_url: str) -> None:
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
    settings = make_settings(broker_url)
    import_id = uuid.uuid4().hex
    parts = [ops[i:i + IMPORT_PART] for i in range(0, len(ops), IMPORT_PART)] or [[]]
    show = sys.stderr.isatty() and not as_json
    with rpc_client(settings) as rpc, _progress(len(ops), show) as advance:
        result: dict[str, Any] = {}
        for index, part in enumerate(parts):
            final = index == len(parts) - 1
            result = rpc.call_one(topology.MASTER, "import",
                                  {"import_id": import_id, "ops": part, "final": final},
                                  timeout_s=timeout_s)
            advance(len(part))
        if wait_applied and result.get("count"):
            _wait_applied(rpc, result["last_seq"], timeout_s=timeout_s)
    _report(result, f"imported {len(ops)} objects from {file.name}", as_json)


class _progress:
    """A rich progress bar on a terminal; nothing when piped or with ``--json``."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show = total, show
        self._bar: Any = None

    def __enter__(self) -> Any:
        if not self.show:
            return lambda _n: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        task = self._bar.add_task("sending", total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *_: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _local_or_remote(broker_url: str, node: str | None, data_dir: Path | None, op: str,
                     args: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    if data_dir is not None:
        if not (data_dir / "node.db").exists():
            raise ConfigError(f"{data_dir} holds no tasync node (no node.db)")
        store = NodeStore(data_dir, durable=False)
        try:
            if op == "export":
                return {"export": store.export_bytes().decode()}
            return {"objects": [{"kind": k, "name": n, "body": b}
                                for k, n, b in store.objects(args.get("kind"))
                                if args.get("name") in (None, n)]}
        finally:
            store.close()
    with rpc_client(make_settings(broker_url)) as rpc:
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
@broker_option
@handle_errors
def config_show(*, kind: str | None, name: str | None, node: str | None, data_dir: Path | None,
                timeout_s: float, as_json: bool, broker_url: str) -> None:
    """Show what a node holds: everything, one kind, or one object.

    \b
    Examples:
      tasync config show                      everything the master holds
      tasync config show route remedy --node b
      tasync config show destination --data-dir /var/lib/tasync/b   without the broker
    """
    data = _local_or_remote(broker_url, node, data_dir, "show",
                            {"kind": kind, "name": name}, timeout_s)
    objects = data["objects"]
    if name and not objects:
        raise ValidationError(f"{kind} {name} does not exist")
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
@broker_option
@handle_errors
def config_export(*, node: str | None, data_dir: Path | None, timeout_s: float,
                  broker_url: str) -> None:
    """Print a node's whole configuration as canonical JSON (nodes in sync print equal bytes).

    \b
    Examples:
      tasync config export > config.json      the master's
      tasync config export --node b | sha256sum
      tasync config export --data-dir /var/lib/tasync/b   a stopped node's
    """
    data = _local_or_remote(broker_url, node, data_dir, "export", {}, timeout_s)
    sys.stdout.write(data["export"])
