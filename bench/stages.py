"""What each step of the intake costs per event, in-process (no HTTP, no event loop).

    .venv/bin/python bench/stages.py              # prints the table
    .venv/bin/python bench/stages.py --write      # and writes its section of RESULTS.md

bench/run_intake.py says how fast the daemon takes events over HTTP; this says where
the per-event time inside the daemon goes, step by step, so an optimisation can be aimed
and checked in seconds. Each step runs over N distinct, realistic events (the same shape
as bench/wrk/events.lua's: ~350 bytes, 4 metadata keys, a unique user id each), on the
stages service.py really builds (Service(config) wires them; nothing is started). A
figure is the fastest of --repeat runs, in ns per event: the minimum is what the code
costs when nothing else interferes, which is the steadiest reading on a shared machine.

The steps (top to bottom, the path one event takes):
  parse          orjson.loads of one event's body (what the bare handler also does)
  validate       validate_event: checks, normalise, orjson.dumps, event_key, Event
    of which event_key, orjson.dumps of the normalised dict (measured alone)
  dedup          DedupWindow.contains + add of a new key
  queue          EventQueue.offer
  count          the intake's per-event prometheus counter .inc()
  batch of 100   Intake's whole batch handler body (parse the array, validate, admit each,
                 serialise the answer), per event: the in-process ceiling of batch intake
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from run_intake import event_body, write_section

from forwarder.config import load_config
from forwarder.service import Service
from forwarder.validate import event_key, parse_json, validate_event

SECTION = ("<!-- intake-stages:start -->", "<!-- intake-stages:end -->")


def best_ns(run: Callable[[], int], repeat: int) -> float:
    """Fastest of `repeat` runs, in ns per item; run() does the work and returns its items."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter_ns()
        n = run()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def fresh_service() -> Service:
    env = {
        "FORWARDER_QUEUE__MAX_EVENTS": "10000000",
        "FORWARDER_STORAGE__STATE_DIR": "/nonexistent-bench-state",
    }
    return Service(load_config(None, env=env))


def measure(n: int, repeat: int, batch: int) -> list[tuple[str, float]]:
    created_at = int(time.time()) - 60
    bodies = [event_body(i, created_at) for i in range(n)]
    objs = [orjson.loads(b) for b in bodies]
    now = time.time()
    normalised = [validate_event("default", o, now) for o in objs]
    assert all(not isinstance(x, list) for x in normalised), normalised[0]
    # validate_event's bodies sit in orjson's ~4 KB buffers until the queue copies them;
    # 20,000 of those are ~80 MB of cold memory, which would make offer() look ~2x dearer
    # than right after validate_event, where its body is hot. Exact-size copies instead.
    events = [dataclasses.replace(x.event, body=bytes(memoryview(x.event.body)))
              for x in normalised]
    keys = [e.key for e in events]
    outs = [orjson.loads(e.body) for e in events]
    rows: list[tuple[str, float]] = []

    def loop_parse() -> int:
        for b in bodies:
            parse_json(b)
        return n

    def loop_validate() -> int:
        for o in objs:
            validate_event("default", o, now)
        return n

    def loop_key() -> int:
        for o in objs:
            event_key("default", "user_id", o["user_id"], "order-completed", created_at)
        return n

    def loop_dumps() -> int:
        for o in outs:
            orjson.dumps(o)
        return n

    def loop_dedup() -> int:
        d = fresh_service().dedup
        contains, add = d.contains, d.add
        for k in keys:
            if not contains(k):
                add(k)
        return n

    def loop_queue() -> int:
        offer = fresh_service().queue.offer
        for e in events:
            offer(e)
        return n

    def loop_count() -> int:
        inc = fresh_service().metrics.events_received.labels("accepted").inc
        for _ in range(n):
            inc()
        return n

    batches = [
        b"[" + b",".join(bodies[j : j + batch]) + b"]" for j in range(0, n - batch + 1, batch)
    ]

    def loop_batch() -> int:
        svc = fresh_service()
        handle = svc.intake._batch  # the handler's body, without aiohttp around it
        for body in batches:
            handle(body, ndjson=False)
        return len(batches) * batch

    def loop_batch_parse() -> int:
        for body in batches:
            orjson.loads(body)
        return len(batches) * batch

    rows.append(("parse (orjson.loads, one event)", best_ns(loop_parse, repeat)))
    rows.append(("validate_event (all of it)", best_ns(loop_validate, repeat)))
    rows.append(("  of which event_key", best_ns(loop_key, repeat)))
    rows.append(("  of which orjson.dumps of the normalised event", best_ns(loop_dumps, repeat)))
    rows.append(("dedup: contains + add (new key)", best_ns(loop_dedup, repeat)))
    rows.append(("queue: offer", best_ns(loop_queue, repeat)))
    rows.append(("count: events_received.inc()", best_ns(loop_count, repeat)))
    rows.append((f"batch of {batch}: whole handler body, per event", best_ns(loop_batch, repeat)))
    rows.append(
        (
            f"batch of {batch}: orjson.loads of the array, per event",
            best_ns(loop_batch_parse, repeat),
        )
    )
    return rows


def render(rows: list[tuple[str, float]], args: argparse.Namespace) -> str:
    import platform
    import subprocess

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, cwd=BENCH
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "forwarder"],
        check=False, capture_output=True,
        text=True,
        cwd=BENCH.parent,
    ).stdout.strip()
    lines = [
        SECTION[0],
        "## Intake steps, in-process (ns per event)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} "
        f"cores, Python {platform.python_version()}, commit {commit}"
        + (" + uncommitted changes in forwarder/" if dirty else "")
        + f"; fastest of {args.repeat} runs over {args.events:,} distinct events.",
        "",
        "Reproduce: `.venv/bin/python bench/stages.py --write`",
        "",
        "| step | ns/event | events/s on one core at this cost alone |",
        "| --- | ---: | ---: |",
    ]
    for name, ns in rows:
        lines.append(f"| {name} | {ns:,.0f} | {1e9 / ns:,.0f} |")
    lines.append(SECTION[1])
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description="Per-event cost of each intake step, in-process.")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    args = p.parse_args()
    rows = measure(args.events, args.repeat, args.batch)
    section = render(rows, args)
    if args.write:
        write_section(section, markers=SECTION)
    print(section)


if __name__ == "__main__":
    main()
