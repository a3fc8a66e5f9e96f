"""DiskLog: the SQLite file of the durable queue (issue 13), on real files and threads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from forwarder.clock import Clock, FakeClock, SystemClock
from forwarder.disklog import DiskLog, DiskLogError
from forwarder.disksql import SCHEMA_VERSION, WriteBatch
from forwarder.event import Event, Route

N_DAMAGED = 3000
T = TypeVar("T")


def ev(n: int, *, log_id: int | None = None, pad: int = 0, route: Route = Route.EVENTS) -> Event:
    return Event(body=b'{"n":%d,"pad":"%s"}' % (n, b"x" * pad), key=n.to_bytes(16, "big"),
                 route=route, attempts=n % 3, first_received_at=1_700_000_000.0 + n,
                 log_id=n if log_id is None else log_id)


def everything(log: DiskLog, top: int = 10**9, limit: int = 10**6):
    return log.read(fresh_after=0, fresh_upto=top, fresh_limit=limit, due_after=(0.0, 0),
                    now_wall=1e12, due_limit=limit)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "queue.db"


@contextlib.asynccontextmanager
async def started_on(path: Path, cls: Callable[..., T], close: Callable[[T], Awaitable[None]]
                     ) -> AsyncIterator[Callable[..., Awaitable[T]]]:
    """A factory for a fixture: each call builds `cls(path, clock, **kwargs)` (a FakeClock
    unless clock= is given) and starts it; on the way out every one built is closed."""
    made: list[T] = []

    async def _make(clock: Clock | None = None, **kwargs: Any) -> T:
        thing = cls(path, clock or FakeClock(), **kwargs)
        await thing.start()
        made.append(thing)
        return thing

    try:
        yield _make
    finally:
        for thing in made:
            await close(thing)


@pytest.fixture
async def open_log(path: Path):
    """Start DiskLogs on `path` and always close them."""
    async with started_on(path, DiskLog, DiskLog.close) as make:
        yield make


async def write_events(path: Path, n: int, pad: int = 300) -> None:
    log = DiskLog(path, FakeClock())
    await log.start()
    await log.write(WriteBatch(events=[ev(i, pad=pad) for i in range(1, n + 1)]))
    await log.close()


# -- durability ---------------------------------------------------------------------------


@pytest.mark.parametrize("disk_sync", ["normal", "full"])
async def test_committed_events_come_back_after_reopening_with_every_field(open_log, disk_sync,
                                                                           captured_logs):
    log = await open_log(disk_sync=disk_sync)
    summary = ev(2, route=Route.SUMMARIES)
    await log.write(WriteBatch(events=[ev(1), summary]))
    await log.close()

    again = await open_log(disk_sync=disk_sync)
    rows = (await everything(again)).fresh
    assert rows == [(1, "/events", ev(1).key, ev(1).body, 1, 1_700_000_001.0, 0.0),
                    (2, "/events/summaries", summary.key, summary.body, 2, 1_700_000_002.0, 0.0)]
    opened = [e for e in captured_logs if e["event"] == "disklog.opened"]
    # what SQLite reports it runs, read back from the connection
    assert [e["synchronous"] for e in opened] == [disk_sync, disk_sync]
    assert opened[-1]["events"] == 2


async def test_retry_times_and_attempts_are_kept_and_settled_events_are_gone(open_log):
    log = await open_log()
    await log.write(WriteBatch(events=[ev(1), ev(2), ev(3)]))
    await log.write(WriteBatch(retries=[(4, 1_700_000_500.0, 2)], deletes=[3]))
    await log.close()

    again = await open_log()
    assert (again.rows, again.rows) == (2, 2)
    early = await again.read(fresh_after=0, fresh_upto=3, fresh_limit=10, due_after=(0.0, 0),
                             now_wall=1_700_000_499.0, due_limit=10)
    assert [r[0] for r in early.fresh] == [1]
    assert early.due == [] and early.next_due == 1_700_000_500.0
    late = await again.read(fresh_after=1, fresh_upto=3, fresh_limit=10, due_after=(0.0, 0),
                            now_wall=1_700_000_500.0, due_limit=10)
    assert [(r[0], r[4], r[6]) for r in late.due] == [(2, 4, 1_700_000_500.0)]
    assert late.next_due is None


async def test_concurrent_writes_share_commits(open_log):
    stats = []
    log = await open_log(on_commit=stats.append)
    futures = [log.write(WriteBatch(events=[ev(i)])) for i in range(1, 101)]
    await asyncio.gather(*futures)
    assert sum(s.events for s in stats) == 100
    assert len(stats) == log.commits <= 10  # one per write would be 100
    assert max(s.writes for s in stats) >= 10
    assert all(s.latency_s >= 0 for s in stats)


async def test_a_failed_commit_writes_nothing_of_its_batch(open_log, path):
    """1. another connection holds the write lock past the busy timeout; 2. the write
    fails with the SQLite reason; 3. the lock goes; 4. nothing of the batch is there."""
    log = await open_log(busy_timeout_s=0.05)
    await log.write(WriteBatch(events=[ev(1)]))
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(DiskLogError) as failed:
        await log.write(WriteBatch(events=[ev(2)], deletes=[1]))
    other.execute("ROLLBACK")
    other.close()
    assert failed.value.reason == "SQLITE_BUSY"
    assert [r[0] for r in (await everything(log)).fresh] == [1]
    await log.write(WriteBatch(events=[ev(3)]))
    assert [r[0] for r in (await everything(log)).fresh] == [1, 3]


async def test_a_crashed_writer_fails_waiting_requests_instead_of_hanging(open_log,
                                                                         monkeypatch,
                                                                         captured_logs):
    log = await open_log()

    def bug(*args):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr("forwarder.disksql.apply", bug)
    with pytest.raises(DiskLogError, match="writer_crashed"):
        await asyncio.wait_for(log.write(WriteBatch(events=[ev(1)])), 5)
    with pytest.raises(DiskLogError, match="writer_crashed"):
        await asyncio.wait_for(everything(log), 5)
    assert "disklog.writer_crashed" in [e["event"] for e in captured_logs]


async def test_requests_after_close_fail_at_once(open_log):
    log = await open_log()
    await log.close()
    with pytest.raises(DiskLogError, match="closed"):
        await log.write(WriteBatch(events=[ev(1)]))


# -- the event loop is never blocked -----------------------------------------------------------


async def test_a_commit_held_up_by_a_lock_does_not_stall_the_event_loop(open_log, path):
    """Another process's transaction holds the write lock for 0.5 s: the commit waits for
    it (SQLite's busy timeout) on the writer thread while a coroutine keeps ticking."""
    clock = SystemClock()
    log = await open_log(clock=clock)
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(0.5)  # the scenario: a lock held for 0.5 s
        other.execute("ROLLBACK")
        other.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    await asyncio.get_running_loop().run_in_executor(None, locked.wait)
    gaps: list[float] = []

    async def tick() -> None:
        last = clock.monotonic()
        while True:
            await asyncio.sleep(0.005)  # the measurement itself, not a wait for a condition
            now = clock.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    started = clock.monotonic()
    await asyncio.wait_for(log.write(WriteBatch(events=[ev(1)])), 5)
    took = clock.monotonic() - started
    ticker.cancel()
    holder.join()
    assert took >= 0.3  # the commit really waited for the lock
    assert len(gaps) >= 20 and max(gaps) < 0.15


# -- bounded files ----------------------------------------------------------------------------


async def test_the_wal_is_checkpointed_so_it_stays_bounded(open_log, path):
    log = await open_log(checkpoint_bytes=256 << 10)
    wal = Path(f"{path}-wal")
    sizes = []
    for chunk in range(20):  # ~3.5 MB in all, ~175 KB a commit
        await log.write(WriteBatch(events=[ev(i, pad=300) for i in
                                           range(chunk * 500 + 1, chunk * 500 + 501)]))
        sizes.append(wal.stat().st_size)
    assert log.checkpoints > 0
    # Up to 4x checkpoint_bytes (checkpoints in the background cannot always restart
    # it) and a commit; without checkpoints it would hold every commit (~3.5 MB).
    assert max(sizes) < 4 * (256 << 10) + 2 * (180 << 10)
    await log.maintain()
    assert wal.stat().st_size == 0  # TRUNCATE when idle


async def test_a_checkpoint_comes_once_per_checkpoint_bytes_of_wal_not_per_commit(open_log):
    """SQLite reuses a checkpointed WAL file without shrinking it: judged by the file's
    size, every commit after the first checkpoint would checkpoint again (~20 times
    slower commits, bench/disk_queue.py)."""
    log = await open_log(checkpoint_bytes=256 << 10)
    for chunk in range(60):  # ~35 KB a commit, ~2 MB in all
        await log.write(WriteBatch(events=[ev(i, pad=300) for i in
                                           range(chunk * 100 + 1, chunk * 100 + 101)]))
    assert log.commits == 60
    assert 3 <= log.checkpoints <= 20  # ~65 KB of WAL pages a commit


async def test_commits_during_background_checkpoints_do_not_set_off_one_per_commit(open_log):
    """Commits that land while the checkpointer runs keep the WAL from restarting, so its
    file stays large: asking again whenever it is over checkpoint_bytes would checkpoint
    (and fsync) after nearly every commit."""
    log = await open_log(checkpoint_bytes=256 << 10)
    in_flight: set[asyncio.Future] = set()
    for chunk in range(300):  # ~30 KB a commit, ~9 MB in all, two writes in flight
        in_flight.add(log.write(WriteBatch(events=[ev(i, pad=300) for i in
                                                   range(chunk * 20 + 1, chunk * 20 + 21)])))
        if len(in_flight) >= 2:
            _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*in_flight)
    assert log.checkpoints <= 36, (log.checkpoints, log.commits)  # ~23 by WAL growth, ~50 per commit


async def test_deleting_settled_events_gives_the_space_back(open_log, path):
    log = await open_log()
    await log.write(WriteBatch(events=[ev(i, pad=1000) for i in range(1, 20_001)]))
    await log.maintain()
    full = log.file_bytes
    assert full > 20_000 * 1000
    assert full == path.stat().st_size  # exact after a TRUNCATE checkpoint: no WAL left
    await log.write(WriteBatch(deletes=list(range(1, 19_001))))
    await everything(log)  # the writer checkpoints the big WAL right after the commit
    assert log.used_bytes < full / 4  # freed pages are reusable at once
    for _ in range(5):
        await log.maintain()
    assert path.stat().st_size < full / 4  # and handed back to the file system
    assert log.rows == 1000


# -- dedup keys ---------------------------------------------------------------------------


V1_SCHEMA = (
    "CREATE TABLE events (id INTEGER PRIMARY KEY, route TEXT NOT NULL, key BLOB NOT NULL,"
    " body BLOB NOT NULL, attempts INTEGER NOT NULL, first_received_at REAL NOT NULL,"
    " due_at REAL NOT NULL)",
    "CREATE INDEX events_due ON events (due_at)",
    "CREATE TABLE dedup_keys (id INTEGER PRIMARY KEY, key BLOB NOT NULL, added_at REAL NOT NULL)",
)


def received_at(n: int, at: float) -> Event:
    return dataclasses.replace(ev(n), first_received_at=at)


async def test_dedup_keys_of_queued_and_delivered_events_load_in_arrival_order(open_log):
    log = await open_log()
    await log.write(WriteBatch(events=[received_at(i, 100.0) for i in range(1, 6)]))
    await log.write(WriteBatch(events=[received_at(i, 200.0) for i in range(6, 11)]))
    await log.write(WriteBatch(events=[Event(b"{}", b"", log_id=11, first_received_at=300.0)]))
    await log.write(WriteBatch(deletes=[6, 8]))  # delivered: their keys stay
    await log.write(WriteBatch(forget_keys=[7], deletes=[7]))  # dead-lettered: key goes
    await log.write(WriteBatch(forget_keys=[9]))  # forgotten while queued...
    await log.write(WriteBatch(deletes=[9]))  # ...stays forgotten when settled later
    await log.close()

    again = await open_log()
    assert [r[0] for r in (await everything(again)).fresh] == [1, 2, 3, 4, 5, 10, 11]
    chunks = [c async for c in again.load_keys(150.0, chunk=2)]
    assert [len(c) for c in chunks] == [2, 1]
    # 6 and 8 from the settled keys, 10 from its queued event; the keyless 11 has none
    assert [k for c in chunks for k in c] == [(ev(i).key, 200.0) for i in (6, 8, 10)]


async def test_dedup_keys_older_than_the_window_expire(open_log):
    clock = FakeClock()
    log = await open_log(clock=clock, key_window_s=3600)
    await log.write(WriteBatch(events=[received_at(1, clock.wall() - 7200),
                                       received_at(2, clock.wall() - 60)]))
    await log.write(WriteBatch(deletes=[1, 2]))
    await log.maintain()
    keys = [k for c in [c async for c in log.load_keys(0.0)] for k, _ in c]
    assert keys == [ev(2).key]


def write_v1_file(path: Path, queued: range, delivered: range, pad: int = 0) -> None:
    """A file as version 1 wrote it: every accepted event's key row, its own row too while
    it is queued."""
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in V1_SCHEMA:
        conn.execute(statement)
    conn.executemany("INSERT INTO dedup_keys VALUES (?, ?, ?)",
                     [(i, ev(i).key, 500.0) for i in sorted([*queued, *delivered])])
    conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, 0.0)",
                     [(i, "/events", ev(i).key, ev(i, pad=pad).body, 0, 500.0) for i in queued])
    conn.execute("PRAGMA user_version = 1")
    conn.close()


async def test_a_version_1_file_keeps_its_events_and_keys_once_each(open_log, path,
                                                                   captured_logs):
    """Version 1 wrote every event's key row at intake; opening drops the rows of queued
    events (their own row has the key), and delivering one later keeps its key."""
    write_v1_file(path, queued=range(2, 4), delivered=range(1, 2))

    log = await open_log()
    migrated = [e for e in captured_logs if e["event"] == "disklog.migrated"]
    assert [(e["from_version"], e["to_version"], e["key_rows_dropped"]) for e in migrated] \
        == [(1, SCHEMA_VERSION, 2)]
    assert not [e for e in captured_logs if e["event"] == "disklog.damaged"]
    assert [r[0] for r in (await everything(log)).fresh] == [2, 3]
    await log.write(WriteBatch(deletes=[2]))  # no second key row for 2: no conflict
    keys = [k for c in [c async for c in log.load_keys(0.0)] for k, _ in c]
    assert keys == [ev(1).key, ev(2).key, ev(3).key]
    await log.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_a_torn_version_1_file_is_salvaged_with_each_key_once(open_log, path,
                                                                    captured_logs):
    write_v1_file(path, queued=range(11, N_DAMAGED + 1), delivered=range(1, 11), pad=300)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size * 3 // 4)
    log, rows = await reopen_damaged(open_log, path, captured_logs)
    assert N_DAMAGED / 4 < len(rows) < N_DAMAGED
    keys = [k for c in [c async for c in log.load_keys(0.0)] for k, _ in c]
    assert len(keys) == len(set(keys))  # a queued event's key once, not twice
    assert {ev(row[0]).key for row in rows} | {ev(N_DAMAGED + 1).key} <= set(keys)


# -- a damaged file at start ---------------------------------------------------------------


def aside_files(path: Path) -> list[str]:
    """The moved-aside files but -shm (SQLite's shared-memory index, rebuilt at will) and
    an empty -wal (made by SQLite's read-only look at the file)."""
    return sorted(p.name for p in path.parent.iterdir() if ".corrupt-" in p.name
                  and not p.name.endswith("-shm")
                  and (p.stat().st_size or not p.name.endswith("-wal")))


async def reopen_damaged(open_log, path: Path, captured_logs) -> tuple[DiskLog, list]:
    log = await open_log()
    damaged = [e for e in captured_logs if e["event"] == "disklog.damaged"]
    assert len(damaged) == 1 and damaged[0]["log_level"] == "error"
    await log.write(WriteBatch(events=[ev(N_DAMAGED + 1)]))  # usable afterwards
    rows = (await everything(log)).fresh
    assert rows[-1][0] == N_DAMAGED + 1
    return log, rows[:-1]


async def test_a_file_that_is_not_a_database_is_moved_aside_and_the_log_starts(
        open_log, path, captured_logs):
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(50_000))
    log, rows = await reopen_damaged(open_log, path, captured_logs)
    assert rows == []
    assert (log.damage.reason, log.damage.events) == ("SQLITE_NOTADB", 0)
    assert aside_files(path) == [log.damage.moved_to.name]
    assert log.damage.moved_to.stat().st_size == 50_000  # kept as it was, never deleted


async def test_a_torn_tail_keeps_the_rows_before_it(open_log, path, captured_logs):
    await write_events(path, N_DAMAGED)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    log, rows = await reopen_damaged(open_log, path, captured_logs)
    assert N_DAMAGED / 4 < len(rows) < N_DAMAGED
    assert log.damage.events == len(rows)
    assert all(row[3] == ev(row[0], pad=300).body for row in rows)  # intact, not garbage
    assert aside_files(path) == [log.damage.moved_to.name]


@pytest.mark.parametrize("offset, length, most_lost, exact", [
    # five whole pages: ~12 rows each, maybe index pages too (then fewer are counted)
    (0, 5 * 4096, 100, False),
    # cells inside one page: a range read stops there without an error
    (2000, 1000, 10, True),
], ids=["whole_pages", "cells_in_a_page"])
async def test_bad_pages_cost_only_the_rows_on_them_and_are_counted(
        open_log, path, captured_logs, offset, length, most_lost, exact):
    await write_events(path, N_DAMAGED)
    page = path.stat().st_size // 3 // 4096 * 4096
    with open(path, "r+b") as f:
        f.seek(page + offset)
        f.write(random.Random(1).randbytes(length))
    log, rows = await reopen_damaged(open_log, path, captured_logs)
    assert log.damage.reason in ("quick_check_failed", "SQLITE_CORRUPT")
    assert len(rows) >= N_DAMAGED - most_lost
    assert len(rows) + log.damage.unreadable <= N_DAMAGED  # never counts a row twice
    if exact:  # the id index is intact: every lost row is counted
        assert len(rows) + log.damage.unreadable == N_DAMAGED
    assert all(row[3] == ev(row[0], pad=300).body for row in rows)
    # None was delivered: each key comes with its salvaged row, and only with it (so a
    # client's retry of an event lost on a bad page is not taken for a duplicate).
    assert log.damage.keys == 0
    keys = [k for c in [c async for c in log.load_keys(0.0)] for k, _ in c]
    assert keys == [ev(row[0]).key for row in rows] + [ev(N_DAMAGED + 1).key]


async def test_a_file_from_a_newer_version_is_moved_aside_with_its_wal(open_log, path,
                                                                       captured_logs):
    """The rows it holds in the columns we know are salvaged: a downgrade sends them."""
    await write_events(path, 10)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA user_version = 99")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("DELETE FROM events WHERE id = 10")  # stays in the WAL
    wal = Path(f"{path}-wal").read_bytes()
    os.close(os.open(path, os.O_RDONLY))
    # Copy the files as a kill would leave them (closing would checkpoint the WAL).
    files = {s: Path(f"{path}{s}").read_bytes() for s in ("", "-wal")}
    conn.close()
    for suffix, data in files.items():
        Path(f"{path}{suffix}").write_bytes(data)
    assert wal
    log, rows = await reopen_damaged(open_log, path, captured_logs)
    assert log.damage.reason == "newer_version"
    assert [r[0] for r in rows] == list(range(1, 10))
    aside = log.damage.moved_to
    assert Path(f"{aside}-wal").read_bytes() == wal  # as found: the check never wrote
    assert aside.name in aside_files(path)
