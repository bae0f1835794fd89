"""Broker settings from URLs and the environment (broker/settings.py)."""

import pytest

from tasync.broker.settings import (
    DEFAULT_BROKER_URL,
    ENV_BROKER_URL,
    Settings,
    redact_url,
    split_urls,
    vhost_of,
)


def test_from_url_with_several_urls() -> None:
    s = Settings.from_url(" amqp://u:p1@h1:5672/prod ; ;amqps://u:p2@h2:5671/prod;")
    assert s.broker_urls == ("amqp://u:p1@h1:5672/prod", "amqps://u:p2@h2:5671/prod")
    assert s.vhost == "prod"


def test_from_url_passes_overrides() -> None:
    s = Settings.from_url("amqp://h/", prefetch=7, batch_max_changes=3)
    assert (s.prefetch, s.batch_max_changes) == (7, 3)


def test_memory_transport_is_allowed() -> None:
    assert split_urls("memory://") == ("memory://",)


def test_scheme_is_case_insensitive() -> None:
    assert split_urls("AMQP://h/") == ("AMQP://h/",)


@pytest.mark.parametrize("url", ["http://u:pw@h/", "redis://h", "h:5672", "amqp://h;mqtt://h"])
def test_bad_scheme_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported broker URL scheme"):
        Settings.from_url(url)


def test_bad_scheme_error_hides_the_password() -> None:
    with pytest.raises(ValueError) as info:
        split_urls("http://user:topsecret@h/")
    assert "topsecret" not in str(info.value)
    assert "user:***@h" in str(info.value)


@pytest.mark.parametrize("value", ["", " ", ";", " ; ; "])
def test_no_url_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="no broker URL"):
        split_urls(value)


def test_repr_and_display_urls_hide_passwords() -> None:
    s = Settings.from_url("amqp://alice:s3cret@h1/%2F;amqp://bob:hunter2@h2:5673/v")
    for shown in (repr(s), str(s), s.display_urls):
        assert "s3cret" not in shown
        assert "hunter2" not in shown
    assert s.display_urls == "amqp://alice:***@h1/%2F;amqp://bob:***@h2:5673/v"
    assert "alice:***@h1" in repr(s)


@pytest.mark.parametrize(("url", "shown"), [
    ("amqp://u:p@h:1/v", "amqp://u:***@h:1/v"),
    ("amqp://u:p%40ss@h/", "amqp://u:***@h/"),
    ("amqp://u:p@ss@h/", "amqp://u:***@h/"),
    ("amqp://u:@h/", "amqp://u:***@h/"),
    ("amqp://u@h/", "amqp://u@h/"),
    ("amqp://h/", "amqp://h/"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(("url", "vhost"), [
    ("amqp://h/%2F", "/"), ("amqp://h/", "/"), ("amqp://h", "/"), ("amqp://h:5672/prod", "prod"),
    ("amqp://h/a%2Fb", "a/b"), ("amqp://u:p@h/t%C3%A9st", "tést"),
    ("amqp://h/%2Fstaging", "/staging"),
])
def test_vhost_of(url: str, vhost: str) -> None:
    assert vhost_of(url) == vhost


def test_vhost_is_that_of_the_first_url() -> None:
    assert Settings.from_url("amqp://h1/one;amqp://h2/two").vhost == "one"


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BROKER_URL, raising=False)
    assert Settings.from_env().broker_urls == (DEFAULT_BROKER_URL,)
    assert Settings.from_env().vhost == "/"
    monkeypatch.setenv(ENV_BROKER_URL, "amqp://envhost/e")
    assert Settings.from_env().broker_urls == ("amqp://envhost/e",)
    assert Settings.from_env("amqp://given/g").broker_urls == ("amqp://given/g",)


def test_with_returns_a_changed_copy() -> None:
    s = Settings()
    t = s.with_(prefetch=5)
    assert (s.prefetch, t.prefetch) == (64, 5)
    assert t.broker_urls == s.broker_urls
    with pytest.raises(AttributeError):
        s.prefetch = 1  # type: ignore[misc]
