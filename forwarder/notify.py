"""The systemd side of the lifecycle: sd_notify(3) messages and sd_listen_fds(3) sockets,
with no dependency on libsystemd.

`SystemdNotifier` is built from an environment mapping (service.py passes os.environ) and is
inactive, every call a no-op returning False, when NOTIFY_SOCKET is unset, as under Docker
or a terminal. Sends never raise into the caller and never log: the service decides what a
False means (for READY=1 it means nothing can be done; systemd will time the start out).

The protocol, from sd_notify(3) and systemd.service(5):
- NOTIFY_SOCKET is a path, or an abstract socket name written with a leading '@'.
- Each message is one AF_UNIX datagram of newline-separated VAR=value assignments.
- WATCHDOG_USEC is the unit's WatchdogSec=; WATCHDOG_PID, when set, names the only process
  that should ping. sd_watchdog_enabled(3) recommends pinging at half the interval.

`listen_fds()` returns the listening stream sockets systemd passed by socket activation
(LISTEN_PID, LISTEN_FDS, optional LISTEN_FDNAMES; fds start at SD_LISTEN_FDS_START = 3).
The environment is read, never changed: the forwarder starts no children that could
inherit LISTEN_*, and the sockets are made close-on-exec as sd_listen_fds(3) does.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

SD_LISTEN_FDS_START = 3

# A notify datagram goes to PID 1's socket, which is read promptly. The bound keeps a
# wedged manager from stalling the event loop; a dropped WATCHDOG=1 is retried next tick.
_SEND_TIMEOUT_S = 1.0

_STREAM_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


def _notify_address(value: str) -> str | bytes | None:
    """The sockaddr for NOTIFY_SOCKET, or None for a value this module cannot reach."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Linux abstract namespace: a leading NUL byte instead of the '@'.
        return b"\0" + value[1:].encode()
    # Empty, relative, or another transport (systemd >= 253 also allows vsock:...).
    return None


def _watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    raw_usec = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            if int(raw_pid) != pid:
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class SystemdNotifier:
    """Sends sd_notify(3) datagrams to NOTIFY_SOCKET; inactive (all calls return False)
    without one. No call raises or blocks for more than a second."""

    __slots__ = ("_address", "_watchdog_interval_s")

    def __init__(self, address: str | bytes | None, watchdog_interval_s: float | None = None):
        self._address = address
        self._watchdog_interval_s = watchdog_interval_s if address is not None else None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, pid: int | None = None) -> SystemdNotifier:
        """Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID; `pid` defaults to ours."""
        address = _notify_address(env.get("NOTIFY_SOCKET", ""))
        interval = _watchdog_interval_s(env, os.getpid() if pid is None else pid)
        return cls(address, interval)

    @property
    def active(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when the
        watchdog is off, meant for another PID, or there is no notify socket."""
        return self._watchdog_interval_s

    def ready(self) -> bool:
        """READY=1: intake is listening; systemd ends the start job (Type=notify)."""
        return self.notify("READY=1")

    def stopping(self) -> bool:
        """STOPPING=1: draining has begun; systemd shows the unit as deactivating."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """WATCHDOG=1: the event loop is alive; without one per WatchdogSec= systemd
        kills and (with Restart=on-failure) restarts the service."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """STATUS=text, shown by `systemctl status`. Newlines would end the assignment,
        so they become spaces."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def notify(self, message: str) -> bool:
        """Sends one datagram of newline-separated assignments; True if it was sent."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(_SEND_TIMEOUT_S)
                sock.sendto(message.encode(), self._address)
        except OSError:
            # No receiver, permission denied, queue full past the timeout: the caller gets
            # False and carries on; a notification must never take the service down.
            return False
        return True

    def __repr__(self) -> str:
        return f"SystemdNotifier(active={self.active}, watchdog_interval_s={self._watchdog_interval_s})"


def listen_fds(
    env: Mapping[str, str], *, start_fd: int = SD_LISTEN_FDS_START, pid: int | None = None
) -> list[socket.socket]:
    """The listening AF_INET/AF_INET6/AF_UNIX stream sockets passed by socket activation, in
    fd order; [] when not activated for this process. See `named_listen_fds` for the rules."""
    return [sock for _, sock in named_listen_fds(env, start_fd=start_fd, pid=pid)]


def named_listen_fds(
    env: Mapping[str, str], *, start_fd: int = SD_LISTEN_FDS_START, pid: int | None = None
) -> list[tuple[str, socket.socket]]:
    """(name, socket) for each passed listening stream socket.

    LISTEN_PID must equal `pid` (default: ours), otherwise the variables were meant for a
    parent and nothing is taken. LISTEN_FDS fds are read from `start_fd` (3 in production;
    tests pass another). Names come from LISTEN_FDNAMES (colon-separated, one per fd); when
    it is missing or its count differs, each name is "unknown", as sd_listen_fds_with_names
    reports. An fd that is not a listening stream socket of a supported family is left
    open and untouched, and is not returned.
    """
    try:
        if int(env.get("LISTEN_PID", "")) != (os.getpid() if pid is None else pid):
            return []
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if count <= 0:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":")
    if len(names) != count:
        names = ["unknown"] * count

    found: list[tuple[str, socket.socket]] = []
    for fd, name in zip(range(start_fd, start_fd + count), names):
        sock = _listening_stream_socket(fd)
        if sock is not None:
            found.append((name, sock))
    return found


def _listening_stream_socket(fd: int) -> socket.socket | None:
    try:
        # Family, type and protocol are read from the fd itself.
        sock = socket.socket(fileno=fd)
    except OSError:
        return None  # closed, or not a socket
    try:
        usable = (
            sock.family in _STREAM_FAMILIES
            and sock.type == socket.SOCK_STREAM
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
        )
    except OSError:
        usable = False
    if not usable:
        sock.detach()  # hand the fd back without closing it
        return None
    os.set_inheritable(fd, False)
    return sock
