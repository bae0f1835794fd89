"""A real ``tasync intake`` process for tests: started, its address read, stopped."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def stop_process(proc: subprocess.Popen[Any] | None, timeout_s: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL if it does not end in time; its exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    return proc.returncode


@dataclass
class IntakeProcess:
    """``python -m tasync intake --listen 127.0.0.1:0 ARGS``, its stderr in ``log_path``."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    address: str = ""
    proc: subprocess.Popen[str] | None = field(default=None, repr=False)

    def start(self) -> IntakeProcess:
        with open(self.log_path, "a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tasync", "intake", "--listen", "127.0.0.1:0",
                 *self.args], stdout=subprocess.PIPE, stderr=err, text=True, env=self.env)
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address, f"the intake did not start: {self.log_path.read_text()[-2000:]}"
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        return stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: Any = None, *,
                headers: dict[str, str] | None = None, timeout_s: float = 60.0
                ) -> tuple[int, dict[str, str], Any]:
        """``(status, headers, JSON answer)`` of one request on a fresh connection."""
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        conn = http.client.HTTPConnection(self.address, timeout=timeout_s)
        try:
            conn.request(method, path, body=data, headers=headers or {})
            response = conn.getresponse()
            payload = response.read()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    json.loads(payload) if payload else None)
        finally:
            conn.close()

    def timed(self, method: str, path: str, body: Any = None, **kw: Any
              ) -> tuple[float, int, dict[str, str], Any]:
        """``request`` and how long it took (reported by tests, never asserted)."""
        start = time.monotonic()
        status, headers, answer = self.request(method, path, body, **kw)
        return time.monotonic() - start, status, headers, answer
