"""Waiting on events instead of sleeping: poll a predicate until it holds or time runs out."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], *, timeout_s: float = 30.0, what: str = "condition",
             interval_s: float = 0.05) -> T:
    """Return the first truthy value of ``predicate()``; fail the test after ``timeout_s``.

    The timeout is a safety net against hangs, not a performance assertion: it is generous on
    purpose, and a test never asserts how long something took.
    """
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")
