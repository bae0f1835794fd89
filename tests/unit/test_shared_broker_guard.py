"""Tests never stop, restart, alarm or reconfigure the broker everyone on the machine shares."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli_contract import ROOT
from tests.network import BROKER_WIDE_VERBS, BrokerAdmin, SharedBrokerGuard

#: Where broker-wide verbs may appear: the harness that runs private nodes, and the guard.
MAY_NAME_THEM = {ROOT / "tests" / "network.py", ROOT / "tests" / "unit" / Path(__file__).name}
PRIVATE_HARNESS = ROOT / "tests" / "harness"


@pytest.mark.parametrize("args", [
    ("stop_app",), ("start_app",), ("-n", "rabbit@x", "stop_app"), ("stop",),
    ("set_vm_memory_high_watermark", "0.0001"), ("set_disk_free_limit", "1000GB"),
    ("close_all_connections", "bye"), ("change_password", "guest"), ("delete_user", "guest"),
    ("set_permissions", "guest", ".*", ".*", ".*"),
    ("set_permissions", "-p", "/", "someone", ".*", ".*", ".*"), ("delete_vhost", "/"),
])
def test_the_shared_broker_admin_refuses(args: tuple[str, ...]) -> None:
    admin = BrokerAdmin(host="127.0.0.1", port=5672, ctl=["false"])
    with pytest.raises(SharedBrokerGuard):
        admin.rabbitmqctl(*args)


def test_what_tests_need_stays_allowed() -> None:
    admin = BrokerAdmin(host="127.0.0.1", port=5672, ctl=["true"])
    for args in [("list_vhosts",), ("add_vhost", "t-x"), ("close_connection", "<0.1.0>", "x"),
                 ("set_permissions", "-p", "t-x", "guest", ".*", ".*", ".*"),
                 ("delete_user", "m1a2b3c"), ("list_permissions", "-p", "/")]:
        admin.rabbitmqctl(*args)


def test_no_test_names_a_broker_wide_verb_outside_the_private_harness() -> None:
    """Also catches a verb run without ``BrokerAdmin`` (``subprocess.run([... "stop_app"])``).

    Only the verbs no other code says (``stop_app``, not ``stop`` or ``reset``) are searched.
    """
    verbs = sorted(v for v in BROKER_WIDE_VERBS if "_" in v)
    quoted = re.compile("[\"']({})[\"']".format("|".join(verbs)))
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path in MAY_NAME_THEM or PRIVATE_HARNESS in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if quoted.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_the_vhost_pool_evaluates_only_on_its_own_vhosts() -> None:
    """``eval`` stays refused; the pool's one expression touches only ``t-pool-`` vhosts."""
    admin = BrokerAdmin(host="127.0.0.1", port=5672, ctl=["true"])
    for names in (["/"], ["t-pool-0123456789abcdef", "other"], ['t-pool-0123456789abcdef">>']):
        with pytest.raises(SharedBrokerGuard, match="not test vhosts"):
            admin.delete_vhosts(names)
    admin.add_vhosts(["t-pool-0123456789abcdef"])  # ``true`` stands in for rabbitmqctl
    with pytest.raises(SharedBrokerGuard):
        admin.rabbitmqctl("eval", "ok.")
