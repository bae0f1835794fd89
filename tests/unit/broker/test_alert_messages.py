import json

import pytest

from tasync.broker import messages
from tasync.broker.alerts import (
    MAX_TEXT_CHARS,
    Alert,
    HostList,
    alert_to_dict,
    encode_alert,
    validated,
)
from tasync.broker.errors import InvalidObject, MessageError


def make(**overrides: object) -> Alert:
    fields: dict[str, object] = {"id": "INC42", "source": "remedy", "target_kind": "destination",
                                 "target": "ops", "text": "disk full", "hosts": ("a", "b")}
    fields.update(overrides)
    return Alert(**fields)  # type: ignore[arg-type]


def test_round_trip_and_fast_encoding_match_the_generic_one() -> None:
    alert = make(subject="P1", priority=9, text="é ünïcode")
    body = encode_alert(alert)
    assert body == messages.encode(alert)
    assert alert_to_dict(alert) == messages.to_dict(alert) | {"hosts": ["a", "b"]}
    assert messages.decode(body, max_bytes=1 << 20, expect="alert") == alert


def test_hostlist_record_round_trip() -> None:
    record = HostList(hosts=("b", "a"), created_at=1.0, sender="cli")
    assert messages.decode(messages.encode(record), max_bytes=4096, expect="hostlist") == record


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"text": "   "}, "text: the message is empty"),
    ({"text": ""}, "text: the message is empty"),
    ({"text": "x" * (MAX_TEXT_CHARS + 1)}, f"the limit is {MAX_TEXT_CHARS}"),
    ({"id": "has space"}, "id: an alert id is"),
    ({"hosts": ("a", "a")}, "only once"),
    ({"hosts": ()}, "hosts"),
    ({"hosts": ("a.b",)}, "not a node name"),
    ({"target_kind": "route"}, "target_kind"),
    ({"priority": 10}, "priority"),
    ({"source": ""}, "source"),
    # Names and ids are matched whole: no trailing junk, not even a newline.
    ({"target": "ops junk"}, "not a valid destination or group name"),
    ({"target": "ops\n"}, "not a valid destination or group name"),
    ({"id": "INC42\n"}, "id: an alert id is"),
    ({"source": "remedy\n"}, "source"),
    # A subject is one header line: no CR/LF (header injection) nor any other control.
    ({"subject": "P1\r\nBcc: all@example.com"}, "subject: a subject is one line"),
    ({"subject": "bell\x07"}, "subject: a subject is one line"),
    ({"labels": {"a\nb": "x"}}, "labels: a name is"),
])
def test_invalid_alerts_are_refused_with_the_field_named(overrides: dict[str, object],
                                                         reason: str) -> None:
    with pytest.raises(InvalidObject) as info:
        validated(make(**overrides))
    assert reason in str(info.value)
    assert str(info.value).startswith("invalid alert: ")


def test_decode_refuses_unknown_fields_and_wrong_types() -> None:
    data = alert_to_dict(make()) | {"extra": 1}
    with pytest.raises(MessageError, match="extra"):
        messages.decode(json.dumps(data).encode(), max_bytes=4096, expect="alert")
    with pytest.raises(MessageError, match="unexpected message type"):
        messages.decode(encode_alert(make()), max_bytes=4096, expect="changes")


def test_repr_hides_the_text() -> None:
    assert "disk full" not in repr(make())


def test_labels_and_annotations_travel_and_are_left_out_when_unset() -> None:
    plain = make()
    assert "labels" not in alert_to_dict(plain) and "annotations" not in alert_to_dict(plain)
    rich = make(labels={"alertname": "DiskFull", "instance": "db1"},
                annotations={"runbook_url": "https://wiki/disk", "summary": "98%\nfull"})
    body = encode_alert(rich)
    assert body == messages.encode(rich)
    decoded = messages.decode(body, max_bytes=1 << 20, expect="alert")
    assert decoded == rich and decoded.labels == {"alertname": "DiskFull", "instance": "db1"}
    assert validated(rich) == rich
