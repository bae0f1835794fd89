"""Reading the documents: fenced blocks, console sessions and the commands they contain.

``tests/test_docs.py`` holds the documents to the code; this module only parses Markdown, so
the rules of what is checked stay in one place and the parsing can be read on its own. The
fence markers are described in ``tests/test_docs.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from tests.cli_contract import ROOT, commands_in, logical_lines

DOCS = ROOT / "docs"
#: Documents written with the markers above; every command in them is checked.
OWN_DOCS = ["operations.md", "security.md", "configuration.md", "integrations.md",
            "console.md"]
#: Other documents: only their shell blocks are checked.
OTHER_DOCS = ["../README.md", "architecture.md"]
#: Wrapper scripts the documents define, and the command each runs.
ALIASES = {"tasync-send": ["tasync", "send"]}
SHELL_INFO = {"console", "sh", "bash", "shell"}
_FENCE = re.compile(r"^(```+|~~~+)\s*(.*)$")
SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


@dataclass
class Block:
    """One fenced code block."""

    doc: str
    line: int
    info: list[str]
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: str) -> list[Block]:
    found: list[Block] = []
    fence: str | None = None
    info: list[str] = []
    start = 0
    body: list[str] = []
    for number, line in enumerate((DOCS / doc).read_text().splitlines(), 1):
        match = _FENCE.match(line.strip())
        if fence is None and match:
            fence, info, start, body = match.group(1), match.group(2).split(), number + 1, []
        elif fence is not None and line.strip() == fence:
            found.append(Block(doc, start, info, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
    return found


def prose(doc: str) -> Iterator[tuple[int, str]]:
    """Lines outside code blocks."""
    inside = False
    for number, line in enumerate((DOCS / doc).read_text().splitlines(), 1):
        if _FENCE.match(line.strip()):
            inside = not inside
        elif not inside:
            yield number, line


@dataclass
class Step:
    """One ``$`` command of a console block, its line and the output shown after it."""

    line: int
    command: str
    expected: list[str]


def session(block: Block) -> list[Step]:
    steps: list[Step] = []
    lines = block.text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.startswith("$ "):
            if steps:
                steps[-1].expected.append(line)
            continue
        step = Step(block.line + index - 1, line[2:], [])
        while step.command.endswith("\\") and index < len(lines):
            step.command = step.command[:-1] + " " + lines[index].strip()
            index += 1
        steps.append(step)
    return steps


def shell_lines(block: Block) -> Iterator[tuple[int, str]]:
    """The shell commands of a block, with their line numbers."""
    if block.info[0] == "console":
        for step in session(block):
            yield step.line, step.command
        return
    for number, line in logical_lines(block.text):
        if line.strip() and not line.lstrip().startswith("#"):
            yield block.line + number - 1, line


def command_occurrences() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` for every command line in the documents.

    ``where`` ends in ``!`` for the commands of offline examples, which may be wrong on
    purpose (they show the error message).
    """
    found: list[tuple[str, list[str]]] = []
    for doc in OWN_DOCS + OTHER_DOCS:
        for block in blocks(doc):
            if not block.info:
                continue
            kind = block.info[0]
            mark = "!" if "offline" in block.info else ""
            if kind in SHELL_INFO:
                for number, line in shell_lines(block):
                    for argv in commands_in(line, aliases=ALIASES):
                        found.append((f"{doc}:{number}{mark}", argv))
            elif kind == "text" and doc in OWN_DOCS and not _is_file_block(block):
                for number, line in logical_lines(block.text):
                    for argv in commands_in(line, loose=True, aliases=ALIASES):
                        found.append((f"{doc}:{block.line + number - 1}", argv))
    return found


def _is_file_block(block: Block) -> bool:
    return any(word.startswith("file=") for word in block.info)
