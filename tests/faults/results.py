"""Where fault and soak runs leave their numbers: JSON files under ``tests/faults/runs``.

Each fault run appends one row to ``faults.json`` (a JSON list, newest last; only the newest
``KEEP_PER_TEST`` rows of each test are kept, so the default run does not grow it forever); the
soak writes ``soak.json`` whole. ``python -m tests.faults.report`` turns both into
docs/reliability.md's tables and plot. ``$TASYNC_FAULTS_RESULTS_DIR`` sends them elsewhere (for
example a CI artifact dir).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ENV_DIR = "TASYNC_FAULTS_RESULTS_DIR"
_lock = threading.Lock()
#: Rows kept per test in ``faults.json``: enough history to see a flaky run, bounded size.
KEEP_PER_TEST = 10


def results_dir() -> Path:
    """The directory the result files live in (created on demand)."""
    path = Path(os.environ.get(ENV_DIR) or Path(__file__).resolve().parent / "runs")
    path.mkdir(parents=True, exist_ok=True)
    return path


def faults_file() -> Path:
    return results_dir() / "faults.json"


def soak_file() -> Path:
    return results_dir() / "soak.json"


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_rows(path: Path | None = None) -> list[dict[str, Any]]:
    """Every fault row recorded so far, oldest first."""
    try:
        rows = json.loads((path or faults_file()).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return rows if isinstance(rows, list) else []


def append_row(row: dict[str, Any]) -> None:
    """Add one fault run's row to ``faults.json``."""
    with _lock:
        path = faults_file()
        rows = [*load_rows(path), row]
        same = [r for r in rows if r.get("test") == row.get("test")]
        drop = {id(r) for r in same[:-KEEP_PER_TEST]}
        _write(path, [r for r in rows if id(r) not in drop])


def write_soak(data: dict[str, Any]) -> None:
    """Replace ``soak.json`` with one soak run's samples and summary."""
    with _lock:
        _write(soak_file(), data)


def load_soak(path: Path | None = None) -> dict[str, Any] | None:
    try:
        data = json.loads((path or soak_file()).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
