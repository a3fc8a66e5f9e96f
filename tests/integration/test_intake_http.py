"""The intake over real HTTP, on 127.0.0.1 and on the Unix socket: what an app sees."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from tests.conftest import wait_until

NOW = 1_700_000_000

EVENT = {"event_name": "Placed.Order", "created_at": NOW, "user_id": 314159,
         "metadata": {"order_date": NOW, "price": {"amount": 2999, "currency": "usd"}}}


class Client:
    """Posts to the daemon over TCP or its Unix socket, like an app would."""

    def __init__(self, svc, transport: str):
        self.svc = svc
        self.transport = transport

    def _session(self) -> aiohttp.ClientSession:
        if self.transport == "unix":
            return aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.svc.config.intake.unix_socket))
        return aiohttp.ClientSession()

    def _url(self, path: str) -> str:
        return ("http://localhost" if self.transport == "unix" else self.svc.url) + path

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        async with self._session() as s, s.request(method, self._url(path), data=body,
                                                   headers=headers) as r:
            return r.status, dict(r.headers), await r.read()

    async def post(self, path: str, obj=None, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        body = raw if raw is not None else orjson.dumps(obj)
        return await self.request("POST", path, body,
                                  {"Content-Type": "application/json", **(headers or {})})


@pytest.fixture(params=["tcp", "unix"])
async def client(request, make_service):
    svc = await make_service()
    return Client(svc, request.param)


async def test_valid_event_is_answered_202_with_an_empty_body_like_intercom(client, fake_intercom):
    status, _, body = await client.post("/events", EVENT,
                                        headers={"Authorization": "Bearer app-token-ignored"})
    assert (status, body) == (202, b"")
    await fake_intercom.wait_for_delivered(1)
    sent = fake_intercom.delivered[0]
    assert sent == {"event_name": "placed-order", "created_at": NOW, "user_id": "314159",
                    "metadata": {"order_date": NOW,
                                 "price": {"amount": 2999, "currency": "usd"}}}


@pytest.mark.parametrize("obj, field", [
    pytest.param({"created_at": NOW, "user_id": "1"}, "event_name", id="missing_event_name"),
    pytest.param({**EVENT, "created_at": "yesterday"}, "created_at", id="string_created_at"),
    pytest.param({**EVENT, "created_at": NOW * 1000}, "created_at", id="milliseconds"),
    pytest.param({"event_name": "x", "created_at": NOW}, "user_id", id="no_identity"),
    pytest.param({**EVENT, "metadata": {"tags": ["a"]}}, "metadata.tags", id="array_metadata"),
])
async def test_invalid_event_gets_400_in_intercoms_error_shape_naming_the_field(client, obj,
                                                                                 field):
    status, headers, body = await client.post("/events", obj)
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    answer = orjson.loads(body)
    assert answer["type"] == "error.list"
    assert field in [e["field"] for e in answer["errors"]]
    assert all(e["code"] in ("parameter_invalid", "parameter_not_found") and e["message"]
               for e in answer["errors"])


@pytest.mark.parametrize("raw", [
    pytest.param(b"{not json", id="malformed_json"),
    pytest.param(b'{"event_name": "\xff\xfe"}', id="invalid_utf8"),
    pytest.param(orjson.dumps([EVENT]), id="array_to_single_route"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="pathological_nesting"),
    pytest.param(b"", id="empty_body"),
])
async def test_bad_input_is_a_400_and_the_daemon_keeps_serving(client, raw):
    status, _, body = await client.post("/events", raw=raw)
    assert status == 400
    assert orjson.loads(body)["errors"][0]["field"] == "body"
    status, _, _ = await client.post("/events", EVENT)
    assert status == 202


async def test_body_over_max_body_bytes_is_a_413(make_service):
    svc = await make_service(intake={"max_body_bytes": 1024})
    client = Client(svc, "tcp")
    big = {**EVENT, "metadata": {"note": "x" * 2000}}
    status, _, body = await client.post("/events", big)
    assert status == 413
    assert orjson.loads(body)["type"] == "error.list"


async def test_chunked_body_over_max_body_bytes_is_a_413(make_service):
    """No Content-Length to refuse up front: the limit must hold while the body is read."""
    svc = await make_service(intake={"max_body_bytes": 1024})
    big = orjson.dumps({**EVENT, "metadata": {"note": "x" * 4000}})

    async def chunks():
        for i in range(0, len(big), 512):
            yield big[i:i + 512]

    async with aiohttp.ClientSession() as s, s.post(svc.url + "/events", data=chunks()) as r:
        assert r.status == 413
        assert (await r.json())["errors"][0]["field"] == "body"


async def test_unknown_path_is_404_and_wrong_method_is_405_naming_the_allowed(client):
    status, _, body = await client.post("/event", EVENT)
    assert status == 404
    assert orjson.loads(body)["errors"][0]["code"] == "not_found"
    status, headers, body = await client.request("DELETE", "/events/batch")
    assert status == 405
    assert headers["Allow"] == "POST"
    assert orjson.loads(body)["type"] == "error.list"
    status, headers, _ = await client.request("PUT", "/healthz")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")


async def test_a_query_string_or_escaped_path_reaches_the_same_route(client, fake_intercom):
    # Routing looks up the raw request target first; these are the cases where the raw
    # target differs from the path and the decoded path must decide.
    status, _, _ = await client.post("/events?source=app", EVENT)
    assert status == 202
    status, _, _ = await client.post("/%65vents", {**EVENT, "event_name": "other"})
    assert status == 202
    await fake_intercom.wait_for_delivered(2)


async def test_head_is_served_by_the_get_route_without_a_body(client):
    status, headers, body = await client.request("HEAD", "/healthz")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) > 0


async def test_expect_100_continue_is_answered_before_the_body_is_sent(make_service):
    """curl sends Expect: 100-continue for bodies over 1 KiB and waits for the 100."""
    svc = await make_service()
    body = orjson.dumps([{**EVENT, "user_id": f"u{i}"} for i in range(20)])
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.listener.port)
    try:
        writer.write(b"POST /events/batch HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 202")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        answer = orjson.loads(await asyncio.wait_for(reader.readexactly(length), 5))
        assert answer["accepted"] == 20
    finally:
        writer.close()
        await writer.wait_closed()


async def test_unknown_expectation_is_a_417(make_service):
    svc = await make_service()
    async with aiohttp.ClientSession() as s, s.post(
            svc.url + "/events", data=orjson.dumps(EVENT),
            headers={"Expect": "something-else", "Content-Type": "application/json"}) as r:
        assert r.status == 417
        assert (await r.json())["errors"][0]["field"] == "Expect"


async def test_batch_judges_each_event_alone(client, fake_intercom):
    batch = [
        {**EVENT, "created_at": NOW + 1},
        {"event_name": "", "user_id": "1"},
        {**EVENT, "created_at": NOW + 1},  # same composite key as the first
        {**EVENT, "created_at": NOW + 2,
         "metadata": {f"k{i}": i for i in range(12)}},
    ]
    status, _, body = await client.post("/events/batch", batch)
    assert status == 202
    answer = orjson.loads(body)
    assert answer["accepted"] == 2
    assert answer["duplicates"] == 1
    assert [r["index"] for r in answer["rejected"]] == [1]
    assert answer["rejected"][0]["errors"][0]["field"] == "event_name"
    assert answer["truncated"] == [{"index": 3, "dropped_metadata_keys": ["k10", "k11"]}]
    await fake_intercom.wait_for_delivered(2)
    assert sorted(len(e.get("metadata", {})) for e in fake_intercom.delivered) == [2, 10]


async def test_batch_accepts_ndjson(client, fake_intercom):
    lines = b"\n".join(orjson.dumps({**EVENT, "created_at": NOW + i}) for i in range(3))
    status, _, body = await client.post("/events/batch", raw=lines + b"\n\n{oops\n",
                                        headers={"Content-Type": "application/x-ndjson"})
    assert status == 202
    answer = orjson.loads(body)
    assert answer["accepted"] == 3
    assert answer["rejected"][0]["index"] == 3
    await fake_intercom.wait_for_delivered(3)


async def test_batch_that_is_not_an_array_is_a_400(client):
    status, _, body = await client.post("/events/batch", EVENT)
    assert status == 400
    assert orjson.loads(body)["errors"][0]["field"] == "body"


async def test_duplicate_across_single_and_batch_is_202_and_forwarded_once(client,
                                                                           fake_intercom):
    assert (await client.post("/events", EVENT))[0] == 202
    dup = {**EVENT, "event_name": "placed-ORDER", "metadata": {"other": 1}}
    status, _, body = await client.post("/events/batch", [dup])
    assert status == 202
    assert orjson.loads(body)["duplicates"] == 1
    assert (await client.post("/events", dup))[0] == 202
    await fake_intercom.wait_for_delivered(1)
    status, _, metrics = await client.request("GET", "/metrics")
    assert b'intercom_forwarder_events_received_total{outcome="duplicate"} 2.0' in metrics
    assert len(fake_intercom.requests) == 1


async def test_unknown_top_level_fields_are_dropped_and_logged_once(client, fake_intercom,
                                                                    captured_logs):
    for i in range(3):
        status, _, _ = await client.post("/events", {**EVENT, "created_at": NOW + i,
                                                      "colour": "red"})
        assert status == 202
    await fake_intercom.wait_for_delivered(3)
    assert all("colour" not in e for e in fake_intercom.delivered)
    dropped = [e for e in captured_logs if e["event"] == "intake.unknown_field_dropped"]
    assert [e["field"] for e in dropped] == ["colour"]


async def test_health_readiness_and_metrics_routes(client):
    status, _, body = await client.request("GET", "/healthz")
    assert status == 200
    status, _, body = await client.request("GET", "/readyz")
    assert (status, orjson.loads(body)) == (200, {"ready": True})
    await client.post("/events", EVENT)
    await client.post("/events", {"event_name": "x"})
    status, headers, body = await client.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b'intercom_forwarder_events_received_total{outcome="accepted"} 1.0' in body
    assert b'intercom_forwarder_events_received_total{outcome="rejected"} 1.0' in body


async def test_full_queue_answers_503_with_retry_after_and_loses_nothing(make_service,
                                                                         fake_intercom, clock):
    """Steps: upstream refuses the token, so forwarding pauses and the queue fills; post
    singles and a batch past the bound; fix the token and let the 30 s probe run.
    Expect: 503 + Retry-After + error.list, the batch answer names the events not taken,
    and after the fix exactly the accepted events arrive."""
    fake_intercom.token = "rotated"  # the daemon's token is refused: nothing leaves the queue
    svc = await make_service(clock=clock, queue={"max_events": 3}, workers={"concurrency": 1})
    client = Client(svc, "tcp")
    assert (await client.post("/events", {**EVENT, "created_at": NOW}))[0] == 202
    await wait_until(lambda: svc.workers.paused)  # the worker holds that one for the probe
    statuses = [(await client.post("/events", {**EVENT, "created_at": NOW + i}))[0]
                for i in range(1, 4)]
    assert statuses == [202, 202, 202]
    batch = [{**EVENT, "created_at": NOW + 100 + i} for i in range(2)]
    status, headers, body = await client.post("/events/batch", batch)
    assert status == 503
    assert headers["Retry-After"] == "1"
    answer = orjson.loads(body)
    assert answer["type"] == "error.list"
    assert answer["accepted"] == 0 and answer["not_taken"] == [0, 1]
    single = await client.post("/events", {**EVENT, "created_at": NOW + 200})
    assert single[0] == 503 and single[1]["Retry-After"] == "1"
    assert orjson.loads(single[2])["errors"][0]["code"] == "service_unavailable"

    fake_intercom.token = "test-token"
    await clock.wait_for_sleepers()
    clock.advance(30)
    await fake_intercom.wait_for_delivered(4)
    assert sorted(e["created_at"] for e in fake_intercom.delivered) == [NOW + i for i in range(4)]
