"""The console in a real browser against a real network: what an operator sees and may do.

One network (a master and two backups) and one console serve the whole module; the tests run
in file order, and the one that kills a node comes last.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tasync.broker.audit import read_trail
from tests.console.conftest import ConsoleServer, log_in, screenshot
from tests.integration.test_replication import assert_identical
from tests.network import Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOSTILE = "<script>window.__pwned=1</script>\"'><img src=x onerror=\"window.__pwned=2\">"


def watch_console(page: Any) -> list[str]:
    """The browser's console messages as they come (a blocked script or style shows up there)."""
    messages: list[str] = []
    page.on("console", lambda m: messages.append(m.text))
    return messages


def csp_violations(messages: list[str]) -> list[str]:
    return [m for m in messages if "Content Security Policy" in m]


def status(trio: Network) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(trio.cli("status", "--json",
                                                     check=False).stdout)["nodes"]
    return rows


def config_show(trio: Network, kind: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = json.loads(trio.cli("config", "show", kind, "--json").stdout)
    return objects


def audited(trio: Network, event: str, node: str = "a", **match: str) -> list[dict[str, str]]:
    """``event``'s lines in ``node``'s trail file matching ``match``, with the fields asked for.

    Read from the node's own trail file (what an auditor greps), not from any log.
    """
    lines = [t for t in read_trail(trio.nodes[node].data_dir) if t["event"] == event
             and all(t.get(k) == v for k, v in match.items())]
    keep = ("by", "op", "kind", "name", "id")
    return [{k: t[k] for k in keep if k in t} for t in lines]


def test_log_in_and_see_every_node(browser: Any, console: ConsoleServer) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(console.url + "/network")
    page.wait_for_url("**/login")  # not logged in: sent to the login page
    page.fill("#user", "alice")
    page.fill("#password", "not her password")
    page.click("form.login button")
    assert page.inner_text("#login-error") == "wrong name or password"
    screenshot(page, "login")
    context.close()

    page = log_in(browser, console, "alice")
    messages = watch_console(page)
    page.reload()  # watched from its first byte: htmx and the styles load under the policy
    page.wait_for_selector("tr[data-node='c']")
    rows = {r.get_attribute("data-node"): r
            for r in page.query_selector_all("table.nodes tr[data-node]")}
    assert sorted(rows) == ["a", "b", "c"]
    assert all(r.get_attribute("data-alive") == "yes" for r in rows.values())
    assert "master" in rows["a"].inner_text() and "master" not in rows["b"].inner_text()
    cells = [c.inner_text() for c in rows["b"].query_selector_all("td")]
    assert cells[1] == "backup" and cells[5:8] == ["yes", "yes", "yes"], cells
    assert re.fullmatch(r"[0-9a-f]{12}", cells[8]), cells
    assert page.inner_text("#who") == "alice (admin)"
    wait_for(lambda: "ok" in page.inner_text("#health"), what="a healthy network")
    screenshot(page, "network")
    assert not csp_violations(messages), messages
    page.context.close()


def test_an_invalid_destination_is_explained_beside_the_field_then_applied_everywhere(
        browser: Any, console: ConsoleServer, trio: Network) -> None:
    page = log_in(browser, console, "alice")
    messages = watch_console(page)
    page.click("text=Configuration")
    page.wait_for_url("**/config/destination")
    page.click("#new-object")
    page.fill("#f-name", "ops-hook")
    page.fill("#f-url", "not a url")
    page.fill("#f-subject", "disk full")
    page.click("#save")
    assert "needs a scheme" in page.inner_text("#err-url")
    assert page.input_value("#f-subject") == "disk full"  # what was typed is kept
    screenshot(page, "config-error")

    page.fill("#f-url", "file:///tmp/ops-hook.jsonl")
    page.fill("#f-schedule", "nights")  # no such schedule: the master refuses the reference
    page.click("#save")
    assert page.inner_text("#err-schedule").endswith("schedule 'nights' does not exist")
    assert page.inner_text("#err-url") == ""

    page.fill("#f-schedule", "")
    page.click("#save")
    page.wait_for_url("**/config/destination")
    assert "ops-hook: committed seq" in page.inner_text(".flash")
    assert audited(trio, "change.committed", name="ops-hook") == [
        {"by": "console:alice", "op": "set", "kind": "destination", "name": "ops-hook"}]
    row = page.locator("tr[data-name='ops-hook']")
    assert row.locator(".value-url").inner_text() == "file:///tmp/ops-hook.jsonl"
    screenshot(page, "config")

    trio.settle()
    assert '"ops-hook"' in assert_identical(trio)
    page.goto(console.url + "/network")
    wait_for(lambda: len({c.inner_text() for c in page.query_selector_all("td.checksum")}) == 1
             and "ok" in page.inner_text("#health"), what="equal checksums on the page")

    # edit, then delete through the confirmation page
    page.goto(console.url + "/config/destination")
    row = page.locator("tr[data-name='ops-hook']")
    row.locator("text=edit").click()
    assert page.input_value("#f-url") == "file:///tmp/ops-hook.jsonl"
    page.fill("#f-subject", "disk nearly full")
    page.click("#save")
    page.wait_for_url("**/config/destination")
    assert config_show(trio, "destination")[0]["body"]["subject"] == "disk nearly full"
    page.locator("tr[data-name='ops-hook']").locator("text=delete").click()
    page.click("#confirm-delete")
    page.wait_for_url("**/config/destination")
    assert "ops-hook deleted: committed" in page.inner_text(".flash")
    assert [t["op"] for t in audited(trio, "change.committed", name="ops-hook")] == [
        "set", "set", "delete"]  # each change through the console, on the master's trail
    assert config_show(trio, "destination") == []
    assert not csp_violations(messages), messages
    page.context.close()


def test_hostile_names_and_texts_render_as_text(browser: Any, console: ConsoleServer,
                                                trio: Network) -> None:
    trio.cli("config", "set", "destination", "x<y", check=False)  # refused: not a name
    trio.cli("config", "set", "destination", "hostile", "--url",
             "https://example.com/?q=\"><script>window.__pwned=3</script>", "--subject", HOSTILE)
    trio.cli("config", "set", "node", "a", "--description", HOSTILE)
    page = log_in(browser, console, "alice")
    page.goto(console.url + "/config/destination?q=" + "%3Cscript%3E")
    row = page.locator("tr[data-name='hostile']")
    assert row.locator(".value-subject").inner_text() == HOSTILE
    assert row.locator(".value-url").inner_text().endswith("<script>window.__pwned=3</script>")
    assert page.input_value("#q") == "<script>"
    page.goto(console.url + "/config/node")
    assert page.locator("tr[data-name='a'] .value-description").inner_text() == HOSTILE
    screenshot(page, "hostile")

    page.goto(console.url + "/config/destination/new")  # control characters, typed in
    page.fill("#f-name", "bad\x01<b>name</b>")
    page.fill("#f-url", "file:///tmp/x")
    page.fill("#f-subject", "ring\x07the bell")
    page.click("#save")
    assert "invalid destination name 'bad\\x01<b>name</b>'" in page.inner_text("#err-name")
    assert "control character (U+0007)" in page.inner_text("#err-subject")
    assert page.locator("main b, main img, main script").count() == 0
    assert page.evaluate("window.__pwned") is None
    page.context.close()
    trio.cli("config", "set", "node", "a", "--description", "")
    trio.cli("config", "delete", "destination", "hostile")


#: An alert text that is markup, quotes and terminal control characters at once.
ALERT_TEXT = HOSTILE + "\x07 bell \x1b[31mred"
#: An alert id may be any printable ASCII without spaces: markup and quotes included.
HOSTILE_ID = "<i>\"t1'</i>"


def delivered_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_send_a_test_alert_and_trace_it(browser: Any, console: ConsoleServer,
                                        trio: Network) -> None:
    out = trio.root / "console-out.jsonl"
    trio.cli("config", "set", "destination", "console-out", "--url", f"file://{out}")
    trio.cli("config", "set", "route", "ab", "--host", "a", "--host", "b", "--wait-applied")
    page = log_in(browser, console, "olga")
    messages = watch_console(page)
    assert page.inner_text("#who") == "olga (operator)"
    page.click("header >> text=Alerts")
    page.wait_for_url("**/alerts")
    page.select_option("#f-target", "destination:console-out")
    page.select_option("#f-route", "ab")
    page.fill("#f-hosts", "a b")
    page.fill("#f-text", ALERT_TEXT)
    page.fill("#f-id", HOSTILE_ID)
    page.click("#send")
    assert "not both" in page.inner_text("#err-route")  # refused beside the field, kept
    assert page.input_value("#f-id") == HOSTILE_ID
    page.fill("#f-hosts", "a zz")
    page.select_option("#f-route", "")
    page.click("#send")
    assert "unknown node 'zz'" in page.inner_text("#err-hosts")  # the sender's own check
    page.fill("#f-hosts", "")
    page.select_option("#f-route", "ab")
    page.click("#send")

    page.wait_for_url("**/alerts/trace?id=*")
    assert f"sent alert {HOSTILE_ID} to destination console-out along a b" in \
        page.inner_text(".flash")
    page.evaluate("window.__same_page = 1")
    page.wait_for_selector("#trace-live[data-outcome='delivered']")  # refreshed in place
    assert page.evaluate("window.__same_page") == 1
    (line,) = wait_for(lambda: delivered_lines(out), what="the alert in the file")
    assert (line["id"], line["text"], line["node"]) == (HOSTILE_ID, ALERT_TEXT, "a")
    assert page.inner_text("#trace-of") == HOSTILE_ID
    assert "by console:olga" in page.inner_text("#accepted")
    delivered = page.locator("tr[data-event='alert.delivered']")
    assert delivered.count() == 1 and "destination=console-out" in delivered.inner_text()
    screenshot(page, "trace")
    # the delivering node's trail names who sent it
    assert any(t["event"] == "alert.delivered" and t.get("sender") == "console:olga"
               and t.get("id") == HOSTILE_ID for t in read_trail(trio.nodes["a"].data_dir))

    # traced again from the box, as someone on call would
    page.goto(console.url + "/alerts")
    page.fill("#trace-id", HOSTILE_ID)
    page.click("#trace")
    assert page.inner_text("#outcome") == "delivered"
    page.fill("#trace-id", "never-sent")
    page.click("#trace")
    assert "Nothing is known of this id" in page.inner_text("#trace-unknown")
    assert page.locator("main i, main b, main img, main script").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert not csp_violations(messages), messages
    page.context.close()


def send_from_page(page: Any, console: ConsoleServer, target: str, text: str,
                   alert_id: str) -> None:
    """Send a test alert through the alerts page along route ab; lands on its trace."""
    page.goto(console.url + "/alerts")
    page.select_option("#f-target", target)
    page.select_option("#f-route", "ab")
    page.fill("#f-text", text)
    page.fill("#f-id", alert_id)
    page.click("#send")
    page.wait_for_url("**/alerts/trace?id=*")


def test_a_dead_letter_is_seen_then_re_sent_once_its_destination_is_fixed(
        browser: Any, console: ConsoleServer, trio: Network) -> None:
    broken = f"file://{trio.root}/no-such-directory/out.jsonl"
    fixed = trio.root / "console-fixed.jsonl"
    trio.cli("config", "set", "destination", "console-dead", "--url", broken,
             "--wait-applied")
    page = log_in(browser, console, "olga")
    messages = watch_console(page)
    send_from_page(page, console, "destination:console-dead", ALERT_TEXT, "dead-1")
    page.wait_for_selector("#trace-live[data-outcome='dead']")  # retried, then dead
    assert "cannot append to the file" in page.inner_text(".dead-row")

    page.click("#tab-dead")
    page.wait_for_url("**/alerts/dead")
    row = page.locator("tr[data-key='dead-1']")
    assert "No such file or directory" in row.locator(".reason").inner_text()
    assert row.locator(".text").inner_text().startswith("<script>window.__pwned=1</script>")
    screenshot(page, "dead")
    row.locator(".key a").click()
    page.wait_for_url("**/alerts/dead/show?key=dead-1")
    shown = ALERT_TEXT.replace("\x07", "\\x07").replace("\x1b", "\\x1b")
    assert page.inner_text("#message-text") == shown  # control characters spelled out
    assert page.inner_text(".m-node") == "a" and page.inner_text(".m-attempts") == "3"

    # an admin fixes the destination in the console; the operator re-sends
    admin = log_in(browser, console, "alice")
    admin.goto(console.url + "/config/destination/console-dead/edit")
    admin.fill("#f-url", f"file://{fixed}")
    admin.click("#save")
    admin.wait_for_url("**/config/destination")
    admin.context.close()
    trio.settle()
    page.click("#re-send")
    page.wait_for_url("**/alerts/trace?id=dead-1")
    assert "re-sent dead-1 along a b" in page.inner_text(".flash")
    page.wait_for_selector("#trace-live[data-outcome='delivered']")
    assert page.locator("tr[data-event='alert.requeued']").count() == 1
    (line,) = wait_for(lambda: delivered_lines(fixed), what="the re-sent alert in the file")
    assert (line["id"], line["text"]) == ("dead-1", ALERT_TEXT)
    assert audited(trio, "alert.requeued", id="dead-1") == [
        {"by": "console:olga", "id": "dead-1"}]
    page.goto(console.url + "/alerts/dead")
    assert page.locator("tr[data-key='dead-1']").count() == 0
    assert page.inner_text("#dead-total").startswith("0 in the queue")
    assert page.evaluate("window.__pwned") is None
    assert not csp_violations(messages), messages
    page.context.close()


def test_a_viewer_cannot_change_anything(browser: Any, console: ConsoleServer,
                                         trio: Network) -> None:
    page = log_in(browser, console, "victor")
    assert page.inner_text("#who") == "victor (viewer)"
    page.goto(console.url + "/config/destination")
    assert page.locator("#new-object").count() == 0
    assert page.locator("td.actions").count() == 0
    answer = page.goto(console.url + "/config/destination/new")
    assert answer is not None and answer.status == 403
    assert "your role (viewer) may not" in page.inner_text("#refusal")

    # the server refuses the change itself, even with the viewer's own valid CSRF token
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    posted = page.request.post(console.url + "/config/destination/new",
                               form={"csrf": csrf, "name": "viewers", "url": "file:///tmp/v"},
                               headers={"Origin": console.url})
    assert posted.status == 403 and "may not" in posted.text()
    deleted = page.request.post(console.url + "/config/node/b/delete", form={"csrf": csrf},
                                headers={"Origin": console.url})
    assert deleted.status == 403
    assert "viewers" not in {o["name"] for o in config_show(trio, "destination")}
    assert {o["name"] for o in config_show(trio, "node")} == {"a", "b", "c"}

    # no action of the alert pages or the operations either: hidden, and refused by the server
    page.goto(console.url + "/alerts")
    assert page.locator("#trace-id").count() == 1 and page.locator("#send-form").count() == 0
    page.goto(console.url + "/alerts/dead")
    assert page.locator(".re-send").count() == 0
    quarantine = page.goto(console.url + "/alerts/quarantine")
    assert quarantine is not None and quarantine.status == 200
    assert page.inner_text("#dead-total").endswith("in the queue.")
    page.goto(console.url + "/network")
    page.wait_for_selector("tr[data-node='b']")
    assert page.locator("a.promote").count() == 0
    answer = page.goto(console.url + "/operations/promote?node=b")
    assert answer is not None and answer.status == 403
    for path, form in (("/alerts/send", {"target": "destination:console-out", "route": "ab",
                                         "text": "from a viewer"}),
                       ("/alerts/dead/requeue", {"key": "dead-1"}),
                       ("/operations/promote", {"node": "b"})):
        posted = page.request.post(console.url + path, form={"csrf": csrf, **form},
                                   headers={"Origin": console.url})
        assert posted.status == 403 and "your role (viewer) may not" in posted.text(), path
    page.context.close()

    # an operator sends and re-sends, but promotes nothing
    page = log_in(browser, console, "olga")
    page.wait_for_selector("tr[data-node='b']")
    assert page.locator("a.promote").count() == 0
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    posted = page.request.post(console.url + "/operations/promote",
                               form={"csrf": csrf, "node": "b"}, headers={"Origin": console.url})
    assert posted.status == 403 and "it needs admin" in posted.text()
    assert sorted(r["node"] for r in status(trio) if r["role"] == "master") == ["a"]
    page.context.close()


def test_a_cross_site_form_post_is_refused(browser: Any, console: ConsoleServer,
                                           trio: Network) -> None:
    page = log_in(browser, console, "alice")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    attack = (f'<form id="f" method="post" action="{console.url}/config/destination/new">'
              f'<input name="csrf" value="{csrf}"><input name="name" value="evil">'
              '<input name="url" value="file:///tmp/evil"><button>go</button></form>')
    page.route("http://attacker.test/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body=attack))
    page.goto("http://attacker.test/page")
    with page.expect_navigation():
        page.click("button")
    assert page.url.startswith(console.url)
    assert "refused" in page.inner_text("#refusal").lower() or "not logged in" in \
        page.inner_text("#refusal")

    # with the session cookie and the right token, a foreign Origin is still refused
    cookie = {c["name"]: c["value"] for c in page.context.cookies()}
    with console.client() as client:
        client.cookies.update(cookie)
        for origin in ("http://attacker.test", "null"):
            answer = client.post("/config/destination/new",
                                 data={"csrf": csrf, "name": "evil", "url": "file:///tmp/e"},
                                 headers={"Origin": origin})
            assert answer.status_code == 403, answer.text
            assert "another site" in answer.text
        answer = client.post("/config/destination/new",
                             data={"name": "evil", "url": "file:///tmp/e"},
                             headers={"Origin": console.url})
        assert answer.status_code == 403 and "expired" in answer.text  # no CSRF token
    assert "evil" not in {o["name"] for o in config_show(trio, "destination")}
    page.context.close()


def test_pages_carry_a_strict_policy_and_the_cookie_is_guarded(console: ConsoleServer) -> None:
    with console.client() as client:
        page = client.get("/login")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe" not in policy
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
        refused = client.post("/login", data={"user": "alice", "password": "wrong password x"},
                              headers={"Origin": console.url})
        assert refused.status_code == 401 and "Set-Cookie" not in refused.headers
        answer = client.post("/login", data={"user": "alice",
                                             "password": console.passwords["alice"]},
                             headers={"Origin": console.url})
        assert answer.status_code == 303
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert "secure" not in cookie  # plain HTTP without --secure-cookie
        network = client.get("/network")
        assert network.status_code == 200 and console.passwords["alice"] not in network.text
        token = re.search(r'name="csrf" value="([^"]+)"', network.text)
        assert token is not None
        out = client.post("/logout", data={"csrf": token.group(1)},
                          headers={"Origin": console.url})
        assert out.status_code == 303
        assert client.get("/network").status_code == 303  # the session ended
    log = console.log()
    assert "login refused for 'alice'" in log and "'alice' logged in (admin)" in log
    assert all(p not in log for p in console.passwords.values())


def test_promote_a_backup_after_a_confirmation(browser: Any, console: ConsoleServer,
                                               trio: Network) -> None:
    page = log_in(browser, console, "alice")
    messages = watch_console(page)
    page.wait_for_selector("tr[data-node='b'] a.promote")
    assert page.locator("tr[data-node='a'] a.promote").count() == 0  # the master has none
    page.click("tr[data-node='b'] a.promote")
    page.wait_for_url("**/operations/promote?node=b")
    what = page.inner_text("#what-happens")
    assert "b becomes the master of the network with a new epoch, 2" in what
    assert "The current master, a, is asked to step down" in what
    screenshot(page, "promote")
    page.click("#confirm-promote")
    page.wait_for_url("**/network")
    assert "b is the master now: epoch 2" in page.inner_text(".flash")
    assert "a stepped down" in page.inner_text(".flash")
    page.wait_for_selector("tr[data-node='b'].master")  # the live table shows the new master
    assert "master" not in page.locator("tr[data-node='a']").get_attribute("class").split()
    assert sorted(r["node"] for r in status(trio) if r["role"] == "master") == ["b"]
    assert audited(trio, "master.promoted", node="b") == [{"by": "console:alice"}]
    assert not csp_violations(messages), messages
    page.context.close()


def test_a_killed_node_turns_down_without_a_reload(browser: Any, console: ConsoleServer,
                                                   trio: Network) -> None:
    page = log_in(browser, console, "victor")
    messages = watch_console(page)
    page.wait_for_selector("tr[data-node='c'][data-alive='yes']")
    page.evaluate("window.__same_page = 1")
    trio.nodes["c"].kill()
    page.wait_for_selector("tr[data-node='c'][data-alive='no']", timeout=60_000)
    assert page.evaluate("window.__same_page") == 1  # updated in place, not reloaded
    assert "node down" in page.inner_text("#health")
    assert "c does not answer" in page.inner_text(".problems")
    assert page.locator("tr[data-node='c']").get_attribute("class").split() == ["down",
                                                                                  "degraded"]
    screenshot(page, "network-down")
    assert not csp_violations(messages), messages
    page.context.close()
