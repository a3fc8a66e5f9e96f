"""Queue-level cost of durability: memory vs disk (normal, full) in one run (issue 13).

    .venv/bin/python bench/disk_queue.py                    # ~3 minutes, writes RESULTS.md
    .venv/bin/python bench/disk_queue.py --quick --no-write # ~1 minute, prints only

Throughput: 32 concurrent "requests" (coroutines) on one event loop, each offering one
event (singles) or 100 (batches), then awaiting commit() before its next request, as
the intake will before answering 202. Memory mode is EventQueue with the no-op commit()
the lead adds to it. Every request also passes once through the loop
(asyncio.sleep(0)), as an HTTP request does. Each round measures each shape in
A B C C B A order, so that a steady drift on this shared machine falls on all targets
alike; a figure is the median over measurements, a ratio the median over rounds of a
target's two measurements against memory's two.

Figures: events/s and requests/s; request latency p50/p99 (offer to commit returned);
events per commit and commit latency p50/p99 (from the log's CommitStats: submission
to durable); process CPU (loop and writer thread) per event.

Backlog (subprocesses, so that each RSS is its own): one process offers --backlog events
(default 1,000,000, ~350-byte bodies) in requests of 1,000 and reports its RSS; a fresh
process then opens the file, takes the first event (time to both), and takes and
settles 10,000 more, with its RSS after each step. Memory mode's RSS with the same
backlog in an EventQueue is beside it.

These are queue-level figures: HTTP-level ones (wrk against the daemon) come with the
wiring into the service, where aiohttp's ~40 us a request is in both sides of a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from forwarder.clock import SystemClock  # noqa: E402
from forwarder.diskqueue import DiskQueue  # noqa: E402
from forwarder.event import Event  # noqa: E402
from forwarder.queue import EventQueue  # noqa: E402

RESULTS_JSON = BENCH / "results-disk-queue.json"
MARKERS = ("<!-- disk-queue:start -->", "<!-- disk-queue:end -->")
TARGETS = ("memory", "normal", "full")
BODIES = 10_000


def bodies() -> list[bytes]:
    from memory import make_body  # bench/memory.py: the ~350-byte events of the benches

    return [make_body(n) for n in range(BODIES)]


class MemoryQueue(EventQueue):
    """EventQueue with the commit() the lead adds to it: nothing to wait for."""

    async def commit(self) -> None:
        return None


# --------------------------------------------------------------------------- throughput


async def measure(target: str, batch: int, seconds: float, warmup: float, concurrency: int,
                  pool: list[bytes], directory: Path) -> dict:
    stats: list = []
    if target == "memory":
        queue: MemoryQueue | DiskQueue = MemoryQueue(50_000_000, SystemClock())
    else:
        queue = DiskQueue(directory / f"{target}-{time.monotonic_ns()}.db", SystemClock(),
                          disk_sync=target, max_bytes=1 << 40, on_commit=stats.append)
        await queue.start()
    counter = 0
    measuring = False
    latencies: list[float] = []
    events = 0

    async def request_loop(deadline: float) -> None:
        nonlocal counter, events
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            for _ in range(batch):
                n = counter
                counter += 1
                if not queue.offer(Event(body=pool[n % BODIES], key=n.to_bytes(16, "big"),
                                         first_received_at=1_700_000_000.0)):
                    raise RuntimeError("offer refused")
            await queue.commit()
            if measuring:
                latencies.append(time.perf_counter() - started)
                events += batch
            await asyncio.sleep(0)  # the request's own trip through the loop

    await asyncio.gather(*(request_loop(time.perf_counter() + warmup)
                           for _ in range(concurrency)))
    measuring = True
    del stats[:]
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(request_loop(t0 + seconds) for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    measuring = False
    if isinstance(queue, DiskQueue):
        await queue.stop()
    del queue
    gc.collect()
    latencies.sort()
    commit_latencies = sorted(s.latency_s for s in stats)
    return {
        "events_s": events / elapsed,
        "requests_s": len(latencies) / elapsed,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "cpu_us_event": cpu / events * 1e6,
        "commits": len(stats),
        "events_per_commit": sum(s.events for s in stats) / len(stats) if stats else None,
        "commit_p50_ms": pct(commit_latencies, 50) * 1000 if stats else None,
        "commit_p99_ms": pct(commit_latencies, 99) * 1000 if stats else None,
    }


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else 0.0


async def throughput(args: argparse.Namespace, directory: Path) -> dict:
    pool = bodies()
    runs: dict[str, dict[str, list[dict]]] = {
        shape: {t: [] for t in TARGETS} for shape in ("single", "batch")}
    for r in range(args.rounds):
        for shape, batch in (("single", 1), ("batch", args.batch)):
            for target in TARGETS + TARGETS[::-1]:  # A B C C B A: a linear drift cancels
                result = await measure(target, batch, args.seconds, args.warmup,
                                       args.concurrency, pool, directory)
                runs[shape][target].append(result)
                print(f"round {r + 1} {shape:6} {target:6} {result['events_s']:>10,.0f} ev/s"
                      f"  p99 {result['p99_ms']:.3f} ms", flush=True)
    return runs


def summarise(runs: dict) -> dict:
    """Medians over every measurement; a ratio per round (the mean of a target's two
    measurements over memory's two), then the median of those."""
    out: dict = {}
    for shape, per_target in runs.items():
        out[shape] = {}
        mem = per_target["memory"]
        for target, results in per_target.items():
            row = {k: statistics.median(r[k] for r in results)
                   for k in results[0] if results[0][k] is not None}
            ratios = [sum(r["events_s"] for r in results[i:i + 2])
                      / sum(r["events_s"] for r in mem[i:i + 2])
                      for i in range(0, len(results), 2)]
            row["ratio"] = statistics.median(ratios)
            row["ratio_range"] = (min(ratios), max(ratios))
            out[shape][target] = row
    return out


# --------------------------------------------------------------------------- backlog

FILL = r"""
import asyncio, json, sys, time
sys.path[:0] = [sys.argv[3], sys.argv[4]]
from forwarder.clock import SystemClock
from forwarder.diskqueue import DiskQueue
from forwarder.event import Event
from forwarder.queue import EventQueue
from memory import make_body

def rss():
    status = open("/proc/self/status").read().split("\n")
    get = lambda k: int(next(l for l in status if l.startswith(k)).split()[1]) * 1024
    return get("VmRSS:"), get("VmHWM:")

async def main(path, total):
    pool = [make_body(n) for n in range(10_000)]
    disk = path != "memory"
    queue = DiskQueue(path, SystemClock()) if disk else EventQueue(total + 1, SystemClock())
    if disk:
        await queue.start()
    counter = iter(range(total))
    started = time.perf_counter()

    async def requests():
        for _ in range(total // 1000 // 8):
            for _ in range(1000):
                n = next(counter)
                assert queue.offer(Event(body=pool[n % 10_000], key=n.to_bytes(16, "big"),
                                         first_received_at=1.7e9))
            if disk:
                await queue.commit()
            await asyncio.sleep(0)

    await asyncio.gather(*(requests() for _ in range(8)))
    fill_s = time.perf_counter() - started
    now, peak = rss()
    out = {"events": len(queue), "fill_s": fill_s, "rss": now, "rss_peak": peak}
    if disk:
        out["resident_events"] = queue.resident
        out["file_bytes"] = queue.bytes_on_disk
        started = time.perf_counter()
        await queue.stop()
        out["stop_s"] = time.perf_counter() - started
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""

REOPEN = r"""
import asyncio, json, sys, time
sys.path[:0] = [sys.argv[2]]
from forwarder.clock import SystemClock
from forwarder.diskqueue import DiskQueue

def rss():
    status = open("/proc/self/status").read().split("\n")
    return int(next(l for l in status if l.startswith("VmRSS:")).split()[1]) * 1024

async def main(path):
    out = {"rss_before": rss()}
    started = time.perf_counter()
    queue = DiskQueue(path, SystemClock())
    await queue.start()
    out["open_s"] = time.perf_counter() - started
    out["events"] = len(queue)
    await queue.take()
    out["first_take_s"] = time.perf_counter() - started
    out["rss_open"] = rss()
    for _ in range(10_000):
        queue.settle(await queue.take())
    await queue.commit()
    out["rss_after_10k"] = rss()
    out["resident_events"] = queue.resident
    await queue.stop()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"""


def child(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, cwd=ROOT, check=False)
    if done.returncode:
        raise RuntimeError(f"backlog child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def backlog(total: int, directory: Path) -> dict:
    path = directory / "backlog.db"
    print(f"backlog: filling {total:,} events (disk, normal)...", flush=True)
    fill = child(FILL, str(path), str(total), str(ROOT), str(BENCH))
    print("backlog: reopening...", flush=True)
    reopen = child(REOPEN, str(path), str(ROOT))
    print("backlog: memory mode with the same backlog...", flush=True)
    memory = child(FILL, "memory", str(total), str(ROOT), str(BENCH))
    return {"total": total, "fill": fill, "reopen": reopen, "memory": memory}


# --------------------------------------------------------------------------- report


def machine() -> dict:
    def out(cmd: list[str]) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              check=False).stdout.strip()

    dirty = out(["git", "status", "--porcelain", "--", "forwarder"])
    import sqlite3

    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "commit": out(["git", "rev-parse", "--short", "HEAD"])
        + (" + uncommitted changes in forwarder/" if dirty else ""),
        "loadavg": Path("/proc/loadavg").read_text().split()[0],
    }


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def report(args: argparse.Namespace, summary: dict, back: dict | None, env: dict,
           command: str) -> str:
    lines = [
        MARKERS[0],
        "## Disk queue (issue 13): memory vs disk, queue level",
        "",
        f"Measured {env['date']} on {env['nproc']} cores (load average {env['loadavg']} at"
        f" the end), Python {env['python']}, SQLite {env['sqlite']}, commit {env['commit']};"
        f" {args.rounds} rounds of A B C C B A per shape, {args.seconds:g} s a measurement"
        f" after {args.warmup:g} s of warm-up, {args.concurrency} concurrent requests.",
        "",
        f"Reproduce: `{command}`",
        "",
        "| figure | memory | disk normal | disk full |",
        "| --- | ---: | ---: | ---: |",
    ]
    s, b = summary["single"], summary["batch"]

    def row(name: str, cells: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def ratio(x: dict) -> str:
        lo, hi = x["ratio_range"]
        return f"{x['ratio']:.2f} ({lo:.2f}-{hi:.2f})"

    row("singles: events/s", [f"{s[t]['events_s']:,.0f}" for t in TARGETS])
    row("singles: ratio to memory (range)", ["1"] + [ratio(s[t]) for t in TARGETS[1:]])
    row("singles: request p50 / p99 ms",
        [f"{s[t]['p50_ms']:.3f} / {s[t]['p99_ms']:.3f}" for t in TARGETS])
    row(f"batches of {args.batch}: events/s", [f"{b[t]['events_s']:,.0f}" for t in TARGETS])
    row(f"batches of {args.batch}: ratio to memory (range)",
        ["1"] + [ratio(b[t]) for t in TARGETS[1:]])
    row(f"batches of {args.batch}: request p50 / p99 ms",
        [f"{b[t]['p50_ms']:.3f} / {b[t]['p99_ms']:.3f}" for t in TARGETS])
    for shape, x in (("singles", s), (f"batches of {args.batch}", b)):
        row(f"{shape}: events per commit",
            ["-"] + [f"{x[t]['events_per_commit']:,.0f}" for t in TARGETS[1:]])
        row(f"{shape}: commit latency p50 / p99 ms",
            ["-"] + [f"{x[t]['commit_p50_ms']:.2f} / {x[t]['commit_p99_ms']:.2f}"
                     for t in TARGETS[1:]])
        row(f"{shape}: process CPU us/event", [f"{x[t]['cpu_us_event']:.1f}" for t in TARGETS])
    if back is not None:
        fill, reopen, memory = back["fill"], back["reopen"], back["memory"]
        n = back["total"]
        lines += [
            "",
            f"Backlog of {n:,} events (~350-byte bodies), disk normal:",
            "",
            "| figure | value |",
            "| --- | ---: |",
            f"| filling it: time, events/s | {fill['fill_s']:.1f} s,"
            f" {n / fill['fill_s']:,.0f} |",
            f"| RSS of the process that queued them (peak) | {mb(fill['rss'])}"
            f" ({mb(fill['rss_peak'])}) |",
            f"| events held in its memory | {fill['resident_events']:,} |",
            f"| files on disk | {mb(fill['file_bytes'])} |",
            f"| stop (commit, checkpoint, close) | {fill['stop_s']:.2f} s |",
            f"| a fresh process: open | {reopen['open_s']:.2f} s |",
            f"| a fresh process: open and take the first event | {reopen['first_take_s']:.2f} s |",
            f"| its RSS: before open / after the first take / after 10,000 more taken"
            f" | {mb(reopen['rss_before'])} / {mb(reopen['rss_open'])} /"
            f" {mb(reopen['rss_after_10k'])} |",
            f"| memory mode, the same backlog in an EventQueue: RSS | {mb(memory['rss'])} |",
        ]
    lines += ["", "Ratios are disk / memory events per second; the targets (issue 13) are"
              " judged on the HTTP-level figures of the next section (bench/disk_http.py).",
              MARKERS[1], ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="Disk queue benchmark (see bench/README.md).")
    p.add_argument("--quick", action="store_true",
                   help="1 round, 2 s per figure, a 100,000-event backlog")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.5,
                   help="one measurement; each target gets two per round and shape")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--backlog", type=int, default=1_000_000)
    p.add_argument("--dir", type=Path, default=None,
                   help="where the SQLite files go (default: a temporary directory)")
    p.add_argument("--no-write", action="store_true", help="leave RESULTS.md untouched")
    args = p.parse_args()
    command = ".venv/bin/python bench/disk_queue.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a != "--no-write")
    if args.quick:
        args.rounds, args.seconds, args.backlog = 1, 1.0, 100_000
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        runs = asyncio.run(throughput(args, directory))
        summary = summarise(runs)
        back = backlog(args.backlog, directory) if args.backlog else None
    env = machine()
    publish(report(args, summary, back, env, command), MARKERS, RESULTS_JSON,
            {"machine": env, "runs": runs, "summary": summary, "backlog": back},
            write=not args.no_write and not args.quick)


def publish(text: str, markers: tuple[str, str], raw: Path, figures: dict,
            write: bool) -> None:
    """Print the section, keep the raw figures (git-ignored), and replace the section in
    RESULTS.md unless told not to. bench/disk_http.py publishes the same way."""
    print(text)
    raw.write_text(json.dumps(figures, indent=1, default=str))
    if write:
        import run_intake  # bench/ is on sys.path when this runs as a script

        run_intake.write_section(text, markers=markers)


if __name__ == "__main__":
    main()
