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
from .diskqueue import QueueUnavailable
from .event import Event, Route
from .logs import LogThrottle
from .metrics import Metrics
from .upstream import Outcome, Verdict

if TYPE_CHECKING:
    from prometheus_client import Counter

log = structlog.get_logger("forwarder.workers")

AUTH_PROBE_INTERVAL_S = 30.0
AUTH_LOG_INTERVAL_S = 60.0
# The dead-letter reason of a summary whose answer never came back before the stop's
# grace: it may or may not have been counted by Intercom (see Workers._settle_cut_off).
UNKNOWN_OUTCOME = "unknown_outcome"


class _State(enum.Enum):
    IDLE = "idle"        # waiting in take() or for the pause to end: safe to cancel at once
    GATED = "gated"      # holding an event, waiting on the rate gate: cancel puts it back
    SENDING = "sending"  # a request is on the wire: given a grace period at stop


class EventSource(Protocol):
    async def take(self) -> Event: ...

    def retry_later(self, event: Event, delay_s: float) -> None: ...

    def requeue_front(self, event: Event) -> None: ...

    def settle(self, event: Event) -> None: ...

    durable: bool

    async def commit(self) -> None: ...

    @property
    def ready(self) -> int: ...

    @property
    def next_due(self) -> float | None: ...

    def __len__(self) -> int: ...


class Gate(Protocol):
    async def acquire(self) -> float: ...

    def release(self, status: int | None, rate: object, retry_after_s: float | None = None
                ) -> None: ...

    def hold_for(self, seconds: float) -> None: ...

    @property
    def held_until(self) -> float | None: ...


class Sender(Protocol):
    async def send(self, event: Event) -> Verdict: ...


class DeadLetterSink(Protocol):
    async def append(self, event: Event, *, reason: str, status: int | None,
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
        self._cut_off: list[Event] = []  # summaries cut off on the wire at stop
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
        """Keep sending until nothing is queued or in flight, or until nothing more can be
        sent before the deadline (the time is spent, forwarding is paused, the rate gate
        holds past the deadline, or only retries due after it are left), or abort is set.
        True when fully drained."""
        deadline = self._clock.monotonic() + seconds
        log.info("service.drain_started", queued=len(self._queue), in_flight=self._in_flight,
                 drain_seconds=seconds)
        while True:
            # A worker waiting on the rate gate holds an event that is in neither the
            # queue nor in flight: drained means no worker holds one either.
            idle = all(s is _State.IDLE for s in self._states)
            if len(self._queue) == 0 and idle:
                return True
            now = self._clock.monotonic()
            if now >= deadline or self.paused or (abort is not None and abort.is_set()):
                return False
            if self._nothing_sendable_before(deadline, idle):
                log.info("service.drain_cut_short", queued=len(self._queue),
                         seconds_left=round(deadline - now, 3))
                return False
            self._changed.clear()
            waits = [self._changed.wait(), self._clock.sleep(min(deadline - now, 0.05))]
            if abort is not None:
                waits.append(abort.wait())
            await _first_of(*waits)

    def _nothing_sendable_before(self, deadline: float, idle: bool) -> bool:
        """True when waiting for the deadline cannot deliver anything more: the rate gate
        holds past it, or no worker holds an event, none is ready and every retry is due
        after it. (Sends on the wire get the stop's grace either way.)"""
        held_until = self._gate.held_until
        if held_until is not None and held_until >= deadline:
            return True
        if not idle or self._queue.ready:
            return False
        next_due = self._queue.next_due
        return next_due is None or next_due >= deadline

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop taking events. Sends on the wire get grace_s to finish; anything else is
        cancelled and its event put back in the queue for the spool, except a summary cut
        off on the wire (see _settle_cut_off). Safe to call again after a cancelled call."""
        self._stopping = True
        if self._probe_task is not None:
            self._probe_task.cancel()
            # Failures of our tasks are logged by _check_crash, their done-callback.
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
        await self._settle_cut_off()

    async def _settle_cut_off(self) -> None:
        """Summaries have no dedup key, so Intercom cannot drop a resend: a summary whose
        answer did not come back before the grace may already be counted, and resending it
        after a restart could count it twice. It is dead-lettered as unknown_outcome
        instead, for the operator to check in Intercom and replay if it never arrived.
        Events (which Intercom dedups by key) go back to the queue and are resent."""
        cut_off, self._cut_off = self._cut_off, []
        for event in cut_off:
            try:
                await self._dead_letters.append(event, reason=UNKNOWN_OUTCOME, status=None,
                                                response_body=b"")
            except OSError as exc:
                # Not recorded: keep it (a resend may double-count) rather than lose it.
                log.error("deadletter.write_failed", reason=UNKNOWN_OUTCOME, error=repr(exc))
                self._queue.requeue_front(event)
                continue
            # In the dead-letter file now: a disk queue deletes its copy, so a restart
            # does not send it again.
            self._queue.settle(event)
            self._metrics.events_forwarded.labels("dead_lettered", UNKNOWN_OUTCOME).inc()
            log.warning("upstream.dead_lettered", reason=UNKNOWN_OUTCOME, status=None,
                        attempts=event.attempts, route=event.route.value)

    def _check_crash(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        # Logged even while stopping: a failure must never vanish with its task.
        log.error("service.worker_crashed", worker=task.get_name(), error=repr(exc),
                  exc_info=exc)
        if self.crashed is None:
            self.crashed = exc
            if self.on_crash is not None and not self._stopping:
                self.on_crash(exc)

    # -- the loop -----------------------------------------------------------------------

    async def _run(self, i: int) -> None:
        while not self._stopping:
            self._states[i] = _State.IDLE
            self._changed.set()  # drain() waits for every worker to be empty-handed
            await self._running.wait()
            event = await self._queue.take()
            self._states[i] = _State.GATED
            if self.paused:  # paused while we were taking: leave it for the probe
                self._queue.requeue_front(event)
                continue
            verdict = await self._send(event, i)
            await self._settle(event, verdict)

    async def _send(self, event: Event, i: int | None = None) -> Verdict:
        """Pass the rate gate and send. If this is cancelled (not sent, or cut off on the
        wire) or fails, the event goes back to the queue before the exception leaves:
        Intercom drops a duplicate event by its composite key, so a resend is harmless.
        A summary cut off on the wire is the exception (see _settle_cut_off)."""
        acquired = sending = False
        try:
            waited = await self._gate.acquire()
            acquired = True
            if waited:
                self._metrics.rate_limit_wait.inc(waited)
            if i is not None:
                self._states[i] = _State.SENDING
            self._in_flight += 1
            sending = True
            try:
                return await self._upstream.send(event)
            finally:
                self._in_flight -= 1
                self._changed.set()
        except BaseException as exc:
            if sending and event.route is Route.SUMMARIES and isinstance(
                    exc, asyncio.CancelledError):
                self._cut_off.append(event)
            else:
                self._queue.requeue_front(event)
            if acquired:  # a cancelled acquire() counts nothing; a cancelled send does
                self._gate.release(None, None)
            raise

    async def _settle(self, event: Event, verdict: Verdict) -> None:
        """Tell the gate, then act on the verdict. A failure in either (a bug) still
        leaves the event where the verdict says, then ends the worker with the error, so
        the service logs it and stops instead of carrying on with a broken gate."""
        try:
            self._gate.release(verdict.status, verdict.rate, verdict.retry_after_s)
        finally:
            await self._act(event, verdict)

    async def _act(self, event: Event, verdict: Verdict) -> None:
        """Put the event where the verdict says. If the bookkeeping around that fails (a
        bug), an event that did not reach its place goes back to the queue. The one await
        is the dead-letter append, and a CancelledError out of it means the line is in the
        file (deadletter.py), so a cancellation never puts the event back."""
        outcome = verdict.outcome
        placed = outcome is Outcome.DELIVERED
        try:
            self._record_request(verdict)
            if outcome is Outcome.DELIVERED:
                # A disk queue deletes the event with its next commit: a restart after
                # that never resends it.
                self._queue.settle(event)
                self._m_delivered.inc()
                if self._queue.durable:
                    await self._await_settled()
            elif outcome is Outcome.RATE_LIMITED:
                self._rate_limited(event, verdict)
            elif outcome is Outcome.RETRY_LATER:
                await self._retry_later(event, verdict)
            elif outcome is Outcome.DEAD_LETTER:
                await self._dead_letter(event, verdict, verdict.reason)
            elif outcome is Outcome.PAUSE_AUTH:
                self._pause(event, verdict)
        except BaseException as exc:
            if not placed and not isinstance(exc, asyncio.CancelledError):
                self._queue.requeue_front(event)
            raise

    async def _await_settled(self) -> None:
        """Wait until the delete is committed before taking the next event, so that at
        a kill -9 each worker has at most one delivered or dead-lettered event still in
        the log (or one on the wire): a restart resends at most `concurrency` of them
        (and a dead-lettered one gets a second line). Without the wait
        a worker against a fast Intercom completes dozens of sends during one commit,
        and all of them were sent again (measured: up to 40 of 50 with 4 workers). A
        failing disk is the intake's and /readyz's to report: the delete stays staged
        and goes with a later commit."""
        try:
            await self._queue.commit()
        except QueueUnavailable:
            pass

    def _record_request(self, verdict: Verdict) -> None:
        series = self._m_requests.get(verdict.status)
        if series is None:
            status = str(verdict.status) if verdict.status is not None else "error"
            series = self._m_requests[verdict.status] = (
                self._metrics.upstream_requests.labels(status))
        series.inc()
        self._metrics.upstream_latency.observe(verdict.latency_s)

    # Each of these puts the event in its place as its last step, so an exception before
    # that (a bug) leaves it in hand for _act to put back.

    def _rate_limited(self, event: Event, verdict: Verdict) -> None:
        """A 429 is Intercom's budget, not the event's fault: the gate (told in release())
        holds everyone until the reset, and the event goes again without an attempt."""
        self._metrics.rate_limited.inc()
        self._queue.requeue_front(event)

    async def _retry_later(self, event: Event, verdict: Verdict) -> None:
        attempts = event.attempts + 1
        if attempts >= self._retry.max_attempts:
            event.attempts = attempts
            await self._dead_letter(event, verdict, "retries_exhausted")
            return
        cap = min(self._retry.max_delay_seconds,
                  self._retry.base_delay_seconds * 2 ** (attempts - 1))
        delay = self._rng.uniform(0, cap)
        if verdict.retry_after_s is not None:
            delay = max(delay, min(verdict.retry_after_s, self._retry.max_delay_seconds))
        self._metrics.events_forwarded.labels("retried", verdict.reason).inc()
        log.debug("upstream.retry_scheduled", attempt=attempts, delay_s=round(delay, 3),
                  status=verdict.status, reason=verdict.reason)
        event.attempts = attempts
        self._queue.retry_later(event, delay)

    async def _dead_letter(self, event: Event, verdict: Verdict, reason: str) -> None:
        """The line first, then the delete, committed before the worker takes the next
        event (as a delivered one's). That order loses nothing: a kill -9 between the two
        leaves the event in the log, so the restart sends it again and writes a second
        line (at most one per worker: each waits for its delete). The other order loses
        the event outright if the kill comes after the delete and before the line."""
        if verdict.outcome is Outcome.DEAD_LETTER:
            event.attempts += 1
        try:
            await self._dead_letters.append(event, reason=reason, status=verdict.status,
                                            response_body=verdict.body)
        except asyncio.CancelledError:  # cancelled, but the line is in the file
            self._dead_lettered(event, verdict, reason)
            raise
        except OSError as exc:
            # The disk refused the line (full, or permissions): the event must not vanish.
            # It waits as a retry; if the daemon stops first, the spool keeps it.
            self._dead_log.error(log, "deadletter.write_failed", reason=reason,
                                 error=repr(exc))
            self._queue.retry_later(event, self._retry.max_delay_seconds)
            return
        self._dead_lettered(event, verdict, reason)
        if self._queue.durable:
            await self._await_settled()

    def _dead_lettered(self, event: Event, verdict: Verdict, reason: str) -> None:
        try:  # the event is in the file now: a failure below must not put it back
            self._queue.settle(event)
            self._metrics.events_forwarded.labels("dead_lettered", reason).inc()
            if self._on_dead_letter is not None:
                self._on_dead_letter(event)
            self._dead_log.warning(log, "upstream.dead_lettered", reason=reason,
                                   status=verdict.status, attempts=event.attempts)
        except Exception:
            log.exception("workers.bookkeeping_failed", after="dead_lettered", reason=reason)

    # -- auth pause ---------------------------------------------------------------------

    def _pause(self, event: Event, verdict: Verdict) -> None:
        """Intercom refused the token: keep every event, stop sending, probe every 30 s."""
        first = not self.paused
        self._auth_log.error(log, "upstream.auth_paused", status=verdict.status,
                             reason=verdict.reason, probe_every_s=self._probe_interval_s)
        if first:
            self._running.clear()
            self._changed.set()
            self._metrics.paused.set(1)
            if self._probe_task is None and not self._stopping:
                self._probe_task = asyncio.create_task(self._probe(),
                                                       name="forwarder-auth-probe")
                self._probe_task.add_done_callback(self._check_crash)
        if first and self._paused_event is None:
            self._paused_event = event  # the probe's event
        else:
            self._queue.requeue_front(event)

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
                try:
                    verdict = await self._send(event)
                    if verdict.outcome is not Outcome.PAUSE_AUTH:
                        self._resume()
                        await self._settle(event, verdict)
                        return
                    try:
                        self._gate.release(verdict.status, verdict.rate, verdict.retry_after_s)
                    finally:
                        self._paused_event = event  # still refused: keep it for the next probe
                finally:
                    self._probe_event = None
                self._record_request(verdict)
                self._auth_log.error(log, "upstream.auth_paused", status=verdict.status,
                                     reason=verdict.reason,
                                     probe_every_s=self._probe_interval_s)
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
