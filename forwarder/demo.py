"""`intercom-forwarder demo`: the whole pipeline in a few seconds, with no token.

Starts the embedded fake Intercom (forwarder.fake_intercom) with a small rate budget and
one unknown contact, starts the real Service against it, posts a realistic mix over HTTP
as an app would, waits until every accepted event has settled, and reports what happened
to each kind. Every figure in the report is observed, none is assumed.
"""

from __future__ import annotations

import asyncio
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp
import orjson

from .config import (
    Config,
    IntakeConfig,
    IntercomConfig,
    LogConfig,
    RateLimitConfig,
    RetryConfig,
    Secret,
    ShutdownConfig,
    StorageConfig,
)
from .fake_intercom import FakeIntercom
from .logs import configure_logging
from .service import Service

DEMO_TOKEN = "demo-token-not-a-secret"
BUDGET = 20          # Intercom's budget per window, as the fake enforces it
WINDOW_S = 1.0       # Intercom uses 10 s windows; 1 s keeps the demo short
BURST = 60
UNKNOWN = "ghost-user"
NOW = int(time.time())


@dataclass
class Row:
    kind: str
    sent: int
    answers: list[int] = field(default_factory=list)
    note: str = ""
    outcome: str = ""
    ok: bool = False


def _event(user: str, name: str, offset: int, **metadata: object) -> dict:
    ev: dict = {"event_name": name, "created_at": NOW - 3600 + offset, "user_id": user}
    if metadata:
        ev["metadata"] = metadata
    return ev


async def _post(http: aiohttp.ClientSession, url: str, obj: object) -> tuple[int, bytes]:
    async with http.post(url, data=orjson.dumps(obj),
                         headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.read()


def _answers(codes: list[int]) -> str:
    distinct = sorted(set(codes))
    return ", ".join(f"{c} x{codes.count(c)}" if codes.count(c) > 1 else str(c)
                     for c in distinct)


async def run_demo(out: TextIO = sys.stdout) -> int:
    with tempfile.TemporaryDirectory(prefix="intercom-forwarder-demo-") as state:
        fake = FakeIntercom(token=DEMO_TOKEN, budget=BUDGET, window_seconds=WINDOW_S,
                            unknown_contacts=[UNKNOWN])
        await fake.start()
        try:
            cfg = Config(
                intake=IntakeConfig(host="127.0.0.1", port=0),
                intercom=IntercomConfig(base_url=fake.url, access_token=Secret(DEMO_TOKEN)),
                rate_limit=RateLimitConfig(requests=BUDGET, per_seconds=WINDOW_S),
                retry=RetryConfig(base_delay_seconds=0.2, max_delay_seconds=2.0),
                storage=StorageConfig(state_dir=state),
                shutdown=ShutdownConfig(drain_seconds=5),
                log=LogConfig(level="error"),
            )
            async with Service(cfg) as svc:
                rows = await _drive(svc, fake)
            _report(out, svc, fake, rows, Path(state))
        finally:
            await fake.stop()
    return 0 if all(r.ok for r in rows) else 1


async def _drive(svc: Service, fake: FakeIntercom) -> list[Row]:
    url = svc.url + "/events"
    rows: list[Row] = []
    async with aiohttp.ClientSession() as http:
        # An Intercom 500 first, so the retry is easy to see on its own.
        fake.script(500)
        row = Row("Intercom answers 500", 1)
        row.answers.append((await _post(http, url, _event("u-500", "paid-invoice", 0)))[0])
        rows.append(row)
        await fake.wait_for_delivered(1, timeout=10)

        valid = [_event(f"u{i}", "Placed.Order", i, order_date=NOW - 60, plan="pro",
                        price={"amount": 2999, "currency": "usd"}) for i in range(5)]
        row = Row("valid events", len(valid))
        for ev in valid:
            row.answers.append((await _post(http, url, ev))[0])
        rows.append(row)

        row = Row("duplicates (same composite key)", 2)
        for ev in valid[:2]:
            dup = {**ev, "event_name": "placed-ORDER", "metadata": {"resent": True}}
            row.answers.append((await _post(http, url, dup))[0])
        rows.append(row)

        row = Row("unknown contact", 1)
        row.answers.append((await _post(http, url, _event(UNKNOWN, "viewed-page", 1)))[0])
        rows.append(row)

        row = Row("malformed event", 1)
        status, body = await _post(http, url, {"event_name": "signed-up",
                                               "created_at": (NOW - 60) * 1000, "email": 42})
        row.answers.append(status)
        if status == 400:
            errors = orjson.loads(body)["errors"]
            row.note = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        rows.append(row)

        row = Row("12 metadata keys", 1)
        many = _event("u-meta", "updated-profile", 2, **{f"field_{i:02d}": i for i in range(12)})
        row.answers.append((await _post(http, url, many))[0])
        rows.append(row)

        row = Row(f"burst of {BURST} (budget {BUDGET}/window)", BURST)
        burst = [_event(f"b{i}", "clicked-button", 10 + i) for i in range(BURST)]
        status, body = await _post(http, svc.url + "/events/batch", burst)
        row.answers.append(status)
        row.note = f"batch answer {body.decode()}"
        rows.append(row)
        burst_started = time.monotonic()

        await _settle(svc)
        burst_s = time.monotonic() - burst_started
    _judge(rows, svc, fake, burst_s)
    return rows


async def _settle(svc: Service, timeout_s: float = 30.0) -> None:
    """Wait until every accepted event is delivered or dead-lettered."""
    sample = svc.metrics.registry.get_sample_value

    def settled() -> bool:
        accepted = sample("intercom_forwarder_events_received_total",
                          {"outcome": "accepted"}) or 0
        done = sum(sample("intercom_forwarder_events_forwarded_total",
                          {"result": r, "reason": reason}) or 0
                   for r, reason in (("delivered", ""), ("dead_lettered", "contact_not_found"),
                                     ("dead_lettered", "rejected"),
                                     ("dead_lettered", "retries_exhausted")))
        return done >= accepted and len(svc.queue) == 0

    deadline = time.monotonic() + timeout_s
    while not settled() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _judge(rows: list[Row], svc: Service, fake: FakeIntercom, burst_s: float) -> None:
    sample = svc.metrics.registry.get_sample_value
    by_user = {}
    for ev in fake.delivered:
        by_user.setdefault(ev.get("user_id"), []).append(ev)
    r500, valid, dups, unknown, bad, meta, burst = rows

    retried = sample("intercom_forwarder_events_forwarded_total",
                     {"result": "retried", "reason": "server_error"}) or 0
    r500.ok = "u-500" in by_user and retried >= 1
    r500.outcome = f"retried {int(retried)}x with backoff, then delivered" if r500.ok else \
        "NOT delivered"

    names = {ev["event_name"] for u in (f"u{i}" for i in range(5)) for ev in by_user.get(u, [])}
    n_valid = sum(len(by_user.get(f"u{i}", [])) for i in range(5))
    valid.ok = n_valid == 5 and names == {"placed-order"}
    valid.outcome = f"{n_valid} delivered, name normalised to {sorted(names)}"

    dup_count = sample("intercom_forwarder_events_received_total", {"outcome": "duplicate"}) or 0
    dups.ok = dup_count == 2 and n_valid == 5
    dups.outcome = f"{int(dup_count)} dropped as duplicates, never forwarded"

    dl = sample("intercom_forwarder_events_forwarded_total",
                {"result": "dead_lettered", "reason": "contact_not_found"}) or 0
    unknown.ok = dl == 1
    unknown.outcome = "Intercom said 404: dead-lettered as contact_not_found" if unknown.ok \
        else f"{int(dl)} dead-lettered"

    bad.ok = bad.answers == [400]
    bad.outcome = "rejected at the intake, never queued"

    kept = [len(ev.get("metadata", {})) for ev in by_user.get("u-meta", [])]
    meta.ok = kept == [10]
    meta.outcome = f"delivered with {kept[0] if kept else 0} keys (Intercom keeps the first 10)"

    n_burst = sum(1 for ev in fake.delivered if str(ev.get("user_id", "")).startswith("b"))
    windows = math.ceil(BURST / BUDGET)
    burst.ok = n_burst == BURST
    burst.outcome = (f"{n_burst} delivered in {burst_s:.1f} s (>= {windows - 1} windows of "
                     f"{WINDOW_S:g} s); Intercom answered 429 {fake.rate_limited} times")


def _report(out: TextIO, svc: Service, fake: FakeIntercom, rows: list[Row], state: Path) -> None:
    w = out.write
    w("\nintercom-forwarder demo: the daemon forwarded to an embedded fake Intercom "
      "(no token needed)\n\n")
    w(f"{'kind':<38} {'sent':>4}  {'intake':<12} outcome\n")
    w(f"{'-' * 38} {'-' * 4}  {'-' * 12} {'-' * 40}\n")
    for r in rows:
        mark = "ok " if r.ok else "!! "
        w(f"{r.kind:<38} {r.sent:>4}  {_answers(r.answers):<12} {mark}{r.outcome}\n")
        if r.note:
            w(f"{'':<58}{r.note[:160]}\n")
    codes: dict[int | None, int] = {}
    for rec in fake.requests:
        codes[rec.status] = codes.get(rec.status, 0) + 1
    w(f"\nupstream requests by status: "
      f"{', '.join(f'{k}: {v}' for k, v in sorted(codes.items(), key=lambda kv: str(kv[0])))}\n")
    dl_path = state / "dead-letter.jsonl"
    if dl_path.exists():
        line = dl_path.read_bytes().splitlines()[0]
        w(f"dead-letter line: {line.decode()[:300]}\n")
    verdict = "every kind behaved as documented" if all(r.ok for r in rows) else \
        "SOME KINDS DID NOT BEHAVE AS EXPECTED (marked !!)"
    w(f"\n{verdict}. Run `intercom-forwarder serve` with INTERCOM_ACCESS_TOKEN set for real.\n")


def main() -> int:
    configure_logging("error", "console")
    return asyncio.run(run_demo())
