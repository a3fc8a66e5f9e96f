"""One Intercom budget for the fleet, kept in Redis: every daemon of the app leases
permits (one request each) a few at a time from a single count per window, so that the
fleet's requests in flight never exceed what Intercom has left. It is RateGate's
FleetPart (forwarder/ratelimit/gate.py); the header and local parts still apply.

The state is one Redis hash per app ({namespace}:budget) changed only by LEASE_LUA, one
script run with EVALSHA (redis-py's register_script loads it once, and again after a
Redis restart flushed it), so each lease is atomic and one round trip:

- Windows are Intercom's: their ends are the X-RateLimit-Reset values daemons report
  (kept in the hash as `ends`), and they roll over on Redis's TIME, the one clock every
  daemon sees, never on a daemon's own. Before any daemon has seen a Reset, a provisional
  window of per_seconds from Redis's TIME stands in until the first report replaces it.
- `count` is the fleet's spend in the window: permits leased, raised to Limit - Remaining
  whenever an answer reported it (another client of the app, or state lost in a Redis
  restart). A lease gets min(want, limit - count).
- Leases die with their window: count starts at 0 in the next one, and the daemon drops
  permits it has not used at the window's end. A daemon killed holding permits costs the
  fleet those permits until that window ends, never longer.
- A 429 with a Reset ahead sets `hold` until that Reset: no daemon leases before it.
- A lease granted less than it asked for (or nothing) means the window is spent: the
  daemon uses what it got, then asks again REFILL_DELAY_S (+ a jitter) after the window's
  end, not before: no round trip to learn that nothing is left. The delay also covers
  Intercom's clock being a little behind Redis's; beyond that, each daemon's header part
  still confirms a new window with one request before its burst (ratelimit/headers.py).
- The hash expires one window after its window ends, so a fleet that is gone leaves
  nothing behind.

What a daemon reports rides on its next lease (the newest Reset it saw, with the highest
Limit - Remaining for it), so reporting costs no round trip of its own; a 429 is pushed at
once by a small task (start()/stop()), because the others must hold now, not at this
daemon's next lease.

Redis down or slower than the bound (fleet_redis.py): take() fails open (0.0, a permit),
and fallback_share is the share of the fleet's spend this daemon had in the last window
it saw, which the gate paces with locally (ratelimit/share.py) until Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import TYPE_CHECKING

import structlog

from .fleet_redis import UNAVAILABLE, FleetRedis, as_int

if TYPE_CHECKING:
    from forwarder.clock import Clock
    from forwarder.upstream import RateHeaders

    from .fleet_metrics import FleetMetrics

log = structlog.get_logger("forwarder.fleet")

TOO_MANY_REQUESTS = 429
MAX_LEASE = 8  # permits per lease: <= 0.125 round trips per request when busy, and few lost
LEASE_FRACTION = 100  # ... or 1/100 of the window's budget when that is more (lease_cap)
BUSY_S = 0.25  # a lease used up within this is doubled next time (up to the cap)
REFILL_DELAY_S = 0.02  # after a spent window's end, before asking again (clock skew)
REFILL_JITTER_S = 0.005  # spread N daemons' leases at a window's start a little

# KEYS[1] the budget hash. ARGV: want, window_s, limit_hint, reported Reset (0: none),
# reported Limit - Remaining (-1: none), reported Limit (0: none), hold until (epoch, 0:
# none). Returns {granted, wait_ms, ends_in_ms, ends_ms, count, limit, prev_ends_ms,
# prev_count}: prev_* is the window before this one and its final count.
LEASE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local key = KEYS[1]
local want, T = tonumber(ARGV[1]), tonumber(ARGV[2])
local r_reset, r_used, r_limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local hold_req = tonumber(ARGV[7])

local s = redis.call('HMGET', key, 'ends', 'count', 'limit', 'hold', 'grid', 'prev_ends',
                     'prev_count')
local ends = tonumber(s[1])
local count = tonumber(s[2]) or 0
local limit = tonumber(s[3]) or tonumber(ARGV[3])
local hold = tonumber(s[4]) or 0
local grid = tonumber(s[5]) or 0
local prev_ends, prev_count = tonumber(s[6]) or 0, tonumber(s[7]) or 0
if r_limit > 0 then limit = r_limit end

-- Roll over on Redis's clock, on the grid (fixed windows of T).
if ends and now >= ends then
  local periods = math.floor((now - ends) / T) + 1
  if periods == 1 then prev_ends, prev_count = ends, count else prev_ends, prev_count = 0, 0 end
  ends, count = ends + periods * T, 0
end
-- What an answer said. A Reset still ahead that is later than ours (or the first one)
-- sets the grid: a later window (Intercom's clock ahead of Redis's) starts from what it
-- reports; a provisional one keeps its leases, which Intercom counts in this window. The
-- same Reset raises the count to Limit - Remaining.
if r_reset > now and r_reset <= now + T and (not ends or grid == 0 or r_reset > ends) then
  if grid == 1 then prev_ends, prev_count, count = 0, 0, 0 end
  ends, grid = r_reset, 1
  count = math.max(count, r_used)
elseif ends and r_reset == ends then
  count = math.max(count, r_used)
end
if not ends then  -- nobody has seen a Reset yet: a provisional window on Redis's clock
  ends, count = now + T, 0
end
if hold_req > now then hold = math.max(hold, math.min(hold_req, now + T)) end

local granted, wait = 0, 0
if now < hold then
  wait = hold - now
else
  granted = math.max(0, math.min(want, limit - count))
  if granted < want then wait = ends - now end  -- the window is spent
end
count = count + granted
redis.call('HSET', key, 'ends', ends, 'count', count, 'limit', limit, 'hold', hold,
           'grid', grid, 'prev_ends', prev_ends, 'prev_count', prev_count)
redis.call('PEXPIREAT', key, math.floor((ends + T) * 1000))
return {granted, math.floor(wait * 1000), math.floor((ends - now) * 1000),
        math.floor(ends * 1000), count, limit, math.floor(prev_ends * 1000), prev_count}
"""


def lease_cap(requests: int) -> int:
    """The most permits one lease asks for. At Intercom's 1666 per 10 s, 20 daemons with
    leases of 8 cost 0.21 round trips per forwarded event (bench/fleet.py); 16 halves the
    floor. A dead daemon strands at most one lease, 1% of a window, and small budgets
    (200 per 2 s: 20 daemons share 10 a window each) keep leases of 8."""
    return max(MAX_LEASE, requests // LEASE_FRACTION)


FALLBACK_CAP_WINDOWS = 2  # Redis down: windows paced on the last fleet share


class FleetBudget:
    """This daemon's permits from the fleet's budget; take() never raises and never waits
    on Redis longer than its bound."""

    def __init__(self, redis: FleetRedis, *, requests: int, per_seconds: float, clock: Clock,
                 metrics: FleetMetrics, rng: random.Random | None = None,
                 max_lease: int | None = None):
        self._redis = redis
        self._key = redis.key("budget")
        self._script = redis.client.register_script(LEASE_LUA)
        self._requests = requests
        self._per_seconds = per_seconds
        self._clock = clock
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._max_lease = max_lease if max_lease is not None else lease_cap(requests)
        # the next lease's size: doubles while leases run out fast, halves when permits
        # expire unused, and is kept across windows (a busy daemon stays busy)
        self._want = 1
        self._leased_at = -float("inf")
        self._permits = 0
        self._permits_until = -float("inf")  # monotonic end of the window they belong to
        self._wait_until = -float("inf")
        self._lock = asyncio.Lock()
        self._takers = 0  # waiting for the lease in flight
        # reported on the next lease: the newest Reset seen, with its highest spend
        self._seen_reset = 0.0
        self._seen_used = -1
        self._seen_limit = 0
        self._hold_at = 0.0  # a 429's Reset still to push to the fleet
        self._push = asyncio.Event()
        self._pusher: asyncio.Task[None] | None = None
        # this daemon's part of the fleet's spend, per window (by its end, epoch ms)
        self._window_ms = 0
        self._own = 0
        self._last_share: float | None = None

    def __repr__(self) -> str:
        return f"FleetBudget(permits={self._permits}, share={self._last_share}, {self._redis!r})"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._pusher is None:
            self._pusher = asyncio.create_task(self._push_holds(), name="fleet-hold-pusher")

    async def stop(self) -> None:
        pusher, self._pusher = self._pusher, None
        if pusher is not None:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pusher

    # -- FleetPart -----------------------------------------------------------------------

    @property
    def fallback_share(self) -> float | None:
        """None while Redis serves; else a cap on the share the gate paces with (1.0: no
        cap, the gate's own evidence decides). The last fleet share caps it for the first
        FALLBACK_CAP_WINDOWS windows of an outage, so every daemon lands on a safe budget
        at once; after that the gate's own share, which learns from Intercom's headers
        window by window, decides alone. Kept for a whole outage, a stale cap left a fleet
        whose last shares summed below 1 under-using the budget (79% in a 30 s outage,
        bench/fleet.py --outage 30)."""
        if self._redis.up:
            return None
        if self._last_share is None or \
                self._redis.down_for_s > FALLBACK_CAP_WINDOWS * self._per_seconds:
            return 1.0
        return self._last_share

    @property
    def share(self) -> float | None:
        """This daemon's share of the fleet's spend in the last window it saw end."""
        return self._last_share

    async def take(self) -> float:
        """0.0: a permit is this daemon's (or Redis is unavailable: fail open); > 0: wait
        that long (the window is spent, or the fleet holds) and ask again.
        Cancellation-safe: a permit is only counted taken when take() returns 0.0."""
        while True:
            delay = self._take_local()
            if delay is not None:
                return delay
            if self._lock.locked():  # a lease is in flight: its permits may be ours
                self._takers += 1
                try:
                    async with self._lock:
                        pass
                finally:
                    self._takers -= 1
                continue
            async with self._lock:
                want = min(self._max_lease, max(self._want, self._takers + 1))
                if not await self._lease(want, "lease"):
                    return 0.0  # Redis unavailable: fail open, the gate paces locally

    def give_back(self) -> None:
        if self._clock.monotonic() < self._permits_until:
            self._permits += 1

    def observe(self, status: int | None, rate: RateHeaders | None) -> None:
        """Note what an answer said, for the next lease; push a 429's hold now."""
        if rate is None or rate.reset_at is None:
            return
        if rate.limit:
            self._seen_limit = rate.limit
        if rate.remaining is not None and rate.limit:
            used = rate.limit - rate.remaining
            if rate.reset_at > self._seen_reset:
                self._seen_reset, self._seen_used = rate.reset_at, used
            elif rate.reset_at == self._seen_reset:
                self._seen_used = max(self._seen_used, used)
        if status == TOO_MANY_REQUESTS and rate.reset_at > self._hold_at:
            self._hold_at = rate.reset_at
            self._push.set()

    # -- internals -----------------------------------------------------------------------

    def _take_local(self) -> float | None:
        now = self._clock.monotonic()
        if self._permits > 0:
            if now < self._permits_until:
                self._permits -= 1
                return 0.0
            # The window they were for is over: they died with it, and leases this size
            # are more than this daemon uses in a window.
            self._permits = 0
            self._want = max(1, self._want // 2)
        if now < self._wait_until:
            return self._wait_until - now
        return None

    async def _lease(self, want: int, op: str) -> bool:
        """One round trip: report what was seen, maybe push a hold, lease `want` permits.
        False when Redis is unavailable."""
        hold_at = self._hold_at
        args = [want, self._per_seconds, self._seen_limit or self._requests,
                self._seen_reset, self._seen_used, self._seen_limit, hold_at]
        result = await self._redis.call(op, lambda: self._script(keys=[self._key], args=args))
        if result is UNAVAILABLE:
            return False
        if self._hold_at == hold_at:
            self._hold_at = 0.0  # pushed (a later 429 meanwhile is pushed next time)
        (granted, wait_ms, ends_in_ms, ends_ms, _count, _limit, prev_ends_ms,
         prev_count) = (as_int(v) for v in result)
        now = self._clock.monotonic()
        self._account(ends_ms, granted, prev_ends_ms, prev_count)
        if granted:
            if now - self._leased_at < BUSY_S and granted == want:  # used up fast: busy
                self._want = min(self._max_lease, self._want * 2)
            self._permits += granted
            self._permits_until = now + ends_in_ms / 1000
            self._leased_at = now
            self._metrics.permits_leased.inc(granted)
        if wait_ms:  # spent (or held): these permits are the last until then
            refill = REFILL_DELAY_S if granted < want and wait_ms >= ends_in_ms else 0.0
            self._wait_until = (now + wait_ms / 1000 + refill
                                + self._rng.uniform(0, REFILL_JITTER_S))
        return True

    def _account(self, ends_ms: int, granted: int, prev_ends_ms: int, prev_count: int) -> None:
        """This daemon's leases per window; when one ends, its share of the fleet's final
        count there is what a fallback paces with."""
        if ends_ms != self._window_ms:
            if self._own and prev_ends_ms == self._window_ms and prev_count >= self._own:
                self._last_share = self._own / prev_count
                self._metrics.share.set(self._last_share)
            self._window_ms, self._own = ends_ms, 0
        self._own += granted

    async def _push_holds(self) -> None:
        """Push each 429's hold to the fleet at once (the owner cancels this in stop())."""
        while True:
            await self._push.wait()
            self._push.clear()
            if self._hold_at:
                async with self._lock:
                    await self._lease(0, "hold")
