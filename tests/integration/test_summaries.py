"""POST /events/summaries through the whole service: validated at the intake, queued, and
forwarded to Intercom's POST /events/summaries under the same outcome rules as events.
Time is a FakeClock: backoffs and probes run when the test advances it."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson
import pytest

from forwarder.fake_intercom import FakeIntercom
from tests.conftest import TOKEN, wait_until

NOW = 1_700_000_000
SUMMARY = {"user_id": "314159",
           "event_summaries": {"event_name": "Placed.Order", "count": 3,
                               "first": NOW - 3600, "last": NOW}}
FORWARDED = {"user_id": "314159",
             "event_summaries": {"event_name": "placed-order", "count": 3,
                                 "first": NOW - 3600, "last": NOW}}


async def post(svc, obj: object) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(svc.url + "/events/summaries",
                                                    data=orjson.dumps(obj)) as r:
        return r.status, await r.read()


def dead_letters(svc) -> list[dict]:
    path = Path(svc.config.storage.state_dir) / "dead-letter.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def summaries_sent(fake: FakeIntercom) -> list:
    return [r for r in fake.requests if r.path == "/events/summaries"]


async def test_a_summary_is_answered_200_and_forwarded_normalised(make_service, fake_intercom):
    svc = await make_service()
    assert await post(svc, SUMMARY) == (200, b"")
    await fake_intercom.wait_for_requests(1)
    [sent] = summaries_sent(fake_intercom)
    assert sent.method == "POST"
    assert sent.json == FORWARDED
    assert sent.headers["Authorization"] == f"Bearer {TOKEN}"
    await wait_until(lambda: sent.status == 200)


@pytest.mark.parametrize("body, field", [
    pytest.param({"event_summaries": SUMMARY["event_summaries"]}, "user_id",
                 id="user_id-missing"),
    pytest.param({"user_id": "1"}, "event_summaries", id="event_summaries-missing"),
    pytest.param({"user_id": "1", "event_summaries": [SUMMARY["event_summaries"]]},
                 "event_summaries", id="event_summaries-an-array"),
    pytest.param({"user_id": "1", "event_summaries": {**SUMMARY["event_summaries"],
                                                       "count": 0}},
                 "event_summaries.count", id="count-below-1"),
    pytest.param({"user_id": "1", "event_summaries": {**SUMMARY["event_summaries"],
                                                       "first": NOW + 1}},
                 "event_summaries.last", id="last-before-first"),
    pytest.param({"user_id": "1", "event_summaries": {**SUMMARY["event_summaries"],
                                                       "event_name": ""}},
                 "event_summaries.event_name", id="event_name-empty"),
])  # fmt: skip
async def test_an_invalid_summary_gets_a_400_naming_the_field_and_is_not_forwarded(
        make_service, fake_intercom, body, field):
    svc = await make_service()
    status, answer = await post(svc, body)
    assert status == 400
    errors = orjson.loads(answer)["errors"]
    assert field in [e["field"] for e in errors]
    assert fake_intercom.requests == []


@pytest.mark.parametrize("fault", [500, 503])
async def test_a_5xx_is_retried_after_backoff_then_delivered(make_service, fake_intercom,
                                                             clock, fault):
    fake_intercom.script(fault)
    svc = await make_service(clock=clock)
    assert (await post(svc, SUMMARY))[0] == 200
    await fake_intercom.wait_for_requests(1)
    await wait_until(lambda: svc.queue.waiting == 1)
    clock.advance(1.0)  # the first backoff is a full-jitter draw below 0.5 s
    await fake_intercom.wait_for_requests(2)
    first, second = summaries_sent(fake_intercom)
    assert first.json == second.json == FORWARDED
    await wait_until(lambda: second.status == 200)
    assert dead_letters(svc) == []


async def test_a_404_is_dead_lettered_at_once_and_never_retried(make_service, clock):
    fake = FakeIntercom(token=TOKEN, unknown_contacts=["314159"])
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url)
        assert (await post(svc, SUMMARY))[0] == 200
        await wait_until(lambda: len(dead_letters(svc)) == 1)
        [entry] = dead_letters(svc)
        assert entry["reason"] == "contact_not_found" and entry["status"] == 404
        assert entry["event"] == FORWARDED
        clock.advance(3600)
        assert len(fake.requests) == 1
    finally:
        await fake.stop()


async def test_another_4xx_is_dead_lettered_as_rejected_with_intercoms_body(
        make_service, fake_intercom, clock):
    fake_intercom.script(422)
    svc = await make_service(clock=clock)
    assert (await post(svc, SUMMARY))[0] == 200
    await wait_until(lambda: len(dead_letters(svc)) == 1)
    [entry] = dead_letters(svc)
    assert entry["reason"] == "rejected" and entry["status"] == 422
    assert "error.list" in entry["response"]


async def test_a_401_pauses_forwarding_and_the_summary_goes_once_the_token_works(
        make_service, fake_intercom, clock, http):
    """Steps: the token is refused; a summary arrives; readiness drops; the token is fixed;
    30 s pass. Expect: no dead letter, and the summary delivered by the probe."""
    fake_intercom.token = "someone-rotated-it"
    svc = await make_service(clock=clock)
    assert (await post(svc, SUMMARY))[0] == 200
    await wait_until(lambda: svc.workers.paused)
    async with http.get(svc.url + "/readyz") as r:
        assert r.status == 503 and (await r.json())["reason"] == "paused_auth"
    fake_intercom.token = TOKEN
    clock.advance(30)
    await fake_intercom.wait_for_requests(2)
    last = summaries_sent(fake_intercom)[-1]
    assert last.json == FORWARDED
    await wait_until(lambda: last.status == 200)
    await wait_until(lambda: not svc.workers.paused)
    assert dead_letters(svc) == []


async def test_a_dead_lettered_summary_is_replayed_once_and_removed(make_service, clock):
    """Steps: a summary for an unknown user is dead-lettered; the user is created; the
    dead letters are replayed. Expect: the summary delivered and gone from the file."""
    from forwarder.deadletter import replay

    fake = FakeIntercom(token=TOKEN, unknown_contacts=["314159"])
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url)
        assert (await post(svc, SUMMARY))[0] == 200
        await wait_until(lambda: len(dead_letters(svc)) == 1)
        fake.unknown_contacts = set()
        result = await replay(Path(svc.config.storage.state_dir), base_url=svc.url)
        await fake.wait_for_requests(2)
        assert fake.requests[-1].json == FORWARDED
        assert result.accepted == 1
        assert dead_letters(svc) == []
    finally:
        await fake.stop()
