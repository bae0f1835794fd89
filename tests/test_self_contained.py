"""Code, comments and docs stand on their own: no pointer to a text outside the repository.

A reader who meets "see design section 6" or "issue 4" in a docstring has nowhere to go; what a
reader needs belongs in ``docs/``. The check reads every tracked text file of the project.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Phrases that point outside the repository: a design text's sections, guarantees by number,
#: numbered issues, and the product sheet the project descends from.
OUTSIDE = re.compile(
    r"design\s+(section|§)|design\.md|§\s?\d|guarantee\s+\d"
    r"|\bissues?\s+#?\d+(\s*(,|and)\s*\d+)*|\bthe seed\b|seed's",
    re.IGNORECASE)

TEXT = {".py", ".md", ".toml", ".yml", ".yaml", ".service", ".timer", ".sh", ".cfg", ".txt",
        ".html", ".css", ".js"}


def tracked_text_files() -> list[Path]:
    listing = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    return [ROOT / name for name in listing
            if Path(name).suffix in TEXT and name != "tests/test_self_contained.py"]


def test_no_pointer_to_a_text_outside_the_repository() -> None:
    files = tracked_text_files()
    assert len(files) > 50  # the listing worked
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in files
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if OUTSIDE.search(line)]
    assert not found, "\n".join(found)
