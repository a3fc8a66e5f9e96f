"""Intake benchmark: the daemon against a bare aiohttp handler, measured in the same run.

    .venv/bin/python bench/run_intake.py            # full run, ~8 minutes
    .venv/bin/python bench/run_intake.py --quick    # ~1 minute, for development

Figures (bench/README.md says what each one means):
  - single events over keep-alive HTTP, requests/s, as a ratio to the bare handler
    (bench/baseline_server.py) measured in the same run, on the same event loop;
  - batch intake (JSON arrays of 100 events), events/s;
  - p50 and p99 latency from wrk --latency at 32 connections;
  - asyncio against uvloop, for the daemon and for the baseline;
  - server CPU time per event (from /proc), daemon against baseline: when other
    sessions take the measured core, rps falls but CPU per event moves much less (for a
    figure noise cannot move at all, see bench/callgrind_intake.py).

How: the server under test is pinned to CPU 0 (taskset), wrk and the upstream sink to
CPU 1. Each round starts every target afresh (baseline and daemon, per loop), checks that
it answers 202 and accepts every event, warms it up, then measures single and batch
intake. Before each target it waits (up to --wait-quiet s) for other processes to go
quiet, and it records how much CPU they took during each measurement. Rounds go
A B B A (the order reverses every round) so drift on this shared machine falls on both
sides; the reported figure is the median over rounds, and a ratio is the median of the
per-round ratios (each pairs two neighbouring measurements).

Single events are also measured in interleaved pairs (measure_pairs(): both servers up,
taking turns on CPU 0 in short slices), because round ratios half a minute apart swing
with this machine's spells of noise. Pairs swing too, but their daemon has taken every
earlier slice's events (a fuller queue and dedup map, as in a daemon that has run for a
while); the single-event target is judged on them, the rounds figure shown beside.

The daemon forwards to bench/sink.py (202 to everything) at its default rate limit, as in
production; its queue is raised so a whole run fits (a full queue would answer 503 and
turn the benchmark into a 503 benchmark). Every event is unique (bench/wrk/events.lua),
so dedup never short-circuits.

Results: the marked intake section of bench/RESULTS.md is replaced (other sections are
kept), raw numbers go to bench/results-intake.json (git-ignored), and the table is
printed. Stdlib only: it needs no package beyond what the servers use.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LUA = BENCH / "wrk" / "events.lua"
RESULTS_MD = BENCH / "RESULTS.md"
RESULTS_JSON = BENCH / "results-intake.json"
DEPS = BENCH / ".deps"  # uvloop and py-spy: pip install --target bench/.deps uvloop py-spy
START, END = "<!-- intake:start -->", "<!-- intake:end -->"

SERVER_CPU, CLIENT_CPU = "0", "1"


def pin(cpu: str) -> list[str]:
    """The prefix that runs a command on one CPU.

    No nice: the kernel groups each session's processes (autogroup), so a nice value only
    ranks our own processes against each other, not against other sessions' work.
    """
    return ["taskset", "-c", cpu]


def pin_shown(cpu: str) -> str:
    return " ".join(pin(cpu))


OFFSET_STEP = 100_000_000  # each wrk run gets its own counter range (see events.lua)

# A rate budget of one request per hour: the workers start but send (almost) nothing.
# One worker: 32 would each wake on every 50 ms pacing tick to find no budget, work that
# callgrind would charge to the intake (it runs ~50x slower, so ticks outnumber events).
FORWARDING_OFF = "\n[rate_limit]\nrequests = 1\nper_seconds = 3600.0\n\n[workers]\nconcurrency = 1\n"

TARGETS = {"single": 0.70, "p99_ms": 5.0, "batch_eps": 100_000}


@dataclass(frozen=True)
class Target:
    kind: str  # "baseline" | "daemon"
    loop: str  # "asyncio" | "uvloop"

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.loop}"


@dataclass
class Measure:
    target: str
    mode: str  # "single" | "batch"
    round: int
    rps: float
    events_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: dict
    server_cpu: float  # share of one core the server process used while measured
    wrk_cpu: float  # same, for wrk (near 1.0 would mean wrk, not the server, is the limit)
    cpu_us_per_event: float  # server CPU time per event: robust to time stolen by neighbours
    other_load: float  # share of the server's core used by other processes (noise)
    steal: float  # share of the server's core the hypervisor took (noise)
    other_load_client: float  # share of wrk's core used by others (beyond wrk, sink, this)
    tries: int = 1  # measured again when others disturbed it (see --min-server-cpu)


@dataclass
class Run:
    args: dict
    machine: dict
    commands: dict = field(default_factory=dict)
    measures: list = field(default_factory=list)
    pairs: list = field(default_factory=list)  # measure_pairs(): one dict per pair
    notes: list = field(default_factory=list)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def core_times(cpu: str) -> tuple[float, float, float]:
    """(busy, steal, total) seconds of one CPU since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) / os.sysconf("SC_CLK_TCK") for x in line.split()[1:9]]
            user, nice, system, _idle, _iowait, irq, softirq, steal = v
            return user + nice + system + irq + softirq, steal, sum(v)
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


def wait_quiet(max_wait: float, threshold: float = 0.3, window: float = 0.5) -> float:
    """Wait (up to max_wait s) for a window in which other processes use < threshold cores.

    Called while our own servers are idle, so whatever is busy is someone else. Returns the
    load seen in the last window (in cores), for the record.
    """
    deadline = time.monotonic() + max_wait
    while True:
        a = [core_times(c) for c in (SERVER_CPU, CLIENT_CPU)]
        time.sleep(window)
        b = [core_times(c) for c in (SERVER_CPU, CLIENT_CPU)]
        load = sum((y[0] - x[0]) / ((y[2] - x[2]) or window) for x, y in zip(a, b, strict=True))
        if load < threshold or time.monotonic() >= deadline:
            return load


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def python_env(loop: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    env.pop("INTERCOM_ACCESS_TOKEN", None)
    if loop == "uvloop":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(DEPS), env.get("PYTHONPATH")]))
    return env


def uvloop_available(python: str) -> str | None:
    r = subprocess.run(
        [python, "-c", "import uvloop; print(uvloop.__version__)"],
        env=python_env("uvloop"),
        check=False, capture_output=True,
        text=True,
    )
    return r.stdout.strip() if r.returncode == 0 else None


def event_body(n: int, created_at: int, j: int | None = None) -> bytes:
    """One event, the same shape and size as bench/wrk/events.lua's (kept in step by
    hand); j numbers the events of batch n."""
    i = f"{n:012d}" if j is None else f"{n:012d}-{j:03d}"
    return (
        f'{{"event_name":"order-completed","created_at":{created_at},"user_id":"usr_{i}",'
        f'"email":"customer.{i}@mail.example-shop.com","metadata":{{"order_id":'
        f'"ord_5f1c2a9e-4b7d-{i}","order_url":"https://shop.example.com/en-gb/account/orders/'
        f'ord_5f1c2a9e-4b7d-{i}","plan":"premium-annual-eur-billed-yearly",'
        f'"amount_cents":12999}}}}'
    ).encode()


def daemon_config(
    path: Path, port: int, sink_port: int, state_dir: Path, max_events: int, extra: str = ""
) -> None:
    path.write_text(
        f"""# Generated by bench/run_intake.py; everything not set here is the default.
[intake]
host = "127.0.0.1"
port = {port}

[intercom]
base_url = "http://127.0.0.1:{sink_port}"
access_token = "bench-token"

[queue]
max_events = {max_events}   # raised: a run must never fill it (a full queue answers 503)

[storage]
state_dir = "{state_dir}"

[shutdown]
drain_seconds = 0

[log]
level = "info"
format = "json"
"""
        + extra
    )


class Servers:
    """Starts and stops the servers under test; records the command lines it used."""

    def __init__(self, python: str, daemon: str, workdir: Path, sink_port: int, max_events: int):
        self.python = python
        self.daemon = daemon  # "serve" | "baseline-copy" (an A/A run)
        self.workdir = workdir
        self.sink_port = sink_port
        self.max_events = max_events
        self.commands: dict[str, str] = {}
        self.n = 0
        self.extra = ""  # TOML appended to the daemon's generated config

    def command(self, t: Target, port: int) -> tuple[list[str], str]:
        """argv and the command as documented (with the port and paths as placeholders)."""
        if t.kind == "baseline" or self.daemon == "baseline-copy":
            argv = [self.python, str(BENCH / "baseline_server.py"), "--port", str(port)]
            shown = ".venv/bin/python bench/baseline_server.py --port PORT"
            if t.loop == "uvloop":
                argv.append("--uvloop")
                shown += " --uvloop"
            return argv, shown
        self.n += 1
        run_dir = self.workdir / f"daemon-{self.n}"
        run_dir.mkdir()
        cfg = run_dir / "forwarder.toml"
        daemon_config(cfg, port, self.sink_port, run_dir / "state", self.max_events, self.extra)
        shown_cfg = "CONFIG.toml"
        if t.loop == "uvloop":
            argv = [self.python, str(BENCH / "uvloop_serve.py"), "serve", "--config", str(cfg)]
            shown = f".venv/bin/python bench/uvloop_serve.py serve --config {shown_cfg}"
        else:
            argv = [
                str(Path(self.python).parent / "intercom-forwarder"),
                "serve",
                "--config",
                str(cfg),
            ]
            shown = f".venv/bin/intercom-forwarder serve --config {shown_cfg}"
        return argv, shown

    @contextlib.contextmanager
    def running(self, t: Target):
        port = free_port()
        argv, shown = self.command(t, port)
        env = "PYTHONPATH=bench/.deps " if t.loop == "uvloop" else ""
        self.commands[t.label] = f"{env}{pin_shown(SERVER_CPU)} {shown}"
        log = self.workdir / f"{t.kind}-{t.loop}-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*pin(SERVER_CPU), *argv],
                cwd=ROOT,
                env=python_env(t.loop),
                stdout=out,
                stderr=out,
            )
        try:
            wait_port(port, proc, log)
            yield port, proc, log
        finally:
            stop(proc)


# --------------------------------------------------------------------------- wrk


class Wrk:
    def __init__(self, connections: int, threads: int, batch: int):
        self.connections = connections
        self.threads = threads
        self.batch = batch
        self.offset = 0  # every daemon starts empty (fresh state_dir), so 0 is unique enough

    def argv(self, port: int, mode: str, seconds: int, connections: int, check: bool) -> list[str]:
        self.offset += OFFSET_STEP
        path = "/events" if mode == "single" else "/events/batch"
        args = [mode, str(self.offset), str(self.batch)] + (["check"] if check else [])
        return [
            *pin(CLIENT_CPU),
            "wrk",
            f"-t{self.threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(LUA),
            f"http://127.0.0.1:{port}{path}",
            "--",
            *args,
        ]

    def shown(self, mode: str, seconds: int) -> str:
        path = "/events" if mode == "single" else "/events/batch"
        extra = f" {self.batch}" if mode == "batch" else ""
        return (
            f"{pin_shown(CLIENT_CPU)} wrk -t{self.threads} -c{self.connections} -d{seconds}s "
            f"--latency -s bench/wrk/events.lua http://127.0.0.1:PORT{path} -- {mode} "
            f"OFFSET{extra}"
        )

    def run(
        self,
        port: int,
        mode: str,
        seconds: int,
        connections: int | None = None,
        check: bool = False,
    ) -> tuple[dict, dict | None]:
        """(WRKJSON summary, WRKCHECK or None)."""
        argv = self.argv(port, mode, seconds, connections or self.connections, check)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=seconds + 30)
        summary = checked = None
        for line in out.decode().splitlines():
            if line.startswith("WRKJSON "):
                summary = json.loads(line[8:])
            elif line.startswith("WRKCHECK "):
                checked = json.loads(line[9:])
        if proc.returncode != 0 or summary is None:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()}{out.decode()}")
        return summary, checked


def children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- the run


def check_target(wrk: Wrk, port: int, label: str) -> None:
    """A 1 s run at 2 connections: every answer 202, every batch event accepted."""
    for mode in ("single", "batch"):
        summary, checked = wrk.run(port, mode, 1, connections=2, check=True)
        if not checked or checked["bad"] or summary["errors"]["status"]:
            raise RuntimeError(
                f"{label} {mode}: not every answer was a clean 202: {checked} {summary['errors']}"
            )


def measure(
    sink_pid: int,
    wrk: Wrk,
    t: Target,
    round_: int,
    mode: str,
    port: int,
    pid: int,
    warmup: int,
    seconds: int,
) -> Measure:
    if warmup:
        wrk.run(port, mode, warmup)

    def sample() -> tuple:
        own = os.times()
        return (
            cpu_seconds(pid),
            children_cpu(),
            core_times(SERVER_CPU),
            core_times(CLIENT_CPU),
            cpu_seconds(sink_pid),
            own.user + own.system,
        )

    cpu0, kids0, core0, client0, sink0, own0 = sample()
    s, _ = wrk.run(port, mode, seconds)  # wrk's CPU: children's rusage, once it is reaped
    cpu1, kids1, core1, client1, sink1, own1 = sample()
    ours_on_client = (kids1 - kids0) + (sink1 - sink0) + (own1 - own0)
    wall = s["duration_us"] / 1e6
    rps = s["requests"] / wall
    lat = s["latency_us"]
    events = s["requests"] * (wrk.batch if mode == "batch" else 1)
    core_wall = (core1[2] - core0[2]) or wall
    return Measure(
        target=t.label,
        mode=mode,
        round=round_,
        rps=rps,
        events_per_s=rps * (wrk.batch if mode == "batch" else 1),
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        p999_ms=lat["p999"] / 1000,
        max_ms=lat["max"] / 1000,
        errors=s["errors"],
        server_cpu=(cpu1 - cpu0) / wall,
        wrk_cpu=(kids1 - kids0) / wall,
        cpu_us_per_event=(cpu1 - cpu0) / max(events, 1) * 1e6,
        other_load=max(0.0, (core1[0] - core0[0]) - (cpu1 - cpu0)) / core_wall,
        steal=(core1[1] - core0[1]) / core_wall,
        other_load_client=max(0.0, (client1[0] - client0[0]) - ours_on_client)
        / ((client1[2] - client0[2]) or wall),
    )


def measure_quietest(
    args: argparse.Namespace,
    sink_pid: int,
    wrk: Wrk,
    t: Target,
    round_: int,
    mode: str,
    port: int,
    pid: int,
) -> Measure:
    """measure(); if the server was not the bottleneck meanwhile (it used less than
    --min-server-cpu of its core: other processes took its core, or wrk's, so wrk could
    not keep it busy), wait for quiet and measure again (up to --retries times); keep the
    measurement in which the server was busiest."""
    best = None
    for attempt in range(1 + args.retries):
        if attempt:
            wait_quiet(args.wait_quiet)
        m = measure(sink_pid, wrk, t, round_, mode, port, pid, args.warmup, args.duration)
        m.tries = attempt + 1
        print(
            f"  round {round_ + 1} {t.label:17} {mode:6} "
            f"{m.events_per_s:>10,.0f} ev/s  p50 {m.p50_ms:5.2f} ms  "
            f"p99 {m.p99_ms:6.2f} ms  {m.cpu_us_per_event:6.1f} cpu-µs/ev  "
            f"server {m.server_cpu:4.2f} wrk {m.wrk_cpu:4.2f} "
            f"others {m.other_load:4.2f}/{m.other_load_client:4.2f} steal {m.steal:4.2f}",
            flush=True,
        )
        if best is None or m.server_cpu > best.server_cpu:
            best = m
        if m.server_cpu >= args.min_server_cpu:
            break
    return best


def start_sink(python: str, workdir: Path) -> tuple[int, subprocess.Popen]:
    """bench/sink.py (202 to everything) on the client's CPU; returns once it listens."""
    sink_port = free_port()
    sink_log = workdir / "sink.log"
    with open(sink_log, "wb") as out:
        sink = subprocess.Popen(
            [*pin(CLIENT_CPU), python, str(BENCH / "sink.py"), "--port", str(sink_port)],
            cwd=ROOT,
            env=python_env("asyncio"),
            stdout=out,
            stderr=out,
        )
    wait_port(sink_port, sink, sink_log)
    return sink_port, sink


def sink_count(sink_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{sink_port}/count", timeout=5) as r:
        return json.loads(r.read())["requests"]


def settle_forwarding(sink_port: int, steady_per_s: float = 250.0, max_wait: float = 10.0):
    """Wait out the rate gate's opening burst. A fresh daemon's budget is full (1666
    requests), so the events of the check run go out at full speed for a second or so;
    measuring during that burst would charge the intake with it. In a running daemon
    forwarding proceeds at the budget's pace (~166 requests/s), as it does after this."""
    deadline = time.monotonic() + max_wait
    last = sink_count(sink_port)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = sink_count(sink_port)
        if (now - last) / 0.5 < steady_per_s:
            return
        last = now


def scrape_counts(port: int) -> dict[str, float]:
    """The daemon's intake outcome counters from /metrics, if it serves them."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    counts = {}
    for m in re.finditer(
        r'^intercom_forwarder_events_received_total\{outcome="(\w+)"\} (\S+)$', text, re.MULTILINE
    ):
        counts[m.group(1)] = float(m.group(2))
    return counts


def machine(python: str, uvloop_version: str | None) -> dict:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(
                cmd, check=False, capture_output=True, text=True, env=python_env("uvloop"), cwd=ROOT
            ).stdout.strip()
        except OSError:
            return "?"

    versions = out(
        [
            python,
            "-c",
            ("import sys, aiohttp, orjson; "
            "print(sys.version.split()[0], aiohttp.__version__, orjson.__version__)"),
        ]
    )
    py, aiohttp_v, orjson_v = (versions.split() + ["?"] * 3)[:3]
    commit = out(["git", "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "status", "--porcelain", "--", "forwarder"])
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": py,
        "aiohttp": aiohttp_v,
        "orjson": orjson_v,
        "uvloop": uvloop_version or "not installed",
        "wrk": out(["wrk", "-v"]).split()[1] if out(["wrk", "-v"]) else "?",
        "commit": commit + (" + uncommitted changes in forwarder/" if dirty else ""),
        "loadavg": Path("/proc/loadavg").read_text().split()[0],
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def measure_pairs(
    args: argparse.Namespace, wrk: Wrk, servers: Servers, loop: str, sink_port: int
) -> list[dict]:
    """Single-event rps of the daemon and the baseline in short, interleaved slices.

    Noise on this shared machine comes in spells of seconds to minutes, so two figures
    measured half a minute apart (a round's pair) can differ by 15% on noise alone. Here
    both servers run at once and take turns on the measured core: the one being measured
    is moved to CPU 0 (sched_setaffinity), the other to wrk's CPU. A pair is
    --pair-slices slices of --pair-seconds per side, in the order A B B A B A A B (A is
    the baseline in even pairs, the daemon in odd ones), and its ratio is the daemon's
    requests per second over its slices against the baseline's over theirs: both sides
    sample the same few seconds, and a linear drift within the pair cancels. (Pairs of
    one 2 s slice per side, seconds apart, ranged 0.5 to 1.2 in one run; an A/A run of
    these pairs, `--daemon baseline-copy --rounds 0 --pairs 10`, ranged 0.86 to 1.08.)
    The idle daemon keeps forwarding at its paced rate on the other core, so while
    measured it does exactly its steady-state share of forwarding.
    """
    base_t, daemon_t = Target("baseline", loop), Target("daemon", loop)
    pairs: list[dict] = []
    with servers.running(base_t) as (bport, bproc, _), servers.running(daemon_t) as (
        dport,
        dproc,
        _,
    ):
        if servers.daemon == "serve":
            check_target(wrk, dport, daemon_t.label)
            if args.forwarding == "on":
                settle_forwarding(sink_port)
        side = {"baseline": (bport, bproc, dproc), "daemon": (dport, dproc, bproc)}
        for kind in ("baseline", "daemon"):  # warm both once, on the measured core
            port, proc, other = side[kind]
            os.sched_setaffinity(other.pid, {int(CLIENT_CPU)})
            os.sched_setaffinity(proc.pid, {int(SERVER_CPU)})
            wrk.run(port, "single", 1)
        for i in range(args.pairs):
            # Each pair is --pair-slices short slices per side, A B B A B A A B ..., so
            # both sides sample the same seconds of the machine's drift.
            first, second = ("baseline", "daemon") if i % 2 == 0 else ("daemon", "baseline")
            order = (first, second, second, first, second, first, first, second)
            totals = {"baseline": [0, 0.0, 0.0], "daemon": [0, 0.0, 0.0]}  # n, s, cpu s
            p99s: dict[str, list[float]] = {"baseline": [], "daemon": []}  # ms, per slice
            for j in range(2 * args.pair_slices):
                kind = order[j % len(order)]
                port, proc, other = side[kind]
                os.sched_setaffinity(other.pid, {int(CLIENT_CPU)})
                os.sched_setaffinity(proc.pid, {int(SERVER_CPU)})
                c0 = cpu_seconds(proc.pid)
                summary, _ = wrk.run(port, "single", args.pair_seconds)
                c1 = cpu_seconds(proc.pid)
                t = totals[kind]
                t[0] += summary["requests"]
                t[1] += summary["duration_us"] / 1e6
                t[2] += c1 - c0
                p99s[kind].append(summary["latency_us"]["p99"] / 1000)
            got = {k: (n / secs, cpu / max(n, 1) * 1e6) for k, (n, secs, cpu) in totals.items()}
            pairs.append(
                {
                    "loop": loop,
                    "pair": i,
                    "daemon_rps": got["daemon"][0],
                    "baseline_rps": got["baseline"][0],
                    "daemon_cpu_us": got["daemon"][1],
                    "baseline_cpu_us": got["baseline"][1],
                    "daemon_p99_slices_ms": p99s["daemon"],
                    "baseline_p99_slices_ms": p99s["baseline"],
                }
            )
            p = pairs[-1]
            print(
                f"  pair {i + 1} {loop:8} daemon {p['daemon_rps']:>8,.0f} rps "
                f"baseline {p['baseline_rps']:>8,.0f} rps  ratio "
                f"{p['daemon_rps'] / p['baseline_rps']:.2f}",
                flush=True,
            )
    return pairs


def run(args: argparse.Namespace) -> Run:
    python = str(ROOT / ".venv" / "bin" / "python") if not args.python else args.python
    uv = uvloop_available(python)
    loops = [lp for lp in args.loops.split(",") if lp]
    notes = []
    if "uvloop" in loops and not uv:
        loops.remove("uvloop")
        notes.append(
            "uvloop not measured: not importable (pip install --target bench/.deps uvloop)"
        )
    daemon = args.daemon
    if daemon == "serve" and not (Path(python).parent / "intercom-forwarder").exists():
        raise SystemExit(
            "no .venv/bin/intercom-forwarder yet: use --daemon baseline-copy "
            "for an A/A run of the harness"
        )
    if daemon == "baseline-copy":
        notes.append(
            "A/A run: the 'daemon' is a second copy of the baseline, so every ratio "
            "should be ~1.0; its spread is this machine's noise floor"
        )
    targets = [Target(kind, loop) for loop in loops for kind in ("baseline", "daemon")]
    result = Run(args=vars(args), machine=machine(python, uv), notes=notes)
    wrk = Wrk(args.connections, args.threads, args.batch)

    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        workdir = Path(tmp)
        sink_port, sink = start_sink(python, workdir)
        try:
            servers = Servers(python, daemon, workdir, sink_port, args.max_events)
            if args.forwarding == "off":
                servers.extra = FORWARDING_OFF
            for r in range(args.rounds):
                order = targets if r % 2 == 0 else targets[::-1]
                for t in order:
                    quiet = wait_quiet(args.wait_quiet)
                    with servers.running(t) as (port, proc, _log):
                        if t.kind == "daemon":  # the bare handler cannot get it wrong
                            check_target(wrk, port, t.label)
                            if args.forwarding == "on":
                                settle_forwarding(sink_port)
                        for mode in ("single", "batch"):
                            m = measure_quietest(args, sink.pid, wrk, t, r, mode, port, proc.pid)
                            result.measures.append(asdict(m) | {"load_before": quiet})
                        if t.kind == "daemon" and daemon == "serve":
                            counts = scrape_counts(port)
                            rss = rss_mib(proc.pid)
                            bad = {k: v for k, v in counts.items() if k != "accepted" and v}
                            if bad:
                                notes.append(f"round {r + 1} {t.label}: intake counted {bad}")
                            result.measures[-1]["daemon_counts"] = counts
                            result.measures[-1]["daemon_rss_mib"] = rss
            if args.pairs:
                for loop in loops:
                    wait_quiet(args.wait_quiet)
                    result.pairs += measure_pairs(args, wrk, servers, loop, sink_port)
            url = f"http://127.0.0.1:{sink_port}/count"
            with contextlib.suppress(OSError), urllib.request.urlopen(url) as r:
                result.notes.append(
                    f"the sink received {json.loads(r.read())['requests']} "
                    "forwarded requests in the whole run"
                )
        finally:
            stop(sink)
        result.commands = dict(servers.commands)
        result.commands["wrk single"] = wrk.shown("single", args.duration)
        result.commands["wrk batch"] = wrk.shown("batch", args.duration)
    return result


# --------------------------------------------------------------------------- report


def summarise(result: Run) -> dict:
    """Medians per (target, mode), and per-round ratios."""
    by: dict[tuple[str, str], list[dict]] = {}
    for m in result.measures:
        by.setdefault((m["target"], m["mode"]), []).append(m)
    med = {
        key: {
            f: statistics.median(x[f] for x in ms)
            for f in (
                "rps",
                "events_per_s",
                "p50_ms",
                "p99_ms",
                "server_cpu",
                "wrk_cpu",
                "cpu_us_per_event",
                "other_load",
                "steal",
                "other_load_client",
            )
        }
        for key, ms in by.items()
    }

    def ratios(num: str, den: str, mode: str, f: str = "rps") -> list[float]:
        a = {m["round"]: m[f] for m in by.get((num, mode), [])}
        b = {m["round"]: m[f] for m in by.get((den, mode), [])}
        return [a[r] / b[r] for r in sorted(a) if b.get(r)]

    return {"median": med, "ratios": ratios}


def cost_row(figure: str, loop: str, med: dict, ratios, d: str, b: str) -> str:
    """Server CPU per event; the ratio is baseline / daemon, so it reads like the rps one."""
    mode = "single" if figure.startswith("single") else "batch"
    dc, bc = med[d, mode]["cpu_us_per_event"], med[b, mode]["cpu_us_per_event"]
    rs = ratios(b, d, mode, "cpu_us_per_event")
    return f"| {figure}, server CPU µs/event | {loop} | {dc:.1f} | {bc:.1f} | {fmt_ratio(rs)} | | |"


def fmt_ratio(rs: list[float]) -> str:
    if not rs:
        return "n/a"
    if len(rs) == 1:
        return f"{rs[0]:.2f}"
    return f"{statistics.median(rs):.2f} ({min(rs):.2f}–{max(rs):.2f})"


def verdict(ok: bool) -> str:
    return "meets" if ok else "**misses**"


def render(result: Run) -> str:
    s = summarise(result)
    med, ratios = s["median"], s["ratios"]
    loops = sorted(
        {m["target"].split("/")[1] for m in result.measures}, key=["asyncio", "uvloop"].index
    )
    a = result.args
    m = result.machine
    daemon_name = "daemon" if a["daemon"] == "serve" else "baseline copy (A/A)"
    lines = [
        START,
        "## Intake",
        "",
        f"Measured {m['date']} on {m['nproc']} cores ({m['cpu']}), Python {m['python']}, "
        f"aiohttp {m['aiohttp']}, orjson {m['orjson']}, uvloop {m['uvloop']}, wrk {m['wrk']}, "
        f"commit {m['commit']}, load average {m['loadavg']} at the start. "
        f"{a['rounds']} round(s), each target {a['duration']} s per figure after a "
        f"{a['warmup']} s warm-up, {a['connections']} keep-alive connections, server on CPU "
        f"{SERVER_CPU}, wrk on CPU {CLIENT_CPU}. The daemon's forwarding: "
        + (
            "on, to bench/sink.py at the default rate budget."
            if a["forwarding"] == "on"
            else "off (rate budget 1 request per hour): the intake path alone."
        ),
        "",
        "Reproduce: `" + " ".join([".venv/bin/python bench/run_intake.py", *cli_flags(a)]) + "`",
        "",
        (
            f"Single events are measured twice. The rounds: each target started afresh, "
            f"measured for {a['duration']} s; a ratio pairs measurements about half a minute "
            f"apart. The interleaved pairs ({a['pairs']} per loop): both servers running, "
            f"taking turns on CPU 0 in {a['pair_seconds']} s slices, {a['pair_slices']} per "
            f"side and pair in the order A B B A B A A B, the idle one moved to wrk's CPU "
            f"(the daemon keeps forwarding there); a pair's ratio compares its sides over "
            f"the same few seconds; the pairs' daemon has also taken every earlier slice's events, "
            f"so its queue and dedup map are larger than a round's fresh daemon's. The "
            f"single-event targets (rps and p99) are judged on the pairs: the rps over each "
            f"pair's slices, the p99 as the median of every slice's own p99; see "
            f"measure_pairs() and bench/README.md."
            if result.pairs
            else "Single events: rounds only (--pairs 0)."
        ),
        "",
        "| figure | loop | " + daemon_name + " | baseline | ratio (range) | target | |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for loop in loops:
        d, b = f"daemon/{loop}", f"baseline/{loop}"
        if (d, "single") not in med or (b, "single") not in med:
            continue
        pairs = [p for p in result.pairs if p["loop"] == loop]
        if pairs:
            prs = [p["daemon_rps"] / p["baseline_rps"] for p in pairs]
            ok = statistics.median(prs) >= TARGETS["single"]
            lines.append(
                f"| single events, rps, {len(pairs)} interleaved pairs | {loop} | "
                f"{statistics.median(p['daemon_rps'] for p in pairs):,.0f} | "
                f"{statistics.median(p['baseline_rps'] for p in pairs):,.0f} | "
                f"{fmt_ratio(prs)} | ≥ {TARGETS['single']} | {verdict(ok)} |"
            )
            crs = [p["baseline_cpu_us"] / p["daemon_cpu_us"] for p in pairs]
            lines.append(
                f"| single events, server CPU µs/event, pairs | {loop} | "
                f"{statistics.median(p['daemon_cpu_us'] for p in pairs):.1f} | "
                f"{statistics.median(p['baseline_cpu_us'] for p in pairs):.1f} | "
                f"{fmt_ratio(crs)} | | |"
            )
            # p99 over every slice of every pair, like the rps: a 3-round median is one
            # spell's verdict, ~80 slices spread over minutes are not.
            dp = [x for p in pairs for x in p.get("daemon_p99_slices_ms", [])]
            bp = [x for p in pairs for x in p.get("baseline_p99_slices_ms", [])]
            if dp and bp:
                dv, bv = statistics.median(dp), statistics.median(bp)
                lines.append(
                    f"| single events, p99 latency, median of {len(dp)} pair slices | {loop} "
                    f"| {dv:.2f} ms | {bv:.2f} ms | {dv / bv:.2f} | < {TARGETS['p99_ms']:g} ms "
                    f"| {verdict(dv < TARGETS['p99_ms'])} |"
                )
        rs = ratios(d, b, "single")
        ok = bool(rs) and statistics.median(rs) >= TARGETS["single"]
        lines.append(
            f"| single events, rps, rounds | {loop} | {med[d, 'single']['rps']:,.0f} | "
            f"{med[b, 'single']['rps']:,.0f} | {fmt_ratio(rs)} | "
            + (f"≥ {TARGETS['single']} | {verdict(ok)} |" if not pairs else "(see pairs) | |")
        )
        lines.append(cost_row("single events", loop, med, ratios, d, b))
        for pct in ("p50", "p99"):
            dv, bv = med[d, "single"][f"{pct}_ms"], med[b, "single"][f"{pct}_ms"]
            tgt = f"< {TARGETS['p99_ms']:g} ms" if pct == "p99" else ""
            ok_s = verdict(dv < TARGETS["p99_ms"]) if pct == "p99" else ""
            if pct == "p99" and pairs:
                tgt, ok_s = "(see pairs)", ""
            lines.append(
                f"| single events, {pct} latency | {loop} | {dv:.2f} ms | {bv:.2f} ms "
                f"| {dv / bv:.2f} | {tgt} | {ok_s} |"
            )
        rs = ratios(d, b, "batch")
        de, be = med[d, "batch"]["events_per_s"], med[b, "batch"]["events_per_s"]
        lines.append(
            f"| batches of {a['batch']}, events/s | {loop} | {de:,.0f} | {be:,.0f} | "
            f"{fmt_ratio(rs)} | ≥ {TARGETS['batch_eps']:,} | "
            f"{verdict(de >= TARGETS['batch_eps'])} |"
        )
        lines.append(cost_row("batches", loop, med, ratios, d, b))
        for pct in ("p50", "p99"):
            dv, bv = med[d, "batch"][f"{pct}_ms"], med[b, "batch"][f"{pct}_ms"]
            lines.append(
                f"| batches, {pct} latency | {loop} | {dv:.2f} ms | {bv:.2f} ms | "
                f"{dv / bv:.2f} | | |"
            )
    if "uvloop" in loops and "asyncio" in loops:
        lines += [
            "",
            "uvloop against asyncio (rps ratio uvloop / asyncio, median over rounds):",
            "",
        ]
        lines += ["| target | single | batch |", "| --- | ---: | ---: |"]
        for kind in ("baseline", "daemon"):
            cells = []
            for mode in ("single", "batch"):
                u, x = med.get((f"{kind}/uvloop", mode)), med.get((f"{kind}/asyncio", mode))
                cells.append(f"{u['rps'] / x['rps']:.2f}" if u and x else "n/a")
            name = kind if kind == "baseline" else daemon_name
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        ("CPU while measured, as a share of one core (medians): the server should be near 1.0 "
        "(it is the bottleneck) and wrk well below; other processes and the hypervisor "
        "(steal) are this shared machine's noise. Work on wrk's core matters too: a starved "
        "wrk leaves the server idle. CPU µs/event moves less than rps when the server's "
        "core is taken, but it still moves (work on the sibling core slows the server's "
        "own instructions); the callgrind section below is the figure noise cannot move."),
        "",
        ("| target | figure | server | wrk | others on the server's core | steal | others on "
        "wrk's core |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in sorted({x["target"] for x in result.measures}):
        for mode in ("single", "batch"):
            x = med.get((t, mode))
            if x:
                lines.append(
                    f"| {t} | {mode} | {x['server_cpu']:.2f} | {x['wrk_cpu']:.2f} | "
                    f"{x['other_load']:.2f} | {x['steal']:.2f} | {x['other_load_client']:.2f} |"
                )
    lines += [
        "",
        ("Commands (PORT: a free port; OFFSET: where the run's event counter starts; "
        "CONFIG.toml: generated, see `daemon_config` in bench/run_intake.py):"),
        "",
    ]
    lines += [f"- {k}: `{v}`" for k, v in result.commands.items()]
    noisy = [
        f"{t} {mode} ({x['server_cpu']:.2f})"
        for (t, mode), x in sorted(med.items())
        if x["server_cpu"] < a["min_server_cpu"]
    ]
    notes = list(result.notes)
    if noisy:
        notes.insert(
            0,
            "**noisy**: the server was not the bottleneck (it used less than "
            f"{a['min_server_cpu']:.2f} of its core: other processes took its core or wrk's) "
            "in the median measurement of "
            + ", ".join(noisy)
            + ", even after retries; those rps and latency figures are understated. "
            "Run again when the machine is quieter.",
        )
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines.append(END)
    return "\n".join(lines) + "\n"


def cli_flags(a: dict) -> list[str]:
    """The flags that differ from the defaults, so the reproduce line is exact."""
    flags = ["--quick"] if a["quick"] else []
    defaults = parser().parse_args([])
    skip = {"quick", "no_write"} | ({"rounds", "duration", "warmup", "pairs"} if a["quick"] else set())
    for k, v in a.items():
        if k in skip or v == getattr(defaults, k):
            continue
        flags.append(f"--{k.replace('_', '-')} {shlex.quote(str(v))}")
    return flags


def write_section(
    section: str, path: Path = RESULTS_MD, markers: tuple[str, str] = (START, END)
) -> None:
    """Replace our marked section in RESULTS.md, keeping every other bench's sections."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    start, end = markers
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Intake benchmark (see bench/README.md).")
    p.add_argument(
        "--quick", action="store_true", help="~1 min: 1 round, 2 s per figure, 1 s warm-up, 3 pairs"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--pairs",
        type=int,
        default=20,
        help="interleaved single-event pairs per loop (see measure_pairs); 0: none",
    )
    p.add_argument("--pair-seconds", type=int, default=1, help="seconds per measured slice")
    p.add_argument("--pair-slices", type=int, default=4,
                   help="slices per side in each pair (A B B A B A A B ...)")
    p.add_argument("--duration", type=int, default=3, help="seconds per measured figure")
    p.add_argument("--warmup", type=int, default=1, help="seconds of warm-up before each")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--batch", type=int, default=100, help="events per batch request")
    p.add_argument("--loops", default="asyncio,uvloop")
    p.add_argument(
        "--daemon",
        choices=("serve", "baseline-copy"),
        default="serve",
        help="baseline-copy: an A/A run of the harness itself",
    )
    p.add_argument(
        "--max-events",
        type=int,
        default=4_000_000,
        help="the daemon's queue.max_events (must hold a whole round)",
    )
    p.add_argument("--python", default="", help="interpreter for the servers (.venv by default)")
    p.add_argument(
        "--forwarding",
        choices=("on", "off"),
        default="on",
        help="off: the daemon's rate budget is 1 request per hour, so it forwards nothing "
        "and the figures are the intake path alone",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=3.0,
        help="before each target, wait up to this many seconds for other processes on the "
        "machine to use < 0.3 cores (0: don't wait)",
    )
    p.add_argument(
        "--min-server-cpu",
        type=float,
        default=0.9,
        help="a measurement in which the server used less than this share of its core was "
        "disturbed by other processes; it is taken again (up to --retries times)",
    )
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return p


def main() -> None:
    args = parser().parse_args()
    os.sched_setaffinity(0, {int(CLIENT_CPU)})  # keep this script off the server's core
    if args.quick:
        args.rounds, args.duration, args.warmup, args.pairs = 1, 2, 1, 3
    result = run(args)
    section = render(result)
    RESULTS_JSON.write_text(json.dumps(asdict(result), indent=1))
    if args.quick or args.no_write:
        print("\n(--quick / --no-write: RESULTS.md left alone)\n")
    else:
        write_section(section)
    print(section)


if __name__ == "__main__":
    main()
