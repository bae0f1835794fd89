"""Run every benchmark in sequence: ``python -m benchmarks [--quick] [--only NAME ...]``.

Each benchmark runs in its own interpreter, one after the other, never side by side: they
compete for the same two cores and the same broker, and each one's numbers assume it had
them to itself (apart from whatever else runs on the machine, which each results file
records). ``--quick`` is handed on to every benchmark; a failing benchmark does not stop the
others, and the exit status says whether all of them finished.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks.common import log

#: In the order they run: the cheapest first, so a broken set-up shows early.
BENCHMARKS = ("recovery", "alerts", "intake", "replication", "console")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (minutes)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only these, of {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    failed = []
    for name in args.only or BENCHMARKS:
        command = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick
                                                                   else [])
        log(f"=== {' '.join(command[1:])}")
        started = time.monotonic()
        code = subprocess.run(command, check=False).returncode
        log(f"=== {name}: exit {code} after {time.monotonic() - started:.0f} s")
        if code:
            failed.append(name)
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
