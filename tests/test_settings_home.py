"""Every environment variable is read in ``broker/settings.py``, and nowhere else.

A reader looking for what can be set finds it in one module, typed and with units; the rest
of the code receives settings. Passing the environment on to a child process (the demo's
workers, a private broker) or searching ``$PATH`` for a program is not reading a setting.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: file -> why it may touch the environment
MAY_TOUCH = {
    "broker/settings.py": "the home of settings",
    "broker/users.py": "searches $PATH for rabbitmqctl",
    "tasync/demo_network.py": "passes the environment on to the demo's workers",
    "tasync/private_broker.py": "passes the environment on to a private RabbitMQ",
}
READS = re.compile(r"os\.environ|os\.getenv|getenv\(")


def test_environment_read_only_in_the_settings_module() -> None:
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for package in ("broker", "producers", "consumers", "tasync")
             for path in sorted((ROOT / package).rglob("*.py"))
             if str(path.relative_to(ROOT)) not in MAY_TOUCH
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if READS.search(line)]
    assert found == []
