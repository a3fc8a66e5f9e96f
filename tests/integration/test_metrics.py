"""Every intercom_forwarder_* metric moves when the thing it counts happens.

Each test scrapes GET /metrics over HTTP and parses the text exposition, as Prometheus
would, so what is asserted is what a dashboard sees. Faults come from the fake Intercom;
time is a FakeClock (backoffs, rate-limit holds and auth probes run when a test advances
it). Workers update counters after the fake has answered, so assertions on them wait
(bounded) for the scrape to show the value instead of reading it once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from forwarder.fake_intercom import FakeIntercom, Fault
from forwarder.fleet_metrics import FleetMetrics
from tests.conftest import TOKEN

NOW = 1_700_000_000
PREFIX = "intercom_forwarder_"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def event(i: int = 0, user: str = "u1", **extra: object) -> dict:
    return {"event_name": "invited-friend", "created_at": NOW + i, "user_id": user, **extra}


async def post(svc, obj, path: str = "/events", *, raw: bytes | None = None) -> int:
    data = raw if raw is not None else orjson.dumps(obj)
    async with aiohttp.ClientSession() as s, s.post(svc.url + path, data=data) as r:
        return r.status


class Scrape:
    """One parsed GET /metrics: samples by (name, labels); families by name."""

    def __init__(self, text: str):
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.families: dict[str, str] = {}  # name -> type
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a labelled child that has not been touched yet."""
        return self.samples.get((PREFIX + name, frozenset(labels.items())), 0.0)


async def scrape(svc) -> Scrape:
    async with aiohttp.ClientSession() as s, s.get(svc.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")  # Prometheus text
        return Scrape(await r.text())


async def scrape_until(svc, done: Callable[[Scrape], bool], timeout: float = 5.0) -> Scrape:
    """Scrape until done(scrape) holds (bounded); the last scrape is returned either way
    so that the caller's assert shows the values."""
    last = await scrape(svc)

    async def _poll() -> None:
        nonlocal last
        while not done(last):
            await asyncio.sleep(0.005)
            last = await scrape(svc)

    try:
        await asyncio.wait_for(_poll(), timeout)
    except TimeoutError:
        pass
    return last


def forwarded(m: Scrape, result: str, reason: str = "") -> float:
    return m("events_forwarded_total", result=result, reason=reason)


# -- intake ---------------------------------------------------------------------------


async def test_an_accepted_event_counts_as_accepted(make_service, clock):
    svc = await make_service(clock=clock)
    assert (await scrape(svc))("events_received_total", outcome="accepted") == 0
    assert await post(svc, event()) == 202
    assert (await scrape(svc))("events_received_total", outcome="accepted") == 1


async def test_a_resent_event_counts_as_duplicate_not_accepted(make_service, clock):
    svc = await make_service(clock=clock)
    assert await post(svc, event()) == 202
    assert await post(svc, event()) == 202
    m = await scrape(svc)
    assert m("events_received_total", outcome="accepted") == 1
    assert m("events_received_total", outcome="duplicate") == 1


async def test_every_refused_event_counts_as_rejected(make_service, clock):
    """Steps: an invalid event (400), a body that is not JSON (400), a batch with one bad
    item out of two, a body over intake.max_body_bytes (413). Expect: rejected 4."""
    svc = await make_service(clock=clock, intake={"max_body_bytes": 4096})
    assert await post(svc, {"event_name": "x", "created_at": "yesterday", "user_id": "1"}) == 400
    assert await post(svc, None, raw=b"{not json") == 400
    assert await post(svc, [event(1), {"event_name": ""}], "/events/batch") == 202
    assert await post(svc, None, raw=b'{"event_name":"' + b"x" * 5000 + b'"}') == 413
    m = await scrape(svc)
    assert m("events_received_total", outcome="rejected") == 4
    assert m("events_received_total", outcome="accepted") == 1


async def test_an_event_refused_with_503_counts_as_queue_full(make_service, fake_intercom, clock):
    fake_intercom.script(500)  # the first event waits for its retry, filling the queue
    svc = await make_service(clock=clock, queue={"max_events": 1})
    assert await post(svc, event(0)) == 202
    await scrape_until(svc, lambda m: m("retry_waiting") == 1)
    assert await post(svc, event(1)) == 503
    assert await post(svc, [event(2), event(3)], "/events/batch") == 503
    m = await scrape(svc)
    assert m("events_received_total", outcome="queue_full") == 3
    assert m("events_received_total", outcome="accepted") == 1


async def test_metadata_keys_beyond_ten_are_counted_as_dropped(make_service, clock):
    svc = await make_service(clock=clock)
    metadata = {f"k{i}": i for i in range(13)}
    assert await post(svc, event(metadata=metadata)) == 202
    assert (await scrape(svc))("metadata_keys_dropped_total") == 3


async def test_dropped_keys_and_fields_count_on_every_submission_duplicates_too(
        make_service, clock):
    """docs/metrics.md: counted on each submission, duplicates and 503'd ones included
    (the app sent them each time). Steps: one event with 12 metadata keys and an unknown
    field, sent alone, again (a duplicate), then in a batch with a fresh copy."""
    svc = await make_service(clock=clock)
    metadata = {f"k{i}": i for i in range(12)}
    assert await post(svc, event(0, metadata=metadata, colour="red")) == 202
    assert await post(svc, event(0, metadata=metadata, colour="red")) == 202
    assert await post(svc, [event(0, metadata=metadata, colour="red"),
                            event(1, metadata=metadata, colour="red")], "/events/batch") == 202
    m = await scrape(svc)
    assert m("events_received_total", outcome="duplicate") == 2
    assert m("metadata_keys_dropped_total") == 8
    assert m("unknown_fields_dropped_total") == 4


async def test_unknown_top_level_fields_are_counted_as_dropped(make_service, clock):
    svc = await make_service(clock=clock)
    assert await post(svc, event(0, colour="red", size=3)) == 202
    assert await post(svc, event(1, colour="blue")) == 202
    assert (await scrape(svc))("unknown_fields_dropped_total") == 3


async def test_reads_through_the_proxy_count_by_the_status_the_app_got(make_service, clock):
    """Steps: a listing Intercom answers 200, one Intercom refuses (the token no longer
    works: 401), and a query the daemon refuses itself (400). Expect: proxy_reads_total
    200, 401 and 400 once each; no write metric moves (reads are not events)."""
    fake = FakeIntercom(token=TOKEN)
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url)
        async with aiohttp.ClientSession() as s:
            async with s.get(svc.url + "/events?type=user&user_id=u1") as r:
                assert r.status == 200
            fake.token = "rotated"
            async with s.get(svc.url + "/events?type=user&user_id=u1") as r:
                assert r.status == 401
            async with s.get(svc.url + "/events?type=lead&user_id=u1") as r:
                assert r.status == 400
    finally:
        await fake.stop()
    m = await scrape(svc)
    assert [m("proxy_reads_total", status=code) for code in ("200", "401", "400")] == [1, 1, 1]
    assert m("events_received_total", outcome="accepted") == 0
    assert m("upstream_requests_total", status="200") == 0


# -- forwarding -----------------------------------------------------------------------


async def test_a_delivered_event_counts_as_delivered_and_as_a_202_request(
        make_service, fake_intercom, clock):
    svc = await make_service(clock=clock)
    assert forwarded(await scrape(svc), "delivered") == 0
    assert await post(svc, event()) == 202
    m = await scrape_until(svc, lambda m: forwarded(m, "delivered") == 1)
    assert forwarded(m, "delivered") == 1
    assert m("upstream_requests_total", status="202") == 1
    assert fake_intercom.delivered == [event()]


async def test_a_500_counts_as_retried_and_waits_in_retry_waiting_until_due(
        make_service, fake_intercom, clock):
    """Steps: Intercom answers 500, then 202; the backoff passes.
    Expect: retried{server_error} 1 and retry_waiting 1; then retry_waiting 0, delivered 1,
    and one request counted under each status."""
    fake_intercom.script(500)
    svc = await make_service(clock=clock)
    assert await post(svc, event()) == 202
    m = await scrape_until(svc, lambda m: m("retry_waiting") == 1)
    assert m("retry_waiting") == 1
    assert forwarded(m, "retried", "server_error") == 1
    assert m("upstream_requests_total", status="500") == 1
    clock.advance(1.0)  # past the first full-jitter backoff (below base_delay 0.5 s)
    m = await scrape_until(svc, lambda m: forwarded(m, "delivered") == 1)
    assert m("retry_waiting") == 0
    assert forwarded(m, "delivered") == 1
    assert m("upstream_requests_total", status="202") == 1


async def test_a_dropped_connection_counts_as_an_error_request_and_a_retry(
        make_service, fake_intercom, clock):
    fake_intercom.script(Fault.drop)
    svc = await make_service(clock=clock)
    assert await post(svc, event()) == 202
    m = await scrape_until(svc, lambda m: forwarded(m, "retried", "connection_error") == 1)
    assert forwarded(m, "retried", "connection_error") == 1
    assert m("upstream_requests_total", status="error") == 1


async def test_a_404_counts_as_dead_lettered_contact_not_found(make_service, clock):
    fake = FakeIntercom(token=TOKEN, unknown_contacts=["ghost"])
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url)
        assert await post(svc, event(user="ghost")) == 202
        m = await scrape_until(
            svc, lambda m: forwarded(m, "dead_lettered", "contact_not_found") == 1)
        assert forwarded(m, "dead_lettered", "contact_not_found") == 1
        assert m("upstream_requests_total", status="404") == 1
        assert forwarded(m, "retried", "contact_not_found") == 0
    finally:
        await fake.stop()


async def test_a_400_counts_as_dead_lettered_rejected(make_service, fake_intercom, clock):
    fake_intercom.script(400)
    svc = await make_service(clock=clock)
    assert await post(svc, event()) == 202
    m = await scrape_until(svc, lambda m: forwarded(m, "dead_lettered", "rejected") == 1)
    assert forwarded(m, "dead_lettered", "rejected") == 1
    assert m("upstream_requests_total", status="400") == 1


async def test_the_last_failed_attempt_counts_as_dead_lettered_retries_exhausted(
        make_service, fake_intercom, clock):
    fake_intercom.script(503, 503)
    svc = await make_service(clock=clock, retry={"max_attempts": 2})
    assert await post(svc, event()) == 202
    await scrape_until(svc, lambda m: m("retry_waiting") == 1)
    clock.advance(1.0)
    m = await scrape_until(
        svc, lambda m: forwarded(m, "dead_lettered", "retries_exhausted") == 1)
    assert forwarded(m, "dead_lettered", "retries_exhausted") == 1
    assert forwarded(m, "retried", "server_error") == 1  # the last failure is not a retry
    assert m("upstream_requests_total", status="503") == 2
    assert m("retry_waiting") == 0


async def test_upstream_latency_is_observed_for_every_request(make_service, fake_intercom):
    """Real clock here (a FakeClock would measure 0 s): each answer is one observation
    with a positive duration."""
    svc = await make_service()
    before = await scrape(svc)
    assert before("upstream_latency_seconds_count") == 0
    for i in range(2):
        assert await post(svc, event(i)) == 202
    m = await scrape_until(svc, lambda m: m("upstream_latency_seconds_count") == 2)
    assert m("upstream_latency_seconds_count") == 2
    assert m("upstream_latency_seconds_bucket", le="+Inf") == 2
    assert 0 < m("upstream_latency_seconds_sum") < 2 * svc.config.intercom.timeout_seconds


# -- rate limit -----------------------------------------------------------------------


async def test_time_held_by_remaining_zero_counts_as_rate_limit_wait(make_service, clock):
    """Steps: Intercom's window allows 3 calls (10 s windows); 5 events arrive; the clock
    passes the window's reset. Expect: 3 delivered and no wait counted while held; after
    the reset, all 5 delivered, no 429, and at least the 10 s held counted as waited."""
    fake = FakeIntercom(token=TOKEN, budget=3, window_seconds=10, clock=clock)
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url)
        for i in range(5):
            assert await post(svc, event(i)) == 202
        await fake.wait_for_delivered(3)
        await clock.wait_for_sleepers(2)  # the two held workers wait on the clock
        assert (await scrape(svc))("rate_limit_wait_seconds_total") == 0
        clock.advance(10)
        m = await scrape_until(svc, lambda m: forwarded(m, "delivered") == 5)
        assert forwarded(m, "delivered") == 5
        assert m("rate_limited_total") == 0
        assert m("rate_limit_wait_seconds_total") >= 10
    finally:
        await fake.stop()


async def test_a_429_counts_as_rate_limited_and_the_event_still_goes(
        make_service, fake_intercom, clock):
    fake_intercom.script(Fault.rate_limited)
    svc = await make_service(clock=clock)
    assert (await scrape(svc))("rate_limited_total") == 0
    assert await post(svc, event()) == 202
    m = await scrape_until(svc, lambda m: m("rate_limited_total") == 1)
    assert m("rate_limited_total") == 1
    assert m("upstream_requests_total", status="429") == 1
    assert forwarded(m, "retried", "rate_limited") == 0  # a 429 is not an attempt
    await clock.wait_for_sleepers(2)
    clock.advance(11)  # past X-RateLimit-Reset
    m = await scrape_until(svc, lambda m: forwarded(m, "delivered") == 1)
    assert forwarded(m, "delivered") == 1
    assert m("rate_limit_wait_seconds_total") > 0


# -- auth pause, queue depth, spool ----------------------------------------------------


async def test_paused_is_1_while_the_token_is_refused_and_0_once_a_probe_succeeds(
        make_service, fake_intercom, clock):
    fake_intercom.token = "someone-rotated-it"
    svc = await make_service(clock=clock)
    assert (await scrape(svc))("paused") == 0
    assert await post(svc, event()) == 202
    m = await scrape_until(svc, lambda m: m("paused") == 1)
    assert m("paused") == 1
    assert m("upstream_requests_total", status="401") == 1
    fake_intercom.token = TOKEN
    await clock.wait_for_sleepers(1)  # the auth probe
    clock.advance(30)
    m = await scrape_until(svc, lambda m: m("paused") == 0)
    assert m("paused") == 0
    m = await scrape_until(svc, lambda m: forwarded(m, "delivered") == 1)
    assert forwarded(m, "delivered") == 1


async def test_queue_depth_counts_events_held_while_paused_and_falls_to_0_after(
        make_service, fake_intercom, clock):
    """Steps: the token is refused; 4 events arrive. Expect: one is held by the auth probe,
    queue_depth 3. The token is fixed and the probe runs: queue_depth 0, 4 delivered."""
    fake_intercom.token = "someone-rotated-it"
    svc = await make_service(clock=clock)
    assert (await scrape(svc))("queue_depth") == 0
    assert await post(svc, event(0)) == 202
    await scrape_until(svc, lambda m: m("paused") == 1)
    for i in range(1, 4):
        assert await post(svc, event(i)) == 202
    m = await scrape_until(svc, lambda m: m("queue_depth") == 3)
    assert m("queue_depth") == 3
    assert m("retry_waiting") == 0
    fake_intercom.token = TOKEN
    await clock.wait_for_sleepers(1)
    clock.advance(30)
    m = await scrape_until(svc, lambda m: forwarded(m, "delivered") == 4)
    assert forwarded(m, "delivered") == 4
    assert m("queue_depth") == 0


async def test_spool_loaded_events_reports_what_the_next_start_reloaded(
        make_service, fake_intercom, clock):
    """Steps: the token is refused, 3 events arrive, the service stops (drain 0) and
    spools them; the token is fixed; a new service starts on the same state dir.
    Expect: the first reported 0 loaded, the second 3, and delivers all 3."""
    fake_intercom.token = "someone-rotated-it"
    first = await make_service(clock=clock, shutdown={"drain_seconds": 0})
    assert (await scrape(first))("spool_loaded_events") == 0
    for i in range(3):
        assert await post(first, event(i)) == 202
    await scrape_until(first, lambda m: m("paused") == 1)
    await first.stop()
    fake_intercom.token = TOKEN
    second = await make_service(clock=clock)
    assert second.config.storage.state_dir == first.config.storage.state_dir
    m = await scrape(second)
    assert m("spool_loaded_events") == 3
    await fake_intercom.wait_for_delivered(3)


# -- the documentation ------------------------------------------------------------------


async def test_every_exported_metric_is_documented_in_docs_metrics_md(make_service, clock):
    """The table in docs/metrics.md names exactly the families /metrics exports."""
    svc = await make_service(clock=clock)
    # The client adds a <counter>_created gauge per counter: bookkeeping, not a metric of ours.
    exported = {name for name in (await scrape(svc)).families
                if name.startswith(PREFIX) and not name.endswith("_created")}
    # The fleet's Redis series are exported only with [fleet] redis_url (fleet_metrics.py).
    assert "intercom_forwarder_fleet_share" in exported
    assert "intercom_forwarder_fleet_redis_up" not in exported
    with_redis = CollectorRegistry()
    FleetMetrics(with_redis, redis=True)
    exported |= {m.name for m in with_redis.collect() if not m.name.endswith("_created")}
    documented = set(re.findall(r"^\| `(intercom_forwarder_[a-z_]+)`", DOCS.read_text(),
                                re.MULTILINE))
    # The parser names counter families without their _total suffix.
    documented = {name.removesuffix("_total") for name in documented}
    assert exported == documented
