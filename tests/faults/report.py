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
from tests.faults.soak_memory import POOLS, series, summarize

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


def _pool_cell(key: str, item: dict[str, Any] | None) -> str:
    """``warm -> end (slope/min)`` of one pool; blocks in thousands, the rest in MB."""
    if not item:
        return "n/a"
    if key == "py_blocks":
        return (f"{item['warm'] / 1000:.0f}k -> {item['end'] / 1000:.0f}k "
                f"({item['slope_per_min'] / 1000:+.1f}k/min)")
    return f"{item['warm']:.1f} -> {item['end']:.1f} ({item['slope_per_min']:+.3f}/min)"


def pools_table(summary: dict[str, Any]) -> list[str]:
    """Per worker, each pool after warm-up -> at the end (trend); empty for runs without."""
    if not any(item.get("gauges") for item in summary.values()):
        return []
    lines = ["", "Where the memory is (MB after warm-up -> at the end, trend per minute after "
                 "warm-up; from each worker's metrics endpoint):", "",
             "| worker | " + " | ".join(POOLS.values()) + " |",
             "|---|" + "---|" * len(POOLS)]
    for name, item in sorted(summary.items()):
        gauges = item.get("gauges") or {}
        lines.append(f"| {name} | " + " | ".join(_pool_cell(key, gauges.get(key))
                                                 for key in POOLS) + " |")
    return lines


def soak_section(soak: dict[str, Any] | None) -> str:
    """Per-worker memory after warm-up and at the end of the soak, and the run's parameters."""
    if not soak:
        return "No soak run recorded yet (`pytest tests/faults/test_soak.py -m soak`)."
    summary = summarize(soak["samples"], soak["workers"], soak["warm_s"])
    window = soak.get("dedup_window_s")
    lines = [
        f"Soak of {soak['duration_s'] / 60:.0f} min on {soak['when']} (UTC): "
        f"{soak['alert_rate']:g} alerts/s and {soak['change_rate']:g} changes/s offered, "
        f"{len(soak['faults'])} faults ({', '.join(f['fault'] for f in soak['faults'])})."
        + (f" Duplicate window {window / 60:g} min; warm-up the first "
           f"{soak['warm_s'] / 60:.0f} min." if window else ""),
        "",
        "| worker | RSS after warm-up | RSS at end | peak | trend after warm-up "
        "| trend in the last quarter | trend of RSS minus SQLite after warm-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, item in sorted(summary.items()):
        rest = item["gauges"].get("rss_minus_sqlite_mb")
        rest_cell = f"{rest['slope_per_min']:+.3f} MB/min" if rest else "n/a"
        lines.append(f"| {name} | {item['warm_mb']:.1f} MB | {item['end_mb']:.1f} MB | "
                     f"{item['peak_mb']:.1f} MB | {item['slope_mb_per_min']:+.3f} MB/min "
                     f"| {item['tail_slope_mb_per_min']:+.3f} MB/min | {rest_cell} |")
    lines += pools_table(summary)
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
    """RSS per worker over time and, when sampled, each memory pool; faults as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rss", "RSS (MB)")]
    pools = any(s.get("mem") for s in data["samples"])
    if pools:  # runs that sampled the memory gauges get a panel per pool
        panels += [(key, f"{label} ({'thousands' if key == 'py_blocks' else 'MB'})")
                   for key, label in POOLS.items()]
    cols = 2 if pools else 1
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3 * rows + 0.8) if pools else (9, 4.5),
                             squeeze=False, sharex=True)
    flat = list(axes.flat)
    for ax, (key, label) in zip(flat, panels, strict=False):
        for name in data["workers"]:
            points = series(data["samples"], name, key)
            scale = 1000 if key == "py_blocks" else 1
            ax.plot([t / 60 for t, _ in points], [v / scale for _, v in points], label=name,
                    linewidth=1)
        ax.axvspan(0, data["warm_s"] / 60, color="0.9", label="warm-up")
        for i, fault in enumerate(data["faults"]):
            ax.axvline(fault["t"] / 60, color="0.5", linestyle=":", linewidth=0.8,
                       label="fault" if i == 0 else None)
        ax.set_title(label, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("minutes")
    flat[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"tasync workers during a {data['duration_s'] / 60:.0f}-minute soak "
                 f"({data['alert_rate']:g} alerts/s, {data['change_rate']:g} changes/s)")
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
