"""Memory per dedup key and per queued event, measured with tracemalloc.

    .venv/bin/python bench/memory.py

Exits 1 if either is over its target: 150 bytes a key with 1,000,000 keys in the
DedupWindow, 1 KB an event with 100,000 ~350-byte events in the EventQueue (the Event,
its body and key bytes and the queue's own slots all count). Runs in well under 30 s.
"""

from __future__ import annotations

import gc
import hashlib
import os
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from forwarder.clock import FakeClock
from forwarder.dedup import DedupWindow
from forwarder.event import Event
from forwarder.queue import EventQueue
from forwarder.validate import validate_event

DEDUP_KEYS = 1_000_000
DEDUP_TARGET_B = 150
QUEUE_EVENTS = 100_000
QUEUE_TARGET_B = 1024
BODY_BYTES = 350


def measure_dedup() -> tuple[float, float, float]:
    """Bytes a key, with keys spread over the window's generations as real traffic is;
    then contains() in ns (without tracemalloc), beside a bare dict lookup of the same
    keys, because at 1e6 keys both are dominated by cache misses."""
    raw = os.urandom(16 * DEDUP_KEYS)
    keys = [raw[i : i + 16] for i in range(0, len(raw), 16)]  # digests, owned by intake
    clock = FakeClock()
    step_s = 0.9 * 86_400 / DEDUP_KEYS  # all within one 24 h window
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    window = DedupWindow(86_400, DEDUP_KEYS, clock)
    for key in keys:
        window.add(key)
        clock.advance(step_s)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(window) == DEDUP_KEYS
    per_key = (after - before) / DEDUP_KEYS

    probe = keys[:200_000]
    started = time.perf_counter()
    for key in probe:
        window.contains(key)
    per_op_ns = (time.perf_counter() - started) / len(probe) * 1e9

    bare = dict.fromkeys(int.from_bytes(key[:8], "little") for key in keys)
    started = time.perf_counter()
    for key in probe:
        bare.get(int.from_bytes(key[:8], "little"))
    bare_ns = (time.perf_counter() - started) / len(probe) * 1e9
    return per_key, per_op_ns, bare_ns


def make_body(n: int) -> bytes:
    body = orjson.dumps(
        {
            "event_name": "order-placed",
            "created_at": 1_700_000_000 + n,
            "user_id": f"user-{n:08d}",
            "email": f"customer{n:08d}@example.com",
            "metadata": {
                "order_number": f"A-{n:010d}",
                "price": {"amount": 3499, "currency": "eur"},
                "items": 3,
                "note": "",
            },
        }
    )
    pad = BODY_BYTES - len(body)
    return body.replace(b'"note":""', b'"note":"' + b"x" * pad + b'"')


def measure_queue() -> tuple[float, int]:
    """Bytes a queued event: each body and key created as intake would (own objects)."""
    clock = FakeClock()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    queue = EventQueue(QUEUE_EVENTS, clock)
    for n in range(QUEUE_EVENTS):
        body = make_body(n)
        key = hashlib.blake2b(body, digest_size=16).digest()
        assert queue.offer(Event(body=body, key=key, first_received_at=1_700_000_000.0 + n))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(queue) == QUEUE_EVENTS
    return (after - before) / QUEUE_EVENTS, len(make_body(0))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_queue_rss() -> float:
    """Resident bytes a queued event when it comes through validate_event as the intake's
    do: what an operator's RSS shows. tracemalloc cannot see allocator slack (orjson's
    ~4 KB write buffer behind each body was such slack: 4.1 KB an event before the fix),
    so this runs first, in a fresh process."""
    queue = EventQueue(QUEUE_EVENTS, FakeClock())
    gc.collect()
    before = _rss_bytes()
    for n in range(QUEUE_EVENTS):
        raw = orjson.loads(make_body(n))
        result = validate_event("default", raw, 1_700_000_000.0)
        assert queue.offer(result.event)
    gc.collect()
    return (_rss_bytes() - before) / QUEUE_EVENTS


def main() -> int:
    rss_per_event = measure_queue_rss()
    per_key, contains_ns, bare_ns = measure_dedup()
    per_event, body_len = measure_queue()
    dedup_ok = per_key < DEDUP_TARGET_B
    queue_ok = per_event < QUEUE_TARGET_B and rss_per_event < QUEUE_TARGET_B
    print(
        f"dedup: {per_key:.1f} bytes/key at {DEDUP_KEYS:,} keys "
        f"(target < {DEDUP_TARGET_B}) {'ok' if dedup_ok else 'OVER'}; "
        f"contains() {contains_ns:.0f} ns (a bare dict lookup: {bare_ns:.0f} ns)"
    )
    print(
        f"queue: {per_event:.1f} bytes/event at {QUEUE_EVENTS:,} events of {body_len} bytes "
        f"(target < {QUEUE_TARGET_B}) {'ok' if queue_ok else 'OVER'}; "
        f"resident memory through validate_event: {rss_per_event:.0f} bytes/event"
    )
    return 0 if dedup_ok and queue_ok else 1


if __name__ == "__main__":
    sys.exit(main())
