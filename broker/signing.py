"""HMAC-SHA256 over every change and alert with a cluster key.

The broker proves who published a message (its validated ``user_id``); the HMAC proves that the
body was made by a holder of the cluster key and not altered on the way, including by someone
with access to a queue but not to the key file.

Key file format (one place to learn it, ``KeyRing.generate`` writes it)::

    # tasync cluster key; keep it readable by the tasync user only
    k20250101-090000-3fa9c1:9f2c...64+ hex...   <- first key: signs and verifies
    k20240601-120000-77b0e2:01ab...             <- older keys: still verify (rotation)

Each line is ``KEY_ID:SECRET``. The secret is hex (at least 64 digits, i.e. 32 bytes): hex
survives copy and paste, has no padding or alphabet variants, and is what ``openssl rand -hex 32``
prints. A key id is 1-32 of ``A-Z a-z 0-9 _ . -``. ``#`` starts a comment.

Rotation (docs/operations.md): add the new key as second line everywhere, then put it first,
then drop the old line, each round on every node before the next. Messages signed with either
key verify throughout, and the key id in each signature says which key made it.

This module is pure: it never decides what happens when no key file is configured; callers do.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tasync.broker.errors import ConfigError, MessageError

#: The AMQP header that carries ``KeyRing.sign(body)`` on every change batch, epoch mark and
#: alert. One name for every producer and consumer: a receiver looking under another name
#: would see every message as unsigned and quarantine the whole network's traffic.
SIGNATURE_HEADER = "tasync-sig"
#: The AMQP header in which an alert's sender states its host name (``telalert.hosts``).
SENDER_HEADER = "x-tasync-sender"

MIN_SECRET_BYTES = 32
"""Shorter secrets are refused: HMAC-SHA256 is only as strong as its key."""

_KEY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})+")
_MAC_RE = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, repr=False)
class KeyRing:
    """The cluster keys: the first one signs, any of them verifies.

    ``repr`` and ``str`` show key ids only, so a ring may appear in logs and tracebacks.

    Attributes:
        keys: ``(key_id, secret)`` pairs; the first signs, all verify.
    """

    keys: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("a key ring needs at least one key")
        seen: set[str] = set()
        for key_id, secret in self.keys:
            if not _KEY_ID_RE.fullmatch(key_id):
                raise ConfigError(f"invalid key id {key_id!r} (1-32 of A-Z a-z 0-9 _ . -)")
            if key_id in seen:
                raise ConfigError(f"duplicate key id {key_id!r}")
            if len(secret) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"key {key_id!r} is {len(secret)} bytes; at least {MIN_SECRET_BYTES} needed"
                )
            seen.add(key_id)

    def __repr__(self) -> str:
        return f"KeyRing(key_ids={self.key_ids!r})"

    __str__ = __repr__

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id, the signing one first."""
        return tuple(key_id for key_id, _ in self.keys)

    @property
    def signing_key_id(self) -> str:
        """The id of the key that ``sign`` uses."""
        return self.keys[0][0]

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> KeyRing:
        """Parse key-file text.

        Raises:
            ConfigError: naming ``source`` and the line, never echoing a secret.
        """
        keys: list[tuple[str, bytes]] = []
        for line_no, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            key_id, sep, secret_hex = (part.strip() for part in line.partition(":"))
            if not sep or not _KEY_ID_RE.fullmatch(key_id):
                raise ConfigError(f"{source}, line {line_no}: expected KEY_ID:HEX_SECRET")
            if not _HEX_RE.fullmatch(secret_hex):
                raise ConfigError(
                    f"{source}, line {line_no}: secret of {key_id!r} is not an even number of "
                    "hex digits"
                )
            try:
                cls(((key_id, bytes.fromhex(secret_hex)),))  # per-line checks, with a line number
            except ConfigError as exc:
                raise ConfigError(f"{source}, line {line_no}: {exc}") from None
            if key_id in dict(keys):
                raise ConfigError(f"{source}, line {line_no}: duplicate key id {key_id!r}")
            keys.append((key_id, bytes.fromhex(secret_hex)))
        if not keys:
            raise ConfigError(f"{source}: no key found")
        return cls(tuple(keys))

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        """Read a key file. Unlike an allow-list, a missing key file is an error.

        Raises:
            ConfigError: if the file is missing, unreadable or invalid.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from Windows editors
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read cluster key file {path}: {exc}") from exc
        return cls.parse(text, str(path))

    @staticmethod
    def generate(key_id: str | None = None) -> str:
        """Text for a fresh key file with one random 32-byte key (see ``new_key_line``)."""
        return (
            "# tasync cluster key file: KEY_ID:HEX_SECRET, first line signs, all lines verify.\n"
            "# Keep it readable by the tasync user only (chmod 600).\n"
            f"{new_key_line(key_id)}\n"
        )

    def sign(self, body: bytes) -> str:
        """Sign ``body`` with the first key; returns ``"<key_id>:<hex hmac-sha256>"``."""
        key_id, secret = self.keys[0]
        return f"{key_id}:{_mac(secret, body)}"

    def verify(self, body: bytes, signature: object) -> None:
        """Check that ``signature`` is a valid signature of ``body`` by one of the keys.

        ``signature`` is whatever the message's header held: a sender controls its type too,
        so anything but a string is malformed rather than an error of the receiver.

        Raises:
            MessageError: ``missing signature``, ``malformed signature``,
                ``unknown key id 'k1'`` or ``bad signature``; consumers quarantine with it.
        """
        if signature is None or signature == "":
            raise MessageError("missing signature")
        if not isinstance(signature, str):
            raise MessageError(f"malformed signature (a {type(signature).__name__}, expected "
                               "KEY_ID:64 hex digits)")
        key_id, _, mac = signature.partition(":")
        if not _KEY_ID_RE.fullmatch(key_id) or not _MAC_RE.fullmatch(mac):
            raise MessageError("malformed signature (expected KEY_ID:64 hex digits)")
        secret = dict(self.keys).get(key_id)
        if secret is None:
            raise MessageError(f"unknown key id {key_id!r}")
        if not hmac.compare_digest(_mac(secret, body), mac.lower()):
            raise MessageError("bad signature")


def new_key_id() -> str:
    """``k`` + the UTC date and time + 6 random hex digits: ``k20260131-140502-3fa9c1``.

    Ids sort by creation, and two keys made in the same second (two rotations in a row, or
    two hosts) still differ: a date alone collided on the second rotation of a day, and a
    file with one id twice is refused.
    """
    return f"k{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def new_key_line(key_id: str | None = None) -> str:
    """One key-file line ``KEY_ID:SECRET`` with a fresh random 32-byte secret.

    Args:
        key_id: the id to use; by default ``new_key_id()``.
    """
    key_id = key_id or new_key_id()
    if not _KEY_ID_RE.fullmatch(key_id):
        raise ConfigError(f"invalid key id {key_id!r} (1-32 of A-Z a-z 0-9 _ . -)")
    return f"{key_id}:{secrets.token_hex(MIN_SECRET_BYTES)}"


def _mac(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()

