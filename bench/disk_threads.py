"""Where a disk-mode daemon's CPU goes, per thread, in batches of 100; and an A/B of it.

    flock /tmp/bench.lock .venv/bin/python bench/disk_threads.py
    flock /tmp/bench.lock .venv/bin/python bench/disk_threads.py --ref 46b0f16 --rounds 3

Each slot is a fresh daemon as in bench/disk_http.py (alone on CPU 0, wrk -c32 and the
sink on CPU 1, forwarding at its default pace), loaded with batches of 100 for --seconds
after a 1 s warm-up. Around the measured run the daemon's threads' CPU times are read
from /proc/<pid>/task/<tid>/stat: CPU µs per accepted event for the event loop's
thread, the disk log's writer and its checkpointer (named by their order of creation:
the writer starts first). Targets: memory, disk normal with this checkout's code, and
with --ref, disk normal with REF's code (a git worktree). They run in A B C C B A order
per round, so a steady drift falls on all alike; the ratios of events/s are per round,
then the median. Prints only.

bench/disk_http.py judges issue 13's targets; this says which thread a change moved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import ab_intake as ab
import disk_http as dh
import run_intake as ri

TICKS = os.sysconf("SC_CLK_TCK")
THREAD_NAMES = ("loop", "writer", "checkpointer")  # by tid order: the loop's is the pid


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each of the process's threads, by tid."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue  # a thread that just ended
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICKS
    return out


def measure(daemons: dh.Daemons, wrk: ri.Wrk, target: str, tree: Path, seconds: int) -> dict:
    queue_type = "memory" if target == "memory" else "normal"
    with daemons.running(queue_type, tree=tree) as (port, proc):
        ri.check_target(wrk, port, target)
        ri.settle_forwarding(daemons.sink_port)
        wrk.run(port, "batch", 1)
        cpu_before, count_before = thread_cpu(proc.pid), ri.scrape_counts(port)
        started = time.monotonic()
        wrk.run(port, "batch", seconds)
        elapsed = time.monotonic() - started
        cpu_after, count_after = thread_cpu(proc.pid), ri.scrape_counts(port)
    events = count_after["accepted"] - count_before["accepted"]
    per_thread = {}
    for n, tid in enumerate(sorted(cpu_after)):
        if n < len(THREAD_NAMES):  # aiohttp's resolver threads etc., if any, are left out
            used = cpu_after[tid] - cpu_before.get(tid, 0.0)
            per_thread[THREAD_NAMES[n]] = used * 1e6 / events
    return {"events_s": events / elapsed, "us_event": per_thread}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", help="also measure disk normal with this git ref's code")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-disk-threads-") as tmp:
        workdir = Path(tmp)
        trees = {"memory": ri.ROOT, "disk": ri.ROOT}
        if args.ref:
            trees[f"disk {args.ref}"] = ab.worktree(args.ref, workdir / "ref")
        sink_port, sink = ri.start_sink(str(ri.ROOT / ".venv" / "bin" / "python"), workdir)
        daemons = dh.Daemons(workdir, sink_port, 1 << 34)
        wrk = ri.Wrk(connections=32, threads=1, batch=100)
        runs: list[tuple[int, str, dict]] = []
        try:
            for round_ in range(args.rounds):
                for target in [*trees, *reversed(trees)]:
                    result = measure(daemons, wrk, target, trees[target], args.seconds)
                    runs.append((round_, target, result))
                    threads = "  ".join(f"{k} {v:5.1f}" for k, v in result["us_event"].items())
                    print(f"round {round_ + 1} {target:18} {result['events_s']:9,.0f} ev/s"
                          f"  CPU µs/event: {threads}", flush=True)
        finally:
            sink.terminate()
            if args.ref:
                subprocess.run(["git", "-C", str(ri.ROOT), "worktree", "remove", "--force",
                                str(trees[f"disk {args.ref}"])], check=False, capture_output=True)
    print("\nmedians over rounds (events/s ratio to memory per round; CPU µs/event):")
    for target in trees:
        ratios = []
        for round_ in range(args.rounds):
            def total(t: str, r: int = round_) -> float:
                return sum(x["events_s"] for r_, t_, x in runs if r_ == r and t_ == t)
            ratios.append(total(target) / total("memory"))
        mine = [x for _, t, x in runs if t == target]
        threads = {name: statistics.median(x["us_event"].get(name, 0.0) for x in mine)
                   for name in mine[0]["us_event"]}
        shown = "  ".join(f"{k} {v:.1f}" for k, v in threads.items())
        print(f"  {target:18} ratio {statistics.median(ratios):.2f}"
              f" ({min(ratios):.2f}-{max(ratios):.2f})  {shown}")


if __name__ == "__main__":
    main()
