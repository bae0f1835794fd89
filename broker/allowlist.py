"""The one parser for the three allow-list files.

``tasync.hosts`` says who may act as sync master, ``telaconf.hosts`` who may change configuration
and ``telalert.hosts`` who may send alerts. They share one format so an operator learns it
once::

    # one entry a line; '#' starts a comment, blank lines are ignored
    master1              # a node name, host name or broker user
    !backup2             # '!' denies
    node-*               # a name may be a glob: * ? [abc]
    10.0.0.7             # an IPv4 or IPv6 address
    10.1.0.0/16          # a network (host bits must be zero)
    fd00::/8

Rules, chosen so that reading the file top to bottom tells the whole story:

* The first entry, in file order, that matches ANY of the identities given to ``check`` decides;
  a later entry never overrides an earlier one (so put ``!`` exceptions before broad allows).
* No match means denied, and a missing file means nobody: forgetting the file must never open the
  cluster. ``AllowList.single`` expresses the single-master alternative (``--master M``).
* Names match case-insensitively (host names are case-insensitive, and node names follow them),
  with ``fnmatch`` glob syntax. Names only match name identities and addresses only match address
  identities: no DNS lookups happen here, the caller passes every identity it has verified.
  A numeric glob such as ``10.0.0.*`` is rejected in favour of CIDR notation, which is exact.
* Any invalid line is a ``ConfigError`` naming the file and line, rather than a skipped entry:
  a silently ignored ``!`` line would be a hole.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tasync.broker.errors import ConfigError

MASTER_HOSTS_FILE = "tasync.hosts"
"""Who may act as sync master."""
CONFIG_HOSTS_FILE = "telaconf.hosts"
"""Who may change configuration."""
ALERT_HOSTS_FILE = "telalert.hosts"
"""Who may send alerts."""

EntryKind = Literal["name", "ip", "cidr"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAME_RE = re.compile(r"[A-Za-z0-9_.@*?\[\]-]+")
_NUMERIC_GLOB_RE = re.compile(r"(?=.*[0-9])(?=.*\.)(?=.*[*?\[])[0-9.*?\[\]-]+")


@dataclass(frozen=True)
class Entry:
    """One line of an allow-list file.

    Attributes:
        pattern: the entry without its ``!``; normalised (lower-case name, canonical address).
        deny: ``True`` for a ``!`` line.
        line_no: 1-based line in the source; 0 for an entry built in code (``--master``).
        kind: ``name`` (name or glob), ``ip`` (one address) or ``cidr`` (a network).
    """

    pattern: str
    deny: bool
    line_no: int
    kind: EntryKind

    def __str__(self) -> str:
        return ("!" if self.deny else "") + self.pattern

    def matches(self, names: tuple[str, ...], addresses: tuple[IPAddress, ...]) -> bool:
        """Whether this entry matches any of the (already classified, normalised) identities."""
        if self.kind == "name":
            return any(fnmatch.fnmatchcase(name, self.pattern) for name in names)
        if self.kind == "ip":
            return any(str(addr) == self.pattern for addr in addresses)
        network = ipaddress.ip_network(self.pattern)
        return any(addr in network for addr in addresses)


@dataclass(frozen=True)
class Decision:
    """The outcome of ``AllowList.check``, with the line that decided it for the audit trail.

    Attributes:
        allowed: whether the identities may do the guarded thing.
        entry: the deciding entry, or ``None`` when nothing matched (default deny).
        reason: one human sentence, e.g. ``denied by line 3 '!backup2'``.
    """

    allowed: bool
    entry: Entry | None
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


def _parse_token(token: str, deny: bool, line_no: int) -> Entry:
    """Classify one entry; raises ``ValueError`` with the bare reason (the caller adds where)."""
    if "/" in token:
        try:
            network = ipaddress.ip_network(token, strict=True)
        except ValueError as exc:
            raise ValueError(f"invalid network {token!r}: {exc}") from None
        return Entry(str(network), deny, line_no, "cidr")
    if ":" in token or token.replace(".", "").isdigit():
        try:
            address = _normalise_address(ipaddress.ip_address(token))
        except ValueError:
            raise ValueError(f"invalid IP address {token!r}") from None
        return Entry(str(address), deny, line_no, "ip")
    if not _NAME_RE.fullmatch(token):
        raise ValueError(f"invalid name {token!r} (allowed: letters, digits, _ . @ - and * ? [ ])")
    if _NUMERIC_GLOB_RE.fullmatch(token):
        raise ValueError(f"address glob {token!r}: use CIDR notation such as 10.0.0.0/24")
    return Entry(token.lower(), deny, line_no, "name")


def _normalise_address(address: IPAddress) -> IPAddress:
    """Map ``::ffff:a.b.c.d`` to ``a.b.c.d`` so IPv4 entries match dual-stack peers."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _classify(identities: tuple[str | None, ...]) -> tuple[tuple[str, ...], tuple[IPAddress, ...]]:
    """Split identities into lower-cased names and normalised addresses; blanks are dropped."""
    names: list[str] = []
    addresses: list[IPAddress] = []
    for raw in identities:
        identity = (raw or "").strip()
        if not identity:
            continue
        try:
            addresses.append(_normalise_address(ipaddress.ip_address(identity.strip("[]"))))
        except ValueError:
            names.append(identity.lower())
    return tuple(names), tuple(addresses)


@dataclass(frozen=True)
class AllowList:
    """A parsed allow-list: entries in file order, and where they came from.

    Attributes:
        entries: the entries, first match wins.
        source: the file path, ``<text>``, ``--master NAME``, or ``PATH (missing)``.
    """

    entries: tuple[Entry, ...]
    source: str

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> AllowList:
        """Parse allow-list text.

        Raises:
            ConfigError: on the first invalid line, naming ``source`` and the line number.
        """
        entries: list[Entry] = []
        for line_no, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            deny = line.startswith("!")
            token = line[1:].strip() if deny else line
            try:
                if not token:
                    raise ValueError("'!' without a name or address")
                if any(ch.isspace() for ch in token):
                    raise ValueError(f"one entry per line, got {token!r}")
                entries.append(_parse_token(token, deny, line_no))
            except ValueError as exc:
                raise ConfigError(f"{source}, line {line_no}: {exc}") from None
        return cls(tuple(entries), source)

    @classmethod
    def load(cls, path: str | Path) -> AllowList:
        """Read an allow-list file; a missing file yields an empty list, which denies everybody.

        Raises:
            ConfigError: if the file exists but cannot be read or has an invalid line.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from Windows editors
        except FileNotFoundError:
            return cls((), f"{path} (missing)")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read allow-list {path}: {exc}") from exc
        return cls.parse(text, str(path))

    @classmethod
    def single(cls, name: str) -> AllowList:
        """The list that allows exactly one node (``--master M``, no file needed).

        Raises:
            ConfigError: if ``name`` is not a valid name or address.
        """
        try:
            entry = _parse_token(name.strip(), deny=False, line_no=0)
        except ValueError as exc:
            raise ConfigError(f"--master: {exc}") from None
        return cls((entry,), f"--master {name.strip()}")

    def check(self, *identities: str | None) -> Decision:
        """Decide for a peer known by several identities (node name, broker user, IP address).

        ``None`` and blank identities are ignored so callers can pass an optional address as is.
        """
        names, addresses = _classify(identities)
        for entry in self.entries:
            if entry.matches(names, addresses):
                verb = "denied" if entry.deny else "allowed"
                return Decision(not entry.deny, entry, f"{verb} by {self._where(entry)} '{entry}'")
        if not self.entries:
            return Decision(False, None, f"{self.source} has no entries; default deny")
        return Decision(False, None, f"no entry in {self.source} matches; default deny")

    def explain(self) -> list[str]:
        """One human line per entry, for ``tasync hosts check FILE``."""
        if not self.entries:
            return [f"{self.source}: no entries; everybody is denied"]
        what = {"name": "name", "ip": "address", "cidr": "network"}
        lines = []
        for entry in self.entries:
            verb = "deny" if entry.deny else "allow"
            glob = " (glob)" if entry.kind == "name" and _is_glob(entry.pattern) else ""
            lines.append(f"{self._where(entry)}: {verb} {what[entry.kind]} {entry.pattern}{glob}")
        lines.append("anything else: deny")
        return lines

    def _where(self, entry: Entry) -> str:
        return f"line {entry.line_no}" if entry.line_no else self.source


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")
