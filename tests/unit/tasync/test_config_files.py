"""Reading ``tasync config import`` files (tasync/config_files.py)."""

import json
from pathlib import Path
from typing import Any

import pytest

from tasync.broker.commits import parse_ops
from tasync.broker.errors import ConfigError, InvalidObject
from tasync.broker.messages import Change
from tasync.broker.store import NodeStore
from tasync.config_files import load_import_file, objects_to_ops
from tasync.producers.changes import check_references

EXPORT_SHAPED = {
    "node": {"a": {}},
    "schedule": {},
    "destination": {"d1": {"url": "file:///tmp/d1"}},
    "group": {"g": {"members": ["d1"], "mode": "sequence"}},
    "route": {"r": {"hosts": ["a"]}},
}
EXPECTED_OPS = [
    {"op": "set", "kind": "node", "name": "a", "body": {"description": ""}},
    {"op": "set", "kind": "destination", "name": "d1",
     "body": {"url": "file:///tmp/d1", "schedule": None, "subject": None}},
    {"op": "set", "kind": "group", "name": "g", "body": {"members": ["d1"], "mode": "sequence"}},
    {"op": "set", "kind": "route", "name": "r", "body": {"hosts": ["a"]}},
]

YAML_TEXT = """\
# a bulk import
node:
  a: {}
destination:
  d1:
    url: file:///tmp/d1
group:
  g:
    members: [d1]
    mode: sequence
route:
  r:
    hosts:
      - a
"""


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# -- load_import_file -------------------------------------------------------------------------


def test_json_file(tmp_path: Path) -> None:
    path = write(tmp_path, "conf.json", json.dumps(EXPORT_SHAPED, indent=2))
    assert load_import_file(path) == EXPORT_SHAPED


def test_json_file_with_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "conf.JSON", b"\xef\xbb\xbf" + json.dumps(EXPORT_SHAPED).encode())
    assert load_import_file(path) == EXPORT_SHAPED


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".txt"])
def test_yaml_file(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path, "conf" + suffix, YAML_TEXT)
    data = load_import_file(path)
    assert data == {k: v for k, v in EXPORT_SHAPED.items() if v}
    assert objects_to_ops(data) == EXPECTED_OPS


def test_yaml_reads_json_too(tmp_path: Path) -> None:
    path = write(tmp_path, "conf.yaml", json.dumps(EXPORT_SHAPED))
    assert load_import_file(path) == EXPORT_SHAPED


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.json", '{\n  "node": {\n    "a": {},\n  }\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 4: ") as info:
        load_import_file(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "node:\n  a: {}\ndestination:\n  d1: [unclosed\n\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line \d+") as info:
        load_import_file(path)
    line = int(str(info.value).rsplit(" ", 1)[1])
    assert line >= 4


def test_yaml_tab_indentation_error_line(tmp_path: Path) -> None:
    path = write(tmp_path, "tabs.yaml", "node:\n  a: {}\n\tb: {}\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 3$"):
        load_import_file(path)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = write(tmp_path, "latin.yaml", "node:\n  caf\xe9: {}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_import_file(path)


def test_empty_yaml_is_no_operations(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.yaml", "# nothing yet\n")
    assert objects_to_ops(load_import_file(path)) == []


def test_oversized_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tasync.config_files.MAX_FILE_BYTES", 1 << 20)
    path = write(tmp_path, "huge.json", b" " * ((1 << 20) + 1))
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_import_file(path)


# -- objects_to_ops ---------------------------------------------------------------------------


def test_export_shaped_mapping() -> None:
    assert objects_to_ops(EXPORT_SHAPED) == EXPECTED_OPS


def test_export_of_a_store_round_trips(tmp_path: Path) -> None:
    store = NodeStore(tmp_path, durable=False)
    try:
        ops = check_references(store, parse_ops(objects_to_ops(EXPORT_SHAPED)))
        store.commit([Change(epoch=1, seq=i, ts=0.0, origin="m", op=o.op, kind=o.kind,
                             name=o.name, body=o.body) for i, o in enumerate(ops, 1)])
        exported = json.loads(store.export_bytes())
    finally:
        store.close()
    assert sorted(map(str, objects_to_ops(exported))) == sorted(map(str, EXPECTED_OPS))


def test_list_of_operations() -> None:
    data = [
        {"kind": "destination", "name": "d1", "body": {"url": "file:///tmp/d1"}},
        {"op": "delete", "kind": "group", "name": "old", "body": {"ignored": True}},
        {"op": "set", "kind": "node", "name": "a"},
    ]
    assert objects_to_ops(data) == [
        EXPECTED_OPS[1],
        {"op": "delete", "kind": "group", "name": "old", "body": None},
        EXPECTED_OPS[0],
    ]


def test_none_is_no_operations() -> None:
    assert objects_to_ops(None) == []


@pytest.mark.parametrize("data", ["text", 42, 1.5, True])
def test_wrong_top_level_shape(data: Any) -> None:
    with pytest.raises(ConfigError, match="must hold a mapping"):
        objects_to_ops(data)


@pytest.mark.parametrize("objects", [["d1"], "d1", None])
def test_kind_must_map_names_to_objects(objects: Any) -> None:
    with pytest.raises(ConfigError, match="destination: expected a mapping of name to object"):
        objects_to_ops({"destination": objects})


def test_list_entry_must_be_an_object() -> None:
    with pytest.raises(ConfigError, match="entry 2: expected an object"):
        objects_to_ops([EXPECTED_OPS[0], ["node", "b"]])


def test_list_entry_op_must_be_known() -> None:
    with pytest.raises(ConfigError, match="entry 1: op must be 'set' or 'delete'"):
        objects_to_ops([{"op": "remove", "kind": "node", "name": "a"}])


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(InvalidObject, match="unknown kind 'printer'"):
        objects_to_ops({"printer": {"p": {}}})


def test_invalid_object_names_its_entry_in_a_mapping() -> None:
    data = {"destination": {"ok": {"url": "file:///x"}, "broken": {"url": "nocolon"}}}
    with pytest.raises(InvalidObject, match=r"^destination broken: url: ") as info:
        objects_to_ops(data)
    assert info.value.errors == {"url": ["a delivery URL needs a scheme, e.g. file:///path or "
                                         "https://"]}


def test_invalid_object_names_its_entry_in_a_list() -> None:
    data = [{"kind": "node", "name": "a"},
            {"kind": "schedule", "name": "night",
             "body": {"windows": [{"days": ["mon"], "start": "22:00", "end": "06:00"}]}}]
    with pytest.raises(InvalidObject, match=r"^schedule night: windows\.0\.end: start must"):
        objects_to_ops(data)


def test_invalid_name_is_named() -> None:
    with pytest.raises(InvalidObject, match=r"invalid node name 'a\.b'"):
        objects_to_ops({"node": {"a.b": {}}})


def test_entry_without_a_name_is_reported_by_position() -> None:
    data = [{"kind": "node", "name": "a"}, {"kind": "node", "name": "b"}, {"kind": "node"}]
    with pytest.raises(ConfigError) as info:
        objects_to_ops(data)
    assert "entry 3" in str(info.value)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path: Path) -> None:
    import resource

    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}]\n" for i in range(9))
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match=r"YAML aliases \(\*name\) are not accepted .* line 2"):
        load_import_file(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_an_anchor_without_alias_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "anchor.yaml"
    path.write_text("destination:\n  d1: &d {url: 'file:///tmp/d1'}\n")
    assert load_import_file(path) == {"destination": {"d1": {"url": "file:///tmp/d1"}}}


@pytest.mark.parametrize(("text", "key"), [
    ('{"destination": {"d": {"url": "file:///a", "url": "file:///b"}}}', "url"),
    ('{"destination": {"d": {"url": "file:///a"}, "e": {}, "d": {}}}', "d"),
    ('{"node": {"a": {}}, "node": {}}', "node"),
])
def test_json_import_files_refuse_the_first_key_given_twice(tmp_path: Path, text: str,
                                                            key: str) -> None:
    path = tmp_path / "dup.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"duplicate key '{key}'"):
        load_import_file(path)
