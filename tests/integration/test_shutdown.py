"""Graceful stop: refuse new events, drain, spool what is left, reload it at the next start."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import orjson

from forwarder.fake_intercom import FakeIntercom
from tests.conftest import TOKEN, wait_until

NOW = 1_700_000_000


def event(i: int) -> dict:
    return {"event_name": "signed-up", "created_at": NOW + i, "user_id": f"u{i}"}


def spool_lines(state_dir: Path) -> list[dict]:
    path = state_dir / "spool.jsonl"
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


async def test_stop_during_retries_spools_with_attempts_and_the_next_start_delivers(
        tmp_path, make_service, fake_intercom, clock):
    """Steps: Intercom answers 500 twice; stop while both events wait for a retry.
    Expect: both in the spool with attempts=1; a new service on the same state dir
    delivers both and removes the spool."""
    fake_intercom.script(500, 500)
    svc = await make_service(clock=clock, shutdown={"drain_seconds": 0})
    async with aiohttp.ClientSession() as s:
        for i in range(2):
            async with s.post(svc.url + "/events", data=orjson.dumps(event(i))) as r:
                assert r.status == 202
    await wait_until(lambda: svc.queue.waiting == 2)
    await svc.stop()
    state = Path(svc.config.storage.state_dir)
    lines = spool_lines(state)
    assert sorted(line["body"]["created_at"] for line in lines) == [NOW, NOW + 1]
    assert {line["attempts"] for line in lines} == {1}

    again = await make_service(clock=clock)
    await fake_intercom.wait_for_delivered(2)
    assert not (state / "spool.jsonl").exists()
    assert again.metrics.registry.get_sample_value(
        "intercom_forwarder_spool_loaded_events") == 2


async def test_a_closed_queue_answers_503_and_the_stop_closes_the_intake_first(
        make_service, fake_intercom, clock):
    """The stop's first step closes the queue (offers refused: 503 with Retry-After, never a
    202 whose event could miss the spool), then the listeners, then drains."""
    svc = await make_service(clock=clock)
    svc.queue.close()
    async with aiohttp.ClientSession() as s, s.post(svc.url + "/events",
                                                    data=orjson.dumps(event(0))) as r:
        assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert fake_intercom.requests == []
    url = svc.url
    await svc.stop()
    assert svc.not_ready_reason() == "shutting_down"
    async with aiohttp.ClientSession() as s:
        try:
            await s.get(url + "/readyz")
            raise AssertionError("the intake still answers after stop()")
        except aiohttp.ClientConnectionError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _start_daemon(tmp_path: Path, upstream: str, drain_seconds: float
                        ) -> tuple[asyncio.subprocess.Process, str]:
    port = _free_port()
    env = {**os.environ,
           "INTERCOM_ACCESS_TOKEN": TOKEN,
           "FORWARDER_INTAKE__PORT": str(port),
           "FORWARDER_INTERCOM__BASE_URL": upstream,
           "FORWARDER_INTERCOM__TIMEOUT_SECONDS": "1",
           "FORWARDER_STORAGE__STATE_DIR": str(tmp_path / "state"),
           "FORWARDER_SHUTDOWN__DRAIN_SECONDS": str(drain_seconds),
           "FORWARDER_LOG__FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder", "serve", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    async def _ready() -> None:
        async with aiohttp.ClientSession() as s:
            while True:
                try:
                    async with s.get(url + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    await asyncio.wait_for(_ready(), 15)
    return proc, url


async def test_real_sigterm_with_intercom_unreachable_spools_everything_then_delivers(
        tmp_path):
    """Steps: a daemon whose Intercom is unreachable takes 200 events; SIGTERM.
    Expect: exit 0 within drain_seconds + 1 s, all 200 in the spool; a restart against a
    working Intercom delivers all 200 and removes the spool."""
    dead_upstream = f"http://127.0.0.1:{_free_port()}"
    proc, url = await _start_daemon(tmp_path, dead_upstream, drain_seconds=1)
    async with aiohttp.ClientSession() as s:
        batch = [event(i) for i in range(200)]
        async with s.post(url + "/events/batch", data=orjson.dumps(batch)) as r:
            assert (await r.json())["accepted"] == 200
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert time.monotonic() - started < 1 + 1.5  # drain_seconds + 1 s, + process exit slack
    state = tmp_path / "state"
    assert len(spool_lines(state)) == 200

    fake = FakeIntercom(token=TOKEN)
    await fake.start()
    try:
        proc, url = await _start_daemon(tmp_path, fake.url, drain_seconds=5)
        await fake.wait_for_delivered(200, timeout=20)
        assert not (state / "spool.jsonl").exists()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert sorted(e["user_id"] for e in fake.delivered) == sorted(f"u{i}" for i in range(200))
    finally:
        if proc.returncode is None:
            proc.kill()
        await fake.stop()


async def test_second_sigterm_skips_the_drain(tmp_path):
    dead_upstream = f"http://127.0.0.1:{_free_port()}"
    proc, url = await _start_daemon(tmp_path, dead_upstream, drain_seconds=60)
    async with aiohttp.ClientSession() as s, s.post(url + "/events",
                                                    data=orjson.dumps(event(1))) as r:
        assert r.status == 202
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # Two pending SIGTERMs coalesce into one: send the second once the first was handled.
    seen: list[bytes] = []

    async def _until_stop_requested() -> None:
        while b"service.stop_requested" not in (line := await proc.stderr.readline()):
            assert line, "daemon exited before handling SIGTERM"
            seen.append(line)

    await asyncio.wait_for(_until_stop_requested(), 5)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert time.monotonic() - started < 5
    assert len(spool_lines(tmp_path / "state")) == 1
    stderr = b"".join(seen).decode() + (await proc.stderr.read()).decode()
    assert "service.force_stop_requested" in stderr
    assert TOKEN not in stderr


async def test_drain_waits_for_an_event_a_worker_holds_at_the_rate_gate(make_service, clock):
    """Steps: Intercom's budget is 1 a window; two events arrive; the second is held by the
    worker, waiting on the gate for the reset; stop is asked with drain time to spare; the
    reset comes. Expect: the held event is delivered during the drain, not spooled."""
    fake = FakeIntercom(token=TOKEN, budget=1, window_seconds=10, clock=clock)
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url,
                                 workers={"concurrency": 1}, shutdown={"drain_seconds": 30})
        async with aiohttp.ClientSession() as s:
            for i in range(2):
                async with s.post(svc.url + "/events", data=orjson.dumps(event(i))) as r:
                    assert r.status == 202
        await fake.wait_for_delivered(1)
        await wait_until(lambda: len(svc.queue) == 0)  # the worker has taken the second
        stopping = asyncio.create_task(svc.stop())
        await clock.wait_for_sleepers(3)  # stats, the gate's hold, the drain's tick
        for _ in range(400):  # let the drain tick on the fake clock until the reset passes
            clock.advance(0.05)
            await asyncio.sleep(0)
            if stopping.done():
                break
        await asyncio.wait_for(stopping, 5)
        assert len(fake.delivered) == 2
        assert spool_lines(Path(svc.config.storage.state_dir)) == []
    finally:
        await fake.stop()


async def test_a_worker_crash_stops_the_daemon_with_its_event_in_the_spool(make_service, clock,
                                                                          captured_logs):
    """Steps: sending hits a bug (an exception no verdict covers). Expect: the crash is
    logged, the daemon asks to stop with exit code 1, and the event is spooled, not lost."""
    svc = await make_service(clock=clock, shutdown={"drain_seconds": 0})

    async def broken_send(event):
        raise RuntimeError("a bug in the sender")

    svc.upstream.send = broken_send
    async with aiohttp.ClientSession() as s, s.post(svc.url + "/events",
                                                    data=orjson.dumps(event(7))) as r:
        assert r.status == 202
    await wait_until(lambda: svc.exit_code == 1)
    assert any(e["event"] == "service.worker_crashed" for e in captured_logs)
    await svc.stop()
    lines = spool_lines(Path(svc.config.storage.state_dir))
    assert [line["body"]["user_id"] for line in lines] == ["u7"]


async def test_a_crashing_auth_probe_stops_the_daemon_and_keeps_its_event(
        make_service, fake_intercom, clock, captured_logs):
    """Steps: the token is refused (paused, one event held for the probe); the probe's send
    hits a bug. Expect: a logged crash, exit code 1, and the held event in the spool."""
    fake_intercom.token = "revoked"
    svc = await make_service(clock=clock, shutdown={"drain_seconds": 0})
    async with aiohttp.ClientSession() as s, s.post(svc.url + "/events",
                                                    data=orjson.dumps(event(9))) as r:
        assert r.status == 202
    await wait_until(lambda: svc.workers.paused)

    async def broken_send(event):
        raise RuntimeError("a bug in the sender")

    svc.upstream.send = broken_send
    await clock.wait_for_sleepers(2)  # the stats line and the probe
    clock.advance(30)
    await wait_until(lambda: svc.exit_code == 1)
    assert any(e["event"] == "service.worker_crashed" for e in captured_logs)
    await svc.stop()
    lines = spool_lines(Path(svc.config.storage.state_dir))
    assert [line["body"]["user_id"] for line in lines] == ["u9"]


async def test_a_start_that_fails_before_loading_the_spool_leaves_it_alone(tmp_path):
    """Steps: a previous run left a spool; the next start has no token and fails at once.
    Expect: the spool is untouched, ready for a start that works."""
    import dataclasses

    from forwarder.config import ConfigError, Secret
    from forwarder.service import Service
    from tests.conftest import base_config

    cfg = base_config(tmp_path, "http://127.0.0.1:9")
    cfg = dataclasses.replace(cfg, intercom=dataclasses.replace(cfg.intercom,
                                                                access_token=Secret("")))
    state = Path(cfg.storage.state_dir)
    state.mkdir(parents=True)
    spool = state / "spool.jsonl"
    spool.write_bytes(b'{"route":"/events","attempts":2,"first_received_at":1.0,"key":"",'
                      b'"body":{"event_name":"kept","created_at":1700000000,"user_id":"u"}}\n')
    before = spool.read_bytes()
    try:
        async with Service(cfg):
            raise AssertionError("start must fail without a token")
    except ConfigError as exc:
        assert exc.key == "intercom.access_token"
    assert spool.read_bytes() == before


async def test_a_damaged_spool_is_moved_aside_and_its_readable_events_are_sent(
        tmp_path, make_service, fake_intercom, captured_logs):
    """Steps: the spool holds two good lines around a torn one; start. Expect: the daemon
    comes up and delivers both, and the damaged file is kept as spool.jsonl.corrupt-*
    (it used to be deleted with the unreadable line in it)."""
    state = tmp_path / "state"
    state.mkdir()
    good = [orjson.dumps({"route": "/events", "attempts": 1, "first_received_at": NOW,
                          "key": f"{i:032x}", "body": event(i)}) for i in range(2)]
    (state / "spool.jsonl").write_bytes(good[0] + b'\n{"route":"/ev\n' + good[1] + b"\n")
    await make_service()
    await fake_intercom.wait_for_delivered(2)
    [aside] = state.glob("spool.jsonl.corrupt-*")
    assert b'{"route":"/ev' in aside.read_bytes()
    assert not (state / "spool.jsonl").exists()
    [entry] = [e for e in captured_logs if e["event"] == "spool.corrupt_lines"]
    assert entry["skipped"] == 1 and entry["loaded"] == 2
