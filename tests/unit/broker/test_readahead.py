"""The read-ahead transport hands py-amqp's frame parser the same frames, in fewer reads.

A socket pair stands in for the broker: frames written in one piece come out one by one from
one ``recv``, and a frame cut by a timeout is resumed where it stopped, as py-amqp's own
transport does.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from tasync.broker.readahead import READ_AHEAD_BYTES, ReadAheadTCP, buffered


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


class Counting:
    """A socket's ``recv``, counted."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls = 0

    def __call__(self, size: int) -> bytes:
        self.calls += 1
        return self.sock.recv(size)


@pytest.fixture
def pair() -> Iterator[tuple[ReadAheadTCP, socket.socket, Counting]]:
    ours, broker = socket.socketpair()
    transport = ReadAheadTCP("127.0.0.1:5672", connect_timeout=1)
    transport.sock = ours
    transport._setup_transport()
    counting = Counting(ours)
    transport._quick_recv = counting
    yield transport, broker, counting
    ours.close()
    broker.close()


def test_frames_sent_together_are_read_with_one_recv(
        pair: tuple[ReadAheadTCP, socket.socket, Counting]) -> None:
    transport, broker, counting = pair
    sent = [frame(1, 1, b"method"), frame(2, 1, b"header" * 3), frame(3, 1, b"body" * 50)]
    broker.sendall(b"".join(sent))
    got = [transport.read_frame() for _ in sent]
    assert [(kind, channel, bytes(payload)) for kind, channel, payload in got] == [
        (1, 1, b"method"), (2, 1, b"header" * 3), (3, 1, b"body" * 50)]
    assert counting.calls == 1  # py-amqp's transport makes nine
    assert buffered(SimpleNamespace(connection=SimpleNamespace(transport=transport))) == 0


def test_a_frame_larger_than_the_read_ahead_comes_whole(
        pair: tuple[ReadAheadTCP, socket.socket, Counting]) -> None:
    transport, broker, _ = pair
    big = bytes(range(256)) * (3 * READ_AHEAD_BYTES // 256)
    broker.sendall(frame(3, 7, big) + frame(8, 0, b""))
    kind, channel, payload = transport.read_frame()
    assert (kind, channel, bytes(payload)) == (3, 7, big)
    assert transport.read_frame()[0] == 8  # the heartbeat after it, from what was read ahead


@pytest.mark.parametrize("cut", [3, 40])  # inside the frame's head, inside its payload
def test_a_frame_cut_by_a_timeout_is_resumed_where_it_stopped(
        pair: tuple[ReadAheadTCP, socket.socket, Counting], cut: int) -> None:
    transport, broker, _ = pair
    whole = frame(3, 2, b"x" * 100)
    broker.sendall(whole[:cut])
    transport.sock.settimeout(0.05)
    with pytest.raises(socket.timeout):
        transport.read_frame()
    assert transport.buffered() == cut  # nothing read was dropped
    broker.sendall(whole[cut:] + frame(1, 2, b"next"))
    assert bytes(transport.read_frame()[2]) == b"x" * 100
    assert bytes(transport.read_frame()[2]) == b"next"


def test_a_closed_socket_is_reported_as_py_amqp_reports_it(
        pair: tuple[ReadAheadTCP, socket.socket, Counting]) -> None:
    transport, broker, _ = pair
    broker.close()
    with pytest.raises(OSError, match="Server unexpectedly closed connection"):
        transport.read_frame()
