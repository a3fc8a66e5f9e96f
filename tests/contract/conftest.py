"""Fixtures for the contract tests: Prism, a strict mock of Intercom built from Intercom's
published OpenAPI description, started once per session on 127.0.0.1; and the path to
the pinned Node tools (tests/contract/package.json, installed by `npm ci`).

Tests that need Node skip, with the reason, only when `node` or `npx` is not on PATH.
With Node present, missing node_modules is an error that says what to run: in CI these
tests must run, never skip quietly.

Prism serves ../shared/intercom-openapi-2.14.events-patched.yaml with one adaptation made
here, for GET /events only. Intercom declares the list query's identity as a form-exploded
object parameter `filter` whose keys exist only inside its `oneOf` branches. Prism 5
(prism-http validator/deserializers/style/form.js, deserializeImplodeObject) builds such
an object from the query keys named in the schema's top-level `properties` only, so it
reads `filter` as {} and answers 422 to every GET /events, even Intercom's own example
`?type=user&user_id=...`. Declaring the same three string properties at the top level
lets Prism see them; it adds no constraint the branches do not already make. Everything
else is served byte for byte, and the fixture fails if the anchor text has moved.
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CONTRACT_DIR = Path(__file__).resolve().parent
ROOT = CONTRACT_DIR.parents[1]
SHARED = ROOT.parent / "shared"
PATCHED_SPEC = SHARED / "intercom-openapi-2.14.events-patched.yaml"
NODE_MODULES = CONTRACT_DIR / "node_modules"
PRISM_BIN = NODE_MODULES / ".bin" / "prism"
PRISM_START_TIMEOUT_S = 90.0  # ~5 s on a quiet machine; CI machines are shared

_FILTER_ANCHOR = (
    "        name: filter\n"
    "        required: true\n"
    "        style: form\n"
    "        explode: true\n"
    "        schema:\n"
    "          type: object\n"
)
_FILTER_PROPERTIES = (
    "          properties:  # test-side: see tests/contract/conftest.py\n"
    "            user_id:\n              type: string\n"
    "            intercom_user_id:\n              type: string\n"
    "            email:\n              type: string\n"
)


def node_missing() -> str | None:
    """Why Node-based tests cannot run here, or None when they can."""
    missing = [tool for tool in ("node", "npx") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not on PATH: Prism and the Node SDK need Node"
    return None


def require_node_modules() -> None:
    reason = node_missing()
    if reason is not None:
        pytest.skip(reason)
    if not PRISM_BIN.exists():
        pytest.fail(f"{PRISM_BIN} is missing: run `npm ci --prefix tests/contract` "
                    "(bash scripts/test.sh does it)", pytrace=False)


def prism_spec(dest: Path) -> Path:
    """The patched description plus the `filter` properties Prism needs (module doc)."""
    if not PATCHED_SPEC.exists():
        pytest.fail(f"{PATCHED_SPEC} is missing: the contract tests need ../shared beside the "
                    "repository", pytrace=False)
    text = PATCHED_SPEC.read_text(encoding="utf-8")
    assert text.count(_FILTER_ANCHOR) == 1, \
        f"GET /events `filter` parameter not found as expected in {PATCHED_SPEC}"
    derived = text.replace(_FILTER_ANCHOR, _FILTER_ANCHOR + _FILTER_PROPERTIES)
    assert derived.replace(_FILTER_PROPERTIES, "", 1) == text
    dest.write_text(derived, encoding="utf-8")
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Prism:
    """A running Prism: its URL and the tail of its log (for failure messages)."""

    url: str
    log: collections.deque[str]

    def log_tail(self, lines: int = 40) -> str:
        return "".join(list(self.log)[-lines:])


def _start_prism(spec: Path) -> tuple[subprocess.Popen[str], Prism]:
    port = _free_port()
    proc = subprocess.Popen(
        [str(PRISM_BIN), "mock", "--host", "127.0.0.1", "--port", str(port), "--errors",
         "--multiprocess", "false", str(spec)],
        cwd=CONTRACT_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
        env={**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"},
    )
    log: collections.deque[str] = collections.deque(maxlen=2000)
    ready = threading.Event()
    listening = f"Prism is listening on http://127.0.0.1:{port}"

    def read() -> None:  # drains the pipe for the whole session, so Prism never blocks
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            if listening in line:
                ready.set()
        ready.set()  # EOF: Prism exited; the waiter checks poll()

    threading.Thread(target=read, name="prism-log", daemon=True).start()
    prism = Prism(f"http://127.0.0.1:{port}", log)
    if not ready.wait(PRISM_START_TIMEOUT_S) or proc.poll() is not None:
        _stop(proc)
        raise RuntimeError(f"Prism did not start within {PRISM_START_TIMEOUT_S:.0f}s:\n"
                           f"{prism.log_tail()}")
    return proc, prism


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def prism(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prism]:
    require_node_modules()
    spec = prism_spec(tmp_path_factory.mktemp("prism") / PATCHED_SPEC.name)
    proc, running = _start_prism(spec)
    try:
        yield running
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def node_sdk() -> Path:
    """The Node SDK client script, once Node and the pinned packages are there."""
    require_node_modules()
    if not (NODE_MODULES / "intercom-client" / "package.json").exists():
        pytest.fail("intercom-client is missing from tests/contract/node_modules: run "
                    "`npm ci --prefix tests/contract`", pytrace=False)
    return CONTRACT_DIR / "node_sdk_client.js"
