"""One daemon per state dir (issue 12 B9): a second daemon on a state dir in use exits at
once, naming the directory and the holder's PID, and touches neither the first daemon's
spool nor its Unix socket."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from forwarder.fake_intercom import FakeIntercom
from forwarder.service import Service
from forwarder.statedir import StateDirBusy
from tests.conftest import TOKEN, wait_until
from tests.integration.daemon import spawn

NOW = 1_700_000_000


def event(i: int) -> dict:
    return {"event_name": "signed-up", "created_at": NOW + i, "user_id": f"u{i}"}


def spool_users(state_dir: Path) -> list[str]:
    path = state_dir / "spool.jsonl"
    if not path.exists():
        return []
    return sorted(orjson.loads(line)["body"]["user_id"] for line in path.read_bytes().splitlines())


async def post_unix(socket_path: str, obj: object) -> int:
    connector = aiohttp.UnixConnector(path=socket_path)
    async with (aiohttp.ClientSession(connector=connector) as s,
                s.post("http://localhost/events", data=orjson.dumps(obj)) as r):
        return r.status


async def test_a_second_daemon_on_the_same_state_dir_exits_at_once_and_leaves_the_first_alone(
        tmp_path):
    """Steps: daemon A serves state dir S and Unix socket U; Intercom refuses its token, so
    it holds 3 events in memory. Daemon B starts with the same S and U (its own TCP port).
    Expect: B exits non-zero within 10 s, its stderr naming S and A's PID, and no spool
    appears; A still answers over U (a 4th event is taken); SIGTERM to A spools all 4."""
    fake = FakeIntercom(token="the-working-token")
    await fake.start()
    state = tmp_path / "state"
    sock = str(tmp_path / "intake.sock")
    common = dict(upstream=fake.url, state_dir=state, INTERCOM_ACCESS_TOKEN=TOKEN,
                  FORWARDER_INTAKE__UNIX_SOCKET=sock)
    first = await spawn(tmp_path, name="first", **common)
    second = None
    try:
        await first.wait_serving()
        for i in range(3):
            assert await first.post(event(i)) == 202
        await first.wait_for_log("upstream.auth_paused")
        socket_inode = os.stat(sock).st_ino

        second = await spawn(tmp_path, name="second", **common)
        started = time.monotonic()
        code = await asyncio.wait_for(second.proc.wait(), 10)
        assert code != 0, second.stderr()
        assert time.monotonic() - started < 10
        message = second.stderr()
        assert str(state) in message
        assert f"pid {first.pid}" in message
        assert not (state / "spool.jsonl").exists()

        assert os.stat(sock).st_ino == socket_inode
        assert await post_unix(sock, event(3)) == 202
        assert await first.terminate() == 0
        assert spool_users(state) == ["u0", "u1", "u2", "u3"]
    finally:
        for daemon in (first, second):
            if daemon is not None:
                await daemon.kill()
        await fake.stop()


async def test_a_second_service_on_a_state_dir_in_use_refuses_and_touches_nothing(
        make_service, fake_intercom, clock):
    """Steps: service A runs, paused with 2 events (Intercom refuses the token); a second
    Service on the same config starts and stops (`async with`), then a third tries.
    Expect: both refused with StateDirBusy naming the dir and this PID; A's socket is the
    same file and answers; A's stop spools both events; after it, the dir is free."""
    fake_intercom.token = "revoked"
    first = await make_service(clock=clock, shutdown={"drain_seconds": 0})
    for i in range(2):
        assert await post_unix(first.config.intake.unix_socket, event(i)) == 202
    await wait_until(lambda: first.workers.paused)
    sock = first.config.intake.unix_socket
    socket_inode = os.stat(sock).st_ino
    state = Path(first.config.storage.state_dir)

    for _ in range(2):  # the second's stop must not have released A's lock for the third
        with pytest.raises(StateDirBusy) as refused:
            async with Service(first.config, clock=clock):
                raise AssertionError("a second service must not start on a locked state dir")
        assert str(state) in str(refused.value)
        assert f"pid {os.getpid()}" in str(refused.value)
    assert os.stat(sock).st_ino == socket_inode
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s, \
            s.get("http://localhost/healthz") as r:
        assert r.status == 200

    await first.stop()
    assert spool_users(state) == ["u0", "u1"]
    fake_intercom.token = TOKEN
    async with Service(first.config, clock=clock) as again:
        assert again.metrics.registry.get_sample_value(
            "intercom_forwarder_spool_loaded_events") == 2
