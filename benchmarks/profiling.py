"""Sampling profiles of running workers with py-spy, summarised as text.

``PySpy`` attaches to a process for the duration of a ``with`` block and writes py-spy's raw
(collapsed-stack) output; ``top_frames`` turns that file into the functions that held the GIL
most, inclusive and self, which is what the benchmark reports and the docs quote.
py-spy is optional (``pip install py-spy``); without it ``PySpy`` records nothing.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

_LOCATION = re.compile(r" \((?:.*/)?([^/]*?):\d+\)$")
#: Frames every stack shares (thread start, the worker's command line): not worth listing.
_PLUMBING = re.compile(r"\((threading\.py|<frozen runpy>|core\.py|worker_cli\.py|options\.py)\)$")


class PySpy:
    """``py-spy record --gil --format raw`` on ``pid`` while the block runs."""

    def __init__(self, pid: int, out: Path, *, rate: int = 100, gil_only: bool = True) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.gil_only = gil_only
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def executable() -> str | None:
        """py-spy on the PATH or beside this Python (an unactivated venv)."""
        beside = Path(sys.executable).with_name("py-spy")
        return shutil.which("py-spy") or (str(beside) if beside.exists() else None)

    def __enter__(self) -> PySpy:
        exe = self.executable()
        if exe is None:
            return self
        self.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "record", "--pid", str(self.pid), "--format", "raw",
               "--output", str(self.out), "--rate", str(self.rate)]
        if self.gil_only:
            cmd.append("--gil")
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *_: object) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def top_frames(raw_file: Path, *, limit: int = 15) -> dict[str, Any]:
    """The busiest functions in a py-spy raw file: share of samples, inclusive and self."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    if not raw_file.exists():
        return {"samples": 0, "inclusive": [], "self": []}
    for line in raw_file.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_LOCATION.sub(r" (\1)", f) for f in stack.split(";")[1:]]
        for frame in set(frames):
            if not _PLUMBING.search(frame):
                inclusive[frame] += count
        if frames:
            own[frames[-1]] += count

    def share(counter: collections.Counter[str]) -> list[list[Any]]:
        return [[name, round(100.0 * n / total, 1)] for name, n in counter.most_common(limit)]

    return {"samples": total, "inclusive_percent": share(inclusive), "self_percent": share(own)}
