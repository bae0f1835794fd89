"""No secret in any log line, repr, error message or status output.

``guest`` is too common a password to search for, so this test makes its own secrets: broker
users with generated passwords (``tasync broker setup --users``) and a cluster key file. It
runs a small network with them through normal paths and error paths (wrong vhost, refused
login, unreachable port, bad input, a broken key file), then searches every output and every
log-like file for the secrets in any spelling.

The whole session is guarded too: the autouse, session-scoped ``leak_guard`` fixture of
``tests/conftest.py`` scans every log-like file under pytest's base temporary directory (worker
logs, trails, stderr captures, every ``tasync`` command's output recorded by
``tests.network.Network.cli``) at the very end of the session for every secret any test
registered (``tests.harness.secret_registry``), so a leak in any test is caught (reported as
an error at teardown). When pytest-xdist runs the suite in several processes, each scans its own
files so, and the controller then scans every process's files for every process's secrets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from kombu import Connection

from tasync.broker.connection import make_connection
from tasync.broker.errors import BrokerUnreachable
from tasync.broker.permissions import Account
from tasync.broker.settings import Settings
from tasync.broker.signing import KeyRing
from tasync.broker.users import Outcome
from tests.harness import secret_registry
from tests.network import BrokerAdmin, Network
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


class Outputs:
    """Every command's output, kept in memory and in ``*.out`` files for the session scan."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.texts: list[tuple[str, str]] = []

    def add(self, what: str, text: str) -> None:
        self.texts.append((what, text))
        (self.root / f"output-{len(self.texts):02d}.out").write_text(f"# {what}\n{text}")

    def run(self, network: Network, what: str, *args: str) -> subprocess.CompletedProcess[str]:
        out = network.cli(*args, check=False)
        self.add(what, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out


def _setup_users(admin: BrokerAdmin, broker_url: str, node: str, ops: str, creds: Path,
                 outputs: Outputs) -> dict[str, str]:
    cmd = [sys.executable, "-m", "tasync.cli_broker", "setup", "--broker", broker_url, "--users",
           "--master", node, "--admin", ops, "--credentials-out", str(creds),
           "--rabbitmqctl", " ".join(admin.ctl)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    outputs.add("broker setup --users", out.stdout + out.stderr)
    assert out.returncode == 0, out.stderr
    users = json.loads(creds.read_text())["users"]
    return {name: str(entry["url"]) for name, entry in users.items()}


def _password(url: str) -> str:
    return url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


def test_no_secret_reaches_logs_outputs_or_reprs(
        leak_guard: None, network: Network, broker_admin: BrokerAdmin, broker_url: str,
        tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    node, ops = f"scan{tag}", f"scanops{tag}"
    outputs = Outputs(tmp_path)
    try:
        urls = _setup_users(broker_admin, broker_url, node, ops, tmp_path / "creds.json",
                            outputs)
        node_url, ops_url = urls[node], urls[ops]
        key_file = tmp_path / "cluster.key"
        key_file.write_text(KeyRing.generate("scan"))
        key_file.chmod(0o600)
        key_hex = key_file.read_text().strip().splitlines()[-1].split(":", 1)[1]
        secrets = {_password(node_url): "the node's broker password",
                   _password(ops_url): "the admin's broker password",
                   key_hex: "the cluster key"}
        for secret, label in secrets.items():
            secret_registry.register(label, secret)
        _scenario(network, outputs, node=node, node_url=node_url, ops_url=ops_url,
                  key_file=key_file, tag=tag)
        _check_reprs(node_url, key_file, secrets)
        leaks = secret_registry.find_leaks(outputs.texts, secrets)
        leaks += secret_registry.scan_files(tmp_path, secrets)
        assert not leaks, "secrets leaked:\n" + "\n".join(leaks)
        assert secret_registry.log_files(tmp_path), "the scenario wrote no logs to scan"
    finally:
        network.close()
        for user in (node, ops):
            subprocess.run([*broker_admin.ctl, "delete_user", user], capture_output=True,
                           check=False, timeout=120)


def _scenario(network: Network, outputs: Outputs, *, node: str, node_url: str, ops_url: str,
              key_file: Path, tag: str) -> None:
    keyed = ("--key-file", str(key_file), "-v")
    # Normal path: a master with its own user and the cluster key; status; a change.
    master = network.start(node, role="master",
                           args=("--master", node, "--broker", node_url, *keyed))
    master.wait_ready()
    assert outputs.run(network, "config set", "config", "set", "destination", "ok",
                       "--url", "file:///tmp/ok.jsonl", "--broker", ops_url).returncode == 0
    assert outputs.run(network, "status", "status", "--broker", ops_url).returncode == 0
    assert outputs.run(network, "status --json", "status", "--json",
                       "--broker", ops_url).returncode == 0
    # Bad input.
    assert outputs.run(network, "config set bad json", "config", "set", "destination", "bad",
                       "--json", "{not json", "--broker", ops_url).returncode == 1
    assert outputs.run(network, "config set bad kind", "config", "set", "nosuchkind", "x",
                       "--broker", ops_url).returncode == 2
    # Error paths: refused login, wrong vhost, unreachable port, each from the CLI and a worker.
    password = _password(node_url)
    wrong_login = node_url.replace(f":{password}@", f":{password}-wrong@")
    wrong_vhost = node_url.rsplit("/", 1)[0] + f"/no-such-vhost-{tag}"
    dead_port = node_url.replace(":5672/", ":1/") if ":5672/" in node_url else wrong_vhost
    for what, url, code in (("refused login", wrong_login, 3), ("wrong vhost", wrong_vhost, 3),
                            ("unreachable", dead_port, 3)):
        out = outputs.run(network, f"status with {what}", "status", "--broker", url)
        assert out.returncode == code, out.stderr
        assert out.stderr.startswith("tasync: broker unreachable at ")
    for name, url, expect in ((f"{node}x", wrong_login, "login refused"),
                              (f"{node}y", wrong_vhost, "virtual host refused")):
        worker = network.start(name, args=("--master", node, "--broker", url, *keyed))
        log = worker.data_dir / "tasync.log"
        wait_for(lambda log=log, w=worker, e=expect: e in _read(log) + _read(w.log_path),
                 timeout_s=60, what=f"a worker to report '{expect}'")
        worker.stop()
    broken = key_file.with_name("broken.key")
    broken.write_text(key_file.read_text().rstrip() + "0\n")  # odd number of hex digits
    bad_key = network.start(f"{node}z", args=("--master", node, "--broker", node_url,
                                              "--key-file", str(broken)))
    assert bad_key.proc is not None and bad_key.proc.wait(60) == 1
    master.stop()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _check_reprs(node_url: str, key_file: Path, secrets: dict[str, str]) -> None:
    settings = Settings.from_url(node_url)
    ring = KeyRing.load(key_file)
    conn: Connection = make_connection(settings)
    outcome = Outcome(Account("n", "node"), "created", password=_password(node_url))
    texts = [("repr(Settings)", repr(settings)), ("str(Settings)", str(settings)),
             ("Settings.display_urls", settings.display_urls),
             ("repr(KeyRing)", repr(ring)), ("str(KeyRing)", str(ring)),
             ("repr(kombu Connection)", repr(conn)), ("repr(Outcome)", repr(outcome)),
             ("str(BrokerUnreachable)", str(BrokerUnreachable(
                 f"broker unreachable at {settings.display_urls}")))]
    leaks = secret_registry.find_leaks(texts, secrets)
    assert not leaks, "\n".join(leaks)


def test_the_session_guard_fails_on_a_planted_secret(tmp_path: Path) -> None:
    secret = "planted-" + uuid.uuid4().hex
    secret_registry.register("a planted key", secret)
    try:
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "cli.out").write_text(f"$ tasync status\nexit 3\nkey={secret}\n")
        with pytest.raises(secret_registry.SecretLeak, match=r"cli\.out: contains a planted key"):
            secret_registry.check_tree(tmp_path)
    finally:
        (tmp_path / "x" / "cli.out").write_text("scrubbed\n")  # the real guard runs at the end


def test_the_scanner_finds_a_planted_secret(tmp_path: Path) -> None:
    secret = "s3cr3t/p@ss+" + uuid.uuid4().hex
    (tmp_path / "n1").mkdir()
    (tmp_path / "n1" / "tasync.log").write_text(f"connecting to amqp://u:{secret}@h/\n")
    (tmp_path / "n2.stderr").write_text("amqp://u:" + quote(secret, safe="")
                                        + "@h/\n")
    (tmp_path / "creds.json").write_text(json.dumps({"password": secret}))  # meant to hold it
    leaks = secret_registry.scan_files(tmp_path, {secret: "a planted password"})
    assert sorted(leaks) == [f"{tmp_path / 'n1' / 'tasync.log'}: contains a planted password",
                             f"{tmp_path / 'n2.stderr'}: contains a planted password"]
