"""The seed's ``-host A B C`` spelling of ``tasync send``, turned into what click parses.

Its own module, with nothing to import, because ``tasync`` runs it on every command line
before it knows which command's module it needs.
"""

from __future__ import annotations

_HOST_FLAGS = ("-host", "--host")


def normalise_host_args(argv: list[str]) -> list[str]:
    """Rewrite the seed's ``-host A B C`` (after the ``send`` word) into repeated ``--host``.

    Only arguments after ``send`` change, so other commands keep their own options, and
    ``--`` ends the rewriting. ``-host=A,B`` becomes ``--host=A,B``.
    """
    if "send" not in argv:
        return list(argv)
    start = argv.index("send") + 1
    out = list(argv[:start])
    index = start
    while index < len(argv):
        token = argv[index]
        index += 1
        if token == "--":
            out.extend(argv[index - 1:])
            break
        if token.startswith("-host="):
            out.append("-" + token)
            continue
        if token not in _HOST_FLAGS:
            out.append(token)
            continue
        words = []
        while index < len(argv) and not argv[index].startswith("-"):
            words.append(argv[index])
            index += 1
        if not words:
            out.append("--host")
        for word in words:
            out += ["--host", word]
    return out
