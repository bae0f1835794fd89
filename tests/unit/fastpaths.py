"""What the tests of the hand-written fast paths share: the verdict of a decoder, and values.

``tasync.broker.fastdecode.decode_entry`` and ``tasync.broker.alerts.decode_alert`` skip marshmallow
for well-formed input; their tests hold each to the schema by comparing verdicts on the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from tasync.broker.errors import MessageError

MAX = 1 << 20

#: Small JSON values of every type, nested a little: what a mutated field could hold.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                  max_size=2),
    max_leaves=4)


def outcome(body: bytes, decoder: Any) -> Any:
    """``("ok", message)`` or ``("refused", reason)``: two decoders agree when these are equal."""
    try:
        return ("ok", decoder(body, max_bytes=MAX))
    except MessageError as exc:
        return ("refused", str(exc))


def agree(data: Any, decoder: Any, expect: str) -> None:
    """``decoder`` and ``tasync.broker.messages.decode(expect=...)`` agree on ``data``."""
    from tasync.broker import messages

    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    fast = outcome(body, decoder)
    slow = outcome(body, lambda b, max_bytes: messages.decode(b, max_bytes=max_bytes,
                                                               expect=expect))
    assert fast == slow
