"""One aiohttp AppRunner serving the intake's Application (routes.py) on TCP and, when
configured, a Unix socket (or on sockets handed over by systemd socket activation).
Signals are not handled here: service.py owns them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Sequence
from pathlib import Path

import structlog
from aiohttp import web

from .routes import Routes

log = structlog.get_logger("forwarder.intake")

UNIX_SOCKET_MODE = 0o660


class Listener:
    """Owns the runner and its sites; start() binds, close() unbinds and removes the socket file."""

    def __init__(self, routes: Routes, *, host: str, port: int, max_body_bytes: int,
                 unix_socket: str = "", sockets: Sequence[socket.socket] = ()):
        self._routes = routes
        self._max_body_bytes = max_body_bytes
        self._host = host
        self._port = port
        self._unix_socket = unix_socket
        self._sockets = list(sockets)
        self._runner: web.AppRunner | None = None
        self.addresses: list[str] = []

    async def start(self) -> None:
        app = self._routes.application(max_body_bytes=self._max_body_bytes)
        # access_log=None: a log line per request is the single largest cost on the hot path.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        self._runner = runner
        sites: list[web.BaseSite] = []
        if self._sockets:
            sites = [web.SockSite(runner, s) for s in self._sockets]
        else:
            sites.append(web.TCPSite(runner, self._host, self._port, reuse_address=True))
            if self._unix_socket:
                _remove_stale_socket(self._unix_socket)
                sites.append(web.UnixSite(runner, self._unix_socket))
        for site in sites:
            await site.start()
        if self._unix_socket and not self._sockets:
            os.chmod(self._unix_socket, UNIX_SOCKET_MODE)
        self.addresses = [_describe(a) for a in runner.addresses]
        log.info("intake.listening", addresses=self.addresses)

    @property
    def port(self) -> int | None:
        """The TCP port actually bound (useful with port 0)."""
        for address in self._runner.addresses if self._runner else ():
            if isinstance(address, tuple):
                return address[1]
        return None

    @property
    def url(self) -> str:
        host = self._host if self._host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await runner.cleanup()
        if self._unix_socket and not self._sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_socket)
        log.info("intake.closed")


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a crashed run would make bind() fail; anything else is not ours."""
    p = Path(path)
    try:
        mode = p.lstat().st_mode
    except FileNotFoundError:
        p.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"intake.unix_socket: {path} exists and is not a socket")
    p.unlink()


def _describe(address: object) -> str:
    if isinstance(address, tuple):
        return f"http://{address[0]}:{address[1]}"
    return f"unix:{address}"
