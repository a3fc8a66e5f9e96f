"""Shared fixtures: a FakeClock, the fake Intercom on 127.0.0.1, and make_service, which
builds a whole Service the way production does and always stops it."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from forwarder.clock import Clock, FakeClock, SystemClock
from forwarder.config import (
    Config,
    IntakeConfig,
    IntercomConfig,
    Secret,
    StorageConfig,
)
from forwarder.fake_intercom import FakeIntercom
from forwarder.service import Service

TOKEN = "test-token"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_intercom() -> AsyncIterator[FakeIntercom]:
    fake = FakeIntercom(token=TOKEN)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def base_config(tmp_path: Path, upstream_url: str, **sections: Any) -> Config:
    """A config for tests: intake on 127.0.0.1 port 0 and a Unix socket in tmp_path,
    upstream at the fake, state in tmp_path. sections={"queue": {"max_events": 3}} overrides."""
    cfg = Config(
        intake=IntakeConfig(host="127.0.0.1", port=0, unix_socket=str(tmp_path / "intake.sock")),
        intercom=IntercomConfig(base_url=upstream_url, access_token=Secret(TOKEN),
                                timeout_seconds=2.0),
        storage=StorageConfig(state_dir=str(tmp_path / "state")),
    )
    for name, values in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)})
    return cfg


MakeService = Callable[..., Awaitable[Service]]


@pytest.fixture
async def make_service(tmp_path: Path, fake_intercom: FakeIntercom) -> AsyncIterator[MakeService]:
    started: list[Service] = []

    async def _make(*, clock: Clock | None = None, upstream_url: str | None = None,
                    seed: int = 7, **sections: Any) -> Service:
        cfg = base_config(tmp_path, upstream_url or fake_intercom.url, **sections)
        svc = Service(cfg, clock=clock or SystemClock(), rng=random.Random(seed))
        await svc.start()
        started.append(svc)
        return svc

    try:
        yield _make
    finally:
        for svc in started:
            svc.request_stop(force=True)
            await svc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def captured_logs() -> Any:
    with structlog.testing.capture_logs() as logs:
        yield logs


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Await a condition (for real, bounded) instead of sleeping a guessed amount."""
    async def _poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(_poll(), timeout)


# --- fleet (issue 14): a real redis-server per test, on a Unix socket in tmp_path ----------

UNIX_PATH_MAX = 100  # sun_path holds 108 bytes; long test names make tmp_path longer


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    import tempfile

    from tests.redis_server import RedisServer, require_redis_server

    binary = require_redis_server()
    with tempfile.TemporaryDirectory(prefix="fwd-redis-") as short:
        sock = tmp_path / "redis.sock"
        if len(str(sock)) > UNIX_PATH_MAX:
            sock = Path(short) / "redis.sock"
        server = RedisServer(binary, sock, tmp_path / "redis.log")
        server.start()
        try:
            yield server
        finally:
            server.stop()
