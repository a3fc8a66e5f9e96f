"""The intake's Unix socket path is shared with the rest of the host: the daemon removes a
socket file only when it is stale (at start) or still its own (at exit). Issue 12 B9."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from forwarder.service import Service
from tests.conftest import TOKEN, base_config

NOW = 1_700_000_000
EVENT = {"event_name": "signed-up", "created_at": NOW, "user_id": "u1"}


async def _answer_still_here(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if await reader.readline():
        writer.write(b"still here\n")
        await writer.drain()
    writer.close()


@pytest.fixture
async def other_server() -> AsyncIterator:
    """Starts a server that is not this daemon on a path: the other process of a test."""
    servers: list[asyncio.Server] = []

    async def _serve(path: str) -> None:
        servers.append(await asyncio.start_unix_server(_answer_still_here, path=path))

    yield _serve
    for server in servers:
        server.close()
        await server.wait_closed()


async def _still_serving(path: str) -> bool:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(b"ping\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5) == b"still here\n"
    finally:
        writer.close()


async def test_a_live_socket_at_the_path_refuses_the_start_naming_it(tmp_path, other_server):
    """Steps: another server listens on intake.unix_socket; `intercom-forwarder serve` starts
    with that path. Expect: exit 1 at once, with a message naming the path; the other
    server's socket file is still there and still answers."""
    path = str(tmp_path / "intake.sock")
    await other_server(path)
    env = {**os.environ,
           "INTERCOM_ACCESS_TOKEN": TOKEN,
           "FORWARDER_INTAKE__PORT": "0",
           "FORWARDER_INTAKE__UNIX_SOCKET": path,
           "FORWARDER_INTERCOM__BASE_URL": "http://127.0.0.1:9",
           "FORWARDER_STORAGE__STATE_DIR": str(tmp_path / "state"),
           "FORWARDER_LOG__FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder", "serve", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:  # it started on someone else's path: the bug
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    message = stderr.decode().strip().splitlines()[-1]
    assert message.startswith("intercom-forwarder: cannot start:")
    assert f"{path} is in use" in message
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert await _still_serving(path)


async def test_a_stale_socket_file_is_replaced_and_the_socket_is_group_accessible(
        tmp_path, make_service):
    """A socket file left by a run that died (nothing answers on it) is removed at start."""
    path = tmp_path / "intake.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays behind, as after a crash
    svc = await make_service()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        body = orjson.dumps(EVENT)
        writer.write(b"POST /events HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 202")
    finally:
        writer.close()
    await svc.stop()
    assert not path.exists()  # its own socket file goes with it


async def test_a_socket_path_taken_over_before_exit_is_left_to_its_new_owner(
        make_service, other_server):
    """Steps: the daemon runs; someone removes its socket file and serves on the same path
    (a second daemon whose operator forced it); the first daemon stops.
    Expect: the newcomer's socket file stays and still answers."""
    svc = await make_service()
    path = svc.config.intake.unix_socket
    os.unlink(path)
    await other_server(path)
    await svc.stop()
    assert Path(path).exists()
    assert await _still_serving(path)


async def test_a_socket_handed_over_by_systemd_is_served_and_left_in_place(tmp_path,
                                                                            fake_intercom):
    """Socket activation: systemd binds the socket and owns its file, the daemon only
    serves on it (Service(listen_sockets=...), as `serve` does with LISTEN_FDS)."""
    path = tmp_path / "activated.sock"
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(path))
    listening.listen()
    cfg = base_config(tmp_path, fake_intercom.url)
    cfg = dataclasses.replace(cfg, intake=dataclasses.replace(cfg.intake, unix_socket=str(path)))
    async with Service(cfg, listen_sockets=[listening]):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await writer.drain()
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        finally:
            writer.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    listening.close()
