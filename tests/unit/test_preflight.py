"""forwarder.preflight: what `serve` would refuse at start, found without starting it.
One row per rule; each builds its case in tmp_path."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest

from forwarder.config import Config, IntakeConfig, IntercomConfig, Secret, StorageConfig
from forwarder.preflight import preflight

AS_ROOT = os.geteuid() == 0
needs_non_root = pytest.mark.skipif(AS_ROOT, reason="root may write any directory")


def config(tmp_path: Path, *, token: str = "t0k3n", state_dir: Path | None = None,
           unix_socket: str = "") -> Config:
    """A config serve would start with, but for what the row changes."""
    return Config(
        intake=IntakeConfig(port=0, unix_socket=unix_socket),
        intercom=IntercomConfig(access_token=Secret(token)),
        storage=StorageConfig(state_dir=str(state_dir or tmp_path / "state")),
    )


def a_file(path: Path) -> Path:
    path.write_text("not a directory")
    return path


def read_only_dir(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o500)
    return path


REFUSED: list = [
    pytest.param(lambda tmp: config(tmp, token=""),
                 "intercom.access_token", "no Intercom access token", id="no-token"),
    pytest.param(lambda tmp: config(tmp, state_dir=a_file(tmp / "state")),
                 "storage.state_dir", "exists and is not a directory", id="state_dir-is-a-file"),
    pytest.param(lambda tmp: config(tmp, state_dir=a_file(tmp / "f") / "state"),
                 "storage.state_dir", "cannot be created: ", id="state_dir-under-a-file"),
    pytest.param(lambda tmp: config(tmp, state_dir=read_only_dir(tmp / "state")),
                 "storage.state_dir", "is not writable by uid", id="state_dir-read-only",
                 marks=needs_non_root),
    pytest.param(lambda tmp: config(tmp, state_dir=read_only_dir(tmp / "ro") / "state"),
                 "storage.state_dir", "cannot be created: ", id="state_dir-parent-read-only",
                 marks=needs_non_root),
    pytest.param(lambda tmp: config(tmp, unix_socket=str(tmp / "missing" / "intake.sock")),
                 "intake.unix_socket", "does not exist", id="socket-directory-missing"),
    pytest.param(lambda tmp: config(tmp, unix_socket=str(a_file(tmp / "f") / "intake.sock")),
                 "intake.unix_socket", "is not a directory", id="socket-directory-is-a-file"),
    pytest.param(lambda tmp: config(tmp, unix_socket=str(a_file(tmp / "intake.sock"))),
                 "intake.unix_socket", "exists and is not a socket", id="socket-path-is-a-file"),
    pytest.param(lambda tmp: config(tmp, unix_socket=str(tmp / ("s" * 120))),
                 "intake.unix_socket", "a Unix socket path can be at most 107",
                 id="socket-path-too-long-to-bind"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "key", "message"), REFUSED)
def test_what_serve_would_refuse_is_one_problem_naming_its_key(tmp_path, make, key, message):
    [problem] = preflight(make(tmp_path))
    assert problem.key == key
    assert message in str(problem)
    assert str(problem).startswith(f"{key}: ")


def test_every_problem_is_reported_in_key_order_not_only_the_first(tmp_path):
    cfg = config(tmp_path, token="", state_dir=a_file(tmp_path / "state"),
                 unix_socket=str(tmp_path / "missing" / "intake.sock"))
    assert [p.key for p in preflight(cfg)] == [
        "intake.unix_socket", "intercom.access_token", "storage.state_dir"]


def test_a_state_dir_that_can_be_created_passes_and_is_not_created(tmp_path):
    state = tmp_path / "a" / "b" / "state"
    assert preflight(config(tmp_path, state_dir=state)) == []
    assert not (tmp_path / "a").exists()


def test_a_socket_left_by_a_crashed_run_passes(tmp_path):
    """The listener removes a stale socket file before binding, so it is no problem."""
    path = tmp_path / "intake.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    assert preflight(config(tmp_path, unix_socket=str(path))) == []


def test_a_socket_activated_daemon_binds_nothing_so_its_socket_path_is_not_checked(tmp_path):
    cfg = config(tmp_path, unix_socket=str(tmp_path / "missing" / "intake.sock"))
    assert preflight(cfg, socket_activated=True) == []


def test_no_message_holds_the_token(tmp_path):
    token = "dG9rOnNlY3JldA=="
    cfg = config(tmp_path, token=token, state_dir=a_file(tmp_path / "state"))
    assert all(token not in str(p) for p in preflight(cfg))


def test_the_configs_in_tests_pass_so_the_rows_above_are_what_fails(tmp_path):
    assert preflight(config(tmp_path)) == []
    assert preflight(dataclasses.replace(config(tmp_path), intake=IntakeConfig(
        unix_socket=str(tmp_path / "intake.sock")))) == []



def test_a_state_dir_where_files_cannot_be_created_is_refused_even_for_root(tmp_path):
    """os.access() says yes to root on /proc; serve as root would then fail at start."""
    if os.geteuid() != 0:
        pytest.skip("root's permission bypass is what this checks")
    [problem] = preflight(config(tmp_path, state_dir=Path("/proc/intercom-forwarder")))
    assert problem.key == "storage.state_dir" and "is not writable" in str(problem)
