"""Shutdown benchmark: SIGTERM with 10,000 events queued and Intercom unreachable.

    .venv/bin/python bench/shutdown.py                      # ~2 minutes, writes RESULTS.md
    .venv/bin/python bench/shutdown.py --upstream silent    # only: accepts, never answers
    .venv/bin/python bench/shutdown.py --repeat 10 --skip-restart   # exit times only

Target: the daemon exits within shutdown.drain_seconds + 1 s, all 10,000 events are in
the spool, and all are delivered after a restart.

Steps, --repeat times for each --upstream kind (closed, silent), each on a fresh state_dir:
  1. `intercom-forwarder serve` (subprocess, CPU 0) with intercom.base_url at 127.0.0.1:
     a closed port (`--upstream closed`: every send is refused at once and retried with
     backoff) or a socket that accepts and never answers (`--upstream silent`: sends hang
     until intercom.timeout_seconds, so the stop has sends in flight to cut off).
  2. POST /events/batch, 10,000 unique ~350-byte events in batches of 500; all must be
     accepted (202, none duplicate, none rejected).
  3. SIGTERM; time from the signal to the process's exit, and its exit code.
  4. Count the lines of state_dir/spool.jsonl (and dead-letter.jsonl: must be empty) and
     the spool's bytes per event; check that the spool holds exactly the posted user_ids.
  Then, on the last state_dir:
  5. Start a FakeIntercom (budget --budget per --window s; the daemon's rate_limit is set
     to the same) and the daemon again on the same state_dir; time from the start until
     the fake has all 10,000 (unique user_ids), beside the least time the budget allows.
  6. SIGTERM again: exit code 0 and no spool left.

Prints a summary and replaces the marked shutdown section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forwarding import (
    HARNESS_CPU,
    TOKEN,
    Daemon,
    FakeIntercom,
    free_port,
    machine,
    post_events,
    tail,
    write_config,
    write_section,
)

MARKERS = ("<!-- shutdown:start -->", "<!-- shutdown:end -->")
RUN = 900  # user_id prefix of this bench's events (forwarding.py uses its scenario number)


@contextlib.contextmanager
def unreachable(kind: str):
    """A base URL on 127.0.0.1 where Intercom is unreachable; yields the URL."""
    if kind == "closed":
        yield f"http://127.0.0.1:{free_port()}"  # bound once, then closed: nothing listens
        return
    # "silent": the kernel completes every handshake into the backlog; nobody ever reads
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def spool_user_ids(path: Path) -> set[str]:
    ids = set()
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for line in f:
            if line.strip():
                ids.add(orjson.loads(line)["body"]["user_id"])
    return ids


async def wait_exit(proc, timeout: float) -> float | None:
    """Seconds until proc exits (polled every 5 ms), or None after timeout."""
    started = time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - started > timeout:
            return None
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def stop_timeline(log: Path, sigterm_wall: float) -> dict[str, float]:
    """Seconds from SIGTERM to each stop step, from the daemon's JSON log timestamps."""
    steps = {
        "service.drain_started": "drain_started",
        "spool.written": "spool_written",
        "service.stopped": "stopped",
    }
    out = {}
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError):
            rec = json.loads(line)
            if rec["event"] in steps:
                ts = dt.datetime.fromisoformat(rec["timestamp"])
                out[steps[rec["event"]]] = ts.timestamp() - sigterm_wall
    return out


async def stop_phase(args: argparse.Namespace, kind: str, run_dir: Path) -> dict:
    """Steps 1-4 on a fresh state_dir under run_dir."""
    state = run_dir / "state"
    cfg = run_dir / "forwarder.toml"
    port = free_port()
    r: dict = {}
    async with aiohttp.ClientSession() as session:
        with unreachable(kind) as base_url:
            write_config(
                cfg,
                port=port,
                base_url=base_url,
                state_dir=state,
                requests=1666,
                per_seconds=10.0,
                concurrency=32,
                drain_seconds=args.drain_seconds,
            )
            daemon = Daemon(cfg, port, run_dir / "daemon-1.log")
            daemon.start()
            try:
                await daemon.wait_ready(session)
                t = time.monotonic()
                r["accepted"] = await post_events(session, port, 0, args.events, RUN)
                r["post_s"] = time.monotonic() - t
                await asyncio.sleep(args.settle)  # let the workers reach steady failing
                assert daemon.proc is not None
                sigterm_wall = time.time()
                daemon.proc.send_signal(signal.SIGTERM)
                r["exit_s"] = await wait_exit(daemon.proc, args.drain_seconds + 30)
                r["exit_code"] = daemon.proc.returncode
            finally:
                daemon.kill()
    spool = state / "spool.jsonl"
    r["spooled"] = count_lines(spool)
    r["spool_bytes"] = spool.stat().st_size if spool.exists() else 0
    r["spool_ids_match"] = spool_user_ids(spool) == {
        f"user-{RUN:03d}-{n:08d}" for n in range(args.events)
    }
    r["dead_lettered"] = count_lines(state / "dead-letter.jsonl")
    r["timeline"] = stop_timeline(daemon.log, sigterm_wall)
    r["log_tail"] = tail(daemon.log, 5)
    return r


async def restart_phase(args: argparse.Namespace, run_dir: Path) -> dict:
    """Steps 5-6: Intercom back (a fake with a fixed budget), restart on the same state_dir."""
    state = run_dir / "state"
    cfg = run_dir / "forwarder.toml"
    port = free_port()
    r: dict = {}
    fake = FakeIntercom(token=TOKEN, budget=args.budget, window_seconds=args.window)
    await fake.start()
    try:
        write_config(
            cfg,
            port=port,
            base_url=fake.url,
            state_dir=state,
            requests=args.budget,
            per_seconds=args.window,
            concurrency=32,
            drain_seconds=args.drain_seconds,
        )
        daemon = Daemon(cfg, port, run_dir / "daemon-2.log")
        async with aiohttp.ClientSession() as session:
            t, t_wall = time.monotonic(), time.time()
            daemon.start()
            try:
                await daemon.wait_ready(session)
                r["restart_ready_s"] = time.monotonic() - t
                timeout = args.events / args.budget * args.window + 3 * args.window + 30
                try:
                    await fake.wait_for_delivered(args.events, timeout=timeout)
                except TimeoutError as exc:
                    r["restart_error"] = str(exc)
                r["restart_delivered_s"] = time.monotonic() - t
                assert daemon.proc is not None
                daemon.proc.send_signal(signal.SIGTERM)
                r["restart_exit_s"] = await wait_exit(daemon.proc, args.drain_seconds + 30)
                r["restart_exit_code"] = daemon.proc.returncode
            finally:
                daemon.kill()
    finally:
        await fake.stop()
    delivered_ids = [e.get("user_id") for e in fake.delivered]
    r["delivered"] = len(fake.delivered)
    r["delivered_unique"] = len(set(delivered_ids))
    r["delivered_ids_match"] = set(delivered_ids) == {
        f"user-{RUN:03d}-{n:08d}" for n in range(args.events)
    }
    r["resent_duplicates"] = fake.duplicates
    r["rate_limited"] = fake.rate_limited
    r["requests"] = len(fake.requests)
    r["spool_after_restart"] = count_lines(state / "spool.jsonl")
    # least time the budget allows: a full budget in every window from the restart's own
    # (partial) one, so all are in once the window holding the last one has begun
    windows = math.ceil(args.events / args.budget)
    r["restart_min_s"] = (math.floor(t_wall / args.window) + windows - 1) * args.window - t_wall
    return r


async def run(args: argparse.Namespace, workdir: Path) -> dict:
    """--repeat stop phases per upstream kind, each on its own state_dir; then the last
    one's spool is restarted."""
    stops: dict[str, list[dict]] = {}
    run_dir = workdir
    for kind in args.upstream.split(","):
        for n in range(args.repeat):
            run_dir = workdir / f"{kind}-{n}"
            run_dir.mkdir()
            s = await stop_phase(args, kind, run_dir)
            stops.setdefault(kind, []).append(s)
            print(
                f"{kind} stop {n + 1}/{args.repeat}: exit {s['exit_s']:.3f} s "
                f"(code {s['exit_code']}), spooled {s['spooled']}, "
                f"timeline {s['timeline']}",
                flush=True,
            )
    r: dict = {"stops": stops, "restarted": None}
    if not args.skip_restart:
        r["restarted"] = run_dir.name
        r |= await restart_phase(args, run_dir)
    return r


MARK = {True: "meets", False: "**misses**"}
WHAT = {
    "closed": "closed port (connection refused)",
    "silent": "accepts, never answers (sends hang)",
}


def stop_rows(kind: str, runs: list[dict], args: argparse.Namespace) -> list[str]:
    limit = args.drain_seconds + 1
    exits = [s["exit_s"] for s in runs if s["exit_s"] is not None]
    exit_ok = (
        len(exits) == len(runs) and max(exits) <= limit and all(s["exit_code"] == 0 for s in runs)
    )
    codes = sorted({s["exit_code"] for s in runs})
    if len(runs) > 1:
        shown = (
            f"max {max(exits):.2f} s (median {statistics.median(exits):.2f}, "
            f"min {min(exits):.2f}; {len(runs)} runs)"
        )
    else:
        shown = f"{exits[0]:.2f} s" if exits else "did not exit"
    spool_ok = all(s["spooled"] == args.events and s["spool_ids_match"] for s in runs)
    last = runs[-1]
    tl = {
        k: statistics.median(s["timeline"].get(k, math.nan) for s in runs)
        for k in ("drain_started", "spool_written", "stopped")
    }
    tl["exited"] = statistics.median(exits) if exits else math.nan
    timeline = ", ".join(f"{k.replace('_', ' ')} +{v:.2f}" for k, v in tl.items())
    per_event = last["spool_bytes"] / max(1, last["spooled"])
    spooled = ", ".join(f"{s['spooled']:,}" for s in runs)
    return [
        (
            f"| {WHAT[kind]}: SIGTERM to exit (exit code {', '.join(map(str, codes))}) | {shown} "
            f"| ≤ drain_seconds + 1 s = {limit:g} s | {MARK[exit_ok]} |"
        ),
        f"| {WHAT[kind]}: after SIGTERM, median s | {timeline} | | |",
        (
            f"| {WHAT[kind]}: events in the spool | "
            f"{spooled} of {args.events:,}"
            f"{'' if all(s['spool_ids_match'] for s in runs) else ' (user_ids differ)'} "
            f"| all | {MARK[spool_ok]} |"
        ),
        (
            f"| {WHAT[kind]}: spool bytes per event | {per_event:.0f} "
            f"({last['spool_bytes']:,} bytes) | | |"
        ),
        (
            f"| {WHAT[kind]}: dead-lettered before the stop | "
            f"{sum(s['dead_lettered'] for s in runs)} | 0 | "
            f"{MARK[all(s['dead_lettered'] == 0 for s in runs)]} |"
        ),
    ]


def render(r: dict, args: argparse.Namespace, m: dict, command: str) -> str:
    start, end = MARKERS
    lines = [
        start,
        "## Shutdown with Intercom unreachable",
        "",
        (
            f"Measured {m['date']} on {m['nproc']} cores ({m['cpu']}), Python {m['python']}, "
            f"commit {m['commit']}, load average {m['loadavg']} at the start. The daemon "
            f"(`intercom-forwarder serve`, CPU 0, drain_seconds = {args.drain_seconds:g}) gets "
            f"{args.events:,} unique ~350-byte events in batches of 500 while its Intercom "
            f"base_url is unreachable on 127.0.0.1, then SIGTERM {args.settle:g} s later. "
            f"Then a fake Intercom with {args.budget} requests per {args.window:g} s comes up and "
            f"the daemon restarts on the same state_dir with the same rate budget."
        ),
        "",
        f"Reproduce: `{command}`",
        "",
        "| figure | measured | target | |",
        "| --- | --- | --- | --- |",
    ]
    for kind, runs in r["stops"].items():
        lines += stop_rows(kind, runs, args)
    if r["restarted"]:
        deliv_ok = (
            r["delivered_unique"] == args.events
            and r["delivered_ids_match"]
            and r["spool_after_restart"] == 0
        )
        lines += [
            (
                f"| restart on the spool of {r['restarted']}: delivered (unique user_ids) "
                f"| {r['delivered_unique']:,} of {args.events:,} | all | {MARK[deliv_ok]} |"
            ),
            (
                f"| restart to all delivered | {r['restart_delivered_s']:.1f} s (the budget "
                f"allows {r['restart_min_s']:.1f} s at best) | | |"
            ),
            f"| 429s / requests after restart | {r['rate_limited']} / {r['requests']:,} | | |",
            (
                f"| spool left after a second SIGTERM (exit code {r['restart_exit_code']}) "
                f"| {r['spool_after_restart']} lines | 0 | |"
            ),
        ]
    lines.append("")
    if r.get("restart_error"):
        lines += [f"Restart: {r['restart_error']}", ""]
    lines.append(end)
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="SIGTERM with events queued and Intercom unreachable (see bench/README.md)."
    )
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--drain-seconds", type=float, default=5.0)
    p.add_argument(
        "--upstream",
        default="closed,silent",
        help="closed (connection refused), silent (never answers), or both",
    )
    p.add_argument(
        "--settle", type=float, default=1.0, help="seconds between the last batch and SIGTERM"
    )
    p.add_argument("--budget", type=int, default=1666, help="fake's budget after restart")
    p.add_argument("--window", type=float, default=10.0, help="its window, seconds")
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="stop phases per upstream kind (exit time over all); the last one is restarted",
    )
    p.add_argument(
        "--skip-restart",
        action="store_true",
        help="stop phase only (no restart, RESULTS.md untouched)",
    )
    p.add_argument("--no-write", action="store_true", help="leave RESULTS.md untouched")
    return p


def main() -> int:
    args = parser().parse_args()
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {int(HARNESS_CPU)})
    m = machine()
    with tempfile.TemporaryDirectory(prefix="bench-shutdown-") as tmp:
        r = asyncio.run(run(args, Path(tmp)))
    defaults = parser().parse_args([])
    flags = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k not in ("no_write", "skip_restart") and v != getattr(defaults, k)
    ]
    section = render(r, args, m, " ".join([".venv/bin/python bench/shutdown.py", *flags]))
    print(section)
    if not args.no_write and not args.skip_restart:
        write_section(section, MARKERS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
