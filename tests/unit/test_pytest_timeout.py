"""Every test runs under pytest-timeout's limit from pyproject.toml, so a hang fails that
test, by name, instead of stalling the whole run (issue 12 D20)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def test_this_run_has_a_per_test_timeout(request: pytest.FixtureRequest):
    assert request.config.pluginmanager.hasplugin("timeout")
    assert 0 < float(request.config.getini("timeout")) <= 300  # minutes, not hours


def test_a_test_that_hangs_fails_alone_and_is_named(tmp_path):
    """Steps: a file with a test that never returns, then one that passes, run with the
    plugin and a 1 s limit. Expect: the first fails as a timeout, named in the summary;
    the second still runs and passes."""
    (tmp_path / "test_hang.py").write_text(textwrap.dedent("""
        import threading

        def test_waits_forever():
            threading.Event().wait()

        def test_after_it():
            pass
    """))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "timeout=1",
         "-p", "no:cacheprovider", "-rf", "test_hang.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "Timeout (>1.0s) from pytest-timeout" in done.stdout
    assert "FAILED test_hang.py::test_waits_forever" in done.stdout
    assert "1 failed, 1 passed" in done.stdout
