"""Console sessions, and the checks every change passes: same origin and a CSRF token.

A session is a random token in a cookie (HttpOnly, SameSite=Strict, Secure over TLS or when
asked) and an entry in this process's memory: the user's name, the session's CSRF token and its
end. Restarting the console ends every session, which is the safe direction; the console holds
nothing else, the network's state stays on the nodes. Roles are not kept in the session: they
are read from the users file at every request, so a demotion applies at once.

A change (every POST) must come from a page of the console itself: the ``Origin`` header (or,
when a browser sends none, ``Referer``) must name the host the request was sent to, and the
form or the ``X-CSRF-Token`` header must carry the session's CSRF token. ``SameSite=Strict``
already keeps the cookie off cross-site requests; the two checks also hold for browsers and
proxies that do not honour it.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

COOKIE = "tasync_console"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
#: A session ends this long after login, used or not.
SESSION_TTL_S = 8 * 3600.0
#: Sessions kept at most; the oldest goes first (only logins with a valid password make one).
MAX_SESSIONS = 10_000


@dataclass
class Session:
    """One login: who, the token changes must carry, when it ends, messages for the next page."""

    token: str
    user: str
    csrf: str
    expires: float
    flash: list[str] = field(default_factory=list)


class Sessions:
    """The sessions of one console process."""

    def __init__(self, *, ttl_s: float = SESSION_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._by_token: dict[str, Session] = {}

    def create(self, user: str) -> Session:
        """A new session for ``user``, with fresh session and CSRF tokens."""
        session = Session(token=secrets.token_urlsafe(32), user=user,
                          csrf=secrets.token_urlsafe(32), expires=time.time() + self.ttl_s)
        with self._lock:
            while len(self._by_token) >= MAX_SESSIONS:
                self._by_token.pop(next(iter(self._by_token)))
            self._by_token[session.token] = session
        return session

    def get(self, token: str | None) -> Session | None:
        """The live session of ``token``, or None (unknown or ended)."""
        if not token:
            return None
        with self._lock:
            session = self._by_token.get(token)
            if session is not None and session.expires <= time.time():
                del self._by_token[token]
                return None
            return session

    def drop(self, token: str | None) -> None:
        """End the session of ``token`` (logout)."""
        with self._lock:
            self._by_token.pop(token or "", None)


def same_origin(headers: dict[str, str]) -> bool:
    """Whether a request's ``Origin`` (or ``Referer``) names the host it was sent to.

    A request with neither (a script, not a browser) passes this check unless the browser's
    ``Sec-Fetch-Site`` says it is cross-site; it still needs the CSRF token.
    """
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is not None:
        return origin != "null" and urlsplit(origin).netloc == host
    referer = headers.get("referer")
    if referer is not None:
        return urlsplit(referer).netloc == host
    return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


def csrf_ok(session: Session, sent: str | None) -> bool:
    """Whether ``sent`` is the session's CSRF token (compared in constant time)."""
    return bool(sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())
