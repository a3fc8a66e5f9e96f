"""Checking a queue file at start, and salvaging what still reads from a damaged one.

Owns the rule that a damaged file never stops the daemon: check_file() names what is
wrong (a file SQLite cannot read, a failed PRAGMA quick_check, a schema that is not
ours or is newer), move_aside() renames the file with its -wal/-shm/-journal so that
nothing is ever deleted, and salvage() copies every row that still reads into a fresh
file. Only damage is moved aside: a file that is locked, unreadable for lack of
permission or on a failing disk makes the start fail instead, because moving a healthy
file aside would hide its events.

Runs on the disk log's writer thread, before its connection opens.

Salvage reads events by id range, a range that fails row by row, and then each id the
events_due index lists that the ranges missed, so that one bad page costs the rows on
it and not the rest of the file. Rows are copied with their id, attempts and retry
time; a row whose body no longer parses as the JSON object the daemon wrote is counted
as unreadable, not sent. Dedup keys are read in one pass up to the first error: they
only save a duplicate send, which Intercom drops by key anyway.
"""

from __future__ import annotations

import os
import sqlite3
from array import array
from dataclasses import dataclass
from pathlib import Path

import orjson

from forwarder.disksql import (COLUMNS, READABLE_VERSIONS, SCHEMA_VERSION, SETTLED_KEYS_ONLY,
                               TABLES)
from forwarder.event import Route

_ROUTES = frozenset(r.value for r in Route)
_CHUNK_IDS = 1000
# Without a readable max(id), ranges are read until this many in a row hold nothing.
_EMPTY_RANGES_TO_STOP = 64


@dataclass(frozen=True, slots=True)
class Damage:
    """What start() found wrong with the file and how much of it was kept."""

    reason: str  # SQLITE_NOTADB, SQLITE_CORRUPT..., quick_check_failed, newer_version, ...
    moved_to: Path
    events: int  # rows copied into the fresh file
    keys: int  # settled events' dedup keys copied (a queued event's comes with its row)
    unreadable: int  # rows the file's id index lists that no read could get (a lower
    # bound: rows whose index entries were on a damaged page are not counted)


def is_damage(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT")


def check_file(path: Path) -> str | None:
    """Why the existing file at path cannot be used as it is, or None if it can (an empty
    file can: the log creates its schema). Raises sqlite3.Error for a problem that is not
    damage (a lock held too long, permissions, I/O)."""
    conn = _read_only(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            return "newer_version"
        found = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table'")}
        if version == 0 and not found:
            return None
        if version not in READABLE_VERSIONS or not TABLES <= found:
            return "unknown_schema"
        if conn.execute("PRAGMA quick_check").fetchall() != [("ok",)]:
            return "quick_check_failed"
        return None
    except sqlite3.Error as exc:
        if is_damage(exc):
            return exc.sqlite_errorname
        raise
    finally:
        conn.close()


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot change the file: closing a writable one checkpoints the
    WAL into the file, and a damaged file is kept exactly as it was found."""
    return sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True,
                           isolation_level=None)


def move_aside(path: Path, stamp: str) -> Path:
    """Rename path and its companion files to <name>.corrupt-<stamp>[-wal|-shm|-journal]."""
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():  # never replace an earlier damaged file
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        except FileNotFoundError:
            pass
    return aside


def salvage(aside: Path, fresh: sqlite3.Connection, reason: str) -> Damage:
    """Copy what reads from the file at aside into fresh (which has the schema)."""
    events = keys = unreadable = 0
    src = _read_only(aside)
    try:
        # A file shorter than its header says (a torn tail) reads as SQLITE_CORRUPT from
        # the first page on; with writable_schema SQLite reads the pages that are there.
        # Nothing is ever written through this connection.
        src.execute("PRAGMA writable_schema = ON")
        events, unreadable = _copy_events(src, fresh)
        keys = _copy_keys(src, fresh)
        fresh.execute(SETTLED_KEYS_ONLY)  # a version 1 file's, as the log's open does
    finally:
        src.close()
    return Damage(reason=reason, moved_to=aside, events=events, keys=keys,
                  unreadable=unreadable)


def _copy_events(src: sqlite3.Connection, dst: sqlite3.Connection) -> tuple[int, int]:
    """Copy every row that reads; (copied, unreadable). The id index (events_due, its own
    b-tree) says which rows exist: on a damaged leaf a range read can stop early without
    an error, so each listed id the range reads missed is looked up on its own, and
    unreadable counts the listed rows that no read could get."""
    listed = _listed_ids(src)
    try:
        top = src.execute("SELECT max(id) FROM events").fetchone()[0] or 0
    except sqlite3.Error as exc:
        if not (getattr(exc, "sqlite_errorname", None) or "").startswith("SQLITE_CORRUPT"):
            return 0, 0  # not a database, or not our table: no rows to read
        top = None  # a bad page on the way to the last row
    last_listed = max(listed, default=0)
    copied = empty = 0
    seen = bytearray(max(top or 0, last_listed) // 8 + 1)  # grows if rows lie beyond
    low = 0
    # Without a known top, read ranges until a run of them past the last listed id
    # holds nothing.
    while (low < top) if top is not None else (
            low < last_listed or empty < _EMPTY_RANGES_TO_STOP):
        rows = _read_range(src, low, low + _CHUNK_IDS)
        copied += _insert(dst, rows, seen)
        empty = 0 if rows else empty + 1
        low += _CHUNK_IDS
    missed = [i for i in listed if i >= len(seen) * 8 or not seen[i >> 3] & (1 << (i & 7))]
    rows = []
    for i in missed:
        row = _read_one(src, i)
        if row is not None:
            rows.append(row)
    found = _insert(dst, rows, seen)
    return copied + found, len(missed) - found


def _listed_ids(src: sqlite3.Connection) -> array[int]:
    ids = array("q")
    try:
        cursor = src.execute("SELECT id FROM events INDEXED BY events_due")
        while batch := cursor.fetchmany(10_000):
            ids.extend(row[0] for row in batch if type(row[0]) is int and row[0] > 0)
    except sqlite3.Error:
        pass  # a damaged index: keep the ids read so far
    return ids


def _read_range(src: sqlite3.Connection, low: int, high: int) -> list[tuple]:
    """Rows with low < id <= high, as far as they read (row by row after an error)."""
    try:
        return src.execute(f"SELECT {COLUMNS} FROM events WHERE id > ? AND id <= ?"
                           " ORDER BY id", (low, high)).fetchall()
    except sqlite3.Error:
        pass
    rows = []
    for i in range(low + 1, high + 1):
        row = _read_one(src, i)
        if row is not None:
            rows.append(row)
    return rows


def _read_one(src: sqlite3.Connection, event_id: int) -> tuple | None:
    try:
        return src.execute(f"SELECT {COLUMNS} FROM events WHERE id = ?", (event_id,)).fetchone()
    except sqlite3.Error:
        return None


def _insert(dst: sqlite3.Connection, rows: list[tuple], seen: bytearray) -> int:
    """Insert the valid rows not copied yet; how many were inserted."""
    good = []
    for row in rows:
        if not _valid(row):
            continue
        i = row[0]
        if i >= len(seen) * 8:
            seen.extend(bytes(i // 8 + 1 - len(seen)))
        if not seen[i >> 3] & (1 << (i & 7)):
            seen[i >> 3] |= 1 << (i & 7)
            good.append(row)
    if good:
        dst.execute("BEGIN")
        dst.executemany("INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", good)
        dst.execute("COMMIT")
    return len(good)


def _valid(row: tuple) -> bool:
    """A row as the daemon writes it. SQLite keeps no page checksums, so a damaged cell
    can read back altered without an error: a body that no longer parses is not sent."""
    event_id, route, key, body, attempts, first_received_at, due_at = row
    if not (type(event_id) is int and event_id > 0 and route in _ROUTES
            and type(key) is bytes and len(key) in (0, 16) and type(body) is bytes
            and type(attempts) is int and attempts >= 0
            and type(first_received_at) in (int, float) and type(due_at) in (int, float)):
        return False
    try:
        return type(orjson.loads(body)) is dict
    except orjson.JSONDecodeError:
        return False


def _copy_keys(src: sqlite3.Connection, dst: sqlite3.Connection) -> int:
    copied = 0
    try:
        cursor = src.execute("SELECT id, key, added_at FROM dedup_keys")
    except sqlite3.Error:
        return 0
    while True:
        try:
            rows = cursor.fetchmany(10_000)
        except sqlite3.Error:
            break  # keep the keys read before the damage (see the module docstring)
        if not rows:
            break
        good = [(i, k, at) for i, k, at in rows
                if type(i) is int and type(k) is bytes and type(at) in (int, float)]
        dst.execute("BEGIN")
        dst.executemany("INSERT OR IGNORE INTO dedup_keys VALUES (?, ?, ?)", good)
        dst.execute("COMMIT")
        copied += len(good)
    return copied
