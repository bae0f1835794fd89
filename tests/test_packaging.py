"""The wheel a user installs holds every module and the console's assets, under ``tasync``.

The folders ``broker/``, ``producers/`` and ``consumers/`` install inside the ``tasync``
package through pyproject.toml's package-dir and an explicit package list: a new subfolder
left out of that list, or a template left out of package-data, would be missing from the
wheel while every test run from the checkout still passes. So the wheel is built here, from a
copy of the sources (the build writes ``build/`` and ``*.egg-info`` beside them) by pip, and read.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Each source folder and where it lands in the wheel.
INSTALLED_AS = {"tasync": "tasync", "broker": "tasync/broker", "producers": "tasync/producers",
                "consumers": "tasync/consumers"}
#: Files of the console that are not Python but must ship.
ASSETS = ("tasync/console/templates", "tasync/console/static")


def _sources() -> set[str]:
    """Every file the wheel must hold, by its path inside the wheel."""
    wanted = set()
    for folder, target in INSTALLED_AS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                wanted.add(f"{target}/{path.relative_to(ROOT / folder).as_posix()}")
    for folder in ASSETS:
        for path in (ROOT / folder).rglob("*"):
            if path.is_file():
                wanted.add(path.relative_to(ROOT).as_posix())
    return wanted


def test_the_wheel_holds_every_module_and_the_console_assets(tmp_path: Path) -> None:
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in (*INSTALLED_AS, "pyproject.toml", "README.md", "LICENSE"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, source / name)
    dist = tmp_path / "dist"
    # pip builds as a user's install does: in isolation, with the build-system's setuptools.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist),
         str(source)], capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("tasync-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_sources() - names)
    assert not missing, f"left out of the wheel: {missing}"
    stray = sorted(n for n in names if n.split("/", 1)[0] in ("broker", "producers",
                                                            "consumers"))
    assert not stray, f"top-level names another distribution could own: {stray[:5]}"
