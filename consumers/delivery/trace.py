"""One alert's lines in a node's trail, the current file and the rotated ones.

``tasync trace ID`` asks every live node for this (a ``trace`` control request) and merges the
answers with what the broker holds. The trail is searched rather than indexed: the delivery
path writes one line per delivery and nothing else, and a trace is rare. Lines are matched on
the raw bytes first (cheap), then parsed and kept only when their ``id`` field is exactly the
id, so ``a1`` never matches ``a10``. The bytes searched for are the id's longest run of
characters the trail writes as they are (an id with a quote in it is written quoted).
"""

from __future__ import annotations

import re
from pathlib import Path

from tasync.broker.audit import ROTATE_KEEP, TRAIL_NAME, parse_trail_line

#: Most lines one node returns for one id (a hot id repeated all day must not flood the answer).
MAX_LINES = 500
#: Characters a trail value keeps verbatim (``tasync.broker.audit`` quotes a value with others).
_VERBATIM = re.compile(r"[A-Za-z0-9_.:@/+,=-]+")


def trail_files(data_dir: Path) -> list[Path]:
    """The trail files, oldest first: ``telalert.trail.5`` ... ``.1``, then the current one."""
    base = data_dir / TRAIL_NAME
    rotated = [base.with_name(f"{TRAIL_NAME}.{n}") for n in range(ROTATE_KEEP, 0, -1)]
    return [p for p in [*rotated, base] if p.exists()]


def trail_lines(data_dir: Path, alert_id: str, *, limit: int = MAX_LINES) -> list[dict[str, str]]:
    """Every trail line about ``alert_id``, oldest first, at most ``limit`` (the newest)."""
    needle = max(_VERBATIM.findall(alert_id), key=len, default="").encode()
    found: list[dict[str, str]] = []
    for path in trail_files(data_dir):
        try:
            data = path.read_bytes()
        except OSError:
            continue  # rotated away between listing and reading
        if needle not in data:
            continue
        for raw in data.split(b"\n"):
            if needle not in raw:
                continue
            try:
                line = parse_trail_line(raw.decode("utf-8", "replace"))
            except (ValueError, IndexError):
                continue  # a line cut short by a crash
            if line.get("id") == alert_id:
                found.append(line)
    return found[-limit:]
