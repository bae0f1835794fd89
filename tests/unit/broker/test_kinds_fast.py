"""The fast destination check gives marshmallow's verdict and result, or defers to it."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasync.broker import kinds
from tasync.broker.errors import InvalidObject


def slow(body: Any) -> Any:
    try:
        return ("ok", kinds.SCHEMAS["destination"].load(dict(body)))
    except Exception as exc:  # marshmallow's ValidationError, or a TypeError on odd input
        return ("refused", type(exc).__name__)


def check(body: Any) -> None:
    fast = kinds._fast_destination(body)
    if fast is not None:
        assert ("ok", fast) == slow(body)


def test_a_plain_destination_takes_the_fast_path() -> None:
    body = {"url": "file:///var/spool/ops.jsonl"}
    assert kinds._fast_destination(body) == {"url": body["url"], "schedule": None,
                                             "subject": None}
    assert kinds.load_body("destination", "ops", body) == slow(body)[1]


@pytest.mark.parametrize("body", [
    {"url": "x:"}, {"url": "ab"}, {"url": "no-scheme"}, {"url": "1http://x"},
    {"url": "file:///" + "x" * 2041}, {"url": "file:///" + "x" * 2040}, {"url": None},
    {"url": 5}, {}, {"url": "file:///x", "extra": 1}, {"url": "file:///x", "schedule": 3},
    {"url": "file:///x", "subject": "s" * 512}, {"url": "file:///x", "subject": "s" * 513},
    {"url": "file:///x", "schedule": None, "subject": None},
    {"url": "file:///x", "schedule": "weekdays", "subject": "{text}"},
])
def test_edge_cases_agree(body: dict[str, Any]) -> None:
    check(body)
    fast = kinds._fast_destination(body)
    if fast is None and slow(body)[0] == "refused":
        with pytest.raises(InvalidObject):
            kinds.load_body("destination", "d", body)


values = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(
    max_size=12) | st.lists(st.text(max_size=2), max_size=2)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["url", "schedule", "subject", "other"]), values))
def test_random_bodies_agree(body: dict[str, Any]) -> None:
    check(body)


def verdict(body: Any) -> Any:
    try:
        return ("ok", kinds.load_body("destination", "d", body))
    except InvalidObject as exc:
        return ("refused", str(exc))


texts = st.text(alphabet=st.sampled_from("ab:/\x00\x1f\x7f\x85\x9f\u00a0é"), max_size=6)
plain_values = values | texts | st.sampled_from(["file:///x", "mailto:a@b", "file:///\x07"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["url", "schedule", "subject", "other", "u\x01"])
                       | texts, plain_values | st.dictionaries(texts, plain_values, max_size=2)))
def test_the_short_checks_give_the_full_walks_verdict(body: dict[str, Any]) -> None:
    """``load_body``'s short ways (a flat plain body, a plain destination) decide as the walk.

    Without ``_flat_and_plain`` every body takes ``check_plain``'s walk, then the schema.
    """
    with mock.patch.object(kinds, "_flat_and_plain", lambda _value: False):
        walked = verdict(body)
    assert verdict(body) == walked
