"""The fleet's Redis: one asyncio client (redis-py), the app's namespace, and every round
trip bounded and counted, with one up/down state that the budget and the dedup share.

Failing open. Redis is an optimisation of a fleet, never a dependency of one daemon: a
round trip that fails or takes longer than timeout_s (50 ms by default) is abandoned, the
caller gets UNAVAILABLE and runs on its local fallback (local dedup, the last fleet share
of the budget), and for retry_s nothing waits on Redis at all. Then one caller tries
again; the first success ends the fallback. Down and back are logged once each
(`fleet.redis_unavailable`, `fleet.redis_recovered`) and counted. Failing closed instead
would stop every sidecar taking events whenever Redis blinks, for a gain (cross-sidecar
dedup, exact budget sharing) that the fallbacks mostly keep.

The bound is asyncio.wait's timeout on the loop's clock, not the injected Clock: it bounds
real socket I/O, which a FakeClock cannot drive. redis-py's own retries are off (the
fallback is the retry), and its socket timeouts are set to the same bound.

Namespace: "ifwd:{workspace_id}:{digest}", the digest a keyed blake2b of the access token:
daemons of one app share it, other apps and workspaces on the same Redis do not, and the
token itself never reaches Redis (nor a key name in a log or a MONITOR).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import structlog
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

if TYPE_CHECKING:
    from forwarder.clock import Clock
    from forwarder.config import Secret

    from .fleet_metrics import FleetMetrics

log = structlog.get_logger("forwarder.fleet")

TIMEOUT_S = 0.05  # the most anything waits on Redis (issue 14: "a small bound")
RETRY_S = 1.0  # while down, how often one caller tries Redis again

T = TypeVar("T")


class _Unavailable:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE: Final = _Unavailable()


def fleet_namespace(workspace_id: str, token: Secret) -> str:
    """The app's key prefix: the workspace in clear (operators find the keys), the token
    only as a 64-bit keyed digest (enough to keep apps apart, useless to recover it)."""
    digest = hashlib.blake2b(token.reveal().encode(), digest_size=8,
                             key=b"intercom-forwarder fleet").hexdigest()
    return f"ifwd:{workspace_id}:{digest}"


def connect(url: str, timeout_s: float = TIMEOUT_S) -> Redis:
    """A client for redis://host:port/db, rediss://... or unix:///path/redis.sock. No I/O
    happens here: the pool connects on the first command."""
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def probe_once(url: str, timeout_s: float = 1.0) -> str | None:
    """For check-config: None if Redis answers PING within timeout_s, else why not (the
    error's type and message; redis-py keeps the password out of them). Synchronous: the
    CLI has no event loop, and this is one round trip."""
    client = SyncRedis.from_url(url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        return _describe(exc)
    finally:
        client.close()
    return None


class FleetRedis:
    """One client, bounded calls, one up/down state; call() never raises for Redis trouble."""

    def __init__(self, client: Redis, namespace: str, clock: Clock, metrics: FleetMetrics,
                 *, timeout_s: float = TIMEOUT_S, retry_s: float = RETRY_S):
        self.client = client
        self.namespace = namespace
        self._clock = clock
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._down_since: float | None = None  # monotonic
        self._in_flight: set[asyncio.Future[Any]] = set()  # round trips, owned here
        self._retry_at = -float("inf")

    def __repr__(self) -> str:
        return f"FleetRedis(namespace={self.namespace!r}, up={self.up})"

    @property
    def up(self) -> bool:
        return self._down_since is None

    @property
    def down_for_s(self) -> float:
        """Seconds since Redis went unavailable; 0.0 while it serves."""
        if self._down_since is None:
            return 0.0
        return self._clock.monotonic() - self._down_since

    def key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T | _Unavailable:
        """Run one round trip (fn) within the bound. UNAVAILABLE when Redis is down (then
        nothing is sent until the retry time), fails, or is slower than the bound."""
        if self._down_since is not None and self._clock.monotonic() < self._retry_at:
            self._metrics.redis_round_trips.labels(op, "skipped").inc()
            return UNAVAILABLE
        if self._down_since is not None:
            self._retry_at = self._clock.monotonic() + self._retry_s  # one caller probes
        started = self._clock.monotonic()
        # The round trip runs in a task of its own that the caller only waits for: redis-py
        # nests its own timeouts, and a cancellation of the caller that lands as one of
        # them expires came out as an error, so a worker cancelled by stop() ran on.
        # Waiting with asyncio.wait, the caller's cancellation always reaches the caller.
        child = asyncio.ensure_future(fn())
        self._in_flight.add(child)
        child.add_done_callback(self._reap)
        try:
            await asyncio.wait((child,), timeout=self._timeout_s)
        except asyncio.CancelledError:
            child.cancel()
            raise
        if not child.done():
            child.cancel()  # reaped by _reap, or awaited in close()
            self._failed(op, "timeout", TimeoutError(f"no answer in {self._timeout_s} s"))
            return UNAVAILABLE
        exc = child.exception()
        if isinstance(exc, (TimeoutError, RedisTimeoutError)):  # redis-py's socket timeout
            self._failed(op, "timeout", exc)
            return UNAVAILABLE
        if isinstance(exc, (RedisError, OSError)):
            self._failed(op, "error", exc)
            return UNAVAILABLE
        if exc is not None:
            raise exc  # a bug, not Redis trouble
        result = child.result()
        self._metrics.redis_latency.labels(op).observe(self._clock.monotonic() - started)
        self._metrics.redis_round_trips.labels(op, "ok").inc()
        if self._down_since is not None:
            log.info("fleet.redis_recovered",
                     down_s=round(self._clock.monotonic() - self._down_since, 3))
            self._down_since = None
            self._metrics.redis_up.set(1)
        return result

    def _reap(self, child: asyncio.Future[Any]) -> None:
        self._in_flight.discard(child)
        if not child.cancelled():
            child.exception()  # retrieved: a late failure is no "never retrieved" warning

    def _failed(self, op: str, result: str, exc: BaseException) -> None:
        self._metrics.redis_round_trips.labels(op, result).inc()
        if self._down_since is not None:
            return  # already down: logged and counted once
        now = self._clock.monotonic()
        self._down_since = now
        self._retry_at = now + self._retry_s
        self._metrics.fallbacks.inc()
        self._metrics.redis_up.set(0)
        log.warning("fleet.redis_unavailable", op=op, result=result, error=_describe(exc),
                    retry_every_s=self._retry_s)

    async def close(self) -> None:
        for child in list(self._in_flight):
            child.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        try:
            await self.client.aclose()
        except (TimeoutError, RedisError, OSError) as exc:
            # A connection that does not close within the bound (a loaded host, a hung
            # Redis) is dropped anyway; the stop must go on.
            log.info("fleet.redis_close_failed", error=_describe(exc))


def _describe(exc: BaseException) -> str:
    """The error's type and message, cut short: redis-py's messages name the socket path
    or host, never a password (from_url keeps it out of errors), but keep them bounded."""
    text = f"{type(exc).__name__}: {exc}"
    return text[:200]


def as_int(value: Any) -> int:
    return int(value) if value is not None else 0
