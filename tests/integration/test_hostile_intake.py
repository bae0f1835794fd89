"""Hostile requests at the HTTP intake, and hostile files at ``config import``.

The intake runs as its own process (``tasync intake``) in front of a real master; hypothesis
draws requests no intake may accept: bodies that are not JSON, JSON of the wrong shape, fields
of the wrong type, unknown fields, unknown names, limits exceeded, a list whose last alert is
bad, a wrong or missing token, the wrong method or path, bodies over ``--max-body`` and more
alerts than ``--max-alerts`` (413: split the request). Each gets a 4xx answer with a one-line
reason, the intake keeps serving, and not one alert of them is delivered.

``tasync config import`` gets broken JSON and YAML, wrong types, duplicate keys, files that
are valid up to their last object, deeply nested and oversized files: each is one line on
stderr and exit status 1, and the master's configuration is unchanged, so nothing is ever half
applied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import strategies as st

from tasync.broker.alerts import MAX_TEXT_CHARS
from tasync.broker.errors import ConfigError
from tasync.cli import cli
from tasync.config_files import MAX_FILE_BYTES, objects_to_ops
from tests.harness import secret_registry
from tests.harness.hostile import JSON_VALUES, NOT_A_LIST, NOT_A_STRING, draw_many
from tests.harness.intake import IntakeProcess
from tests.network import Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

TOKEN = "intake-token-" + os.urandom(12).hex()
MAX_BODY = 64 << 10
MAX_ALERTS = 100
GOOD = {"source": "nms", "destination": "ops", "message": "fine"}
KNOWN = {"text", "group", "subject", "id", "priority", "route", "hosts", "labels", "annotations"}
NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)


@st.composite
def hostile_request(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes, set[int]]:
    """``(method, path, headers, body, acceptable statuses)`` of a request to refuse."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    kind = draw(st.sampled_from(["garbage", "shape", "field", "unknown-field", "names", "limits",
                                 "mixed", "token", "method", "oversized", "too-many",
                                 "alertmanager"]))
    if kind == "token":
        bad = draw(st.one_of(st.just({}), st.builds(lambda t: {"Authorization": f"Bearer {t}"},
                                                    st.text("abcdef0123456789", max_size=40)),
                             st.just({"Authorization": TOKEN})))
        return "POST", "/alerts", bad, json.dumps(GOOD).encode(), {401}
    if kind == "method":
        path = draw(st.sampled_from(["/alerts", "/alertmanager", "/nope", "/alerts/x"]))
        method = "GET" if path in ("/alerts", "/alertmanager") else "POST"
        return method, path, auth, b"", {404, 405}
    if kind == "oversized":
        return "POST", "/alerts", auth, b"[" * (MAX_BODY + draw(st.integers(1, 4096))), {413}
    if kind == "too-many":
        return "POST", "/alerts", auth, json.dumps([GOOD] * (MAX_ALERTS + 1)).encode(), {413}
    if kind == "garbage":
        body = draw(st.one_of(
            st.binary(max_size=200).filter(_not_json),
            st.builds(lambda n: b"[" * n + b"]" * n, st.integers(5_000, 30_000)),
            st.builds(lambda n: b"9" * n, st.integers(4_400, 20_000))))
        return "POST", "/alerts", auth, body, {400}
    if kind == "shape":
        body = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict | list) or v in ({}, [])
                                       or (isinstance(v, list) and not all(isinstance(i, dict)
                                                                           for i in v))))
        return "POST", "/alerts", auth, json.dumps(body).encode(), {400}
    if kind == "alertmanager":
        body = draw(JSON_VALUES.filter(lambda v: not (isinstance(v, dict) and v.get("alerts"))))
        query = draw(st.sampled_from(["", "?destination=ops", "?destination=ops&group=g"]))
        return "POST", "/alertmanager" + query, auth, json.dumps(body).encode(), {400}
    return "POST", "/alerts", auth, json.dumps(draw(_bad_alerts(kind))).encode(), {400}


def _not_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return True
    return False


@st.composite
def _bad_alerts(draw: st.DrawFn, kind: str) -> Any:
    """A generic payload that must be refused, by ``kind``."""
    alert: dict[str, Any] = dict(GOOD, id=f"bad-{draw(st.integers(0, 10**9))}")
    if kind == "field":
        field = draw(st.sampled_from(["source", "destination", "message", "subject", "id",
                                      "route", "priority", "hosts"]))
        alert[field] = draw({"priority": st.one_of(st.integers(10, 2**70),
                                                   st.integers(-(2**70), -1), st.booleans(),
                                                   st.floats(), st.text(max_size=3)),
                             "hosts": NOT_A_LIST.filter(lambda v: v is not None)
                             }.get(field, NOT_A_STRING.filter(lambda v: v is not None)))
    elif kind == "unknown-field":
        alert[draw(NAMES.filter(lambda k: k not in alert and k not in KNOWN))] = draw(JSON_VALUES)
    elif kind == "names":
        _unknown_names(draw, alert)
    elif kind == "limits":
        alert.update(draw(st.sampled_from([
            {"message": "x" * (MAX_TEXT_CHARS + 1)}, {"subject": "s" * 513}, {"id": "has space"},
            {"source": "-bad source"}, {"message": "  \n "}])))
    elif kind == "mixed":
        return [dict(GOOD, id=f"ok-{i}") for i in range(draw(st.integers(1, 3)))] + [
            dict(GOOD, destination="ghost")]
    return alert


def _unknown_names(draw: st.DrawFn, alert: dict[str, Any]) -> None:
    """Make ``alert`` name something that does not exist, or a list no node could be."""
    choice = draw(st.sampled_from(["destination", "group", "route", "hosts", "both"]))
    ghost = "ghost-" + draw(NAMES)
    if choice == "hosts":
        alert["hosts"] = draw(st.sampled_from([[ghost], ["a", "a"], ["bad name"], []]))
        if not alert["hosts"]:
            alert["route"] = ghost
    elif choice == "both":
        alert["group"] = ghost
    elif choice == "group":
        del alert["destination"]
        alert["group"] = ghost
    else:
        alert[choice] = ghost


@pytest.fixture
def intake(network: Network, tmp_path: Path) -> Iterator[IntakeProcess]:
    """A master ``a`` delivering to ``ops.jsonl`` and an intake in front of it."""
    secret_registry.register("the intake's bearer token", TOKEN)
    token_file = tmp_path / "intake.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    network.start("a", role="master").wait_ready()
    network.cli("config", "set", "destination", "ops", "--url",
                f"file://{tmp_path / 'ops.jsonl'}")
    process = IntakeProcess(["--default-host", "a", "--token-file", str(token_file),
                             "--max-body", str(MAX_BODY), "--max-alerts", str(MAX_ALERTS)],
                            network.env, tmp_path / "intake.stderr").start()
    try:
        yield process
        assert process.alive, "the intake died"
    finally:
        process.stop()


def _delivered(tmp_path: Path) -> list[str]:
    path = tmp_path / "ops.jsonl"
    return [json.loads(x)["id"] for x in path.read_text().splitlines()] if path.exists() else []


def test_hostile_requests_get_a_clear_4xx_and_queue_nothing(intake: IntakeProcess,
                                                           tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert intake.request("POST", "/alerts", dict(GOOD, id="good-1"), headers=auth)[0] == 202
    wrong = []
    for method, path, headers, body, expected in draw_many(hostile_request(), 400):
        status, _, reply = intake.request(method, path, body if method == "POST" else None,
                                          headers=headers)
        error = reply.get("error")
        if status not in expected or not isinstance(error, str) or "\n" in error \
                or "Traceback" in error or TOKEN in error:
            wrong.append(f"{method} {path} {body[:100]!r}: {status} {reply}")
    assert not wrong, f"{len(wrong)} answers are wrong:\n" + "\n".join(wrong[:15])
    assert intake.request("POST", "/alerts", dict(GOOD, id="good-2"), headers=auth)[0] == 202
    wait_for(lambda: "good-2" in _delivered(tmp_path), what="the last good alert delivered")
    assert _delivered(tmp_path) == ["good-1", "good-2"]
    assert "Traceback" not in intake.log()


# -- config import ---------------------------------------------------------------------------------

VALID = {"destination": {f"d{i}": {"url": f"file:///tmp/d{i}.jsonl"} for i in range(30)}}


@st.composite
def hostile_file(draw: st.DrawFn) -> tuple[str, bytes]:
    """``(suffix, content)`` of an import file that must be refused as a whole."""
    kind = draw(st.sampled_from(["garbage", "truncated", "top", "last-object", "yaml"]))
    if kind == "garbage":
        return draw(st.sampled_from([".json", ".yaml"])), draw(st.binary(min_size=1, max_size=300)
                                                                .filter(_not_config))
    if kind == "truncated":
        text = json.dumps(VALID).encode()
        return ".json", text[:draw(st.integers(1, len(text) - 1))]
    if kind == "top":
        value = draw(st.one_of(st.integers(), st.text(min_size=1), st.floats(allow_nan=False),
                               st.lists(st.integers(), min_size=1), st.booleans()))
        return ".json", json.dumps(value).encode()
    data = json.loads(json.dumps(VALID))
    last = data["destination"][f"d{draw(st.integers(0, 29))}"]
    breakage = draw(st.sampled_from(["type", "unknown", "kind", "name", "op"]))
    if breakage == "type":
        last["url"] = draw(NOT_A_STRING)
    elif breakage == "unknown":
        last[draw(NAMES.filter(lambda k: k not in ("url", "schedule", "subject")))] = 1
    elif breakage == "kind":
        data[draw(NAMES.filter(lambda k: k not in ("destination", "group", "route",
                                                    "schedule", "node")))] = {"x": {}}
    elif breakage == "name":
        data["destination"][draw(st.sampled_from(["", "has space", "x" * 300, "a/b"]))] = {
            "url": "file:///tmp/x"}
    else:
        return ".json", json.dumps([{"op": "set", "kind": "destination", "name": "x",
                                     "body": {"url": "file:///x"}},
                                    {"op": draw(NAMES.filter(lambda o: o not in ("set",
                                                                                 "delete"))),
                                     "kind": "destination", "name": "y"}]).encode()
    if kind == "yaml":
        return ".yaml", yaml.safe_dump(data).encode()
    return ".json", json.dumps(data).encode()


def _not_config(data: bytes) -> bool:
    """Bytes that are not the YAML (or JSON) of a configuration, not even an empty one."""
    try:
        objects_to_ops(yaml.safe_load(data))
    except (yaml.YAMLError, ValueError, RecursionError, ConfigError):
        return True
    return False


def test_hostile_import_files_are_refused_whole(network: Network, tmp_path: Path,
                                               broker_url: str) -> None:
    network.start("a", role="master").wait_ready()
    network.cli("config", "set", "destination", "keep", "--url", "file:///tmp/keep.jsonl")
    before = network.export("a")
    runner = CliRunner()
    wrong = []
    for index, (suffix, content) in enumerate(draw_many(hostile_file(), 150)):
        path = tmp_path / f"import-{index}{suffix}"
        path.write_bytes(content)
        result = runner.invoke(cli, ["config", "import", str(path), "--broker", broker_url])
        lines = result.stderr.strip().splitlines()
        if result.exit_code != 1 or len(lines) != 1 or not lines[0].startswith("tasync: "):
            wrong.append(f"{content[:80]!r}: exit {result.exit_code}: {result.stderr[-300:]!r}")
    assert not wrong, f"{len(wrong)} imports misbehaved:\n" + "\n".join(wrong[:15])
    assert network.export("a") == before


def test_nasty_import_files_fail_in_one_line(network: Network, tmp_path: Path) -> None:
    network.start("a", role="master").wait_ready()
    before = network.export("a")
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    cases = {
        "deep.json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        "deep.yaml": ("[" * 20_000 + "]" * 20_000, "nested too deeply"),
        "dup.json": ('{"destination": {"x": {"url": "file:///a"}, "x": {"url": "file:///b"}}}',
                     "duplicate key 'x'"),
        "dup.yaml": ("destination:\n  x: {url: 'file:///a'}\n  x: {url: 'file:///b'}\n",
                     "duplicate key 'x'"),
        "nan.json": ('{"destination": {"x": {"url": NaN}}}', "NaN"),
        "tag.yaml": ("!!python/object/apply:os.system ['true']\n",
                     "could not determine a constructor for the tag"),
        "laughs.yaml": (laughs, "YAML aliases (*name) are not accepted"),
        "latin1.json": (b'{"destination": {"\xe9": {}}}', "not UTF-8"),
        "huge.json": (None, f"larger than {MAX_FILE_BYTES >> 20} MiB"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        if content is None:
            path.write_bytes(b"{")
            os.truncate(path, MAX_FILE_BYTES + 1)  # sparse: no disk used
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        out = network.cli("config", "import", str(path), check=False)
        assert out.returncode == 1, (name, out.stderr)
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("tasync: "), out.stderr
        assert reason in out.stderr, (name, out.stderr)
    assert network.export("a") == before


def test_a_forwarded_for_header_does_not_pass_the_allow_list(network: Network,
                                                             tmp_path: Path) -> None:
    """The allow-list judges the TCP peer: a local client that claims another address in
    ``X-Forwarded-For`` is still the loopback client it is."""
    hosts_file = tmp_path / "telalert.hosts"
    hosts_file.write_text("10.9.9.9\n")
    network.start("a", role="master").wait_ready()
    process = IntakeProcess(["--default-host", "a", "--hosts-file", str(hosts_file)],
                            network.env, tmp_path / "intake.stderr").start()
    try:
        alert = {"source": "nms", "destination": "ops", "message": "spoofed"}
        for headers in ({}, {"X-Forwarded-For": "10.9.9.9"},
                        {"X-Forwarded-For": "10.9.9.9", "X-Real-IP": "10.9.9.9"}):
            status, _, answer = process.request("POST", "/alerts", alert, headers=headers)
            assert status == 403, (headers, answer)
            assert "client 127.0.0.1 not allowed" in answer["error"], answer
    finally:
        process.stop()
