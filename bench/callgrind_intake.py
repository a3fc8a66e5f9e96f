"""Intake cost in instructions per event, under callgrind: the figure noise cannot move.

    .venv/bin/python bench/callgrind_intake.py           # ~3 minutes, writes RESULTS.md
    .venv/bin/python bench/callgrind_intake.py --no-write

On a shared machine, requests per second move with whatever else runs, and even CPU time
per event moves with cache and sibling-thread contention. Instructions executed per
event do not: callgrind counts the same total for the same program and input whatever
the machine is doing. So this bench answers "did the daemon's intake get cheaper?"
exactly, where bench/run_intake.py answers "how fast is it here, now?".

For the baseline (bench/baseline_server.py) and the daemon, on asyncio and on uvloop:
  1. start the server under `valgrind --tool=callgrind --instr-atstart=no` (imports run
     uninstrumented, so start-up takes seconds, not minutes);
  2. switch instrumentation on (callgrind_control -i on), warm up;
  3. zero the counters, send exactly --requests single events (a fixed-count client over
     --connections keep-alive connections; wrk only knows durations, and requests still
     in flight when it stops would be counted in Ir but not in requests), dump the
     counters: instructions / events = Ir per event; the same for --batches of 100.

The daemon's forwarding is switched off here (rate_limit 1 request per hour): under
callgrind the daemon takes events ~50x slower while the rate gate still sends ~166
requests/s, which would charge each event ~50x its real share of forwarding. So this is
the intake path alone (HTTP, validate, dedup, queue, metrics); bench/run_intake.py
measures the daemon with forwarding on.

Counted: user-space instructions of the server process (Python, aiohttp's C parser,
orjson, libc). Not counted: the kernel's work per request (socket reads and writes,
epoll), which is the same for both servers, so the Ir ratio is lower than a time ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import run_intake as ri

SECTION = ("<!-- intake-callgrind:start -->", "<!-- intake-callgrind:end -->")


def callgrind_control(*args: str) -> str:
    r = subprocess.run(["callgrind_control", *args], check=False, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)}: {r.stderr}{r.stdout}")
    return r.stdout


def dumped_total(workdir: Path, pid: int, before: set[Path]) -> int:
    """Total Ir of the dump callgrind_control -d just wrote (waits for the file)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = sorted(set(workdir.glob(f"callgrind.{pid}*")) - before)
        for f in new:
            text = f.read_text(errors="replace")
            m = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.MULTILINE)
            if m:
                return int(m.group(1))
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


class CallgrindServers(ri.Servers):
    """Servers, but each runs under callgrind with instrumentation off until asked."""

    @contextlib.contextmanager
    def running(self, t: ri.Target):
        port = ri.free_port()
        argv, shown = self.command(t, port)
        out_file = self.workdir / "callgrind.%p"
        valgrind = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out_file}",
        ]
        env = "PYTHONPATH=bench/.deps " if t.loop == "uvloop" else ""
        self.commands[t.label] = (
            f"{env}{ri.pin_shown(ri.SERVER_CPU)} valgrind --tool=callgrind --instr-atstart=no "
            + shown
        )
        log = self.workdir / f"{t.kind}-{t.loop}-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*ri.pin(ri.SERVER_CPU), *valgrind, *argv],
                cwd=ri.ROOT,
                env=ri.python_env(t.loop),
                stdout=out,
                stderr=out,
            )
        try:
            ri.wait_port(port, proc, log, timeout=300)
            yield port, proc, log
        finally:
            ri.stop(proc, grace=60)


class Client:
    """Sends exactly n requests over `connections` keep-alive connections, and checks each
    answer, so the instruction count divides by a known number of events."""

    def __init__(self, connections: int, batch: int):
        self.connections = connections
        self.batch = batch
        self.counter = 0
        self.created_at = int(time.time()) - 60

    def body(self, mode: str) -> bytes:
        self.counter += 1
        if mode == "single":
            return ri.event_body(self.counter, self.created_at)
        return (
            b"["
            + b",".join(ri.event_body(self.counter, self.created_at, j) for j in range(1, self.batch + 1))
            + b"]"
        )

    def run(self, port: int, mode: str, requests: int) -> int:
        path = "/events" if mode == "single" else "/events/batch"
        bodies = [self.body(mode) for _ in range(requests)]
        chunks = [bodies[k :: self.connections] for k in range(self.connections)]
        errors: list[str] = []

        def send(chunk: list[bytes]) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            for b in chunk:
                conn.request("POST", path, b, {"Content-Type": "application/json"})
                r = conn.getresponse()
                answer = r.read()
                if r.status != 202 or (mode == "batch" and b'"duplicates":0' not in answer):
                    errors.append(f"{r.status} {answer[:200]!r}")
            conn.close()

        threads = [threading.Thread(target=send, args=(c,)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"{len(errors)} bad answers, first: {errors[0]}")
        return requests * (1 if mode == "single" else self.batch)


def measure_target(servers: CallgrindServers, client: Client, t: ri.Target, args) -> dict:
    out: dict[str, float] = {}
    with servers.running(t) as (port, proc, _log):
        callgrind_control("-i", "on", str(proc.pid))
        for mode, n, warm in (
            ("single", args.requests, args.requests // 5),
            ("batch", args.batches, max(1, args.batches // 5)),
        ):
            client.run(port, mode, warm)
            callgrind_control("-z", str(proc.pid))
            events = client.run(port, mode, n)
            before = set(servers.workdir.glob(f"callgrind.{proc.pid}*"))
            callgrind_control("-d", str(proc.pid))
            total = dumped_total(servers.workdir, proc.pid, before)
            out[mode] = total / events
            out[f"{mode}_events"] = events
            print(
                f"  {t.label:17} {mode:6} {out[mode]:>12,.0f} Ir/event ({events} events)",
                flush=True,
            )
    return out


def render(results: dict[str, dict], args, machine: dict, commands: dict) -> str:
    lines = [
        SECTION[0],
        "## Intake, instructions per event (callgrind)",
        "",
        (f"Measured {machine['date']} on {machine['nproc']} cores ({machine['cpu']}), "
        f"Python {machine['python']}, aiohttp {machine['aiohttp']}, orjson {machine['orjson']}, "
        f"uvloop {machine['uvloop']}, "
        f"commit {machine['commit']}. Under callgrind: {args.requests} single events and "
        f"{args.batches} batches of {args.batch}, each after a fifth as many to warm up, "
        f"over {args.connections} keep-alive connections. The daemon's forwarding is off "
        "(intake path only); see bench/callgrind_intake.py."),
        "",
        "Reproduce: `.venv/bin/python bench/callgrind_intake.py`",
        "",
        "| figure | loop | daemon | baseline | baseline / daemon |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for loop in ("asyncio", "uvloop"):
        b, d = results.get(f"baseline/{loop}"), results.get(f"daemon/{loop}")
        for mode, name in (("single", "single events"), ("batch", f"batches of {args.batch}")):
            if b and d:
                lines.append(
                    f"| {name}, Ir/event | {loop} | {d[mode]:,.0f} | {b[mode]:,.0f} | "
                    f"{b[mode] / d[mode]:.2f} |"
                )
    if "daemon/uvloop" in results and "daemon/asyncio" in results:
        lines += ["", "uvloop / asyncio, Ir per event (below 1: uvloop executes fewer):", ""]
        lines += ["| target | single | batch |", "| --- | ---: | ---: |"]
        for kind in ("baseline", "daemon"):
            u, x = results[f"{kind}/uvloop"], results[f"{kind}/asyncio"]
            lines.append(
                f"| {kind} | {u['single'] / x['single']:.2f} | {u['batch'] / x['batch']:.2f} |"
            )
    lines += ["", "Servers (the load is callgrind_intake.py's own fixed-count client):", ""]
    lines += [f"- {k}: `{v}`" for k, v in commands.items()]
    lines.append(SECTION[1])
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description="Intake instructions per event under callgrind.")
    p.add_argument("--requests", type=int, default=1500, help="single events measured")
    p.add_argument("--batches", type=int, default=40, help="batches measured")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--python", default=str(ri.ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--loops", default="asyncio,uvloop")
    p.add_argument("--kinds", default="baseline,daemon",
                   help="daemon alone: compare commits or variants of the daemon faster")
    p.add_argument("--keep-dumps", default="",
                   help="copy the callgrind dumps here, for callgrind_annotate")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    loops = [lp for lp in args.loops.split(",") if lp]
    uv = ri.uvloop_available(args.python)
    if "uvloop" in loops and not uv:
        loops.remove("uvloop")
        print("uvloop not importable (pip install --target bench/.deps uvloop): asyncio only")
    os.sched_setaffinity(0, {int(ri.CLIENT_CPU)})
    client = Client(args.connections, args.batch)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        workdir = Path(tmp)
        sink_port, sink = ri.start_sink(args.python, workdir)
        try:
            servers = CallgrindServers(args.python, "serve", workdir, sink_port, 4_000_000)
            # No forwarding while measured (see the module docstring).
            servers.extra = ri.FORWARDING_OFF
            for loop in loops:
                for kind in args.kinds.split(","):
                    t = ri.Target(kind, loop)
                    results[t.label] = measure_target(servers, client, t, args)
        finally:
            ri.stop(sink)
            if args.keep_dumps:
                Path(args.keep_dumps).mkdir(parents=True, exist_ok=True)
                for dump in workdir.glob("callgrind.*"):
                    shutil.copy(dump, args.keep_dumps)
    commands = dict(servers.commands)
    machine = ri.machine(args.python, uv)
    section = render(results, args, machine, commands)
    (ri.BENCH / "results-callgrind.json").write_text(json.dumps(results, indent=1))
    if not args.no_write:
        ri.write_section(section, markers=SECTION)
    print(section)


if __name__ == "__main__":
    main()
