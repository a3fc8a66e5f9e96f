"""`intercom-forwarder fake-intercom`, as README's "Trying it by hand" uses it: a real
subprocess (`python -m forwarder fake-intercom`) on a free port, driven over HTTP, stopped
with a signal (issue 12 C17)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000
EVENT = {"event_name": "placed-order", "created_at": NOW, "user_id": "314159"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FORWARDER_")
           and k not in ("INTERCOM_ACCESS_TOKEN", "CREDENTIALS_DIRECTORY")}
    return {**env, **extra}


@asynccontextmanager
async def running(*args: str, env: dict[str, str] | None = None
                  ) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m forwarder ARGS`; killed at the end if the test left it running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder", *args, cwd=ROOT, env=env or clean_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def first_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()


async def stop(proc: asyncio.subprocess.Process, sig: int) -> tuple[int, str]:
    """Send sig; the exit code and everything it wrote to stderr."""
    proc.send_signal(sig)
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_fake_intercom_answers_like_intercom_keeps_events_and_stops_cleanly(sig):
    """Steps: start it on port 0 with a token and an unknown contact; post an event, one
    for the unknown contact and one with a wrong token; list the first contact's events;
    send the signal. Expect: its URL first, 202 / 404 / 401, the event listed back, then
    exit 0 with a one-line summary and no traceback."""
    async with running("fake-intercom", "--port", "0", "--token", "T",
                       "--unknown-contact", "ghost") as proc:
        url = await first_line(proc)
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        auth = {"Authorization": "Bearer T"}
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/events", data=orjson.dumps(EVENT), headers=auth) as r:
                assert r.status == 202
            ghost = {**EVENT, "user_id": "ghost"}
            async with http.post(url + "/events", data=orjson.dumps(ghost), headers=auth) as r:
                assert r.status == 404
            async with http.post(url + "/events", data=orjson.dumps(EVENT),
                                 headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with http.get(url + "/events", params={"type": "user", "user_id": "314159"},
                                headers=auth) as r:
                assert r.status == 200
                assert (await r.json())["events"] == [{"type": "event", **EVENT}]
        code, err = await stop(proc, sig)
    assert code == 0
    assert "Traceback" not in err
    assert "fake Intercom stopped: 4 requests, 1 events kept" in err


async def test_the_daemon_forwards_to_it_as_readme_shows(tmp_path):
    """README's "Trying it by hand": the fake, then `serve` with the token and base URL it
    prints, then an event posted to the daemon. Expect: the event read back from the fake
    through the daemon's GET /events, and both stop with exit 0 on SIGTERM."""
    async with running("fake-intercom", "--port", "0") as fake:
        fake_url = await first_line(fake)
        assert fake_url.startswith("http://127.0.0.1:")  # never the real Intercom
        socket_path = str(tmp_path / "intake.sock")
        env = clean_env(INTERCOM_ACCESS_TOKEN="test-token",
                        FORWARDER_INTERCOM__BASE_URL=fake_url,
                        FORWARDER_STORAGE__STATE_DIR=str(tmp_path / "state"),
                        FORWARDER_INTAKE__PORT="0",
                        FORWARDER_INTAKE__UNIX_SOCKET=socket_path)
        async with running("serve", env=env) as daemon, aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=socket_path)) as http:
            await wait_ready(http, daemon)
            async with http.post("http://localhost/events", data=orjson.dumps(EVENT)) as r:
                assert r.status == 202
            listed: list = []
            for _ in range(100):  # bounded: until the worker has forwarded it
                async with http.get("http://localhost/events",
                                    params={"type": "user", "user_id": "314159"}) as r:
                    assert r.status == 200
                    listed = (await r.json())["events"]
                if listed:
                    break
                await asyncio.sleep(0.05)
            assert listed == [{"type": "event", **EVENT}]
            assert (await stop(daemon, signal.SIGTERM))[0] == 0
        assert (await stop(fake, signal.SIGTERM))[0] == 0


async def wait_ready(http: aiohttp.ClientSession, daemon: asyncio.subprocess.Process) -> None:
    for _ in range(300):  # bounded: 15 s at most
        assert daemon.returncode is None, "serve exited before it was ready"
        try:
            async with http.get("http://localhost/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError("serve was not ready within 15 s")
