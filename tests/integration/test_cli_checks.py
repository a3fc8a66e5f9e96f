"""What the CLI refuses before doing anything, as an operator meets it: `python -m forwarder
...` in a subprocess, configured by a TOML file and FORWARDER_* variables only.

check-config and serve refuse the same configs with the same lines (issue 12 C13);
dead-letters refuses a state dir that is not there and a reason that does not exist (C14).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "dG9rOnNlY3JldC10b2tlbg=="


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m forwarder ARGS` with none of this machine's FORWARDER_/token variables."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("FORWARDER_")
             and k not in ("INTERCOM_ACCESS_TOKEN", "CREDENTIALS_DIRECTORY")}
    return subprocess.run([sys.executable, "-m", "forwarder", *args], cwd=ROOT,
                          env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=30)


def broken_config(tmp_path: Path) -> Path:
    """A config that loads, but that serve cannot start with, three times over: its Unix
    socket's directory is missing, there is no token, and its state dir is under a file."""
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "forwarder.toml"
    path.write_text(f'[intake]\nport = 0\nunix_socket = "{tmp_path}/missing/intake.sock"\n'
                    f'[storage]\nstate_dir = "{tmp_path}/a-file/state"\n')
    return path


# --- check-config and serve (C13) ---------------------------------------------------------


def test_check_config_reports_every_problem_serve_would_meet_at_start_then_passes_when_fixed(
        tmp_path):
    """Steps: check-config on a config with three start-up problems; then the same
    config with a token, the socket directory made, and a state dir that can be created.
    Expect: exit 2, nothing on stdout, one line a problem naming its key; then exit 0
    with the effective config printed."""
    config = broken_config(tmp_path)
    done = run("check-config", "--config", str(config))
    assert (done.returncode, done.stdout) == (2, "")
    lines = done.stderr.splitlines()
    assert [line.split(": ")[2] for line in lines] == [
        "intake.unix_socket", "intercom.access_token", "storage.state_dir"]
    assert all(line.startswith("intercom-forwarder: config error: ") for line in lines)
    assert f"{tmp_path}/missing does not exist" in lines[0]
    assert f"cannot be created: {tmp_path}/a-file is not a directory" in lines[2]

    (tmp_path / "missing").mkdir()
    fixed = run("check-config", "--config", str(config), env={
        "INTERCOM_ACCESS_TOKEN": TOKEN,
        "FORWARDER_STORAGE__STATE_DIR": str(tmp_path / "state")})
    assert (fixed.returncode, fixed.stderr) == (0, "")
    assert f'state_dir = "{tmp_path}/state"' in fixed.stdout
    assert TOKEN not in fixed.stdout


def test_serve_refuses_what_check_config_refuses_with_the_same_lines_before_starting(tmp_path):
    """Expect: exit 2 and exactly check-config's lines on stderr; no log line (nothing
    started, so nothing drained or stopped) and nothing created on disk."""
    config = broken_config(tmp_path)
    checked = run("check-config", "--config", str(config))
    served = run("serve", "--config", str(config), env={"FORWARDER_LOG__FORMAT": "json"})
    assert served.returncode == 2
    assert served.stderr == checked.stderr
    assert served.stdout == ""
    assert not (tmp_path / "missing").exists()


# --- dead-letters (C14) -------------------------------------------------------------------


@pytest.mark.parametrize("action", ["list", "replay"])
@pytest.mark.parametrize("make", [
    pytest.param(lambda tmp: tmp / "no-such-state", id="missing"),
    pytest.param(lambda tmp: (tmp / "a-file").write_text("") and tmp / "a-file",
                 id="a-file"),
])  # fmt: skip
def test_dead_letters_with_no_state_dir_fails_naming_the_directory(tmp_path, action, make):
    state_dir = make(tmp_path)
    done = run("dead-letters", action,
               env={"FORWARDER_STORAGE__STATE_DIR": str(state_dir),
                    "FORWARDER_INTAKE__PORT": "1"})
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"intercom-forwarder: config error: storage.state_dir: "
                                  f"{state_dir} ")
    assert "FORWARDER_STORAGE__STATE_DIR" in done.stderr


@pytest.mark.parametrize("action", ["list", "replay"])
def test_dead_letters_refuses_a_reason_no_dead_letter_can_have(tmp_path, action):
    """A misspelt reason used to match nothing and exit 0, as if there were none."""
    done = run("dead-letters", action, "--reason", "contact-not-found",
               env={"FORWARDER_STORAGE__STATE_DIR": str(tmp_path)})
    assert (done.returncode, done.stdout) == (2, "")
    assert "--reason: invalid choice: 'contact-not-found'" in done.stderr
    for reason in ("contact_not_found", "rejected", "retries_exhausted"):
        assert reason in done.stderr


# --- check-config and the fleet's Redis (issue 14) -------------------------------------------

def test_check_config_says_whether_the_fleets_redis_answers_and_never_shows_its_password(
        tmp_path, redis_server):
    """Expect: Redis up, a note that it answered; Redis down, a warning naming the key,
    exit 0 all the same (serve runs without Redis); the password never printed."""
    env = {"INTERCOM_ACCESS_TOKEN": TOKEN, "FORWARDER_STORAGE__STATE_DIR": str(tmp_path / "s"),
           "FORWARDER_FLEET__REDIS_URL": redis_server.url}
    up = run("check-config", env=env)
    assert up.returncode == 0, up.stderr
    assert "fleet.redis_url: Redis answered PING" in up.stderr
    redis_server.kill()
    env["FORWARDER_FLEET__REDIS_URL"] = f"unix://:hunter2@{redis_server.socket_path}"
    down = run("check-config", env=env)
    assert down.returncode == 0, down.stderr
    assert "warning: fleet.redis_url: Redis did not answer" in down.stderr
    assert "hunter2" not in down.stderr + down.stdout
