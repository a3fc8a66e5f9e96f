"""Lifecycle: builds every stage from one Config, owns every task, and is the only place
that starts or stops anything.

Start: reload the spool into the queue, start the upstream client and the workers, open
the intake, report ready (READY=1 to systemd). Stop, in reverse: refuse new events (503),
drain for up to shutdown.drain_seconds, stop the workers (sends on the wire get a short
grace), write every unsent event to the spool, close connections and listeners.
A signal handler only sets a flag; a second SIGTERM/SIGINT skips the drain.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import structlog

from .clock import Clock, SystemClock
from .config import Config, ConfigError
from .deadletter import DeadLetterFile
from .dedup import DedupWindow
from .intake.http import Intake
from .intake.listen import Listener
from .intake.proxy import EventsProxy
from .intake.routes import Routes
from .metrics import Metrics
from .notify import SystemdNotifier
from .queue import EventQueue
from .ratelimit import RateGate
from .spool import Spool
from .upstream import UpstreamClient
from .workers import Workers

log = structlog.get_logger("forwarder.service")

STOP_GRACE_S = 0.5  # in-flight sends after the drain; Intercom dedups a resend anyway


class Service:
    """The daemon. Use as `async with Service(cfg) as svc:` (tests) or `await svc.run()`."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        notifier: SystemdNotifier | None = None,
        listen_sockets: Sequence[socket.socket] = (),
    ):
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._notifier = notifier
        self._listen_sockets = listen_sockets
        state_dir = Path(config.storage.state_dir)
        self.metrics = Metrics()
        self.queue = EventQueue(config.queue.max_events, self.clock)
        self.dedup = DedupWindow(config.dedup.window_seconds, config.dedup.max_keys, self.clock)
        self.gate = RateGate(config.rate_limit.requests, config.rate_limit.per_seconds, self.clock)
        self.upstream = UpstreamClient(config.intercom, config.intercom.access_token,
                                       pool_size=config.workers.concurrency, clock=self.clock)
        self.spool = Spool(state_dir / "spool.jsonl")
        self.dead_letters = DeadLetterFile(state_dir / "dead-letter.jsonl",
                                           max_bytes=config.storage.dead_letter_max_bytes,
                                           keep_files=config.storage.dead_letter_keep_files,
                                           clock=self.clock)
        self.workers = Workers(queue=self.queue, gate=self.gate, upstream=self.upstream,
                               dead_letters=self.dead_letters, metrics=self.metrics,
                               clock=self.clock, retry=config.retry,
                               concurrency=config.workers.concurrency, rng=self._rng,
                               on_dead_letter=self._forget_key)
        # GET /events: reads share the workers' rate gate and client (ahead of writes).
        self.proxy = EventsProxy(gate=self.gate, upstream=self.upstream, readiness=self,
                                 metrics=self.metrics)
        self.intake = Intake(queue=self.queue, dedup=self.dedup, metrics=self.metrics,
                             clock=self.clock, readiness=self,
                             workspace_id=config.intercom.workspace_id,
                             max_body_bytes=config.intake.max_body_bytes)
        routes = Routes()
        self.intake.add_routes(routes)
        self.proxy.add_routes(routes)
        self.listener = Listener(routes.dispatch, host=config.intake.host,
                                 port=config.intake.port,
                                 max_body_bytes=config.intake.max_body_bytes,
                                 unix_socket=config.intake.unix_socket, sockets=listen_sockets)
        self.metrics.bind_queue(lambda: self.queue.ready, lambda: self.queue.waiting)
        self._accepting = False
        self._started = False
        self._spool_loaded = False  # until then the spool on disk is the only copy
        self._stopped = False
        self._stop_requested = asyncio.Event()
        self._force = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.exit_code = 0

    # -- readiness (read by the intake) -------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self._accepting

    def not_ready_reason(self) -> str | None:
        if not self._started:
            return "starting"
        if not self._accepting:
            return "shutting_down"
        if self.workers.paused:
            return "paused_auth"
        return None

    @property
    def url(self) -> str:
        return self.listener.url

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if not self.config.intercom.access_token:
            raise ConfigError("intercom.access_token",
                              "no Intercom access token: set INTERCOM_ACCESS_TOKEN, "
                              "intercom.access_token_file or intercom.access_token")
        Path(self.config.storage.state_dir).mkdir(parents=True, exist_ok=True)
        self._reload_spool()
        await self.upstream.start()
        self.workers.on_crash = self._on_worker_crash
        await self.workers.start()
        self.spool.remove()  # its events are queued now; the next stop writes a new one
        self._accepting = True
        await self.listener.start()
        self._started = True
        self._tasks.append(asyncio.create_task(self._log_stats(), name="forwarder-stats"))
        if self._notifier is not None:
            self._notifier.ready()
            interval = self._notifier.watchdog_interval_s
            if interval:
                self._tasks.append(asyncio.create_task(self._watchdog(interval),
                                                       name="forwarder-watchdog"))
        log.info("service.started", addresses=self.listener.addresses,
                 upstream=self.config.intercom.effective_base_url,
                 workers=self.config.workers.concurrency)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._accepting = False
        if self._notifier is not None:
            self._notifier.stopping()
        # A start that failed half-way has nothing draining: go straight to the spool.
        # drain_seconds is the whole budget before the spool is written: the grace for
        # sends on the wire comes out of it, so exit stays within drain_seconds + the
        # spool write (~0.08 s per 10,000 events) however the time is spent.
        grace_s = min(STOP_GRACE_S, self.config.shutdown.drain_seconds)
        drain_s = self.config.shutdown.drain_seconds - grace_s
        if self._force.is_set() or not self._started:
            drain_s = grace_s = 0.0
        drained = await self.workers.drain(drain_s, self._force)
        await self.workers.stop(grace_s=grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        left = self.queue.take_all()
        # A start that failed before reloading the spool must not overwrite (or, with
        # nothing queued, delete) the previous run's spool: it holds accepted events.
        written = self.spool.write(left) if self._spool_loaded else 0
        log.info("spool.written" if written else "service.drained", events=written,
                 drained=drained)
        await self.upstream.close()
        await self.listener.close()
        self.dead_letters.close()
        log.info("service.stopped", spooled=written)

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def request_stop(self, force: bool = False) -> None:
        """What a signal does: the first asks for a graceful stop, the second skips the drain."""
        if self._stop_requested.is_set() or force:
            self._force.set()
            log.warning("service.force_stop_requested")
        else:
            log.info("service.stop_requested")
        self._stop_requested.set()

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT (or a worker crash), stop. Returns the exit code."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            await self.stop()
            for sig in signals:
                loop.remove_signal_handler(sig)
        return self.exit_code

    # -- internals ----------------------------------------------------------------------

    def _reload_spool(self) -> None:
        events = self.spool.load()
        self._spool_loaded = True
        if events:
            self.queue.restore(events)
            for event in events:
                if event.key:
                    self.dedup.add(event.key)
            log.info("spool.loaded", events=len(events))
        self.metrics.spool_loaded.set(len(events))

    def _forget_key(self, event) -> None:
        # A dead-lettered event never reached Intercom's store, so replaying it after the
        # contact is fixed must not be taken for a duplicate.
        if event.key:
            self.dedup.forget(event.key)

    def _on_worker_crash(self, exc: BaseException) -> None:
        self.exit_code = 1
        self.request_stop()

    async def _log_stats(self) -> None:
        interval = self.config.log.stats_interval_seconds
        sample = self.metrics.registry.get_sample_value
        while True:
            await self.clock.sleep(interval)
            log.info(
                "queue.stats",
                ready=self.queue.ready,
                waiting=self.queue.waiting,
                in_flight=self.workers.in_flight,
                paused=self.workers.paused,
                dedup_keys=len(self.dedup),
                accepted_total=sample("intercom_forwarder_events_received_total",
                                      {"outcome": "accepted"}) or 0,
                delivered_total=sample("intercom_forwarder_events_forwarded_total",
                                       {"result": "delivered", "reason": ""}) or 0,
            )

    async def _watchdog(self, interval_s: float) -> None:
        assert self._notifier is not None
        while True:
            self._notifier.watchdog()
            await self.clock.sleep(interval_s)

