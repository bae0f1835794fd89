"""``--since``: the one way every command names a point in the past.

``tasync replay --since``, ``tasync totals --since`` and ``tasync wait delivered --since`` take
the same forms, parsed here, so an operator who learned one knows them all:

* an ISO-8601 time, ``2026-01-31T14:05:00Z`` or ``2026-01-31 14:05`` (a time without a zone is
  the local time of the machine running the command, as ``date`` shows it);
* seconds since the epoch, ``1769868300`` (what ``date +%s`` prints);
* a duration back from now, ``90s``, ``30m``, ``2h``, ``7d``, ``1w``;
* ``seq:K``, the changes after seq K, where a command counts changes: a point in the
  configuration's history rather than in time. Commands that count something else (alert
  totals are kept per minute, not per change) refuse it with one line.

It is pure (no broker, no clock unless asked), so the node and the CLI share it.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass
from typing import Any

from tasync.broker.errors import ConfigError
from tasync.broker.messages import Change

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: Read as seconds since the epoch rather than as an ISO year (``2026`` alone is a number).
_EPOCH_RE = re.compile(r"^\d+(?:\.\d+)?$")
FORMS = "an ISO time (2026-01-31T14:05:00Z), seconds since the epoch, or a duration (30m, 2h, 7d)"


@dataclass(frozen=True)
class Since:
    """A point in the history: a time (seconds since the epoch) or a seq (exclusive)."""

    ts: float | None = None
    seq: int | None = None

    @classmethod
    def parse(cls, text: str, *, allow_seq: bool = True, now: float | None = None) -> Since:
        """Read one of the forms in the module docstring.

        Args:
            text: what the operator typed.
            allow_seq: whether ``seq:K`` means something to the command asking.
            now: the current time for durations (tests pass one), else the clock.

        Raises:
            ConfigError: one line naming the value and the forms accepted.
        """
        value = text.strip()
        if value.lower().startswith("seq:"):
            if not allow_seq:
                raise ConfigError(f"--since {value!r}: this command counts by time, not by "
                                  f"seq; use {FORMS}")
            return cls(seq=_seq(value))
        duration = _DURATION_RE.match(value)
        if duration:
            current = time.time() if now is None else now
            return cls(ts=current - float(duration.group(1)) * _UNIT_S[duration.group(2)])
        if _EPOCH_RE.match(value):
            return cls(ts=float(value))
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            also = " or seq:K (the changes after seq K)" if allow_seq else ""
            raise ConfigError(f"--since {value!r}: use {FORMS}{also}") from None
        if when.tzinfo is None:
            when = when.astimezone()
        return cls(ts=when.timestamp())

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Since:
        """From a request's ``since_ts`` or ``since_seq``."""
        if args.get("since_seq") is not None:
            return cls(seq=int(args["since_seq"]))
        if args.get("since_ts") is not None:
            return cls(ts=float(args["since_ts"]))
        raise ConfigError("replay needs since_ts or since_seq")

    def to_args(self) -> dict[str, Any]:
        """The request arguments ``from_args`` reads."""
        return {"since_seq": self.seq} if self.seq is not None else {"since_ts": self.ts}

    def wants(self, change: Change) -> bool:
        """Whether ``change`` lies after this point."""
        if self.seq is not None:
            return change.seq > self.seq
        assert self.ts is not None
        return change.ts >= self.ts

    def describe(self) -> str:
        """For people: ``seq 42`` or the time in UTC."""
        if self.seq is not None:
            return f"seq {self.seq}"
        assert self.ts is not None
        return dt.datetime.fromtimestamp(self.ts, dt.UTC).isoformat(timespec="milliseconds")


def _seq(value: str) -> int:
    try:
        seq = int(value[4:])
    except ValueError:
        raise ConfigError(f"--since {value!r}: seq:K needs a whole number K") from None
    if seq < 0:
        raise ConfigError(f"--since {value!r}: K must not be negative")
    return seq
