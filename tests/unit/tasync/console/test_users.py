"""The console's users file: argon2 hashes written owner-only, read again when it changes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tasync.broker.errors import ConfigError
from tasync.console.users import UsersFile, add_user, parse


def test_a_user_is_added_hashed_and_verified(tmp_path: Path) -> None:
    path = tmp_path / "users"
    assert add_user(path, "alice", "admin", "correct horse") is True
    text = path.read_text()
    assert text.startswith("alice:admin:$argon2id$") and "correct horse" not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = UsersFile(path)
    assert users.verify("alice", "correct horse") == users.get("alice")
    assert users.verify("alice", "wrong horse") is None
    assert users.verify("nobody", "correct horse") is None


def test_the_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(path, "alice", "viewer", "correct horse")
    users = UsersFile(path)
    assert users.get("alice") is not None and not users.get("alice").may("admin")  # type: ignore[union-attr]
    assert add_user(path, "alice", "admin", "another horse") is False  # replaced, not added
    add_user(path, "bob", "operator", "third horse!")
    alice = users.get("alice")
    assert alice is not None and alice.may("admin") and alice.may("viewer")
    assert users.verify("alice", "correct horse") is None
    assert users.count() == 2
    path.write_text("# nobody\n")
    assert users.get("alice") is None


@pytest.mark.parametrize(("name", "role", "password", "says"), [
    ("al ice", "admin", "correct horse", "user name"),
    ("<script>", "admin", "correct horse", "user name"),
    ("alice", "root", "correct horse", "unknown role"),
    ("alice", "admin", "short", "at least 8"),
])
def test_bad_input_is_refused(tmp_path: Path, name: str, role: str, password: str,
                              says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        add_user(tmp_path / "users", name, role, password)
    assert not (tmp_path / "users").exists()


def test_a_damaged_line_is_named_without_quoting_it() -> None:
    with pytest.raises(ConfigError, match="line 2 is not") as caught:
        parse("alice:admin:$argon2id$x\nbob:admin:plaintext-secret\n", where="users")
    assert "plaintext-secret" not in str(caught.value)
