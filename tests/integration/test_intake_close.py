"""The intake while the daemon stops: nothing is answered 202 that the stop cannot keep.

Issue 12 A1: a request whose body is still arriving when the stop begins was answered 202
after the stop had taken the queue for the spool, so its event was neither forwarded nor
spooled. Now the intake checks again once the body is in, and a closed queue is answered
503 "shutting down" (with Retry-After), so the app sends the event again to the next run.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import wait_until

NOW = 1_700_000_000


def event(i: int) -> dict:
    return {"event_name": "signed-up", "created_at": NOW + i, "user_id": f"u{i}"}


def spooled_user_ids(svc) -> list[str]:
    path = Path(svc.config.storage.state_dir) / "spool.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line)["body"]["user_id"] for line in path.read_bytes().splitlines()]


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), 5)
    return int(status_line.split()[1]), headers, body


async def test_a_body_still_arriving_when_the_stop_begins_is_answered_503_not_202(
        make_service, fake_intercom):
    """Steps: an app sends the headers of POST /events (with Expect: 100-continue, as curl
    does, so the 100 says the handler is already waiting for the body) and part of the
    body; the daemon begins to stop; the app sends the rest.
    Expect: never a 202: either 503 with Retry-After saying the forwarder is shutting
    down, or (main's stop closes the listeners in its first step, and aiohttp then drops a
    connection whose body is still arriving) the connection closed with no answer, which
    a client retries just the same; the event is neither forwarded nor spooled, so the
    app's resend to the next run is the only copy."""
    svc = await make_service(shutdown={"drain_seconds": 0})
    body = orjson.dumps(event(1))
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.listener.port)
    try:
        writer.write(b"POST /events HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body[:10])
        await writer.drain()

        stopping = asyncio.create_task(svc.stop())
        await wait_until(lambda: not svc.accepting)
        writer.write(body[10:])
        await writer.drain()
        try:
            answered = await read_answer(reader)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            answered = None  # dropped unanswered: the client resends, as after a 503
        await asyncio.wait_for(stopping, 10)
    finally:
        writer.close()
    if answered is not None:
        status, headers, answer = answered
        assert status == 503
        assert headers["Retry-After"] == "1"
        assert orjson.loads(answer)["errors"][0]["message"] == "the forwarder is shutting down"
    assert fake_intercom.delivered == []
    assert spooled_user_ids(svc) == []


async def test_a_closed_queue_answers_503_shutting_down_and_a_resend_is_no_duplicate(
        make_service, fake_intercom):
    """Steps: the stop has closed the queue (what it does before taking every event for
    the spool) while the listeners still answer; post one event twice, then a batch of two.
    Expect: every answer 503 with Retry-After saying the forwarder is shutting down, not
    that the queue is full (no queue_full counted, so no full-queue alert fires on a
    deploy); the second post is refused like the first, not taken for a duplicate of an
    event that was never queued; the batch lists both events in not_taken; nothing is
    forwarded."""
    svc = await make_service()
    svc.queue.close()
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(svc.url + "/events", data=orjson.dumps(event(1))) as r:
                assert (r.status, r.headers["Retry-After"]) == (503, "1")
                answer = await r.json()
                assert answer["errors"][0]["message"] == "the forwarder is shutting down"
        batch = orjson.dumps([event(2), event(3)])
        async with s.post(svc.url + "/events/batch", data=batch) as r:
            assert (r.status, r.headers["Retry-After"]) == (503, "1")
            answer = await r.json()
    assert answer["accepted"] == 0 and answer["duplicates"] == 0
    assert answer["not_taken"] == [0, 1]
    assert answer["errors"][0]["message"].startswith("the forwarder is shutting down; 2 events")
    sample = svc.metrics.registry.get_sample_value
    assert sample("intercom_forwarder_events_received_total", {"outcome": "queue_full"}) == 0
    assert sample("intercom_forwarder_events_received_total", {"outcome": "duplicate"}) == 0
    assert fake_intercom.delivered == []
