"""The console's traffic page and configuration import, in a real browser on a real network.

A network of its own (a master and two backups) and a console serve this module, so these
tests neither see nor disturb the traffic and configuration of the other console tests.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.console.conftest import ConsoleServer, log_in, screenshot
from tests.console.test_console_browser import audited, csp_violations, watch_console
from tests.integration.test_replication import assert_identical
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


#: A file name that is markup: shown as text on the import's page.
HOSTILE_FILE = "<img src=x onerror=window.__pwned=4>cfg.json"  # browsers send " as %22


def bulk(prefix: str, *, bad: dict[str, Any] | None = None) -> dict[str, Any]:
    """An export-shaped file of 2,000 objects: destinations, groups of them, routes."""
    destinations = {f"{prefix}-d{i:04}": {"url": f"file:///tmp/{prefix}/{i}.jsonl",
                                           "subject": f"import {i}"} for i in range(1200)}
    names = sorted(destinations)
    groups = {f"{prefix}-g{i:03}": {"members": names[i * 2:i * 2 + 2], "mode": "all"}
              for i in range(500)}
    routes = {f"{prefix}-r{i:03}": {"hosts": ["a", "b"] if i % 2 else ["b", "c", "a"]}
              for i in range(300)}
    data: dict[str, Any] = {"destination": destinations, "group": groups, "route": routes}
    for kind, objects in (bad or {}).items():
        data[kind].update(objects)
    return data


def upload(page: Any, console: ConsoleServer, name: str, data: Any) -> None:
    """Upload ``data`` as JSON named ``name`` through the import page."""
    page.goto(console.url + "/config/destination")
    page.click("#import-link")
    page.wait_for_url("**/config/import")
    page.set_input_files("#import-file", files=[{
        "name": name, "mimeType": "application/json",
        "buffer": json.dumps(data).encode()}])
    page.click("#import")


def names(trio: Network, kind: str) -> set[str]:
    shown = json.loads(trio.cli("config", "show", kind, "--json").stdout)
    return {o["name"] for o in shown}


def test_import_two_thousand_objects_and_follow_the_progress(
        browser: Any, console: ConsoleServer, trio: Network) -> None:
    page = log_in(browser, console, "alice")
    messages = watch_console(page)
    upload(page, console, HOSTILE_FILE, bulk("imp"))
    page.wait_for_url("**/config/import/*")
    page.evaluate("window.__same_page = 1")
    assert page.inner_text("#import-file-name") == HOSTILE_FILE
    page.wait_for_selector("#import-live[data-state='committed']", timeout=180_000)
    assert page.evaluate("window.__same_page") == 1  # followed in place, not reloaded
    assert page.inner_text("#import-count") == "2000"
    assert page.get_attribute("#import-progress", "value") == \
        page.get_attribute("#import-progress", "max") == "2000"
    assert "Imported 2000 operations" in page.inner_text("#import-status")
    screenshot(page, "import")

    trio.settle()
    export = json.loads(assert_identical(trio))  # the same bytes on every node
    assert len([n for n in export["destination"] if n.startswith("imp-")]) == 1200
    assert len([n for n in export["group"] if n.startswith("imp-")]) == 500
    assert export["route"]["imp-r001"]["hosts"] == ["a", "b"]
    assert audited(trio, "change.committed", by="console:alice", op="import") == [
        {"by": "console:alice", "op": "import"}]
    assert page.evaluate("window.__pwned") is None
    assert not csp_violations(messages), messages
    page.context.close()


def test_a_bad_file_is_refused_whole(browser: Any, console: ConsoleServer,
                                     trio: Network) -> None:
    page = log_in(browser, console, "alice")
    messages = watch_console(page)
    before = {kind: names(trio, kind) for kind in ("destination", "group", "route")}

    # a schema error in the 1,201st object: found before anything is sent
    upload(page, console, "bad.json",
           bulk("bad", bad={"destination": {"bad-broken": {"url": "not a url"}}}))
    assert "Nothing was imported" in page.inner_text("#import-message")
    assert "bad-broken" in page.inner_text("#import-error")
    assert "needs a scheme" in page.inner_text("#import-error")
    screenshot(page, "import-error")

    # not JSON at all
    page.set_input_files("#import-file", files=[{
        "name": "broken.json", "mimeType": "application/json", "buffer": b'{"destination": {'}])
    page.click("#import")
    assert "broken.json: invalid JSON at line 1" in page.inner_text("#import-message")

    # a reference only the master checks: the import runs, then the master refuses it whole
    upload(page, console, "dangling.json",
           bulk("dangling", bad={"group": {"dangling-g": {"members": ["no-such-dest"]}}}))
    page.wait_for_url("**/config/import/*")
    page.wait_for_selector("#import-live[data-state='refused']", timeout=180_000)
    assert "Nothing was committed" in page.inner_text("#import-status")
    assert "no-such-dest" in page.inner_text("#import-error")
    after = {kind: names(trio, kind) for kind in ("destination", "group", "route")}
    assert after == before  # all or nothing: not one object of either file
    assert not csp_violations(messages), messages
    page.context.close()


def test_only_an_admin_may_import(browser: Any, console: ConsoleServer,
                                  trio: Network) -> None:
    data = json.dumps({"destination": {"sneaky": {"url": "file:///tmp/sneaky"}}}).encode()
    for user in ("victor", "olga"):
        page = log_in(browser, console, user)
        page.goto(console.url + "/config/destination")
        assert page.locator("#import-link").count() == 0
        answer = page.goto(console.url + "/config/import")
        assert answer is not None and answer.status == 403
        csrf = page.locator("input[name=csrf]").first.get_attribute("value")
        posted = page.request.post(console.url + "/config/import", multipart={
            "csrf": csrf, "file": {"name": "x.json", "mimeType": "application/json",
                                   "buffer": data}}, headers={"Origin": console.url})
        assert posted.status == 403 and "it needs admin" in posted.text(), user
        page.context.close()

    # an admin's upload without the CSRF token is refused too
    page = log_in(browser, console, "alice")
    posted = page.request.post(console.url + "/config/import", multipart={
        "file": {"name": "x.json", "mimeType": "application/json", "buffer": data}},
        headers={"Origin": console.url})
    assert posted.status == 403 and "expired" in posted.text()
    page.context.close()
    assert "sneaky" not in names(trio, "destination")
