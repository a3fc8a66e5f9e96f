"""UpstreamClient against the fake Intercom on 127.0.0.1: the headers it sends, and the
Verdict each scripted fault comes to. send() never raises for HTTP or network trouble."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from forwarder import __version__
from forwarder.clock import FakeClock
from forwarder.config import IntercomConfig, Secret
from forwarder.event import Event, Route
from forwarder.fake_intercom import FakeIntercom, Fault
from forwarder.upstream import (
    Outcome,
    RateHeaders,
    UpstreamClient,
    Verdict,
    classify,
    parse_rate_headers,
)

TOKEN = "s3cr3t-t0ken-value"
WALL = 1_700_000_003.0


def event(user: str = "u1", at: int = 1_700_000_000, route: Route = Route.EVENTS) -> Event:
    body = orjson.dumps({"event_name": "placed-order", "created_at": at, "user_id": user})
    return Event(body=body, key=b"k" * 16, route=route)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start_wall=WALL)


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeIntercom]:
    f = FakeIntercom(token=TOKEN, clock=clock, unknown_contacts=["ghost"])
    await f.start()
    yield f
    await f.stop()


async def make_client(
    base_url: str, clock: FakeClock, timeout_seconds: float = 5.0, **kw
) -> UpstreamClient:
    cfg = IntercomConfig(base_url=base_url, timeout_seconds=timeout_seconds)
    client = UpstreamClient(cfg, Secret(TOKEN), pool_size=4, clock=clock, **kw)
    await client.start()
    return client


@pytest.fixture
async def client(fake: FakeIntercom, clock: FakeClock) -> AsyncIterator[UpstreamClient]:
    c = await make_client(fake.url, clock)
    yield c
    await c.close()


async def test_request_carries_intercoms_headers_and_the_exact_body(client, fake):
    ev = event()
    verdict = await client.send(ev)
    assert verdict.outcome is Outcome.DELIVERED and verdict.status == 202
    [req] = fake.requests
    assert (req.method, req.path, req.body) == ("POST", "/events", ev.body)
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.headers["Intercom-Version"] == "2.14"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Accept"] == "application/json"
    assert req.headers["User-Agent"].startswith(f"intercom-forwarder/{__version__} aiohttp/")
    assert "python/3." in req.headers["User-Agent"]


async def test_summaries_go_to_their_route(client, fake):
    verdict = await client.send(event(route=Route.SUMMARIES))
    assert verdict.outcome is Outcome.DELIVERED and verdict.status == 200
    assert fake.requests[0].path == "/events/summaries"


async def test_delivered_verdict_carries_the_rate_headers(client, fake):
    verdict = await client.send(event())
    assert verdict.rate == RateHeaders(limit=1_000_000, remaining=999_999, reset_at=1_700_000_010)


async def test_user_agent_can_be_overridden(fake, clock):
    c = await make_client(fake.url, clock, user_agent="demo/1")
    try:
        await c.send(event())
    finally:
        await c.close()
    assert fake.requests[0].headers["User-Agent"] == "demo/1"


@pytest.mark.parametrize(
    "answer, outcome, reason, status",
    [
        pytest.param(500, Outcome.RETRY_LATER, "server_error", 500, id="500_retry_later"),
        pytest.param(503, Outcome.RETRY_LATER, "server_error", 503, id="503_retry_later"),
        pytest.param(404, Outcome.DEAD_LETTER, "contact_not_found", 404, id="404_dead_letter"),
        pytest.param(400, Outcome.DEAD_LETTER, "rejected", 400, id="400_dead_letter_rejected"),
        pytest.param(403, Outcome.PAUSE_AUTH, "forbidden", 403, id="403_pause"),
        pytest.param(
            Fault.rate_limited, Outcome.RATE_LIMITED, "rate_limited", 429, id="429_rate_limited"
        ),
        pytest.param(
            Fault.drop, Outcome.RETRY_LATER, "connection_error", None, id="drop_connection_error"
        ),
    ],
)
async def test_scripted_fault_comes_to_the_right_verdict(
    client, fake, answer, outcome, reason, status
):
    fake.script(answer)
    verdict = await client.send(event())
    assert (verdict.outcome, verdict.reason, verdict.status) == (outcome, reason, status)
    assert fake.delivered == []


async def test_error_verdict_keeps_intercoms_body(client, fake):
    fake.script(400)
    verdict = await client.send(event())
    assert orjson.loads(verdict.body)["type"] == "error.list"


async def test_unknown_contact_is_dead_lettered_with_not_found(client, fake):
    verdict = await client.send(event(user="ghost"))
    assert (verdict.outcome, verdict.reason) == (Outcome.DEAD_LETTER, "contact_not_found")
    assert orjson.loads(verdict.body)["errors"][0]["code"] == "not_found"


async def test_429_verdict_has_the_parsed_rate_headers(client, fake):
    fake.script(Fault.rate_limited)
    verdict = await client.send(event())
    assert verdict.rate == RateHeaders(limit=1_000_000, remaining=0, reset_at=1_700_000_010)


async def test_revoked_token_pauses_and_the_verdict_never_shows_the_token(client, fake):
    fake.token = "rotated"
    verdict = await client.send(event())
    assert (verdict.outcome, verdict.reason, verdict.status) == (
        Outcome.PAUSE_AUTH,
        "unauthorized",
        401,
    )
    assert TOKEN not in repr(verdict) and TOKEN.encode() not in verdict.body


async def test_slow_answer_with_a_short_timeout_is_a_timeout(fake, clock):
    c = await make_client(fake.url, clock, timeout_seconds=0.05)
    try:
        fake.script(Fault.slow(5))
        verdict = await c.send(event())
    finally:
        await c.close()
    assert verdict == Verdict(Outcome.RETRY_LATER, "timeout")


async def test_refused_connection_is_a_connection_error(clock):
    with socket.socket() as s:  # a loopback port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = await make_client(f"http://127.0.0.1:{port}", clock)
    try:
        verdict = await c.send(event())
    finally:
        await c.close()
    assert (verdict.outcome, verdict.reason, verdict.status) == (
        Outcome.RETRY_LATER,
        "connection_error",
        None,
    )
    assert TOKEN not in repr(verdict)


async def test_latency_is_measured_with_the_injected_clock(client, fake, clock):
    fake.script(Fault.slow(0.05))
    sending = asyncio.ensure_future(client.send(event()))
    await fake.wait_for_requests(1)
    clock.advance(0.25)
    verdict = await asyncio.wait_for(sending, 5)
    assert verdict.latency_s == 0.25


async def test_cancelled_send_propagates_cancellation(client, fake):
    fake.script(Fault.slow(5))
    sending = asyncio.ensure_future(client.send(event()))
    await fake.wait_for_requests(1)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending


async def test_token_never_appears_in_str_or_repr(client, clock):
    unstarted = UpstreamClient(IntercomConfig(), Secret(TOKEN), pool_size=1, clock=clock)
    for c in (client, unstarted):
        assert TOKEN not in str(c) and TOKEN not in repr(c)


async def test_send_before_start_is_a_bug(clock):
    c = UpstreamClient(IntercomConfig(), Secret(TOKEN), pool_size=1, clock=clock)
    with pytest.raises(RuntimeError, match="before start"):
        await c.send(event())


async def test_get_proxies_list_events_raw(client, fake):
    await client.send(event(user="u1"))
    status, headers, body = await client.get("/events", [("type", "user"), ("user_id", "u1")])
    assert status == 200 and "X-RateLimit-Remaining" in headers
    listing = orjson.loads(body)
    assert [e["user_id"] for e in listing["events"]] == ["u1"]
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {TOKEN}"


async def test_close_is_idempotent(fake, clock):
    c = await make_client(fake.url, clock)
    await c.close()
    await c.close()
    with pytest.raises(RuntimeError):
        await c.send(event())


@pytest.mark.parametrize("wrap", [dict, CIMultiDict, lambda h: CIMultiDictProxy(CIMultiDict(h))])
def test_classify_reads_headers_alike_from_a_dict_and_from_aiohttps_multidicts(wrap) -> None:
    """aiohttp's headers are read in place (not copied with lower-cased keys): any case
    matches, and a repeated header gives its last value, as with a plain dict."""
    headers = wrap([("x-RateLimit-Limit", "100"), ("X-RATELIMIT-REMAINING", "7"),
                    ("X-RateLimit-Reset", "1700000010"), ("retry-after", "9"),
                    ("Retry-After", "3")])
    verdict = classify(429, headers, b"")
    assert verdict.rate == RateHeaders(limit=100, remaining=7, reset_at=1_700_000_010.0)
    assert verdict.retry_after_s == 3.0
    assert parse_rate_headers(headers) == verdict.rate
    assert parse_rate_headers(wrap([("Server", "x")])) is None
