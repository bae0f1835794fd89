"""BlockedGuard: a connection the broker keeps blocked is given up after the limit, not before."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace
from typing import Any

from tasync.broker.connection import BlockedGuard


def fake_conn() -> tuple[Any, socket.socket, socket.socket]:
    """A stand-in for a kombu connection whose py-amqp connection owns one end of a pair."""
    ours, peer = socket.socketpair()
    raw = SimpleNamespace(_transport=SimpleNamespace(sock=ours), on_blocked=None,
                          on_unblocked=None)
    return SimpleNamespace(connection=raw), ours, peer


def test_block_longer_than_the_limit_breaks_the_waiting_read() -> None:
    conn, ours, peer = fake_conn()
    guard = BlockedGuard(conn, limit_s=0.1)
    conn.connection.on_blocked("connection blocked")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(ours.recv(1)))
    reader.start()
    reader.join(10)  # the read returns (EOF) only because the guard shut the socket down
    assert not reader.is_alive() and got == [b""]
    assert guard.expired
    ours.close()
    peer.close()


def test_unblock_in_time_keeps_the_connection() -> None:
    conn, ours, peer = fake_conn()
    guard = BlockedGuard(conn, limit_s=0.2)
    conn.connection.on_blocked("connection blocked")
    conn.connection.on_unblocked()
    peer.sendall(b"x")
    ours.settimeout(1.0)
    assert ours.recv(1) == b"x"  # the socket still works after the limit would have passed
    threading.Event().wait(0.3)
    assert not guard.expired
    ours.close()
    peer.close()
