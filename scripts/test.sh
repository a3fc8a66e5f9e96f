#!/usr/bin/env bash
# Installs everything the test suite needs from scratch, then runs it.
# This is README.md's test command and what CI (.ci/run) calls.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

exec .venv/bin/python -m pytest "$@"
