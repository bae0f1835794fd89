"""The traffic page's data: ``tasync totals`` gathered as the command gathers it, and charted.

The console asks every live node the ``totals`` request ``tasync totals`` sends
(``tasync.alert_lists.ask_all``), with one argument more: a ``series`` of every counter per
bucket over the chosen range (``tasync.consumers.totals.Totals.series_counts``). So the table
is what the command prints, and the charts come from the same minute buckets. Nothing is kept
here but the last answer, served again for a second so that many open pages cost one request.

The charts are inline SVG bars computed here (``spark``): no chart library, no script, no
style attribute (the Content-Security-Policy forbids inline styles; bars are sized by SVG
geometry attributes and coloured by classes of the stylesheet).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from tasync.alert_lists import ask_all
from tasync.broker.settings import Settings
from tasync.cli_alerts import COUNTER_COLUMNS
from tasync.client import rpc_client
from tasync.console.common import TROUBLE, why
from tasync.console.network_view import Recent


@dataclass(frozen=True)
class Range:
    """A span the charts show: how far back, and the width of one bar."""

    key: str
    label: str
    span_s: int
    bucket_s: int


RANGES = {r.key: r for r in (Range("1h", "last hour, per minute", 3600, 60),
                             Range("6h", "last 6 hours, per 5 minutes", 6 * 3600, 300),
                             Range("24h", "last 24 hours, per 20 minutes", 24 * 3600, 1200))}
DEFAULT_RANGE = "1h"
#: The counters charted per node (``tasync totals`` has a few more columns; the table shows all).
CHARTED = ("received", "delivered", "failed", "taken_over", "refused", "dead_lettered",
           "duplicates")
#: A chart's size in SVG user units (the page shows it at this size).
CHART_W = 140
CHART_H = 32


@dataclass(frozen=True)
class Gathering:
    """One round of ``totals`` answers (or why there is none)."""

    answers: list[dict[str, Any]]
    missing: list[str]
    error: str | None


class TrafficSource:
    """Every node's totals and series for a range, asked at most once per ``max_age_s``.

    Args:
        settings: how to reach the broker.
        timeout_s: how long to wait for nodes (as ``tasync totals --timeout``).
        max_age_s: how long one answer is served again.
    """

    def __init__(self, settings: Settings, *, timeout_s: float, max_age_s: float = 1.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._recent: Recent[Range, Gathering] = Recent(self._gather, max_age_s=max_age_s)

    def get(self, span: Range) -> Gathering:
        """A recent gathering for ``span``; blocks while one is made (call from a thread)."""
        return self._recent.get(span)

    def _gather(self, span: Range) -> Gathering:
        args = {"since": None,
                "series": {"since": time.time() - span.span_s + span.bucket_s,
                           "bucket_s": span.bucket_s}}
        try:
            with rpc_client(self.settings) as rpc:
                answers, missing = ask_all(rpc, "totals", args, timeout_s=self.timeout_s)
        except TROUBLE as exc:  # one gathering fails, not the page: it says why instead
            return Gathering([], [], why(exc))
        return Gathering(sorted(answers, key=lambda a: str(a.get("node"))), missing, None)


def view(gathering: Gathering) -> dict[str, Any]:
    """What the page shows: the table's rows, each node's charts, the nodes that are silent."""
    nodes = []
    for answer in gathering.answers:
        rows = [{"source": str(source), "counts": [int(counts.get(c, 0))
                                                   for c in COUNTER_COLUMNS]}
                for source, counts in answer.get("sources", {}).items()]
        total = answer.get("total", {})
        nodes.append({
            "node": str(answer["node"]), "rows": rows,
            "total": [int(total.get(c, 0)) for c in COUNTER_COLUMNS],
            "charts": charts(answer.get("series")),
        })
    return {"nodes": nodes, "missing": gathering.missing, "error": gathering.error,
            "columns": [c.replace("_", " ") for c in COUNTER_COLUMNS],
            "counters": COUNTER_COLUMNS}


def charts(series: Any) -> list[dict[str, Any]] | None:
    """One chart per ``CHARTED`` counter of a node's series; None when it sent none."""
    if not isinstance(series, dict) or not isinstance(series.get("counts"), dict):
        return None
    since = float(series.get("since") or 0)
    width = int(series.get("bucket_s") or 60)
    return [{"counter": c, "label": c.replace("_", " "),
             **spark([int(v) for v in series["counts"].get(c, [])], since, width)}
            for c in CHARTED]


def spark(values: list[int], since: float, bucket_s: int) -> dict[str, Any]:
    """The bars of one chart: each bucket's rectangle, scaled to the chart's own peak.

    A bucket with anything in it gets at least one unit of height, so a single alert among
    hundreds still shows. Each bar carries its time and count (the SVG ``<title>`` shows it on
    hover).
    """
    peak = max(values, default=0)
    step = CHART_W / max(len(values), 1)
    bars = []
    for index, value in enumerate(values):
        if not value:
            continue
        height = max(1.0, round(value / peak * (CHART_H - 2), 1))
        at = dt.datetime.fromtimestamp(since + index * bucket_s, dt.UTC)
        bars.append({"x": round(index * step, 2), "w": round(max(step - 0.5, 0.5), 2),
                     "y": round(CHART_H - height, 1), "h": height, "value": value,
                     "at": at.strftime("%Y-%m-%d %H:%M UTC")})
    return {"bars": bars, "peak": peak, "sum": sum(values), "width": CHART_W,
            "height": CHART_H}
