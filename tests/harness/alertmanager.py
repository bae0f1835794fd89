"""A real Prometheus Alertmanager (Debian's ``prometheus-alertmanager``) for tests.

It runs as its own process with a webhook receiver pointing at a tasync intake, clustering off,
debug logging on (its notification attempts are in the log); tests post alerts to its API as
Prometheus would, resolve them, and read its log.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.harness.intake import stop_process
from tests.waiting import wait_for

BINARY_NAMES = ("prometheus-alertmanager", "alertmanager")
MISSING = ("prometheus-alertmanager is not installed (`scripts/setup.sh --test` installs it "
           "with apt-get when run as root)")


def binary() -> str | None:
    """The Alertmanager executable, or None."""
    return next((path for name in BINARY_NAMES if (path := shutil.which(name))), None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Alertmanager:
    """One Alertmanager with ``config`` (a dict written as YAML) in ``root``."""

    root: Path
    config: dict[str, Any]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.root / "alertmanager.log"

    def start(self) -> Alertmanager:
        executable = binary()
        assert executable, MISSING
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "alertmanager.yml"
        config.write_text(yaml.safe_dump(self.config))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [executable, f"--config.file={config}", f"--storage.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=",
                 "--log.level=debug"], stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, what="Alertmanager ready", timeout_s=60)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def post(self, alerts: list[dict[str, Any]], *, resolved: bool = False) -> None:
        """Send alerts as Prometheus does (``labels``, ``annotations``); resolve them if asked."""
        now = dt.datetime.now(dt.UTC)
        body = [{**a, "startsAt": a.get("startsAt", _stamp(now - dt.timedelta(minutes=1))),
                 **({"endsAt": _stamp(now)} if resolved else {})} for a in alerts]
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/v2/alerts", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)
