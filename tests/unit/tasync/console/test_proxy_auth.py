import pytest

from tasync.console.proxy_auth import ProxyAuth, is_loopback, parse_proxies


def test_without_trusted_proxies_only_loopback_peers_are_believed() -> None:
    auth = ProxyAuth("x-remote-user")
    assert auth.trusts("127.0.0.1") and auth.trusts("127.0.0.2") and auth.trusts("::1")
    assert auth.trusts("::ffff:127.0.0.1")  # a loopback peer on a dual-stack socket
    assert not auth.trusts("10.0.0.2") and not auth.trusts("") and not auth.trusts(None)
    assert not auth.trusts("not an address")


def test_trusted_proxies_replace_loopback() -> None:
    auth = ProxyAuth("x-remote-user", parse_proxies(["10.0.0.0/24", " 192.0.2.7 ", "2001:db8::1"]))
    assert auth.trusts("10.0.0.200") and auth.trusts("192.0.2.7") and auth.trusts("2001:db8::1")
    assert auth.trusts("::ffff:10.0.0.3")
    assert not auth.trusts("127.0.0.1") and not auth.trusts("10.0.1.1")


def test_a_bad_proxy_address_is_named() -> None:
    with pytest.raises(ValueError, match=r"'proxy\.example' is not an IP address"):
        parse_proxies(["10.0.0.1", "proxy.example"])


def test_loopback_listening_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    assert not is_loopback("console.example")
