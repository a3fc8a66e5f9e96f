"""The fleet through a real redis-server (tests/redis_server.py, on a Unix socket in a
temporary directory): one budget and one dedup window shared by several daemons, Redis
killed, frozen and restarted underneath them, a daemon killed holding permits. Redis's
TIME and the fake Intercom's windows run on the real clock, so these tests take a few
seconds of real time; they wait by bounded polling, never by a guessed sleep."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from forwarder.clock import SystemClock
from forwarder.config import Secret
from forwarder.dedup import DedupWindow
from forwarder.fake_intercom import FakeIntercom
from forwarder.fleet_budget import FleetBudget
from forwarder.fleet_dedup import FleetDedup
from forwarder.fleet_metrics import FleetMetrics
from forwarder.fleet_redis import FleetRedis, connect, fleet_namespace
from forwarder.upstream import RateHeaders
from tests.fleet_sidecar import Sidecar, Supply, make_event

TOKEN = "fleet-secret-token"


async def poll(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0,
               step: float = 0.01) -> None:
    """Bounded polling for a condition that depends on real time (Redis's TIME)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(f"intercom_forwarder_{name}", labels) or 0.0


class Daemon:
    """The fleet parts of one daemon, on one Redis."""

    def __init__(self, url: str, *, requests: int = 20, per_seconds: float = 60.0,
                 retry_s: float = 1.0, window_s: float = 3600.0):
        self.clock = SystemClock()
        self.registry = CollectorRegistry()
        self.metrics = FleetMetrics(self.registry)
        self.redis = FleetRedis(connect(url), fleet_namespace("ws1", Secret(TOKEN)),
                                self.clock, self.metrics, retry_s=retry_s)
        self.budget = FleetBudget(self.redis, requests=requests, per_seconds=per_seconds,
                                  clock=self.clock, metrics=self.metrics)
        self.dedup = FleetDedup(self.redis, DedupWindow(window_s, 10_000, self.clock),
                                window_seconds=window_s, clock=self.clock,
                                metrics=self.metrics)

    async def __aenter__(self) -> Daemon:
        await self.budget.start()
        await self.dedup.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.dedup.stop()
        await self.budget.stop()
        await self.redis.close()

    async def take_all(self) -> int:
        """Permits this daemon gets before the fleet says wait."""
        n = 0
        while await self.budget.take() == 0.0:
            n += 1
            assert n < 10_000
        return n


def key(n: int) -> bytes:
    return hashlib.blake2b(n.to_bytes(8, "big"), digest_size=16).digest()


# --- namespace ------------------------------------------------------------------------


def test_namespace_is_the_workspace_and_a_digest_of_the_token_never_the_token():
    ns = fleet_namespace("ws1", Secret(TOKEN))
    assert ns.startswith("ifwd:ws1:") and TOKEN not in ns
    assert ns == fleet_namespace("ws1", Secret(TOKEN))
    assert ns != fleet_namespace("ws1", Secret(TOKEN + "x"))  # another app
    assert ns != fleet_namespace("ws2", Secret(TOKEN))  # another workspace


async def test_a_caller_cancelled_during_a_round_trip_is_cancelled_even_if_it_swallows():
    """redis-py nests its own timeouts; a cancellation landing as one expires once came
    out as an error and a worker cancelled by stop() ran on. Here the round trip itself
    swallows the cancellation: the caller must still end cancelled, at once."""
    metrics = FleetMetrics(CollectorRegistry())
    fleet = FleetRedis(connect("unix:///nonexistent/redis.sock"), "ifwd:t:0", SystemClock(),
                       metrics, timeout_s=5.0)
    entered = asyncio.Event()

    async def swallowing_round_trip() -> str:
        entered.set()
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            pass  # as a library that turns a cancellation into a result would
        return "late"

    caller = asyncio.ensure_future(fleet.call("lease", swallowing_round_trip))
    await entered.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 1.0)
    await fleet.close()


# --- one budget -----------------------------------------------------------------------


async def test_leases_across_daemons_never_exceed_what_intercom_has_left(redis_server):
    """Steps: Limit 20; one daemon saw an answer saying Remaining 15 (5 spent, by
    someone outside the fleet too). Three daemons then take permits until told to wait.
    Expect: 15 permits in all, however they are spread, and every daemon told to wait."""
    async with (Daemon(redis_server.url) as a, Daemon(redis_server.url) as b,
                Daemon(redis_server.url) as c):
        reset = math.floor(time.time()) + 30
        a.budget.observe(202, RateHeaders(limit=20, remaining=15, reset_at=reset))
        taken = [await a.take_all(), await b.take_all(), await c.take_all()]
        assert sum(taken) == 15, taken
        assert [await d.budget.take() > 0 for d in (a, b, c)] == [True] * 3
        leased = sum(sample(d.registry, "fleet_permits_leased_total") for d in (a, b, c))
        assert leased == 15


async def test_a_busy_daemon_at_intercoms_budget_leases_16_permits_a_round_trip(
        redis_server):
    """Steps: Intercom's shape, 1666 per 10 s; one daemon takes 160 permits back to back.
    Expect: leases grow 1, 2, 4, 8, then 16 (1% of the budget), so 14 round trips, where
    leases capped at 8 would take 23 (bench/fleet.py: 0.21 round trips per forwarded
    event at 20 daemons with 8, 0.11 with 16)."""
    async with Daemon(redis_server.url, requests=1666, per_seconds=10.0) as a:
        for _ in range(160):
            assert await a.budget.take() == 0.0
        assert sample(a.registry, "fleet_redis_round_trips_total", op="lease",
                      result="ok") <= 14


async def test_a_429_holds_every_daemon_of_the_fleet_until_its_reset(redis_server):
    async with Daemon(redis_server.url) as a, Daemon(redis_server.url) as b:
        assert await b.budget.take() == 0.0
        reset = time.time() + 2.0
        a.budget.observe(429, RateHeaders(limit=20, remaining=0, reset_at=reset))

        async def b_is_held() -> bool:
            return await b.budget.take() > 0

        await poll(b_is_held, timeout=1.0)  # a pushed the hold at once, not at its next lease
        wait = await b.budget.take()
        assert 1.0 < wait <= 2.05


async def test_permits_of_a_killed_daemon_come_back_in_the_next_window_not_before(
        redis_server):
    """Steps: windows of 1 s, Limit 10, on Intercom's grid (whole seconds). Daemon A
    leases permits and is killed without using them. Expect: B gets only what A did not
    lease in that window, and the full 10 in the next one."""
    while time.time() % 1.0 > 0.3:  # start early in a window, so the steps fit in it
        await asyncio.sleep(0.01)
    async with Daemon(redis_server.url, requests=10, per_seconds=1.0) as b:
        a = Daemon(redis_server.url, requests=10, per_seconds=1.0)
        reset = math.floor(time.time()) + 1
        a.budget.observe(202, RateHeaders(limit=10, remaining=10, reset_at=reset))
        for _ in range(6):
            assert await a.budget.take() == 0.0
        held = int(sample(a.registry, "fleet_permits_leased_total"))
        assert held >= 6
        await a.redis.close()  # killed: nothing given back, nothing told
        assert await b.take_all() == 10 - held

        async def next_window() -> bool:
            return time.time() >= reset + 0.05

        await poll(next_window, timeout=2.0)
        assert await b.take_all() == 10


async def test_sidecars_sharing_redis_spend_one_budget_without_a_429(redis_server):
    """Steps: a fake Intercom with 30 requests per 1-s window; three sidecars, each
    configured with the whole 30 and 8 senders, one supply of events, for ~3 windows.
    Expect: no 429 at all, no event delivered twice, and at least two windows' budget
    delivered."""
    fake = FakeIntercom(token=TOKEN, budget=30, window_seconds=1.0)
    await fake.start()
    supply = Supply([make_event(n) for n in range(10_000)])
    cars = [Sidecar(fake.url, TOKEN, requests=30, per_seconds=1.0, senders=8, supply=supply,
                    redis_url=redis_server.url, workspace_id="ws1", seed=k) for k in range(3)]
    try:
        for car in cars:
            await car.start()
        await fake.wait_for_delivered(75, timeout=5.0)
    finally:  # all at once: an event cut off at one must not be resent by another
        await asyncio.gather(*(car.stop() for car in cars))
        await fake.stop()
    assert fake.rate_limited == 0
    assert fake.duplicates == 0
    assert sum(sample(c.registry, "fleet_permits_leased_total") for c in cars) >= 75


# --- one dedup window -----------------------------------------------------------------


async def test_a_key_accepted_by_one_daemon_is_a_duplicate_at_another_in_one_round_trip(
        redis_server):
    async with Daemon(redis_server.url) as a, Daemon(redis_server.url) as b:
        assert await a.dedup.add_if_absent_many([key(1)]) == [True]
        assert await b.dedup.add_if_absent_many([key(1), key(2), key(2)]) == [False, True,
                                                                              False]
        assert sample(b.registry, "fleet_redis_round_trips_total", op="dedup",
                      result="ok") == 1
        assert sample(b.registry, "fleet_duplicates_total") == 1


async def test_a_forgotten_key_goes_through_at_any_daemon(redis_server):
    """A dead-lettered event's key is forgotten (synchronously, as the workers do): a
    replay sent to another daemon is not a duplicate."""
    async with Daemon(redis_server.url) as a, Daemon(redis_server.url) as b:
        assert await a.dedup.add_if_absent_many([key(7)]) == [True]
        a.dedup.forget(key(7))

        async def forgotten_fleet_wide() -> bool:
            return not await _exists(redis_server.url, a, 7)

        await poll(forgotten_fleet_wide, timeout=2.0)  # the flush task sent the DEL
        assert await b.dedup.add_if_absent_many([key(7)]) == [True]


async def _exists(url: str, d: Daemon, n: int) -> bool:
    client = redis.asyncio.Redis.from_url(url)
    try:
        return bool(await client.exists(d.redis.key("d").encode() + b":" + key(n)))
    finally:
        await client.aclose()


async def test_every_fleet_key_expires_and_none_names_the_token(redis_server):
    async with Daemon(redis_server.url, window_s=600.0) as a:
        a.budget.observe(202, RateHeaders(limit=20, remaining=20,
                                          reset_at=math.floor(time.time()) + 30))
        await a.budget.take()
        await a.dedup.add_if_absent_many([key(n) for n in range(50)])
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        keys = [k async for k in client.scan_iter(match=b"ifwd:*")]
        assert len(keys) == 51
        for k in keys:
            ttl = await client.ttl(k)
            assert 0 < ttl <= 600, (k, ttl)
            assert TOKEN.encode() not in k
    finally:
        await client.aclose()


# --- Redis down, slow, back -----------------------------------------------------------


async def test_a_frozen_redis_costs_one_call_at_most_the_bound_then_nothing(
        redis_server, captured_logs):
    """Steps: Redis stops answering (SIGSTOP). Expect: the first dedup call comes back
    within the 50 ms bound with the local answers, the next ones do not touch Redis,
    `fleet.redis_unavailable` is logged once; after SIGCONT the daemon recovers by itself
    and logs `fleet.redis_recovered`."""
    async with Daemon(redis_server.url, retry_s=0.2) as a:
        assert await a.dedup.add_if_absent_many([key(1)]) == [True]
        redis_server.freeze()
        started = time.monotonic()
        assert await a.dedup.add_if_absent_many([key(1), key(2)]) == [False, True]
        assert time.monotonic() - started < 0.05 + 0.1  # the bound, plus a loaded machine
        started = time.monotonic()
        for n in range(3, 20):
            assert await a.dedup.add_if_absent_many([key(n)]) == [True]
            assert await a.budget.take() == 0.0  # fail open: a permit
        assert time.monotonic() - started < 0.05
        assert a.budget.fallback_share is not None  # the gate paces locally meanwhile
        assert sample(a.registry, "fleet_redis_up") == 0
        redis_server.thaw()

        fresh = iter(range(100, 10_000))

        async def recovered() -> bool:  # a new key each time, or the local window answers
            await a.dedup.add_if_absent_many([key(next(fresh))])
            return a.redis.up

        await poll(recovered, timeout=3.0)
        assert a.budget.fallback_share is None
    events = [e["event"] for e in captured_logs if e["event"].startswith("fleet.")]
    assert events == ["fleet.redis_unavailable", "fleet.redis_recovered"]
    assert sample(a.registry, "fleet_fallbacks_total") == 1


async def test_redis_down_caps_the_share_for_two_windows_then_the_gate_decides(
        redis_server):
    """Steps: a daemon whose last fleet share was a quarter loses Redis (0.5-s windows).
    Expect: the gate paces on that quarter at once (a safe budget before any evidence),
    and from two windows on on its own share alone (cap 1.0), which learns from
    Intercom's headers: a stale cap kept for the whole outage left a fleet under-using
    the budget (bench/fleet.py --outage 30: 83-92% during the outage, 95% with this)."""
    async with Daemon(redis_server.url, per_seconds=0.5, retry_s=30.0) as a:
        a.budget._last_share = 0.25  # as the last window Redis showed had left it
        redis_server.kill()
        assert await a.dedup.add_if_absent_many([key(1)]) == [True]  # finds Redis down
        went_down = time.monotonic()
        assert not a.redis.up
        assert a.budget.fallback_share == 0.25

        async def uncapped() -> bool:
            return a.budget.fallback_share == 1.0

        await poll(uncapped, timeout=3.0)
        assert time.monotonic() - went_down >= 2 * 0.5


async def test_redis_killed_and_restarted_mid_run_sidecars_keep_sending_and_recover(
        redis_server, captured_logs):
    """Steps: two sidecars share Redis against a fake Intercom (30 per 1-s window); Redis
    is killed (SIGKILL: everything it held is gone), events keep flowing on the local
    fallbacks, then Redis starts again on the same socket. Expect: deliveries never stop,
    each sidecar logs one fleet.redis_unavailable and one fleet.redis_recovered, and
    leases resume against the new, empty Redis."""
    fake = FakeIntercom(token=TOKEN, budget=30, window_seconds=1.0)
    await fake.start()
    supply = Supply([make_event(n) for n in range(10_000)])
    cars = [Sidecar(fake.url, TOKEN, requests=30, per_seconds=1.0, senders=4, supply=supply,
                    redis_url=redis_server.url, workspace_id="ws1", seed=k,
                    redis_retry_s=0.2) for k in range(2)]
    try:
        for car in cars:
            await car.start()
        await fake.wait_for_delivered(20, timeout=5.0)
        redis_server.kill()
        before = len(fake.delivered)
        await fake.wait_for_delivered(before + 20, timeout=5.0)  # on the fallbacks
        assert all(not c.redis.up for c in cars)
        leased_down = [sample(c.registry, "fleet_permits_leased_total") for c in cars]
        redis_server.start()

        async def leasing_again() -> bool:
            return all(c.redis.up and sample(c.registry, "fleet_permits_leased_total") > n
                       for c, n in zip(cars, leased_down))

        await poll(leasing_again, timeout=5.0)
    finally:  # all at once: an event cut off at one must not be resent by another
        await asyncio.gather(*(car.stop() for car in cars))
        await fake.stop()
    events = [e["event"] for e in captured_logs if e["event"].startswith("fleet.")]
    # Once per outage and sidecar: the kill is one outage each; a loaded machine may add a
    # round trip over the 50 ms bound (a second, short one), never a line without its pair.
    unavailable = events.count("fleet.redis_unavailable")
    assert unavailable >= 2 and events.count("fleet.redis_recovered") == unavailable
    assert sum(sample(c.registry, "fleet_fallbacks_total") for c in cars) == unavailable
