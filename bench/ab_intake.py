"""A/B of the daemon's single-event intake at two commits, co-scheduled: the figure for
"did this change make the daemon faster?" on a machine whose speed drifts.

    .venv/bin/python bench/ab_intake.py baf343d HEAD                 # asyncio, ~1 minute
    .venv/bin/python bench/ab_intake.py HEAD~1 HEAD --loop uvloop --rounds 8
    .venv/bin/python bench/ab_intake.py HEAD~1 HEAD --mode batch     # POST /events/batch
    .venv/bin/python bench/ab_intake.py HEAD HEAD --loop-b uvloop    # does uvloop pay?
    .venv/bin/python bench/ab_intake.py baseline HEAD                # the floor, co-scheduled

Why co-scheduled: on this shared machine the speed of a core drifts by 15-25% over
seconds, so two daemons measured one after the other differ by that much on noise alone.
Here both daemons (each commit checked out in its own git worktree) run at the same time
on CPU 0, each driven by its own wrk on CPU 1 (bench/wrk/events.lua, 32 connections), so
every moment of drift falls on both. The kernel shares CPU 0 between them, so each gets
about half of it: the ratio of their requests per second (B / A) is the ratio of their
costs per request. Also printed: each one's CPU time per request (/proc), whose ratio
should agree.

What it is not: bench/run_intake.py's figure. Sharing a core costs both daemons cache
warmth, and each does its fixed forwarding work (~166 sends/s, to bench/sink.py) in half
a core, so both run slower here than alone. It compares two commits with each other, not
the daemon with the bare handler. An A/A run (the same ref twice) shows the noise floor:
on this machine within about 3% of 1.0.

`baseline` as a ref runs bench/baseline_server.py (the bare aiohttp handler) from this
checkout instead of a daemon, so `baseline HEAD` is the floor ratio (daemon / bare) with
the same co-scheduling. It leans slightly against the daemon: its fixed forwarding work
takes a larger share of half a core than of a whole one (bench/run_intake.py's figure).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path

import run_intake as ri


BASELINE = "baseline"  # a ref that names the bare handler, not a commit


def worktree(ref: str, where: Path) -> Path:
    if ref == BASELINE:
        return ri.ROOT
    subprocess.run(["git", "-C", str(ri.ROOT), "worktree", "add", "--detach", "--force",
                    str(where), ref], check=True, capture_output=True)
    return where


def spawn(tree: Path, loop: str, config: Path | None, port: int, workdir: Path,
          env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """The daemon of `tree` (or the bare handler: config None) on the server's CPU, not
    waited for; env_extra sets FORWARDER_* variables, e.g. the queue type. Returns the
    process and its log file."""
    env = ri.python_env(loop) | (env_extra or {})
    # The worktree's forwarder package comes first on sys.path: cwd is not the repo, and
    # PYTHONPATH precedes the dev venv's editable install.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    python = str(ri.ROOT / ".venv" / "bin" / "python")
    if config is None:  # the bare handler (BASELINE)
        argv = [python, str(ri.BENCH / "baseline_server.py"), "--port", str(port)]
        argv += ["--uvloop"] if loop == "uvloop" else []
    else:
        argv = ([python, str(ri.BENCH / "uvloop_serve.py")] if loop == "uvloop"
                else [python, "-m", "forwarder"]) + ["serve", "--config", str(config)]
    log = workdir / f"daemon-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*ri.pin(ri.SERVER_CPU), *argv], cwd=workdir, env=env,
                                stdout=out, stderr=out)
    return proc, log


def start(tree: Path, loop: str, config: Path | None, port: int, workdir: Path,
          env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    """spawn(), then wait until it listens."""
    proc, log = spawn(tree, loop, config, port, workdir, env_extra)
    ri.wait_port(port, proc, log)
    return proc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ref_a")
    p.add_argument("ref_b")
    p.add_argument("--rounds", type=int, default=6, help="even: the wrk start order alternates")
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--loop-b", choices=("asyncio", "uvloop"),
                   help="B's loop, when it differs from A's (--loop): HEAD HEAD --loop-b "
                        "uvloop asks whether uvloop pays")
    p.add_argument("--forwarding", choices=("on", "off"), default="on")
    p.add_argument("--mode", choices=("single", "batch"), default="single",
                   help="batch: POST /events/batch, 100 events a request")
    args = p.parse_args()
    os.sched_setaffinity(0, {int(ri.CLIENT_CPU)})
    python = str(ri.ROOT / ".venv" / "bin" / "python")
    if args.mode == "batch":
        path, per_request = "/events/batch", 100
        def wrk_args(offset: int) -> list[str]:
            return ["batch", str(offset), str(per_request)]
    else:
        path, per_request = "/events", 1
        def wrk_args(offset: int) -> list[str]:
            return ["single", str(offset)]
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        workdir = Path(tmp)
        refs = {"A": args.ref_a, "B": args.ref_b}
        trees = {side: worktree(ref, workdir / side.lower()) for side, ref in refs.items()}
        sink_port, sink = ri.start_sink(python, workdir)
        procs: dict[str, subprocess.Popen] = {}
        try:
            ports = {}
            for side, tree in trees.items():
                ports[side] = port = ri.free_port()
                config: Path | None = None
                if refs[side] != BASELINE:
                    config = workdir / f"{side}.toml"
                    ri.daemon_config(config, port, sink_port, workdir / f"state-{side}",
                                     4_000_000,
                                     ri.FORWARDING_OFF if args.forwarding == "off" else "")
                loop = args.loop_b if side == "B" and args.loop_b else args.loop
                procs[side] = start(tree, loop, config, port, workdir)
            ratios, cpu_ratios = [], []
            offset = 0
            for r in range(args.rounds + 1):  # round 0 warms both up
                c0 = {s: ri.cpu_seconds(pr.pid) for s, pr in procs.items()}
                runs = {}
                for side in ("A", "B") if r % 2 == 0 else ("B", "A"):  # who starts first
                    offset += ri.OFFSET_STEP
                    runs[side] = subprocess.Popen(
                        [*ri.pin(ri.CLIENT_CPU), "wrk", "-t1", "-c32", f"-d{args.seconds}s",
                         "-s", str(ri.LUA), f"http://127.0.0.1:{ports[side]}{path}", "--",
                         *wrk_args(offset)], stdout=subprocess.PIPE, text=True)
                out = {s: pr.communicate()[0] for s, pr in runs.items()}
                c1 = {s: ri.cpu_seconds(pr.pid) for s, pr in procs.items()}
                n = {s: int(re.search(r"(\d+) requests in", o).group(1)) for s, o in out.items()}
                if any("Non-2xx" in o for o in out.values()):
                    raise SystemExit(f"a daemon answered something other than 202: {out}")
                if r == 0:
                    continue
                us = {s: (c1[s] - c0[s]) / n[s] * 1e6 for s in n}
                ratios.append(n["B"] / n["A"])
                cpu_ratios.append(us["A"] / us["B"])
                rate = {s: n[s] * per_request / args.seconds for s in n}
                print(f"  round {r}: A {rate['A']:8,.0f} events/s {us['A']:6.1f} cpu-µs/req  "
                      f"B {rate['B']:8,.0f} events/s {us['B']:6.1f} cpu-µs/req  "
                      f"B/A {ratios[-1]:.3f}", flush=True)
        finally:
            for pr in procs.values():
                with contextlib.suppress(ProcessLookupError):
                    pr.send_signal(signal.SIGTERM)
            for pr in procs.values():
                ri.stop(pr)
            ri.stop(sink)
            for tree in trees.values():
                if tree == ri.ROOT:
                    continue
                subprocess.run(["git", "-C", str(ri.ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False, capture_output=True)
    loops = f"{args.loop_b} / {args.loop}" if args.loop_b else args.loop
    print(f"{args.ref_b} / {args.ref_a}, {args.mode}, {loops}, "
          f"forwarding {args.forwarding}: "
          f"requests/s {statistics.median(ratios):.3f} (range {min(ratios):.3f}-"
          f"{max(ratios):.3f}), CPU per request {statistics.median(cpu_ratios):.3f}, "
          f"median of {args.rounds} rounds")


if __name__ == "__main__":
    main()
