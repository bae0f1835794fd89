"""A master and two backups as separate processes keep byte-identical configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.network import Network

pytestmark = pytest.mark.integration


def write_import(path: Path, count: int, *, prefix: str = "d") -> Path:
    """An import file with ``count`` destinations and a group over the first few."""
    data = {
        "destination": {f"{prefix}{i:05d}": {"url": f"file:///tmp/{prefix}{i}.jsonl"}
                        for i in range(count)},
        "group": {f"{prefix}-group": {"members": [f"{prefix}{i:05d}" for i in range(3)],
                                       "mode": "sequence"}},
    }
    path.write_text(json.dumps(data))
    return path


def start_trio(network: Network) -> None:
    """Master ``a`` first; then backups ``b`` and ``c``, booting side by side."""
    network.start("a", role="master").wait_ready()
    network.start_all("b", "c")


def assert_identical(network: Network, names: tuple[str, ...] = ("a", "b", "c")) -> str:
    exports = {name: network.export(name) for name in names}
    first = exports[names[0]]
    for name in names[1:]:
        assert exports[name] == first, f"{name}'s export differs from {names[0]}'s"
    return first


def test_every_kind_replicates_and_exports_match(network: Network, tmp_path: Path) -> None:
    start_trio(network)
    cli = network.cli
    cli("config", "set", "schedule", "office", "--json", json.dumps(
        {"timezone": "Europe/Berlin",
         "windows": [{"days": ["mon", "tue"], "start": "08:00", "end": "18:00"}]}))
    cli("config", "set", "destination", "mail", "--url", "mailto:ops@example.com",
        "--schedule", "office")
    cli("config", "set", "destination", "hook", "--url", "https://example.com/hook")
    cli("config", "set", "group", "oncall", "--member", "mail", "--member", "hook")
    cli("config", "set", "route", "remedy", "--host", "a", "--host", "b")
    # change and delete
    cli("config", "set", "group", "oncall", "--member", "hook", "--mode", "sequence")
    cli("config", "delete", "destination", "mail")
    cli("config", "set", "route", "nms", "--host", "b", "--host", "a", "--wait-applied")
    out = cli("config", "import", str(write_import(tmp_path / "bulk.json", 10_000)),
              "--wait-applied", "--json")
    result = json.loads(out.stdout)
    assert result["count"] == 10_001
    export = json.loads(assert_identical(network))
    assert "mail" not in export["destination"]
    assert export["group"]["oncall"] == {"members": ["hook"], "mode": "sequence"}
    assert export["route"]["nms"] == {"hosts": ["b", "a"]}
    assert len(export["destination"]) == 10_001
    status = network.status()
    assert {row["node"] for row in status} == {"a", "b", "c"}
    assert len({row["checksum"] for row in status}) == 1
    assert all(row["ready"] and row["in_sync"] and row["lag"] == 0 for row in status)


def test_invalid_objects_change_nothing(network: Network) -> None:
    start_trio(network)
    network.cli("config", "set", "destination", "d1", "--url", "file:///tmp/x",
                "--wait-applied")
    before = network.status()
    bad = [
        ("config", "set", "gadget", "x", "--json", "{}"),
        ("config", "set", "destination", "d2", "--json", "{}"),
        ("config", "set", "group", "g", "--member", "d1", "--member", "ghost"),
        ("config", "set", "destination", "d3", "--json", "{not json"),
        ("config", "delete", "destination", "ghost"),
    ]
    for args in bad:
        out = network.cli(*args, check=False)
        assert out.returncode in (1, 2), args
        assert out.stderr.strip(), args
        assert "Traceback" not in out.stderr
        if out.returncode == 1:
            assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    after = network.status()
    assert [(r["node"], r["applied_seq"], r["checksum"]) for r in after] == \
        [(r["node"], r["applied_seq"], r["checksum"]) for r in before]
