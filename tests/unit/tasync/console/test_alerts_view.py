"""The alert pages' pure parts: the send form's own checks, refusals beside fields, shown text."""

from __future__ import annotations

from tasync.broker.errors import ConfigError, InvalidObject, SendRefused
from tasync.console.alerts_view import GENERAL, AlertForm, check_form, send_errors, targets
from tasync.console.common import visible


def test_the_send_form_needs_a_target_and_exactly_one_list() -> None:
    assert check_form(AlertForm(target="destination:ops", text="x", route="ab")) == {}
    assert check_form(AlertForm(target="destination:ops", text="x", hosts="a b")) == {}
    errors = check_form(AlertForm(target="ops", text="x", route="ab", hosts="a",
                                  priority="high"))
    assert set(errors) == {"target", "route", "priority"}
    assert "route" in check_form(AlertForm(target="group:g", text="x"))
    form = AlertForm.from_form({"target": "group:g", "text": " t ", "id": " i1 ",
                                "hosts": " a b "})
    assert (form.text, form.alert_id, form.hosts, form.priority) == (" t ", "i1", "a b", "5")


def test_a_refused_send_is_shown_beside_its_field() -> None:
    assert send_errors(ConfigError("unknown destination 'ghost'")) == {
        "target": "unknown destination 'ghost'"}
    assert "hosts" in send_errors(ConfigError("unknown node 'zz' in the host list"))
    assert "route" in send_errors(ConfigError("unknown route 'r'"))
    invalid = InvalidObject("invalid alert: text: the message is empty",
                            errors={"text": ["the message is empty"], "v": ["odd"]})
    assert send_errors(invalid) == {"text": "the message is empty", GENERAL: "odd"}
    assert send_errors(SendRefused("a accepts signed alerts only")) == {
        GENERAL: "a accepts signed alerts only"}


def test_targets_list_destinations_then_groups() -> None:
    objects = {"group": [{"name": "oncall"}], "destination": [{"name": "ops"}],
               "route": [{"name": "ab"}]}
    assert targets(objects) == [("destination:ops", "destination ops"),
                                ("group:oncall", "group oncall")]


def test_control_characters_are_spelled_out_and_lines_kept() -> None:
    assert visible("a\x07b\x1b[31m\nc\td\u2028<") == "a\\x07b\\x1b[31m\nc\td\\u2028<"
