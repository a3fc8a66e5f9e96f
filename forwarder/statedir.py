"""One daemon per state dir: an exclusive flock on `<state_dir>/forwarder.lock`.

Two daemons on one state dir would each reload, delete and overwrite the other's
spool.jsonl, and the second would unlink the first's Unix socket. Service.start() takes
the lock before it reads the spool or listens, and Service.stop() releases it last, so a
second daemon exits at once and touches nothing of the first.

flock (not fcntl's POSIX locks) because it belongs to the open file, not the process:
two Services in one process exclude each other too, and the kernel drops the lock when
the process dies however it dies, so a stale lock file never blocks a restart. The file is
never removed: unlinking a locked file lets a third process lock a new inode while the
second still holds the old one. The holder's PID is written into it for the refusal
message; it is a hint, the lock is what decides.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

LOCK_NAME = "forwarder.lock"


class StateDirBusy(OSError):
    """Another process holds the state dir's lock. An OSError, so the CLI reports it as
    `cannot start: ...` and exits 1: a restart may succeed once the holder has stopped."""

    def __init__(self, state_dir: Path, holder_pid: int | None):
        self.state_dir = state_dir
        self.holder_pid = holder_pid
        who = f"pid {holder_pid}" if holder_pid is not None else "pid unknown"
        self.message = (f"state dir {state_dir} is in use by another intercom-forwarder "
                        f"({who}, lock {state_dir / LOCK_NAME}); stop it, or give this "
                        f"one its own storage.state_dir")
        super().__init__(errno.EWOULDBLOCK, self.message)

    def __str__(self) -> str:
        return self.message


class StateDirLock:
    """Holds the state dir's exclusive lock between acquire() and release(); never blocks."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Create the state dir if needed and lock it. Raises StateDirBusy when another
        process (or another Service) holds it, OSError when the dir cannot be used."""
        if self._fd is not None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: a loser must not wipe the holder's PID. Close-on-exec by default.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateDirBusy(self.state_dir, holder) from None
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # the PID is only a hint; the lock is held
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):  # no stale PID for the next reader (a hint)
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor of the open file drops the flock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
