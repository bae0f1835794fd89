"""The console's traffic page and configuration import, in a real browser on a real network.

A network of its own (a master and two backups) and a console serve this module, so these
tests neither see nor disturb the traffic and configuration of the other console tests.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.console.conftest import ConsoleServer, log_in, screenshot
from tests.console.test_console_browser import csp_violations, watch_console
from tests.network import Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def cell(page: Any, node: str, source: str, counter: str) -> int:
    """The number the totals table of ``node`` shows for ``source`` and ``counter``."""
    text = page.locator(f"section.traffic-node[data-node='{node}'] "
                        f"tr[data-source='{source}'] td.c-{counter}").inner_text()
    return int(text)


def chart_sum(page: Any, node: str, counter: str) -> int:
    found = page.locator(f"section.traffic-node[data-node='{node}'] "
                         f"figure.spark[data-counter='{counter}']")
    return int(found.get_attribute("data-sum"))


def test_traffic_counts_change_on_the_page_without_a_reload(
        browser: Any, console: ConsoleServer, trio: Network) -> None:
    out = trio.root / "traffic-out.jsonl"
    trio.cli("config", "set", "destination", "traffic-out", "--url", f"file://{out}",
             "--wait-applied")
    page = log_in(browser, console, "victor")
    messages = watch_console(page)
    page.click("header >> text=Traffic")
    page.wait_for_url("**/traffic")
    for node in ("a", "b", "c"):
        page.wait_for_selector(f"section.traffic-node[data-node='{node}'] "
                               "figure.spark[data-counter='received']")
    assert page.locator("tr[data-source='traffic-test']").count() == 0
    before = chart_sum(page, "a", "delivered")
    page.evaluate("window.__same_page = 1")

    for number in range(3):
        trio.cli("send", "-i", "traffic-out", "-m", f"traffic {number}", "--route", "ab",
                 "--source", "traffic-test")
    page.wait_for_selector("section.traffic-node[data-node='a'] "
                           "tr[data-source='traffic-test']", timeout=60_000)
    wait_for(lambda: cell(page, "a", "traffic-test", "delivered") == 3,
             what="3 delivered on the page")
    assert page.evaluate("window.__same_page") == 1  # updated in place, not reloaded
    assert cell(page, "a", "traffic-test", "received") == 3
    assert cell(page, "a", "traffic-test", "failed") == 0
    assert cell(page, "a", "(all)", "delivered") >= 3
    wait_for(lambda: chart_sum(page, "a", "delivered") == before + 3,
             what="the chart of a's deliveries to count them")
    bars = page.locator("section.traffic-node[data-node='a'] "
                        "figure.spark[data-counter='delivered'] rect")
    assert bars.count() >= 1 and float(bars.last.get_attribute("height")) > 0
    assert "traffic-test" not in page.locator(
        "section.traffic-node[data-node='b']").inner_text()  # b was second in the list

    # the page shows what tasync totals prints
    report = json.loads(trio.cli("totals", "--json").stdout)
    by_node = {r["node"]: r for r in report["nodes"]}
    assert by_node["a"]["sources"]["traffic-test"]["delivered"] == 3
    assert "series" not in by_node["a"]
    page.click("#ranges >> text=last 24 hours")
    page.wait_for_url("**/traffic?range=24h")
    assert chart_sum(page, "a", "delivered") == before + 3
    screenshot(page, "traffic")
    assert not csp_violations(messages), messages
    page.context.close()
