#!/usr/bin/env bash
# Set up everything the tests need and run the whole suite: Python deps in
# .venv, and from Debian packages redis-server, chromium, chromium-driver, firefox-esr,
# coturn (a real TURN server), prometheus (for promtool, which checks the shipped
# alert rules and dashboard queries) and postgresql (the tests start their own server from a
# temporary data dir for the event log's PostgreSQL backend) when missing. Extra arguments go to pytest. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
[ -x /usr/bin/firefox-esr ] || missing+=(firefox-esr)
command -v turnserver >/dev/null 2>&1 || missing+=(coturn)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.openconsult-test-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  touch "$stamp"
fi

# Types are part of the suite (pyproject.toml [tool.mypy]: untyped defs refused, tests included).
echo "Type check: mypy"
.venv/bin/python -m mypy signalling media metrics rooms loadtest tests benchmarks

status=0
.venv/bin/python -m pytest -p no:cacheprovider "$@" || status=$?
# pytest exits 5 when nothing was collected: that is a failure here, not a pass.
exit $status
