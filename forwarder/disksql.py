"""The queue file's schema and every statement the disk log's writer thread runs on it.

Owns the table layout (disklog.py owns the connection, the thread and the file).
Tables, with the schema version in PRAGMA user_version:
  events(id INTEGER PRIMARY KEY, route, key, body, attempts, first_received_at, due_at)
    id is given by the caller, in insertion order. due_at is wall-clock epoch seconds
    before which a retry must not be sent (not monotonic: a restart keeps retry times);
    0 for an event never retried. The index on due_at (which holds the id too) gives
    the take order: never-retried events by id, then retries by (due_at, id).
  dedup_keys(id INTEGER PRIMARY KEY, key, added_at): disk mode's dedup window (issue 13
    item 6) for settled events. A queued event's key is its own row's `key`; the
    transaction that deletes a delivered event copies its key here, under the same id
    and with its first_received_at as added_at, so the key outlives the event (a
    delivered event's retry must stay a duplicate) and is found by id when a
    dead-lettered event's key is forgotten. So accepting an event inserts one row, not
    two: the intake's rate is the one that matters, settling runs at Intercom's pace
    (~167 events/s at most), and the key row cost ~1.4 us an event of the writer's ~6
    (bench/sqlite_insert.py). Schema version 1 wrote the key row at intake; opening
    such a file drops the key rows of its queued events (their events rows hold the
    same key), which makes it a version 2 file. Ids grow with time, so the table is an
    append-only b-tree with no other index (a 16-byte random primary key with an index
    on added_at cost ~8 us an event more, bench/disk_queue.py), and keys older than
    key_window_s are deleted from its start in the background.

Only the writer thread calls these functions, on its own connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from forwarder.event import Event

SCHEMA_VERSION = 2
READABLE_VERSIONS = frozenset({1, SCHEMA_VERSION})  # 1 is migrated at open
SCHEMA = (
    "CREATE TABLE events (id INTEGER PRIMARY KEY, route TEXT NOT NULL, key BLOB NOT NULL,"
    " body BLOB NOT NULL, attempts INTEGER NOT NULL, first_received_at REAL NOT NULL,"
    " due_at REAL NOT NULL)",
    "CREATE INDEX events_due ON events (due_at)",
    "CREATE TABLE dedup_keys (id INTEGER PRIMARY KEY, key BLOB NOT NULL, added_at REAL NOT NULL)",
)
COLUMNS = "id, route, key, body, attempts, first_received_at, due_at"
# A row as read back: (id, route, key, body, attempts, first_received_at, due_at).
Row = tuple[int, str, bytes, bytes, int, float, float]

FRESH = (f"SELECT {COLUMNS} FROM events WHERE due_at = 0 AND id > ? AND id <= ?"
         " ORDER BY id LIMIT ?")
# `due_at >= ?` beside the row value lets the planner start the index scan at the cursor.
DUE = (f"SELECT {COLUMNS} FROM events WHERE due_at > 0 AND due_at <= ? AND due_at >= ?"
       " AND (due_at, id) > (?, ?) ORDER BY due_at, id LIMIT ?")
NEXT_DUE = ("SELECT due_at FROM events WHERE due_at > 0 AND due_at >= ?"
            " AND (due_at, id) > (?, ?) ORDER BY due_at, id LIMIT 1")
# A version 1 file's key rows of queued events (see dedup_keys above).
SETTLED_KEYS_ONLY = "DELETE FROM dedup_keys WHERE id IN (SELECT id FROM events)"
# The window's keys in id (arrival) order: settled events' rows merged with queued events'.
KEYS = ("SELECT id, key, added_at FROM dedup_keys WHERE id > ?1 AND added_at >= ?2"
        " UNION ALL SELECT id, key, first_received_at FROM events"
        " WHERE id > ?1 AND first_received_at >= ?2 AND length(key) > 0"
        " ORDER BY id LIMIT ?3")
PAGES = "SELECT * FROM pragma_page_count(), pragma_freelist_count()"
# The first key (by id, i.e. arrival) still in the window: every key before it is older.
FIRST_KEPT = "SELECT id FROM dedup_keys WHERE added_at >= ? ORDER BY id LIMIT 1"
EXPIRE_KEYS = ("DELETE FROM dedup_keys WHERE id IN"
               " (SELECT id FROM dedup_keys WHERE id < ? ORDER BY id LIMIT 10000)")
# What start() needs: counts, the earliest retry, the highest id (keys included: a key
# outlives its event, and the next id must be above both). max() of several arguments
# is NULL if one is: each is coalesced.
COUNTS = ("SELECT (SELECT count(*) FROM events WHERE due_at = 0),"
          " (SELECT count(*) FROM events WHERE due_at > 0),"
          " (SELECT min(due_at) FROM events WHERE due_at > 0),"
          " max(coalesce((SELECT max(id) FROM events), 0),"
          "     coalesce((SELECT max(id) FROM dedup_keys), 0))")
TABLES = frozenset({"events", "dedup_keys"})


@dataclass(slots=True)
class WriteBatch:
    """Changes that become durable together, or not at all."""

    events: Sequence[Event] = ()  # new rows (id = event.log_id, due_at 0)
    retries: Sequence[tuple[int, float, int]] = ()  # (attempts, due_at, id)
    deletes: Sequence[int] = ()  # ids of settled events: their keys stay in dedup_keys
    forget_keys: Sequence[int] = ()  # ids whose dedup key goes (dead-lettered events)


@dataclass(frozen=True, slots=True)
class ReadResult:
    fresh: list[Row]  # never-retried rows after the id cursor, by id
    due: list[Row]  # retry rows due now after the (due_at, id) cursor, in that order
    next_due: float | None  # due_at of the first retry row after the new cursor


def apply(conn: sqlite3.Connection, batch: WriteBatch) -> tuple[int, int]:
    """Run one batch's statements inside the open transaction; (inserted, deleted)."""
    deleted = 0
    if batch.events:
        rows: list[Any] = []
        for e in batch.events:
            # A Route is a str: SQLite stores "/events" (reading .value costs ~0.5 us).
            rows += (e.log_id, e.route, e.key, e.body, e.attempts, e.first_received_at)
        _chunked(conn, _INSERT_EVENT, 6, rows)
    if batch.retries:
        conn.executemany("UPDATE events SET attempts = ?, due_at = ? WHERE id = ?",
                         batch.retries)
    if batch.forget_keys:
        # First: a forgotten key still on its event's row must not be kept when the
        # event is deleted below (or by a later batch).
        forget = list(batch.forget_keys)
        _chunked(conn, _DELETE_KEYS, 1, forget)
        _chunked(conn, _BLANK_EVENT_KEYS, 1, forget)
    if batch.deletes:
        ids = list(batch.deletes)
        _chunked(conn, _KEEP_KEYS, 1, ids)
        deleted = _chunked(conn, _DELETE_EVENTS, 1, ids)
    return len(batch.events), deleted


_INSERT_EVENT = ("INSERT INTO events VALUES {}", "(?, ?, ?, ?, ?, ?, 0.0)", ", ")
_DELETE_EVENTS = ("DELETE FROM events WHERE id IN ({})", "?", ", ")
_DELETE_KEYS = ("DELETE FROM dedup_keys WHERE id IN ({})", "?", ", ")
_BLANK_EVENT_KEYS = ("UPDATE events SET key = x'' WHERE id IN ({})", "?", ", ")
# OR IGNORE: a file salvaged from a damaged one may hold a key row already.
_KEEP_KEYS = ("INSERT OR IGNORE INTO dedup_keys SELECT id, key, first_received_at FROM events"
              " WHERE id IN ({}) AND length(key) > 0", "?", ", ")
_STATEMENTS: dict[tuple[tuple[str, str, str], int], str] = {}


def _chunked(conn: sqlite3.Connection, shape: tuple[str, str, str], width: int,
             params: list[Any]) -> int:
    """Run shape over params, up to 256 rows a statement; the rows it changed.

    One statement is one sqlite3_step, and the writer takes the GIL back after each: with
    executemany that is once a row, and while the event loop's thread is busy each take
    can wait out its switch interval. With a CPU-bound thread beside it, 1,000 inserts
    took 82-97 us a row that way and 52 with 256 a statement (~6.5 against ~8 us of CPU
    when alone). Chunks are 256 rows, then powers of two, so that at most nine distinct
    statements per shape are prepared (and kept in sqlite3's statement cache)."""
    rows = len(params) // width
    done = changed = 0
    while done < rows:
        n = min(256, 1 << ((rows - done).bit_length() - 1))
        sql = _STATEMENTS.get((shape, n))
        if sql is None:
            template, row, sep = shape
            sql = _STATEMENTS[(shape, n)] = template.format(sep.join([row] * n))
        changed += conn.execute(sql, params[done * width:(done + n) * width]).rowcount
        done += n
    return changed


def read(conn: sqlite3.Connection, fresh_after: int, fresh_upto: int, fresh_limit: int,
         due_after: tuple[float, int], now_wall: float, due_limit: int) -> ReadResult:
    """The next rows in take order (see DiskLog.read)."""
    fresh: list[Row] = []
    due: list[Row] = []
    if fresh_limit > 0 and fresh_upto > fresh_after:
        fresh = conn.execute(FRESH, (fresh_after, fresh_upto, fresh_limit)).fetchall()
    after_due, after_id = due_after
    if due_limit > 0:
        due = conn.execute(DUE, (now_wall, after_due, after_due, after_id,
                                 due_limit)).fetchall()
        if due:
            after_due, after_id = due[-1][6], due[-1][0]
    following = conn.execute(NEXT_DUE, (after_due, after_due, after_id)).fetchone()
    return ReadResult(fresh, due, following[0] if following else None)
