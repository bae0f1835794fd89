"""The console's users: a file of names, roles and argon2 password hashes.

One user per line, ``NAME:ROLE:HASH`` (an argon2id hash in its PHC form, which holds no
colon); lines starting with ``#`` and blank lines are ignored. The file is read again whenever
it changes, so ``tasync console add-user`` (or removing a line) takes effect on the running
console at the next request: a removed user's sessions end, a changed role applies at once.

Why argon2 through argon2-cffi: it is the password hash recommended today (memory-hard, so
guessing on GPUs is expensive), and argon2-cffi is the maintained binding of the reference
implementation. A login by an unknown name is checked against a dummy hash, so the answer
takes as long as for a known name and does not tell which names exist.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from tasync.broker.errors import ConfigError

#: Roles from least to most allowed: each may do what the ones before it may.
ROLES = ("viewer", "operator", "admin")
USER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
#: Shorter passwords are refused by ``add-user``: a console reaches the whole network.
MIN_PASSWORD_CHARS = 8
#: Concurrent hash checks: each takes 64 MiB and tens of milliseconds of a core, so a burst of
#: logins queues instead of exhausting the machine.
_VERIFY_SLOTS = threading.BoundedSemaphore(2)


@dataclass(frozen=True)
class User:
    """A console user: a name and a role (one of ``ROLES``)."""

    name: str
    role: str

    def may(self, role: str) -> bool:
        """Whether this user has ``role`` or a role above it."""
        return ROLES.index(self.role) >= ROLES.index(role)


class UsersFile:
    """The users file of a running console, read again when it changes on disk.

    Args:
        path: the file (``NAME:ROLE:HASH`` lines).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hasher = PasswordHasher()
        self._dummy = self._hasher.hash("not a password of anyone")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, tuple[User, str]] = {}
        self._load()

    def get(self, name: str) -> User | None:
        """The user called ``name`` as the file says now, or None."""
        entry = self._load().get(name)
        return entry[0] if entry else None

    def count(self) -> int:
        """How many users the file holds."""
        return len(self._load())

    def verify(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs, else None (same work whether or not they exist)."""
        entry = self._load().get(name)
        stored = entry[1] if entry else self._dummy
        with _VERIFY_SLOTS:
            try:
                self._hasher.verify(stored, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return None
        return entry[0] if entry else None

    def _load(self) -> dict[str, tuple[User, str]]:
        try:
            info = self.path.stat()
        except OSError as exc:
            raise ConfigError(f"cannot read the users file {self.path}: {exc.strerror}") from None
        stamp = (info.st_mtime_ns, info.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._users = parse(self.path.read_text(encoding="utf-8"), where=str(self.path))
                self._stamp = stamp
            return self._users


def parse(text: str, *, where: str) -> dict[str, tuple[User, str]]:
    """The users of a users file's text: name -> (user, hash).

    Raises:
        ConfigError: a line is not ``NAME:ROLE:HASH`` with a known role (its number is named;
            the line itself is not quoted, as it holds a hash).
    """
    users: dict[str, tuple[User, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(":")
        if (len(parts) != 3 or not USER_NAME_RE.fullmatch(parts[0]) or parts[1] not in ROLES
                or not parts[2].startswith("$argon2")):
            raise ConfigError(f"{where}: line {number} is not NAME:ROLE:ARGON2-HASH with a role "
                              f"of {', '.join(ROLES)}")
        users[parts[0]] = (User(parts[0], parts[1]), parts[2])
    return users


def add_user(path: Path, name: str, role: str, password: str) -> bool:
    """Add ``name`` with ``role`` and a hash of ``password``, or replace it; True if new.

    The file is written whole to a temporary file and renamed over the old one, readable by
    its owner only, so a running console never reads half a file.

    Raises:
        ConfigError: a bad name or role, a short password, or an unreadable file.
    """
    if not USER_NAME_RE.fullmatch(name):
        raise ConfigError("a user name is 1 to 64 letters, digits and _ . @ -, starting with a "
                          "letter or digit")
    if role not in ROLES:
        raise ConfigError(f"unknown role; roles are {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD_CHARS:
        raise ConfigError(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    users = parse(text, where=str(path))
    line = f"{name}:{role}:{PasswordHasher().hash(password)}"
    kept = [ln for ln in text.splitlines() if ln.strip().split(":", 1)[0] != name]
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("\n".join([*kept, line]) + "\n")
    os.replace(temporary, path)
    return name not in users
