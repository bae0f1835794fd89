"""Records which of tasync's functions a process runs, for ``benchmarks.flows``.

Python imports ``sitecustomize`` at start-up from any directory on ``PYTHONPATH``; the flow
benchmark puts this directory there for the processes it starts, and names a directory in
``TASYNC_FLOW_TRACE_DIR`` for the records. Every call of a function (not a module or class
body run at import) defined under the project's four packages is stamped with the wall-clock
time; the process writes its record on exit and on SIGUSR2, so a long-running node can be
asked for it. Without the variable this file does nothing.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

_OUT = os.environ.get("TASYNC_FLOW_TRACE_DIR")
_ROOT = str(Path(__file__).resolve().parent.parent.parent) + os.sep
_PACKAGES = tuple(_ROOT + name + os.sep for name in ("broker", "producers", "consumers", "tasync"))
#: A function's code object has fresh locals; a module's or a class body's has not.
_CO_NEWLOCALS = 0x2


def _install(out: str) -> None:
    calls: dict[str, collections.deque[float]] = collections.defaultdict(
        lambda: collections.deque(maxlen=5000))

    def profile(frame: FrameType, event: str, _arg: Any) -> None:
        code = frame.f_code
        if (event == "call" and code.co_flags & _CO_NEWLOCALS
                and code.co_filename.startswith(_PACKAGES)):
            calls[f"{code.co_filename[len(_ROOT):]}::{code.co_qualname}"].append(time.time())

    def dump(*_: object) -> None:
        record = {"argv": sys.argv, "calls": {key: list(times)
                                              for key, times in list(calls.items())}}
        Path(out, f"{os.getpid()}.json").write_text(json.dumps(record))

    sys.setprofile(profile)
    threading.setprofile(profile)
    atexit.register(dump)
    signal.signal(signal.SIGUSR2, dump)


if _OUT:
    _install(_OUT)
