"""Where a node's memory goes: SQLite's caches, Python objects and the C allocator.

A worker's RSS is the sum of several pools that grow for different reasons, and an operator
(or the soak in tests/faults/test_soak.py) watching RSS alone cannot tell a cache filling up to
its limit from a leak. These readers split it:

* ``sqlite_memory_bytes``: everything SQLite has allocated in this process, page caches of
  every connection included (``sqlite3_memory_used()``). Each connection's page cache may hold
  up to its ``cache_size`` (about 2 MB by default), so this grows while the stores are young
  and then levels off;
* ``python_allocated_blocks``: live Python memory blocks (``sys.getallocatedblocks()``); a
  number that keeps rising under steady load means objects are being kept;
* ``malloc_stats``: glibc's view (``mallinfo2()``) of the bytes handed out and the free bytes
  it keeps in its arenas. Freed memory that glibc keeps is RSS but not a leak: it is reused by
  the next allocations, and it is what ``malloc_trim`` would give back.

Every reader returns None where its source does not exist (another libc, a SQLite without the
symbol), so the metrics built on them are simply absent there instead of wrong. The libraries
are looked up once, on first use; reading costs a few microseconds, so a scrape may do it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tasync.memory")


@functools.cache
def _sqlite_memory_used() -> Any:
    """``sqlite3_memory_used`` of the SQLite library the sqlite3 module runs on, or None.

    The handle is the ``_sqlite3`` extension itself: ``dlsym`` on it searches the extension and
    the libraries it depends on, so this finds the SQLite that Python's connections use whether
    it is linked statically or as a shared library, never a second copy.
    """
    try:
        import _sqlite3

        func = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    except (ImportError, OSError, AttributeError) as exc:
        log.debug("sqlite3_memory_used unavailable: %s", exc)
        return None
    func.restype = ctypes.c_int64
    func.argtypes = []
    return func


def sqlite_memory_bytes() -> int | None:
    """Bytes SQLite has allocated in this process (all connections), or None if unknown."""
    func = _sqlite_memory_used()
    return None if func is None else int(func())


def python_allocated_blocks() -> int:
    """Memory blocks the Python allocator has handed out and not yet freed."""
    return sys.getallocatedblocks()


class _MallInfo2(ctypes.Structure):
    """The ``struct mallinfo2`` of glibc 2.33 and later: every field is a ``size_t``."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.cache
def _libc() -> Any:
    """This process's C library when it is glibc with ``mallinfo2``, else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        libc.mallinfo2.argtypes = []
    except (OSError, AttributeError) as exc:
        log.debug("mallinfo2 unavailable: %s", exc)
        return None
    return libc


@dataclass(frozen=True)
class MallocStats:
    """The glibc heap, summed over all arenas.

    Attributes:
        in_use_bytes: bytes handed out and not freed, large ``mmap`` blocks included.
        free_held_bytes: freed bytes glibc keeps in its arenas for reuse (part of RSS where the
            pages were touched).
    """

    in_use_bytes: int
    free_held_bytes: int


def malloc_stats() -> MallocStats | None:
    """The heap figures of glibc for this process, or None on another C library."""
    libc = _libc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return MallocStats(in_use_bytes=int(info.uordblks + info.hblkhd),
                       free_held_bytes=int(info.fordblks))
