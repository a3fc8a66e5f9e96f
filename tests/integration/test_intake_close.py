"""The intake while the daemon stops: nothing is answered 202 that the stop cannot keep.

Issue 12 A1: a request whose body is still arriving when the stop begins was answered 202
after the stop had taken the queue for the spool, so its event was neither forwarded nor
spooled. Now the intake checks again once the body is in, and a closed queue is answered
503 "shutting down" (with Retry-After), so the app sends the event again to the next run.
Every event so refused counts in events_received{outcome="shutting_down"}, so an operator
sees what a deploy refused.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest

from forwarder.fake_intercom import Fault
from tests.conftest import wait_until

NOW = 1_700_000_000


def event(i: int) -> dict:
    return {"event_name": "signed-up", "created_at": NOW + i, "user_id": f"u{i}"}


def spooled_user_ids(svc) -> list[str]:
    path = Path(svc.config.storage.state_dir) / "spool.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line)["body"]["user_id"] for line in path.read_bytes().splitlines()]


def received(svc, outcome: str) -> float | None:
    # The registry, not GET /metrics: the stop has closed the listeners by the time it is read.
    return svc.metrics.registry.get_sample_value("intercom_forwarder_events_received_total",
                                                 {"outcome": outcome})


def request_head(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n").encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), 5)
    return int(status_line.split()[1]), headers, body


async def send_across_the_stop(svc, path: str, body: bytes,
                               content_type: str = "application/json") -> tuple[
                                   int, dict[str, str], bytes]:
    """POST with Expect: 100-continue (as curl does, so the 100 says the handler is already
    waiting for the body) and part of the body; begin the stop; send the rest. Returns the
    answer once the stop is over."""
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.listener.port)
    try:
        writer.write(request_head(path, body, content_type) + b"Expect: 100-continue\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body[:10])
        await writer.drain()

        stopping = asyncio.create_task(svc.stop())
        await wait_until(lambda: not svc.accepting)
        writer.write(body[10:])
        await writer.drain()
        answer = await read_answer(reader)
        await asyncio.wait_for(stopping, 10)
    finally:
        writer.close()
    return answer


async def test_a_body_still_arriving_when_the_stop_begins_is_answered_503_not_202(
        make_service, fake_intercom):
    """Steps: an app sends the headers of POST /events (with Expect: 100-continue, as curl
    does, so the 100 says the handler is already waiting for the body) and part of the
    body; the daemon begins to stop; the app sends the rest.
    Expect: 503 with Retry-After saying the forwarder is shutting down; the event is
    neither forwarded nor spooled, so the app's resend to the next run is the only copy."""
    svc = await make_service(shutdown={"drain_seconds": 0})
    status, headers, answer = await send_across_the_stop(svc, "/events", orjson.dumps(event(1)))
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


async def test_events_a_closed_queue_refuses_count_as_shutting_down_not_queue_full(
        make_service, fake_intercom):
    """Steps: one event accepted; the stop closes the queue; post a new event, then a batch
    of that first event again and two new ones.
    Expect: shutting_down counts the 3 events refused (the single and the batch's 2 in
    not_taken), the batch's duplicate still counts as duplicate, queue_full stays 0."""
    svc = await make_service()
    async with aiohttp.ClientSession() as s:
        async with s.post(svc.url + "/events", data=orjson.dumps(event(1))) as r:
            assert r.status == 202
        svc.queue.close()
        async with s.post(svc.url + "/events", data=orjson.dumps(event(2))) as r:
            assert r.status == 503
        batch = orjson.dumps([event(1), event(3), event(4)])
        async with s.post(svc.url + "/events/batch", data=batch) as r:
            assert r.status == 503
            answer = await r.json()
    assert (answer["duplicates"], answer["not_taken"]) == (1, [1, 2])
    assert received(svc, "shutting_down") == 3
    assert (received(svc, "accepted"), received(svc, "duplicate")) == (1, 1)
    assert received(svc, "queue_full") == 0


NDJSON_BATCH = b"\n".join(orjson.dumps(event(i)) for i in range(2)) + b"\n"


@pytest.mark.parametrize(("path", "body", "content_type", "events"), [
    ("/events", orjson.dumps(event(1)), "application/json", 1),
    ("/events/batch", orjson.dumps([event(i) for i in range(3)]), "application/json", 3),
    ("/events/batch", NDJSON_BATCH, "application/x-ndjson", 2),
    ("/events/batch", b'{"not": "an array of events"}', "application/json", 1),
], ids=["single", "json_batch", "ndjson_batch", "body_not_an_array"])
async def test_a_body_read_after_the_stop_began_counts_its_events_as_shutting_down(
        make_service, fake_intercom, path, body, content_type, events):
    """Steps: the body is still arriving when the stop begins (see above).
    Expect: 503, and shutting_down counts the events the body held: 1 for a single, each
    item of a batch, once for a batch body that is not an array (as rejected would)."""
    svc = await make_service(shutdown={"drain_seconds": 0})
    status, _, _ = await send_across_the_stop(svc, path, body, content_type)
    assert status == 503
    assert received(svc, "shutting_down") == events
    assert received(svc, "rejected") == 0


@pytest.mark.parametrize(("path", "body"), [
    ("/events", orjson.dumps(event(1))),
    ("/events/batch", orjson.dumps([event(i) for i in range(3)])),
], ids=["single", "batch"])
async def test_a_request_refused_before_its_body_is_read_counts_once_as_shutting_down(
        make_service, fake_intercom, path, body):
    """Steps: an event is accepted on a keep-alive connection; Intercom takes 5 s to
    answer its send, so the drain is still running when the app sends a second request on
    that connection after the stop began.
    Expect: 503 before the body is read, counted once as shutting_down, a batch too: how
    many events it held is unknown without reading it (docs/metrics.md)."""
    fake_intercom.script(Fault.slow(5))
    svc = await make_service(shutdown={"drain_seconds": 10})
    first = orjson.dumps(event(0))
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.listener.port)
    try:
        writer.write(request_head("/events", first) + b"\r\n" + first)
        await writer.drain()
        assert (await read_answer(reader))[0] == 202
        await fake_intercom.wait_for_requests(1)

        stopping = asyncio.create_task(svc.stop())
        await wait_until(lambda: not svc.accepting)
        writer.write(request_head(path, body) + b"\r\n" + body)
        await writer.drain()
        status, headers, _ = await read_answer(reader)
        svc.request_stop(force=True)  # skip the rest of the drain (the slow send)
        await asyncio.wait_for(stopping, 10)
    finally:
        writer.close()
    assert (status, headers["Retry-After"]) == (503, "1")
    assert received(svc, "shutting_down") == 1


async def test_a_commit_after_the_disk_queue_stopped_counts_as_shutting_down(
        make_service, fake_intercom):
    """Disk mode: with a fleet's dedup, a request awaits Redis (up to 50 ms) and the stop
    can reach the queue's own stop meanwhile; the commit the answer waits for then fails
    with "stopped". That is the stop refusing the event, not a full or failing disk.
    Steps: one event accepted and delivered; the disk queue stops (what such a request
    finds after its await); post that event again, then a batch of it and a new one.
    Expect: both answers 503; shutting_down counts the single and the batch's new event,
    the batch's duplicate counts as duplicate, queue_full stays 0 (no full-queue alert)."""
    svc = await make_service(queue={"type": "disk"})
    async with aiohttp.ClientSession() as s:
        async with s.post(svc.url + "/events", data=orjson.dumps(event(1))) as r:
            assert r.status == 202
        await fake_intercom.wait_for_delivered(1)
        await svc.queue.stop()
        async with s.post(svc.url + "/events", data=orjson.dumps(event(1))) as r:
            assert r.status == 503
        batch = orjson.dumps([event(1), event(2)])
        async with s.post(svc.url + "/events/batch", data=batch) as r:
            assert r.status == 503
            answer = await r.json()
    assert (answer["duplicates"], answer["not_taken"]) == (1, [1])
    assert received(svc, "shutting_down") == 2
    assert (received(svc, "accepted"), received(svc, "duplicate")) == (1, 1)
    assert received(svc, "queue_full") == 0
