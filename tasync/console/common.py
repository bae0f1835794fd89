"""What the console's pages share: who asks, where the console is mounted, reading a form.

Kept apart from ``tasync.console.app`` so that the page modules depend on this and the app on
them, one way.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from tasync.broker.settings import Settings
from tasync.console.sessions import Session
from tasync.console.users import User

#: Largest form the console reads (a schedule's windows are the biggest field).
MAX_FORM_BYTES = 256 << 10
#: Most fields in one form.
MAX_FORM_FIELDS = 200


@dataclass(frozen=True)
class Auth:
    """Who sends a request: the session and the user as the users file says now."""

    session: Session
    user: User


def actor(auth: Auth) -> str:
    """How the trail names a console user: ``console:NAME``.

    User names are plain (``tasync.console.users.USER_NAME_RE``), so a trail line holds the
    name as it is and ``grep by=console:alice`` finds what alice did.
    """
    return f"console:{auth.user.name}"


Handler = Callable[[Request, Auth], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


class NetworkTrouble(Exception):
    """The broker or the master could not be asked; the message says why, in one line."""


class Pages(Protocol):
    """What a group of pages needs from the console it belongs to."""

    settings: Settings
    timeout_s: float

    def guard(self, role: str, handler: Handler) -> Endpoint:
        """``handler`` for users with ``role``; a POST also passes the origin and CSRF checks."""

    def page(self, request: Request, template: str, status: int = 200, *,
             auth: Auth | None = None, **context: Any) -> HTMLResponse:
        """``template`` rendered for ``auth``'s user."""

    async def blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on a worker thread; a broker or network failure becomes ``NetworkTrouble``."""


def visible(value: Any) -> str:
    """``value`` as text with its control characters spelled out (``\\x07``), as the trail does.

    An alert text or a reason may hold any character; a bell or an escape sequence shown as
    it is would be invisible, or would mislead. Line breaks and tabs stay, as the page's
    ``pre-wrap`` shows them. Autoescaping still applies to the result.
    """
    return "".join(c if c.isprintable() or c in "\n\t" else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in str(value))


def when(ts: Any) -> str:
    """A time in seconds since the epoch as ``YYYY-MM-DD HH:MM:SS UTC`` (empty when unknown)."""
    if not isinstance(ts, int | float):
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def base(request: Request) -> str:
    """Where the console is mounted (``""`` at the root, ``/console`` beside the intake)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (empty for any other body); larger than the limit: 413."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, f"a form is at most {MAX_FORM_BYTES >> 10} KiB")
    try:
        return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                              max_num_fields=MAX_FORM_FIELDS))
    except ValueError:
        raise HTTPException(413, f"a form has at most {MAX_FORM_FIELDS} fields") from None
