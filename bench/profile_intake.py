"""Where the daemon's intake time goes: py-spy samples the daemon under the intake load.

    .venv/bin/python bench/profile_intake.py                  # single events, 10 s
    .venv/bin/python bench/profile_intake.py --mode batch     # batches of 100
    .venv/bin/python bench/profile_intake.py --loop uvloop

Needs py-spy (pip install --target bench/.deps py-spy). Starts the sink and the daemon as
bench/run_intake.py does (daemon on CPU 0, wrk, the sink and py-spy on CPU 1), checks the
daemon accepts every event, warms it up, then samples it while wrk drives it. py-spy reads
the daemon's memory from outside without stopping it (--nonblocking), so the sampling
costs the daemon next to nothing.

Writes bench/profiles/<target>-<mode>-<loop>.txt (collapsed stacks, for flamegraph.pl or
speedscope) and prints:
  - self time by function (where the CPU is actually spent),
  - inclusive time of the daemon's own functions and the main library entry points,
  - self time by package (forwarder, aiohttp, asyncio, prometheus_client, ...).
Shares are of the samples in which the daemon was running Python (idle samples are
dropped); they are shares of one core, because the daemon is single-threaded.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import run_intake as ri

PY_SPY = ri.DEPS / "bin" / "py-spy"
OUT_DIR = ri.BENCH / "profiles"
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def package(path: str) -> str:
    """A short package name for a source path."""
    p = path.replace("\\", "/")
    if "/forwarder/" in p or p.startswith("forwarder/"):
        return "forwarder/" + p.rsplit("/forwarder/", 1)[-1]
    m = re.search(r"site-packages/([^/]+)", p)
    if m:
        return m.group(1).removesuffix(".py")
    m = re.search(r"lib/python3\.\d+/([^/]+)", p)
    if m:
        return "stdlib:" + m.group(1).removesuffix(".py")
    return p


def summarise(collapsed: Path, top: int) -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    by_pkg: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        frames = stack.split(";")[1:]  # the first is the thread ("process 123:..." etc.)
        names = []
        for f in frames:
            m = FRAME.match(f)
            if m:
                names.append((m["func"], m["file"]))
            else:
                names.append((f, ""))
        if not names:
            continue
        total += count
        func, file = names[-1]
        self_t[f"{func}  ({package(file)})"] += count
        by_pkg[package(file).split("/")[0].split(":")[0] if file else "?"] += count
        seen = set()
        for func, file in names:
            key = f"{func}  ({package(file)})"
            if key not in seen:
                seen.add(key)
                incl[key] += count
    if not total:
        return "no samples"

    def table(title: str, counter: collections.Counter[str], n: int, keep=lambda k: True) -> str:
        rows = [f"{title} ({total} samples)"]
        for key, c in [kv for kv in counter.most_common() if keep(kv[0])][:n]:
            rows.append(f"  {100 * c / total:5.1f}%  {key}")
        return "\n".join(rows)

    interesting = ("forwarder/", "aiohttp", "prometheus_client", "structlog", "orjson")
    return "\n\n".join(
        [
            table("self time by function", self_t, top),
            table(
                "inclusive time, forwarder and library entry points",
                incl,
                top,
                lambda k: any(s in k for s in interesting),
            ),
            table("self time by package", by_pkg, 15),
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description="Profile the daemon's intake under load.")
    p.add_argument("--mode", choices=("single", "batch"), default="single")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--target", choices=("daemon", "baseline"), default="daemon")
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--python", default=str(ri.ROOT / ".venv" / "bin" / "python"))
    args = p.parse_args()
    if not PY_SPY.exists():
        raise SystemExit(
            "py-spy missing: .venv/bin/python -m pip install --target bench/.deps py-spy uvloop"
        )
    os.sched_setaffinity(0, {int(ri.CLIENT_CPU)})
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"{args.target}-{args.mode}-{args.loop}.txt"
    wrk = ri.Wrk(args.connections, 1, args.batch)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        workdir = Path(tmp)
        sink_port, sink = ri.start_sink(args.python, workdir)
        try:
            servers = ri.Servers(args.python, "serve", workdir, sink_port, 4_000_000)
            with servers.running(ri.Target(args.target, args.loop)) as (port, proc, _log):
                if args.target == "daemon":
                    ri.check_target(wrk, port, "daemon")
                    ri.settle_forwarding(sink_port)
                wrk.run(port, args.mode, 1)
                spy = subprocess.Popen(
                    [
                        *ri.pin(ri.CLIENT_CPU),
                        str(PY_SPY),
                        "record",
                        "--pid",
                        str(proc.pid),
                        "--rate",
                        str(args.rate),
                        "--duration",
                        str(args.duration),
                        "--format",
                        "raw",
                        "--output",
                        str(out),
                        "--nonblocking",
                        *(["--native"] if args.native else []),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                time.sleep(0.3)  # py-spy attaches
                summary, _ = wrk.run(port, args.mode, args.duration)
                spy_out = spy.communicate(timeout=60)[0].decode()
                if spy.returncode != 0:
                    raise SystemExit(f"py-spy failed: {spy_out}")
        finally:
            ri.stop(sink)
    rps = summary["requests"] / (summary["duration_us"] / 1e6)
    per = args.batch if args.mode == "batch" else 1
    print(
        f"{args.target}/{args.loop} {args.mode}: {rps * per:,.0f} events/s while sampled "
        f"(p50 {summary['latency_us']['p50'] / 1000:.2f} ms, "
        f"p99 {summary['latency_us']['p99'] / 1000:.2f} ms)\n"
        f"collapsed stacks: {out.relative_to(ri.ROOT)}\n"
    )
    print(summarise(out, args.top))


if __name__ == "__main__":
    main()
