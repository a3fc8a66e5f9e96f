#!/usr/bin/env bash
# Installs everything the test suite needs from scratch, then runs it.
# This is README.md's test command and what CI (.ci/run) calls.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

# Node tools for tests/contract (Prism, Intercom's Node SDK), exactly as locked. Without
# npm those tests skip and say why. The stamp skips a second `npm ci` of the same lock.
if command -v npm >/dev/null 2>&1; then
  lock_sum=$(sha256sum tests/contract/package-lock.json | cut -d' ' -f1)
  if [ "$(cat tests/contract/node_modules/.ci-lock-sha256 2>/dev/null)" != "$lock_sum" ]; then
    npm ci --prefix tests/contract --no-audit --no-fund --loglevel=error >/dev/null
    echo "$lock_sum" > tests/contract/node_modules/.ci-lock-sha256
  fi
fi

# A real redis-server for the fleet tests (issue 14), started by the tests on a Unix socket
# in a temporary directory. Debian's package when missing and we can install it; without
# it those tests skip and say why (CI: .ci/run requires it).
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
if [ "${CI_REQUIRE_REDIS_SERVER:-}" = 1 ] && ! command -v redis-server >/dev/null 2>&1; then
  echo "scripts/test.sh: redis-server not found; the fleet tests need it" >&2
  exit 1
fi

exec .venv/bin/python -m pytest "$@"
