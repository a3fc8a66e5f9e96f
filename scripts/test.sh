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

exec .venv/bin/python -m pytest "$@"
