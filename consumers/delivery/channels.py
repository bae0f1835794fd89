"""Delivery channels: one function per URL scheme, each raising ``ChannelError`` on failure.

``file:`` appends one JSON line; ``http(s):`` posts JSON; ``smtp(s):`` and ``mailto:`` send mail
with the standard library; any other scheme goes to Apprise, imported only when first needed
because it loads a hundred plugins and an idle worker must stay small.

``ChannelError.retryable`` separates "try again later" (a 503, a refused connection, a full
disk) from "this will never work" (a 404, an unknown scheme, a refused recipient), so the
executor does not spend minutes retrying a typo. Messages name the destination, never its URL:
URLs carry tokens and passwords.

URL forms::

    file:///var/spool/alerts.jsonl
    https://hooks.example.com/T0/abc            (user:password@ becomes Basic auth)
    smtp://user:pw@mail.example.com:587/?to=ops@example.com,noc@example.com&from=a@b&starttls=1
    smtps://mail.example.com/?to=ops@example.com
    mailto:ops@example.com?from=tasync@example.com   (server: ?smtp=HOST:PORT, else
                                                      $TASYNC_SMTP_URL, else localhost:25)
    anything else Apprise knows, e.g. slack://..., mailto://user:pw@gmail.com
"""

from __future__ import annotations

import base64
import json
import os
import re
import smtplib
import socket
import ssl
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

ENV_SMTP_URL = "TASYNC_SMTP_URL"
DEFAULT_TIMEOUT_S = 10.0
_RETRYABLE_HTTP = {408, 425, 429}


class ChannelError(Exception):
    """One delivery attempt failed.

    Attributes:
        retryable: whether a later attempt may succeed.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def scheme_of(url: str) -> str:
    """The lower-case scheme of a delivery URL (``mailto`` for both mail forms)."""
    return url.split(":", 1)[0].lower()


def send(url: str, payload: dict[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Deliver ``payload`` (the alert as JSON-able data) to ``url``.

    Raises:
        ChannelError: the attempt failed; ``retryable`` says whether to try again.
    """
    scheme = scheme_of(url)
    if scheme == "file":
        send_file(url, payload)
    elif scheme in ("http", "https"):
        send_http(url, payload, timeout_s=timeout_s)
    elif scheme in ("smtp", "smtps") or (scheme == "mailto" and not url.startswith("mailto://")):
        send_mail(url, payload, timeout_s=timeout_s)
    else:
        send_apprise(url, payload)


# -- file ---------------------------------------------------------------------------------------

def file_path(url: str) -> str:
    """The local path of a ``file:`` URL; only local files (no host, or ``localhost``)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ChannelError("file URLs must name a local path (file:///path)", retryable=False)
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ChannelError("file URLs need an absolute path (file:///path)", retryable=False)
    return path


def send_file(url: str, payload: dict[str, Any]) -> None:
    """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor.

    One write per line keeps lines whole when several nodes on one machine share a file, and
    the line is on disk (in the page cache) before the alert is acknowledged.
    """
    line = (json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    path = file_path(url)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        # A missing directory or a full disk may be fixed by an operator: retry, then dead-letter.
        raise ChannelError(f"cannot append to the file: {exc.strerror}", retryable=True) from None
    if written != len(line):
        raise ChannelError("short write to the file", retryable=True)


# -- http ---------------------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is misconfigured; following it would turn the POST into a GET."""

    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect())


def send_http(url: str, payload: dict[str, Any], *, timeout_s: float) -> None:
    """POST the payload as JSON; 2xx is success, 408/425/429/5xx and network errors retry."""
    parts = urlsplit(url)
    headers = {"Content-Type": "application/json", "User-Agent": "tasync-delivery"}
    if parts.username is not None:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        netloc = parts.netloc.rsplit("@", 1)[1]
        url = parts._replace(netloc=netloc).geturl()
    headers["Idempotency-Key"] = str(payload.get("id", ""))
    body = json.dumps(payload, ensure_ascii=False).encode()
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            response.read(65536)
    except urllib.error.HTTPError as exc:
        retryable = exc.code >= 500 or exc.code in _RETRYABLE_HTTP
        raise ChannelError(f"webhook answered HTTP {exc.code}", retryable=retryable) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ChannelError(f"webhook unreachable: {_short(reason)}", retryable=True) from None


# -- mail ---------------------------------------------------------------------------------------

def _mail_target(url: str) -> tuple[str, int, bool, bool, str | None, str | None, list[str],
                                   str | None]:
    """``(host, port, implicit_tls, starttls, user, password, recipients, sender)`` of a URL."""
    scheme = scheme_of(url)
    if scheme == "mailto":
        address, _, query = url[len("mailto:"):].partition("?")
        params = parse_qs(query)
        recipients = [unquote(a) for a in address.split(",") if a]
        server = (params.get("smtp") or [os.environ.get(ENV_SMTP_URL, "")])[0]
        host, port, tls, starttls, user, password = _server(server)
        return host, port, tls, starttls, user, password, recipients, _first(params, "from")
    parts = urlsplit(url)
    params = parse_qs(parts.query)
    recipients = [unquote(a) for v in params.get("to", []) for a in v.split(",") if a]
    tls = scheme == "smtps"
    return (parts.hostname or "localhost", parts.port or (465 if tls else 25), tls,
            _first(params, "starttls") in ("1", "true", "yes"),
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
            recipients, _first(params, "from"))


def _server(value: str) -> tuple[str, int, bool, bool, str | None, str | None]:
    """An SMTP server given as ``HOST[:PORT]`` or ``smtp(s)://[user:pw@]host[:port]``."""
    if not value:
        return "localhost", 25, False, False, None, None
    if "://" not in value:
        value = "smtp://" + value
    parts = urlsplit(value)
    tls = parts.scheme == "smtps"
    starttls = _first(parse_qs(parts.query), "starttls") in ("1", "true", "yes")
    return (parts.hostname or "localhost", parts.port or (465 if tls else 25), tls, starttls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None)


def _first(params: dict[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    return values[0] if values else None


def send_mail(url: str, payload: dict[str, Any], *, timeout_s: float) -> None:
    """Send one mail; 4xx replies and network errors retry, 5xx replies do not."""
    host, port, tls, starttls, user, password, recipients, sender = _mail_target(url)
    if not recipients:
        raise ChannelError("mail destination has no recipient (add ?to=...)", retryable=False)
    message = EmailMessage()
    message["From"] = sender or f"tasync@{socket.getfqdn()}"
    message["To"] = ", ".join(recipients)
    message["Subject"] = str(payload.get("subject") or "tasync alert")
    message["Message-ID"] = make_msgid(idstring=re.sub(r"[^A-Za-z0-9.-]", "-",
                                                      str(payload.get("id")))[:64])
    message["X-Tasync-Alert-Id"] = str(payload.get("id"))
    message["X-Tasync-Source"] = str(payload.get("source"))
    message.set_content(str(payload.get("text", "")))
    try:
        client: smtplib.SMTP = (smtplib.SMTP_SSL(host, port, timeout=timeout_s,
                                                 context=ssl.create_default_context())
                                if tls else smtplib.SMTP(host, port, timeout=timeout_s))
        with client:
            if starttls:
                client.starttls(context=ssl.create_default_context())
            if user:
                client.login(user, password or "")
            client.send_message(message, to_addrs=recipients)
    except smtplib.SMTPRecipientsRefused:
        raise ChannelError("mail server refused every recipient", retryable=False) from None
    except smtplib.SMTPResponseException as exc:
        raise ChannelError(f"mail server answered {exc.smtp_code}",
                           retryable=exc.smtp_code < 500) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise ChannelError(f"mail server unreachable: {_short(exc)}", retryable=True) from None


# -- apprise ------------------------------------------------------------------------------------

def send_apprise(url: str, payload: dict[str, Any]) -> None:
    """Hand the alert to Apprise, which knows chat, SMS gateways and many other services."""
    import apprise

    notifier = apprise.Apprise()
    if not notifier.add(url):
        raise ChannelError(f"no channel understands the {scheme_of(url)!r} URL scheme",
                           retryable=False)
    ok = notifier.notify(body=str(payload.get("text", "")),
                         title=str(payload.get("subject") or ""))
    if not ok:
        raise ChannelError(f"the {scheme_of(url)!r} service did not accept the alert",
                           retryable=True)


def _short(value: object) -> str:
    text = str(value) or type(value).__name__
    return text.splitlines()[0][:200]
