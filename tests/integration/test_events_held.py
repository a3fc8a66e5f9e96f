"""intercom_forwarder_events_held counts every accepted event not yet settled (issue 12
C12): queue_depth and retry_waiting miss the events workers hold at the rate gate, on the
wire, and the auth probe's event, so they understate what a stop must drain or spool."""

from __future__ import annotations

from forwarder.fake_intercom import FakeIntercom, Fault
from tests.conftest import TOKEN
from tests.integration.test_metrics import event, forwarded, post, scrape, scrape_until

SLOW_S = 2.5  # real seconds the fake holds each of the first answers: scrapes come first


async def test_events_held_counts_events_on_the_wire_until_each_is_delivered(
        make_service, fake_intercom, clock):
    """Steps: 2 workers; Intercom answers the first two requests after SLOW_S; 5 events
    arrive. Expect: while two are on the wire, events_held 5 (queue_depth only 3); at every
    scrape until all are delivered, events_held == 5 - delivered; then 0."""
    fake_intercom.script(Fault.slow(SLOW_S), Fault.slow(SLOW_S))
    svc = await make_service(clock=clock, workers={"concurrency": 2},
                             intercom={"timeout_seconds": 10.0})
    for i in range(5):
        assert await post(svc, event(i)) == 202
    await fake_intercom.wait_for_requests(2)
    m = await scrape(svc)
    assert (m("events_held"), m("queue_depth"), forwarded(m, "delivered")) == (5, 3, 0)

    def settled(m) -> bool:
        assert m("events_held") == 5 - forwarded(m, "delivered")
        return forwarded(m, "delivered") == 5

    m = await scrape_until(svc, settled, timeout=SLOW_S + 10)
    assert (m("events_held"), forwarded(m, "delivered")) == (0, 5)


async def test_events_held_counts_events_workers_hold_at_the_rate_gate(make_service, clock):
    """Steps: Intercom's window allows 1 call; 4 events arrive with 2 workers: one is
    delivered, two wait in workers at the gate for the reset, one in the queue.
    Expect: events_held 3 (queue_depth 1). The next window has room for all: 0."""
    fake = FakeIntercom(token=TOKEN, budget=1, window_seconds=10, clock=clock)
    await fake.start()
    try:
        svc = await make_service(clock=clock, upstream_url=fake.url, workers={"concurrency": 2})
        for i in range(4):
            assert await post(svc, event(i)) == 202
        await fake.wait_for_delivered(1)
        m = await scrape_until(svc, lambda m: m("queue_depth") == 1)
        assert (m("events_held"), m("queue_depth"), m("retry_waiting")) == (3, 1, 0)
        await clock.wait_for_sleepers(2)  # the stats line and the gate's hold
        fake.budget = None
        clock.advance(10)
        m = await scrape_until(svc, lambda m: forwarded(m, "delivered") == 4)
        assert (m("events_held"), forwarded(m, "delivered")) == (0, 4)
    finally:
        await fake.stop()


async def test_events_held_counts_the_event_the_auth_probe_keeps(
        make_service, fake_intercom, clock):
    """Steps: Intercom refuses the token; 3 events arrive. Expect: events_held 3 while
    paused (queue_depth 2: the probe keeps one); the token is fixed, the probe runs: 0."""
    fake_intercom.token = "revoked"
    svc = await make_service(clock=clock)
    assert await post(svc, event(0)) == 202
    await scrape_until(svc, lambda m: m("paused") == 1)
    for i in range(1, 3):
        assert await post(svc, event(i)) == 202
    m = await scrape_until(svc, lambda m: m("queue_depth") == 2)
    assert (m("events_held"), m("queue_depth")) == (3, 2)
    fake_intercom.token = TOKEN
    await clock.wait_for_sleepers(2)  # the stats line and the probe
    clock.advance(30)
    m = await scrape_until(svc, lambda m: forwarded(m, "delivered") == 3)
    assert (m("events_held"), forwarded(m, "delivered")) == (0, 3)
