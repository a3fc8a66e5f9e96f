"""SQLite alone: the disk log's CPU per accepted event, by what accepting one writes.

Shapes (each in a fresh file: WAL, synchronous=NORMAL, auto_vacuum=INCREMENTAL, 256 rows
a statement, 1,536 events a commit as in the daemon's batch bench, a PASSIVE checkpoint
every 10 commits as the checkpointer does; 350-byte bodies, random 16-byte keys):

- v1: the event's row and its dedup key's row (schema version 1);
- v2: the event's row alone (schema version 2: the key is copied to dedup_keys when the
  event is delivered, at Intercom's pace);
- v2, partial index: v2 with the due_at index WHERE due_at > 0 (fresh rows unindexed).

Process CPU time per event, the median of --samples runs of each shape, the shapes
interleaved so that a drift on this shared machine falls on all alike. Run it pinned to
one core, as the daemon is in bench/disk_http.py:

    taskset -c 0 .venv/bin/python bench/sqlite_insert.py

2026-12-03 (2 runs, 5 samples each): v1 5.8 / 6.0, v2 4.5 / 4.4, v2 with the partial
index 4.8 / 5.1 µs an event. Dropping the key row saves ~1.4 µs an event; the partial
index saves nothing measurable (an earlier run: at most ~0.2 µs) and would cost start()
a scan of every row to count the fresh ones, so version 2 keeps the whole index.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

EVENTS = ("CREATE TABLE events (id INTEGER PRIMARY KEY, route TEXT NOT NULL, key BLOB NOT NULL,"
          " body BLOB NOT NULL, attempts INTEGER NOT NULL, first_received_at REAL NOT NULL,"
          " due_at REAL NOT NULL)")
KEYS = "CREATE TABLE dedup_keys (id INTEGER PRIMARY KEY, key BLOB NOT NULL, added_at REAL NOT NULL)"
FULL_INDEX = "CREATE INDEX events_due ON events (due_at)"
PARTIAL_INDEX = "CREATE INDEX events_due ON events (due_at) WHERE due_at > 0"
SHAPES = {  # name: (index, key row at intake)
    "v1": (FULL_INDEX, True),
    "v2": (FULL_INDEX, False),
    "v2, partial index": (PARTIAL_INDEX, False),
}
ROWS_PER_STATEMENT = 256
STATEMENTS_PER_COMMIT = 6
BODY = b"x" * 350


def run(path: Path, index: str, key_row: bool, commits: int) -> float:
    """CPU microseconds per event for `commits` commits into a fresh file."""
    import sqlite3

    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    for statement in (EVENTS, index, KEYS):
        conn.execute(statement)
    insert_events = ("INSERT INTO events VALUES "
                     + ", ".join(["(?, ?, ?, ?, ?, ?, 0.0)"] * ROWS_PER_STATEMENT))
    insert_keys = "INSERT INTO dedup_keys VALUES " + ", ".join(["(?, ?, ?)"] * ROWS_PER_STATEMENT)
    n = 0
    started = time.process_time()
    for commit in range(commits):
        conn.execute("BEGIN")
        for _ in range(STATEMENTS_PER_COMMIT):
            rows: list[object] = []
            keys: list[object] = []
            for _ in range(ROWS_PER_STATEMENT):
                n += 1
                key = os.urandom(16)
                rows += (n, "/events", key, BODY, 0, 1.0)
                if key_row:
                    keys += (n, key, 1.0)
            conn.execute(insert_events, rows)
            if key_row:
                conn.execute(insert_keys, keys)
        conn.execute("COMMIT")
        if commit % 10 == 9:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    elapsed = time.process_time() - started
    conn.close()
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--commits", type=int, default=300)
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in SHAPES}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "insert.db"
        for _ in range(args.samples):
            for name, (index, key_row) in SHAPES.items():
                results[name].append(run(path, index, key_row, args.commits))
    for name, samples in results.items():
        shown = " ".join(f"{s:.2f}" for s in samples)
        print(f"{name:18} median {statistics.median(samples):.2f} µs/event ({shown})")


if __name__ == "__main__":
    main()
