"""Every forwarding outcome, driven through the whole service by the fake Intercom's faults.
Time is a FakeClock: backoffs and probes run when the test advances it, never for real."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from forwarder import __version__
from forwarder.fake_intercom import FakeIntercom, Fault
from tests.conftest import TOKEN, wait_until

NOW = 1_700_000_000


def event(i: int = 0, user: str = "u1") -> dict:
    return {"event_name": "invited-friend", "created_at": NOW + i, "user_id": user}


async def post(svc, obj, path: str = "/events") -> int:
    async with aiohttp.ClientSession() as s, s.post(svc.url + path, data=orjson.dumps(obj)) as r:
        return r.status


def dead_letters(svc) -> list[dict]:
    from pathlib import Path
    path = Path(svc.config.storage.state_dir) / "dead-letter.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def assert_no_request_beyond(fake: FakeIntercom, n: int) -> None:
    """After clock.advance(), whatever became due runs on the loop and needs real I/O to
    reach the fake: give it a bounded moment to show up, and fail if it does."""
    with pytest.raises(TimeoutError):
        await fake.wait_for_requests(n + 1, timeout=0.3)
    assert len(fake.requests) == n


def metric(svc, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(f"intercom_forwarder_{name}", labels) or 0.0


async def test_requests_carry_intercoms_headers(make_service, fake_intercom, clock):
    svc = await make_service(clock=clock)
    assert await post(svc, event()) == 202
    await fake_intercom.wait_for_delivered(1)
    headers = {k.lower(): v for k, v in fake_intercom.requests[0].headers.items()}
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["intercom-version"] == "2.14"
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"
    assert f"intercom-forwarder/{__version__}" in headers["user-agent"]
    assert metric(svc, "events_forwarded_total", result="delivered", reason="") == 1


@pytest.mark.parametrize("fault, reason", [
    pytest.param(500, "server_error", id="500_then_202"),
    pytest.param(503, "server_error", id="503_then_202"),
    pytest.param(Fault.drop, "connection_error", id="dropped_connection_then_202"),
])
async def test_transient_failure_is_retried_after_backoff_then_delivered(
        make_service, fake_intercom, clock, fault, reason):
    fake_intercom.script(fault)
    svc = await make_service(clock=clock)
    assert await post(svc, event()) == 202
    await fake_intercom.wait_for_requests(1)
    await wait_until(lambda: svc.queue.waiting == 1)
    assert fake_intercom.delivered == []
    clock.advance(1.0)  # first backoff is a full-jitter draw below base_delay (0.5 s)
    await fake_intercom.wait_for_delivered(1)
    assert len(fake_intercom.requests) == 2
    assert metric(svc, "events_forwarded_total", result="retried", reason=reason) == 1
    assert dead_letters(svc) == []


async def test_timeout_is_retried(make_service, fake_intercom, clock):
    fake_intercom.script(Fault.slow(1.0))
    svc = await make_service(clock=clock, intercom={"timeout_seconds": 0.2})
    assert await post(svc, event()) == 202
    await wait_until(lambda: svc.queue.waiting == 1)
    clock.advance(1.0)
    await fake_intercom.wait_for_delivered(1)
    assert metric(svc, "events_forwarded_total", result="retried", reason="timeout") == 1


async def test_retries_do_not_block_other_events(make_service, fake_intercom, clock):
    fake_intercom.script(500)
    svc = await make_service(clock=clock, workers={"concurrency": 1})
    assert await post(svc, event(0)) == 202
    await wait_until(lambda: svc.queue.waiting == 1)
    assert await post(svc, event(1)) == 202
    await fake_intercom.wait_for_delivered(1)  # the second goes while the first waits
    assert fake_intercom.delivered[0]["created_at"] == NOW + 1


async def test_retries_exhausted_are_dead_lettered(make_service, fake_intercom, clock):
    fake_intercom.script(500, 500, 500)
    svc = await make_service(clock=clock, retry={"max_attempts": 3})
    assert await post(svc, event()) == 202
    for sent in (1, 2):
        await fake_intercom.wait_for_requests(sent)
        await wait_until(lambda: svc.queue.waiting == 1)
        clock.advance(5.0)
    await wait_until(lambda: len(dead_letters(svc)) == 1)
    [entry] = dead_letters(svc)
    assert entry["reason"] == "retries_exhausted"
    assert entry["attempts"] == 3
    assert entry["status"] == 500
    assert entry["event"] == {"event_name": "invited-friend", "created_at": NOW,
                              "user_id": "u1"}
    assert len(fake_intercom.requests) == 3


async def test_404_is_dead_lettered_and_never_retried(tmp_path, make_service, clock):
    fake = FakeIntercom(token=TOKEN, unknown_contacts=["ghost"])
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url)
        assert await post(svc, event(user="ghost")) == 202
        await wait_until(lambda: len(dead_letters(svc)) == 1)
        [entry] = dead_letters(svc)
        assert entry["reason"] == "contact_not_found" and entry["status"] == 404
        assert "not_found" in entry["response"]
        assert entry["first_received_at"] and entry["dead_lettered_at"]
        for _ in range(60):  # an hour, a minute at a time: never resent
            clock.advance(60)
            await asyncio.sleep(0)
        await assert_no_request_beyond(fake, 1)
        assert metric(svc, "events_forwarded_total", result="dead_lettered",
                      reason="contact_not_found") == 1
        # A dead letter is not a duplicate: once the contact exists, the same event goes.
        fake.unknown_contacts = frozenset()
        assert await post(svc, event(user="ghost")) == 202
        await fake.wait_for_delivered(1)
    finally:
        await fake.stop()


async def test_other_4xx_is_dead_lettered_as_rejected_with_intercoms_body(
        make_service, fake_intercom, clock):
    fake_intercom.script(400)
    svc = await make_service(clock=clock)
    assert await post(svc, event()) == 202
    await wait_until(lambda: len(dead_letters(svc)) == 1)
    [entry] = dead_letters(svc)
    assert entry["reason"] == "rejected" and entry["status"] == 400
    assert "error.list" in entry["response"]


async def test_401_pauses_without_losing_anything_and_a_probe_resumes(
        make_service, fake_intercom, clock, http, captured_logs):
    """Steps: the token is refused; three events arrive; readiness drops; the token is
    fixed; 30 s pass. Expect: no dead letter, one probe, then all three delivered."""
    fake_intercom.token = "someone-rotated-it"
    svc = await make_service(clock=clock)
    for i in range(3):
        assert await post(svc, event(i)) == 202
    await wait_until(lambda: svc.workers.paused)
    async with http.get(svc.url + "/readyz") as r:
        assert r.status == 503 and (await r.json())["reason"] == "paused_auth"
    assert metric(svc, "paused") == 1
    for _ in range(29):  # a second at a time: no probe before 30 s
        clock.advance(1)
        await asyncio.sleep(0)
    await assert_no_request_beyond(fake_intercom, 1)  # nothing sent while paused
    fake_intercom.token = TOKEN
    clock.advance(1)
    await fake_intercom.wait_for_delivered(3)
    async with http.get(svc.url + "/readyz") as r:
        assert r.status == 200
    assert metric(svc, "paused") == 0
    assert dead_letters(svc) == []
    assert [e["event"] for e in captured_logs].count("upstream.auth_paused") == 1


async def test_429_waits_for_reset_and_resends_without_counting_an_attempt(
        make_service, fake_intercom, clock):
    fake_intercom.script(Fault.rate_limited)
    svc = await make_service(clock=clock, retry={"max_attempts": 1})
    assert await post(svc, event()) == 202
    await fake_intercom.wait_for_requests(1)
    await clock.wait_for_sleepers(2)
    assert fake_intercom.delivered == []
    clock.advance(11)  # past X-RateLimit-Reset
    await fake_intercom.wait_for_delivered(1)
    assert metric(svc, "rate_limited_total") == 1
    assert dead_letters(svc) == []  # max_attempts=1 would have dead-lettered a counted failure


async def test_remaining_reaching_zero_holds_every_worker_until_reset(make_service, clock):
    fake = FakeIntercom(token=TOKEN, budget=3, window_seconds=10, clock=clock)
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url)
        for i in range(5):
            assert await post(svc, event(i)) == 202
        await fake.wait_for_delivered(3)
        await clock.wait_for_sleepers(2)
        assert len(fake.requests) == 3 and fake.rate_limited == 0
        clock.advance(10)
        await fake.wait_for_delivered(5)
        assert fake.rate_limited == 0
    finally:
        await fake.stop()


async def test_a_dead_letter_the_disk_refuses_is_kept_not_lost(tmp_path, make_service, clock,
                                                                captured_logs):
    """Steps: the dead-letter path cannot be written (here: a directory stands there);
    Intercom answers 404; the daemon stops. Expect: no worker crash, the failure is logged,
    and the event is in the spool instead of nowhere."""
    fake = FakeIntercom(token=TOKEN, unknown_contacts=["ghost"])
    await fake.start()
    try:
        (tmp_path / "state" / "dead-letter.jsonl").mkdir(parents=True)
        svc = await make_service(clock=clock, upstream_url=fake.url,
                                 shutdown={"drain_seconds": 0})
        assert await post(svc, event(user="ghost")) == 202
        await wait_until(lambda: any(e["event"] == "deadletter.write_failed"
                                     for e in captured_logs))
        assert svc.workers.crashed is None
        await svc.stop()
        spool = (tmp_path / "state" / "spool.jsonl").read_bytes().splitlines()
        assert [orjson.loads(x)["body"]["user_id"] for x in spool] == ["ghost"]
    finally:
        await fake.stop()
