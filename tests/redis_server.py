"""A real redis-server for the fleet tests (Debian's package; .ci/run installs it): one
per test, on a Unix socket in tmp_path, nothing saved to disk, stopped after. Tests kill
it, freeze it (SIGSTOP: a Redis that accepts and never answers) and start it again on the
same socket, because a fake of Redis would hide exactly that behaviour."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0


def require_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; "
                    ".ci/run installs it in CI)")
    return path


class RedisServer:
    """redis-server on `socket_path`: start(), kill(), freeze()/thaw(), stop()."""

    def __init__(self, binary: str, socket_path: Path, log_path: Path):
        self.binary = binary
        self.socket_path = socket_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        argv = [self.binary, "--port", "0", "--unixsocket", str(self.socket_path),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--dir", str(self.socket_path.parent)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Bounded polling until the socket answers PING (the server takes a few ms)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(0.5)
                    s.connect(str(self.socket_path))
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"redis-server not ready after {START_TIMEOUT_S} s")

    def kill(self) -> None:
        """SIGKILL, as a crash: everything in memory is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        if self.socket_path.exists():  # a killed server leaves its socket file behind
            os.unlink(self.socket_path)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing is answered (a Redis that hangs)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen server cannot take SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
