"""HTTP-level cost of durability (issue 13): memory vs disk normal vs disk full, real daemons.

    .venv/bin/python bench/disk_http.py                       # ~12 minutes, writes RESULTS.md
    .venv/bin/python bench/disk_http.py --quick --no-write    # ~3 minutes, prints only
    .venv/bin/python bench/disk_http.py --backlog 0           # throughput only
    .venv/bin/python bench/disk_http.py --rounds 0 --compare-ref c29a80d   # backlog only

Throughput: each round measures the three queue types in A B C C B A order, so a steady
drift on this shared machine falls on all alike. Each slot is a fresh daemon (`python -m
forwarder serve`, asyncio, alone on CPU 0, its writer thread included) with the queue type
set by FORWARDER_QUEUE__TYPE / __DISK_SYNC; wrk (bench/wrk/events.lua, 32 connections) and
bench/sink.py (the fake Intercom, 202 to everything) on CPU 1. As in bench/run_intake.py:
a 1 s check that every answer is a clean 202, the rate gate's opening burst waited out,
forwarding at its default pace meanwhile (so disk mode deletes what is delivered, as in
production), then per shape a warm-up and a measured wrk run. The daemon's /metrics is
read around the measured run: events per commit and mean commit latency are from its
histograms over exactly that run. A ratio is the sum of a target's two measurements in a
round over memory's two, then the median over rounds.

Backlog: a disk-mode daemon (forwarding off) is filled through POST /events/batch with
--backlog events, then killed with SIGKILL (an OOM kill: the WAL is left as it was). For
each start measured, the state dir is copied afresh and a new daemon (forwarding on, to a
fresh sink) is exec'd on it: the time from exec until the sink receives its first event
and until /readyz answers 200, and the daemon's RSS then and after --settle s of
forwarding (and its peak). With --compare-ref REF the same starts run with REF's code
too (a git worktree), in A B B A order: the figure for a change to the start path. Both
codes start on the one filled state dir, so REF must share this checkout's schema
version (disksql.SCHEMA_VERSION): an older code moves a newer file aside and salvages it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import ab_intake as ab
import run_intake as ri
from disk_queue import machine, publish

RESULTS_JSON = ri.BENCH / "results-disk-http.json"
MARKERS = ("<!-- disk-http:start -->", "<!-- disk-http:end -->")
TARGETS = ("memory", "normal", "full")
BATCH = 100
MIB = 1 << 20
NOTE_BACKLOG = ("The RSS at the first event is before the dedup window is reloaded (the workers"
                " start first); what /readyz adds is that window, dedup.max_keys (1,000,000)"
                " keys of the backlog's day. The intake opens once it is loaded.")
METRICS = ("intercom_forwarder_queue_events_per_commit_sum",
           "intercom_forwarder_queue_events_per_commit_count",
           "intercom_forwarder_queue_commit_latency_seconds_sum",
           "intercom_forwarder_queue_commit_latency_seconds_count",
           "intercom_forwarder_queue_disk_events")


def queue_env(target: str, max_disk_bytes: int) -> dict[str, str]:
    if target == "memory":
        return {}
    return {"FORWARDER_QUEUE__TYPE": "disk", "FORWARDER_QUEUE__DISK_SYNC": target,
            "FORWARDER_QUEUE__MAX_DISK_BYTES": str(max_disk_bytes)}


def scrape(port: int) -> dict[str, float]:
    """The disk queue's samples from the daemon's /metrics (absent: 0) and the intake's
    outcome counters (ri.scrape_counts)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {name: 0.0 for name in METRICS}
    for m in re.finditer(r"^(\w+) (\S+)$", text, re.MULTILINE):
        if m.group(1) in out:
            out[m.group(1)] = float(m.group(2))
    return out | ri.scrape_counts(port)


class Daemons:
    """Starts a daemon of this checkout (or of a worktree) per target, each with its own
    config and fresh state dir under workdir."""

    def __init__(self, workdir: Path, sink_port: int, max_disk_bytes: int):
        self.workdir = workdir
        self.sink_port = sink_port
        self.max_disk_bytes = max_disk_bytes
        self.n = 0

    def config(self, port: int, state_dir: Path, extra: str = "",
               sink_port: int | None = None) -> Path:
        self.n += 1
        path = self.workdir / f"daemon-{self.n}.toml"
        ri.daemon_config(path, port, sink_port or self.sink_port, state_dir, 4_000_000, extra)
        return path

    @contextlib.contextmanager
    def running(self, target: str, state_dir: Path | None = None, extra: str = "",
                tree: Path = ri.ROOT):
        port = ri.free_port()
        state_dir = state_dir or self.workdir / f"state-{self.n + 1}"
        proc = ab.start(tree, "asyncio", self.config(port, state_dir, extra), port,
                        self.workdir, queue_env(target, self.max_disk_bytes))
        try:
            yield port, proc
        finally:
            ri.stop(proc)


# --------------------------------------------------------------------------- throughput


def measure_slot(args: argparse.Namespace, daemons: Daemons, wrk: ri.Wrk, sink_pid: int,
                 target: str, round_: int) -> dict[str, dict]:
    """One fresh daemon: singles, then batches; wrk's figures, CPU and commit figures."""
    out = {}
    with daemons.running(target) as (port, proc):
        ri.check_target(wrk, port, target)
        ri.settle_forwarding(daemons.sink_port)
        for mode in ("single", "batch"):
            wrk.run(port, mode, args.warmup)
            before = scrape(port)
            m = ri.measure(sink_pid, wrk, ri.Target(target, "asyncio"), round_, mode, port,
                           proc.pid, 0, args.seconds)
            after = scrape(port)
            d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            commits = d["intercom_forwarder_queue_events_per_commit_count"]
            bad = {k: d.get(k, 0.0) for k in ("duplicate", "rejected", "queue_full")}
            if any(bad.values()) or m.errors.get("status"):
                raise RuntimeError(f"{target} {mode}: not every event accepted: {bad} "
                                   f"{m.errors}")
            out[mode] = {
                "events_s": m.events_per_s, "rps": m.rps, "p50_ms": m.p50_ms,
                "p99_ms": m.p99_ms, "cpu_us_event": m.cpu_us_per_event,
                "server_cpu": m.server_cpu, "other_load": m.other_load,
                "events_per_commit": (d["intercom_forwarder_queue_events_per_commit_sum"]
                                      / commits if commits else None),
                "commit_ms": (d["intercom_forwarder_queue_commit_latency_seconds_sum"]
                              / commits * 1000 if commits else None),
            }
            print(f"  round {round_ + 1} {target:6} {mode:6} {m.events_per_s:>9,.0f} ev/s"
                  f"  p50 {m.p50_ms:6.2f} p99 {m.p99_ms:6.2f} ms"
                  f"  {m.cpu_us_per_event:6.1f} cpu-µs/ev  server {m.server_cpu:4.2f}"
                  f"  others {m.other_load:4.2f}"
                  + (f"  {out[mode]['events_per_commit']:6.1f} ev/commit"
                     f" {out[mode]['commit_ms']:5.2f} ms" if commits else ""), flush=True)
    return out


def throughput(args: argparse.Namespace, daemons: Daemons, sink_pid: int) -> list[dict]:
    wrk = ri.Wrk(connections=32, threads=1, batch=BATCH)
    runs = []
    for r in range(args.rounds):
        for target in TARGETS + TARGETS[::-1]:  # A B C C B A: a linear drift cancels
            ri.wait_quiet(args.wait_quiet)
            runs.append({"round": r, "target": target,
                         **measure_slot(args, daemons, wrk, sink_pid, target, r)})
    return runs


def summarise(runs: list[dict], rounds: int) -> dict:
    """Per shape and target: the median of each figure, and the ratio to memory per round
    (a target's two measurements over memory's two), median and range."""
    out: dict = {}
    for mode in ("single", "batch"):
        out[mode] = {}
        for target in TARGETS:
            mine = [r[mode] for r in runs if r["target"] == target]
            row = {k: statistics.median(x[k] for x in mine)
                   for k in mine[0] if mine[0][k] is not None}
            ratios = []
            for rnd in range(rounds):
                def total(t: str, rnd: int = rnd) -> float:
                    return sum(r[mode]["events_s"] for r in runs
                               if r["target"] == t and r["round"] == rnd)
                ratios.append(total(target) / total("memory"))
            row["ratio"], row["ratio_range"] = statistics.median(ratios), (min(ratios),
                                                                          max(ratios))
            out[mode][target] = row
    return out


# --------------------------------------------------------------------------- backlog


def post_batches(port: int, first: int, count: int, per_request: int = 500,
                 threads: int = 4) -> None:
    """POST count unique events (numbered from first) in batches; every one accepted."""
    import http.client

    created_at = int(time.time())
    starts = iter(range(first, first + count, per_request))
    lock = threading.Lock()
    failures: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not failures:
            with lock:
                n = next(starts, None)
            if n is None:
                break
            size = min(per_request, first + count - n)
            body = b"[" + b",".join(ri.event_body(n // per_request, created_at, j)
                                    for j in range(size)) + b"]"
            conn.request("POST", "/events/batch", body,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 202 or json.loads(answer).get("accepted") != size:
                failures.append(f"{resp.status} {answer[:300]!r}")
        conn.close()

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if failures:
        raise RuntimeError(f"the fill was refused: {failures[0]}")


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fill_backlog(args: argparse.Namespace, daemons: Daemons, state: Path) -> dict:
    port = ri.free_port()
    proc = ab.start(ri.ROOT, "asyncio", daemons.config(port, state, ri.FORWARDING_OFF), port,
                    daemons.workdir, queue_env("normal", daemons.max_disk_bytes))
    try:
        print(f"backlog: posting {args.backlog:,} events...", flush=True)
        t0 = time.monotonic()
        post_batches(port, 0, args.backlog)
        fill_s = time.monotonic() - t0
        on_disk = scrape(port)["intercom_forwarder_queue_disk_events"]
        rss = ri.rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)  # the OOM killer's way: no stop, no checkpoint
        proc.wait()
    files = sum(p.stat().st_size for p in state.iterdir() if p.is_file())
    print(f"backlog: {on_disk:,.0f} events on disk in {fill_s:.1f} s, {files / 1e6:,.0f} MB,"
          f" filler RSS {rss:.0f} MiB; killed", flush=True)
    return {"events": on_disk, "fill_s": fill_s, "file_bytes": files, "fill_rss_mib": rss}


def measure_start(args: argparse.Namespace, daemons: Daemons, filled: Path, tree: Path,
                  label: str) -> dict:
    """A fresh daemon on a copy of the filled state dir: exec -> first event at the sink,
    exec -> /readyz 200, RSS then and after --settle s of forwarding."""
    state = daemons.workdir / f"start-{daemons.n + 1}"
    shutil.copytree(filled, state)
    sink_port, sink = ri.start_sink(str(ri.ROOT / ".venv" / "bin" / "python"),
                                    daemons.workdir)
    port = ri.free_port()
    config = daemons.config(port, state, sink_port=sink_port)
    ri.wait_quiet(args.wait_quiet)
    t0 = time.monotonic()
    proc, log = ab.spawn(tree, "asyncio", config, port, daemons.workdir,
                         queue_env("normal", daemons.max_disk_bytes))
    first = ready = None
    rss_first = rss_ready = 0.0
    try:
        while first is None or ready is None:
            now = time.monotonic() - t0
            if proc.poll() is not None or now > 120:
                raise RuntimeError(f"the daemon did not come up:\n{ri.tail(log)}")
            if first is None and ri.sink_count(sink_port) > 0:
                first = now
                rss_first = ri.rss_mib(proc.pid)  # before the dedup window is loaded
            if ready is None and get_status(f"http://127.0.0.1:{port}/readyz") == 200:
                ready = now
                rss_ready = ri.rss_mib(proc.pid)
            time.sleep(0.005)
        time.sleep(args.settle)
        out = {"label": label, "first_forward_s": first, "ready_s": ready,
               "rss_first_mib": rss_first, "rss_ready_mib": rss_ready, "rss_settled_mib": ri.rss_mib(proc.pid),
               "rss_peak_mib": peak_rss_mib(proc.pid),
               "events_on_disk": scrape(port)["intercom_forwarder_queue_disk_events"],
               "dedup_loaded": dedup_loaded(log)}
    finally:
        ri.stop(proc)
        ri.stop(sink)
        shutil.rmtree(state, ignore_errors=True)
    print(f"  start {label:8} first event {first:5.2f} s  /readyz 200 {ready:5.2f} s  "
          f"RSS {out['rss_first_mib']:.0f} / {out['rss_ready_mib']:.0f} /"
          f" {out['rss_settled_mib']:.0f} MiB "
          f"(peak {out['rss_peak_mib']:.0f})  dedup keys {out['dedup_loaded']}", flush=True)
    return out


def dedup_loaded(log: Path) -> int | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"dedup.loaded"' in line:
            return json.loads(line).get("keys")
    return None


def backlog(args: argparse.Namespace, daemons: Daemons) -> dict:
    filled = daemons.workdir / "filled"
    fill = fill_backlog(args, daemons, filled)
    trees = {"HEAD": ri.ROOT}
    if args.compare_ref:
        trees[args.compare_ref] = ab.worktree(args.compare_ref, daemons.workdir / "ref")
    starts = []
    try:
        order = list(trees)
        for i in range(args.starts):
            for label in order if i % 2 == 0 else order[::-1]:  # A B B A
                starts.append(measure_start(args, daemons, filled, trees[label], label))
    finally:
        if args.compare_ref:
            subprocess.run(["git", "-C", str(ri.ROOT), "worktree", "remove", "--force",
                            str(trees[args.compare_ref])], check=False, capture_output=True)
    return {"total": args.backlog, "fill": fill, "starts": starts}


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace, summary: dict | None, back: dict | None, env: dict,
           command: str) -> str:
    lines = [MARKERS[0], "## Disk queue (issue 13): memory vs disk through the daemon, HTTP",
             "", f"Measured {env['date']} on {env['nproc']} cores (load average"
             f" {env['loadavg']} at the end), Python {env['python']}, SQLite {env['sqlite']},"
             f" commit {env['commit']}.", "", f"Reproduce: `{command}`", ""]

    def row(cells: list[str]) -> None:
        lines.append("| " + " | ".join(cells) + " |")

    if summary is not None:
        s, b = summary["single"], summary["batch"]
        lines += [f"{args.rounds} rounds of A B C C B A, each slot a fresh daemon on CPU 0"
                  f" (asyncio; the disk writer thread on the same core), wrk -c32 and the"
                  f" sink on CPU 1, forwarding at the default pace; {args.warmup} s warm-up,"
                  f" {args.seconds} s measured per shape. Figures are medians over the"
                  f" {2 * args.rounds} measurements of each target.", "",
                  "| figure | memory | disk normal | disk full |",
                  "| --- | ---: | ---: | ---: |"]

        def ratio(x: dict) -> str:
            lo, hi = x["ratio_range"]
            return f"{x['ratio']:.2f} ({lo:.2f}-{hi:.2f})"

        for shape, x, unit in (("singles", s, "requests/s"),
                               (f"batches of {BATCH}", b, "events/s")):
            key = "rps" if shape == "singles" else "events_s"
            row([f"{shape}: {unit}"] + [f"{x[t][key]:,.0f}" for t in TARGETS])
            row([f"{shape}: ratio to memory (range over rounds)"]
                + ["1"] + [ratio(x[t]) for t in TARGETS[1:]])
            row([f"{shape}: request p50 / p99 ms"]
                + [f"{x[t]['p50_ms']:.2f} / {x[t]['p99_ms']:.2f}" for t in TARGETS])
            row([f"{shape}: events per commit"]
                + ["-"] + [f"{x[t]['events_per_commit']:,.1f}" for t in TARGETS[1:]])
            row([f"{shape}: mean commit latency ms"]
                + ["-"] + [f"{x[t]['commit_ms']:.2f}" for t in TARGETS[1:]])
            row([f"{shape}: daemon CPU µs/event"]
                + [f"{x[t]['cpu_us_event']:.1f}" for t in TARGETS])
        lines += ["", "| target (issue 13) | figure | verdict |", "| --- | --- | --- |"]
        for name, ok, fig in targets(summary):
            row([name, fig, "met" if ok else "**missed**"])
        lines.append("")
    if back is not None:
        fill = back["fill"]
        lines += [f"Backlog: {fill['events']:,.0f} events posted to a disk-mode daemon"
                  f" (normal, forwarding off) in batches of 500 ({fill['fill_s']:.0f} s,"
                  f" {fill['file_bytes'] / 1e6:,.0f} MB in the state dir, the filler's RSS"
                  f" {fill['fill_rss_mib']:.0f} MiB), then SIGKILL. Each start: a copy of"
                  f" that state dir, a fresh daemon forwarding to a fresh sink; times from"
                  f" exec; RSS (MB, 10^6 bytes) when the first event reached the sink, at"
                  f" /readyz 200 (the dedup window loaded), after {args.settle:g} s of"
                  f" forwarding, and the peak.", "",
                  "| code | first event forwarded s | /readyz 200 s | RSS at first event /"
                  " ready / settled / peak MB | dedup keys loaded |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for label in dict.fromkeys(x["label"] for x in back["starts"]):
            mine = [x for x in back["starts"] if x["label"] == label]

            def med(k: str, mine: list[dict] = mine) -> float:
                return statistics.median(x[k] for x in mine)

            row([f"{label} (median of {len(mine)})", f"{med('first_forward_s'):.2f}",
                 f"{med('ready_s'):.2f}",
                 " / ".join(f"{med(k) * MIB / 1e6:.0f}" for k in (
                     "rss_first_mib", "rss_ready_mib", "rss_settled_mib", "rss_peak_mib")),
                 f"{mine[0]['dedup_loaded'] or 0:,}"])
        lines += ["", NOTE_BACKLOG]
        head = [x for x in back["starts"] if x["label"] == "HEAD"]
        peak = max(x["rss_peak_mib"] for x in head) * MIB / 1e6
        first = max(x["first_forward_s"] for x in head)
        lines += ["", "| target (issue 13), this commit | figure | verdict |",
                  "| --- | --- | --- |"]
        row(["resident memory < 150 MB with the backlog", f"peak {peak:.0f} MB (worst start)",
             "met" if peak < 150 else "**missed**"])
        row(["begins forwarding within 5 s of exec", f"{first:.2f} s (worst start)",
             "met" if first < 5 else "**missed**"])
        lines.append("")
    lines += [MARKERS[1], ""]
    return "\n".join(lines)


def targets(summary: dict) -> list[tuple[str, bool, str]]:
    s, b = summary["single"], summary["batch"]
    out = [("disk normal singles >= 0.7x memory requests/s", s["normal"]["ratio"] >= 0.7,
            f"{s['normal']['ratio']:.2f}"),
           ("disk normal batches of 100 >= 0.5x memory events/s", b["normal"]["ratio"] >= 0.5,
            f"{b['normal']['ratio']:.2f}")]
    for shape, x in (("singles", s), ("batches", b)):
        bound = 2 * x["memory"]["p99_ms"] + 5
        out.append((f"disk normal p99 <= 2x memory p99 + 5 ms, {shape}",
                    x["normal"]["p99_ms"] <= bound,
                    f"{x['normal']['p99_ms']:.2f} ms against {bound:.2f} ms"))
    out.append(("disk full batches of 100 >= 20,000 events/s",
                b["full"]["events_s"] >= 20_000, f"{b['full']['events_s']:,.0f} events/s"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1 round, 2 s a figure, a 200,000-event backlog, 1 start each")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--wait-quiet", type=float, default=10.0,
                   help="before each slot, wait up to this long for other processes to idle")
    p.add_argument("--backlog", type=int, default=1_000_000, help="0: no backlog part")
    p.add_argument("--starts", type=int, default=2, help="starts measured per code")
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--compare-ref", help="also time starts with this commit's code")
    p.add_argument("--max-disk-bytes", type=int, default=4 << 30)
    p.add_argument("--no-write", action="store_true", help="leave RESULTS.md untouched")
    args = p.parse_args()
    command = "flock /tmp/bench.lock .venv/bin/python bench/disk_http.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a != "--no-write")
    if args.quick:
        args.rounds, args.seconds, args.backlog, args.starts = 1, 2, 200_000, 1
    os.sched_setaffinity(0, {int(ri.CLIENT_CPU)})
    python = str(ri.ROOT / ".venv" / "bin" / "python")
    with tempfile.TemporaryDirectory(prefix="bench-disk-http-") as tmp:
        workdir = Path(tmp)
        sink_port, sink = ri.start_sink(python, workdir)
        daemons = Daemons(workdir, sink_port, args.max_disk_bytes)
        try:
            runs = throughput(args, daemons, sink.pid) if args.rounds else []
        finally:
            ri.stop(sink)
        summary = summarise(runs, args.rounds) if runs else None
        back = backlog(args, daemons) if args.backlog else None
    env = machine()
    publish(report(args, summary, back, env, command), MARKERS, RESULTS_JSON,
            {"machine": env, "runs": runs, "summary": summary, "backlog": back},
            write=not args.no_write and not args.quick)


if __name__ == "__main__":
    main()
