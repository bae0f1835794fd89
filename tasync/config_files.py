"""Reading configuration files for ``tasync config import``: JSON or YAML, checked up front.

Every object is validated against its kind's schema before anything is sent, so a typo on
line 9,000 is reported before the first object reaches the master; the error names the object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from broker import kinds
from broker.errors import ConfigError

MAX_FILE_BYTES = 512 << 20


def load_import_file(path: Path) -> Any:
    """Parse ``path`` as JSON (``.json``) or YAML (anything else; YAML also reads JSON)."""
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None


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
    """Normalise an export-shaped mapping or a list of operations into validated operations."""
    return [_one_op(index, item) for index, item in enumerate(_raw_ops(data), 1)]
