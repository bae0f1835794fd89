"""The classic ``-host A B C`` spelling of ``tasync send``, turned into what click parses.

Its own module, with nothing to import, because ``tasync`` runs it on every command line
before it knows which command's module it needs.
"""

from __future__ import annotations

_HOST_FLAGS = ("-host", "--host")
#: Options that may come before the command word and take a value of their own.
_VALUE_OPTIONS = ("--broker", "--connect-timeout")


def _after_command_word(argv: list[str], word: str) -> int | None:
    """The index after the command word when that word is ``word``, else None."""
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        index += 2 if argv[index] in _VALUE_OPTIONS else 1
    if index < len(argv) and argv[index] == word:
        return index + 1
    return None


def normalise_host_args(argv: list[str]) -> list[str]:
    """Rewrite the classic ``-host A B C`` of ``tasync send`` into repeated ``--host``.

    Only a ``send`` command line changes (its first word is the command), so other commands
    keep their own options even when a value happens to be the word ``send``
    (``tasync config set route send --host a``); ``--`` ends the rewriting. ``-host=A,B``
    becomes ``--host=A,B``.
    """
    start = _after_command_word(argv, "send")
    if start is None:
        return list(argv)
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
