"""Disk space of the durable queue: bytes per queued event, and per dedup key kept after
its event is delivered (what sizing queue.max_disk_bytes needs; docs/configuration.md).

    .venv/bin/python bench/disk_bytes.py                  # 300,000 events, ~30 s
    .venv/bin/python bench/disk_bytes.py --events 1000000

A DiskQueue (disk_sync normal, the 24 h key window) in a temporary directory takes
--events of the benches' ~350-byte events (bench/memory.py) with random 16-byte keys, in
commits of 1,000; the file is measured after an idle pass (checkpoint). Then every event
is taken and settled (delivered), as the workers do, and the file is measured again
after idle passes until the vacuum has given the freed pages back: what is left is the
dedup keys, which stay for dedup.window_seconds. Prints only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import structlog

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from forwarder.clock import SystemClock  # noqa: E402
from forwarder.diskqueue import DiskQueue  # noqa: E402
from forwarder.event import Event  # noqa: E402
from memory import make_body  # noqa: E402

KEY_WINDOW_S = 86_400.0  # dedup.window_seconds' default


async def idle_until_settled(queue: DiskQueue) -> None:
    """Idle passes (checkpoint, a vacuum step each) until the file stops shrinking."""
    before = -1
    while queue.bytes_on_disk != before:
        before = queue.bytes_on_disk
        await queue.log.maintain()


async def measure(events: int, directory: Path) -> tuple[float, int, int]:
    queue = DiskQueue(directory / "queue.db", SystemClock(), key_window_s=KEY_WINDOW_S)
    await queue.start()
    try:
        pool = [make_body(n) for n in range(10_000)]
        body_bytes = 0
        for start in range(0, events, 1000):
            # Received now, as the intake stamps them: a key's age counts from its event's
            # receipt, and an older one would expire before it is measured.
            now = time.time()
            for n in range(start, min(events, start + 1000)):
                body = pool[n % len(pool)]
                body_bytes += len(body)
                assert queue.offer(Event(body=body, key=os.urandom(16), first_received_at=now))
            await queue.commit()
        await idle_until_settled(queue)
        queued = queue.bytes_on_disk
        for _ in range(events):
            queue.settle(await queue.take())
        await queue.commit()
        await idle_until_settled(queue)
        return body_bytes / events, queued, queue.bytes_on_disk
    finally:
        await queue.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=300_000)
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="bench-disk-bytes-") as tmp:
        body, queued, keys = asyncio.run(measure(args.events, Path(tmp)))
    n = args.events
    print(f"{n:,} events queued (mean body {body:.0f} bytes): {queued / 1e6:.1f} MB, "
          f"{queued / n:.0f} bytes an event")
    print(f"all delivered, their dedup keys kept: {keys / 1e6:.1f} MB, {keys / n:.1f} bytes a key")


if __name__ == "__main__":
    main()
