#!/usr/bin/env bash
# Set up a machine for tasync: a venv with the package, and a RabbitMQ that answers on 5672.
#   scripts/setup.sh          the package and its runtime dependencies
#   scripts/setup.sh --test   also the test and lint extras, and the programs some tests run
#                             (Alertmanager, promtool, Chromium for the console's browser
#                             tests: apt-get, as root; Playwright drives that Chromium and
#                             never downloads a browser of its own)
# RabbitMQ: use the one at 127.0.0.1:5672 if it answers, else start the installed
# rabbitmq-server, else install it with apt-get (needs root) and start it.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".${extras}"

# Real third-party programs some tests run (they skip, saying why, where one is missing):
# Alertmanager in front of the HTTP intake, promtool for the documented alerting rules,
# Debian's Chromium (and its WebDriver) for the web console's browser tests.
test_tool() {  # COMMAND DEBIAN-PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing $2 with apt-get (for the tests)" >&2
    export DEBIAN_FRONTEND=noninteractive
    { [ -n "${apt_updated:-}" ] || apt-get update -qq; } && apt_updated=1 \
      && apt-get install -y -qq --no-install-recommends "$2" >/dev/null \
      || echo "setup: could not install $2; the tests that need $1 will be skipped" >&2
  else
    echo "setup: $1 missing (needs root and apt-get for $2); its tests will be skipped" >&2
  fi
}
if [ -n "$extras" ]; then
  command -v alertmanager >/dev/null 2>&1 || test_tool prometheus-alertmanager prometheus-alertmanager
  test_tool promtool prometheus
  test_tool chromium chromium
  test_tool chromedriver chromium-driver
fi

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! broker_up; then
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "setup: installing rabbitmq-server with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  echo "setup: starting rabbitmq-server" >&2
  rabbitmq-server -detached || true
  rabbitmqctl await_startup --timeout 120 >/dev/null 2>&1 || true
fi
for _ in $(seq 1 120); do
  broker_up && break
  sleep 1
done
if ! broker_up; then
  echo "setup: RabbitMQ does not answer on 127.0.0.1:5672" >&2
  exit 3
fi
echo "setup: ready (venv in .venv, RabbitMQ on 127.0.0.1:5672)" >&2
