"""Reading configuration files for ``tasync config import``: JSON or YAML, checked up front.

Every object is validated against its kind's schema before anything is sent, so a typo on
line 9,000 is reported before the first object reaches the master; the error names the object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tasync.broker import kinds
from tasync.broker.collector import collector_paused
from tasync.broker.errors import ConfigError

MAX_FILE_BYTES = 512 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping and aliases are errors.

    Plain YAML (and JSON) keep the last of two equal keys, so a copied block whose name was
    not changed would silently replace the object above it. Aliases (``*name``) are refused
    where the parser meets them, before anything is built: nested aliases ("billion laughs")
    make a few hundred bytes stand for gigabytes, and a configuration file has no need of them.
    """

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not accepted in configuration files",
                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The object the pairs make, unless a key is given twice (then the first such key).

    Called for every object of the file: the dict is built in C and only a file with a
    duplicate is searched key by key.
    """
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_import_file(path: Path) -> Any:
    """Parse ``path`` as JSON (``.json``) or YAML (anything else; YAML also reads JSON).

    Raises:
        ConfigError: one line naming the file and, where known, the line: too large, not
            UTF-8, invalid syntax, a key given twice, ``NaN``, or nested too deeply.
    """
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
    return load_import_bytes(path.read_bytes(), str(path))


def load_import_bytes(data: bytes, name: str) -> Any:
    """Parse a file's bytes as ``load_import_file`` does; ``name`` is the file's name.

    The console's import reads an uploaded file with this: the same checks, the same
    messages, JSON when the name ends in ``.json`` and YAML otherwise.

    Raises:
        ConfigError: as ``load_import_file``, naming ``name``.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text ({exc.reason})") from None
    try:
        with collector_paused():  # the whole file's objects live on: nothing to collect
            if name.lower().endswith(".json"):
                return json.loads(text, object_pairs_hook=_unique_pairs,
                                  parse_constant=_no_constant)
            return yaml.load(text, Loader=_UniqueKeyLoader)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except ValueError as exc:  # from the hooks above
        raise ConfigError(f"{name}: invalid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        if isinstance(exc, yaml.constructor.ConstructorError | yaml.composer.ComposerError) \
                and exc.problem:
            # a duplicate key or a tag such as !!python/object: say which, it is not syntax
            raise ConfigError(f"{name}: {exc.problem}{where}") from None
        raise ConfigError(f"{name}: invalid YAML{where}") from None
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to be a configuration file") from None


def _raw_ops(data: Any) -> list[Any]:
    """The file's entries as a list, whichever of the two shapes it has."""
    if isinstance(data, dict):
        raw: list[Any] = []
        for kind, objects in data.items():
            if not isinstance(objects, dict):
                raise ConfigError(f"{kind}: expected a mapping of name to object")
            raw += [{"op": "set", "kind": kind, "name": n, "body": b} for n, b in objects.items()]
        return raw
    if isinstance(data, list):
        return data
    if data is None:
        return []
    raise ConfigError("the file must hold a mapping {kind: {name: body}} or a list of objects")


def _one_op(index: int, item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ConfigError(f"entry {index}: expected an object with kind, name and body")
    op = item.get("op", "set")
    kind, name = str(item.get("kind")), item.get("name")
    if op not in ("set", "delete"):
        raise ConfigError(f"entry {index}: op must be 'set' or 'delete'")
    try:
        kinds.check_kind(kind)
        kinds.check_name(kind, name)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise type(exc)(f"entry {index}: {exc}") from None  # no name to find it by
    body = kinds.load_body(kind, str(name), item.get("body") or {}) if op == "set" else None
    return {"op": op, "kind": kind, "name": name, "body": body}


def objects_to_ops(data: Any) -> list[dict[str, Any]]:
    """Normalise an export-shaped mapping or a list of operations into validated operations.

    The operations live until the import ends, so the cycle collector is kept out of building
    them (``tasync.broker.collector.collector_paused``).
    """
    with collector_paused():
        return [_one_op(index, item) for index, item in enumerate(_raw_ops(data), 1)]
