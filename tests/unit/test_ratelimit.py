"""RateGate on a FakeClock: holds on Remaining 0 and 429, counts requests in flight against
Intercom's budget, copes with answers out of order, lets priority reads go first, and is
cancellation-safe. Nothing sleeps for real; the real aiolimiter appears in one test."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from forwarder.clock import FakeClock
from forwarder.ratelimit import RateGate
from forwarder.upstream import RateHeaders

MONO = 1000.0
WALL = 1_700_000_003.0  # 3 s into the window [..000, ..010)
RESET = 1_700_000_010.0  # so Intercom's reset is 7 s ahead


class NoLocalLimit:
    """The local budget out of the way, to look at the header logic alone."""

    async def acquire(self) -> None:
        return None


class ClockBucket:
    """aiolimiter's leaky bucket, but on the FakeClock (aiolimiter reads the loop clock)."""

    def __init__(self, clock: FakeClock, max_rate: int, period_s: float):
        self._clock, self._max, self._rate = clock, max_rate, max_rate / period_s
        self._level, self._last = 0.0, clock.monotonic()

    async def acquire(self) -> None:
        while True:
            now = self._clock.monotonic()
            self._level = max(0.0, self._level - (now - self._last) * self._rate)
            self._last = now
            if self._level + 1 <= self._max + 1e-9:  # float dust must not spin at one instant
                self._level += 1
                return
            await self._clock.sleep((self._level + 1 - self._max) / self._rate)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start_monotonic=MONO, start_wall=WALL)


def make_gate(clock: FakeClock, requests: int = 1000, per_seconds: float = 10.0) -> RateGate:
    return RateGate(requests, per_seconds, clock, limiter=NoLocalLimit())


def rate(remaining: int | None, reset_at: float | None = RESET, limit: int | None = 100):
    return RateHeaders(limit=limit, remaining=remaining, reset_at=reset_at)


async def settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def acquire_now(gate: RateGate, n: int = 1) -> None:
    """n acquires that must pass at once."""
    for _ in range(n):
        assert await asyncio.wait_for(gate.acquire(), 1) == 0.0


def start(gate: RateGate, priority: bool = False) -> asyncio.Task[float]:
    return asyncio.ensure_future(gate.acquire(priority=priority))


async def test_requests_go_at_once_while_intercoms_budget_is_unknown(clock):
    gate = make_gate(clock)
    await acquire_now(gate, 40)
    assert gate.in_flight == 40 and gate.held_until is None


async def test_remaining_zero_holds_every_worker_until_reset(clock):
    """Steps: Remaining 0, reset 7 s ahead; 3 wait. Expect: nobody before the reset; at the
    reset one goes, and the other two once its answer confirms the new window."""
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(202, rate(0))
    assert gate.in_flight == 0 and gate.held_until == MONO + 7
    waiting = [start(gate) for _ in range(3)]
    await clock.wait_for_sleepers(3)
    await clock.advance_and_settle(6.99)
    assert not any(t.done() for t in waiting)
    await clock.advance_and_settle(0.01)
    assert [t.done() for t in waiting].count(True) == 1 and gate.in_flight == 1
    gate.release(202, rate(99, reset_at=RESET + 10))
    assert [await asyncio.wait_for(t, 1) for t in waiting] == pytest.approx([7.0] * 3)
    assert gate.in_flight == 2 and gate.held_until is None


async def test_after_reset_the_new_window_holds_limit(clock):
    """Steps: Limit 2, Remaining 0; the reset passes; one request goes and its answer is
    lost (a network error, so the window stays unconfirmed). Expect: one more goes (Limit 2,
    less the one Intercom may have counted), the third waits."""
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(202, rate(0, limit=2))
    clock.advance(7)
    await acquire_now(gate)
    gate.release(None, None)
    await acquire_now(gate)
    third = start(gate)
    await settle()
    assert not third.done()
    third.cancel()


async def test_after_a_rollover_one_request_goes_until_its_answer_confirms_the_window(clock):
    """Steps: Remaining 0, the reset passes; one request goes, a second and a priority one
    wait. The answer says Remaining 98 in the window ending 10 s later. Expect: nothing
    else starts before that answer; then the rest go at once."""
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(202, rate(0))
    clock.advance(7)
    await acquire_now(gate)
    second, urgent = start(gate), start(gate, priority=True)
    await settle()
    assert not second.done() and not urgent.done()
    gate.release(202, rate(98, reset_at=RESET + 10))
    await asyncio.wait_for(asyncio.gather(second, urgent), 1)
    await acquire_now(gate, 40)
    assert gate.in_flight == 42


async def test_a_2xx_without_rate_headers_after_a_rollover_ends_one_at_a_time(clock):
    """A proxy that drops the headers must not leave the gate one request at a time."""
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(202, rate(0))
    clock.advance(7)
    await acquire_now(gate)
    gate.release(202, None)
    await acquire_now(gate, 40)


async def test_in_flight_requests_count_against_remaining(clock):
    """Steps: Remaining 3 is known and 3 requests start; answers say 2, 1, 0.
    Expect: nothing more starts at any point, then all wait for the reset."""
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(202, rate(3))
    await acquire_now(gate, 3)
    fourth = start(gate)
    for remaining in (2, 1):
        await settle()
        assert not fourth.done()
        gate.release(202, rate(remaining))
    await settle()
    assert not fourth.done()
    gate.release(202, rate(0))
    assert gate.held_until == MONO + 7
    await clock.wait_for_sleepers(1)
    clock.advance(7)
    assert await asyncio.wait_for(fourth, 1) == pytest.approx(7.0)


async def test_answers_out_of_order_keep_the_lowest_remaining_of_the_window(clock):
    gate = make_gate(clock)
    await acquire_now(gate, 3)
    gate.release(202, rate(4))
    gate.release(202, rate(7))  # processed earlier, answered later: not more budget
    assert gate.in_flight == 1
    await acquire_now(gate, 3)  # 4 known - 1 in flight
    blocked = start(gate)
    await settle()
    assert not blocked.done()
    blocked.cancel()


async def test_an_answer_for_a_request_counted_earlier_frees_budget(clock):
    """Steps: 3 start blind; the first answer says 5, so 3 more start (5 - 2 in flight) and a
    7th waits; the next answer says 6 (it was counted before the first). Expect: the 7th
    goes, because the answered request no longer counts against what is left."""
    gate = make_gate(clock)
    await acquire_now(gate, 3)
    gate.release(202, rate(5))
    await acquire_now(gate, 3)
    seventh = start(gate)
    await settle()
    assert not seventh.done()
    gate.release(202, rate(6))
    assert await asyncio.wait_for(seventh, 1) == 0.0
    assert gate.in_flight == 5


async def test_a_later_reset_starts_a_new_window(clock):
    gate = make_gate(clock)
    await acquire_now(gate, 2)
    gate.release(202, rate(0))
    assert gate.held_until is not None
    gate.release(202, rate(50, reset_at=RESET + 10))
    assert gate.held_until is None
    await acquire_now(gate, 50)


async def test_a_stale_answer_from_an_earlier_window_is_ignored(clock):
    gate = make_gate(clock)
    await acquire_now(gate, 2)
    gate.release(202, rate(50, reset_at=RESET + 10))
    gate.release(202, rate(0, reset_at=RESET))
    assert gate.held_until is None
    await acquire_now(gate, 49)


async def test_an_answer_without_headers_still_spends_the_known_budget(clock):
    """Intercom may have counted a request that failed on the way back."""
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(202, rate(2))
    await acquire_now(gate, 2)
    gate.release(None, None)  # network error
    gate.release(502, None)  # a proxy's answer
    assert gate.in_flight == 0 and gate.held_until == MONO + 7


async def test_reset_far_ahead_is_capped_at_one_window(clock):
    """Our wall clock behind Intercom's must not hold everyone for hours."""
    gate = make_gate(clock, per_seconds=10)
    await acquire_now(gate)
    gate.release(202, rate(0, reset_at=WALL + 3600))
    assert gate.held_until == MONO + 10


async def test_remaining_zero_with_a_reset_already_past_does_not_hold(clock):
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(202, rate(0, reset_at=WALL - 1))
    assert gate.held_until is None


async def test_429_holds_until_its_reset(clock):
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(429, rate(0, reset_at=WALL + 4), retry_after_s=1)
    assert gate.held_until == MONO + 4


async def test_429_without_reset_holds_for_retry_after(clock):
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(429, None, retry_after_s=3)
    assert gate.held_until == MONO + 3
    blocked = start(gate)
    await clock.wait_for_sleepers(1)
    await clock.advance_and_settle(2.9)
    assert not blocked.done()
    clock.advance(0.1)
    assert await asyncio.wait_for(blocked, 1) == pytest.approx(3.0)


async def test_429_with_nothing_to_go_on_backs_off_1s_doubling_up_to_the_window(clock):
    gate = make_gate(clock, per_seconds=5)
    holds = []
    for _ in range(5):
        await acquire_now(gate)
        gate.release(429, None)
        holds.append(gate.held_until - clock.monotonic())
        clock.advance(holds[-1])
    assert holds == [1, 2, 4, 5, 5]
    await acquire_now(gate)
    gate.release(202, None)  # any other answer resets the backoff
    await acquire_now(gate)
    gate.release(429, None)
    assert gate.held_until == clock.monotonic() + 1


async def test_429_with_a_reset_already_past_backs_off_instead_of_looping(clock):
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(429, rate(0, reset_at=WALL - 2))
    assert gate.held_until == MONO + 1


async def test_a_burst_of_429s_with_a_reset_already_past_holds_for_the_first_backoff_only(clock):
    """Steps: 32 requests in flight, all answered 429 with a Reset already past and no
    Retry-After. Expect: held 1 s (the first backoff), not doubled once per answer (which
    would hold a whole window); the next 429 after the hold doubles it once, to 2 s."""
    gate = make_gate(clock)
    await acquire_now(gate, 32)
    for _ in range(32):
        gate.release(429, rate(0, reset_at=WALL - 2))
    assert gate.in_flight == 0 and gate.held_until == MONO + 1
    clock.advance(1)
    await acquire_now(gate)
    gate.release(429, rate(0, reset_at=WALL - 2))
    assert gate.held_until == MONO + 1 + 2


async def test_a_429_for_the_window_just_passed_holds_50ms_doubling_until_a_non_429(clock):
    """Intercom's clock 50+ ms behind ours. Steps: Remaining 0, the reset passes; the one
    request sent answers 429 with the Reset just passed, twice; then a 202 in the new
    window; at the next rollover the same again. Expect: holds of 0.05 s, then 0.1 s (one
    request each time), and 0.05 s again after the 202 reset the doubling."""
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(202, rate(0))
    clock.advance(7)
    holds = []
    for _ in range(2):
        await acquire_now(gate)
        other = start(gate)
        await settle()
        assert not other.done()
        other.cancel()
        gate.release(429, rate(0, reset_at=RESET))
        holds.append(gate.held_until - clock.monotonic())
        clock.advance(holds[-1])
    assert holds == pytest.approx([0.05, 0.1])
    await acquire_now(gate)
    gate.release(202, rate(0, reset_at=RESET + 10))
    clock.advance(gate.held_until - clock.monotonic())
    await acquire_now(gate)
    gate.release(429, rate(0, reset_at=RESET + 10))
    assert gate.held_until - clock.monotonic() == pytest.approx(0.05)


async def test_hold_for_holds_every_worker_including_priority(clock):
    gate = make_gate(clock)
    gate.hold_for(5)
    normal, urgent = start(gate), start(gate, priority=True)
    await clock.wait_for_sleepers(2)
    await clock.advance_and_settle(4.9)
    assert not normal.done() and not urgent.done()
    clock.advance(0.1)
    assert await asyncio.wait_for(asyncio.gather(normal, urgent), 1) == pytest.approx([5, 5])


async def test_priority_acquire_goes_ahead_of_waiting_normal_ones(clock):
    """Steps: Limit 1 and Remaining 0; two normal acquires wait, then a priority one.
    The reset frees exactly one slot. Expect: the priority acquire gets it."""
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(202, rate(0, limit=1))
    first, second = start(gate), start(gate)
    await clock.wait_for_sleepers(2)
    urgent = start(gate, priority=True)
    await clock.wait_for_sleepers(3)
    await clock.advance_and_settle(7)
    assert urgent.done() and not first.done() and not second.done()
    assert gate.in_flight == 1
    for t in (first, second):
        t.cancel()


async def test_priority_acquire_passes_at_once_when_there_is_budget(clock):
    gate = make_gate(clock)
    assert await asyncio.wait_for(gate.acquire(priority=True), 1) == 0.0
    await acquire_now(gate)
    assert gate.in_flight == 2


async def test_cancelled_acquire_leaves_in_flight_unchanged(clock):
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(202, rate(0))
    waiting = start(gate)
    await clock.wait_for_sleepers(1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert gate.in_flight == 0 and clock.sleepers == 0
    clock.advance(7)
    await acquire_now(gate)
    assert gate.in_flight == 1


async def test_cancelled_priority_acquire_does_not_strand_normal_ones(clock):
    gate = make_gate(clock)
    await acquire_now(gate)
    gate.release(202, rate(0, limit=1))
    normal, urgent = start(gate), start(gate, priority=True)
    await clock.wait_for_sleepers(2)
    urgent.cancel()
    await settle()
    await clock.advance_and_settle(7)
    assert await asyncio.wait_for(normal, 1) == pytest.approx(7.0)
    assert gate.in_flight == 1


async def test_real_local_limiter_paces_and_a_cancelled_wait_counts_nothing(clock):
    """The one test with aiolimiter itself: 2 per minute, so a third acquire waits."""
    gate = RateGate(2, 60, clock)
    await acquire_now(gate, 2)
    third = start(gate)
    await settle()
    assert not third.done()
    third.cancel()
    with pytest.raises(asyncio.CancelledError):
        await third
    assert gate.in_flight == 2


# --- simulation ---------------------------------------------------------------------------


@dataclass
class ScriptedIntercom:
    """Intercom's fixed windows on the FakeClock: `budget` calls per `window_s`."""

    clock: FakeClock
    budget: int
    window_s: float = 10.0

    def __post_init__(self) -> None:
        self.accepted: Counter[int] = Counter()  # window index -> 2xx answers
        self.used: Counter[int] = Counter()
        self.rejected = 0
        self.total = 0

    def answer(self) -> tuple[int, RateHeaders]:
        index = math.floor(self.clock.wall() / self.window_s)
        self.used[index] += 1
        self.total += 1
        reset = (index + 1) * self.window_s
        if self.used[index] > self.budget:
            self.rejected += 1
            return 429, RateHeaders(self.budget, 0, reset)
        self.accepted[index] += 1
        return 202, RateHeaders(self.budget, self.budget - self.used[index], reset)


async def simulate(
    configured: int, real: int, *, workers: int = 32, windows: int = 6, seed: int = 1
) -> ScriptedIntercom:
    """32 workers loop acquire -> request travels -> Intercom counts -> answer travels ->
    release, with random one-way latencies (so answers arrive out of order)."""
    clock = FakeClock(start_monotonic=MONO, start_wall=1_700_000_000.0)  # on a window edge
    gate = RateGate(configured, 10.0, clock, limiter=ClockBucket(clock, configured, 10.0))
    intercom = ScriptedIntercom(clock, real)
    rng = random.Random(seed)

    async def worker() -> None:
        while True:
            await gate.acquire()
            try:
                await clock.sleep(rng.uniform(0.005, 0.15))
                status, headers = intercom.answer()
                await clock.sleep(rng.uniform(0.005, 0.15))
            except asyncio.CancelledError:
                gate.release(None, None)
                raise
            gate.release(status, headers)

    tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
    await run_clock(clock, tasks, windows * 10.0)
    return intercom


async def run_clock(clock: FakeClock, tasks: list[asyncio.Future[None]], seconds: float) -> None:
    """Let the tasks run for `seconds` of FakeClock time, jumping from one sleeper's
    deadline to the next; then cancel them."""
    end = clock.monotonic() + seconds
    try:
        while clock.monotonic() < end:
            await settle(30)
            deadline = clock.next_deadline()
            assert deadline is not None, "every worker parked with nothing to wake it"
            clock.advance(max(0.0, deadline - clock.monotonic()))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def full_windows(intercom: ScriptedIntercom, windows: int) -> list[int]:
    first = math.floor(1_700_000_000.0 / intercom.window_s)
    return [intercom.accepted[first + i] for i in range(windows)]


async def test_budget_configured_50_percent_too_high_stays_under_5_percent_429s():
    """Real budget 100 per 10 s window, configured 150, 32 workers, 6 windows.
    Expect: under 5% of requests answered 429 and at least 90% of the budget used."""
    intercom = await simulate(configured=150, real=100)
    used = full_windows(intercom, 6)
    assert intercom.rejected / intercom.total < 0.05
    assert sum(used) / (100 * 6) >= 0.90
    assert min(used) >= 90, used


async def test_budget_configured_right_uses_97_percent_with_no_429():
    intercom = await simulate(configured=100, real=100)
    used = full_windows(intercom, 6)
    assert intercom.rejected == 0
    assert sum(used) / (100 * 6) >= 0.97, used


class FakeBucket:
    """A leaky bucket on the FakeClock with aiolimiter's has_capacity()/acquire()."""

    def __init__(self, clock: FakeClock, max_rate: int, period_s: float):
        self._clock, self._max, self._rate = clock, max_rate, max_rate / period_s
        self._level, self._last = 0.0, clock.monotonic()
        self.granted: list[float] = []

    def has_capacity(self, amount: float = 1) -> bool:
        now = self._clock.monotonic()
        self._level = max(0.0, self._level - (now - self._last) * self._rate)
        self._last = now
        return self._level + amount <= self._max + 1e-9

    async def acquire(self) -> None:
        assert self.has_capacity(), "TickedLimiter must only enter a bucket with capacity"
        self._level += 1
        self.granted.append(self._clock.monotonic())


async def test_ticked_limiter_lets_paced_sends_out_together_on_a_tick(clock):
    """Steps: a 100/s bucket is emptied; 5 acquires wait. Expect: none before the next
    50 ms boundary, all 5 at that one boundary (one wake-up, not one per 10 ms drip)."""
    from forwarder.ratelimit import TickedLimiter

    bucket = FakeBucket(clock, max_rate=10, period_s=0.1)
    limiter = TickedLimiter(bucket, 0.05, now=clock.monotonic, sleep=clock.sleep)
    for _ in range(10):
        await limiter.acquire()
    waiting = [asyncio.ensure_future(limiter.acquire()) for _ in range(5)]
    await clock.wait_for_sleepers(1)
    await settle()
    assert clock.sleepers == 1  # one shared tick, not one timer per waiter
    boundary = (int(clock.monotonic() / 0.05) + 1) * 0.05
    await clock.advance_and_settle(boundary - clock.monotonic() - 0.001)
    assert not any(w.done() for w in waiting)
    await clock.advance_and_settle(0.001)
    assert all(w.done() for w in waiting)
    assert len(set(bucket.granted[-5:])) == 1


async def test_ticked_limiter_keeps_the_budget(clock):
    from forwarder.ratelimit import TickedLimiter

    bucket = FakeBucket(clock, max_rate=20, period_s=1.0)
    limiter = TickedLimiter(bucket, 0.05, now=clock.monotonic, sleep=clock.sleep)
    start = clock.monotonic()

    async def worker() -> None:
        while clock.monotonic() - start < 5.0:
            await limiter.acquire()

    workers = [asyncio.ensure_future(worker()) for _ in range(8)]
    while clock.monotonic() - start < 5.0:
        await clock.advance_and_settle(0.01)
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    in_window = [t for t in bucket.granted if t - start < 5.0]
    assert 20 + 20 * 5.0 - 25 <= len(in_window) <= 20 + 20 * 5.0  # burst + drip, no more


def tickers() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if not t.done()
            and getattr(t.get_coro(), "__qualname__", "") == "TickedLimiter._tick"]


async def test_a_tick_wakes_only_as_many_waiters_as_there_are_permits_oldest_first(clock):
    """Steps: a bucket of 8 per second on 250 ms ticks (2 permits a tick) is emptied on a
    tick boundary; 5 acquires wait. Expect: 2, 2, then 1 of them done per tick, in arrival
    order, the rest still queued; then no ticker and no timer left."""
    from forwarder.ratelimit import TickedLimiter

    bucket = FakeBucket(clock, max_rate=8, period_s=1.0)
    limiter = TickedLimiter(bucket, 0.25, now=clock.monotonic, sleep=clock.sleep)
    for _ in range(8):
        await limiter.acquire()
    done: list[int] = []

    async def waiter(i: int) -> None:
        await limiter.acquire()
        done.append(i)

    tasks = [asyncio.ensure_future(waiter(i)) for i in range(5)]
    await settle()
    assert limiter.waiting == 5 and clock.sleepers == 1
    await clock.advance_and_settle(0.25)
    assert done == [0, 1] and limiter.waiting == 3
    await clock.advance_and_settle(0.25)
    assert done == [0, 1, 2, 3] and limiter.waiting == 1
    await clock.advance_and_settle(0.25)
    assert done == [0, 1, 2, 3, 4]
    await asyncio.gather(*tasks)
    assert bucket.granted[8:] == [1000.25, 1000.25, 1000.5, 1000.5, 1000.75]
    assert clock.sleepers == 0 and not tickers()


async def test_a_newcomer_queues_behind_waiters_even_when_a_permit_has_dripped_in(clock):
    from forwarder.ratelimit import TickedLimiter

    bucket = FakeBucket(clock, max_rate=8, period_s=1.0)
    limiter = TickedLimiter(bucket, 0.25, now=clock.monotonic, sleep=clock.sleep)
    for _ in range(8):
        await limiter.acquire()
    first = asyncio.ensure_future(limiter.acquire())
    await settle()
    await clock.advance_and_settle(0.2)  # 1.6 permits dripped in, the tick is 50 ms away
    newcomer = asyncio.ensure_future(limiter.acquire())
    await settle()
    assert not first.done() and not newcomer.done()
    await clock.advance_and_settle(0.05)
    assert first.done() and newcomer.done()


async def test_cancelling_every_waiter_leaves_no_ticker_and_no_timer(clock):
    from forwarder.ratelimit import TickedLimiter

    bucket = FakeBucket(clock, max_rate=8, period_s=1.0)
    limiter = TickedLimiter(bucket, 0.25, now=clock.monotonic, sleep=clock.sleep)
    for _ in range(8):
        await limiter.acquire()
    waiting = [asyncio.ensure_future(limiter.acquire()) for _ in range(3)]
    await settle()
    assert clock.sleepers == 1 and len(tickers()) == 1
    for w in waiting:
        w.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await settle()
    assert limiter.waiting == 0 and clock.sleepers == 0 and not tickers()
    assert len(bucket.granted) == 8
    # and the limiter still works afterwards, on a fresh tick
    again = asyncio.ensure_future(limiter.acquire())
    await settle()
    assert clock.sleepers == 1
    await clock.advance_and_settle(0.25)
    assert again.done() and len(bucket.granted) == 9


async def test_a_permit_granted_to_a_waiter_cancelled_before_it_runs_goes_to_the_next(clock):
    """The tick grants the oldest waiter its permit, and that waiter is cancelled before it
    resumes: the permit must not be lost (nor the next waiter stranded until a later tick)."""
    from forwarder.ratelimit import TickedLimiter

    bucket = FakeBucket(clock, max_rate=4, period_s=1.0)  # 1 permit per 250 ms tick
    limiter = TickedLimiter(bucket, 0.25, now=clock.monotonic, sleep=clock.sleep)
    for _ in range(4):
        await limiter.acquire()
    first = asyncio.ensure_future(limiter.acquire())
    second = asyncio.ensure_future(limiter.acquire())
    await settle()
    clock.advance(0.25)
    while limiter.waiting == 2:  # until the ticker has run and granted `first`
        await asyncio.sleep(0)
    assert not first.done()
    first.cancel()
    await settle()
    assert first.cancelled()
    assert second.done() and bucket.granted[4:] == [1000.25]
    assert clock.sleepers == 0 and not tickers()
