"""``tasync hosts check FILE``: validate an allow-list file and explain what it allows."""

from __future__ import annotations

from pathlib import Path

import click

from tasync.broker.allowlist import AllowList
from tasync.options import json_option, print_json


@click.group()
def hosts() -> None:
    """Allow-list files: tasync.hosts, telaconf.hosts, telalert.hosts.

    \b
    Examples:
      tasync hosts check /etc/tasync/tasync.hosts --who b
    """


@hosts.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--who", "identities", multiple=True, metavar="NAME|IP",
              help="Also say whether this node, host or address is allowed (repeat).")
@json_option
def hosts_check(*, file: Path, identities: tuple[str, ...], as_json: bool) -> None:
    """Validate FILE, list its rules in order, and decide for --who identities.

    \b
    Format: one entry a line: a node name (globs like node-* work), a host name, an IP
    address or a CIDR network; '#' starts a comment; '!' denies; the first matching
    line wins; no match means denied. A missing file allows nobody.
    \b
    Examples:
      tasync hosts check /etc/tasync/tasync.hosts
      tasync hosts check tasync.hosts --who backup2 --who 10.0.0.7
    """
    allow = AllowList.load(file)
    decisions = {who: allow.check(who) for who in identities}
    if as_json:
        print_json({
            "file": str(file), "entries": len(allow.entries), "rules": allow.explain(),
            "decisions": {w: {"allowed": d.allowed, "reason": d.reason}
                          for w, d in decisions.items()},
        })
    else:
        click.echo(f"{file}: {len(allow.entries)} entries, valid")
        for line in allow.explain():
            click.echo(f"  {line}")
        for who, decision in decisions.items():
            click.echo(f"{who}: {'allowed' if decision.allowed else 'denied'} ({decision.reason})")
    if any(not d.allowed for d in decisions.values()):
        raise SystemExit(1)
