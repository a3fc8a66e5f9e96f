"""SQLite alone: CPU per event of the disk log's inserts (an event row and its dedup key
row, 256 rows a statement, ~1,500 events a commit, WAL, synchronous=NORMAL), with the
events table's due_at index as it is, as a partial index (WHERE due_at > 0, so fresh rows
are not indexed), and with none. Issue 13's batch target: is the index a lever? Two runs
on 2026-12-03 (three samples each): full 5.0-5.4 / 7.0-7.9, partial 5.7-6.0 / 6.3-7.0,
none 5.2-6.2 / 6.4-6.6 µs/event: at most ~1 µs of the ~16 µs disk mode adds per event
in batches, within this machine's noise.

    .venv/bin/python bench/sqlite_insert.py
"""

import sqlite3, time, os, sys
def run(idx):
    p='/tmp/sqlite_insert_bench.db'
    for s in ('','-wal','-shm'):
        try: os.remove(p+s)
        except FileNotFoundError: pass
    c=sqlite3.connect(p, isolation_level=None)
    c.execute('PRAGMA journal_mode=WAL'); c.execute('PRAGMA synchronous=NORMAL')
    c.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, route TEXT NOT NULL, key BLOB NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL, first_received_at REAL NOT NULL, due_at REAL NOT NULL)")
    if idx: c.execute(idx)
    c.execute("CREATE TABLE dedup_keys (id INTEGER PRIMARY KEY, key BLOB NOT NULL, added_at REAL NOT NULL)")
    body=b'x'*350; key=os.urandom(16)
    sql="INSERT INTO events VALUES "+", ".join(["(?, ?, ?, ?, ?, ?, 0.0)"]*256)
    sqlk="INSERT INTO dedup_keys VALUES "+", ".join(["(?, ?, ?)"]*256)
    n=0; t=time.process_time()
    for commit in range(200):
        c.execute('BEGIN')
        for ch in range(6):
            rows=[]; keys=[]
            for i in range(256):
                n+=1; rows += (n,'/events',key,body,0,1.0); keys += (n,key,1.0)
            c.execute(sql, rows); c.execute(sqlk, keys)
        c.execute('COMMIT')
    dt=time.process_time()-t
    c.close()
    return dt/n*1e6
for name, idx in (('full','CREATE INDEX events_due ON events (due_at)'),('partial','CREATE INDEX events_due ON events (due_at) WHERE due_at > 0'),('none',None)):
    print(name, ' '.join('%.2f'%run(idx) for _ in range(3)), 'us/event')
