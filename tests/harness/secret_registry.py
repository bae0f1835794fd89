"""Secrets that tests create, and a scanner that proves none of them reached a log or an output.

Tests that make a password or a key register it here (``register``); ``tests/test_secret_scan.py``
runs its own scenario and, at the end of the session, scans every log-like file under pytest's
base temporary directory for every registered secret. Files that are meant to hold secrets
(credentials files, key files) are not log-like and are not scanned.
"""

from __future__ import annotations

import fnmatch
import json
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

#: Files a tasync process or test writes that people read: logs, trails, captured output.
LOG_PATTERNS = ("tasync.log*", "telalert.trail*", "*.stderr", "*.stdout", "*.out",
                "status.json", "*.jsonl")
#: Shorter strings would match by accident.
MIN_SECRET_CHARS = 12

_lock = threading.Lock()
_secrets: dict[str, str] = {}


def register(what: str, *values: str | None) -> None:
    """Remember secrets (a password, a key's hex) under a label shown in failures."""
    with _lock:
        for value in values:
            if value and len(value) >= MIN_SECRET_CHARS:
                _secrets[value] = what


def registered() -> dict[str, str]:
    """Every registered secret and its label."""
    with _lock:
        return dict(_secrets)


def save(path: Path) -> None:
    """Write every registered secret to ``path`` (not log-like: never scanned as an output).

    pytest-xdist runs tests in several processes; each leaves its secrets for the controller,
    which scans all the processes' files for all of them.
    """
    path.write_text(json.dumps(registered()))
    path.chmod(0o600)


def load(path: Path) -> dict[str, str]:
    """The secrets a process ``save``-d (value to label)."""
    loaded: dict[str, str] = json.loads(path.read_text())
    return loaded


def variants(secret: str) -> set[str]:
    """The spellings a leak could take: as is, URL-quoted, upper- and lower-case."""
    return {secret, quote(secret, safe=""), secret.lower(), secret.upper()}


def log_files(root: Path) -> list[Path]:
    """Every log-like file below ``root``."""
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in LOG_PATTERNS))


def find_leaks(texts: Iterable[tuple[str, str]], secrets: dict[str, str]) -> list[str]:
    """``where: label`` for each (where, text) pair that contains a secret in any spelling."""
    leaks = []
    for where, text in texts:
        for secret, label in secrets.items():
            if any(v in text for v in variants(secret)):
                leaks.append(f"{where}: contains {label}")
    return leaks


def scan_files(root: Path, secrets: dict[str, str]) -> list[str]:
    """Leaks in the log-like files below ``root``."""
    texts = ((str(path), path.read_text(errors="replace")) for path in log_files(root))
    return find_leaks(texts, secrets)


class SecretLeak(AssertionError):
    """A registered secret was found in a log or an output."""


def check_tree(root: Path, secrets: dict[str, str] | None = None) -> int:
    """Scan every log-like file below ``root`` for ``secrets`` (default: all registered).

    Returns how many files were scanned.

    Raises:
        SecretLeak: naming each file and the secret found in it (never the secret itself).
    """
    chosen = registered() if secrets is None else secrets
    leaks = scan_files(root, chosen)
    if leaks:
        raise SecretLeak("secrets leaked into logs or outputs:\n" + "\n".join(leaks))
    return len(log_files(root))
