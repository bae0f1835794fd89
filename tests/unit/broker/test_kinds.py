"""Schemas and references of the configuration kinds (broker/kinds.py)."""

from typing import Any

import pytest

from tasync.broker import kinds
from tasync.broker.errors import ConfigError, InvalidObject

WINDOW = {"days": ["mon", "fri"], "start": "09:00", "end": "17:30"}


def schedule(**windows: Any) -> dict[str, Any]:
    return {"windows": [{**WINDOW, **windows}]}


# -- valid bodies and normalisation -----------------------------------------------------------


def test_destination_defaults_schedule_and_subject_to_none() -> None:
    assert kinds.load_body("destination", "ops-mail", {"url": "mailto:ops@example.com"}) == {
        "url": "mailto:ops@example.com", "schedule": None, "subject": None,
    }


def test_destination_keeps_given_fields() -> None:
    body = {"url": "https://hooks.example.com/x", "schedule": "office", "subject": "{priority}"}
    assert kinds.load_body("destination", "hook", body) == body


def test_load_body_does_not_mutate_its_input() -> None:
    body = {"url": "file:///var/log/alerts.jsonl"}
    kinds.load_body("destination", "file1", body)
    assert body == {"url": "file:///var/log/alerts.jsonl"}


def test_group_mode_defaults_to_all() -> None:
    assert kinds.load_body("group", "oncall", {"members": ["a", "b"]}) == {
        "members": ["a", "b"], "mode": "all",
    }


def test_group_sequence_mode_is_kept() -> None:
    loaded = kinds.load_body("group", "oncall", {"members": ["a"], "mode": "sequence"})
    assert loaded["mode"] == "sequence"


def test_route_keeps_host_order() -> None:
    hosts = ["c", "a", "b"]
    assert kinds.load_body("route", "east", {"hosts": hosts}) == {"hosts": hosts}


def test_schedule_timezone_defaults_to_utc() -> None:
    loaded = kinds.load_body("schedule", "office", schedule())
    assert loaded == {"timezone": "UTC", "windows": [WINDOW]}


def test_schedule_accepts_known_zone_and_24_00_end() -> None:
    body = {"timezone": "Europe/Berlin", "windows": [{**WINDOW, "start": "00:00", "end": "24:00"}]}
    assert kinds.load_body("schedule", "all-day", body) == body


def test_node_description_defaults_to_empty() -> None:
    assert kinds.load_body("node", "node-1", {}) == {"description": ""}


# -- rejected bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "body"), [
    ("destination", {"url": "file:///x", "urll": "typo"}),
    ("group", {"members": ["a"], "extra": 1}),
    ("route", {"hosts": ["a"], "name": "r"}),
    ("schedule", {"windows": [{**WINDOW, "tz": "UTC"}]}),
    ("node", {"descr": "x"}),
])
def test_unknown_fields_are_rejected(kind: str, body: dict[str, Any]) -> None:
    with pytest.raises(InvalidObject, match="Unknown field") as info:
        kinds.load_body(kind, "obj", body)
    assert info.value.errors  # the field-level detail is kept for --json


def test_url_without_scheme_is_rejected() -> None:
    with pytest.raises(InvalidObject, match="needs a scheme") as info:
        kinds.load_body("destination", "d", {"url": "example.com/hook"})
    assert "url" in info.value.errors


@pytest.mark.parametrize("url", ["://example.com/hook", ":nothing"])
def test_url_with_empty_scheme_is_rejected(url: str) -> None:
    with pytest.raises(InvalidObject, match="scheme"):
        kinds.load_body("destination", "d", {"url": url})


def test_missing_required_field_is_rejected() -> None:
    with pytest.raises(InvalidObject, match=r"^destination d: url: Missing data"):
        kinds.load_body("destination", "d", {})


def test_unknown_time_zone_is_rejected() -> None:
    with pytest.raises(InvalidObject, match=r"timezone: unknown time zone 'Mars/Olympus'"):
        kinds.load_body("schedule", "s", {**schedule(), "timezone": "Mars/Olympus"})


def test_time_zone_naming_a_zone_directory_is_a_validation_error() -> None:
    with pytest.raises(InvalidObject, match="unknown time zone"):
        kinds.load_body("schedule", "s", {**schedule(), "timezone": "America"})


@pytest.mark.parametrize(("start", "end"), [("17:00", "09:00"), ("09:00", "09:00"),
                                            ("24:00", "24:00")])
def test_window_start_must_be_before_end(start: str, end: str) -> None:
    with pytest.raises(InvalidObject, match="start must be before end") as info:
        kinds.load_body("schedule", "s", schedule(start=start, end=end))
    assert info.value.errors == {"windows": {0: {"end": ["start must be before end"]}}}


@pytest.mark.parametrize("bad", ["9:00", "25:00", "12:60", "noon", "24:01"])
def test_window_times_must_be_hh_mm(bad: str) -> None:
    with pytest.raises(InvalidObject, match="use HH:MM"):
        kinds.load_body("schedule", "s", schedule(start=bad))


def test_window_days_must_be_known() -> None:
    with pytest.raises(InvalidObject, match=r"days\.0: Must be one of"):
        kinds.load_body("schedule", "s", schedule(days=["monday"]))


def test_duplicate_route_hosts_are_rejected() -> None:
    with pytest.raises(InvalidObject, match="only once in a precedence list"):
        kinds.load_body("route", "r", {"hosts": ["a", "b", "a"]})


def test_route_host_must_be_a_node_name() -> None:
    with pytest.raises(InvalidObject, match="not a node name"):
        kinds.load_body("route", "r", {"hosts": ["a.b"]})


def test_group_needs_members_and_a_known_mode() -> None:
    with pytest.raises(InvalidObject, match="members"):
        kinds.load_body("group", "g", {"members": []})
    with pytest.raises(InvalidObject, match="mode"):
        kinds.load_body("group", "g", {"members": ["a"], "mode": "any"})


def test_body_must_be_a_mapping() -> None:
    with pytest.raises(InvalidObject, match="must be a JSON object"):
        kinds.load_body("destination", "d", ["file:///x"])  # type: ignore[arg-type]


# -- kinds and names --------------------------------------------------------------------------


def test_unknown_kind_lists_the_kinds() -> None:
    with pytest.raises(InvalidObject, match="unknown kind 'printer'") as info:
        kinds.check_kind("printer")
    for kind in kinds.KINDS:
        assert kind in str(info.value)


def test_validation_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        kinds.check_kind("nope")


@pytest.mark.parametrize("name", ["", "-leading-dash", "has space", "x" * 129, "semi;colon",
                                  "slash/name", None, 42])
def test_invalid_object_names_are_rejected(name: Any) -> None:
    with pytest.raises(InvalidObject, match="invalid destination name"):
        kinds.check_name("destination", name)


@pytest.mark.parametrize("name", ["a", "ops-mail", "team.db:primary", "x@y+z", "x" * 128])
def test_valid_object_names_pass(name: str) -> None:
    assert kinds.check_name("destination", name) == name


def test_node_names_follow_the_stricter_node_rule() -> None:
    assert kinds.check_name("node", "node_1-a") == "node_1-a"
    # Allowed for other kinds, but a node name becomes a routing-key word.
    assert kinds.check_name("destination", "a.b") == "a.b"
    with pytest.raises(InvalidObject, match="invalid node name"):
        kinds.check_name("node", "a.b")


@pytest.mark.parametrize("kind", ["destination", "node"])
def test_name_with_trailing_newline_is_rejected(kind: str) -> None:
    with pytest.raises(InvalidObject):
        kinds.check_name(kind, "name\n")


def test_load_body_checks_kind_and_name_first() -> None:
    with pytest.raises(InvalidObject, match="unknown kind"):
        kinds.load_body("printer", "p", {})
    with pytest.raises(InvalidObject, match="invalid group name"):
        kinds.load_body("group", "bad name", {"members": ["a"]})


# -- one-line error messages ------------------------------------------------------------------


def test_error_message_is_one_line_and_names_every_problem() -> None:
    body = {"windows": [{"days": ["xx"], "start": "1:00", "end": "09:00"},
                        {**WINDOW, "start": "18:00", "end": "08:00"}], "timezone": "Nowhere/X"}
    with pytest.raises(InvalidObject) as info:
        kinds.load_body("schedule", "night", body)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("schedule night: ")
    for part in ("windows.0.days.0: Must be one of", "windows.0.start: use HH:MM",
                 "windows.1.end: start must be before end", "timezone: unknown time zone"):
        assert part in message
    assert set(info.value.errors) == {"windows", "timezone"}


# -- references -------------------------------------------------------------------------------


def state(**kinds_: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    return dict(kinds_)


def test_reference_errors_empty_for_a_consistent_state() -> None:
    good = state(
        node={"a": {}, "b": {}},
        schedule={"office": schedule()},
        destination={"d1": {"url": "file:///x", "schedule": "office"}, "d2": {"url": "file:///y"}},
        group={"g1": {"members": ["d1", "d2"]}, "g2": {"members": ["g1", "d2"]}},
        route={"r": {"hosts": ["b", "a"]}},
    )
    assert kinds.reference_errors(good) == []


def test_reference_errors_reports_every_dangling_reference() -> None:
    bad = state(
        destination={"d1": {"url": "file:///x", "schedule": "missing-sched"}},
        group={"g1": {"members": ["d1", "ghost"]}},
        route={"r": {"hosts": ["n9"]}},
    )
    assert kinds.reference_errors(bad) == [
        "destination d1: schedule 'missing-sched' does not exist",
        "group g1: member 'ghost' is neither a destination nor a group",
        "route r: host 'n9' is not a known node",
    ]


def test_reference_errors_finds_group_cycles() -> None:
    cyclic = state(
        destination={"d": {"url": "file:///x"}},
        group={"a": {"members": ["b"]}, "b": {"members": ["c", "d"]}, "c": {"members": ["a"]},
               "ok": {"members": ["a"]}},
    )
    errors = kinds.reference_errors(cyclic)
    assert sorted(errors) == [f"group {g}: contains itself through its members"
                              for g in ("a", "b", "c")]


def test_self_membership_is_a_cycle() -> None:
    assert kinds.reference_errors(state(group={"g": {"members": ["g"]}})) == [
        "group g: contains itself through its members"
    ]


def test_diamond_is_not_a_cycle() -> None:
    diamond = state(
        destination={"d": {"url": "file:///x"}},
        group={"top": {"members": ["l", "r"]}, "l": {"members": ["d"]}, "r": {"members": ["d"]}},
    )
    assert kinds.reference_errors(diamond) == []


def test_referrers_per_kind() -> None:
    st = state(
        destination={"d1": {"url": "file:///x", "schedule": "office"},
                     "d2": {"url": "file:///y", "schedule": "night"}},
        group={"g1": {"members": ["d1"]}, "g2": {"members": ["d1", "g1"]}},
        route={"r1": {"hosts": ["a", "b"]}, "r2": {"hosts": ["b"]}},
    )
    assert kinds.referrers(st, "schedule", "office") == ["destination d1"]
    assert sorted(kinds.referrers(st, "destination", "d1")) == ["group g1", "group g2"]
    assert kinds.referrers(st, "group", "g1") == ["group g2"]
    assert kinds.referrers(st, "group", "g2") == []
    assert sorted(kinds.referrers(st, "node", "b")) == ["route r1", "route r2"]
    assert kinds.referrers(st, "node", "c") == []
    assert kinds.referrers(st, "route", "r1") == []


def test_dependency_order_puts_referenced_kinds_first() -> None:
    order = kinds.DEPENDENCY_ORDER
    assert set(order) == set(kinds.KINDS)
    assert order["schedule"] < order["destination"] < order["group"]
    assert order["node"] < order["route"]


# -- hostile values -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "body", "field"), [
    ("destination", {"url": "file:///a\x00b"}, "url"),
    ("destination", {"url": "file:///a", "subject": "Alert\r\nBcc: x@y"}, "subject"),
    ("node", {"description": "tab\tbell\x07"}, "description"),
    ("schedule", {"timezone": "UTC", "windows": [{"days": ["mon"], "start": "08:00",
                                                  "end": "09:00\x85"}]}, "windows[0].end"),
    ("group", {"members": ["ok", "bad\x1b[31m"]}, "members[1]"),
])
def test_control_characters_are_refused_in_every_field(kind: str, body: dict[str, Any],
                                                       field: str) -> None:
    with pytest.raises(InvalidObject) as caught:
        kinds.load_body(kind, "x", body)
    message = str(caught.value)
    assert "control character" in message and field in message, message
    assert "\n" not in message and "\x00" not in message


def test_deep_nesting_is_refused_without_recursion() -> None:
    deep: Any = "leaf"
    for _ in range(5_000):
        deep = [deep]
    with pytest.raises(InvalidObject, match="nested more than"):
        kinds.load_body("destination", "x", {"url": "file:///a", "subject": deep})


def test_a_long_name_is_quoted_short() -> None:
    with pytest.raises(InvalidObject) as caught:
        kinds.load_body("destination", "n" * 10_000 + "\x00", {"url": "file:///a"})
    assert len(str(caught.value)) < 120 and "10001 characters" in str(caught.value)


@pytest.mark.parametrize("url", ["nosuchscheme://host/token-SECRET", "slak://T0/B0/SECRET", "slack://SECRET",
                                 "mailto://"])
def test_a_url_no_channel_knows_is_refused_without_showing_it(url: str) -> None:
    with pytest.raises(InvalidObject) as info:
        kinds.load_body("destination", "chat", {"url": url})
    assert ("scheme" in str(info.value) or "cannot read" in str(info.value))
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize("url", ["json://127.0.0.1:8080/", "mailto://user:pw@gmail.com",
                                 "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ",
                                 "mailto:ops@example.com", "smtp://mail/?to=a@b", "file:///x",
                                 "https://hooks.example.com/x"])
def test_urls_a_channel_knows_are_accepted(url: str) -> None:
    assert kinds.load_body("destination", "chat", {"url": url})["url"] == url


def test_config_set_refuses_an_unknown_scheme_in_one_line() -> None:
    from click.testing import CliRunner

    from tasync.cli import cli

    result = CliRunner().invoke(cli, ["config", "set", "destination", "chat", "--url",
                                      "nosuchscheme://x", "--broker", "amqp://127.0.0.1:1/x"])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and "'nosuchscheme' scheme" in result.stderr
