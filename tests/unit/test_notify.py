"""forwarder.notify against real sockets: a datagram socket of the test's own stands in for
systemd's NOTIFY_SOCKET, and listening sockets are placed on chosen fds for listen_fds()."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.notify import SystemdNotifier, listen_fds, named_listen_fds


@pytest.fixture
def notify_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket and the NOTIFY_SOCKET value that reaches it.

    tmp_path_factory keeps the path short: AF_UNIX paths are limited to 107 bytes."""
    path = tmp_path_factory.mktemp("notify") / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(5.0)
    yield str(path), receiver
    receiver.close()


def received(receiver: socket.socket) -> str:
    return receiver.recv(4096).decode()


def test_ready_stopping_and_watchdog_each_send_one_datagram(notify_socket):
    address, receiver = notify_socket
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": address})

    assert notifier.active
    assert notifier.ready() is True
    assert received(receiver) == "READY=1"
    assert notifier.watchdog() is True
    assert received(receiver) == "WATCHDOG=1"
    assert notifier.stopping() is True
    assert received(receiver) == "STOPPING=1"


def test_status_text_is_sent_on_one_line(notify_socket):
    address, receiver = notify_socket
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": address})

    assert notifier.status("draining\n120 events left") is True
    assert received(receiver) == "STATUS=draining 120 events left"


def test_abstract_socket_name_with_at_prefix_is_reached():
    name = f"intercom-forwarder-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(b"\0" + name.encode())
        receiver.settimeout(5.0)
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})

        assert notifier.ready() is True
        assert received(receiver) == "READY=1"


def test_without_notify_socket_every_call_is_a_no_op_returning_false():
    notifier = SystemdNotifier.from_env({"WATCHDOG_USEC": "30000000"})

    assert not notifier.active
    assert notifier.ready() is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False
    assert notifier.status("x") is False
    assert notifier.watchdog_interval_s is None


@pytest.mark.parametrize(
    "value",
    ["", "relative/notify.sock", "@", "vsock:2:1234"],
    ids=["empty", "relative-path", "bare-at", "vsock-unsupported"],
)
def test_unreachable_notify_socket_values_leave_the_notifier_inactive(value):
    assert not SystemdNotifier.from_env({"NOTIFY_SOCKET": value}).active


def test_send_to_a_missing_socket_returns_false_instead_of_raising(tmp_path_factory):
    missing = tmp_path_factory.mktemp("gone") / "notify.sock"
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": str(missing)})

    assert notifier.active
    assert notifier.ready() is False


@pytest.mark.parametrize(
    ("extra_env", "expected_s"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{me}"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
    ids=[
        "half-of-watchdogsec",
        "watchdog-pid-is-us",
        "watchdog-pid-is-another-process",
        "watchdog-pid-garbage",
        "zero-means-off",
        "usec-garbage",
        "watchdog-unset",
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid(
    notify_socket, extra_env, expected_s
):
    me = os.getpid()
    env = {"NOTIFY_SOCKET": notify_socket[0]}
    env.update({k: v.format(me=me, other=me + 1) for k, v in extra_env.items()})

    assert SystemdNotifier.from_env(env).watchdog_interval_s == expected_s


# --- socket activation -------------------------------------------------------------------


def free_fd_range(count: int, start: int = 600) -> int:
    """The first of `count` consecutive unused fds at or above `start`."""
    base = start
    while True:
        for fd in range(base, base + count):
            try:
                fcntl.fcntl(fd, fcntl.F_GETFD)
            except OSError:
                continue
            base = fd + 1
            break
        else:
            return base


@pytest.fixture
def placed_fds() -> Iterator[list[int]]:
    """Fds the test dup2's sockets onto; any still open at the end are closed."""
    placed: list[int] = []
    yield placed
    for fd in placed:
        try:
            os.close(fd)
        except OSError:
            pass


def place(objects: list, placed: list[int]) -> int:
    """dup2 each socket (or raw fd) onto consecutive free fds; returns the first fd."""
    base = free_fd_range(len(objects))
    for offset, obj in enumerate(objects):
        fd = obj if isinstance(obj, int) else obj.fileno()
        os.dup2(fd, base + offset)
        placed.append(base + offset)
    return base


def fd_is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def test_listen_fds_returns_listening_tcp_and_unix_sockets_with_their_names(
    tmp_path_factory, placed_fds
):
    sock_path = str(tmp_path_factory.mktemp("act") / "intake.sock")
    with (
        socket.create_server(("127.0.0.1", 0)) as tcp,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as uds,
    ):
        uds.bind(sock_path)
        uds.listen()
        base = place([tcp, uds], placed_fds)
        env = {
            "LISTEN_PID": str(os.getpid()),
            "LISTEN_FDS": "2",
            "LISTEN_FDNAMES": "http:uds",
        }

        got = named_listen_fds(env, start_fd=base)

        assert [(name, s.family, s.getsockname()) for name, s in got] == [
            ("http", socket.AF_INET, tcp.getsockname()),
            ("uds", socket.AF_UNIX, sock_path),
        ]
        assert [s.fileno() for _, s in got] == [base, base + 1]
        assert not any(os.get_inheritable(s.fileno()) for _, s in got)
        # The returned socket accepts what reaches the original listener.
        with socket.create_connection(tcp.getsockname(), timeout=5):
            conn, _ = got[0][1].accept()
            conn.close()
        for _, s in got:
            s.close()


def test_listen_fds_skips_udp_unbound_and_non_socket_fds_and_leaves_them_open(placed_fds):
    read_end, write_end = os.pipe()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as not_listening,
        socket.create_server(("127.0.0.1", 0)) as tcp,
    ):
        udp.bind(("127.0.0.1", 0))
        base = place([read_end, udp, not_listening, tcp], placed_fds)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "4"}

        got = named_listen_fds(env, start_fd=base)

        assert [(name, s.fileno()) for name, s in got] == [("unknown", base + 3)]
        assert all(fd_is_open(fd) for fd in range(base, base + 3))
        got[0][1].close()
    os.close(read_end)
    os.close(write_end)


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_PID": "{other}", "LISTEN_FDS": "1"},
        {"LISTEN_FDS": "1"},
        {"LISTEN_PID": "{me}", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "{me}", "LISTEN_FDS": "many"},
        {"LISTEN_PID": "{me}"},
    ],
    ids=["meant-for-another-pid", "no-listen-pid", "zero-fds", "fds-garbage", "no-listen-fds"],
)
def test_listen_fds_takes_nothing_unless_meant_for_this_process(env, placed_fds):
    me = os.getpid()
    with socket.create_server(("127.0.0.1", 0)) as tcp:
        base = place([tcp], placed_fds)
        filled = {k: v.format(me=me, other=me + 1) for k, v in env.items()}

        assert listen_fds(filled, start_fd=base) == []
        assert fd_is_open(base)


PROBE = """
import json, os
from forwarder.notify import named_listen_fds
print(json.dumps([[name, s.fileno(), s.getsockname()[1]] for name, s in named_listen_fds(os.environ)]))
"""

# What systemd does between fork and exec: put the socket on fd 3, then set LISTEN_PID to
# the pid that exec keeps.
WRAPPER = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="intake")
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
"""


def test_a_socket_activated_process_finds_its_socket_on_fd_3():
    with socket.create_server(("127.0.0.1", 0)) as tcp:
        done = subprocess.run(
            [sys.executable, "-c", WRAPPER, str(tcp.fileno()), PROBE],
            check=False,
            pass_fds=(tcp.fileno(),),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [["intake", 3, tcp.getsockname()[1]]]
