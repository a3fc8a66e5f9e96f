"""The fake Intercom answers as Intercom's Data Events pages describe; every other test
trusts it, so its budget, headers, auth, 404 and de-duplication are pinned here."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from forwarder.clock import FakeClock
from forwarder.fake_intercom import UNLIMITED, FakeIntercom, Fault

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
WALL = 1_700_000_003.0  # 3 s into a 10 s window that ends at 1_700_000_010


def ev(user: str = "u1", name: str = "placed-order", at: int = 1_700_000_000, **kw) -> dict:
    return {"event_name": name, "created_at": at, "user_id": user, **kw}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start_wall=WALL)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def started(**kw) -> FakeIntercom:
    fake = FakeIntercom(token=TOKEN, **kw)
    await fake.start()
    return fake


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeIntercom]:
    f = await started(clock=clock, unknown_contacts=["ghost", "ghost@example.org"])
    yield f
    await f.stop()


async def post(
    http: aiohttp.ClientSession, fake: FakeIntercom, obj: object, headers=AUTH, path="/events"
) -> tuple[int, dict[str, str], bytes]:
    body = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    async with http.post(fake.url + path, data=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def test_event_is_accepted_with_202_and_an_empty_body(http, fake):
    status, _, body = await post(http, fake, ev())
    assert (status, body) == (202, b"")
    assert fake.delivered == [ev()]
    [req] = fake.requests
    assert (req.method, req.path, req.json, req.status) == ("POST", "/events", ev(), 202)
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert fake.url.startswith("http://127.0.0.1:")


async def test_every_authenticated_answer_carries_rate_headers(http, fake):
    _, headers, _ = await post(http, fake, ev())
    assert headers["X-RateLimit-Limit"] == str(UNLIMITED)
    assert headers["X-RateLimit-Remaining"] == str(UNLIMITED - 1)
    assert headers["X-RateLimit-Reset"] == "1700000010"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing_token"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong_token"),
        pytest.param({"Authorization": TOKEN}, id="token_without_bearer"),
    ],
)
async def test_bad_token_is_401_with_intercoms_error_list_and_no_rate_headers(http, fake, headers):
    status, resp_headers, body = await post(http, fake, ev(), headers=headers)
    assert status == 401
    parsed = orjson.loads(body)
    assert parsed["type"] == "error.list" and parsed["request_id"]
    assert parsed["errors"] == [{"code": "unauthorized", "message": "Access Token Invalid"}]
    assert "X-RateLimit-Remaining" not in resp_headers
    assert fake.delivered == []


async def test_token_can_be_revoked_and_fixed_while_running(http, fake):
    fake.token = "rotated"
    assert (await post(http, fake, ev()))[0] == 401
    fake.token = TOKEN
    assert (await post(http, fake, ev()))[0] == 202


@pytest.mark.parametrize(
    "identity",
    [
        pytest.param({"user_id": "ghost"}, id="by_user_id"),
        pytest.param({"user_id": None, "email": "ghost@example.org"}, id="by_email"),
        pytest.param({"user_id": None, "id": "ghost"}, id="by_lead_id"),
    ],
)
async def test_unknown_contact_is_404_user_not_found(http, fake, identity):
    status, headers, body = await post(http, fake, {**ev(), **identity})
    assert status == 404
    assert orjson.loads(body)["errors"] == [{"code": "not_found", "message": "User Not Found"}]
    assert "X-RateLimit-Remaining" in headers
    assert fake.delivered == []


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({"created_at": 1, "user_id": "u1"}, id="missing_event_name"),
        pytest.param({"event_name": "x", "created_at": 1}, id="missing_identity"),
        pytest.param(b"{not json", id="invalid_json"),
        pytest.param([ev()], id="not_an_object"),
    ],
)
async def test_invalid_body_is_400_with_an_error_list(http, fake, obj):
    status, _, body = await post(http, fake, obj)
    assert status == 400
    parsed = orjson.loads(body)
    assert parsed["type"] == "error.list" and parsed["errors"][0]["code"]


async def test_duplicate_is_answered_202_but_stored_once(http, fake):
    """Intercom's key: contact, event name (case-insensitive, '.'/'$' -> '-'), created_at."""
    assert (await post(http, fake, ev(name="placed-order")))[0] == 202
    assert (await post(http, fake, ev(name="Placed.Order")))[0] == 202
    assert (await post(http, fake, ev(name="placed-order", at=1_700_000_001)))[0] == 202
    assert [e["created_at"] for e in fake.delivered] == [1_700_000_000, 1_700_000_001]
    assert fake.duplicates == 1


async def test_budget_is_enforced_per_fixed_window_then_refills(http, clock):
    fake = await started(budget=2, window_seconds=10, clock=clock)
    try:
        answers = [await post(http, fake, ev(at=1_700_000_000 + i)) for i in range(3)]
        assert [a[0] for a in answers] == [202, 202, 429]
        assert [a[1]["X-RateLimit-Remaining"] for a in answers] == ["1", "0", "0"]
        assert {a[1]["X-RateLimit-Limit"] for a in answers} == {"2"}
        assert {a[1]["X-RateLimit-Reset"] for a in answers} == {"1700000010"}
        assert orjson.loads(answers[2][2])["errors"][0]["code"] == "rate_limit_exceeded"
        assert fake.rate_limited == 1 and len(fake.delivered) == 2

        clock.advance(7)  # wall 1_700_000_010: a new window
        status, headers, _ = await post(http, fake, ev(at=1_700_000_009))
        assert status == 202
        assert headers["X-RateLimit-Remaining"] == "1"
        assert headers["X-RateLimit-Reset"] == "1700000020"
    finally:
        await fake.stop()


async def test_scripted_answers_are_consumed_in_order(http, fake):
    fake.script(500, 404, 400, Fault.rate_limited)
    answers = [await post(http, fake, ev(at=1_700_000_000 + i)) for i in range(5)]
    assert [a[0] for a in answers] == [500, 404, 400, 429, 202]
    assert orjson.loads(answers[0][2])["errors"][0]["code"] == "server_error"
    assert answers[3][1]["X-RateLimit-Remaining"] == "0"
    assert [r.status for r in fake.requests] == [500, 404, 400, 429, 202]
    assert len(fake.delivered) == 1 and fake.rate_limited == 1


async def test_scripted_drop_closes_the_connection_without_an_answer(http, fake):
    fake.script(Fault.drop)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, fake, ev())
    assert fake.requests[0].status is None and fake.delivered == []
    assert (await post(http, fake, ev()))[0] == 202


async def test_scripted_slow_answer_delays_then_answers_normally(http, fake):
    fake.script(Fault.slow(0.05))
    assert (await post(http, fake, ev()))[0] == 202
    assert len(fake.delivered) == 1


async def test_stop_cuts_a_slow_answer_short(http, clock):
    fake = await started(clock=clock)
    fake.script(Fault.slow(60))
    pending = asyncio.ensure_future(post(http, fake, ev()))
    await fake.wait_for_requests(1)
    await asyncio.wait_for(fake.stop(), 5)
    status, _, _ = await asyncio.wait_for(pending, 5)  # answered at once, not after 60 s
    assert status == 202


async def test_summaries_are_answered_200(http, fake):
    summary = {"event_summaries": {"user_id": "u1", "events": []}}
    status, headers, _ = await post(http, fake, summary, path="/events/summaries")
    assert status == 200 and "X-RateLimit-Limit" in headers
    assert fake.requests[0].path == "/events/summaries"


async def test_list_events_returns_the_delivered_events_of_that_user(http, fake):
    await post(http, fake, ev(user="u1"))
    await post(http, fake, ev(user="u2"))
    url = fake.url + "/events"
    async with http.get(url, params={"type": "user", "user_id": "u1"}, headers=AUTH) as r:
        assert r.status == 200
        listing = await r.json()
    assert listing["type"] == "event.list" and listing["pages"] == {}
    assert [(e["type"], e["user_id"]) for e in listing["events"]] == [("event", "u1")]
    assert fake.requests[-1].query == {"type": "user", "user_id": "u1"}
    async with http.get(url, params={"user_id": "u1"}, headers=AUTH) as r:
        assert r.status == 400  # type=user is required


async def test_wait_for_delivered_times_out_with_what_it_has(fake):
    with pytest.raises(TimeoutError, match="0 delivered"):
        await fake.wait_for_delivered(1, timeout=0.01)


async def test_runs_standalone_from_the_command_line():
    """python -m forwarder.fake_intercom prints its URL and answers until stopped."""
    with socket.socket() as s:  # a free loopback port for the child
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder.fake_intercom", "--port", str(port),
        "--budget", "5", "--token", "T", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line.decode().strip() == f"http://127.0.0.1:{port}"
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{port}/events",
                data=orjson.dumps(ev()),
                headers={"Authorization": "Bearer T"},
            ) as r,
        ):
            assert r.status == 202 and r.headers["X-RateLimit-Limit"] == "5"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
