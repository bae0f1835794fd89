import re
from pathlib import Path

import pytest

from tasync.broker.allowlist import (
    ALERT_HOSTS_FILE,
    CONFIG_HOSTS_FILE,
    MASTER_HOSTS_FILE,
    AllowList,
    Decision,
    Entry,
)
from tasync.broker.errors import ConfigError

SAMPLE = """\
# masters of the cluster
!backup2            # retired, never again
master1
node-*              # any numbered node
10.0.0.7
!10.1.2.0/24
10.1.0.0/16
fd00:1::/32
"""


@pytest.fixture
def sample() -> AllowList:
    return AllowList.parse(SAMPLE, "tasync.hosts")


def test_file_name_constants() -> None:
    assert (MASTER_HOSTS_FILE, CONFIG_HOSTS_FILE, ALERT_HOSTS_FILE) == (
        "tasync.hosts",
        "telaconf.hosts",
        "telalert.hosts",
    )


def test_parse_entries_kinds_and_line_numbers(sample: AllowList) -> None:
    assert sample.entries == (
        Entry("backup2", True, 2, "name"),
        Entry("master1", False, 3, "name"),
        Entry("node-*", False, 4, "name"),
        Entry("10.0.0.7", False, 5, "ip"),
        Entry("10.1.2.0/24", True, 6, "cidr"),
        Entry("10.1.0.0/16", False, 7, "cidr"),
        Entry("fd00:1::/32", False, 8, "cidr"),
    )
    assert sample.source == "tasync.hosts"


def test_allowed_by_name_with_reason(sample: AllowList) -> None:
    decision = sample.check("master1")
    assert decision == Decision(True, sample.entries[1], "allowed by line 3 'master1'")
    assert decision


def test_deny_entry(sample: AllowList) -> None:
    decision = sample.check("backup2")
    assert not decision.allowed
    assert not decision
    assert decision.reason == "denied by line 2 '!backup2'"


def test_no_match_is_default_deny(sample: AllowList) -> None:
    decision = sample.check("stranger", "192.168.0.1")
    assert decision == Decision(False, None, "no entry in tasync.hosts matches; default deny")


def test_no_identities_is_denied(sample: AllowList) -> None:
    assert not sample.check().allowed
    assert not sample.check(None, "", "  ").allowed


def test_first_match_wins_in_file_order() -> None:
    allow_first = AllowList.parse("backup2\n!backup2\n")
    deny_first = AllowList.parse("!backup2\nbackup2\n")
    assert allow_first.check("backup2").allowed
    assert not deny_first.check("backup2").allowed


def test_first_matching_entry_for_any_identity_decides() -> None:
    # The user 'svc' is allowed on line 1, but the node name is denied on line 2: line 1 wins.
    acl = AllowList.parse("svc\n!backup2\n")
    assert acl.check("backup2", "svc").entry == acl.entries[0]
    # Reversed file order: the deny comes first and decides, whatever the identity order.
    acl = AllowList.parse("!backup2\nsvc\n")
    decision = acl.check("svc", "backup2")
    assert not decision.allowed
    assert decision.entry == acl.entries[0]


def test_names_are_case_insensitive() -> None:
    acl = AllowList.parse("Master1\n")
    assert acl.entries[0].pattern == "master1"
    assert acl.check("MASTER1").allowed
    assert acl.check("master1").allowed


def test_glob_names(sample: AllowList) -> None:
    assert sample.check("node-17").allowed
    assert sample.check("NODE-a").allowed
    assert not sample.check("node17").allowed
    acl = AllowList.parse("!*.test\nweb[12].example.com\n*\n")
    assert not acl.check("host.test").allowed
    assert acl.check("web1.example.com").entry == acl.entries[1]
    assert acl.check("anything").entry == acl.entries[2]
    # A name glob never matches an address.
    assert not acl.check("10.0.0.1").allowed


def test_ip_entry_matches_ip_identity_only(sample: AllowList) -> None:
    assert sample.check("10.0.0.7").allowed
    assert not sample.check("10.0.0.8").allowed
    # A name identity that merely looks like something else does not match an address entry.
    acl = AllowList.parse("10.0.0.7\n")
    assert not acl.check("host-10.0.0.7").allowed


def test_cidr_v4(sample: AllowList) -> None:
    assert sample.check("10.1.200.3").allowed
    denied = sample.check("10.1.2.9")
    assert not denied.allowed
    assert denied.reason == "denied by line 6 '!10.1.2.0/24'"
    assert not sample.check("10.2.0.1").allowed


def test_cidr_v6_and_normalisation(sample: AllowList) -> None:
    assert sample.check("fd00:1:0:0::5").allowed
    assert sample.check("[fd00:1::5]").allowed
    assert not sample.check("fd00:2::5").allowed
    acl = AllowList.parse("2001:DB8:0::1\n")
    assert acl.entries[0] == Entry("2001:db8::1", False, 1, "ip")
    assert acl.check("2001:db8::1").allowed


def test_ipv4_mapped_ipv6_matches_ipv4_entries(sample: AllowList) -> None:
    assert sample.check("::ffff:10.0.0.7").allowed
    assert sample.check("::ffff:10.1.3.4").allowed


def test_ipv4_and_ipv6_do_not_cross_match() -> None:
    acl = AllowList.parse("10.0.0.0/8\n::/0\n")
    assert acl.check("10.9.9.9").entry == acl.entries[0]
    assert acl.check("fe80::1").entry == acl.entries[1]


def test_comments_and_blank_lines() -> None:
    text = "\n   \n# whole line\n  master1   # trailing\n\t!backup2#tight\n"
    acl = AllowList.parse(text)
    assert acl.entries == (Entry("master1", False, 4, "name"), Entry("backup2", True, 5, "name"))


def test_bang_with_space_before_name() -> None:
    assert AllowList.parse("! backup2\n").entries == (Entry("backup2", True, 1, "name"),)


def test_empty_text_denies_everybody() -> None:
    acl = AllowList.parse("# nothing here\n")
    assert acl.entries == ()
    assert acl.check("master1").reason == "<text> has no entries; default deny"


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / MASTER_HOSTS_FILE
    path.write_text(SAMPLE, encoding="utf-8")
    acl = AllowList.load(path)
    assert acl.source == str(path)
    assert acl.check("master1").allowed


def test_missing_file_denies_everybody(tmp_path: Path) -> None:
    path = tmp_path / MASTER_HOSTS_FILE
    acl = AllowList.load(path)
    assert acl.entries == ()
    assert acl.source == f"{path} (missing)"
    decision = acl.check("master1", "127.0.0.1")
    assert not decision.allowed
    assert "(missing)" in decision.reason
    assert acl.explain() == [f"{path} (missing): no entries; everybody is denied"]


def test_unreadable_path_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read allow-list"):
        AllowList.load(tmp_path)  # a directory


def test_single_master() -> None:
    acl = AllowList.single("master1")
    assert acl.source == "--master master1"
    assert acl.entries == (Entry("master1", False, 0, "name"),)
    decision = acl.check("Master1")
    assert decision.allowed
    assert decision.reason == "allowed by --master master1 'master1'"
    assert not acl.check("backup1").allowed


def test_single_master_by_address() -> None:
    acl = AllowList.single("10.0.0.7")
    assert acl.entries[0].kind == "ip"
    assert acl.check("backup1", "10.0.0.7").allowed


def test_single_master_invalid() -> None:
    with pytest.raises(ConfigError, match="--master"):
        AllowList.single("two words")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("10.0.0.0/33", "invalid network"),
        ("10.0.0.1/24", "host bits set"),
        ("fd00::/129", "invalid network"),
        ("!", "'!' without"),
        ("!   # just a comment", "'!' without"),
        ("two words", "one entry per line"),
        ("!two words", "one entry per line"),
        ("10.0.0.300", "invalid IP address"),
        ("fd00::zz", "invalid IP address"),
        ("bad/name", "invalid network"),
        ("bad,name", "invalid name"),
        ("10.0.0.*", "use CIDR"),
    ],
)
def test_invalid_lines_name_file_and_line(line: str, message: str) -> None:
    text = f"master1\n# comment\n{line}\n"
    with pytest.raises(ConfigError, match=message) as info:
        AllowList.parse(text, "/etc/tasync/tasync.hosts")
    assert str(info.value).startswith("/etc/tasync/tasync.hosts, line 3: ")


def test_invalid_line_in_loaded_file(tmp_path: Path) -> None:
    path = tmp_path / ALERT_HOSTS_FILE
    path.write_text("ok\n\n!\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}, line 3: ")):
        AllowList.load(path)


def test_explain(sample: AllowList) -> None:
    assert sample.explain() == [
        "line 2: deny name backup2",
        "line 3: allow name master1",
        "line 4: allow name node-* (glob)",
        "line 5: allow address 10.0.0.7",
        "line 6: deny network 10.1.2.0/24",
        "line 7: allow network 10.1.0.0/16",
        "line 8: allow network fd00:1::/32",
        "anything else: deny",
    ]


def test_entry_str() -> None:
    assert str(Entry("backup2", True, 1, "name")) == "!backup2"
    assert str(Entry("10.0.0.0/8", False, 1, "cidr")) == "10.0.0.0/8"
