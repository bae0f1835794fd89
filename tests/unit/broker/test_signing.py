import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasync.broker.errors import ConfigError, MessageError
from tasync.broker.settings import ENV_CLUSTER_KEY_FILE, key_file_from_env
from tasync.broker.signing import MIN_SECRET_BYTES, KeyRing

NEW = ("k2", bytes(range(32)))
OLD = ("k1", b"\xaa" * 40)


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing((NEW,))


def test_sign_format_and_round_trip(ring: KeyRing) -> None:
    signature = ring.sign(b"change 42")
    assert re.fullmatch(r"k2:[0-9a-f]{64}", signature)
    ring.verify(b"change 42", signature)


def test_sign_is_deterministic_and_key_dependent(ring: KeyRing) -> None:
    assert ring.sign(b"x") == ring.sign(b"x")
    assert ring.sign(b"x") != KeyRing((("k2", b"\x01" * 32),)).sign(b"x")


def test_tampered_body_is_rejected(ring: KeyRing) -> None:
    signature = ring.sign(b'{"text": "disk full"}')
    with pytest.raises(MessageError, match=r"^bad signature$"):
        ring.verify(b'{"text": "disk fine"}', signature)


def test_tampered_mac_is_rejected(ring: KeyRing) -> None:
    signature = ring.sign(b"body")
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    with pytest.raises(MessageError, match="bad signature"):
        ring.verify(b"body", flipped)


def test_uppercase_hex_mac_accepted(ring: KeyRing) -> None:
    key_id, mac = ring.sign(b"body").split(":")
    ring.verify(b"body", f"{key_id}:{mac.upper()}")


@pytest.mark.parametrize("signature", [None, ""])
def test_missing_signature(ring: KeyRing, signature: str | None) -> None:
    with pytest.raises(MessageError, match=r"^missing signature$"):
        ring.verify(b"body", signature)


@pytest.mark.parametrize(
    "signature", ["k2", "k2:", "k2:abc", ":" + "0" * 64, "k 2:" + "0" * 64, "k2:" + "g" * 64]
)
def test_malformed_signature(ring: KeyRing, signature: str) -> None:
    with pytest.raises(MessageError, match="malformed signature"):
        ring.verify(b"body", signature)


def test_unknown_key_id(ring: KeyRing) -> None:
    signature = KeyRing((OLD,)).sign(b"body")
    with pytest.raises(MessageError, match=r"^unknown key id 'k1'$"):
        ring.verify(b"body", signature)


def test_rotation_new_key_signs_old_key_verifies() -> None:
    old_ring = KeyRing((OLD,))
    rotating = KeyRing((NEW, OLD))
    assert rotating.signing_key_id == "k2"
    assert rotating.key_ids == ("k2", "k1")
    # Messages from nodes still on the old file verify on rotated nodes ...
    rotating.verify(b"alert", old_ring.sign(b"alert"))
    # ... new messages are signed with the new key ...
    signature = rotating.sign(b"alert")
    assert signature.startswith("k2:")
    # ... which a node still on the new-only file (rotation finished) verifies.
    KeyRing((NEW,)).verify(b"alert", signature)
    # Once the old key is dropped, its signatures are no longer accepted.
    with pytest.raises(MessageError, match="unknown key id 'k1'"):
        KeyRing((NEW,)).verify(b"alert", old_ring.sign(b"alert"))


def test_same_id_different_secret_is_bad_signature() -> None:
    forged = KeyRing((("k2", b"\x00" * 32),)).sign(b"body")
    with pytest.raises(MessageError, match="bad signature"):
        KeyRing((NEW,)).verify(b"body", forged)


def test_repr_and_str_show_no_secret() -> None:
    secret_text = "s3cr3t-" * 6
    ring = KeyRing((("k2", secret_text.encode()), OLD))
    for text in (repr(ring), str(ring), f"{ring}", repr([ring])):
        assert text.count("KeyRing(key_ids=('k2', 'k1'))") == 1
        assert "s3cr3t" not in text
        assert secret_text.encode().hex() not in text
        assert OLD[1].hex() not in text and "\\xaa" not in text


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ((), "at least one key"),
        ((("k1", b"x" * 31),), "31 bytes; at least 32"),
        ((("bad:id", b"x" * 32),), "invalid key id"),
        ((("", b"x" * 32),), "invalid key id"),
        ((("k1", b"x" * 32), ("k1", b"y" * 32)), "duplicate key id"),
    ],
)
def test_invalid_ring(keys: tuple[tuple[str, bytes], ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KeyRing(keys)


def test_generate_then_load(tmp_path: Path) -> None:
    text = KeyRing.generate("k7")
    path = tmp_path / "cluster.key"
    path.write_text(text, encoding="utf-8")
    ring = KeyRing.load(path)
    assert ring.key_ids == ("k7",)
    assert len(ring.keys[0][1]) == MIN_SECRET_BYTES
    ring.verify(b"x", ring.sign(b"x"))


def test_generate_is_random_with_default_time_id() -> None:
    first, second = KeyRing.parse(KeyRing.generate()), KeyRing.parse(KeyRing.generate())
    assert re.fullmatch(r"k\d{8}-\d{6}-[0-9a-f]{6}", first.signing_key_id)
    assert first.keys[0][1] != second.keys[0][1]
    assert first.signing_key_id != second.signing_key_id  # made in the same second


def test_generate_rejects_bad_id() -> None:
    with pytest.raises(ConfigError, match="invalid key id"):
        KeyRing.generate("no spaces")


def test_parse_rotation_file_with_comments() -> None:
    text = f"# cluster key\n\nk2 : {NEW[1].hex().upper()}   # new, signs\nk1:{OLD[1].hex()}\n"
    ring = KeyRing.parse(text)
    assert ring == KeyRing((NEW, OLD))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("no-colon-here", "expected KEY_ID:HEX_SECRET"),
        (":" + "ab" * 32, "expected KEY_ID:HEX_SECRET"),
        ("k3:" + "zz" * 32, "not an even number of hex digits"),
        ("k3:" + "a" * 65, "not an even number of hex digits"),
        ("k3:", "not an even number of hex digits"),
        ("k3:" + "ab" * 31, "31 bytes; at least 32"),
        ("k1:" + "ab" * 32, "duplicate key id 'k1'"),
    ],
)
def test_parse_errors_name_source_and_line(line: str, message: str) -> None:
    text = f"# keys\nk1:{OLD[1].hex()}\n{line}\n"
    with pytest.raises(ConfigError, match=message) as info:
        KeyRing.parse(text, "/etc/tasync/cluster.key")
    assert str(info.value).startswith("/etc/tasync/cluster.key, line 3: ")
    assert "ab" * 31 not in str(info.value)  # secrets are never echoed


def test_parse_empty_file() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.key: no key found"):
        KeyRing.parse("# only a comment\n", "cluster.key")


def test_load_missing_file_is_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read cluster key file"):
        KeyRing.load(tmp_path / "absent.key")


def test_key_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ENV_CLUSTER_KEY_FILE == "TASYNC_CLUSTER_KEY_FILE"
    assert key_file_from_env({}) is None
    assert key_file_from_env({ENV_CLUSTER_KEY_FILE: "  "}) is None
    assert key_file_from_env({ENV_CLUSTER_KEY_FILE: "/etc/k"}) == Path("/etc/k")
    monkeypatch.setenv(ENV_CLUSTER_KEY_FILE, str(tmp_path / "k"))
    assert key_file_from_env() == tmp_path / "k"
    monkeypatch.delenv(ENV_CLUSTER_KEY_FILE)
    assert key_file_from_env() is None


keys = st.binary(min_size=MIN_SECRET_BYTES, max_size=64)


@given(body=st.binary(max_size=2048), secret=keys)
def test_property_round_trip(body: bytes, secret: bytes) -> None:
    ring = KeyRing((("k", secret),))
    ring.verify(body, ring.sign(body))


@given(body=st.binary(min_size=1, max_size=2048), secret=keys, data=st.data())
def test_property_one_byte_flip_fails(body: bytes, secret: bytes, data: st.DataObject) -> None:
    ring = KeyRing((("k", secret),))
    signature = ring.sign(body)
    index = data.draw(st.integers(0, len(body) - 1))
    mask = data.draw(st.integers(1, 255))
    tampered = body[:index] + bytes([body[index] ^ mask]) + body[index + 1 :]
    with pytest.raises(MessageError, match="bad signature"):
        ring.verify(tampered, signature)


@given(body=st.binary(max_size=512), old=keys, new=keys)
def test_property_rotation_accepts_both(body: bytes, old: bytes, new: bytes) -> None:
    rotating = KeyRing((("new", new), ("old", old)))
    rotating.verify(body, KeyRing((("old", old),)).sign(body))
    rotating.verify(body, rotating.sign(body))


@given(body=st.binary(max_size=256), extra=st.binary(min_size=1, max_size=16), secret=keys)
def test_property_appended_bytes_fail(body: bytes, extra: bytes, secret: bytes) -> None:
    ring = KeyRing((("k", secret),))
    with pytest.raises(MessageError, match="bad signature"):
        ring.verify(body + extra, ring.sign(body))
