"""The memory readers behind the metrics: each must move with the pool it claims to measure.

A reader that looked at the wrong library (a second SQLite, say) would return plausible but
frozen numbers; these tests allocate in each pool and check the reading follows, both ways.
"""

from __future__ import annotations

import sqlite3

import pytest

from tasync import memory

MB = 1 << 20


def test_sqlite_memory_follows_the_connections_python_opens() -> None:
    before = memory.sqlite_memory_bytes()
    if before is None:
        pytest.skip("this SQLite does not export sqlite3_memory_used")
    db = sqlite3.connect(":memory:")  # an in-memory database lives in its page cache
    db.execute("CREATE TABLE t (x BLOB)")
    db.executemany("INSERT INTO t VALUES (?)", ((bytes(1000),) for _ in range(4000)))
    filled = memory.sqlite_memory_bytes()
    db.close()
    after = memory.sqlite_memory_bytes()
    assert filled is not None and after is not None
    assert filled - before > 3 * MB
    assert filled - after > 3 * MB


def test_allocated_blocks_count_live_objects() -> None:
    before = memory.python_allocated_blocks()
    kept = [object() for _ in range(50_000)]
    during = memory.python_allocated_blocks()
    del kept
    after = memory.python_allocated_blocks()
    assert during - before >= 45_000
    assert during - after >= 45_000


def test_malloc_stats_see_allocations_and_frees() -> None:
    before = memory.malloc_stats()
    if before is None:
        pytest.skip("not glibc: mallinfo2 unavailable")
    big = bytearray(32 * MB)  # larger than pymalloc serves: it comes from malloc
    during = memory.malloc_stats()
    del big
    after = memory.malloc_stats()
    assert during is not None and after is not None
    assert during.in_use_bytes - before.in_use_bytes >= 31 * MB
    assert during.in_use_bytes - after.in_use_bytes >= 31 * MB
    assert min(before.free_held_bytes, during.free_held_bytes, after.free_held_bytes) >= 0


def test_readers_without_their_library_say_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_sqlite_memory_used", lambda: None)
    monkeypatch.setattr(memory, "_libc", lambda: None)
    assert memory.sqlite_memory_bytes() is None
    assert memory.malloc_stats() is None
