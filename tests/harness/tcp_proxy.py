"""A controllable TCP proxy that cuts one client off its broker, for fault-injection tests.

Killing a broker node cuts every client at once; many failure modes the fault suite must cover
are narrower: one worker loses its network while the broker and all other workers carry on.
Point that one client at a ``TcpProxy`` in front of the broker and call ``cut()``:

* ``cut("reset")`` aborts every proxied connection with a TCP RST and resets new ones at once,
  like a crashed peer or a firewall rejecting packets: the client notices immediately.
* ``cut("blackhole")`` keeps every socket open but stops moving bytes, like a network
  partition: nothing fails until heartbeats or timeouts notice the silence. Bytes are not
  dropped but held back (the proxy simply stops reading), as TCP would retransmit them after a
  short partition, so a connection that survives the cut carries on intact after ``heal()``.
  New connections are accepted and connected upstream but stay silent too.

``heal()`` restores normal forwarding. Everything runs on one selector thread that owns every
socket, so cut/heal/close from the test thread never race with a half-finished send.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar
from urllib.parse import quote

CutMode = Literal["reset", "blackhole"]
_T = TypeVar("_T")
_CHUNK = 65536
_MAX_BUFFER = 256 * 1024  # per direction; beyond it we stop reading (backpressure)
_LINGER_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class ProxyError(RuntimeError):
    """The proxy's loop thread failed or did not answer a control request in time."""


@dataclass(eq=False)
class _Link:
    """One proxied connection: the accepted client socket and its upstream socket."""

    client: socket.socket
    upstream: socket.socket
    connected: bool = False  # upstream non-blocking connect finished
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)


def _abort(sock: socket.socket) -> None:
    """Close SOCK with an RST rather than a FIN, so the peer sees 'connection reset'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """Forward 127.0.0.1:<port> to TARGET_HOST:TARGET_PORT, with cut and heal switches.

    Usage::

        with TcpProxy("127.0.0.1", 5672) as proxy:
            conn = kombu.Connection(proxy.url_for("/"))
            proxy.cut()          # or proxy.cut(mode="blackhole")
            proxy.heal()

    The proxy listens as soon as it is constructed, so ``port`` is valid at once.

    Attributes:
        target_host: Upstream host.
        target_port: Upstream port.
        host: Address the proxy listens on.
        port: Port the proxy listens on (chosen by the kernel unless given).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        """Bind the listener and start the forwarding thread.

        Args:
            target_host: Upstream host (loopback in this project's tests).
            target_port: Upstream port.
            listen_host: Address to listen on.
            listen_port: Port to listen on; 0 lets the kernel pick a free one.
        """
        self.target_host = target_host
        self.target_port = target_port
        self._listener = socket.create_server((listen_host, listen_port), backlog=64)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._mode: Literal["open", "reset", "blackhole"] = "open"
        self._links: set[_Link] = set()
        self._accepted = 0
        self._closed = False  # close() was called
        self._stopping = False  # the loop should end (set on the loop thread)
        self._commands: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = (
            queue.SimpleQueue()
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"TcpProxy:{self.port}->{target_port}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def mode(self) -> str:
        """``"open"``, ``"reset"`` or ``"blackhole"``."""
        return self._mode

    @property
    def active_connections(self) -> int:
        """Proxied connections currently open (blackholed ones included)."""
        return self._call(lambda: len(self._links))

    @property
    def accepted_connections(self) -> int:
        """Client connections accepted since the proxy started, refused ones included."""
        return self._accepted

    def url_for(self, vhost: str = "/", user: str = "guest", password: str = "guest") -> str:
        """AMQP URL that reaches the target broker through this proxy."""
        return (
            f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}"
            f"/{quote(vhost, safe='')}"
        )

    def cut(self, mode: CutMode = "reset") -> None:
        """Cut the client(s) off the target; effective when this returns.

        Args:
            mode: ``"reset"`` aborts all connections with RST and resets new ones;
                ``"blackhole"`` keeps them open but silent (a partition).
        """
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"unknown cut mode {mode!r}")

        def apply() -> None:
            self._mode = mode
            if mode == "reset":
                for link in list(self._links):
                    self._drop(link, abort=True)

        self._call(apply)

    def heal(self) -> None:
        """Forward again: held bytes flow on, new connections go through."""

        def apply() -> None:
            self._mode = "open"

        self._call(apply)

    def close(self) -> None:
        """Abort all connections, stop listening and end the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(ProxyError):
                self._call(self._shutdown)
            self._thread.join(timeout=5)
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        self._listener.close()  # in case the loop died before its own cleanup

    # ------------------------------------------------------------------ control plumbing

    def _call(self, action: Callable[[], _T]) -> _T:
        """Run ACTION on the loop thread and wait for it, so the change is in force on return."""
        if self._failure is not None:
            raise ProxyError("proxy loop died") from self._failure
        if not self._thread.is_alive():
            raise ProxyError("proxy is closed")
        box: list[_T] = []

        def run() -> None:
            box.append(action())

        done = threading.Event()
        self._commands.put((run, done))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if not done.wait(timeout=10):
            raise ProxyError("proxy loop did not answer within 10 s")
        if not box:
            raise ProxyError("proxy control action failed") from self._failure
        return box[0]

    def _run_commands(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                run, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                run()
            finally:
                done.set()

    def _shutdown(self) -> None:
        self._stopping = True
        for link in list(self._links):
            self._drop(link, abort=True)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._update_interest()
                for key, events in self._selector.select(timeout=0.5):
                    self._dispatch(key.data, events)
                self._run_commands()
        except BaseException as exc:  # surfaced to the test thread by _call()
            self._failure = exc
            for link in list(self._links):
                self._drop(link, abort=True)
        finally:
            self._selector.close()
            self._listener.close()

    def _dispatch(self, tag: object, events: int) -> None:
        if tag == "listener":
            self._accept()
        elif tag == "wake":
            self._run_commands()
        elif isinstance(tag, tuple):
            side, link = tag
            if link in self._links:
                self._service(link, side, events)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._accepted += 1
        if self._mode == "reset":
            _abort(client)  # refused: the client sees a reset during its handshake
            return
        client.setblocking(False)
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = upstream.connect_ex((self.target_host, self.target_port))
        if code not in (0, errno.EINPROGRESS):
            _abort(client)
            upstream.close()
            return
        self._links.add(_Link(client=client, upstream=upstream))  # registered by _update_interest

    def _update_interest(self) -> None:
        """Recompute what each socket waits for; in a cut nothing is read or written."""
        flowing = self._mode == "open"
        for link in self._links:
            client_events = upstream_events = 0
            if not link.connected:
                upstream_events = selectors.EVENT_WRITE  # wait for connect() to finish
            elif flowing:
                if len(link.to_upstream) < _MAX_BUFFER:
                    client_events |= selectors.EVENT_READ
                if link.to_client:
                    client_events |= selectors.EVENT_WRITE
                if len(link.to_client) < _MAX_BUFFER:
                    upstream_events |= selectors.EVENT_READ
                if link.to_upstream:
                    upstream_events |= selectors.EVENT_WRITE
            self._set_events(link.client, client_events, ("client", link))
            self._set_events(link.upstream, upstream_events, ("upstream", link))

    def _set_events(self, sock: socket.socket, events: int, tag: tuple[str, _Link]) -> None:
        # selectors cannot register an empty interest set, so idle sockets are unregistered.
        try:
            key = self._selector.get_key(sock)
        except KeyError:
            key = None
        if events == 0:
            if key is not None:
                self._selector.unregister(sock)
        elif key is None:
            self._selector.register(sock, events, tag)
        elif key.events != events:
            self._selector.modify(sock, events, tag)

    def _service(self, link: _Link, side: str, events: int) -> None:
        if side == "upstream" and not link.connected:
            if link.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                self._drop(link, abort=True)  # target refused: reset the client
            else:
                link.connected = True
            return
        if self._mode != "open":
            return  # the cut started after select() returned: hold everything
        # SOCK is this side's socket; READ_INTO holds bytes read from it for the other side,
        # WRITE_FROM holds bytes the other side sent that are still owed to this one.
        if side == "client":
            sock, other, read_into, write_from = (
                link.client,
                link.upstream,
                link.to_upstream,
                link.to_client,
            )
        else:
            sock, other, read_into, write_from = (
                link.upstream,
                link.client,
                link.to_client,
                link.to_upstream,
            )
        try:
            if events & selectors.EVENT_WRITE and write_from:
                sent = sock.send(write_from)
                del write_from[:sent]
            if events & selectors.EVENT_READ:
                data = sock.recv(_CHUNK)
                if not data:
                    self._finish(link, other, read_into)
                    return
                read_into.extend(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(link, abort=True)

    def _finish(self, link: _Link, dst: socket.socket, pending: bytearray) -> None:
        """One side closed: pass on what is buffered for the other side, then close both."""
        with contextlib.suppress(OSError):
            if pending:
                dst.send(pending)
        self._drop(link, abort=False)

    def _drop(self, link: _Link, *, abort: bool) -> None:
        self._links.discard(link)
        for sock in (link.client, link.upstream):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            if abort:
                _abort(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()
