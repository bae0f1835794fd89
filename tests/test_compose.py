"""Compose file, Dockerfile, env example and systemd units, checked against the code.

No Docker engine is needed: the files are parsed, and every command line in them is parsed by
the real click command it names (``tests.cli_contract``), so a renamed option or a new package
the Dockerfile does not copy fails here instead of at an operator's ``docker compose up``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasync.broker.allowlist import AllowList
from tasync.broker.settings import split_urls, vhost_of
from tests.cli_contract import ROOT, check_argv, console_scripts

COMPOSE = ROOT / "compose"
RABBIT_TOOLS = {"rabbitmqctl", "rabbitmq-diagnostics", "rabbitmq-server", "rabbitmq-plugins",
                "rabbitmq-queues", "rabbitmq-upgrade"}
SHELLS = {"bash", "sh"}
_VAR_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|([A-Za-z_][A-Za-z0-9_]*))")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def env_example() -> dict[str, str]:
    values = {}
    for line in (COMPOSE / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=VALUE: {line!r}"
            values[name] = value
    return values


def argv(value: Any) -> list[str]:
    """A command or entrypoint as argv (Compose accepts a list or a shell-style string)."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else shlex.split(str(value))


def built_here(service: dict[str, Any]) -> bool:
    return "build" in service


def strings(node: Any) -> list[str]:
    """Every string value in a parsed YAML tree (keys of mappings too)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*strings(k), *strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def referenced_variables() -> set[str]:
    found: set[str] = set()
    for text in strings(compose()):
        for match in _VAR_RE.finditer(text.replace("$$", "")):
            found.add(match.group(1) or match.group(2))
    return found


def tasync_commands() -> list[tuple[str, list[str]]]:
    """``(service, argv)`` of every service that runs a console script."""
    found = []
    for name, service in services().items():
        command = argv(service.get("entrypoint")) + argv(service.get("command"))
        if command and command[0] in console_scripts():
            found.append((name, command))
    return found


# -- images and commands ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(services()))
def test_every_image_is_rabbitmq_or_built_from_our_dockerfile(name: str) -> None:
    service = services()[name]
    if built_here(service):
        build = service["build"]
        assert (COMPOSE / build["context"]).resolve() == ROOT, "build from the repository root"
        assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == \
            COMPOSE / "Dockerfile"
    else:
        assert str(service["image"]).startswith("rabbitmq:3."), service["image"]


@pytest.mark.parametrize("name", sorted(services()))
def test_every_executable_exists(name: str) -> None:
    service = services()[name]
    command = argv(service.get("entrypoint")) + argv(service.get("command"))
    health = [str(t) for t in (service.get("healthcheck") or {}).get("test", [])[1:]]
    if built_here(service):
        assert command and command[0] in console_scripts(), command
        assert not health or health[0] in ("python", *console_scripts()), health
        return
    assert not health or health[0] in RABBIT_TOOLS, health
    if not command:
        return  # the image's own rabbitmq-server
    if command[0] in SHELLS:
        script = command[-1]
        words = [shlex.split(part)[0] for part in re.split(r"&&|\|\||;|\n", script)
                 if part.strip()]
        assert words and set(words) <= RABBIT_TOOLS, f"{name} runs {words}"
    else:
        assert command[0] in RABBIT_TOOLS, command


@pytest.mark.parametrize(("name", "command"), tasync_commands(),
                         ids=[n for n, _ in tasync_commands()])
def test_every_option_exists_in_the_code(name: str, command: list[str]) -> None:
    verdict = check_argv(command)
    if verdict.pending:
        pytest.xfail(f"{name}: {verdict.pending}")
    assert verdict.error is None, f"{name}: {verdict.error}"


def test_workers_form_one_network() -> None:
    workers = {name: check_argv(cmd).params or {} for name, cmd in tasync_commands()
               if cmd[0] == "tasync-worker"}
    assert len(workers) >= 3
    commands = dict(tasync_commands())
    nodes = [cmd[cmd.index("--node") + 1] for name, cmd in commands.items() if name in workers]
    assert len(set(nodes)) == len(nodes), f"node names repeat: {nodes}"
    masters = [n for n, c in commands.items() if "--role" in c and
               c[c.index("--role") + 1] == "master"]
    assert len(masters) == 1, f"exactly one worker starts as master, not {masters}"
    for name in workers:
        cmd, service = commands[name], services()[name]
        data_dir = cmd[cmd.index("--data-dir") + 1]
        mounts = [str(v).split(":") for v in service.get("volumes", [])]
        assert any(m[1] == data_dir for m in mounts), f"{name}: {data_dir} is not a volume"
        if "--hosts-file" in cmd:
            inside = cmd[cmd.index("--hosts-file") + 1]
            source = next(m[0] for m in mounts if m[1] == inside)
            allow = AllowList.load(COMPOSE / source)
            assert allow.entries, f"{source} is missing or empty"
            master = commands[masters[0]]
            assert allow.check(master[master.index("--node") + 1]), \
                f"{source} does not allow the master"


def test_published_ports_are_loopback_only() -> None:
    for name, service in services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} to the world"


# -- environment --------------------------------------------------------------------------------


def test_env_example_defines_every_variable_and_nothing_else() -> None:
    referenced = referenced_variables()
    defined = set(env_example())
    assert referenced - defined == set(), "compose uses variables .env.example lacks"
    assert defined - referenced == set(), ".env.example defines variables compose never uses"


def test_broker_url_names_every_rabbit_node_and_the_vhost() -> None:
    env = env_example()
    urls = split_urls(env["CLUSTER_BROKER_URL"])
    rabbits = {n for n, s in services().items() if str(s.get("image", "")).startswith("rabbitmq")
               and "hostname" in s}
    assert {u.split("@", 1)[1].split(":")[0] for u in urls} == rabbits
    definitions = json.loads((COMPOSE / "rabbitmq" / "definitions.json").read_text())
    vhosts = {v["name"] for v in definitions["vhosts"]}
    assert {vhost_of(u) for u in urls} <= vhosts
    assert all(f"{env['RABBITMQ_ADMIN_USER']}:" in u for u in urls)
    for tasync_service in (s for s in services().values() if built_here(s)):
        assert tasync_service["environment"]["TASYNC_BROKER_URL"].startswith(
            "${CLUSTER_BROKER_URL")
        assert tasync_service["environment"]["TASYNC_CLUSTER_KEY_FILE"] == \
            "/run/secrets/cluster_key"


def test_definitions_hold_the_vhost_not_the_topology() -> None:
    """The topology's arguments come from Settings via `tasync broker setup`; a copy here
    could differ and make every worker's declare fail with PRECONDITION_FAILED."""
    definitions = json.loads((COMPOSE / "rabbitmq" / "definitions.json").read_text())
    (vhost,) = definitions["vhosts"]
    assert vhost["metadata"]["default_queue_type"] == "quorum"
    assert definitions["queues"] == definitions["exchanges"] == definitions["bindings"] == []
    assert definitions["users"] == [], "no password hash belongs in the repository"


def test_rabbit_nodes_discover_each_other() -> None:
    conf = (COMPOSE / "rabbitmq" / "rabbitmq.conf").read_text()
    assert "cluster_formation.peer_discovery_backend = classic_config" in conf
    listed = set(re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+ = (\S+)$", conf,
                            re.MULTILINE))
    rabbits = {n: s for n, s in services().items() if "hostname" in s and not built_here(s)}
    assert listed == {f"rabbit@{s['hostname']}" for s in rabbits.values()}
    assert len(rabbits) == 3
    for name, service in rabbits.items():
        assert "./rabbitmq/rabbitmq.conf:/etc/rabbitmq/rabbitmq.conf:ro" in service["volumes"]
        assert service["environment"]["RABBITMQ_ERLANG_COOKIE"].startswith(
            "${RABBITMQ_ERLANG_COOKIE"), f"{name} must share the cookie"
        assert service["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]


def test_secrets_stay_out_of_git() -> None:
    assert ".env" in (COMPOSE / ".gitignore").read_text().split()
    assert "*" in (COMPOSE / "secrets" / ".gitignore").read_text().split()


# -- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_installs_every_package_of_the_project() -> None:
    text = (COMPOSE / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    # The folders the build reads: tasync/ and those package-dir maps into it (broker/, ...).
    packages = {"tasync", *setuptools["package-dir"].values()}
    copied = re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE)
    assert "pyproject.toml" in copied
    assert packages <= set(copied), f"the image would lack {packages - set(copied)}"
    assert re.search(r"^FROM python:3\.11-slim", text, re.MULTILINE)
    assert re.search(r"pip install \.", text)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "run as an unprivileged user"
    ignore = (COMPOSE / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and "compose/secrets" in ignore


# -- systemd --------------------------------------------------------------------------------------


def units() -> list[Path]:
    return sorted((COMPOSE / "systemd").glob("*.service"))


def unit_settings(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.parametrize("path", units(), ids=lambda p: p.name)
def test_unit_runs_an_existing_command_with_existing_options(path: Path) -> None:
    settings = unit_settings(path)
    (exec_start,) = settings["ExecStart"]
    words = [w for w in shlex.split(exec_start.replace("%i", "a"))
             if not w.startswith("$")]  # $VARIABLES expand to the env file's extra arguments
    assert Path(words[0]).name in console_scripts()
    verdict = check_argv([Path(words[0]).name, *words[1:]])
    if verdict.pending:
        pytest.xfail(verdict.pending)
    assert verdict.error is None, verdict.error
    if settings.get("Type") != ["oneshot"]:  # a long-running service, not a periodic check
        assert settings["Restart"] == ["on-failure"]
        assert settings["KillSignal"] == ["SIGTERM"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["User"] and settings["User"] != ["root"]
    assert settings["EnvironmentFile"][0].startswith("/etc/tasync/")


def test_worker_unit_is_per_node_and_may_write_only_its_data_dir() -> None:
    path = COMPOSE / "systemd" / "tasync-worker@.service"
    settings = unit_settings(path)
    (exec_start,) = settings["ExecStart"]
    words = shlex.split(exec_start)
    assert words[words.index("--node") + 1] == "%i"
    data_dir = words[words.index("--data-dir") + 1]
    assert settings["ReadWritePaths"] == [data_dir]
    assert settings["EnvironmentFile"] == ["/etc/tasync/%i.env"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("path", units(), ids=lambda p: p.name)
def test_unit_has_no_unknown_or_invalid_setting(path: Path, tmp_path: Path) -> None:
    name = path.name.replace("@.service", "@a.service")
    (tmp_path / name).write_text(path.read_text())
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
                         capture_output=True, text=True, timeout=60, check=False)
    # The executable only exists on an installed host; every other complaint is a mistake.
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "is not executable" not in line]
    assert problems == []
