"""Logging in through a reverse proxy: the proxy authenticates, a header names the user.

Opt-in (``tasync console --auth-header X-Remote-User``). The header is believed only on a
request whose TCP peer is a trusted proxy: the addresses given with ``--trusted-proxy``, or,
without any, the loopback addresses, which the command allows only when the console itself
listens on loopback (so the proxy is on this host). From any other peer the header is ignored
(and logged), as a client could send any header it likes. The user it names must be in the
users file, which gives the role as for a password login; a name the file does not know is
refused, never sent on to the login page. A request without the header (or with it empty)
falls back to the console's own login, so the password login keeps working beside the proxy.

The header does not bypass the checks of a change: the console still keeps a session for the
user (made on the first request and kept in the usual cookie) and every POST must carry that
session's CSRF token and come from the console's origin. That matters more here than with a
password: a browser sends a proxy's Basic or Kerberos credentials to any request, a forged
cross-site form included, but it cannot read the CSRF token.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass, field

from starlette.requests import Request

log = logging.getLogger("tasync.console")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"),
                                 ipaddress.ip_network("::1/128"))
#: Peers whose ignored header was logged (once each, so a polling page does not flood the log).
_MAX_WARNED = 1000


class UnknownProxyUser(Exception):
    """A trusted proxy named a user the users file does not know; the message says so."""


def parse_proxies(values: tuple[str, ...] | list[str]) -> tuple[Network, ...]:
    """``--trusted-proxy`` values (addresses or networks such as ``10.0.0.0/24``).

    Raises:
        ValueError: one that is neither; the message names it.
    """
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
    return tuple(out)


def is_loopback(host: str) -> bool:
    """Whether the console's listening address is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ProxyAuth:
    """Which header names the user, and which peers may send it.

    Args:
        header: the header's name (any case).
        trusted: the proxies' addresses; empty means loopback peers only.
    """

    header: str
    trusted: tuple[Network, ...] = ()
    _warned: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def trusts(self, peer: str | None) -> bool:
        """Whether ``peer`` (the request's TCP peer address) is a trusted proxy."""
        if not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted or LOOPBACK)

    def user_name(self, request: Request) -> str | None:
        """The user the trusted proxy names, or None (no header, empty, or not trusted)."""
        name = request.headers.get(self.header, "").strip()
        if not name:
            return None
        peer = request.client.host if request.client else None
        if self.trusts(peer):
            return name
        with self._lock:
            first = peer not in self._warned and len(self._warned) < _MAX_WARNED
            self._warned.add(str(peer))
        if first:
            log.warning("console: ignored %s from %s, which is not a trusted proxy",
                        self.header, peer)
        return None
