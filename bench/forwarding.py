"""Forwarding benchmark: the daemon against a fake Intercom that enforces a fixed budget.

    .venv/bin/python bench/forwarding.py            # full run, ~5 minutes, writes RESULTS.md
    .venv/bin/python bench/forwarding.py --quick    # ~1 minute, prints only

For each scenario: a FakeIntercom (forwarder/fake_intercom.py) in this process enforces
B requests per fixed window of W seconds on the real clock (429 over budget, with
X-RateLimit-* headers); `intercom-forwarder serve` runs as a subprocess with
rate_limit.requests set to the scenario's configured budget; the queue is preloaded
through POST /events/batch (batches of 500) with enough unique ~350-byte events to keep
the workers busy beyond the last measured window. Then, per fake window:

  - utilisation: 2xx answers in the window / B (the real budget);
  - 429s: 429 answers / all answers, in the measured windows and over the whole run;
  - daemon CPU per forwarded event: the daemon's user+system time (/proc/PID/stat) from
    the first measured window's start to the last one's end, over the events delivered
    in those windows. Measurement starts at the first window edge after the preload has
    been answered, so the intake's work is excluded.

The first window (partial: the preload lands in it) and every window after the last
measured one are skipped; the run checks that the queue never ran dry before the last
measured window ended.

Scenarios: (a) configured == real; (b) configured 50% above the real (1.5 B: a budget
set wrong, or shared with another client); (c) the real budget 50% above the configured
(B / 1.5: the local limiter binds, ~67% utilisation by design). The short window
(200 per 2 s by default) keeps a run short; `--real-windows N` also runs (a) and (b) at
Intercom's real shape (1666 per 10 s) for N windows.

Also per scenario: the daemon's kernel share of that CPU time and its event-loop
wake-ups per event (voluntary context switches, /proc/PID/status), which tell a burst
(many sends per loop turn) from paced sends (a turn or two per event).

Robustness (not the targets): --skew-ms runs the fake's clock behind the daemon's,
--latency-ms delays each request in the fake before it is counted. A run with either
writes its own section (forwarding-skew) with every window listed.

The fake answers in this process (pinned to CPU 1) and the daemon runs alone on CPU 0,
as in bench/run_intake.py. Per-request records (arrival time, window, status) go to
bench/results-forwarding.json (git-ignored); the table goes to the marked forwarding
section of bench/RESULTS.md, with bench/memory.py's figures, and is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import aiohttp
import orjson

from forwarder.clock import SystemClock
from forwarder.fake_intercom import FakeIntercom

RESULTS_MD = BENCH / "RESULTS.md"
RESULTS_JSON = BENCH / "results-forwarding.json"
MARKERS = ("<!-- forwarding:start -->", "<!-- forwarding:end -->")
# runs with --skew-ms / --latency-ms: robustness, not the targets, so a section of their own
SKEW_MARKERS = ("<!-- forwarding-skew:start -->", "<!-- forwarding-skew:end -->")
TOKEN = "bench-token"
DAEMON_CPU, HARNESS_CPU = "0", "1"
BATCH = 500
BODY_BYTES = 350

TARGETS = {"a": {"util": 0.97, "rate_429": 0.0}, "b": {"util": 0.90, "rate_429": 0.05}}


# --------------------------------------------------------------------------- processes


def pin(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc/PID/stat."""
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, from /proc/PID/stat."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields_[11]) / tick, int(fields_[12]) / tick


def wakeups(pid: int) -> int:
    """Voluntary context switches of a process: each is a sleep in epoll_wait (or another
    blocking call) that something then woke, so their count is the event loop's wake-ups."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def core_times(cpu: str) -> tuple[float, float]:
    """(busy, total) seconds of one CPU since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) / os.sysconf("SC_CLK_TCK") for x in line.split()[1:9]]
            user, nice, system, _idle, _iowait, irq, softirq, steal = v
            return user + nice + system + irq + softirq + steal, sum(v)
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


def daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    env.pop("INTERCOM_ACCESS_TOKEN", None)
    return env


def write_config(
    path: Path,
    *,
    port: int,
    base_url: str,
    state_dir: Path,
    requests: int,
    per_seconds: float,
    concurrency: int,
    drain_seconds: float,
    max_events: int = 100_000,
) -> None:
    path.write_text(
        f"""# Generated by bench/{Path(sys.argv[0]).name}; everything not set here is the default.
[intake]
host = "127.0.0.1"
port = {port}

[intercom]
base_url = "{base_url}"
access_token = "{TOKEN}"

[rate_limit]
requests = {requests}
per_seconds = {per_seconds}

[queue]
max_events = {max_events}

[workers]
concurrency = {concurrency}

[storage]
state_dir = "{state_dir}"

[shutdown]
drain_seconds = {drain_seconds}

[log]
level = "info"
format = "json"
"""
    )


class Daemon:
    """`intercom-forwarder serve` as a subprocess on DAEMON_CPU, its output in a log file."""

    def __init__(self, config: Path, port: int, log: Path):
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen | None = None
        self.argv = [
            *pin(DAEMON_CPU),
            str(ROOT / ".venv/bin/intercom-forwarder"),
            "serve",
            "--config",
            str(config),
        ]

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=daemon_env(), stdout=out, stderr=out
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{tail(self.log)}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(f"http://127.0.0.1:{self.port}/readyz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout} s:\n{tail(self.log)}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- events


def event(n: int, run: int) -> dict:
    """A unique ~350-byte event (4 metadata keys), as bench/memory.py and wrk/events.lua use."""
    obj = {
        "event_name": "order-placed",
        "created_at": 1_700_000_000 + n,
        "user_id": f"user-{run:03d}-{n:08d}",
        "email": f"customer{n:08d}@example.com",
        "metadata": {
            "order_number": f"A-{n:010d}",
            "price": {"amount": 3499, "currency": "eur"},
            "items": 3,
            "note": "",
        },
    }
    pad = BODY_BYTES - len(orjson.dumps(obj))
    obj["metadata"]["note"] = "x" * max(0, pad)
    return obj


async def post_events(
    session: aiohttp.ClientSession, port: int, start: int, count: int, run: int
) -> int:
    """POST /events/batch in batches of BATCH; returns how many the daemon accepted."""
    accepted = 0
    url = f"http://127.0.0.1:{port}/events/batch"
    for lo in range(start, start + count, BATCH):
        hi = min(lo + BATCH, start + count)
        body = orjson.dumps([event(n, run) for n in range(lo, hi)])
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            answer = await r.json(content_type=None)
            if r.status != 202 or answer.get("rejected") or answer.get("duplicates"):
                raise RuntimeError(f"batch at {lo}: {r.status} {answer}")
            accepted += answer["accepted"]
    return accepted


async def scrape(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for m in re.finditer(r"^(intercom_forwarder_\w+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE):
        out[m.group(1)] = float(m.group(2))
    return out


# --------------------------------------------------------------------------- the fake


class SkewedClock(SystemClock):
    """The fake Intercom's clock: its wall() is behind ours by skew_s (ahead if negative)."""

    def __init__(self, skew_s: float):
        self.skew_s = skew_s

    def wall(self) -> float:
        return time.time() - self.skew_s


class WindowedFake(FakeIntercom):
    """FakeIntercom that also notes, for every answer, its wall time, window and status;
    optionally each POST /events waits latency_s before Intercom counts it (the request's
    way there), and its clock may be skewed against the daemon's.

    It hooks FakeIntercom._answer, which every answer goes through; _count() runs in the
    same synchronous step just before it, so _window_index is this request's window.
    """

    def __init__(self, *, latency_s: float = 0.0, skew_s: float = 0.0, **kwargs):
        super().__init__(clock=SkewedClock(skew_s), **kwargs)
        self.latency_s = latency_s
        self.answers: list[tuple[float, int, int]] = []  # (wall, window index, status)

    def wall(self) -> float:
        return self._clock.wall()

    def _answer(self, rec, status, body=b"", *, rated=True):
        self.answers.append((self._clock.wall(), self._window_index, status))
        return super()._answer(rec, status, body, rated=rated)

    async def _post_events(self, request):
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return await super()._post_events(request)


async def sleep_until_wall(t: float, wall=time.time) -> None:
    await asyncio.sleep(max(0.0, t - wall()))


# --------------------------------------------------------------------------- one scenario


@dataclass(frozen=True)
class Scenario:
    key: str  # "a" | "b" | "c"
    budget: int  # the real one, enforced by the fake
    window_s: float
    configured: int  # rate_limit.requests
    windows: int  # measured windows
    skew_s: float = 0.0  # Intercom's clock behind the daemon's by this (ahead if negative)
    latency_s: float = 0.0  # one way, before Intercom counts a request

    @property
    def label(self) -> str:
        shape = f"{self.budget}/{self.window_s:g}s"
        what = {"a": "configured = real", "b": "configured 1.5x real", "c": "real 1.5x configured"}[
            self.key
        ]
        extra = "".join(
            f", {name} {v * 1000:g} ms"
            for name, v in (("skew", self.skew_s), ("latency", self.latency_s))
            if v
        )
        return f"({self.key}) {shape}, {what}{extra}"


@dataclass
class Outcome:
    scenario: dict
    preloaded: int
    preload_s: float
    first_window: int
    per_window: list[dict]  # window, ok, rate_limited, first_ok_s, last_ok_s
    utilisation: float  # over the measured windows
    util_min: float
    util_max: float
    requests_measured: int
    rate_limited_measured: int
    requests_total: int
    rate_limited_total: int
    delivered_measured: int
    cpu_s: float
    cpu_us_per_event: float
    cpu_us_per_request: float
    sys_share: float  # of the daemon's CPU time, the share spent in the kernel
    wakeups_per_event: float  # voluntary context switches (event-loop wake-ups) per event
    others_on_daemon_core: float  # share of CPU 0 used by other processes while measured
    ran_dry: bool
    rate_limited_offsets_s: list[float]  # where in its window each 429 arrived
    metrics: dict[str, float]
    answers: list[tuple[float, int, int]] = field(repr=False, default_factory=list)


def per_window(answers: list[tuple[float, int, int]], window_s: float) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for wall, idx, status in answers:
        row = rows.setdefault(
            idx, {"window": idx, "ok": 0, "rate_limited": 0, "first_ok_s": None, "last_ok_s": None}
        )
        offset = wall - idx * window_s
        if 200 <= status < 300:
            row["ok"] += 1
            if row["first_ok_s"] is None:
                row["first_ok_s"] = offset
            row["last_ok_s"] = offset
        elif status == 429:
            row["rate_limited"] += 1
    return rows


async def run_scenario(sc: Scenario, args: argparse.Namespace, workdir: Path, run: int) -> Outcome:
    fake = WindowedFake(
        token=TOKEN,
        budget=sc.budget,
        window_seconds=sc.window_s,
        latency_s=sc.latency_s,
        skew_s=sc.skew_s,
    )
    wall = fake.wall  # windows are Intercom's: every edge below is on the fake's clock
    await fake.start()
    port = free_port()
    run_dir = workdir / f"{sc.key}-{sc.budget}-{run}"
    run_dir.mkdir()
    write_config(
        run_dir / "forwarder.toml",
        port=port,
        base_url=fake.url,
        state_dir=run_dir / "state",
        requests=sc.configured,
        per_seconds=sc.window_s,
        concurrency=args.concurrency,
        drain_seconds=0,
    )
    daemon = Daemon(run_dir / "forwarder.toml", port, run_dir / "daemon.log")
    # enough for the partial first window, the measured ones and two spare
    preload = sc.budget * (sc.windows + 3)
    async with aiohttp.ClientSession() as session:
        daemon.start()
        try:
            await daemon.wait_ready(session)
            W = sc.window_s
            # start the preload just after an edge so it lands early in one window
            await sleep_until_wall((math.floor(wall() / W) + 1) * W + 0.05, wall)
            t0 = wall()
            accepted = await post_events(session, port, 0, preload, run)
            t1 = wall()
            first = math.floor(t1 / W) + 1
            last = first + sc.windows - 1
            await sleep_until_wall(first * W, wall)
            cpu0, core0 = cpu_times(daemon.pid), core_times(DAEMON_CPU)
            wake0 = wakeups(daemon.pid)
            await sleep_until_wall((last + 1) * W, wall)
            cpu1, core1 = cpu_times(daemon.pid), core_times(DAEMON_CPU)
            wake1 = wakeups(daemon.pid)
            metrics = await scrape(session, port)
        finally:
            daemon.kill()  # no drain: what is left does not matter here
            await fake.stop()

    rows = per_window(fake.answers, sc.window_s)
    measured = [
        rows.get(
            i, {"window": i, "ok": 0, "rate_limited": 0, "first_ok_s": None, "last_ok_s": None}
        )
        for i in range(first, last + 1)
    ]
    ok = sum(r["ok"] for r in measured)
    rl = sum(r["rate_limited"] for r in measured)
    utils = [r["ok"] / sc.budget for r in measured]
    delivered_by_end = sum(r["ok"] for i, r in rows.items() if i <= last)
    cpu = sum(cpu1) - sum(cpu0)
    sys_s = cpu1[1] - cpu0[1]
    busy = (core1[0] - core0[0]) - cpu
    total = core1[1] - core0[1]
    return Outcome(
        scenario=asdict(sc) | {"label": sc.label},
        preloaded=accepted,
        preload_s=t1 - t0,
        first_window=first,
        per_window=[rows[i] for i in sorted(rows)],
        utilisation=ok / (sc.budget * sc.windows),
        util_min=min(utils),
        util_max=max(utils),
        requests_measured=ok + rl,
        rate_limited_measured=rl,
        requests_total=len(fake.answers),
        rate_limited_total=fake.rate_limited,
        delivered_measured=ok,
        cpu_s=cpu,
        cpu_us_per_event=cpu / ok * 1e6 if ok else math.nan,
        cpu_us_per_request=cpu / (ok + rl) * 1e6 if ok + rl else math.nan,
        sys_share=sys_s / cpu if cpu else math.nan,
        wakeups_per_event=(wake1 - wake0) / ok if ok else math.nan,
        others_on_daemon_core=max(0.0, busy / total) if total else 0.0,
        ran_dry=delivered_by_end >= accepted,
        rate_limited_offsets_s=[
            round(w - i * sc.window_s, 4) for w, i, s in fake.answers if s == 429
        ],
        metrics=metrics,
        answers=fake.answers,
    )


# --------------------------------------------------------------------------- report


def machine() -> dict:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, cwd=ROOT, check=False
            ).stdout.strip()
        except OSError:
            return "?"

    import aiolimiter

    dirty = out(["git", "status", "--porcelain", "--", "forwarder"])
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "aiolimiter": aiolimiter.__version__,
        "commit": out(["git", "rev-parse", "--short", "HEAD"])
        + (" + uncommitted changes in forwarder/" if dirty else ""),
        "loadavg": Path("/proc/loadavg").read_text().split()[0],
    }


def verdict(o: Outcome) -> str:
    target = TARGETS.get(o.scenario["key"])
    if target is None:
        return ""
    share = o.rate_limited_total / o.requests_total if o.requests_total else 0.0
    ok = o.utilisation >= target["util"] and (
        o.rate_limited_total == 0 if target["rate_429"] == 0 else share < target["rate_429"]
    )
    return "meets" if ok else "**misses**"


def target_text(key: str) -> str:
    t = TARGETS.get(key)
    if t is None:
        return "~0.67 by design"
    r429 = "0 429s" if t["rate_429"] == 0 else f"429s < {t['rate_429']:.0%}"
    return f"≥ {t['util']:.0%}, {r429}"


def pct(n: int, d: int) -> str:
    return f"{n / d:.1%}" if d else "–"


def table(outcomes: list[Outcome]) -> str:
    lines = [
        (
            "| scenario | configured | windows | utilisation (min–max) | 429s / requests, "
            "measured | 429s / requests, whole run | target | |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for o in outcomes:
        sc = o.scenario
        lines.append(
            f"| {sc['label']} | {sc['configured']} | {sc['windows']} "
            f"| {o.utilisation:.3f} ({o.util_min:.3f}–{o.util_max:.3f}) "
            f"| {o.rate_limited_measured} / {o.requests_measured} "
            f"({pct(o.rate_limited_measured, o.requests_measured)}) "
            f"| {o.rate_limited_total} / {o.requests_total} "
            f"({pct(o.rate_limited_total, o.requests_total)}) "
            f"| {target_text(sc['key'])} | {verdict(o)} |"
        )
    return "\n".join(lines)


def cpu_table(outcomes: list[Outcome]) -> str:
    lines = [
        (
            "| scenario | daemon CPU µs/event | µs/request | of it in the kernel "
            "| event-loop wake-ups/event | others on the daemon's core |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.scenario['label']} | {o.cpu_us_per_event:.0f} | {o.cpu_us_per_request:.0f} "
            f"| {o.sys_share:.0%} | {o.wakeups_per_event:.2f} "
            f"| {o.others_on_daemon_core:.2f} |"
        )
    return "\n".join(lines)


def window_table(o: Outcome) -> str:
    """Every window of one run: where in the window the budget went, and the 429s."""
    sc = o.scenario
    lines = [f"{sc['label']}: window, 2xx, 429, first 2xx at, last 2xx at (s into window)"]
    rows = {r["window"]: r for r in o.per_window}
    empty = {"ok": 0, "rate_limited": 0, "first_ok_s": None, "last_ok_s": None}
    for i in range(min(rows), max(rows) + 1):  # a window with no answer at all is listed too
        r = rows.get(i, {"window": i, **empty})
        tag = (
            "measured"
            if o.first_window <= r["window"] < o.first_window + sc["windows"]
            else "skipped"
        )
        f = "–" if r["first_ok_s"] is None else f"{r['first_ok_s']:.3f}"
        la = "–" if r["last_ok_s"] is None else f"{r['last_ok_s']:.3f}"
        lines.append(
            f"  {r['window'] - o.first_window:+d} {r['ok']:5d} "
            f"{r['rate_limited']:4d}  {f:>6} {la:>6}  {tag}"
        )
    return "\n".join(lines)


def run_memory() -> tuple[str, int]:
    r = subprocess.run(
        [str(ROOT / ".venv/bin/python"), str(BENCH / "memory.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    return (r.stdout + r.stderr).strip(), r.returncode


def render(
    outcomes: list[Outcome],
    m: dict,
    command: str,
    memory: tuple[str, int] | None,
    skewed: bool = False,
) -> str:
    start, end = SKEW_MARKERS if skewed else MARKERS
    title = (
        "## Forwarding when Intercom's clock is not the daemon's (robustness, not a target)"
        if skewed
        else "## Forwarding"
    )
    parts = [
        start,
        title,
        "",
        (
            f"Measured {m['date']} on {m['nproc']} cores ({m['cpu']}), Python {m['python']}, "
            f"aiohttp {m['aiohttp']}, aiolimiter {m['aiolimiter']}, commit {m['commit']}, "
            f"load average {m['loadavg']} at the start. Daemon (`intercom-forwarder serve`, "
            f"32 workers) alone on CPU 0; the fake Intercom (fixed windows on the real clock, "
            f"429 over budget) and the harness on CPU 1."
        ),
        "",
        f"Reproduce: `{command}`",
        "",
        (
            "Utilisation is 2xx answers per fake window over the real budget, over the measured "
            "windows (the partial first window and everything after the last measured one "
            "are skipped); CPU is the daemon's user+system time over those windows per event "
            'delivered in them, with no intake load. "Others on the daemon\'s core" is the '
            "share of CPU 0 that other processes took meanwhile (noise on this shared machine)."
        ),
        "",
        table(outcomes),
        "",
        (
            "Daemon CPU over the same windows (wake-ups: the daemon's voluntary context "
            "switches, i.e. returns from a blocking epoll_wait):"
        ),
        "",
        cpu_table(outcomes),
        "",
    ]
    if skewed:
        parts += [
            (
                "Every window (offsets from the first measured one; 2xx, 429s, and when in the "
                "window the first and the last 2xx arrived, in seconds):"
            ),
            "",
            "```text",
            *(window_table(o) for o in outcomes),
            "```",
            "",
        ]
    dry = [o.scenario["label"] for o in outcomes if o.ran_dry]
    if dry:
        parts += [
            (
                f"Queue ran dry before the last measured window ended (figures invalid): "
                f"{', '.join(dry)}"
            ),
            "",
        ]
    if memory is not None:
        text, rc = memory
        parts += [
            "### Memory per queued event and per dedup key",
            "",
            "Reproduce: `.venv/bin/python bench/memory.py` (tracemalloc; exits 1 over target)",
            "",
            "```text",
            text,
            "```",
            "",
        ]
        if rc != 0:
            parts += [f"bench/memory.py exited {rc}: a figure is over its target.", ""]
    parts.append(end)
    return "\n".join(parts) + "\n"


def write_section(
    section: str, markers: tuple[str, str] = MARKERS, path: Path = RESULTS_MD
) -> None:
    """Replace our marked section of RESULTS.md; every other section is kept as it is."""
    import run_intake  # bench/ is on sys.path when this runs as a script

    run_intake.write_section(section, path=path, markers=markers)


# --------------------------------------------------------------------------- main


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    def configured(key: str, b: int) -> int:
        return {"a": b, "b": round(1.5 * b), "c": round(b / 1.5)}[key]

    keys = args.scenarios.split(",")
    skew_s, latency_s = args.skew_ms / 1000, args.latency_ms / 1000
    out = [
        Scenario(
            k, args.budget, args.window, configured(k, args.budget), args.windows, skew_s, latency_s
        )
        for k in keys
    ]
    if args.real_windows:
        out += [
            Scenario(k, 1666, 10.0, configured(k, 1666), args.real_windows, skew_s, latency_s)
            for k in ("a", "b")
            if k in keys
        ]
    return out


def command_line(args: argparse.Namespace) -> str:
    flags = []
    defaults = parser().parse_args([])
    for k, v in vars(args).items():
        if k in ("no_write", "quick") or v == getattr(defaults, k):
            continue
        flag = f"--{k.replace('_', '-')}"
        flags.append(flag if v is True else f"{flag} {v}")
    return " ".join([".venv/bin/python bench/forwarding.py", *flags])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Forwarding benchmark (see bench/README.md).")
    p.add_argument("--budget", type=int, default=200, help="real budget B per window")
    p.add_argument("--window", type=float, default=2.0, help="window length W, seconds")
    p.add_argument("--windows", type=int, default=10, help="measured windows per scenario")
    p.add_argument("--scenarios", default="a,b,c", help="subset of a,b,c")
    p.add_argument(
        "--real-windows",
        type=int,
        default=5,
        help="also run (a) and (b) at 1666 per 10 s for this many windows; 0: not",
    )
    p.add_argument(
        "--skew-ms",
        type=float,
        default=0.0,
        help="the fake Intercom's clock runs this far behind the daemon's (negative: ahead)",
    )
    p.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="each POST /events waits this long in the fake before it is counted",
    )
    p.add_argument("--concurrency", type=int, default=32, help="workers.concurrency")
    p.add_argument("--no-memory", action="store_true", help="skip bench/memory.py")
    p.add_argument(
        "--quick",
        action="store_true",
        help="4 windows, no real-shape run, no memory, RESULTS.md untouched",
    )
    p.add_argument("--no-write", action="store_true", help="leave RESULTS.md untouched")
    return p


async def amain(args: argparse.Namespace) -> list[Outcome]:
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="bench-forwarding-") as tmp:
        for n, sc in enumerate(scenarios(args)):
            print(f"running {sc.label}, {sc.windows} windows ...", flush=True)
            o = await run_scenario(sc, args, Path(tmp), n)
            outcomes.append(o)
            print(window_table(o), flush=True)
    return outcomes


def main() -> int:
    args = parser().parse_args()
    if args.quick:
        args.windows, args.real_windows, args.no_memory, args.no_write = 4, 0, True, True
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {int(HARNESS_CPU)})
    m = machine()
    outcomes = asyncio.run(amain(args))
    memory = None if args.no_memory else run_memory()
    skewed = bool(args.skew_ms or args.latency_ms)
    section = render(outcomes, m, command_line(args), memory, skewed)
    print(section)
    RESULTS_JSON.write_text(
        json.dumps(
            {"machine": m, "args": vars(args), "outcomes": [asdict(o) for o in outcomes]},
            default=str,
        )
    )
    if not args.no_write:
        write_section(section, SKEW_MARKERS if skewed else MARKERS)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
