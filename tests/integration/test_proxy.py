"""GET /events through the whole service: what an app sees and what reaches the fake
Intercom. Time is a FakeClock wherever the rate budget matters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Self

import aiohttp
import orjson
import pytest
from yarl import URL

from forwarder.fake_intercom import FakeIntercom
from tests.conftest import TOKEN, wait_until

NOW = 1_700_000_000
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def event(i: int = 0, user: str = "u1") -> dict:
    return {"event_name": "invited-friend", "created_at": NOW + i, "user_id": user}


async def post(svc, obj: dict) -> int:
    async with aiohttp.ClientSession() as s, s.post(svc.url + "/events",
                                                    data=orjson.dumps(obj)) as r:
        return r.status


async def get(svc, query: str, headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, str], bytes]:
    url = URL(svc.url + "/events?" + query, encoded=True)
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


def reads(fake: FakeIntercom) -> list:
    return [r for r in fake.requests if r.method == "GET"]


async def test_a_listing_comes_back_unchanged_and_was_fetched_with_the_daemons_token(
        make_service, clock):
    fake = FakeIntercom(token=TOKEN, budget=50, window_seconds=10, clock=clock)
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url)
        assert await post(svc, event()) == 202
        await fake.wait_for_delivered(1)
        status, headers, body = await get(svc, "type=user&user_id=u1",
                                          headers={"Authorization": "Bearer what-the-app-has"})
    finally:
        await fake.stop()
    assert status == 200
    assert orjson.loads(body) == {
        "type": "event.list", "pages": {},
        "events": [{"type": "event", "event_name": "invited-friend", "created_at": NOW,
                    "user_id": "u1"}]}
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert {name: headers[name] for name in RATE_HEADERS} == {
        "X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "48",
        "X-RateLimit-Reset": str(NOW + 10)}
    [read] = reads(fake)
    assert read.headers["Authorization"] == f"Bearer {TOKEN}"
    assert read.headers["Intercom-Version"] == "2.14"


@pytest.mark.parametrize("query, expected", [
    pytest.param("type=user&user_id=314159", {"type": "user", "user_id": "314159"},
                 id="user_id"),
    pytest.param("type=user&email=frodo%2Bring%40example.com",
                 {"type": "user", "email": "frodo+ring@example.com"}, id="email-url-encoded"),
    pytest.param("type=user&intercom_user_id=6762f22b1bb69f9f2193bc12",
                 {"type": "user", "intercom_user_id": "6762f22b1bb69f9f2193bc12"},
                 id="intercom_user_id-for-leads"),
    pytest.param("user_id=u%20one&type=user&per_page=5&summary=true",
                 {"user_id": "u one", "type": "user", "per_page": "5", "summary": "true"},
                 id="per_page-and-summary"),
    pytest.param("type=user&user_id=u1&summary=false&page=2",
                 {"type": "user", "user_id": "u1", "summary": "false", "page": "2"},
                 id="other-parameters-pass-through"),
])  # fmt: skip
async def test_each_documented_query_reaches_intercom_as_sent(make_service, fake_intercom,
                                                              query, expected):
    svc = await make_service()
    status, _, _ = await get(svc, query)
    assert status == 200
    [read] = reads(fake_intercom)
    assert read.path == "/events"
    assert read.query == expected
    assert list(read.query) == list(expected)  # order kept


@pytest.mark.parametrize("query, field, code", [
    pytest.param("user_id=u1", "type", "parameter_not_found", id="type-missing"),
    pytest.param("type=lead&user_id=u1", "type", "parameter_invalid", id="type-not-user"),
    pytest.param("type=user", "user_id", "parameter_not_found", id="no-identity"),
    pytest.param("type=user&user_id=u1&email=a%40b.c", "email", "parameter_invalid",
                 id="two-identities"),
    pytest.param("type=user&intercom_user_id=", "intercom_user_id", "parameter_invalid",
                 id="empty-identity"),
    pytest.param("type=user&user_id=u1&user_id=u2", "user_id", "parameter_invalid",
                 id="identity-repeated"),
    pytest.param("type=user&user_id=u1&per_page=0", "per_page", "parameter_invalid",
                 id="per_page-zero"),
    pytest.param("type=user&user_id=u1&per_page=-3", "per_page", "parameter_invalid",
                 id="per_page-negative"),
    pytest.param("type=user&user_id=u1&per_page=ten", "per_page", "parameter_invalid",
                 id="per_page-not-a-number"),
    pytest.param("type=user&user_id=u1&summary=yes", "summary", "parameter_invalid",
                 id="summary-not-a-boolean"),
])  # fmt: skip
async def test_an_invalid_query_gets_a_400_naming_the_parameter_and_never_reaches_intercom(
        make_service, fake_intercom, query, field, code):
    svc = await make_service()
    status, _, body = await get(svc, query)
    assert status == 400
    answer = orjson.loads(body)
    assert answer["type"] == "error.list"
    assert [(e["field"], e["code"]) for e in answer["errors"]] == [(field, code)]
    assert field in answer["errors"][0]["message"]
    assert fake_intercom.requests == []


async def test_a_429_comes_back_unchanged_and_a_bad_query_is_still_answered_at_once(
        make_service, clock):
    """Steps: Intercom's budget is spent; an app lists events; then sends a bad query.
    Expect: Intercom's 429 and rate headers come back as they are; the bad query gets its
    400 at once although the gate is now holding, and costs Intercom nothing."""
    fake = FakeIntercom(token=TOKEN, budget=0, window_seconds=10, clock=clock)
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url)
        status, headers, body = await get(svc, "type=user&user_id=u1")
        assert status == 429
        assert orjson.loads(body)["errors"][0]["code"] == "rate_limit_exceeded"
        assert headers["X-RateLimit-Remaining"] == "0"
        assert headers["X-RateLimit-Reset"] == str(NOW + 10)
        assert svc.gate.held_until is not None
        status, _, body = await get(svc, "type=user&user_id=u1&per_page=0")
        assert status == 400
        assert len(fake.requests) == 1
    finally:
        await fake.stop()


async def test_a_read_spends_the_budget_the_writes_use(make_service, clock):
    """Steps: a budget of 2 per window; one read, then two events. Expect: the read and one
    event in this window; the other event waits for the reset, then goes."""
    fake = FakeIntercom(token=TOKEN, budget=2, window_seconds=10, clock=clock)
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url)
        assert (await get(svc, "type=user&user_id=u1"))[0] == 200
        for i in range(2):
            assert await post(svc, event(i)) == 202
        await fake.wait_for_delivered(1)
        await wait_until(lambda: svc.gate.held_until is not None)
        assert len(fake.requests) == 2 and fake.rate_limited == 0
        clock.advance(10)
        await fake.wait_for_delivered(2)
        assert fake.rate_limited == 0
    finally:
        await fake.stop()


async def test_a_read_goes_ahead_of_queued_writes(make_service, clock):
    """Steps: a budget of 1 per window; three events (one goes, two wait for the reset);
    an app lists events while they wait; the window resets. Expect: the read is the first
    request of the new window, then the two events follow."""
    fake = FakeIntercom(token=TOKEN, budget=1, window_seconds=10, clock=clock)
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url)
        for i in range(3):
            assert await post(svc, event(i)) == 202
        await fake.wait_for_delivered(1)
        await wait_until(lambda: svc.gate.held_until is not None)
        sleepers = clock.sleepers
        read = asyncio.create_task(get(svc, "type=user&user_id=u1"))
        await clock.wait_for_sleepers(sleepers + 1)  # the read waits at the gate too
        assert len(fake.requests) == 1
        clock.advance(10)
        status, _, _ = await asyncio.wait_for(read, 5)  # a write first would hold it 10 s more
        assert status == 200
        assert [r.method for r in fake.requests] == ["POST", "GET"]
        clock.advance(10)
        await fake.wait_for_delivered(2)
        clock.advance(10)
        await fake.wait_for_delivered(3)
        assert [r.method for r in fake.requests] == ["POST", "GET", "POST", "POST"]
    finally:
        await fake.stop()


async def test_reads_still_work_while_forwarding_is_paused_and_report_intercoms_401(
        make_service, fake_intercom, clock):
    """Steps: the token is refused, so forwarding pauses; an app lists events; the token is
    fixed before the next probe; the app lists again. Expect: the first read gets
    Intercom's 401 body unchanged, the second a 200, and forwarding stays paused until
    its own probe."""
    fake_intercom.token = "someone-rotated-it"
    svc = await make_service(clock=clock)
    assert await post(svc, event()) == 202
    await wait_until(lambda: svc.workers.paused)
    status, _, body = await get(svc, "type=user&user_id=u1")
    assert status == 401
    answer = orjson.loads(body)
    assert answer["type"] == "error.list"
    assert answer["errors"] == [{"code": "unauthorized", "message": "Access Token Invalid"}]
    fake_intercom.token = TOKEN
    status, _, _ = await get(svc, "type=user&user_id=u1")
    assert status == 200
    assert svc.workers.paused  # a read neither pauses nor resumes forwarding
    clock.advance(30)
    await fake_intercom.wait_for_delivered(1)


class _Silent:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self) -> None:
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Self:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.append(writer)

        self._server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def closed_port_url() -> AsyncIterator[str]:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    yield f"http://127.0.0.1:{port}"


async def test_intercom_unreachable_is_a_502_in_intercoms_error_shape(make_service,
                                                                        closed_port_url):
    svc = await make_service(upstream_url=closed_port_url)
    status, _, body = await get(svc, "type=user&user_id=u1")
    assert status == 502
    assert orjson.loads(body) == {"type": "error.list", "errors": [
        {"code": "connection_error",
         "message": "Intercom did not answer GET /events (connection_error)"}]}


async def test_intercom_timing_out_is_a_504(make_service):
    async with _Silent() as silent:
        svc = await make_service(upstream_url=silent.url, intercom={"timeout_seconds": 0.2})
        status, _, body = await get(svc, "type=user&user_id=u1")
    assert status == 504
    assert orjson.loads(body)["errors"][0]["code"] == "timeout"
