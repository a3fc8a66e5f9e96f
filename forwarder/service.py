"""Lifecycle: builds every stage from one Config, owns every task, and is the only place
that starts or stops anything.

Start: reload the spool into the queue, start the upstream client and the workers, open
the intake, report ready (READY=1 to systemd). Stop, in reverse: close the intake (the
queue refuses offers, so a request still reading its body gets 503; then the listeners
close), drain for up to shutdown.drain_seconds, stop the workers (sends on the wire get a
short grace), write every unsent event to the spool (what a full disk refuses is logged
with its count), close connections. stop() is idempotent and cancel-safe.
A signal handler only sets a flag; a second SIGTERM/SIGINT skips the drain.
SIGHUP reloads: the token and log.level are read again (reload()), nothing stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self

import structlog

from .clock import Clock, SystemClock
from .config import Config, ConfigError, IntercomConfig, reread_token
from .deadletter import DeadLetterFile
from .dedup import DedupWindow
from .dedupfile import read_keys, write_keys
from .diskqueue import DiskQueue
from .fleet_metrics import FleetMetrics
from .intake.http import Intake
from .intake.listen import Listener
from .intake.proxy import EventsProxy
from .intake.routes import Routes
from .logs import LogThrottle, set_log_level
from .metrics import Metrics
from .notify import SystemdNotifier
from .preflight import NO_TOKEN
from .queue import EventQueue
from .ratelimit import RateGate
from .spool import Spool, SpoolWriteError
from .statedir import StateDirLock
from .upstream import UpstreamClient
from .workers import Workers

if TYPE_CHECKING:
    from .fleet import Fleet

log = structlog.get_logger("forwarder.service")

# In-flight sends after the drain. An event cut off after this is resent after the restart
# (Intercom dedups it by key); a summary is dead-lettered instead (workers.py says why).
STOP_GRACE_S = 0.5


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
        reload_config: Callable[[], Config] | None = None,
    ):
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._notifier = notifier
        self._listen_sockets = listen_sockets
        # What SIGHUP reads again (the CLI: the config file and the environment); without
        # it, reload() reads the token again from where start-up found it.
        self._reload_config = reload_config
        self._reload_log = LogThrottle(self.clock, 60.0)  # the probe's failed re-reads
        state_dir = Path(config.storage.state_dir)
        self._state_lock = StateDirLock(state_dir)  # one daemon per state dir (issue 12 B9)
        self.metrics = Metrics()
        qc = config.queue
        self.queue: EventQueue | DiskQueue
        if qc.type == "disk":
            # Every accepted event is committed here before its 202 (issue 13); the log
            # keeps the dedup keys for the window, so they survive a restart too.
            self.queue = DiskQueue(state_dir / "queue.db", self.clock, disk_sync=qc.disk_sync,
                                   max_bytes=qc.max_disk_bytes,
                                   key_window_s=config.dedup.window_seconds,
                                   on_commit=self.metrics.observe_commit)
            self.metrics.bind_disk(lambda: self.queue.bytes_on_disk,
                                   lambda: self.queue.events_on_disk)
        else:
            self.queue = EventQueue(qc.max_events, self.clock)
        self._dedup_file = state_dir / "dedup.keys"  # memory mode's window across a restart
        self._queue_started = False
        self._fleet_started = False
        self.dedup = DedupWindow(config.dedup.window_seconds, config.dedup.max_keys, self.clock)
        # The share gauge always; the Redis series with a Redis only (fleet_metrics.py).
        with_redis = bool(config.fleet.redis_url) and bool(config.intercom.access_token)
        self.fleet_metrics = FleetMetrics(self.metrics.registry, redis=with_redis)
        self.fleet: Fleet | None = None
        if with_redis:
            # Imported here: redis-py adds ~6 MB of resident memory to a daemon that
            # never talks to Redis (ru_maxrss after `import forwarder.service`: 43 MB
            # without it, 49 MB with it).
            from .fleet import Fleet
            self.fleet = Fleet.build(config, self.dedup, clock=self.clock, rng=self._rng,
                                     metrics=self.fleet_metrics)
        self.gate = RateGate(config.rate_limit.requests, config.rate_limit.per_seconds, self.clock,
                             fleet=self.fleet.budget if self.fleet else None, rng=self._rng)
        if self.fleet is None:
            share = self.gate.share
            self.fleet_metrics.share.set_function(lambda: share.share)
        # What the intake dedups with, and where a dead letter's key is forgotten.
        self.key_window = self.fleet.dedup if self.fleet else self.dedup
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
                               on_dead_letter=self._forget_key,
                               refresh_token=self._refresh_token)
        # GET /events: reads share the workers' rate gate and client (ahead of writes).
        self.proxy = EventsProxy(gate=self.gate, upstream=self.upstream, readiness=self,
                                 metrics=self.metrics)
        self.intake = Intake(queue=self.queue, dedup=self.key_window, metrics=self.metrics,
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
        self.metrics.bind_held(lambda: len(self.queue) + self.workers.holding)
        self._accepting = False
        self._started = False
        self._spool_loaded = False  # until then the spool on disk is the only copy
        self._stop_task: asyncio.Task[None] | None = None
        self._spooled = False
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
        if self.queue.unavailable_reason is not None:
            # The last commit failed (a full or failing disk): requests get 503 until one
            # succeeds, so a load balancer should send them elsewhere meanwhile.
            return "disk_unavailable"
        if self.workers.paused:
            return "paused_auth"
        return None

    @property
    def url(self) -> str:
        return self.listener.url

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        # First: before the spool is read or a socket bound, so a second daemon on this
        # state dir leaves the first's files alone (raises StateDirBusy).
        self._state_lock.acquire()
        if not self.config.intercom.access_token:
            raise ConfigError("intercom.access_token", NO_TOKEN)
        Path(self.config.storage.state_dir).mkdir(parents=True, exist_ok=True)
        if isinstance(self.queue, DiskQueue):
            await self.queue.start()
            self._queue_started = True
            if self.queue.damage is not None:  # disklog.py logged what it moved aside
                self.metrics.queue_damaged_logs.inc()
            await self._restore_spool_into_disk_queue()
        else:
            self._reload_dedup_file()  # oldest keys first (DedupWindow.add_aged_many)
            self._reload_spool()
            db = Path(self.config.storage.state_dir) / "queue.db"
            if db.exists():
                # A disk-mode run's log may hold accepted events that this mode never
                # reads: say so, rather than leave them unmentioned until disk mode is back.
                log.warning("queue.disk_log_ignored", path=str(db), queue_type="memory")
        await self.upstream.start()
        if self.fleet is not None:
            await self.fleet.start()  # before the workers, which take its permits
            self._fleet_started = True
        self.workers.on_crash = self._on_worker_crash
        await self.workers.start()
        if isinstance(self.queue, DiskQueue):
            # After the workers start, so a large backlog is being sent while a full
            # window loads (1e6 keys: ~2.5 s, the SQLite read and add_aged_many); before
            # the intake opens, so no retry arrives before its key is back.
            await self._reload_keys_from_disk_queue()
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
        """Stop everything; idempotent and cancel-safe. The stop runs in a task of its own:
        cancelling a caller does not cancel the stop half-way (which would leave accepted
        events unspooled and workers running), and every caller waits for the same one."""
        task = self._stop_task
        if task is None or (task.done() and task.cancelled()):
            task = self._stop_task = asyncio.create_task(self._stop(), name="forwarder-stop")
        await asyncio.shield(task)

    async def _stop(self) -> None:
        if not self._state_lock.held:
            return  # never started, or the start lost the lock: the files are another's
        try:
            await self._stop_in_order()
        finally:
            self._state_lock.release()  # last: the spool is written, the socket removed

    async def _stop_in_order(self) -> None:
        # 1. The intake first: the queue refuses every offer, so a request still reading its
        #    body (or a new one on an open keep-alive connection) gets 503, never a 202
        #    after the queue is taken for the spool; then no new connections are taken.
        #    Open connections are closed after the spool is written (step 4).
        self._accepting = False
        self.queue.close()
        if self._notifier is not None:
            self._notifier.stopping()
        # A step that fails must not keep the later ones (the spool above all) from running.
        await self._stop_step("intake.stop_listening", self.listener.stop_listening)
        # 2. Drain, then stop the workers. drain_seconds is the whole budget before the
        #    spool is written: the grace for sends on the wire comes out of it, so exit
        #    stays within drain_seconds + the spool write (~0.08 s per 10,000 events).
        #    A start that failed half-way has nothing draining (and logs no drain).
        grace_s = min(STOP_GRACE_S, self.config.shutdown.drain_seconds)
        drain_s = self.config.shutdown.drain_seconds - grace_s
        drained = False
        if self._force.is_set() or not self._started:
            drain_s = grace_s = 0.0
        if self._started:
            drained = await self.workers.drain(drain_s, self._force)
        await self.workers.stop(grace_s=grace_s)
        if self._queue_started:
            # Settles, retry times and forgotten keys still staged go in one last commit.
            try:
                await self.queue.stop()
            except Exception as exc:
                log.error("service.stop_step_failed", step="queue.stop", error=repr(exc))
        if self.fleet is not None and self._fleet_started:
            # After the workers: the drain's dead letters queued fleet-wide forgets,
            # which the fleet's stop flushes (bounded by the Redis timeout).
            await self._stop_step("fleet.stop", self.fleet.stop)
        for task in self._tasks:
            task.cancel()
        await _reap(self._tasks)
        self._tasks.clear()
        if self.workers.crashed is not None:
            self.exit_code = 1
        # 3. Every unsent event to the spool. A start that failed before reloading the
        #    spool must not overwrite (or, with nothing queued, delete) the previous run's
        #    spool: it holds accepted events.
        written = 0
        if self._spool_loaded and not self._spooled:
            written = self._write_spool()
            self._write_dedup_file()
            self._spooled = True  # a repeated stop must not replace it with an empty one
        # 4. Connections and files last.
        await self._stop_step("intake.close", self.listener.close)
        try:
            await self.upstream.close()
        finally:
            await self.dead_letters.close()
        if self._started:
            log.info("spool.written" if written else "service.drained", events=written,
                     drained=drained)
            log.info("service.stopped", spooled=written)
        elif written:
            log.info("spool.written", events=written, drained=False)

    async def _stop_step(self, name: str, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except Exception as exc:
            log.error("service.stop_step_failed", step=name, error=repr(exc))

    def _write_spool(self) -> int:
        left = self.queue.take_all()
        try:
            return self.spool.write(left)
        except SpoolWriteError as exc:
            # Nothing answered 202 may vanish quietly: the loss is logged with its count.
            log.error("spool.write_failed", path=str(self.spool.path), written=exc.written,
                      lost=exc.lost, reason=exc.reason)
            self.exit_code = 1
            return exc.written

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
        loop.add_signal_handler(signal.SIGHUP, self.reload)  # its default would kill us
        signals += (signal.SIGHUP,)
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            await self.stop()
            for sig in signals:
                loop.remove_signal_handler(sig)
        return self.exit_code

    # -- reload (SIGHUP) and token rotation ----------------------------------------------

    def reload(self) -> None:
        """What SIGHUP does: read the token and log.level again and use them; other settings
        that changed are named in the log and need a restart. A reload that fails keeps
        everything as it was. While paused on 401/403, probe at once with the new token."""
        try:
            fresh = self._reload_config() if self._reload_config is not None else None
            intercom = (fresh.intercom if fresh is not None
                        else reread_token(self.config.intercom))
            if not intercom.access_token:
                raise ConfigError("intercom.access_token", "no Intercom access token now; "
                                                           "keeping the one in use")
        except (ConfigError, OSError) as exc:
            log.error("service.reload_failed", trigger="sighup", error=str(exc))
            return
        level = fresh.log.level if fresh is not None else self.config.log.level
        changed = [name for name, differs in (
            ("token", intercom.access_token != self.config.intercom.access_token),
            ("log.level", level != self.config.log.level)) if differs]
        not_applied = _restart_needed(self.config, fresh) if fresh is not None else []
        self._use_token(intercom)
        # Logged before a new level applies, so that even "error" confirms the reload.
        log.info("service.reloaded", trigger="sighup", changed=changed,
                 token_source=intercom.access_token_source, not_applied=not_applied)
        if "log.level" in changed:
            self.config = dataclasses.replace(
                self.config, log=dataclasses.replace(self.config.log, level=level))
            set_log_level(level)
        self.workers.probe_now()  # paused: try the (new) token now, not in up to 30 s

    def _refresh_token(self) -> None:
        """Before each auth probe: read the token file again, so that a secret manager or
        a Kubernetes Secret that rewrites it heals a paused daemon with no signal at all.
        A small file read on the loop, once per probe interval and only while paused."""
        try:
            intercom = reread_token(self.config.intercom)
        except (ConfigError, OSError) as exc:
            self._reload_log.error(log, "service.reload_failed", trigger="auth_probe",
                                   error=str(exc))
            return
        if intercom.access_token and intercom.access_token != self.config.intercom.access_token:
            self._use_token(intercom)
            log.info("service.reloaded", trigger="auth_probe", changed=["token"],
                     token_source=intercom.access_token_source, not_applied=[])

    def _use_token(self, intercom: IntercomConfig) -> None:
        ic = dataclasses.replace(self.config.intercom, access_token=intercom.access_token,
                                 access_token_file=intercom.access_token_file,
                                 access_token_source=intercom.access_token_source)
        self.config = dataclasses.replace(self.config, intercom=ic)
        self.upstream.set_token(ic.access_token)

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
        # contact is fixed must not be taken for a duplicate (nor after a restart: the
        # disk queue's copy of the key goes too).
        if event.key:
            self.key_window.forget(event.key)  # with a fleet: fleet-wide
            self.queue.forget_key(event)

    async def _restore_spool_into_disk_queue(self) -> None:
        """Disk mode writes no spool, but one left by an earlier memory-mode run holds
        accepted events: commit them to the log, and only then remove the spool (a failed
        commit raises and keeps it for the next start)."""
        events = self.spool.load()
        if events:
            self.queue.restore(events)
            await self.queue.commit()
            log.info("spool.loaded", events=len(events), into="disk_queue")
        self.spool.remove()
        self._spool_loaded = True  # the stop may replace it now (disk mode: removes it)
        self.metrics.spool_loaded.set(len(events))
        # A memory-mode run's window is in the log from now on only if we add it there;
        # its keys are simply reloaded into memory.
        self._reload_dedup_file()

    async def _reload_keys_from_disk_queue(self) -> None:
        """The dedup window as it was at the kill: the log keeps every accepted key with
        its wall-clock time, so a client's retry after a restart is still a duplicate."""
        assert isinstance(self.queue, DiskQueue)
        window = self.config.dedup.window_seconds
        now = self.clock.wall()
        count = 0
        async for chunk in self.queue.load_keys(since_wall=now - window):
            self.dedup.add_aged_many(chunk, now)  # in arrival order: oldest first
            count += len(chunk)
        if count:
            log.info("dedup.loaded", keys=count, source="disk_queue")

    def _reload_dedup_file(self) -> None:
        """Memory mode's window, written at the last clean stop (dedupfile.py)."""
        now = self.clock.wall()
        pairs = read_keys(self._dedup_file)
        self.dedup.add_aged_many(pairs, now)  # the file is oldest first (items())
        if pairs:
            log.info("dedup.loaded", keys=len(pairs), source=str(self._dedup_file))
        # Its keys are in memory now; the next stop writes the window again. Left behind,
        # a later run after a kill -9 would reload keys whose events that run never saw.
        self._dedup_file.unlink(missing_ok=True)

    def _write_dedup_file(self) -> None:
        if self._queue_started:
            return  # disk mode: the keys are in the log already
        try:
            written = write_keys(self._dedup_file, self.dedup.items(), self.clock.wall())
        except OSError as exc:
            # Only dedup is lost: retries after the restart are forwarded once more.
            log.error("dedup.write_failed", path=str(self._dedup_file), error=repr(exc))
            return
        log.info("dedup.written", keys=written)

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


async def _reap(tasks: list[asyncio.Task[None]]) -> None:
    """Await cancelled or finished tasks; log any that failed instead of discarding it."""
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, result in zip(tasks, results):
        if isinstance(result, Exception):
            log.error("service.task_failed", task=task.get_name(), error=repr(result),
                      exc_info=result)


def _restart_needed(old: Config, new: Config) -> list[str]:
    """The keys whose new value a reload does not apply (everything but the token and
    log.level), as `section.key`."""
    keep = {"access_token", "access_token_file", "access_token_source"}
    names = []
    for section in dataclasses.fields(Config):
        before, after = getattr(old, section.name), getattr(new, section.name)
        for key in dataclasses.fields(before):
            if (section.name, key.name) == ("log", "level") or (
                    section.name == "intercom" and key.name in keep):
                continue
            if getattr(before, key.name) != getattr(after, key.name):
                names.append(f"{section.name}.{key.name}")
    return names
