"""The two logs of a node: the trail and the synchronization log, both rotating.

``telalert.trail`` has one line per significant event, ``timestamp node event key=value ...``,
which operators grep and tests parse; ``tasync.log`` is the synchronization log, with
per-message detail at ``-v``. Values are quoted when they hold spaces so every line splits
back into its fields, and nothing that looks like a secret is ever passed in. The
synchronization log also goes to stderr in a short form (``stderr_handler``), where journald
and ``docker logs`` collect it.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from tasync.broker.settings import stderr_is_journal

TRAIL_NAME = "telalert.trail"
SYNC_LOG_NAME = "tasync.log"
ROTATE_BYTES = 10 << 20
ROTATE_KEEP = 5
_SAFE = re.compile(r"[A-Za-z0-9_.:@/+,=-]*")


def _value(value: Any) -> str:
    text = str(value)
    if text and _SAFE.fullmatch(text):
        return text  # the common case (names, ids, numbers): nothing to escape or quote
    # A trail line is one line: control characters are escaped before quoting.
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if text and _SAFE.fullmatch(text) else shlex.quote(text)


_second: tuple[int, str] = (-1, "")


def utc_now() -> str:
    """ISO-8601 UTC time with milliseconds, the timestamp of every trail line.

    The date and time of day are formatted once per second and kept: a delivering node
    stamps thousands of lines a second, and formatting a ``datetime`` each time cost more
    than the rest of the line.
    """
    global _second
    now = time.time()
    second = int(now)
    cached = _second
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((now - second) * 1000):03d}Z"


class Trail:
    """Appends audit lines to ``<data-dir>/telalert.trail``; thread-safe, rotating.

    Lines are written straight to the rotating handler's file, not through ``logging``: a
    ``LogRecord`` and the handler's formatting cost about 30 µs a line, three times the line
    itself, and the delivery path writes a line per alert. Rotation is the handler's own
    (``doRollover`` at ``ROTATE_BYTES``, ``ROTATE_KEEP`` old files), judged as it judges it.

    ``event`` writes its line at once. ``defer`` keeps the line (stamped now) until ``flush``,
    the next ``event``, or ``DEFER_MAX`` lines, and writes them all with one ``write``: the
    delivery worker defers the lines of a batch of alerts and flushes them before it
    acknowledges the batch, so a line is in the file (the page cache, as every line always
    was) before the ack it describes, at a fraction of the cost of a write per line.
    """

    #: Deferred lines written at the latest when this many are waiting.
    DEFER_MAX = 1000

    def __init__(self, data_dir: Path | str, node: str) -> None:
        self.path = Path(data_dir) / TRAIL_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.node = node
        self._max_bytes = ROTATE_BYTES
        self._handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP, encoding="utf-8"
        )
        self._lock = threading.Lock()
        self._deferred: list[str] = []

    def _line(self, event: str, fields: dict[str, Any]) -> str:
        parts = [utc_now(), self.node, event]
        parts += [f"{k}={_value(v)}" for k, v in fields.items() if v is not None]
        return " ".join(parts)

    def event(self, event: str, **fields: Any) -> str:
        """Write one line (after any deferred ones) and return it."""
        line = self._line(event, fields)
        with self._lock:
            self._deferred.append(line)
            self._write_deferred()
        return line

    def defer(self, event: str, **fields: Any) -> str:
        """Keep one line for the next ``flush`` (see the class) and return it."""
        line = self._line(event, fields)
        with self._lock:
            self._deferred.append(line)
            if len(self._deferred) >= self.DEFER_MAX:
                self._write_deferred()
        return line

    def flush(self) -> None:
        """Write every deferred line, in the order they were made."""
        with self._lock:
            if self._deferred:
                self._write_deferred()

    def _write_deferred(self) -> None:
        """One write of the deferred lines; rotates first when they would pass the limit."""
        data = "\n".join(self._deferred) + "\n"
        self._deferred.clear()
        stream = self._stream()
        stream.seek(0, 2)  # another writer of the same file may have appended
        if stream.tell() and stream.tell() + len(data) >= self._max_bytes:
            self._handler.doRollover()
            stream = self._stream()
        stream.write(data)
        stream.flush()

    def _stream(self) -> Any:
        """The handler's open file, opened again when closed (as ``FileHandler.emit`` does)."""
        if self._handler.stream is None:
            self._handler.stream = self._handler._open()
        return self._handler.stream

    def close(self) -> None:
        """Write the deferred lines, flush and close the file."""
        self.flush()
        self._handler.close()


_ESCAPED = re.compile(r"\\(\\|n|r|x[0-9a-f]{2})")


def _unescape(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        return {"\\": "\\", "n": "\n", "r": "\r"}.get(code) or chr(int(code[1:], 16))

    return _ESCAPED.sub(one, text)


def parse_trail_line(line: str) -> dict[str, str]:
    """Split a trail line back into ``ts``, ``node``, ``event`` and its key=value fields."""
    parts = shlex.split(line)
    fields = {k: _unescape(v) for k, v in (p.split("=", 1) for p in parts[3:] if "=" in p)}
    return {"ts": parts[0], "node": parts[1], "event": parts[2], **fields}


def read_trail(data_dir: Path | str) -> list[dict[str, str]]:
    """Every line of a node's current trail file, parsed."""
    path = Path(data_dir) / TRAIL_NAME
    if not path.exists():
        return []
    return [parse_trail_line(x) for x in path.read_text(encoding="utf-8").splitlines() if x]


#: How long stderr stays quiet about a warning it already showed, unless the fault cleared.
REPEAT_WINDOW_S = 600.0
#: Distinct warnings remembered at most (the oldest are forgotten first).
REPEAT_KEYS = 256
#: syslog priorities by logging level, for journald's ``<N>`` line prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class RepeatFilter(logging.Filter):
    """Shows each distinct warning once per ``window_s``, so a lasting fault is one line.

    A worker that cannot reach the broker retries forever on several connections; on stderr
    (journald, ``docker logs``) that should read as one line per problem, not one per attempt
    and connection. Records name their problem in a ``problem`` attribute where several
    connections report the same fault in their own words; otherwise the message is the key.
    A record with ``resolved`` set (a connection came back) is shown only if a problem was,
    and lets the next fault be reported at once.
    """

    def __init__(self, window_s: float = REPEAT_WINDOW_S, max_keys: int = REPEAT_KEYS) -> None:
        super().__init__()
        self.window_s = window_s
        self.max_keys = max_keys
        self._shown: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is shown: not a repeat within the window."""
        with self._lock:
            if getattr(record, "resolved", False):
                reported = bool(self._shown)
                self._shown.clear()
                return reported
            if record.levelno < logging.WARNING:
                return True
            key = str(getattr(record, "problem", None) or record.getMessage())
            now = time.monotonic()
            last = self._shown.pop(key, None)
            if last is not None and now - last < self.window_s:
                self._shown[key] = last
                return False
            self._shown[key] = now
            while len(self._shown) > self.max_keys:
                del self._shown[next(iter(self._shown))]
            return True


class _ShortFormatter(logging.Formatter):
    """One line per record: an exception shows as its type and message, not its traceback.

    The traceback stays in ``tasync.log``; journald and ``docker logs`` show one line per
    record, under systemd with the ``<N>`` syslog priority journald reads (and strips).
    """

    def __init__(self, fmt: str, *, journal: bool) -> None:
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line (see the class)."""
        short = logging.makeLogRecord(record.__dict__)
        short.exc_info = short.exc_text = short.stack_info = None
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            short.msg, short.args = f"{record.getMessage()} ({type(error).__name__}: " \
                f"{str(error).splitlines()[0] if str(error) else ''})", None
        line = super().format(short).replace("\n", " ")
        return f"<{_PRIORITY.get(record.levelno, 6)}>{line}" if self.journal else line


def stderr_handler(node: str, *, stream: TextIO | None = None) -> logging.Handler:
    """The worker's log on stderr, for journald and ``docker logs``: short, one per problem.

    No timestamp (journald and ``docker logs -t`` add their own), the node's name, the level
    and the message on one line; under systemd a ``<N>`` priority prefix too, so ``journalctl
    -p warning`` finds the warnings. Repeats are filtered (``RepeatFilter``) and tracebacks
    left out; ``tasync.log`` keeps both.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    journal = stream is None and stderr_is_journal()
    handler.setFormatter(_ShortFormatter(f"{node} %(levelname)s %(message)s", journal=journal))
    handler.addFilter(RepeatFilter())
    return handler


def setup_sync_log(data_dir: Path | str, node: str, *, verbose: bool,
                   stderr: TextIO | None = None) -> logging.Logger:
    """Route the ``tasync`` loggers to ``<data-dir>/tasync.log`` and stderr (DEBUG with ``-v``).

    Args:
        data_dir: where ``tasync.log`` rotates.
        node: the node's name, on every line.
        verbose: DEBUG instead of INFO, in both places.
        stderr: where the short log goes (tests pass a stream); default ``sys.stderr``.
    """
    root = logging.getLogger("tasync")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = logging.handlers.RotatingFileHandler(
        Path(data_dir) / SYNC_LOG_NAME, maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP,
        encoding="utf-8",
    )
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {node} %(levelname)s %(name)s %(message)s"
    ))
    root.handlers[:] = [handler, stderr_handler(node, stream=stderr)]
    root.propagate = False
    return root
