"""Cycle-collector pauses in the daemon under single-event load, with and without the
startup freeze (forwarder.cli.freeze_startup_heap).

    .venv/bin/python bench/gc_pauses.py              # ~1 minute, writes RESULTS.md
    .venv/bin/python bench/gc_pauses.py --no-write

Why: a full collection walks every container the collector tracks, and the queue's
deque is walked item by item, so its cost grows with the events held. `serve` freezes
what it built before serving (gc.freeze), which takes the queue and everything built at
start-up out of those walks. This bench shows what that does to the pauses and to p99.

How: for each mode the daemon (the same Service that `serve` runs, forwarding to
bench/sink.py) runs in a child process on CPU 0 with a gc.callbacks hook that times every
collection; wrk drives it from CPU 1 for --seconds at 32 connections, as in
bench/run_intake.py. The modes alternate --rounds times.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run_intake as ri

SECTION = ("<!-- gc-pauses:start -->", "<!-- gc-pauses:end -->")
MODES = ("frozen", "not frozen")


def serve(config: str, freeze: bool, report: str) -> None:
    """The child: the daemon's Service with every collection timed."""
    from forwarder.cli import freeze_startup_heap
    from forwarder.config import load_config
    from forwarder.service import Service

    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append((time.perf_counter() - started[0]) * 1000)

    async def main() -> None:
        service = Service(load_config(config))
        if freeze:
            freeze_startup_heap()
        running = asyncio.ensure_future(service.run())
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, done.set)
        await asyncio.sleep(0.5)
        for v in pauses.values():
            v.clear()  # start-up's collections are not the steady state
        gc.callbacks.append(timed)
        await done.wait()
        gc.callbacks.remove(timed)
        Path(report).write_text(json.dumps(pauses))
        service.request_stop()
        await running

    asyncio.run(main())


def measure(args, mode: str, workdir: Path, sink_port: int, offset: int) -> dict:
    port = ri.free_port()
    config = workdir / f"daemon-{port}.toml"
    ri.daemon_config(config, port, sink_port, workdir / f"state-{port}", 4_000_000)
    report = workdir / f"pauses-{port}.json"
    argv = [*ri.pin(ri.SERVER_CPU), args.python, __file__, "--serve", str(config),
            "--report", str(report)] + (["--freeze"] if mode == "frozen" else [])
    log = workdir / f"daemon-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ri.ROOT, env=ri.python_env("asyncio"),
                                stdout=out, stderr=out)
    try:
        ri.wait_port(port, proc, log)
        wrk = ri.Wrk(32, 1, 100)
        wrk.offset = offset
        wrk.run(port, "single", 1)
        summary, _ = wrk.run(port, "single", args.seconds)
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        pauses = {int(k): v for k, v in json.loads(report.read_text()).items()}
    finally:
        ri.stop(proc)
    lat = summary["latency_us"]
    return {"mode": mode, "pauses": pauses, "p99_ms": lat["p99"] / 1000,
            "p999_ms": lat["p999"] / 1000, "max_ms": lat["max"] / 1000,
            "rps": summary["requests"] / (summary["duration_us"] / 1e6)}


def render(results: list[dict], args, machine: dict) -> str:
    lines = [
        SECTION[0],
        "## Cycle-collector pauses under load",
        "",
        (f"Measured {machine['date']} on {machine['nproc']} cores ({machine['cpu']}), "
         f"Python {machine['python']}, commit {machine['commit']}. The daemon on CPU 0 "
         f"(asyncio, forwarding to bench/sink.py), wrk on CPU 1 at 32 connections for "
         f"{args.seconds} s per run, {args.rounds} runs per mode, alternating."),
        "",
        "Reproduce: `.venv/bin/python bench/gc_pauses.py`",
        "",
        ("| mode | full collections per run | full collection, median | longest | "
         "gen 0 and 1, longest | p99 | p99.9 | slowest request |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        runs = [r for r in results if r["mode"] == mode]
        full = [p for r in runs for p in r["pauses"][2]]
        young = [p for r in runs for g in (0, 1) for p in r["pauses"][g]]
        lines.append(
            f"| {mode} | {len(full) / len(runs):.1f} | "
            f"{statistics.median(full) if full else 0:.2f} ms | {max(full, default=0):.2f} ms | "
            f"{max(young, default=0):.2f} ms | "
            + " | ".join(f"{statistics.median(r[k] for r in runs):.2f} ms"
                         for k in ("p99_ms", "p999_ms", "max_ms")) + " |"
        )
    lines += ["", ("Latencies are wrk's, medians over the runs. wrk keeps 32 requests in flight, so"
              " at most 32 wait out a pause: a pause shows in p99.9 and the slowest request,"
              " not in p99. Apps that keep sending during a pause (not a closed loop) would"
              " see it in many more requests. `serve` runs in the frozen mode; see"
              " `freeze_startup_heap` in forwarder/cli.py."), SECTION[1]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--python", default=str(ri.ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--serve", help=argparse.SUPPRESS)  # the child's side
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--freeze", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.freeze, args.report)
        return
    os.sched_setaffinity(0, {int(ri.CLIENT_CPU)})
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as tmp:
        workdir = Path(tmp)
        sink_port, sink = ri.start_sink(args.python, workdir)
        try:
            offset = 0
            for r in range(args.rounds):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    offset += ri.OFFSET_STEP
                    res = measure(args, mode, workdir, sink_port, offset)
                    full = res["pauses"][2]
                    print(f"  run {r + 1} {mode:10} full collections {len(full)}, longest "
                          f"{max(full, default=0):.2f} ms; p99 {res['p99_ms']:.2f} ms, "
                          f"{res['rps']:,.0f} rps", flush=True)
                    results.append(res)
        finally:
            ri.stop(sink)
    section = render(results, args, ri.machine(args.python, None))
    if not args.no_write:
        ri.write_section(section, markers=SECTION)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
