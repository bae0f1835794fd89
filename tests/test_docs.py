"""The documentation, executed: it must describe the code as it is.

Markers in the Markdown (fence info strings), chosen so GitHub still highlights the blocks:

* ```` ```console ```` - a shell session; every ``tasync``/``tasync-worker`` command in it
  (after ``$``) is parsed by the real click command: the command, its options and choice
  values must exist (``tests.cli_contract``); ``tasync config set`` bodies must validate.
* ```` ```console offline ```` - also run, without a broker, in a scratch directory; the output
  shown must be the output printed (a line ``...`` stands for any lines).
* ```` ```console network ```` - also run, in document order, against a real network (the
  ``network`` fixture); ``tasync-worker ... &`` starts a node and waits until it is ready.
* ```` ```bash network ```` - a script run whole in one shell, as pasted into a terminal (the
  README's quick start): its background jobs are its own, and it must stop them itself.
* ```` ```text file=NAME ```` - written to NAME in the scratch directory before later blocks.
* ```` ```yaml tasync-config ```` / ```` ```json tasync-config ```` - an import file; it must
  validate with ``tasync.config_files.objects_to_ops``, and a whole configuration must have no
  dangling reference.
* ```` ```sh ```` and ```` ```bash ```` - scripts; their commands are checked like console
  lines. In ```` ```text ```` blocks (config files of other programs, such as a Nagios
  ``command_line``) any word that is a console script starts a checked command.
* Inline code spans that start with ``tasync`` name commands and options that must exist.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from tasync.broker import kinds
from tests.cli_contract import (
    PENDING_OPTIONS,
    ROOT,
    check_argv,
    commands_in,
    normalise,
    resolve,
)
from tests.docs_blocks import (
    DOCS,
    OWN_DOCS,
    SPAN,
    Block,
    blocks,
    command_occurrences,
    prose,
    session,
)
from tests.network import Network, NodeProcess

# -- every command, option and value exists ---------------------------------------------------


COMMANDS = command_occurrences()


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_line_parses(where: str, argv: list[str]) -> None:
    verdict = check_argv(argv)
    if verdict.pending:
        pytest.xfail(f"{where}: {verdict.pending}")
    assert verdict.error is None, f"{where}: {' '.join(argv)}\n{verdict.error}"
    if verdict.path == "tasync config set" and verdict.params and not where.endswith("!"):
        check_config_set(verdict.params)


def check_config_set(params: dict[str, Any]) -> None:
    """The body a ``config set`` line builds must validate, as the CLI would check it."""
    from tasync.cli_config import _body_from_options

    not_fields = {"kind", "name", "body_json", "wait_applied", "strict", "timeout_s"}
    fields = {k: v for k, v in params.items() if k not in not_fields}
    body = _body_from_options(params["kind"], params["body_json"], fields)
    kinds.load_body(params["kind"], params["name"], body)


def inline_mentions() -> list[tuple[str, str]]:
    found = []
    for doc in OWN_DOCS:
        for number, line in prose(doc):
            for span in SPAN.findall(line):
                if span == "tasync" or span.startswith(("tasync ", "tasync-worker")):
                    found.append((f"{doc}:{number}", span))
    return found


MENTIONS = inline_mentions()


@pytest.mark.parametrize(("where", "span"), MENTIONS, ids=[f"{w} {s}" for w, s in MENTIONS])
def test_inline_mention_names_real_commands_and_options(where: str, span: str) -> None:
    words = normalise([w.strip("[](),|") for w in span.split()])
    words = [w for w in words if w and w != "..."]
    script = words[0].split(" ")[0]
    subcommands = [w for w in words[1:] if re.fullmatch(r"[a-z][a-z-]*", w)]
    path, command, _, _ = resolve([script, *subcommands])
    if command is None:
        parent, parent_command, _, _ = resolve([script, *subcommands[:-1]])
        if isinstance(parent_command, click.Group) and subcommands:
            pytest.fail(f"{where}: `{span}`: `{parent} {subcommands[-1]}` is not a command")
        path, command = parent, parent_command  # the last word is an argument
    pending = None
    assert command is not None
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    options |= {"-h", "--help"}
    for word in words[1:]:
        name = word.split("=", 1)[0]
        if not name.startswith("-"):
            continue
        if name not in options:
            waiting = PENDING_OPTIONS.get(path, {})
            if name in waiting:
                pending = f"{path} {name} is not in the CLI yet"
                continue
            pytest.fail(f"{where}: `{span}`: {path} has no option {name}")
    if pending:
        pytest.xfail(f"{where}: {pending}")


def test_pending_lists_are_not_stale() -> None:
    """An entry whose feature landed must go, so the list keeps meaning "not yet"."""
    landed = []
    for path, options in PENDING_OPTIONS.items():
        command = resolve(path.split()).command
        names = {o for p in (command.params if command else []) for o in p.opts}
        landed += [f"{path} {o}" for o in options if o in names]
    assert landed == [], f"remove from tests/cli_contract.py PENDING_*: {landed}"


def test_cli_reference_is_generated_from_the_code() -> None:
    spec = importlib.util.spec_from_file_location("gen_cli_reference",
                                                  DOCS / "gen_cli_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "cli.md").read_text() == module.render(), \
        "docs/cli.md is stale: run python docs/gen_cli_reference.py"


# -- configuration examples -------------------------------------------------------------------


def config_blocks() -> list[Block]:
    return [b for doc in OWN_DOCS for b in blocks(doc) if "tasync-config" in b.info]


@pytest.mark.parametrize("block", config_blocks(), ids=lambda b: b.where)
def test_config_example_validates(block: Block) -> None:
    from tasync.config_files import objects_to_ops

    data = json.loads(block.text) if block.info[0] == "json" else yaml.safe_load(block.text)
    ops = objects_to_ops(data)
    assert ops, "an example with no object"
    if isinstance(data, dict):  # a whole configuration: its references must hold too
        state: dict[str, dict[str, Any]] = {}
        for op in ops:
            state.setdefault(op["kind"], {})[op["name"]] = op["body"]
        assert kinds.reference_errors(state) == []


def test_there_are_config_examples_of_both_shapes() -> None:
    shapes = {b.info[0] for b in config_blocks()}
    assert shapes == {"json", "yaml"}


# -- what the documents list exists -----------------------------------------------------------


def table_column(doc: str, marker: str) -> list[str]:
    """The backticked names in the first column of the table between ``<!-- marker -->``."""
    text = (DOCS / doc).read_text()
    section = text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
    names: list[str] = []
    for line in section.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([^`]+)`", line.split("|")[1])
    return names


def source_text() -> str:
    return "\n".join(p.read_text() for d in ("broker", "consumers", "producers", "tasync")
                     for p in sorted((ROOT / d).rglob("*.py")))


def test_the_trail_events_documented_are_the_events_of_the_code() -> None:
    from tasync.broker.events import Event

    documented = table_column("operations.md", "trail-events")
    assert len(documented) > 20
    assert sorted(set(documented)) == sorted(event.value for event in Event)


def test_every_event_is_written_through_the_enum_and_written_somewhere() -> None:
    from tasync.broker.events import Event

    code = source_text()
    # a string would be unsearchable and unchecked
    assert re.findall(r'\.(?:event|defer|_line)\(\s*f?"', code) == []
    unused = [e.name for e in Event if not re.search(rf"Event\.{e.name}\b", code)]
    assert unused == []


def test_metrics_table_matches_what_a_node_exports(tmp_path: Path) -> None:
    from prometheus_client.registry import CollectorRegistry

    from tasync.broker.audit import Trail
    from tasync.broker.settings import Settings
    from tasync.broker.store import NodeStore
    from tasync.consumers.context import NodeContext
    from tasync.consumers.totals import Totals
    from tasync.metrics import NodeCollector

    store = NodeStore(tmp_path, durable=False)
    store.set_meta(role="master")
    ctx = NodeContext(settings=Settings(), node="a", data_dir=tmp_path, store=store,
                      trail=Trail(tmp_path, "a"))
    totals = Totals(ctx)
    totals.count("remedy", received=1)
    ctx.peers.saw({"node": "a", "role": "master", "epoch": 1, "seq": 0, "ready": True})

    class Consumer:
        name = "tasync-sync-a"
        connected = ctx.ready

    from types import SimpleNamespace

    from tasync.consumers.delivery.lists import ListsReport, ListState

    lists = ListsReport(checked_at=1.0, lists=(ListState(key="a.b", hosts=("a", "b")),),
                        dead_letters=0, quarantined=0)
    delivery = SimpleNamespace(lists=SimpleNamespace(report=lists), handled=SimpleNamespace(
        caught_up=ctx.ready, ids_learned=0))
    node = type("FakeNode", (), {"ctx": ctx, "changes_applied": 1, "lag_changes": 0,
                                 "totals": totals, "consumers": [Consumer()],
                                 "delivery": delivery})()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    exported = {s.name for m in registry.collect() for s in m.samples}
    totals.close()
    store.close()
    assert set(table_column("operations.md", "metrics")) == exported


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    read = set(re.findall(r'"(TASYNC_[A-Z_]*[A-Z])"', source_text()))
    read -= {"TASYNC_FAILPOINT"}  # a fault-injection hook of the tests, not a setting
    documented = set(re.findall(r"`(TASYNC_[A-Z_]+)`",
                                (DOCS / "configuration.md").read_text()))
    assert read - documented == set(), "document these in configuration.md"
    assert documented - read == set(), "configuration.md documents variables nothing reads"


def test_links_between_documents_resolve() -> None:
    broken = []
    for doc in [*OWN_DOCS, "cli.md"]:
        for number, line in prose(doc):
            for target in re.findall(r"\]\(([^)#\s]+\.md)?(#[^)\s]*)?\)", line):
                file, anchor = target
                path = (DOCS / (file or doc)).resolve()
                if not path.exists():
                    broken.append(f"{doc}:{number}: {file}")
                elif anchor and anchor[1:] not in anchors(path):
                    broken.append(f"{doc}:{number}: {file}{anchor}")
    assert broken == []


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    found = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


# -- running the examples -----------------------------------------------------------------------


def _example_env(tmp: Path, base: dict[str, str]) -> dict[str, str]:
    """The environment examples run in: this interpreter's scripts first, a scratch home."""
    return {**base, "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                             base.get("PATH", "")]),
            "HOME": str(tmp), "TASYNC_CACHE_DIR": str(tmp / "cache"), "COLUMNS": "200"}


def _matches(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` is exactly ``expected``, where a line ``...`` stands for any lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(_matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and expected[0] == actual[0] and _matches(expected[1:], actual[1:])


OFFLINE_DOCS = [d for d in OWN_DOCS if any(b.info[:2] == ["console", "offline"]
                                           for b in blocks(d))]


@pytest.mark.parametrize("doc", OFFLINE_DOCS)
def test_offline_examples_print_what_the_documents_show(doc: str, tmp_path: Path) -> None:
    env = _example_env(tmp_path, {k: v for k, v in os.environ.items()
                               if not k.startswith("TASYNC_")})
    env["TASYNC_BROKER_URL"] = "amqp://guest:guest@127.0.0.1:1/offline"  # nothing listens
    ran = 0
    for block in blocks(doc):
        for word in block.info:
            if word.startswith("file="):
                (tmp_path / word[5:]).write_text(block.text + "\n")
        if block.info[:2] != ["console", "offline"]:
            continue
        status = 0
        for step in session(block):
            out = subprocess.run(["bash", "-c", f"(exit {status}); {step.command}"],
                                 cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=60, check=False)
            status = out.returncode
            actual = [line.rstrip() for line in out.stdout.splitlines()]
            shown = [e.rstrip() for e in step.expected]
            assert not shown or _matches(shown, actual), \
                f"{block.doc}:{step.line}: $ {step.command}\nexpected:\n" + \
                "\n".join(step.expected) + "\ngot:\n" + out.stdout
            ran += 1
    assert ran


@pytest.mark.integration
def test_operations_walkthrough_runs_against_a_real_network(network: Network) -> None:
    root = network.root
    env = _example_env(root, network.env)
    outputs: dict[str, str] = {}
    for block in blocks("operations.md"):
        if block.info[:2] != ["console", "network"]:
            continue
        for step in session(block):
            command = step.command
            if command.startswith("export "):
                name, _, value = command[len("export "):].partition("=")
                if name != "TASYNC_BROKER_URL":  # the test's own vhost stays
                    env[name] = shlex.split(value)[0]
                continue
            if command.rstrip().endswith("&"):
                start_worker(network, command.rstrip()[:-1], env)
                continue
            out = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=root, env=env,
                                 capture_output=True, text=True, timeout=180, check=False)
            assert out.returncode == 0, \
                f"{block.doc}:{step.line}: $ {command}\n{out.stdout}\n{out.stderr}"
            outputs[command] = out.stdout
    exports = [v for k, v in outputs.items() if k.startswith("tasync config export")]
    assert len(exports) == 2 and exports[0] == exports[1], "the backups' exports differ"
    deadline = time.monotonic() + 60
    delivered: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(delivered) < 2:
        path = root / "alerts.jsonl"
        delivered = [json.loads(x) for x in path.read_text().splitlines()] \
            if path.exists() else []
        time.sleep(0.2)
    assert {(d["source"], d["node"]) for d in delivered} == {("remedy", "a"), ("nms", "c")}


def _fake_checkout(where: Path) -> Path:
    """A directory whose ``.venv`` is this interpreter's, as ``scripts/setup.sh`` leaves it."""
    where.mkdir(parents=True)
    venv = Path(sys.prefix)
    if (venv / "bin" / "activate").exists():
        (where / ".venv").symlink_to(venv, target_is_directory=True)
    else:  # not a virtualenv: an activate script that puts this interpreter's scripts first
        (where / ".venv" / "bin").mkdir(parents=True)
        (where / ".venv" / "bin" / "activate").write_text(
            f'PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"\n')
    return where


@pytest.mark.integration
def test_readme_quick_start_runs_as_pasted(broker_url: str, tmp_path: Path) -> None:
    """The README's quick start, pasted whole into one shell, on this test's vhost.

    Only the broker URL's line changes (each test has its own vhost); everything else runs as
    written, the workers it puts in the background included, and it must stop them itself.
    """
    (block,) = [b for b in blocks("../README.md") if b.info[:2] == ["bash", "network"]]
    url_line = re.compile(r"^export TASYNC_BROKER_URL=.*$", re.MULTILINE)
    assert len(url_line.findall(block.text)) == 1
    script = url_line.sub(f"export TASYNC_BROKER_URL={shlex.quote(broker_url)}", block.text)
    home = tmp_path / "home"
    env = _example_env(home, {k: v for k, v in os.environ.items()
                              if not k.startswith("TASYNC_")})
    output = tmp_path / "readme.out"  # under the session's tmp: the secret scan reads it
    with open(output, "wb") as out:
        shell = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script],
                                 cwd=_fake_checkout(tmp_path / "checkout"), env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = shell.wait(timeout=300)
        finally:
            leftovers = _kill_group(shell.pid)
    text = output.read_text()
    assert status == 0, f"README quick start failed (exit {status}):\n{text}"
    assert leftovers == [], f"the quick start left processes running: {leftovers}"
    assert "Traceback" not in text
    lines = (home / "tasync-quickstart" / "alerts.jsonl").read_text().splitlines()
    delivered = [json.loads(line) for line in lines]
    assert [(d["source"], d["node"], d["text"]) for d in delivered] == \
        [("remedy", "a", "disk full on db1")]
    assert lines[0] in text.splitlines(), "the quick start does not show the delivered line"


def _kill_group(pgid: int) -> list[int]:
    """SIGKILL whatever still runs in process group ``pgid``; returns those pids."""
    left = [int(p) for p in subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True,
                                           text=True, check=False).stdout.split()]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def start_worker(network: Network, command: str, env: dict[str, str]) -> NodeProcess:
    """Start ``tasync-worker ...`` from a document line and wait until it is ready."""
    (argv,) = list(commands_in(command))
    verdict = check_argv(argv)
    assert verdict.error is None and verdict.params, verdict.error
    name, data_dir = verdict.params["node"], network.root / verdict.params["data_dir"]
    args = list(argv[1:])
    args[args.index("--data-dir") + 1] = str(data_dir)
    node = NodeProcess(name=name, data_dir=data_dir,
                       args=[sys.executable, "-m", "tasync.worker_cli", *args], env=env)
    network.nodes[name] = node
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    node.start()
    node.wait_ready(timeout_s=90)
    return node


def test_key_rotation_recipe_works_twice_in_a_row(tmp_path: Path) -> None:
    """The documented rotation, run as written twice in a row (two rotations in one day).

    Between the runs the third round's file becomes the current key, as after a finished
    rotation. Each round's file must load as a node loads it at start, with the new key added,
    then signing, then alone.
    """
    from tasync.broker.signing import KeyRing

    (block,) = [b for b in blocks("operations.md")
                if b.info == ["console"] and "tasync key generate > new.key" in b.text]
    env = _example_env(tmp_path, dict(os.environ))
    subprocess.run("(umask 077; tasync key generate > cluster.key)", shell=True, check=True,
                   cwd=tmp_path, env=env)
    used: set[str] = set()
    for _ in range(2):
        old = KeyRing.load(tmp_path / "cluster.key").key_ids
        script = "set -e\n" + "\n".join(step.command for step in session(block))
        out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env,
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        new = KeyRing.load(tmp_path / "new.key").key_ids
        assert [KeyRing.load(tmp_path / f"round{n}.key").key_ids for n in (1, 2, 3)] == \
            [old + new, new + old, new]
        assert not used & set(new), "a key id came back"
        used |= set(old + new)
        (tmp_path / "cluster.key").write_bytes((tmp_path / "round3.key").read_bytes())
