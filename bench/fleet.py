"""Fleet benchmark (issue 14): N whole daemons spending ONE Intercom budget, with and
without Redis, and Redis stopped mid-run.

    .venv/bin/python bench/fleet.py                      # N = 1, 5, 10, 20, both modes, ~6 min
    .venv/bin/python bench/fleet.py --sidecars 5 --windows 4 --modes redis
    .venv/bin/python bench/fleet.py --budget 1666 --window 10 --windows 3 --modes redis
    .venv/bin/python bench/fleet.py --outage 30 --sidecars 5   # Redis killed for 30 s
    .venv/bin/python bench/fleet.py --redis-memory       # bytes per dedup key in Redis

One FakeIntercom in this process enforces B requests per fixed window of W seconds on the
real clock (429 over budget, X-RateLimit-* on every answer). Each of the N sidecars is a
real daemon process (`python -m forwarder serve`, tests/integration/daemon.py's spawn)
with its own state dir and intake port, configured by FORWARDER_* env with the whole
budget (rate_limit B per W), as a user who runs N replicas of one config does; in Redis
mode every one gets FORWARDER_FLEET__REDIS_URL, a real redis-server on a Unix socket in
a temporary directory (tests/redis_server.py), flushed before each run.

Load, from this process over HTTP: 1.5 x B events per window, in 20 slices a window, one
POST /events/batch per sidecar per slice; event i goes to sidecar i mod N, and every 10th
event also to the next sidecar (a client retrying against another replica). After the
load, a drain period lets the backlog (0.5 x B a window) reach Intercom.

Figures, over the loaded windows (every full window from the start; "after the 1st" also
leaves out the first, where every sidecar starts blind):
  budget used      2xx answers / (B x windows)
  429s             429 answers / all answers
  most in a window the most answers (any status) the fake gave in one window
  twice            events offered to two sidecars that Intercom answered 2xx twice
  lost             events in a batch answered 202 never delivered by the end of the drain
  intake errors    batches not answered 202 (or not answered at all)
  budget RT/event  the daemons' Redis round trips for the budget (lease, hold; from each
                   daemon's /metrics, `skipped` left out) / 2xx answers of the whole run
  dedup RT/request the same for the dedup (dedup, forget) / intake requests (target <= 1)
  fallbacks        entries into local mode (fleet_fallbacks_total, summed)
  CPU µs/event     the daemons' CPU time (/proc/PID/stat) from the load's start to the
                   drain's end / 2xx answers of the whole run
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import structlog  # noqa: E402

from forwarder.fake_intercom import FakeIntercom  # noqa: E402
from tests.integration.daemon import Daemon, spawn  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

TOKEN = "bench-token"
SLICES = 20  # load slices per window
PREFIX = "intercom_forwarder_"


class WindowedFake(FakeIntercom):
    """Notes (wall, window index, status, user_id) of every answer; _count() runs in the
    same step just before _answer, so _window_index is that request's window."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.answers: list[tuple[float, int, int, str | None]] = []

    def _answer(self, rec, status, body=b"", *, rated=True):
        user = rec.json.get("user_id") if isinstance(rec.json, dict) else None
        self.answers.append((self._clock.wall(), self._window_index, status, user))
        return super()._answer(rec, status, body, rated=rated)

    def ok_in(self, lo: float, hi: float) -> int:
        return sum(1 for a in self.answers if lo <= a[0] < hi and 200 <= a[2] < 300)


@dataclass
class Offered:
    """What the loader offered and what the intakes answered."""

    requests: Counter[int] = field(default_factory=Counter)  # per sidecar
    accepted: set[str] = field(default_factory=set)  # user_ids in batches answered 202
    errors: list[tuple[float, str]] = field(default_factory=list)  # (wall, what)
    offered_twice: set[str] = field(default_factory=set)


@dataclass
class Result:
    mode: str
    n: int
    used: float
    used_after_first: float
    rate_429: float
    rate_429_after_first: float
    most_in_window: int
    twice: int
    offered_twice: int
    lost: int
    intake_errors: int
    rt_per_event: float
    dedup_rt_per_request: float
    fallbacks: float
    cpu_us_per_event: float


def schedule(slot: int, per_slice: float, n: int, k: int) -> list[int]:
    """The events sidecar k is offered in time slice `slot`."""
    lo, hi = math.floor(slot * per_slice), math.floor((slot + 1) * per_slice)
    mine = [i for i in range(lo, hi) if i % n == k]
    if n > 1:  # every 10th event also reaches the next sidecar
        mine += [i for i in range(lo, hi) if i % 10 == 0 and (i + 1) % n == k]
    return mine


def user_id(i: int) -> str:
    return f"user-{i:08d}"


def event(i: int) -> dict:
    return {"event_name": "order-placed", "created_at": 1_700_000_000 + i,
            "user_id": user_id(i)}


async def offer(session: aiohttp.ClientSession, daemons: list[Daemon], budget: int,
                window_s: float, start: float, end: float) -> Offered:
    """POST the schedule from `start` to `end` (wall), one batch per sidecar per slice;
    every POST runs in its own task, so a slow sidecar does not delay the others' slices."""
    n = len(daemons)
    slice_s = window_s / SLICES
    per_slice = budget * 1.5 / SLICES
    out = Offered()
    posts: set[asyncio.Task[None]] = set()

    async def post(k: int, ids: list[int]) -> None:
        body = orjson.dumps([event(i) for i in ids])
        out.requests[k] += 1
        try:
            async with session.post(daemons[k].url + "/events/batch", data=body) as r:
                await r.read()
                if r.status == 202:
                    out.accepted.update(user_id(i) for i in ids)
                else:
                    out.errors.append((time.time(), f"{r.status}"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            out.errors.append((time.time(), type(exc).__name__))

    await asyncio.sleep(max(0.0, start - time.time()))
    slot = 0
    while start + slot * slice_s < end:
        for k in range(n):
            ids = schedule(slot, per_slice, n, k)
            out.offered_twice.update(user_id(i) for i in ids if n > 1 and i % 10 == 0)
            if ids:
                task = asyncio.create_task(post(k, ids))
                posts.add(task)
                task.add_done_callback(posts.discard)
        slot += 1
        await asyncio.sleep(max(0.0, start + slot * slice_s - time.time()))
    await asyncio.gather(*posts)
    return out


def round_trips(samples: dict[tuple, float], ops: tuple[str, ...]) -> float:
    """Redis round trips of `ops` that went to Redis (not `skipped` in local mode)."""
    name = PREFIX + "fleet_redis_round_trips_total"
    return sum(v for (n, labels), v in samples.items() if n == name
               and dict(labels)["op"] in ops and dict(labels)["result"] != "skipped")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Fleet:
    """N daemons of one app in `home`, started and stopped together."""

    def __init__(self, home: Path, fake_url: str, n: int, args: argparse.Namespace,
                 redis_url: str | None):
        self.home, self.fake_url, self.n, self.args = home, fake_url, n, args
        self.redis_url = redis_url
        self.daemons: list[Daemon] = []

    async def start(self) -> None:
        env = {"INTERCOM_ACCESS_TOKEN": TOKEN,
               "FORWARDER_RATE_LIMIT__REQUESTS": str(self.args.budget),
               "FORWARDER_RATE_LIMIT__PER_SECONDS": repr(self.args.window),
               "FORWARDER_WORKERS__CONCURRENCY": str(self.args.concurrency),
               "FORWARDER_LOG__STATS_INTERVAL_SECONDS": "3600"}
        if self.redis_url:
            env["FORWARDER_FLEET__REDIS_URL"] = self.redis_url
        for k in range(self.n):
            self.daemons.append(await spawn(self.home, upstream=self.fake_url,
                                            state_dir=self.home / f"state{k}",
                                            name=f"sidecar{k}", **env))
        await asyncio.gather(*(d.wait_serving(timeout=120) for d in self.daemons))

    def cpu(self) -> float:
        return sum(cpu_seconds(d.pid) for d in self.daemons)

    async def stop(self) -> None:
        await asyncio.gather(*(d.terminate() for d in self.daemons), return_exceptions=True)
        for d in self.daemons:
            await d.kill()


async def drain(fake: WindowedFake, offered: Offered, deadline: float) -> None:
    """Until every accepted event reached Intercom, or the deadline (wall)."""
    while time.time() < deadline:
        if offered.accepted <= {e["user_id"] for e in fake.delivered}:
            return
        await asyncio.sleep(0.25)


def first_edge(window_s: float, after: float) -> float:
    return (math.floor(after / window_s) + 1) * window_s


async def run(mode: str, n: int, args: argparse.Namespace, server: RedisServer | None,
              tmp: Path) -> Result:
    budget, window_s = args.budget, args.window
    fake = WindowedFake(token=TOKEN, budget=budget, window_seconds=window_s)
    await fake.start()
    redis_url = server.url if server is not None and mode == "redis" else None
    if redis_url:  # a fresh fleet each run: no budget or keys left over
        import redis

        client = redis.Redis(unix_socket_path=str(server.socket_path))
        client.flushall()
        client.close()
    home = tmp / f"{mode}-{n}"
    home.mkdir()
    fleet = Fleet(home, fake.url, n, args, redis_url)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            t0 = time.time()
            await fleet.start()
            start = first_edge(window_s, time.time() + 0.5)
            first = round(start / window_s)
            last = first + args.windows - 1
            end = (last + 1) * window_s
            cpu0 = fleet.cpu()
            offered = await offer(session, fleet.daemons, budget, window_s, start, end)
            backlog_windows = math.ceil(0.5 * args.windows) + 2
            await drain(fake, offered, time.time() + max(args.drain_s,
                                                         backlog_windows * window_s * 2))
            cpu = fleet.cpu() - cpu0
            if args.verbose:
                print(f"  started in {start - t0:.1f} s, drained {time.time() - end:.1f} s "
                      "after the load", flush=True)
            scraped = await asyncio.gather(*(d.metrics() for d in fleet.daemons))
        finally:
            await fleet.stop()
    await fake.stop()
    if args.verbose:
        per_ok = Counter(a[1] for a in fake.answers if 200 <= a[2] < 300)
        print(f"  {mode} n={n}: 2xx per window:",
              [per_ok.get(i, 0) for i in range(first, last + 4)], flush=True)
        firsts: dict[int, float] = {}
        lasts: dict[int, float] = {}
        for wall, w, status, _ in fake.answers:
            if 200 <= status < 300:
                firsts.setdefault(w, wall - w * window_s)
                lasts[w] = wall - w * window_s
        print("  first / last 2xx, ms into each window:",
              [f"{firsts.get(i, 0) * 1000:.0f}/{lasts.get(i, 0) * 1000:.0f}"
               for i in range(first, last + 1)])
        leased = sum(s.get((PREFIX + "fleet_permits_leased_total", ()), 0.0) for s in scraped)
        sent = sum(v for s in scraped for (name, _), v in s.items()
                   if name == PREFIX + "upstream_requests_total")
        print(f"  permits leased {leased:.0f}, requests sent {sent:.0f}", flush=True)

    def figures(lo: int) -> tuple[float, float, int]:
        rows = [a for a in fake.answers if lo <= a[1] <= last]
        ok = sum(1 for a in rows if 200 <= a[2] < 300)
        rl = sum(1 for a in rows if a[2] == 429)
        per = Counter(a[1] for a in rows)
        return (ok / (budget * (last - lo + 1)), rl / len(rows) if rows else 0.0,
                max(per.values(), default=0))

    used, r429, most = figures(first)
    used2, r4292, _ = figures(first + 1)
    ok_per_user = Counter(a[3] for a in fake.answers if 200 <= a[2] < 300)
    forwarded = sum(ok_per_user.values())
    twice = sum(1 for u in offered.offered_twice if ok_per_user[u] >= 2)
    lost = len(offered.accepted - {e["user_id"] for e in fake.delivered})

    def trips(ops: tuple[str, ...]) -> float:
        return sum(round_trips(s, ops) for s in scraped)

    fallbacks = sum(s.get((PREFIX + "fleet_fallbacks_total", ()), 0.0) for s in scraped)
    return Result(mode, n, used, used2, r429, r4292, most, twice, len(offered.offered_twice),
                  lost, len(offered.errors),
                  trips(("lease", "hold")) / forwarded if forwarded else math.nan,
                  trips(("dedup", "forget")) / sum(offered.requests.values()),
                  fallbacks, cpu / forwarded * 1e6 if forwarded else math.nan)


@dataclass
class OutageResult:
    n: int
    outage_s: float
    intake_errors: int
    lost: int
    accepted: int
    rate_429_before: float
    rate_429_during: float
    rate_429_after: float
    used_before: float
    used_during: float
    used_after: float
    recovered_after_s: float  # from Redis's restart until every daemon's fleet_redis_up is 1
    twice: int
    offered_twice: int


async def outage(n: int, args: argparse.Namespace, server: RedisServer, tmp: Path
                 ) -> OutageResult:
    """Redis mode, load for lead + outage + tail seconds; Redis SIGKILLed `lead` seconds
    into the load and started again on the same socket `outage` seconds later."""
    budget, window_s, lead = args.budget, args.window, args.outage_lead
    fake = WindowedFake(token=TOKEN, budget=budget, window_seconds=window_s)
    await fake.start()
    home = tmp / f"outage-{n}"
    home.mkdir()
    fleet = Fleet(home, fake.url, n, args, server.url)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        try:
            await fleet.start()
            start = first_edge(window_s, time.time() + 0.5)
            killed_at = start + lead
            back_at = killed_at + args.outage
            end = first_edge(window_s, back_at + lead)
            loader = asyncio.create_task(offer(session, fleet.daemons, budget, window_s,
                                               start, end))
            await asyncio.sleep(killed_at - time.time())
            server.kill()
            await asyncio.sleep(back_at - time.time())
            server.start()
            back_at = time.time()
            up = PREFIX + "fleet_redis_up"
            while True:
                scraped = await asyncio.gather(*(d.metrics() for d in fleet.daemons))
                if all(s.get((up, ()), 0.0) == 1.0 for s in scraped):
                    recovered = time.time() - back_at
                    break
                await asyncio.sleep(0.05)
            offered = await loader
            await drain(fake, offered, time.time() + max(args.drain_s, args.outage * 2))
        finally:
            await fleet.stop()
    await fake.stop()

    def share_429(lo: float, hi: float) -> float:
        rows = [a for a in fake.answers if lo <= a[0] < hi]
        return sum(1 for a in rows if a[2] == 429) / len(rows) if rows else 0.0

    def used(lo: float, hi: float) -> float:
        """2xx over the budget of the whole windows between lo and hi."""
        a, b = first_edge(window_s, lo - 1e-9), math.floor(hi / window_s) * window_s
        return fake.ok_in(a, b) / (budget * round((b - a) / window_s)) if b > a else math.nan

    ok_per_user = Counter(a[3] for a in fake.answers if 200 <= a[2] < 300)
    return OutageResult(
        n, args.outage, len(offered.errors),
        len(offered.accepted - {e["user_id"] for e in fake.delivered}), len(offered.accepted),
        share_429(start, killed_at), share_429(killed_at, back_at), share_429(back_at, end),
        used(start, killed_at), used(killed_at, back_at), used(back_at, end), recovered,
        sum(1 for u in offered.offered_twice if ok_per_user[u] >= 2),
        len(offered.offered_twice))


def redis_memory(server: RedisServer, keys: int) -> str:
    """Bytes per dedup key: INFO memory before and after `keys` keys written as FleetDedup
    writes them (prefix + 16-byte digest, value "1", EX), and MEMORY USAGE of one."""
    import hashlib

    import redis

    from forwarder.config import Secret
    from forwarder.fleet_redis import fleet_namespace

    client = redis.Redis(unix_socket_path=str(server.socket_path))
    prefix = (fleet_namespace("workspace-1", Secret(TOKEN)) + ":d:").encode()
    before = client.info("memory")["used_memory"]
    for lo in range(0, keys, 1000):
        pipe = client.pipeline(transaction=False)
        for n in range(lo, min(lo + 1000, keys)):
            digest = hashlib.blake2b(n.to_bytes(8, "big"), digest_size=16).digest()
            pipe.set(prefix + digest, b"1", nx=True, ex=86_400)
        pipe.execute()
    after = client.info("memory")["used_memory"]
    sample = prefix + hashlib.blake2b((7).to_bytes(8, "big"), digest_size=16).digest()
    usage = client.memory_usage(sample)
    client.close()
    per_key = (after - before) / keys
    return (f"{keys} dedup keys (key {len(sample)} bytes: '{prefix.decode()}' + 16-byte "
            f"digest; value '1'; EX 86400): used_memory +{after - before} bytes = "
            f"{per_key:.1f} bytes/key; MEMORY USAGE of one key: {usage} bytes. "
            f"Sizing: keys/day x {per_key:.0f} bytes (1M events/day ~ "
            f"{per_key * 1e6 / 2**20:.0f} MiB).")


def table(results: list[Result]) -> str:
    lines = ["| mode | sidecars | budget used (after 1st) | 429s / requests (after 1st) "
             "| most in one window | offered twice, reached Intercom twice | lost "
             "| intake errors | budget Redis RT / forwarded event "
             "| dedup Redis RT / intake request | fallbacks to local | CPU µs / event |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for r in results:
        local = r.mode == "local"
        lines.append(f"| {r.mode} | {r.n} | {r.used:.1%} ({r.used_after_first:.1%}) "
                     f"| {r.rate_429:.1%} ({r.rate_429_after_first:.1%}) | {r.most_in_window} "
                     f"| {r.twice} of {r.offered_twice} | {r.lost} | {r.intake_errors} "
                     f"| {'–' if local else f'{r.rt_per_event:.3f}'} "
                     f"| {'–' if local else f'{r.dedup_rt_per_request:.2f}'} "
                     f"| {'–' if local else int(r.fallbacks)} | {r.cpu_us_per_event:.0f} |")
    return "\n".join(lines)


def outage_table(results: list[OutageResult]) -> str:
    lines = ["| sidecars | Redis down | intake errors | lost (of accepted) "
             "| 429s before / during / after | budget used before / during / after "
             "| every fleet_redis_up = 1 after Redis's return | offered twice, reached "
             "Intercom twice |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.n} | {r.outage_s:g} s | {r.intake_errors} "
                     f"| {r.lost} (of {r.accepted}) "
                     f"| {r.rate_429_before:.1%} / {r.rate_429_during:.1%} / "
                     f"{r.rate_429_after:.1%} "
                     f"| {r.used_before:.1%} / {r.used_during:.1%} / {r.used_after:.1%} "
                     f"| {r.recovered_after_s:.2f} s | {r.twice} of {r.offered_twice} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    binary = shutil.which("redis-server")
    modes = ["redis"] if args.outage else args.modes.split(",")
    if "redis" in modes and binary is None:
        sys.exit("redis-server not installed (apt-get install redis-server)")
    sidecars = [int(x) for x in args.sidecars.split(",")]
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        server = None
        if binary is not None and ("redis" in modes or args.redis_memory):
            server = RedisServer(binary, Path(tmp) / "redis.sock", Path(tmp) / "redis.log")
            server.start()
        try:
            if args.redis_memory:
                assert server is not None
                print(redis_memory(server, args.memory_keys))
                return
            common = (f"--budget {args.budget} --window {args.window:g} "
                      f"--concurrency {args.concurrency}")
            if args.outage:
                assert server is not None
                outs = []
                for n in sidecars:
                    outs.append(await outage(n, args, server, Path(tmp)))
                    print(outage_table(outs[-1:]).splitlines()[-1], flush=True)
                print(f"\nReproduce: `.venv/bin/python bench/fleet.py --outage "
                      f"{args.outage:g} --outage-lead {args.outage_lead:g} --sidecars "
                      f"{args.sidecars} {common}`\n")
                print(outage_table(outs))
                return
            results = []
            for n in sidecars:
                for mode in modes:
                    results.append(await run(mode, n, args, server, Path(tmp)))
                    print(table(results[-1:]).splitlines()[-1], flush=True)
            print(f"\nReproduce: `.venv/bin/python bench/fleet.py --sidecars {args.sidecars} "
                  f"--modes {args.modes} --windows {args.windows} {common}`\n")
            print(table(results))
        finally:
            if server is not None:
                server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sidecars", default="1,5,10,20")
    p.add_argument("--modes", default="local,redis")
    p.add_argument("--windows", type=int, default=6, help="loaded windows per run")
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--window", type=float, default=2.0, help="seconds (whole, as Reset is)")
    p.add_argument("--concurrency", type=int, default=32, help="workers per daemon")
    p.add_argument("--drain-s", type=float, default=20.0,
                   help="at least this long after the load for the backlog to drain")
    p.add_argument("--outage", type=float, default=0.0,
                   help="seconds Redis is down mid-run (Redis mode only; 0: no outage)")
    p.add_argument("--outage-lead", type=float, default=10.0,
                   help="seconds of load before Redis is killed, and after it is back")
    p.add_argument("--verbose", action="store_true", help="print each run's 2xx per window")
    p.add_argument("--redis-memory", action="store_true")
    p.add_argument("--memory-keys", type=int, default=100_000)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
