"""What the console's pages share: who asks, where the console is mounted, reading a form.

Kept apart from ``tasync.console.app`` so that the page modules depend on this and the app on
them, one way.
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from tasync.broker.connection import RECOVERABLE, describe
from tasync.broker.errors import TasyncError
from tasync.broker.settings import Settings
from tasync.console.sessions import Session
from tasync.console.users import User

#: Largest form the console reads (a schedule's windows are the biggest field).
MAX_FORM_BYTES = 256 << 10
#: Most fields in one form.
MAX_FORM_FIELDS = 200
#: Largest upload (a configuration file to import), on the routes that take one.
MAX_UPLOAD_BYTES = 32 << 20


@dataclass(frozen=True)
class Upload:
    """A file sent with a form: the name the browser gave it, and its bytes."""

    filename: str
    data: bytes


class Form(dict[str, str]):
    """A form's text fields, and (for a multipart form on a route that takes one) its files."""

    def __init__(self, fields: dict[str, str] | None = None,
                 files: dict[str, Upload] | None = None) -> None:
        super().__init__(fields or {})
        self.files: dict[str, Upload] = files or {}


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

    @classmethod
    def lost(cls, exc: BaseException) -> NetworkTrouble:
        """The trouble of a connection to the broker that broke (``RECOVERABLE``)."""
        return cls(f"lost the connection to the broker ({describe(exc)})")


#: What a page answers with a message instead of an error page: a refusal or a lost broker.
TROUBLE: tuple[type[BaseException], ...] = (TasyncError, *RECOVERABLE)


def why(exc: BaseException) -> str:
    """One line for a page about ``exc``, one of ``TROUBLE``.

    A refusal speaks for itself; a broken connection is described without a traceback.
    """
    return str(exc) if isinstance(exc, TasyncError) else describe(exc)


class Pages(Protocol):
    """What a group of pages needs from the console it belongs to."""

    settings: Settings
    timeout_s: float

    def guard(self, role: str, handler: Handler, *, upload: bool = False) -> Endpoint:
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


async def read_form(request: Request, *, max_upload_bytes: int = 0) -> Form:
    """A form's fields; larger than the limit: 413.

    A urlencoded form is read on every route. A multipart form (a file upload) is read only
    where ``max_upload_bytes`` allows one, up to that size; elsewhere, as any other body, it
    gives no fields (so its CSRF token is missing and the request is refused).
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data" and max_upload_bytes:
        body = await _body(request, max_upload_bytes, "an upload")
        return _multipart(request.headers["content-type"], body)
    if kind != "application/x-www-form-urlencoded":
        return Form()
    body = await _body(request, MAX_FORM_BYTES, "a form")
    try:
        return Form(dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                                   max_num_fields=MAX_FORM_FIELDS)))
    except ValueError:
        raise HTTPException(413, f"a form has at most {MAX_FORM_FIELDS} fields") from None


async def _body(request: Request, limit: int, what: str) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"{what} is at most {limit >> 10} KiB")
    return body


def _multipart(content_type: str, body: bytes) -> Form:
    """The fields and files of a ``multipart/form-data`` body (the standard library's parser).

    Text fields are decoded as UTF-8; a part with a file name is kept as bytes in ``files``.
    """
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise HTTPException(400, "the upload is not a multipart form")
    fields: dict[str, str] = {}
    files: dict[str, Upload] = {}
    for count, part in enumerate(message.iter_parts(), 1):
        if count > MAX_FORM_FIELDS:
            raise HTTPException(413, f"a form has at most {MAX_FORM_FIELDS} fields")
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = Upload(str(filename), bytes(data))
        else:
            fields[name] = bytes(data).decode("utf-8", "replace")
    return Form(fields, files)
