"""``tasync key``: make cluster keys and check key files, offline.

A rotation adds, promotes and retires a key (docs/operations.md); each step writes a key file
that every node must accept, so ``check`` reads a file exactly as a node would at start.
``generate`` makes ids that never repeat, even for two keys made in the same second, so a
rotation may follow another on the same day.
"""

from __future__ import annotations

from pathlib import Path

import click

from tasync.broker.signing import KeyRing, new_key_line
from tasync.options import json_option, print_json


@click.group()
def key() -> None:
    """Cluster keys: make a new one, check key files.

    \b
    Examples:
      tasync key generate > cluster.key
      tasync key check /etc/tasync/cluster.key
    """


@key.command("generate")
@click.option("--id", "key_id", metavar="ID",
              help="The key id (1-32 of A-Z a-z 0-9 _ . -); default: k, the UTC time and 6 "
                   "random hex digits.")
def key_generate(*, key_id: str | None) -> None:
    """Print a new key-file line, KEY_ID:SECRET, with a random 32-byte secret.

    Write it where only the tasync user can read it (umask 077). The default id sorts by
    creation and never repeats, so a key made minutes after another still differs.

    \b
    Examples:
      (umask 077; tasync key generate > cluster.key)          the first key
      tasync key generate > new.key                           for a rotation
    """
    click.echo(new_key_line(key_id))


@key.command("check")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@json_option
def key_check(*, files: tuple[Path, ...], as_json: bool) -> None:
    """Read each key file as a node would at start; say which key signs and which verify.

    Secrets are never printed, only key ids.

    \b
    Examples:
      tasync key check /etc/tasync/cluster.key
      tasync key check round1.key round2.key round3.key
    Exit status: 1 at the first file a node would refuse (the line and the reason).
    """
    found: dict[str, dict[str, object]] = {}
    for path in files:
        ring = KeyRing.load(path)
        found[str(path)] = {"signs": ring.signing_key_id, "verifies": list(ring.key_ids)}
        if not as_json:
            also = f"; also verifies {', '.join(ring.key_ids[1:])}" if len(ring.key_ids) > 1 \
                else ""
            click.echo(f"{path}: valid, {len(ring.key_ids)} key(s): signs with "
                       f"{ring.signing_key_id}{also}")
    if as_json:
        print_json(found)
