"""Python's cycle collector kept out of bulk steps: imports, commits, publishing passes.

The change relay (a producer), the control server (a consumer), the node store writing a
batch of changes and the CLI loading a configuration file each build many objects that live
until their step ends, and pause the collector the same way; the broker layer is the one below
all of them, so the way lives here.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

#: Items (a commit's operations, a publishing pass's changes) from which a step counts as
#: bulk: ``collector_paused(count >= BULK_OPS)``.
BULK_OPS = 1000


@contextlib.contextmanager
def collector_paused(bulk: bool = True) -> Iterator[None]:
    """Keep Python's cycle collector out of a bulk step (when ``bulk``), then let it run again.

    A bulk import builds hundreds of thousands of small containers (operations, bodies,
    changes) that all live until the step ends; each 700 allocations start a collection that
    walks them again, and the full ones walk the whole heap: a fifth of the master's CPU for a
    100,000-object import went there. None of them is garbage before the step ends, and plain
    reference counting frees them then, so nothing is lost by pausing. Only CPU-bound steps
    are wrapped (never a wait on the broker): the pause is process-wide.
    """
    if not bulk or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
