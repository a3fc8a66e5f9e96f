"""A fixed pool of workers: take an event, pass the rate gate, send it, act on the verdict.

Workers never read a status code; upstream.classify() decides and they switch on
verdict.outcome. Every event taken from the queue ends in exactly one place: delivered,
back in the queue (retry later, 429, auth pause, cancelled), or the dead-letter file.

Retries use exponential backoff with full jitter (a uniform draw up to
min(max_delay, base * 2**(attempt-1))) and wait in the queue's delay heap, never in a
sleeping worker, so one slow event does not hold a worker.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import structlog

from .clock import Clock
from .config import RetryConfig
from .event import Event
from .logs import LogThrottle
from .metrics import Metrics
from .upstream import Outcome, Verdict

if TYPE_CHECKING:
    from prometheus_client import Counter

log = structlog.get_logger("forwarder.workers")

AUTH_PROBE_INTERVAL_S = 30.0
AUTH_LOG_INTERVAL_S = 60.0


class _State(enum.Enum):
    IDLE = "idle"        # waiting in take() or for the pause to end: safe to cancel at once
    GATED = "gated"      # holding an event, waiting on the rate gate: cancel puts it back
    SENDING = "sending"  # a request is on the wire: given a grace period at stop


class EventSource(Protocol):
    async def take(self) -> Event: ...

    def retry_later(self, event: Event, delay_s: float) -> None: ...

    def requeue_front(self, event: Event) -> None: ...

    def __len__(self) -> int: ...


class Gate(Protocol):
    async def acquire(self) -> float: ...

    def release(self, status: int | None, rate: object, retry_after_s: float | None = None
                ) -> None: ...

    def hold_for(self, seconds: float) -> None: ...


class Sender(Protocol):
    async def send(self, event: Event) -> Verdict: ...


class DeadLetterSink(Protocol):
    def append(self, event: Event, *, reason: str, status: int | None,
               response_body: bytes) -> None: ...


class Workers:
    """Owns `concurrency` worker tasks and the auth-probe task; start() and stop() only."""

    def __init__(
        self,
        *,
        queue: EventSource,
        gate: Gate,
        upstream: Sender,
        dead_letters: DeadLetterSink,
        metrics: Metrics,
        clock: Clock,
        retry: RetryConfig,
        concurrency: int,
        rng: random.Random | None = None,
        on_dead_letter: Callable[[Event], None] | None = None,
        probe_interval_s: float = AUTH_PROBE_INTERVAL_S,
        refresh_token: Callable[[], None] | None = None,
    ):
        self._queue = queue
        self._gate = gate
        self._upstream = upstream
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._clock = clock
        self._retry = retry
        self._concurrency = concurrency
        self._rng = rng or random.Random()
        self._on_dead_letter = on_dead_letter
        self._probe_interval_s = probe_interval_s
        self._tasks: list[asyncio.Task[None]] = []
        self._states: list[_State] = []
        self._probe_task: asyncio.Task[None] | None = None
        self._running = asyncio.Event()  # cleared while paused
        self._running.set()
        self._changed = asyncio.Event()  # set whenever in_flight or pause changes
        self._in_flight = 0
        self._stopping = False
        self._paused_event: Event | None = None  # the event that found the token refused
        self._probe_event: Event | None = None  # the probe's event, at the gate or on the wire
        self._refresh_token = refresh_token  # called before each probe: a rewritten token file
        self._probe_wake = asyncio.Event()  # probe_now(): probe without waiting the interval
        self._auth_log = LogThrottle(clock, AUTH_LOG_INTERVAL_S)
        self._dead_log = LogThrottle(clock, 10.0)
        fwd = metrics.events_forwarded
        self._m_delivered = fwd.labels("delivered", "")
        self._m_requests: dict[int | None, Counter] = {}  # status -> its series, found once
        self.crashed: BaseException | None = None
        self.on_crash: Callable[[BaseException], None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        for i in range(self._concurrency):
            self._states.append(_State.IDLE)
            task = asyncio.create_task(self._run(i), name=f"forwarder-worker-{i}")
            task.add_done_callback(self._check_crash)
            self._tasks.append(task)

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def holding(self) -> int:
        """Events taken from the queue and not yet settled: at the rate gate, on the wire,
        and the auth pause's event (kept for the probe, or being probed). With len(queue)
        that is every accepted event not yet delivered or dead-lettered. A worker's state
        is not IDLE exactly while it has an event in hand."""
        in_hand = sum(1 for state in self._states if state is not _State.IDLE)
        return in_hand + (self._paused_event is not None) + (self._probe_event is not None)

    def probe_now(self) -> None:
        """While paused, probe at once instead of at the end of the interval (a reload put
        a new token in place). Does nothing while forwarding runs."""
        if self.paused:
            self._probe_wake.set()

    async def drain(self, seconds: float, abort: asyncio.Event | None = None) -> bool:
        """Keep sending until nothing is queued or in flight, the time is spent, forwarding is
        paused (nothing could drain), or abort is set. True when fully drained."""
        deadline = self._clock.monotonic() + seconds
        log.info("service.drain_started", queued=len(self._queue), in_flight=self._in_flight,
                 drain_seconds=seconds)
        while True:
            # A worker waiting on the rate gate holds an event that is in neither the
            # queue nor in flight: drained means no worker holds one either.
            if len(self._queue) == 0 and all(s is _State.IDLE for s in self._states):
                return True
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0 or self.paused or (abort is not None and abort.is_set()):
                return False
            self._changed.clear()
            waiters = [asyncio.ensure_future(self._changed.wait()),
                       asyncio.ensure_future(self._clock.sleep(min(remaining, 0.05)))]
            if abort is not None:
                waiters.append(asyncio.ensure_future(abort.wait()))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop taking events. Sends on the wire get grace_s to finish; anything else is
        cancelled and its event put back in the queue for the spool."""
        self._stopping = True
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
            self._probe_task = None
        for task, state in zip(self._tasks, self._states):
            if state is not _State.SENDING:
                task.cancel()
        sending = [t for t, s in zip(self._tasks, self._states) if s is _State.SENDING]
        if sending and grace_s > 0:
            await asyncio.wait(sending, timeout=grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._paused_event is not None:
            self._queue.requeue_front(self._paused_event)
            self._paused_event = None

    def _check_crash(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if exc is not None:
            self.crashed = exc
            log.error("service.worker_crashed", worker=task.get_name(), error=repr(exc))
            if self.on_crash is not None:
                self.on_crash(exc)

    # -- the loop -----------------------------------------------------------------------

    async def _run(self, i: int) -> None:
        while not self._stopping:
            self._states[i] = _State.IDLE
            self._changed.set()  # drain() waits for every worker to be empty-handed
            await self._running.wait()
            event = await self._queue.take()
            acquired = False
            try:
                self._states[i] = _State.GATED
                if self.paused:  # paused while we were taking: leave it for the probe
                    self._queue.requeue_front(event)
                    continue
                waited = await self._gate.acquire()
                acquired = True
                if waited:
                    self._metrics.rate_limit_wait.inc(waited)
                self._states[i] = _State.SENDING
                self._in_flight += 1
                try:
                    verdict = await self._upstream.send(event)
                finally:
                    self._in_flight -= 1
                    self._changed.set()
            except BaseException:
                # Cancelled (not sent, or cut off mid-flight) or a bug: the event goes back for
                # the spool before the task ends. Intercom drops a duplicate by its composite
                # key, so a resend after restart is harmless.
                self._queue.requeue_front(event)
                if acquired:  # a cancelled acquire() counts nothing; a cancelled send does
                    self._gate.release(None, None)
                raise
            self._gate.release(verdict.status, verdict.rate, verdict.retry_after_s)
            self._act(event, verdict)

    def _act(self, event: Event, verdict: Verdict) -> None:
        self._record_request(verdict)
        outcome = verdict.outcome
        if outcome is Outcome.DELIVERED:
            self._m_delivered.inc()
        elif outcome is Outcome.RATE_LIMITED:
            self._rate_limited(event, verdict)
        elif outcome is Outcome.RETRY_LATER:
            self._retry_later(event, verdict)
        elif outcome is Outcome.DEAD_LETTER:
            self._dead_letter(event, verdict, verdict.reason)
        elif outcome is Outcome.PAUSE_AUTH:
            self._pause(event, verdict)

    def _record_request(self, verdict: Verdict) -> None:
        series = self._m_requests.get(verdict.status)
        if series is None:
            status = str(verdict.status) if verdict.status is not None else "error"
            series = self._m_requests[verdict.status] = (
                self._metrics.upstream_requests.labels(status))
        series.inc()
        self._metrics.upstream_latency.observe(verdict.latency_s)

    def _rate_limited(self, event: Event, verdict: Verdict) -> None:
        """A 429 is Intercom's budget, not the event's fault: the gate (told in release())
        holds everyone until the reset, and the event goes again without an attempt."""
        self._metrics.rate_limited.inc()
        self._queue.requeue_front(event)

    def _retry_later(self, event: Event, verdict: Verdict) -> None:
        event.attempts += 1
        if event.attempts >= self._retry.max_attempts:
            self._dead_letter(event, verdict, "retries_exhausted")
            return
        cap = min(self._retry.max_delay_seconds,
                  self._retry.base_delay_seconds * 2 ** (event.attempts - 1))
        delay = self._rng.uniform(0, cap)
        if verdict.retry_after_s is not None:
            delay = max(delay, min(verdict.retry_after_s, self._retry.max_delay_seconds))
        self._queue.retry_later(event, delay)
        self._metrics.events_forwarded.labels("retried", verdict.reason).inc()
        log.debug("upstream.retry_scheduled", attempt=event.attempts, delay_s=round(delay, 3),
                  status=verdict.status, reason=verdict.reason)

    def _dead_letter(self, event: Event, verdict: Verdict, reason: str) -> None:
        if verdict.outcome is Outcome.DEAD_LETTER:
            event.attempts += 1
        try:
            self._dead_letters.append(event, reason=reason, status=verdict.status,
                                      response_body=verdict.body)
        except OSError as exc:
            # The disk refused the line (full, or permissions): the event must not vanish.
            # It waits as a retry; if the daemon stops first, the spool keeps it.
            self._dead_log.error(log, "deadletter.write_failed", reason=reason,
                                 error=repr(exc))
            self._queue.retry_later(event, self._retry.max_delay_seconds)
            return
        self._metrics.events_forwarded.labels("dead_lettered", reason).inc()
        if self._on_dead_letter is not None:
            self._on_dead_letter(event)
        self._dead_log.warning(log, "upstream.dead_lettered", reason=reason,
                               status=verdict.status, attempts=event.attempts)

    # -- auth pause ---------------------------------------------------------------------

    def _pause(self, event: Event, verdict: Verdict) -> None:
        """Intercom refused the token: keep every event, stop sending, probe every 30 s."""
        if self._paused_event is None and not self.paused:
            self._paused_event = event
        else:
            self._queue.requeue_front(event)
        self._auth_log.error(log, "upstream.auth_paused", status=verdict.status,
                             reason=verdict.reason, probe_every_s=self._probe_interval_s)
        if self.paused:
            return
        self._running.clear()
        self._changed.set()
        self._metrics.paused.set(1)
        if self._probe_task is None and not self._stopping:
            self._probe_task = asyncio.create_task(self._probe(), name="forwarder-auth-probe")
            self._probe_task.add_done_callback(self._check_crash)

    async def _probe(self) -> None:
        try:
            while not self._stopping:
                await self._wait_for_probe()
                if self._refresh_token is not None:
                    self._refresh_token()  # a secret manager may have rewritten the file
                event = self._paused_event
                if event is None:
                    return
                self._paused_event = None
                self._probe_event = event
                acquired = False
                try:
                    waited = await self._gate.acquire()
                    acquired = True
                    if waited:
                        self._metrics.rate_limit_wait.inc(waited)
                    self._in_flight += 1
                    try:
                        verdict = await self._upstream.send(event)
                    finally:
                        self._in_flight -= 1
                except BaseException:  # cancelled, or a bug: the event must not vanish
                    self._probe_event = None
                    self._queue.requeue_front(event)
                    if acquired:
                        self._gate.release(None, None)
                    raise
                self._probe_event = None  # settled below, with no await in between
                self._gate.release(verdict.status, verdict.rate, verdict.retry_after_s)
                if verdict.outcome is Outcome.PAUSE_AUTH:
                    self._record_request(verdict)
                    self._paused_event = event
                    self._auth_log.error(log, "upstream.auth_paused", status=verdict.status,
                                         reason=verdict.reason,
                                         probe_every_s=self._probe_interval_s)
                    continue
                self._resume()
                self._act(event, verdict)
                return
        finally:
            if self._probe_task is asyncio.current_task():
                self._probe_task = None

    async def _wait_for_probe(self) -> None:
        """The probe interval, cut short by probe_now()."""
        if not self._probe_wake.is_set():
            await _first_of(self._clock.sleep(self._probe_interval_s), self._probe_wake.wait())
        self._probe_wake.clear()

    def _resume(self) -> None:
        log.info("upstream.auth_resumed")
        self._probe_wake.clear()  # a probe_now() during the last probe is spent
        self._metrics.paused.set(0)
        self._running.set()
        self._changed.set()


async def _first_of(*waits: Awaitable[object]) -> None:
    """Wait until the first of `waits` finishes; cancel and reap the rest (on cancel too)."""
    waiters = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
