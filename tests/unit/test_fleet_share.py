"""Several RateGates, no Redis, spending one Intercom budget on a FakeClock: each learns
from Remaining falling faster than its own sends explain that others spend too, and paces
its share. Nothing sleeps for real; Intercom is a scripted fixed-window budget."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter

import pytest

from forwarder.clock import FakeClock
from forwarder.ratelimit import RateGate
from forwarder.upstream import RateHeaders
from tests.unit.test_ratelimit import ClockBucket, NoLocalLimit, run_clock, settle

WALL0 = 1_700_000_000.0  # on a window edge


class SharedIntercom:
    """One app's budget: `budget` calls per fixed window of `window_s`, on the FakeClock."""

    def __init__(self, clock: FakeClock, budget: int, window_s: float):
        self.clock, self.budget, self.window_s = clock, budget, window_s
        self.used: Counter[int] = Counter()
        self.ok: Counter[int] = Counter()
        self.rejected: Counter[int] = Counter()
        self.sent_at: list[tuple[int, float]] = []  # (gate, wall) of every counted call

    def answer(self, who: int) -> tuple[int, RateHeaders]:
        wall = self.clock.wall()
        index = math.floor(wall / self.window_s)
        self.used[index] += 1
        self.sent_at.append((who, wall))
        reset = (index + 1) * self.window_s
        if self.used[index] > self.budget:
            self.rejected[index] += 1
            return 429, RateHeaders(self.budget, 0, reset)
        self.ok[index] += 1
        return 202, RateHeaders(self.budget, self.budget - self.used[index], reset)

    def window(self, i: int) -> int:
        return math.floor(WALL0 / self.window_s) + i


async def run_fleet(n: int, *, budget: int = 200, window_s: float = 2.0, windows: int = 8,
                    workers: int = 8, seed: int = 1, fed: float | None = None
                    ) -> tuple[SharedIntercom, list[RateGate]]:
    """n daemons, each `workers` loops of acquire -> request -> answer -> release, with
    random latencies, every daemon configured with the whole budget. Always busy, or,
    with `fed`, given fed x budget / n events a window each, in 20 slices (a queue that
    fills at that rate)."""
    clock = FakeClock(start_monotonic=1000.0, start_wall=WALL0)
    intercom = SharedIntercom(clock, budget, window_s)
    latency = random.Random(seed)
    gates = [RateGate(budget, window_s, clock, limiter=ClockBucket(clock, budget, window_s),
                      rng=random.Random(seed * 1000 + k)) for k in range(n)]

    queued = [asyncio.Semaphore(0) for _ in gates]

    async def feeder() -> None:
        assert fed is not None
        owed = 0.0
        while True:
            owed += fed * budget / n / 20
            for _ in range(int(owed)):
                for q in queued:
                    q.release()
            owed -= int(owed)
            await clock.sleep(window_s / 20)

    async def worker(who: int, gate: RateGate) -> None:
        while True:
            if fed is not None:
                await queued[who].acquire()
            await gate.acquire()
            try:
                await clock.sleep(latency.uniform(0.002, 0.02))
                status, headers = intercom.answer(who)
                await clock.sleep(latency.uniform(0.002, 0.02))
            except asyncio.CancelledError:
                gate.release(None, None)
                raise
            gate.release(status, headers)

    tasks = [asyncio.ensure_future(worker(k, g)) for k, g in enumerate(gates)
             for _ in range(workers)]
    if fed is not None:
        tasks.append(asyncio.ensure_future(feeder()))
    await run_clock(clock, tasks, windows * window_s)
    return intercom, gates


@pytest.mark.parametrize("n", [5, 10])
async def test_a_fleet_without_redis_trips_no_429_after_its_first_window(n):
    """Steps: n daemons, each configured with the whole budget (200 per 2 s), always busy,
    8 windows. Expect: after the first window (all start blind at once, the budget
    unknown) no 429 at all; from the fourth window on (the shares have settled) at least
    85% of the budget used in every window."""
    intercom, gates = await run_fleet(n)
    rejected = [intercom.rejected[intercom.window(i)] for i in range(8)]
    ok = [intercom.ok[intercom.window(i)] for i in range(8)]
    assert rejected[1:] == [0] * 7, (rejected, ok)
    assert min(ok[3:]) >= 0.85 * 200, ok
    assert all(g.share.share < 1.0 for g in gates)  # each learnt it is one of several


@pytest.mark.parametrize("n", [5, 20])
async def test_daemons_fed_1_5x_the_budget_grow_into_what_the_app_leaves(n):
    """Steps: n daemons, each fed 1.5 x budget / n events a window (a queue filling
    gradually, as the intake fills it), 10 windows. A share learnt low in the first
    windows must grow back, both when the app left budget unused and when a daemon is
    paced below two answers a window (too few to measure). Expect: from the sixth window
    on, at least 85% of the budget used in every window, and at most 5% 429s overall."""
    intercom, _ = await run_fleet(n, windows=10, fed=1.5)
    ok = [intercom.ok[intercom.window(i)] for i in range(10)]
    rejected = sum(intercom.rejected.values())
    assert min(ok[5:]) >= 0.85 * 200, ok
    assert rejected <= 0.05 * sum(intercom.used.values()), (rejected, ok)


async def test_a_daemon_alone_learns_no_share_and_is_not_paced():
    intercom, gates = await run_fleet(1, windows=4)
    assert gates[0].share.share == 1.0
    assert [intercom.ok[intercom.window(i)] for i in range(4)] == [200] * 4


# --- one gate, Intercom's answers scripted --------------------------------------------


def rate(remaining: int, reset_at: float, limit: int = 100) -> RateHeaders:
    return RateHeaders(limit=limit, remaining=remaining, reset_at=reset_at)


async def others_spend_a_window(gate: RateGate, clock: FakeClock, reset_at: float, own: int,
                                others_each: int) -> None:
    """This gate sends `own` requests one at a time; between two of its answers the
    others spend `others_each`: Remaining falls faster than its own sends explain."""
    used = 0
    for _ in range(own):
        await acquire_on(gate, clock)
        used += 1 + others_each
        gate.release(202, rate(max(0, 100 - used), reset_at))


async def acquire_on(gate: RateGate, clock: FakeClock, step_s: float = 0.005) -> None:
    """Acquire, moving the FakeClock on in small steps while the gate paces."""
    task = asyncio.ensure_future(gate.acquire())
    for _ in range(10_000):
        await settle(5)
        if task.done():
            await task
            return
        clock.advance(step_s)
    raise AssertionError("acquire did not pass within 50 s of FakeClock time")


async def test_remaining_falling_faster_than_own_sends_paces_the_next_window():
    """Steps: in one window this daemon's 10 sends are each followed by 3 of someone
    else's (Remaining falls by 4 per answer). The next window opens. Expect: its share is
    learnt as ~1/4, so it sends ~24 (share x 100 x 0.95) in that window, spread over it,
    the first one after a jittered delay rather than at the reset."""
    clock = FakeClock(start_monotonic=1000.0, start_wall=WALL0)
    gate = RateGate(1000, 10.0, clock, limiter=NoLocalLimit(), rng=random.Random(3))
    await others_spend_a_window(gate, clock, WALL0 + 10, own=10, others_each=3)
    assert gate.share.current() == pytest.approx(0.25, abs=0.01)
    # the reset: the next window, assumed to hold Limit (100)
    clock.advance(WALL0 + 10 - clock.wall() + 1e-6)
    sent_at: list[float] = []

    async def send_all() -> None:
        while True:
            await gate.acquire()
            sent_at.append(clock.monotonic() - window_start)
            gate.release(202, rate(99 - len(sent_at), WALL0 + 20))

    window_start = clock.monotonic()
    sender = asyncio.ensure_future(send_all())
    while clock.monotonic() < window_start + 9.99:
        await settle()
        clock.advance(0.01)
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    assert 22 <= len(sent_at) <= 25, sent_at
    assert sent_at[0] > 0.0  # the jitter: not at the reset itself
    gaps = [b - a for a, b in zip(sent_at[1:], sent_at[2:])]
    assert min(gaps) >= 0.3 and max(gaps) <= 0.5  # ~10 s / 24: paced, not a burst


async def test_two_daemons_start_a_window_at_different_moments():
    """The jitter comes from each daemon's own rng: two daemons that learnt the same share
    open the next window at different moments, so their first sends do not collide."""
    firsts = []
    for seed in (1, 2):
        clock = FakeClock(start_monotonic=1000.0, start_wall=WALL0)
        gate = RateGate(1000, 10.0, clock, limiter=NoLocalLimit(), rng=random.Random(seed))
        await others_spend_a_window(gate, clock, WALL0 + 10, own=10, others_each=3)
        clock.advance(WALL0 + 10 - clock.wall() + 1e-6)
        first = asyncio.ensure_future(gate.acquire())
        while not first.done():
            await settle()
            clock.advance(0.005)
        firsts.append(clock.monotonic())
    assert abs(firsts[0] - firsts[1]) > 0.01


async def test_a_paced_daemon_puts_no_more_in_flight_than_its_share_of_remaining():
    """Share 1/4 and Remaining 8 known: at most 2 of this daemon's requests in flight."""
    clock = FakeClock(start_monotonic=1000.0, start_wall=WALL0)
    gate = RateGate(1000, 10.0, clock, limiter=NoLocalLimit(), rng=random.Random(3))
    await others_spend_a_window(gate, clock, WALL0 + 10, own=10, others_each=3)
    clock.advance(WALL0 + 10 - clock.wall() + 1e-6)
    await acquire_on(gate, clock)  # (the one that confirms the window)
    gate.release(202, rate(8, WALL0 + 20))
    tasks = [asyncio.ensure_future(gate.acquire()) for _ in range(6)]
    for _ in range(2000):  # 10 s of the window in 5 ms steps: pacing lets them through
        await settle(5)
        clock.advance(0.005)
    assert sum(t.done() for t in tasks) == 2 and gate.in_flight == 2
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
