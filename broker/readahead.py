"""py-amqp's transport, reading ahead: one ``recv`` for many frames instead of three per frame.

py-amqp's TCP transport asks the socket for exactly what the frame parser wants next: the
seven bytes of a frame's head, then its payload, then its end byte. A delivered message is
three frames, so a consumer makes nine ``recv`` calls per message, each a system call and a
trip through Python. Here the transport asks for up to ``READ_AHEAD_BYTES`` at a time and
serves the parser from what it holds: the same bytes in the same order, a few ``recv`` calls
per window of small messages.

Whoever waits on the socket itself (``select``) must first look at ``buffered``: frames read
ahead are no longer readable on the socket. ``drain_events`` needs no change, it reads
through the transport. TLS connections keep py-amqp's own transport (the TLS layer already
decrypts whole records).

kombu takes the transport class per connection (``ReadAheadTransport``), so nothing of
py-amqp or kombu is patched.
"""

from __future__ import annotations

import errno
from typing import Any

from amqp.transport import TCPTransport
from kombu.transport import pyamqp

#: Most bytes asked of the socket at once (a larger payload is asked for whole). The unread
#: rest is copied on every read (``bytes`` slicing), so a much larger buffer would cost more
#: in copies than it saves in calls; 4 KB holds several small alerts' frames.
READ_AHEAD_BYTES = 4 << 10
_RETRY_ERRNOS = (errno.EAGAIN, errno.EINTR)


class ReadAheadTCP(TCPTransport):  # type: ignore[misc]
    """py-amqp's TCP transport with a read-ahead buffer (see the module docstring)."""

    _read_buffer: bytes  # py-amqp's own: set when the socket is set up, read by read_frame

    def _read(self, n: int, initial: bool = False) -> bytes:
        """Exactly ``n`` bytes, taken from the buffer and read ahead from the socket as needed.

        As py-amqp's own: what was read stays buffered when the call fails (a timeout in the
        middle of a frame resumes there), and an empty read means the broker closed.
        """
        rbuf = self._read_buffer
        try:
            while len(rbuf) < n:
                try:
                    data = self._quick_recv(max(n - len(rbuf), READ_AHEAD_BYTES))
                except OSError as exc:
                    if exc.errno in _RETRY_ERRNOS:
                        if initial and self.raise_on_initial_eintr:
                            raise TimeoutError() from None
                        continue
                    raise
                if not data:
                    raise OSError("Server unexpectedly closed connection")
                rbuf += data
        except BaseException:
            self._read_buffer = rbuf
            raise
        self._read_buffer = rbuf[n:]
        return rbuf[:n]

    def buffered(self) -> int:
        """Bytes read from the socket and not yet parsed: frames ``select`` cannot see."""
        return len(self._read_buffer)


class _Connection(pyamqp.Connection):  # type: ignore[misc]
    """kombu's py-amqp connection, on ``ReadAheadTCP`` unless the connection uses TLS."""

    def Transport(self, host: str, connect_timeout: float | None,
                  ssl: Any = False, read_timeout: float | None = None,
                  write_timeout: float | None = None, socket_settings: Any = None,
                  **kwargs: Any) -> Any:
        if ssl:
            return super().Transport(host, connect_timeout, ssl=ssl, read_timeout=read_timeout,
                                     write_timeout=write_timeout,
                                     socket_settings=socket_settings, **kwargs)
        return ReadAheadTCP(host, connect_timeout=connect_timeout, read_timeout=read_timeout,
                            write_timeout=write_timeout, socket_settings=socket_settings,
                            **kwargs)


class ReadAheadTransport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's py-amqp transport whose connections read ahead (``make_connection`` uses it)."""

    Connection = _Connection


def buffered(connection: Any) -> int:
    """Bytes a kombu connection's transport read ahead and has not parsed (0 for any other)."""
    transport = getattr(getattr(connection, "connection", None), "transport", None)
    return transport.buffered() if isinstance(transport, ReadAheadTCP) else 0
