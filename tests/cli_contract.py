"""Checking command lines written outside the code (docs, compose, systemd) against the code.

A command line is parsed by the real click command it names, exactly as a user's shell would
hand it over, so a renamed option, a dropped command or a bad choice value in a document is a
test failure instead of a surprise for the operator who copies it.

``PENDING_OPTIONS`` lists options the documents describe but the tree does not have yet
(features being built in parallel); a line that fails only because of one of those is reported
as an expected failure naming the option, so it shows up in every test summary until the
feature lands, while the rest of the line is still checked.
"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import click

ROOT = Path(__file__).resolve().parent.parent

#: Options the docs and compose use that the named command does not have yet, with the click
#: command that already implements them where one exists (the line must parse with it
#: meanwhile). Remove an entry when it lands; ``test_pending_lists_are_not_stale`` says when.
PENDING_OPTIONS: dict[str, dict[str, str | None]] = {}

_SHELL_OPERATORS = re.compile(r"^[|&;<>()]+$")
_PATH_MISSING = re.compile(r"does not exist", re.IGNORECASE)


def console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: script name -> ``module:attribute``."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts: dict[str, str] = data["project"]["scripts"]
    return scripts


def load_object(spec: str) -> Any:
    """Import ``module:attribute``."""
    module_name, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def root_command(script: str) -> click.Command:
    """The click command behind a console script.

    ``tasync`` points at a ``main`` function that pre-processes argv (the classic ``-host``
    form) before handing it to the ``cli`` group of the same module; other scripts point at
    a click command directly.
    """
    target = load_object(console_scripts()[script])
    if isinstance(target, click.Command):
        return target
    module = importlib.import_module(console_scripts()[script].partition(":")[0])
    group = getattr(module, "cli", None)
    if not isinstance(group, click.Command):
        raise AssertionError(f"{script}: cannot find the click command of {target!r}")
    return group


def normalise(argv: list[str]) -> list[str]:
    """What ``tasync``'s ``main`` does to argv before click sees it (``-host A B``).

    ``argv`` starts with the script's name, as a documented command line does.
    """
    from tasync.host_args import normalise_host_args

    if argv and argv[0] == "tasync":
        return [argv[0], *normalise_host_args(list(argv[1:]))]
    return list(argv)


@dataclass
class Verdict:
    """The outcome of checking one command line.

    Attributes:
        path: the command path, e.g. ``tasync config set``.
        error: what is wrong, or None.
        pending: set when the line fails only because of a ``PENDING_*`` item.
        params: the parsed parameters (when parsing got that far).
    """

    path: str
    error: str | None = None
    pending: str | None = None
    params: dict[str, Any] | None = None


class Resolved(NamedTuple):
    """Where a command line leads: its command path and click command (None: no such
    command), the arguments left for it, and the context of the group above it."""

    path: str
    command: click.Command | None
    args: list[str]
    parent: click.Context | None


def resolve(argv: list[str]) -> Resolved:
    """Walk groups to the leaf command, with contexts chained as click chains them.

    The chain matters: a subcommand inherits settings such as ``-h`` for help from its
    parent's context, and click caches each command's help option on first use, so a context
    built without its parent would also change what later ``--help`` output shows.
    """
    script = argv[0]
    command: click.Command = root_command(script)
    path = script
    args = argv[1:]
    parent: click.Context | None = None
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        word = args[0]
        ctx = command.make_context(path.rsplit(" ", 1)[-1], [], parent=parent,
                                   resilient_parsing=True)
        sub = command.get_command(ctx, word)
        path = f"{path} {word}"
        args = args[1:]
        parent = ctx
        if sub is None:
            return Resolved(path, None, args, parent)
        command = sub
    return Resolved(path, command, args, parent)


def check_argv(argv: list[str]) -> Verdict:
    """Parse ``argv`` (``[script, ...]``) with the real click command, without running it."""
    path, command, args, parent = resolve(normalise(argv))
    if command is None:
        return Verdict(path, error=f"`{path}` is not a command")
    return _parse(path, command, args, parent)


def _parse(path: str, command: click.Command, args: list[str],
           parent: click.Context | None) -> Verdict:
    if any(a in ("-h", "--help") for a in args):
        names = {n for p in command.params for n in (*p.opts, *p.secondary_opts)}
        unknown = [a for a in args if a.startswith("-") and a.split("=")[0] not in names
                   and a not in ("-h", "--help")]
        if unknown:
            return _option_error(path, command, unknown[0], args, parent)
        return Verdict(path, params={})
    try:
        ctx = command.make_context(path.rsplit(" ", 1)[-1], list(args), parent=parent)
    except click.NoSuchOption as exc:
        return _option_error(path, command, exc.option_name, args, parent)
    except click.BadParameter as exc:
        if _PATH_MISSING.search(exc.format_message()):  # a path that exists on the user's host
            return Verdict(path, params={})
        return Verdict(path, error=f"{path}: {exc.format_message()}")
    except click.UsageError as exc:
        return Verdict(path, error=f"{path}: {exc.format_message()}")
    except click.exceptions.Exit:
        return Verdict(path, params={})
    return Verdict(path, params=dict(ctx.params))


def _option_error(path: str, command: click.Command, option: str, args: list[str],
                  parent: click.Context | None) -> Verdict:
    error = f"{path}: no such option {option}"
    options = PENDING_OPTIONS.get(path, {})
    if option not in options:
        return Verdict(path, error=error)
    spec = options[option]
    if spec is not None:  # the implementation waiting to be wired: the line must parse with it
        later = _parse(path, load_object(spec), args, parent)
    else:  # the rest of the line must parse without the pending option
        later = _parse(path, command, _without(option, args), parent)
    if later.error and later.pending is None:
        return later
    return Verdict(path, error=error, pending=f"{path} {option} is not in the CLI yet")


def _without(option: str, args: list[str]) -> list[str]:
    """``args`` without ``option`` and its value (a following word not starting with ``-``;
    every pending option so far takes a value)."""
    out: list[str] = []
    skip = False
    for index, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == option:
            nxt = args[index + 1] if index + 1 < len(args) else "-"
            skip = not nxt.startswith("-")
            continue
        if not arg.startswith(option + "="):
            out.append(arg)
    return out


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` with backslash continuations joined, as a shell reads them."""
    pending: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1])
            continue
        pending.append(line)
        yield start, " ".join(pending)
        pending = []
    if pending:
        yield start, " ".join(pending)


_VALUE_OPTIONS = {"-u", "-g", "-e", "-w", "-f", "-p", "-C", "-n", "--user", "--env",
                  "--workdir", "--file", "--project-name", "--env-file"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _drop_options(words: list[str]) -> list[str]:
    """Drop leading options (and the values of those that take one) and assignments."""
    while words and (words[0].startswith("-") or _ASSIGNMENT.match(words[0])):
        takes_value = words[0] in _VALUE_OPTIONS
        words = words[2:] if takes_value else words[1:]
    return words


def _unwrap(words: list[str], program: Callable[[str], list[str] | None]) -> list[str] | None:
    """The console-script command a simple command runs, through sudo, env, docker exec..."""
    while words:
        head = words[0]
        found = program(head)
        if found:
            return [*found, *words[1:]]
        if _ASSIGNMENT.match(head):
            words = words[1:]
        elif head in ("sudo", "env", "nice", "nohup", "exec", "time", "command"):
            words = _drop_options(words[1:])
        elif head in ("docker", "podman"):
            verbs = [i for i, w in enumerate(words) if w in ("exec", "run")]
            if not verbs:
                return None
            words = _drop_options(words[verbs[0] + 1:])[1:]  # then the service or container
        else:
            return None
    return None


def commands_in(line: str, *, loose: bool = False,
                aliases: dict[str, list[str]] | None = None) -> Iterator[list[str]]:
    """Each command of one shell line that runs a console script, as argv from the script on.

    A command is a simple command (the words between shell operators: pipes, redirections,
    ``&&``, ``;``, ``&``) whose program is a console script, also behind ``sudo``, ``env``,
    ``exec``, ``docker compose exec SERVICE`` and the like. ``loose`` (for configuration files
    that embed a command, such as a Nagios ``command_line``) starts a command at any path to a
    console script in a ``bin`` directory (a bare word there is more often a user or a name).
    ``aliases`` maps wrapper scripts a document defines to the command they run
    (``{"tasync-send": ["tasync", "send"]}``). A forwarded ``"$@"`` is dropped.
    """
    scripts = {name: [name] for name in console_scripts()} | (aliases or {})

    def program(word: str) -> list[str] | None:
        # A bare name, or a path into a bin directory: not /etc/tasync, not a URL's path.
        if "/" in word and (Path(word).parent.name != "bin" or "://" in word):
            return None
        return scripts.get(Path(word).name)

    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    simple: list[list[str]] = [[]]
    for token in lexer:
        if _SHELL_OPERATORS.match(token):
            simple.append([])
        elif token not in ("$@", "$*"):
            simple[-1].append(token)
    for words in simple:
        if loose:
            starts = [i for i, w in enumerate(words) if "/" in w and program(w)]
            if starts:
                yield [*(program(words[starts[0]]) or []), *words[starts[0] + 1:]]
            continue
        command = _unwrap(words, program)
        if command is not None:
            yield command
