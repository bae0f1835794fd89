"""Render docs/reliability.md's tables and the soak plot from the recorded fault and soak runs.

    python -m tests.faults.report            # rewrite the tables and docs/img/soak-memory.png
    python -m tests.faults.report --print    # print the tables instead

The document's prose is written by hand; only the text between the ``<!-- faults:begin -->`` /
``<!-- faults:end -->`` and ``<!-- soak:begin -->`` / ``<!-- soak:end -->`` markers is generated.
The fault table shows the newest run of every test in ``tests/faults/runs/faults.json``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from tests.faults import results

DOC = results.REPO / "docs" / "reliability.md"
PLOT = results.REPO / "docs" / "img" / "soak-memory.png"
HEADER = ("| fault | load held: changes committed / tried (during fault) | alerts confirmed / "
          "tried (during fault) | changes lost | alerts lost | duplicates | time to recover "
          "| longest stall: changes / alerts | result |")


def _cell(value: Any, unit: str = "") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def _during(row: dict[str, Any], key: str) -> str:
    """`` (N)``: successes while a fault was in place; runs before windows were kept: none."""
    if row["test"] == "test_soak" and "fault_windows" not in row:
        return ""  # counted only the last fault's window then; the soak section has the rest
    return f" ({row[key]})"


def fault_row(row: dict[str, Any]) -> str:
    """One table line for one run."""
    changes = (f"{row['changes_committed']} / {row['changes_tried']}"
               f"{_during(row, 'changes_committed_during_fault')}")
    if row.get("alert_load"):
        alerts = (f"{row['alerts_confirmed']} / {row['alerts_tried']}"
                  f"{_during(row, 'alerts_confirmed_during_fault')}")
        lost, dups = str(row["alerts_lost"]), str(row["alert_duplicates"])
    else:
        alerts, lost, dups = "alert load off", "n/a", "n/a"
    stall = (f"{_cell(row['max_change_stall_s'], ' s')} / "
             f"{_cell(row.get('max_alert_stall_s'), ' s')}")
    verdict = "pass" if row["passed"] else "FAIL: " + "; ".join(row["problems"])[:200]
    return (f"| {row['fault']} | {changes} | {alerts} | {row['changes_lost']} | {lost} | {dups} "
            f"| {_cell(row['recover_s'], ' s')} | {stall} | {verdict} |")


def fault_table(rows: list[dict[str, Any]]) -> str:
    """The newest run of each test, in the order the tests first appeared."""
    newest: dict[str, dict[str, Any]] = {}
    for row in rows:
        newest.pop(row["test"], None)
        newest[row["test"]] = row
    ordered = sorted(newest.values(), key=lambda r: r["test"] == "test_soak")
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ")]
    lines += [fault_row(row) for row in ordered]
    when = max((r["when"] for r in ordered), default="never")
    notes = sorted({n for r in ordered for n in r.get("notes", [])})
    lines += ["", f"Newest run: {when} (UTC). {len(rows)} runs recorded in "
              "`tests/faults/runs/faults.json`."]
    lines += [f"Note: {note}." for note in notes]
    return "\n".join(lines)


def soak_section(soak: dict[str, Any] | None) -> str:
    """Per-worker memory after warm-up and at the end of the soak, and the run's parameters."""
    if not soak:
        return "No soak run recorded yet (`pytest tests/faults/test_soak.py -m soak`)."
    summary = soak["summary"]
    lines = [
        f"Soak of {soak['duration_s'] / 60:.0f} min on {soak['when']} (UTC): "
        f"{soak['alert_rate']:g} alerts/s and {soak['change_rate']:g} changes/s offered, "
        f"{len(soak['faults'])} faults ({', '.join(f['fault'] for f in soak['faults'])}).",
        "",
        "| worker | RSS after warm-up | RSS at end | peak | trend after warm-up |",
        "|---|---|---|---|---|",
    ]
    for name, item in sorted(summary.items()):
        lines.append(f"| {name} | {item['warm_mb']:.1f} MB | {item['end_mb']:.1f} MB | "
                     f"{item['peak_mb']:.1f} MB | {item['slope_mb_per_min']:+.2f} MB/min |")
    if any("recover_s" in f for f in soak["faults"]):
        lines += ["", "| minute | fault | fault held for | time to recover |", "|---|---|---|---|"]
        lines += [f"| {f['t'] / 60:.1f} | {f['fault']} | {f['fault_s']} s | {f['recover_s']} s |"
                  for f in soak["faults"]]
    row = soak.get("row")
    if row:
        lines += ["", f"Load over the whole soak: {row['changes_committed']} of "
                  f"{row['changes_tried']} changes committed, {row['alerts_confirmed']} of "
                  f"{row['alerts_tried']} alerts confirmed; changes lost {row['changes_lost']}, "
                  f"alerts lost {row['alerts_lost']}, duplicates {row['alert_duplicates']}, "
                  f"workers restarted: {len(row['workers_restarted'])}."]
    lines += ["", "![worker memory during the soak](img/soak-memory.png)"]
    return "\n".join(lines)


def plot_soak(data: dict[str, Any], path: Path = PLOT) -> None:
    """RSS per worker over time, faults as vertical lines, warm-up shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    samples = data["samples"]
    for name in data["workers"]:
        ax.plot([s["t"] / 60 for s in samples], [s.get(name) for s in samples], label=name)
    ax.axvspan(0, data["warm_s"] / 60, color="0.9", label="warm-up")
    for i, fault in enumerate(data["faults"]):
        ax.axvline(fault["t"] / 60, color="0.5", linestyle=":",
                   label="fault" if i == 0 else None)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"tasync workers during a {data['duration_s'] / 60:.0f}-minute soak "
                 f"({data['alert_rate']:g} alerts/s, {data['change_rate']:g} changes/s)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def replace_between(text: str, name: str, body: str) -> str:
    """Put BODY between the ``<!-- name:begin -->`` and ``<!-- name:end -->`` markers."""
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(\n<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC}: markers <!-- {name}:begin/end --> not found")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print instead of writing")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    table = fault_table(results.load_rows())
    data = results.load_soak()
    soak = soak_section(data)
    if args.print:
        print(table + "\n\n" + soak)
        return
    if data:
        plot_soak(data)
        print(f"wrote {PLOT}")
    text = args.doc.read_text()
    text = replace_between(replace_between(text, "faults", table), "soak", soak)
    args.doc.write_text(text)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
