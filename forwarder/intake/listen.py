"""One aiohttp low-level server (routes.py says why not an Application) serving the intake
on TCP and, when configured, a Unix socket (or on sockets handed over by systemd socket
activation). Signals are not handled here: service.py owns them.

The Unix socket path is shared with whatever else runs on the host, so it is claimed with
care: a socket file is removed at start only when nothing answers on it (a crashed run
left it), and refused when something does (another daemon serves there: unlinking its
file would cut it off from every new client while it keeps running). At exit the file is
removed only if it is still the one this run bound (device and inode recorded after
bind): a daemon that took the path over meanwhile keeps its socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from .routes import Handler

log = structlog.get_logger("forwarder.intake")

UNIX_SOCKET_MODE = 0o660
PROBE_TIMEOUT_S = 1.0  # a live server accepts a Unix connect at once; this bounds a hung one


class Listener:
    """Owns the runner and its sites; start() binds, close() unbinds and removes the socket
    file if it is still this run's."""

    def __init__(self, handler: Handler, *, host: str, port: int, max_body_bytes: int,
                 unix_socket: str = "", sockets: Sequence[socket.socket] = ()):
        self._handler = handler
        self._max_body_bytes = max_body_bytes
        self._host = host
        self._port = port
        self._unix_socket = unix_socket
        self._sockets = list(sockets)
        self._runner: web.ServerRunner | None = None
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self.addresses: list[str] = []

    async def start(self) -> None:
        own_socket = bool(self._unix_socket) and not self._sockets
        if own_socket:
            # Before anything binds: a refusal must leave nothing of ours to clean up.
            _claim_socket_path(self._unix_socket)
        loop = asyncio.get_running_loop()
        max_body = self._max_body_bytes

        def make_request(message: Any, payload: Any, protocol: Any, writer: Any,
                         task: asyncio.Task[None]) -> web.BaseRequest:
            # request.read() enforces client_max_size on bodies without a Content-Length.
            return web.BaseRequest(message, payload, protocol, writer, task, loop,
                                   client_max_size=max_body)

        # access_log=None: a log line per request is the single largest cost on the hot path.
        server = web.Server(self._handler, request_factory=make_request, access_log=None)
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        self._runner = runner
        sites: list[web.BaseSite] = []
        if self._sockets:
            sites = [web.SockSite(runner, s) for s in self._sockets]
        else:
            sites.append(web.TCPSite(runner, self._host, self._port, reuse_address=True))
            if own_socket:
                sites.append(web.UnixSite(runner, self._unix_socket))
        for site in sites:
            await site.start()
        if own_socket:
            os.chmod(self._unix_socket, UNIX_SOCKET_MODE)
            st = os.lstat(self._unix_socket)
            self._socket_id = (st.st_dev, st.st_ino)
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
        if self._socket_id is not None:
            socket_id, self._socket_id = self._socket_id, None
            _remove_if_ours(self._unix_socket, socket_id)
        log.info("intake.closed")


def _claim_socket_path(path: str) -> None:
    """Leave `path` free to bind, or raise an OSError naming it (cli.py prints it and
    exits 1). A socket file that refuses connections was left by a run that died, and is
    removed; one that accepts belongs to a live server, another daemon on this config."""
    p = Path(path)
    try:
        mode = p.lstat().st_mode
    except FileNotFoundError:
        p.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST,
                              f"intake.unix_socket: {path} exists and is not a socket")
    # A blocking connect, on purpose: this runs once, before serving, and a Unix-socket
    # connect is answered at once (accepted or refused) by the kernel.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT_S)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            log.info("intake.stale_socket_removed", path=path)
            return
        except OSError as exc:  # no permission, a full backlog: it may well be live
            raise OSError(exc.errno or errno.EADDRINUSE,
                          f"intake.unix_socket: cannot tell whether {path} is in use "
                          f"({exc}); refusing to start") from exc
    raise OSError(errno.EADDRINUSE,
                  f"intake.unix_socket: {path} is in use: a server answers on it (another "
                  "intercom-forwarder?); stop it or set another intake.unix_socket")


def _remove_if_ours(path: str, socket_id: tuple[int, int]) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) != socket_id:
        log.warning("intake.socket_left", path=path,
                    reason="the path now holds another file; someone else took it over")
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _describe(address: object) -> str:
    if isinstance(address, tuple):
        return f"http://{address[0]}:{address[1]}"
    return f"unix:{address}"
