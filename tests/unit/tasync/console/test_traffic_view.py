from tasync.console.traffic_view import CHART_H, CHART_W, CHARTED, Gathering, charts, spark, view
from tasync.consumers.totals import COUNTERS


def test_bars_scale_to_the_peak_and_a_single_alert_still_shows() -> None:
    chart = spark([0, 500, 1, 0], since=1_800_000_000.0, bucket_s=60)
    assert chart["sum"] == 501 and chart["peak"] == 500
    tall, short = chart["bars"]  # empty buckets draw nothing
    assert tall["h"] == CHART_H - 2 and tall["y"] == 2
    assert short["h"] == 1.0 and short["value"] == 1
    assert tall["x"] == CHART_W / 4 and short["at"] == "2027-01-15 08:02 UTC"
    assert spark([], since=0, bucket_s=60) == {"bars": [], "peak": 0, "sum": 0,
                                                "width": CHART_W, "height": CHART_H}


def test_the_view_keeps_the_columns_of_tasync_totals() -> None:
    zeros = dict.fromkeys(COUNTERS, 0)
    answer = {"node": "a", "sources": {"nms": {**zeros, "delivered": 2}},
              "total": {**zeros, "delivered": 2},
              "series": {"since": 0.0, "bucket_s": 60,
                         "counts": {c: [0, 2 if c == "delivered" else 0] for c in COUNTERS}}}
    old = {"node": "b", "sources": {}, "total": zeros}  # an older node: no series
    shown = view(Gathering([answer, old], ["c"], None))
    a, b = shown["nodes"]
    assert shown["missing"] == ["c"]
    assert a["rows"][0]["source"] == "nms"
    assert a["rows"][0]["counts"][shown["counters"].index("delivered")] == 2
    assert [c["counter"] for c in a["charts"]] == list(CHARTED)
    assert b["charts"] is None and charts({"counts": "nonsense"}) is None
