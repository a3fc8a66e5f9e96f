"""Fleet benchmark (issue 14): N sidecars spending ONE Intercom budget, with and without
Redis.

    .venv/bin/python bench/fleet.py                      # N = 1, 5, 10, 20, both modes, ~4 min
    .venv/bin/python bench/fleet.py --sidecars 5 --windows 4 --modes redis
    .venv/bin/python bench/fleet.py --redis-memory       # bytes per dedup key in Redis

One FakeIntercom in this process enforces B requests per fixed window of W seconds on the
real clock (429 over budget, X-RateLimit-* on every answer). N sidecars run as N child
processes (this file with --child; tests/fleet_sidecar.py: a RateGate, with a FleetBudget
in Redis mode, the real UpstreamClient and `--senders` sender loops each), every one
configured with the whole budget, as a user who runs N replicas of one config does. The
fleet is offered 1.5 x B events per window, in 20 slices a window, event i to sidecar
i mod N; every 10th event also to the next sidecar (a client retrying against another
replica). Each child computes its part of that schedule from the wall clock, so nothing
coordinates them but Intercom and Redis. Each sidecar's intake check is its dedup: its
own DedupWindow, or FleetDedup through Redis.

Figures, over the measured windows (every full window after the start; "after the 1st"
also leaves out the first, where every sidecar starts blind):
  budget used      2xx answers / (B x windows)
  429s             429 answers / all answers
  most in a window the most answers (any status) the fake gave in one window
  twice            events offered to two sidecars that reached Intercom twice
  budget RT/event  Redis round trips of the budget (lease, hold) / forwarded events
  dedup RT/batch   Redis round trips of the dedup / intake batches offered (target: 1)
  fallbacks        times a sidecar fell back to local mode (a Redis call over the bound)
  CPU µs/event     the children's CPU time (each a whole sidecar) / forwarded event

Redis runs as a real redis-server on a Unix socket in a temporary directory, started and
stopped here. (Sidecars in one process were tried first: 20 of them lag one event loop
past the 50 ms Redis bound, which then measures the loop, not Redis.)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from forwarder.dedup import DedupWindow  # noqa: E402
from forwarder.fake_intercom import FakeIntercom  # noqa: E402
from tests.fleet_sidecar import Sidecar, Supply, make_event  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

TOKEN = "bench-token"


class WindowedFake(FakeIntercom):
    """Notes (wall, window index, status) of every answer; _count() runs in the same step
    just before _answer, so _window_index is that request's window."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.answers: list[tuple[float, int, int]] = []

    def _answer(self, rec, status, body=b"", *, rated=True):
        self.answers.append((self._clock.wall(), self._window_index, status))
        return super()._answer(rec, status, body, rated=rated)


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
    rt_per_event: float
    dedup_rt_per_batch: float
    fallbacks: float
    cpu_us_per_event: float


def schedule(slot: int, per_slice: float, n: int, k: int) -> list[int]:
    """The events sidecar k is offered in time slice `slot` (same answer in every child)."""
    lo, hi = math.floor(slot * per_slice), math.floor((slot + 1) * per_slice)
    mine = [i for i in range(lo, hi) if i % n == k]
    if n > 1:  # every 10th event also reaches the next sidecar
        mine += [i for i in range(lo, hi) if i % 10 == 0 and (i + 1) % n == k]
    return mine


async def child(args: argparse.Namespace) -> None:
    """One sidecar: offer its part of the schedule through its dedup, send, report."""
    import orjson

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    car = Sidecar(args.url, TOKEN, requests=args.budget, per_seconds=args.window,
                  senders=args.senders, supply=Supply(), redis_url=args.redis_url or None,
                  workspace_id=f"bench-{args.n}", seed=args.k,
                  redis_timeout_s=args.redis_timeout_ms / 1000)
    local = DedupWindow(3600, 1_000_000, car.clock)
    await car.start()
    print("ready", flush=True)  # the parent then sends the start and end times
    args.start, args.end = map(float, (await asyncio.to_thread(sys.stdin.readline)).split())
    await asyncio.sleep(max(0.0, args.start - time.time()))
    slice_s = args.window / 20
    per_slice = args.budget * 1.5 / 20
    batches = 0
    cpu0 = time.process_time()
    while (now := time.time()) < args.end:
        slot = math.floor((now - args.start) / slice_s)
        events = [make_event(i, run=args.n) for i in schedule(slot, per_slice, args.n, args.k)]
        if events:
            batches += 1
            if car.dedup is not None:
                fresh = await car.dedup.add_if_absent_many([e.key for e in events])
            else:
                fresh = [local.add_if_absent(e.key) for e in events]
            car.supply.extend([e for e, new in zip(events, fresh) if new])
        await asyncio.sleep(max(0.0, args.start + (slot + 1) * slice_s - time.time()))
    cpu = time.process_time() - cpu0
    trips: dict[str, float] = {}
    for m in car.registry.collect():
        if m.name.endswith("fleet_redis_round_trips"):
            for smp in m.samples:
                if smp.name.endswith("_total") and smp.labels["result"] != "skipped":
                    trips[smp.labels["op"]] = trips.get(smp.labels["op"], 0) + smp.value
    fallbacks = car.registry.get_sample_value("intercom_forwarder_fleet_fallbacks_total")
    await car.stop()
    print(orjson.dumps({"cpu": cpu, "trips": trips, "batches": batches,
                        "fallbacks": fallbacks or 0, "share": car.gate.share.share,
                        "fleet_share": car.budget.share if car.budget else None}).decode())


async def run(mode: str, n: int, args: argparse.Namespace, redis_url: str | None) -> Result:
    import orjson

    budget, window_s = args.budget, args.window
    fake = WindowedFake(token=TOKEN, budget=budget, window_seconds=window_s)
    await fake.start()
    if redis_url and mode == "redis":  # a fresh fleet each run: no budget or keys left over
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(redis_url)
        await client.flushall()
        await client.aclose()
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--n", str(n),
            "--url", fake.url, "--redis-url", redis_url if mode == "redis" else "",
            "--budget", str(budget), "--window", repr(window_s), "--senders", str(args.senders),
            "--redis-timeout-ms", repr(args.redis_timeout_ms)]
    procs = [await asyncio.create_subprocess_exec(*argv, "--k", str(k),
                                                  stdin=asyncio.subprocess.PIPE,
                                                  stdout=asyncio.subprocess.PIPE)
             for k in range(n)]
    for p in procs:  # every child imported and connected: start them together
        assert p.stdout is not None
        assert (await p.stdout.readline()).strip() == b"ready"
    start = (math.floor(time.time() / window_s) + 1) * window_s  # on a window edge
    first = math.floor(start / window_s)  # the first full window
    last = first + args.windows - 1
    end = (last + 1) * window_s
    outs = await asyncio.gather(*(p.communicate(f"{start!r} {end!r}\n".encode())
                                  for p in procs))
    await fake.stop()
    reports = [orjson.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    if args.verbose:
        print(f"  {mode} n={n}: shares", [round(r["share"], 3) for r in reports],
              "fleet shares", [r["fleet_share"] and round(r["fleet_share"], 3)
                               for r in reports],
              "fallbacks", sum(r["fallbacks"] for r in reports), flush=True)

    def figures(lo: int) -> tuple[float, float, int]:
        rows = [a for a in fake.answers if lo <= a[1] <= last]
        ok = sum(1 for a in rows if 200 <= a[2] < 300)
        rl = sum(1 for a in rows if a[2] == 429)
        per: dict[int, int] = {}
        for a in rows:
            per[a[1]] = per.get(a[1], 0) + 1
        return (ok / (budget * (last - lo + 1)), rl / len(rows) if rows else 0.0,
                max(per.values(), default=0))

    if args.verbose:
        per_ok: dict[int, int] = {}
        for a in fake.answers:
            if 200 <= a[2] < 300:
                per_ok[a[1]] = per_ok.get(a[1], 0) + 1
        print("  2xx per window:", [per_ok.get(i, 0) for i in range(first, last + 1)])
    used, r429, most = figures(first)
    used2, r4292, _ = figures(first + 1)
    delivered = len(fake.delivered)
    offered_twice = sum(1 for i in range(math.floor(args.windows * 20 * budget * 1.5 / 20))
                        if i % 10 == 0) if n > 1 else 0

    def trips(ops: tuple[str, ...]) -> float:
        return sum(v for r in reports for op, v in r["trips"].items() if op in ops)

    batches = sum(r["batches"] for r in reports)
    cpu = sum(r["cpu"] for r in reports)
    return Result(mode, n, used, used2, r429, r4292, most, fake.duplicates, offered_twice,
                  trips(("lease", "hold")) / delivered if delivered else math.nan,
                  trips(("dedup", "forget")) / batches if batches else math.nan,
                  sum(r["fallbacks"] for r in reports),
                  cpu / delivered * 1e6 if delivered else math.nan)


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
             "| most in one window | offered twice, reached Intercom twice "
             "| budget Redis RT / forwarded event | dedup Redis RT / intake batch "
             "| fallbacks to local | CPU µs / event |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        rt = "–" if r.mode == "local" else f"{r.rt_per_event:.3f}"
        drt = "–" if r.mode == "local" else f"{r.dedup_rt_per_batch:.2f}"
        lines.append(f"| {r.mode} | {r.n} | {r.used:.1%} ({r.used_after_first:.1%}) "
                     f"| {r.rate_429:.1%} ({r.rate_429_after_first:.1%}) | {r.most_in_window} "
                     f"| {r.twice} of {r.offered_twice} | {rt} | {drt} "
                     f"| {'–' if r.mode == 'local' else int(r.fallbacks)} "
                     f"| {r.cpu_us_per_event:.0f} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    binary = shutil.which("redis-server")
    modes = args.modes.split(",")
    if "redis" in modes and binary is None:
        sys.exit("redis-server not installed (apt-get install redis-server)")
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
            results = []
            for n in [int(x) for x in args.sidecars.split(",")]:
                for mode in modes:
                    r = await run(mode, n, args, server.url if server else None)
                    results.append(r)
                    print(table([r]).splitlines()[-1], flush=True)
            print()
            print(f"Reproduce: `.venv/bin/python bench/fleet.py --sidecars {args.sidecars} "
                  f"--modes {args.modes} --windows {args.windows} --budget {args.budget} "
                  f"--window {args.window:g} --senders {args.senders} "
                  f"--redis-timeout-ms {args.redis_timeout_ms:g}`")
            print()
            print(table(results))
        finally:
            if server is not None:
                server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--url", default="", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    p.add_argument("--start", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--end", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--sidecars", default="1,5,10,20")
    p.add_argument("--modes", default="local,redis")
    p.add_argument("--windows", type=int, default=6, help="measured windows per run")
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--window", type=float, default=2.0, help="seconds (whole, as Reset is)")
    p.add_argument("--senders", type=int, default=32, help="sender loops per sidecar")
    p.add_argument("--redis-timeout-ms", type=float, default=50.0,
                   help="the Redis bound per round trip (the daemon's is 50 ms)")
    p.add_argument("--verbose", action="store_true", help="print each run's shares")
    p.add_argument("--redis-memory", action="store_true")
    p.add_argument("--memory-keys", type=int, default=100_000)
    args = p.parse_args()
    asyncio.run(child(args) if args.child else main_async(args))


if __name__ == "__main__":
    main()
