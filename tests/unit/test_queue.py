from __future__ import annotations

import asyncio

import pytest

from forwarder.clock import FakeClock
from forwarder.event import Event, Route
from forwarder.queue import EventQueue


def ev(n: int) -> Event:
    return Event(body=b'{"n":%d}' % n, key=n.to_bytes(16, "big"))


def names(events: list[Event]) -> list[bytes]:
    return [e.body for e in events]


async def settle(steps: int = 20) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


async def take_soon(queue: EventQueue, timeout: float = 2.0) -> Event:
    return await asyncio.wait_for(queue.take(), timeout)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- the bound ------------------------------------------------------------------------


def test_offer_refuses_once_max_events_are_held(clock):
    queue = EventQueue(2, clock)
    assert queue.offer(ev(1))
    assert queue.offer(ev(2))
    assert not queue.offer(ev(3))
    assert len(queue) == 2
    assert names(queue.take_all()) == [b'{"n":1}', b'{"n":2}']


def test_waiting_retries_count_against_the_bound(clock):
    queue = EventQueue(2, clock)
    queue.retry_later(ev(1), 10)
    assert queue.offer(ev(2))
    assert not queue.offer(ev(3))
    assert (queue.ready, queue.waiting, len(queue)) == (1, 1, 2)


def test_accepted_events_go_back_in_even_when_full(clock):
    queue = EventQueue(1, clock)
    assert queue.offer(ev(1))
    queue.retry_later(ev(2), 5)
    queue.requeue_front(ev(3))
    queue.restore([ev(4), ev(5)])
    assert len(queue) == 5
    assert not queue.offer(ev(6))


# -- order ----------------------------------------------------------------------------


async def test_a_closed_queue_refuses_offers_but_keeps_what_it_holds(clock):
    """The stop path closes the queue before take_all(): an offer after that must fail
    (the intake answers 503), while retries and requeues of accepted events still go in."""
    queue = EventQueue(10, clock)
    assert queue.offer(ev(1))
    queue.close()
    assert queue.closed
    assert not queue.offer(ev(2))
    queue.requeue_front(ev(3))
    queue.retry_later(ev(4), 5.0)
    assert names(queue.take_all()) == [b'{"n":3}', b'{"n":1}', b'{"n":4}']


async def test_take_returns_events_in_offer_order(clock):
    queue = EventQueue(10, clock)
    for n in range(3):
        queue.offer(ev(n))
    assert [(await take_soon(queue)).body for _ in range(3)] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']


async def test_a_requeued_event_is_taken_before_older_ones(clock):
    queue = EventQueue(10, clock)
    queue.offer(ev(1))
    queue.offer(ev(2))
    first = await take_soon(queue)
    queue.requeue_front(first)
    assert (await take_soon(queue)) == first
    assert (await take_soon(queue)).body == b'{"n":2}'


async def test_restored_events_are_ready_at_once_in_order(clock):
    queue = EventQueue(1, clock)
    restored = [ev(1), ev(2), ev(3)]
    restored[0].due = 12345.0
    queue.restore(restored)
    assert queue.ready == 3
    assert [await take_soon(queue) for _ in range(3)] == restored
    assert restored[0].due == 0.0


def test_take_all_returns_ready_then_retries_by_due_time_and_empties_the_queue(clock):
    queue = EventQueue(10, clock)
    queue.retry_later(ev(1), 30)
    queue.offer(ev(2))
    queue.retry_later(ev(3), 10)
    queue.requeue_front(ev(4))
    queue.retry_later(ev(5), 10)
    assert names(queue.take_all()) == [b'{"n":4}', b'{"n":2}', b'{"n":3}', b'{"n":5}', b'{"n":1}']
    assert (len(queue), queue.ready, queue.waiting) == (0, 0, 0)
    assert queue.offer(ev(6))


# -- retries ----------------------------------------------------------------------------


async def test_a_retry_is_not_taken_before_it_is_due(clock):
    queue = EventQueue(10, clock)
    event = ev(1)
    queue.retry_later(event, 30)
    assert event.due == clock.monotonic() + 30
    taker = asyncio.ensure_future(queue.take())
    await clock.wait_for_sleepers(1)
    await clock.advance_and_settle(29.9)
    assert not taker.done()
    await clock.advance_and_settle(0.1)
    taken = taker.result()
    assert (taken.body, taken.key, taken.due) == (event.body, event.key, event.due)
    assert (queue.ready, queue.waiting) == (0, 0)


async def test_a_due_retry_is_taken_after_events_already_ready(clock):
    queue = EventQueue(10, clock)
    queue.retry_later(ev(1), 5)
    queue.offer(ev(2))
    clock.advance(5)
    assert (await take_soon(queue)).body == b'{"n":2}'
    assert (await take_soon(queue)).body == b'{"n":1}'


async def test_an_offer_wakes_a_take_that_waits_for_a_later_retry(clock):
    queue = EventQueue(10, clock)
    queue.retry_later(ev(1), 3600)
    taker = asyncio.ensure_future(queue.take())
    await clock.wait_for_sleepers(1)
    queue.offer(ev(2))
    assert (await asyncio.wait_for(taker, 2)).body == b'{"n":2}'
    assert queue.waiting == 1


async def test_a_sooner_retry_wakes_the_waiting_take_at_its_own_time(clock):
    """1. a take waits for a retry due in an hour; 2. a retry due in 5 s arrives;
    3. after 5 s the take returns the sooner one, the hour-long one still waits."""
    queue = EventQueue(10, clock)
    queue.retry_later(ev(1), 3600)
    taker = asyncio.ensure_future(queue.take())
    await clock.wait_for_sleepers(1)
    queue.retry_later(ev(2), 5)
    await settle()
    assert clock.next_deadline() == clock.monotonic() + 5
    await clock.advance_and_settle(5)
    assert taker.result().body == b'{"n":2}'
    assert queue.waiting == 1


async def test_a_retry_wakes_takes_that_waited_on_an_empty_queue(clock):
    queue = EventQueue(10, clock)
    takers = [asyncio.ensure_future(queue.take()) for _ in range(3)]
    await settle()
    queue.retry_later(ev(1), 2)
    await clock.wait_for_sleepers(1)
    await clock.advance_and_settle(2)
    done = [t for t in takers if t.done()]
    assert [t.result().body for t in done] == [b'{"n":1}']
    for t in takers:
        t.cancel()
    await asyncio.gather(*takers, return_exceptions=True)


async def test_many_waiting_takes_share_one_clock_sleep(clock):
    queue = EventQueue(100, clock)
    for n in range(5):
        queue.retry_later(ev(n), 10 + n)
    takers = [asyncio.ensure_future(queue.take()) for _ in range(32)]
    await clock.wait_for_sleepers(1)
    await settle()
    assert clock.sleepers == 1
    await clock.advance_and_settle(10)
    for _ in range(4):
        await clock.advance_and_settle(1)
    got = sorted(t.result().body for t in takers if t.done())
    assert got == sorted(b'{"n":%d}' % n for n in range(5))
    assert clock.sleepers == 0
    for t in takers:
        t.cancel()
    await asyncio.gather(*takers, return_exceptions=True)


async def test_retries_due_together_reach_every_waiting_take(clock):
    queue = EventQueue(100, clock)
    for n in range(4):
        queue.retry_later(ev(n), 10)
    takers = [asyncio.ensure_future(queue.take()) for _ in range(4)]
    await clock.wait_for_sleepers(1)
    await clock.advance_and_settle(10)
    assert sorted(t.result().body for t in takers) == sorted(b'{"n":%d}' % n for n in range(4))


# -- many workers ------------------------------------------------------------------------


async def test_32_concurrent_takes_each_get_a_distinct_event(clock):
    queue = EventQueue(1000, clock)
    takers = [asyncio.ensure_future(queue.take()) for _ in range(32)]
    await settle()
    offered = [ev(n) for n in range(32)]
    for event in offered:
        assert queue.offer(event)
    got = await asyncio.wait_for(asyncio.gather(*takers), 2)
    assert sorted(e.body for e in got) == sorted(e.body for e in offered)
    assert len(queue) == 0


async def test_workers_drain_a_mixed_load_without_losing_or_duplicating(clock):
    """32 workers take; a third of the events are retried once after 1 s; every event is
    taken exactly once more after its retry."""
    queue = EventQueue(10_000, clock)
    seen: list[bytes] = []

    async def worker() -> None:
        while True:
            event = await queue.take()
            seen.append(event.body)
            if event.attempts == 0 and int(event.body[5:-1]) % 3 == 0:
                event.attempts += 1
                queue.retry_later(event, 1)
            await asyncio.sleep(0)

    workers = [asyncio.ensure_future(worker()) for _ in range(32)]
    for n in range(300):
        queue.offer(ev(n))
    await settle(200)
    await clock.advance_and_settle(1, steps=200)
    assert len(queue) == 0
    assert sorted(seen) == sorted(
        [b'{"n":%d}' % n for n in range(300)] + [b'{"n":%d}' % n for n in range(0, 300, 3)]
    )
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


# -- cancellation ----------------------------------------------------------------------------


async def test_a_cancelled_take_leaves_the_event_for_the_next_take(clock):
    """1. two takes wait; 2. an offer wakes the first; 3. the first is cancelled before
    it runs; 4. the second still gets the event."""
    queue = EventQueue(10, clock)
    first = asyncio.ensure_future(queue.take())
    second = asyncio.ensure_future(queue.take())
    await settle()
    queue.offer(ev(1))
    first.cancel()
    assert (await asyncio.wait_for(second, 2)).body == b'{"n":1}'
    assert first.cancelled()


async def test_a_cancelled_timekeeper_hands_the_retry_to_another_take(clock):
    queue = EventQueue(10, clock)
    queue.retry_later(ev(1), 10)
    first = asyncio.ensure_future(queue.take())
    await clock.wait_for_sleepers(1)
    second = asyncio.ensure_future(queue.take())
    await settle()
    first.cancel()
    await settle()
    assert clock.sleepers == 1
    await clock.advance_and_settle(10)
    assert second.result().body == b'{"n":1}'


async def test_a_take_cancelled_while_idle_leaves_no_sleep_behind(clock):
    queue = EventQueue(10, clock)
    queue.retry_later(ev(1), 10)
    taker = asyncio.ensure_future(queue.take())
    await clock.wait_for_sleepers(1)
    taker.cancel()
    await settle()
    assert clock.sleepers == 0
    assert queue.waiting == 1
    clock.advance(10)
    assert (await take_soon(queue)).body == b'{"n":1}'


def test_a_queue_without_room_is_refused(clock):
    with pytest.raises(ValueError):
        EventQueue(0, clock)


def test_an_event_comes_out_as_it_went_in_through_every_path(clock):
    """Queued events are stored packed; every field must survive offer, requeue, retry and
    take_all (the spool writes what take_all returns)."""
    queue = EventQueue(10, clock)
    summary = Event(b'{"user_id":"u"}', b"", Route.SUMMARIES, attempts=3,
                    first_received_at=1_700_000_123.5)
    queue.offer(summary)
    queue.requeue_front(ev(2))
    queue.retry_later(ev(3), 7)
    out = queue.take_all()
    assert [(e.body, e.route, e.attempts) for e in out] == [
        (ev(2).body, Route.EVENTS, 0), (summary.body, Route.SUMMARIES, 3),
        (ev(3).body, Route.EVENTS, 0)]
    assert out[1].first_received_at == 1_700_000_123.5
    assert out[2].due == clock.monotonic() + 7


def test_queued_events_are_invisible_to_the_cycle_collector(clock):
    """A full GC must not walk every queued event (it set the intake's p99)."""
    import gc

    queue = EventQueue(1000, clock)
    bodies = {ev(i).body for i in range(500)}
    for i in range(500):
        queue.offer(ev(i))
    queue.retry_later(ev(1000), 5)
    gc.collect()

    def holds_ours(o: object) -> bool:
        if isinstance(o, Event):
            return o.body in bodies
        return isinstance(o, tuple) and bool(o) and isinstance(o[0], bytes) and o[0] in bodies

    assert [o for o in gc.get_objects() if holds_ours(o)] == []
    assert len(queue) == 501
