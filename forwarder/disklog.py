"""The SQLite file behind the durable queue (issue 13): one connection, one writer thread.

Owns `queue.db` (with its -wal and -shm) and guarantees:

- No SQLite call runs on the event loop's thread. start() starts one writer thread; it
  opens the only connection and runs every request the loop hands it through a queue,
  and the loop awaits asyncio futures the thread resolves. A slow fsync, or a lock that
  another process holds on the file, delays those futures and nothing else.
- Group commit: every write request waiting when the writer starts a transaction goes
  into it; one COMMIT makes them all durable, then all their futures resolve.
- Durability, as SQLite documents it (sqlite.org/wal.html,
  sqlite.org/pragma.html#pragma_synchronous): WAL mode. disk_sync="normal" runs
  synchronous=NORMAL: a committed transaction survives the process's death (kill -9, an
  OOM kill), since "transactions are durable across application crashes regardless of
  the synchronous setting"; a power loss may roll back the last commits but never
  corrupts the file. "full" runs synchronous=FULL: the WAL is fsynced at every commit,
  so a commit also survives a power loss or a kernel crash.
- Bounded files. We checkpoint ourselves (wal_autocheckpoint=0). Once the WAL reaches
  checkpoint_bytes, a checkpointer thread with a connection of its own runs a PASSIVE
  checkpoint alongside the writer, as sqlite.org/wal.html suggests ("run checkpoints
  ... in a separate thread"): on the writer's path, copying 4 MB and fsyncing the file
  took single-event p99 from ~6 ms to ~17 ms (bench/disk_queue.py). Commits that land
  during a background checkpoint keep the WAL from restarting, so at 4x checkpoint_bytes
  the writer checkpoints itself, which its commits cannot race: the WAL stays bounded.
  When idle the writer runs TRUNCATE; journal_size_limit=0 cuts a reused WAL file back
  to what it holds. That second connection only ever checkpoints; every read and write
  is the writer's. auto_vacuum is
  INCREMENTAL: pages freed by deletes are reused by later inserts, and
  incremental_vacuum gives them back to the file system when idle, so the file shrinks
  as the backlog is delivered.
- A damaged file never stops a start (a crash loop is what Fluent Bit and Vector users
  hit): a file SQLite cannot open, one that fails PRAGMA quick_check, or one from a newer
  schema version is moved aside as queue.db.corrupt-<UTC time> (with its -wal/-shm)
  after what still reads is copied into a fresh file (disksalvage.py); `damage` and the
  `disklog.damaged` line say how much.

The tables and the statements run on them are in disksql.py, the salvage of a damaged
file in disksalvage.py; what is left (~500 lines) is the thread and what it alone does.

The writer's idle wait (idle_s) is a real-time queue timeout: the thread cannot await
the injected clock's sleep. Tests run maintenance with maintain() instead of waiting.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from forwarder import disksql as sql
from forwarder.clock import Clock
from forwarder.disksalvage import Damage, check_file, move_aside, salvage
from forwarder.files import fsync_dir
from forwarder.logs import LogThrottle

log = structlog.get_logger("forwarder.disklog")

SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}
HOUSEKEEPING_INTERVAL_S = 60.0  # key expiry and vacuum under load that never goes idle
VACUUM_MIN_BYTES = 8 << 20  # free pages worth giving back (below, they are reused soon)
VACUUM_PAGES_PER_PASS = 8192  # 32 MiB a pass: bounds how long one pass holds the writer
WAL_CAP_FACTOR = 4  # the writer checkpoints itself at this many checkpoint_bytes of WAL


class DiskLogError(Exception):
    """The log could not carry out a request. `reason` is short and stable: an SQLite
    error name (SQLITE_FULL, SQLITE_IOERR, SQLITE_BUSY...), "closed" or "writer_crashed"."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LogState:
    """What start() found: counts, never the events themselves."""

    fresh: int  # events never retried (due_at 0), all ready
    retries: int  # events with a retry time, due or not
    next_due: float | None  # wall time of the earliest retry
    max_id: int  # of events and dedup keys: the next id must be above both
    damage: Damage | None


@dataclass(frozen=True, slots=True)
class CommitStats:
    events: int  # rows inserted by the transaction
    writes: int  # write requests it held (group commit)
    latency_s: float  # from the oldest request's submission to durable


_STOP = object()


class _Request:
    __slots__ = ("kind", "args", "future", "at")

    def __init__(self, kind: str, args: Any, future: asyncio.Future[Any], at: float):
        self.kind, self.args, self.future, self.at = kind, args, future, at


class DiskLog:
    """Owns queue.db and its writer thread: every SQLite call runs on that thread."""

    def __init__(self, path: Path, clock: Clock, *, disk_sync: str = "normal",
                 checkpoint_bytes: int = 4 << 20, idle_s: float = 1.0,
                 key_window_s: float | None = None, busy_timeout_s: float = 10.0,
                 on_commit: Callable[[CommitStats], None] | None = None):
        if disk_sync not in SYNC_MODES:
            raise ValueError(f"disk_sync must be one of {sorted(SYNC_MODES)}")
        self.path = Path(path)
        self.disk_sync = disk_sync
        self.on_commit = on_commit  # called on the loop's thread after each commit
        self._clock = clock
        self._checkpoint_bytes = checkpoint_bytes
        self._idle_s = idle_s
        self._key_window_s = key_window_s
        self._busy_timeout_s = busy_timeout_s
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._refusal: str | None = None  # set on the loop's thread: closed, writer_crashed
        self._failures = LogThrottle(clock, 10.0)
        # Written by the writer thread, read anywhere (a plain attribute store).
        self.rows = 0  # events in the file
        self.used_bytes = 0  # live pages + WAL: what max_bytes is checked against
        self.file_bytes = 0  # page_count * page_size + WAL: the files on disk
        self.commits = 0
        self.events_committed = 0
        self._checkpoints = [0, 0]  # by the writer, by the checkpointer (one writer each)
        self._checkpoint_requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._checkpointing = False  # set by the writer, cleared by the checkpointer
        self._wal_asked_at = 0  # WAL size at the last request to the checkpointer
        self._checkpoint_lock = threading.Lock()  # one checkpoint at a time
        self.damage: Damage | None = None
        self._page_size = 4096
        self.synchronous = ""  # as SQLite reports it once open: "normal" or "full"
        self._free_pages = 0
        self._wal_bytes = 0
        self._dirty = False  # written since the last idle checkpoint
        self._next_housekeeping = 0.0

    # -- lifecycle (loop thread) ----------------------------------------------------------

    async def start(self) -> LogState:
        """Start the writer thread, open (or salvage) the file and count what it holds."""
        if self._thread is not None:
            raise RuntimeError("DiskLog.start() called twice")
        loop = self._loop = asyncio.get_running_loop()
        opened: asyncio.Future[LogState] = loop.create_future()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(opened,),
                                        name="forwarder-disklog", daemon=True)
        self._thread.start()
        return await asyncio.shield(opened)

    async def close(self) -> None:
        """Finish every request already submitted, checkpoint, close the file, end the
        thread. Requests submitted afterwards fail with DiskLogError("closed")."""
        if self._thread is None or self._stopped is None:
            return
        if self._refusal is None:
            self._refusal = "closed"
            self._requests.put(_STOP)
        await asyncio.shield(self._stopped)

    # -- requests (loop thread) -------------------------------------------------------------

    def write(self, batch: sql.WriteBatch) -> asyncio.Future[CommitStats]:
        """Make batch durable; resolves once committed (with the commit's stats), or fails
        with DiskLogError (nothing of the batch was written)."""
        return self._submit("write", batch)

    def read(self, *, fresh_after: int, fresh_upto: int, fresh_limit: int,
             due_after: tuple[float, int], now_wall: float, due_limit: int
             ) -> asyncio.Future[sql.ReadResult]:
        """Rows to take: never-retried ones with fresh_after < id <= fresh_upto, and
        retries due by now_wall after the (due_at, id) cursor due_after."""
        return self._submit("read", (fresh_after, fresh_upto, fresh_limit, due_after,
                                     now_wall, due_limit))

    def maintain(self) -> asyncio.Future[None]:
        """Run the idle work now: expire dedup keys, vacuum, checkpoint (TRUNCATE)."""
        return self._submit("maintain", None)

    async def load_keys(self, since_wall: float, chunk: int = 10_000
                        ) -> AsyncIterator[list[tuple[bytes, float]]]:
        """Dedup keys added at or after since_wall, as (key, added_at) lists of at most
        chunk, in arrival order, so a window of 1e6 keys never sits in memory twice."""
        after = 0
        while True:
            rows = await self._submit("keys", (after, since_wall, chunk))
            if rows:
                yield [(key, added_at) for _, key, added_at in rows]
            if len(rows) < chunk:
                return
            after = rows[-1][0]

    def _submit(self, kind: str, args: Any) -> asyncio.Future[Any]:
        if self._loop is None:
            raise RuntimeError("DiskLog.start() was not called")
        future = self._loop.create_future()
        if self._refusal is not None:
            future.set_exception(DiskLogError(self._refusal))
        else:
            self._requests.put(_Request(kind, args, future, self._clock.monotonic()))
        return future

    def _deliver(self, results: list[tuple[asyncio.Future[Any], Any]],
                 stats: CommitStats | None) -> None:
        for future, value in results:
            _settle(future, value)
        if stats is not None and self.on_commit is not None:
            self.on_commit(stats)

    def _writer_crashed(self) -> None:
        # On the loop's thread, as _submit is: no request can slip in after this drain.
        self._refusal = "writer_crashed"
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            if request is not _STOP and not request.future.done():
                request.future.set_exception(DiskLogError("writer_crashed"))

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    # -- the writer thread ------------------------------------------------------------------

    def _run(self, opened: asyncio.Future[LogState]) -> None:
        conn: sqlite3.Connection | None = None
        checkpointer: threading.Thread | None = None
        try:
            try:
                conn, state = self._open()
            except BaseException as exc:
                log.error("disklog.open_failed", path=str(self.path), error=repr(exc))
                self._to_loop(_settle, opened, DiskLogError("open_failed", repr(exc)))
                self._to_loop(self._writer_crashed)
                return
            checkpointer = threading.Thread(target=self._run_checkpointer,
                                            name="forwarder-disklog-checkpoint", daemon=True)
            checkpointer.start()
            self._to_loop(_settle, opened, state)
            self._serve(conn)
        except BaseException as exc:  # a bug: fail every waiter instead of leaving it hanging
            log.error("disklog.writer_crashed", error=repr(exc), exc_info=exc)
            self._to_loop(self._writer_crashed)
        finally:
            if checkpointer is not None:
                self._checkpoint_requests.put(_STOP)
                checkpointer.join()
            if conn is not None:
                self._close_connection(conn)
            assert self._stopped is not None
            self._to_loop(_settle, self._stopped, None)

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            try:
                group = [self._requests.get(timeout=self._idle_s)]
            except queue.Empty:
                self._idle(conn)
                continue
            while True:  # everything already waiting joins this round
                try:
                    group.append(self._requests.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in group
            writes = [r for r in group if r is not _STOP and r.kind == "write"]
            others = [r for r in group if r is not _STOP and r.kind != "write"]
            results: list[tuple[asyncio.Future[Any], Any]] = []
            stats = None
            try:
                if writes:
                    stats = self._commit(conn, writes, results)
                for request in others:
                    results.append((request.future, self._call(conn, request)))
            except BaseException:  # a bug: the requests in hand must not wait forever
                crashed = DiskLogError("writer_crashed")
                self._to_loop(self._deliver, [(r.future, crashed) for r in writes + others],
                              None)
                raise
            self._to_loop(self._deliver, results, stats)
            if writes:  # after delivering: a checkpoint must not delay those futures
                self._after_commit(conn)
            if stop:
                return

    def _commit(self, conn: sqlite3.Connection, writes: list[_Request],
                results: list[tuple[asyncio.Future[Any], Any]]) -> CommitStats | None:
        started = min(r.at for r in writes)
        inserted = deleted = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for request in writes:
                    added, removed = sql.apply(conn, request.args)
                    inserted += added
                    deleted += removed
                # Read inside the transaction, which holds the locks already: after the
                # COMMIT these reads cost ~70 us a commit, a third of a small commit's.
                pages = conn.execute(sql.PAGES).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            reason = _reason(exc)
            self._failures.error(log, "disklog.commit_failed", reason=reason, error=str(exc),
                                 writes=len(writes))
            results.extend((r.future, DiskLogError(reason, str(exc))) for r in writes)
            return None
        self.rows += inserted - deleted
        self.commits += 1
        self.events_committed += inserted
        self._dirty = True
        self._measure(conn, pages)
        stats = CommitStats(events=inserted, writes=len(writes),
                            latency_s=self._clock.monotonic() - started)
        results.extend((r.future, stats) for r in writes)
        return stats

    def _call(self, conn: sqlite3.Connection, request: _Request) -> Any:
        try:
            if request.kind == "read":
                return sql.read(conn, *request.args)
            if request.kind == "keys":
                return conn.execute(sql.KEYS, request.args).fetchall()
            self._housekeeping(conn, force=True)
            self._checkpoint(conn, "TRUNCATE")
            return None
        except (sqlite3.Error, OSError) as exc:
            reason = _reason(exc)
            self._failures.error(log, "disklog.read_failed", reason=reason, error=str(exc),
                                 request=request.kind)
            return DiskLogError(reason, str(exc))

    def _after_commit(self, conn: sqlite3.Connection) -> None:
        try:
            if self._wal_bytes >= WAL_CAP_FACTOR * self._checkpoint_bytes:
                self._checkpoint(conn, "PASSIVE")  # see the module docstring
            elif not self._checkpointing:
                if self._wal_bytes < self._wal_asked_at:  # the WAL restarted from its start
                    self._wal_asked_at = 0
                # By growth since the last request: the file keeps its size after a
                # background checkpoint until the WAL restarts.
                if self._wal_bytes - self._wal_asked_at >= self._checkpoint_bytes:
                    self._wal_asked_at = self._wal_bytes
                    self._checkpointing = True
                    self._checkpoint_requests.put(None)
            self._housekeeping(conn, force=False)
        except (sqlite3.Error, OSError) as exc:
            self._failures.error(log, "disklog.maintenance_failed", reason=_reason(exc),
                                 error=str(exc))

    def _idle(self, conn: sqlite3.Connection) -> None:
        try:
            self._housekeeping(conn, force=False)
            if self._dirty:
                self._vacuum(conn)
                self._checkpoint(conn, "TRUNCATE")
                self._dirty = False
        except (sqlite3.Error, OSError) as exc:
            self._failures.error(log, "disklog.maintenance_failed", reason=_reason(exc),
                                 error=str(exc))

    def _housekeeping(self, conn: sqlite3.Connection, force: bool) -> None:
        """Expire old dedup keys and give free pages back, at most once an interval."""
        now = self._clock.monotonic()
        if not force and now < self._next_housekeeping:
            return
        self._next_housekeeping = now + HOUSEKEEPING_INTERVAL_S
        if self._key_window_s is not None:
            first_kept = conn.execute(sql.FIRST_KEPT, (self._clock.wall() - self._key_window_s,
                                                    )).fetchone()
            before = first_kept[0] if first_kept else 2**63 - 1
            expired = 0
            for _ in range(10):  # at most 100,000 keys a pass, 10,000 per transaction
                removed = conn.execute(sql.EXPIRE_KEYS, (before,)).rowcount
                expired += removed
                if removed < 10000:
                    break
            if expired:
                self._dirty = True
                log.debug("disklog.keys_expired", keys=expired)
        self._vacuum(conn)

    def _vacuum(self, conn: sqlite3.Connection) -> None:
        if self._free_pages * self._page_size < VACUUM_MIN_BYTES:
            return
        pages = min(self._free_pages, VACUUM_PAGES_PER_PASS)
        # Each step of this pragma frees one page, and execute() steps a statement that
        # returns no columns only once: executescript() steps it to the end.
        conn.executescript(f"PRAGMA incremental_vacuum({pages});")
        self._dirty = True
        self._measure(conn)
        log.debug("disklog.vacuumed", pages=pages, free_pages_left=self._free_pages)

    def _run_checkpointer(self) -> None:
        """The checkpointer thread: a PASSIVE checkpoint each time the writer asks."""
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        try:
            while self._checkpoint_requests.get() is not _STOP:
                try:
                    self._checkpoint(conn, "PASSIVE", background=True)
                except (sqlite3.Error, OSError) as exc:
                    self._failures.error(log, "disklog.maintenance_failed",
                                         reason=_reason(exc), error=str(exc))
                finally:
                    self._checkpointing = False
        finally:
            conn.close()  # not the last connection: closing it checkpoints nothing

    @property
    def checkpoints(self) -> int:
        return sum(self._checkpoints)

    def _checkpoint(self, conn: sqlite3.Connection, mode: str,
                    background: bool = False) -> None:
        started = self._clock.monotonic()
        with self._checkpoint_lock:
            busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        self._checkpoints[background] += 1
        if not background:  # the byte counts are the writer's to update
            self._measure(conn, checkpointed=not busy and frames == copied)
        log.debug("disklog.checkpointed", mode=mode.lower(), background=background,
                  frames=frames, copied=copied, busy=bool(busy),
                  duration_ms=round((self._clock.monotonic() - started) * 1000, 2))

    def _measure(self, conn: sqlite3.Connection, pages: tuple[int, int] | None = None,
                 checkpointed: bool = False) -> None:
        """Update the byte counts; pages is (page_count, freelist_count) if just read."""
        pages, self._free_pages = pages or conn.execute(sql.PAGES).fetchone()
        try:
            self._wal_bytes = os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            self._wal_bytes = 0
        # After a complete checkpoint the WAL's frames are spent: the next commit writes
        # it again from the start (and cuts the file back), so it takes no room.
        wal_live = 0 if checkpointed else self._wal_bytes
        self.used_bytes = (pages - self._free_pages) * self._page_size + wal_live
        self.file_bytes = pages * self._page_size + self._wal_bytes

    # -- opening ----------------------------------------------------------------------------

    def _open(self) -> tuple[sqlite3.Connection, LogState]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        damage = None
        if self.path.exists():
            problem = check_file(self.path)
            if problem is not None:
                stamp = datetime.fromtimestamp(self._clock.wall(), UTC)
                aside = move_aside(self.path, stamp.strftime("%Y%m%dT%H%M%S.%fZ"))
                fresh = self._connect()
                try:
                    damage = salvage(aside, fresh, problem)
                finally:
                    fresh.close()
                fsync_dir(self.path.parent)
                log.error("disklog.damaged", path=str(self.path), reason=damage.reason,
                          moved_to=str(damage.moved_to), salvaged_events=damage.events,
                          salvaged_keys=damage.keys, unreadable=damage.unreadable)
        conn = self._connect()
        self.damage = damage
        fresh, retries, next_due, max_id = conn.execute(sql.COUNTS).fetchone()
        self.rows = fresh + retries
        self._measure(conn)
        state = LogState(fresh=fresh, retries=retries, next_due=next_due, max_id=max_id or 0,
                         damage=damage)
        log.info("disklog.opened", path=str(self.path), events=self.rows, retries=retries,
                 bytes=self.file_bytes, synchronous=self.synchronous, salvaged=damage is not None)
        return conn, state

    def _connect(self) -> sqlite3.Connection:
        """Open the file (creating the schema in a new one) with this log's settings."""
        # Event bodies carry contact identities and e-mail addresses: owner-only, as the
        # dead-letter file. SQLite gives its -wal and -shm files the database file's mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.chmod(self.path, 0o600)
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                # Only an empty file gets here (check_file moved anything else aside), and
                # auto_vacuum must be chosen before the first table exists.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("BEGIN IMMEDIATE")
                for statement in sql.SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")
                conn.execute("COMMIT")
            elif version < sql.SCHEMA_VERSION:  # check_file let only readable versions by
                conn.execute("BEGIN IMMEDIATE")
                dropped = conn.execute(sql.SETTLED_KEYS_ONLY).rowcount
                conn.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")
                conn.execute("COMMIT")
                log.info("disklog.migrated", path=str(self.path), from_version=version,
                         to_version=sql.SCHEMA_VERSION, key_rows_dropped=dropped)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {SYNC_MODES[self.disk_sync]}")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            # SQLite reuses a checkpointed WAL from its start without shrinking it, so its
            # size would stay at its largest and say nothing of what it holds. With a limit
            # of 0 the first commit after a reset truncates it to what that commit wrote:
            # the file's size is the WAL's content, which is what decides a checkpoint.
            conn.execute("PRAGMA journal_size_limit = 0")
            self._page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            # Read back, so the opened line shows what SQLite runs, not what we asked for.
            level = conn.execute("PRAGMA synchronous").fetchone()[0]
            self.synchronous = {1: "normal", 2: "full"}.get(level, str(level))
        except BaseException:
            conn.close()
            raise
        return conn

    def _close_connection(self, conn: sqlite3.Connection) -> None:
        try:
            if self._dirty:
                self._checkpoint(conn, "TRUNCATE")
        except (sqlite3.Error, OSError) as exc:
            log.warning("disklog.maintenance_failed", reason=_reason(exc), error=str(exc))
        finally:
            conn.close()
        log.info("disklog.closed", path=str(self.path), events=self.rows,
                 bytes=self.file_bytes, commits=self.commits)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)
