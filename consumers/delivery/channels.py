"""Delivery channels: one function per URL scheme, each raising ``AttemptFailed`` on failure.

``file:`` appends one JSON line; ``http(s):`` posts JSON; ``smtp(s):`` and ``mailto:`` send mail
with the standard library; any other scheme goes to Apprise, imported only when first needed
because it loads a hundred plugins and an idle worker must stay small.

``AttemptFailed.retryable`` separates "try again later" (a 503, a refused connection, a full
disk) from "this will never work" (a 404, an unknown scheme, a refused recipient), so the
executor does not spend minutes retrying a typo. Its message carries the status the service
answered (``HTTP 400``, ``SMTP 550``), which the trail records for every failed attempt.
Messages name the destination, never its URL: URLs carry tokens and passwords.

Every channel that knows priorities gets the alert's: mail as ``X-Priority`` and
``Importance``, Apprise as its notify type (``PRIORITY_BANDS``).

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
import email.policy
import json
import logging
import os
import re
import smtplib
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

from tasync.broker.alerts import CONTROL_RE
from tasync.broker.errors import AttemptFailed
from tasync.broker.kinds import is_native_url
from tasync.broker.settings import ENV_SMTP_URL, MailSettings

__all__ = ["ENV_SMTP_URL", "send"]

DEFAULT_TIMEOUT_S = 10.0
_RETRYABLE_HTTP = {408, 425, 429}


@dataclass(frozen=True)
class PriorityBand:
    """How one range of alert priorities is shown by channels that have their own scale."""

    lowest: int
    x_priority: str
    importance: str
    apprise_type: str


#: From the highest priority down; the first band whose ``lowest`` the priority reaches wins.
#: 0-1 show as Apprise's "success": tasync gives resolved notices priority 1, so chat tools
#: colour an all-clear green.
PRIORITY_BANDS = (
    PriorityBand(8, "1 (Highest)", "high", "failure"),
    PriorityBand(6, "2 (High)", "high", "warning"),
    PriorityBand(3, "3 (Normal)", "normal", "info"),
    PriorityBand(2, "4 (Low)", "low", "info"),
    PriorityBand(0, "5 (Lowest)", "low", "success"),
)


def priority_band(priority: Any) -> PriorityBand:
    """The band of an alert's priority (0-9; anything unreadable counts as normal, 5)."""
    value = priority if isinstance(priority, int) and not isinstance(priority, bool) else 5
    return next(b for b in PRIORITY_BANDS if value >= b.lowest or b is PRIORITY_BANDS[-1])


def scheme_of(url: str) -> str:
    """The lower-case scheme of a delivery URL (``mailto`` for both mail forms)."""
    return url.split(":", 1)[0].lower()


def send(url: str, payload: dict[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Deliver ``payload`` (the alert as JSON-able data) to ``url``.

    Raises:
        AttemptFailed: the attempt failed; ``retryable`` says whether to try again.
    """
    scheme = scheme_of(url)
    if not is_native_url(url):
        send_apprise(url, payload, timeout_s=timeout_s)
    elif scheme == "file":
        send_file(url, payload)
    elif scheme in ("http", "https"):
        send_http(url, payload, timeout_s=timeout_s)
    else:
        send_mail(url, payload, timeout_s=timeout_s)


# -- file ---------------------------------------------------------------------------------------

def file_path(url: str) -> str:
    """The local path of a ``file:`` URL; only local files (no host, or ``localhost``)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise AttemptFailed("file URLs must name a local path (file:///path)", retryable=False)
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise AttemptFailed("file URLs need an absolute path (file:///path)", retryable=False)
    return path


#: Payloads as compact UTF-8 JSON, as ``json.dumps(ensure_ascii=False, separators=(",", ":"))``
#: writes them, at a tenth of its cost (the file channel encodes a line per alert).
_LINE_ENCODER = msgspec.json.Encoder()
def send_file(url: str, payload: dict[str, Any]) -> None:
    """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor.

    One write per line keeps lines whole when several nodes on one machine share a file, and
    the line is on disk (in the page cache) before the alert is acknowledged. The file is
    opened for every line, so a rotated (renamed) or removed file is followed at once: a kept
    descriptor would need a ``stat`` of the path before each write to notice, and on Linux
    that costs what opening the file does (about 3 µs against 4.5 µs for open and close;
    ``benchmarks/delivery_path.py``).
    """
    line = _LINE_ENCODER.encode(payload) + b"\n"
    path = file_path(url)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        # A missing directory or a full disk may be fixed by an operator: retry, then dead-letter.
        raise AttemptFailed(f"cannot append to the file: {exc.strerror}", retryable=True) from None
    if written != len(line):
        raise AttemptFailed("short write to the file", retryable=True)


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
        raise AttemptFailed(f"webhook answered HTTP {exc.code}", retryable=retryable) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AttemptFailed(f"webhook unreachable: {_short(reason)}", retryable=True) from None


# -- mail ---------------------------------------------------------------------------------------

def _mail_target(url: str, settings: MailSettings
                 ) -> tuple[str, int, bool, bool, str | None, str | None, list[str], str | None]:
    """``(host, port, implicit_tls, starttls, user, password, recipients, sender)`` of a URL."""
    scheme = scheme_of(url)
    if scheme == "mailto":
        address, _, query = url[len("mailto:"):].partition("?")
        params = parse_qs(query)
        recipients = [unquote(a) for a in address.split(",") if a]
        server = (params.get("smtp") or [settings.smtp_url])[0]
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


def mail_message(payload: dict[str, Any], *, sender: str | None, recipients: list[str],
                 hostname: str) -> EmailMessage:
    """The mail of one alert, by RFC 5322 as the standard library's SMTP policy writes it.

    ``Date`` and ``Message-ID`` are set here because not every MTA adds them; a non-ASCII
    subject becomes an encoded word; ``X-Priority`` (the de-facto scale, 1 highest) and
    ``Importance`` (RFC 2156) carry the alert's priority.

    Raises:
        AttemptFailed: the subject holds a line break or another control character (it would
            start a new header); permanent.
    """
    subject = str(payload.get("subject") or "tasync alert")
    if CONTROL_RE.search(subject):
        raise AttemptFailed("the subject holds a line break or another control character",
                           retryable=False)
    band = priority_band(payload.get("priority"))
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender or f"tasync@{hostname}"
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(idstring=re.sub(r"[^A-Za-z0-9.-]", "-",
                                                      str(payload.get("id")))[:64],
                                       domain=hostname)
    message["X-Priority"] = band.x_priority
    message["Importance"] = band.importance
    message["X-Tasync-Alert-Id"] = str(payload.get("id"))
    message["X-Tasync-Source"] = str(payload.get("source"))
    message.set_content(str(payload.get("text", "")))
    return message


def send_mail(url: str, payload: dict[str, Any], *, timeout_s: float,
              settings: MailSettings | None = None) -> None:
    """Send one mail; 4xx replies and network errors retry, 5xx replies do not.

    The message is serialised here with the SMTP policy (CRLF, no ``>From`` quoting: that
    belongs to mbox files, not to SMTP, where dot-stuffing already protects the body) and
    handed to ``sendmail`` as bytes; ``send_message`` would use the compat32 generator.
    """
    mail = settings or MailSettings.from_env()
    hostname = mail.hostname or socket.gethostname()
    host, port, tls, starttls, user, password, recipients, sender = _mail_target(url, mail)
    if not recipients:
        raise AttemptFailed("mail destination has no recipient (add ?to=...)", retryable=False)
    message = mail_message(payload, sender=sender, recipients=recipients, hostname=hostname)
    data = message.as_bytes(policy=email.policy.SMTP)
    envelope_from = sender or f"tasync@{hostname}"
    try:
        client: smtplib.SMTP = (smtplib.SMTP_SSL(host, port, timeout=timeout_s,
                                                 local_hostname=hostname,
                                                 context=ssl.create_default_context())
                                if tls else smtplib.SMTP(host, port, timeout=timeout_s,
                                                         local_hostname=hostname))
        with client:
            if starttls:
                client.starttls(context=ssl.create_default_context())
            if user:
                client.login(user, password or "")
            client.sendmail(envelope_from, recipients, data)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = sorted({str(code) for code, _ in exc.recipients.values()})
        raise AttemptFailed(f"mail server refused every recipient (SMTP {', '.join(codes)})",
                           retryable=False) from None
    except smtplib.SMTPResponseException as exc:
        raise AttemptFailed(f"mail server answered SMTP {exc.smtp_code}",
                           retryable=exc.smtp_code < 500) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise AttemptFailed(f"mail server unreachable: {_short(exc)}", retryable=True) from None


# -- apprise ------------------------------------------------------------------------------------

_STATUS_RE = re.compile(r"\berror=(\d{3})\b")


class _ThreadLog(logging.Handler):
    """Keeps the ``apprise`` logger's messages of threads that asked for them.

    Apprise answers ``notify()`` with a success flag only (1.x) or a result whose logs hold the
    service's answer (2.x); either way the HTTP status is in a log line (``error=400``). The
    delivery pool runs eight notifications at once, so one shared capture would mix them up:
    each thread collects its own. Apprise 2.x runs the service on a worker thread of its own
    and gives its lines in the result instead.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        lines = getattr(self._local, "lines", None)
        if lines is not None:
            lines.append(record.getMessage())

    @contextmanager
    def collect(self) -> Iterator[list[str]]:
        lines: list[str] = []
        self._local.lines = lines
        try:
            yield lines
        finally:
            self._local.lines = None


_APPRISE_LOG = _ThreadLog()
_apprise_lock = threading.Lock()


def _apprise() -> Any:
    """Apprise, imported on first use (a hundred plugins; idle workers stay small)."""
    import apprise

    with _apprise_lock:
        logger = logging.getLogger("apprise")
        if _APPRISE_LOG not in logger.handlers:
            logger.addHandler(_APPRISE_LOG)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
    return apprise


def _result_lines(result: Any) -> list[str]:
    """Log lines an Apprise 2.x result carries (per service, per attempt); none from 1.x."""
    lines: list[str] = []
    for service in result if hasattr(result, "__iter__") else ():
        for attempt in getattr(service, "attempts", ()):
            lines += [str(getattr(entry, "message", entry)) for entry in attempt]
    return lines


def http_status_in(lines: list[str]) -> int | None:
    """The last HTTP status an Apprise service reported (``... error=404.``), if any."""
    codes = [int(m.group(1)) for line in lines for m in _STATUS_RE.finditer(line)]
    return codes[-1] if codes else None


def send_apprise(url: str, payload: dict[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S
                 ) -> None:
    """Hand the alert to Apprise, which knows chat, SMS gateways and many other services.

    The priority becomes Apprise's notify type; an HTTP 4xx answer (other than 408, 425,
    429) is permanent, like the native webhook's.
    """
    apprise = _apprise()
    notifier = apprise.Apprise()
    if not notifier.add(url):
        raise AttemptFailed(f"no channel understands the {scheme_of(url)!r} URL scheme",
                           retryable=False)
    kind = priority_band(payload.get("priority")).apprise_type
    with _APPRISE_LOG.collect() as lines:
        result = notifier.notify(body=str(payload.get("text", "")),
                                 title=str(payload.get("subject") or ""), notify_type=kind)
    if result:
        return
    status = http_status_in(lines + _result_lines(result))
    if status is None:
        raise AttemptFailed(f"the {scheme_of(url)!r} service did not accept the alert "
                           "(no HTTP status; unreachable?)", retryable=True)
    retryable = status >= 500 or status in _RETRYABLE_HTTP
    raise AttemptFailed(f"the {scheme_of(url)!r} service answered HTTP {status}",
                       retryable=retryable)


def _short(value: object) -> str:
    text = str(value) or type(value).__name__
    return text.splitlines()[0][:200]
