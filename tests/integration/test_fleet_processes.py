"""A fleet of real daemon processes on one real redis-server (issue 14): a sidecar killed
with SIGKILL while it holds permits leased from the fleet's budget costs the fleet those
permits until the window ends, never longer, and loses nothing (disk mode).

The in-process fleet tests (tests/integration/test_fleet_service.py) cannot kill a daemon
without its stop path running; here the kill is a real kill -9 of a real process."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from forwarder.fake_intercom import FakeIntercom
from tests.conftest import TOKEN
from tests.integration.daemon import Daemon, spawn_serving

BUDGET = 20  # requests per window, the whole app's
WINDOW_S = 1  # Intercom's Reset is whole seconds
LATENCY_S = 0.1  # per answer: two workers send 20 a second, so a window lasts a while
WORKERS = 2
BACKLOG = 40  # events per daemon: 6 windows of the fleet's budget


class SlowWindowedFake(FakeIntercom):
    """Answers POST /events after LATENCY_S, and notes each answer's window and status.
    The wait comes before the call is counted, so it is counted and answered in one step
    of the loop, in one window; a request cut off by a kill is never counted."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.answers: list[tuple[int, int]] = []

    async def _post_events(self, request):
        await asyncio.sleep(LATENCY_S)
        return await super()._post_events(request)

    def _answer(self, rec, status, body=b"", *, rated=True):
        self.answers.append((self._window_index, status))
        return super()._answer(rec, status, body, rated=rated)

    def ok_per_window(self) -> Counter[int]:
        return Counter(w for w, status in self.answers if 200 <= status < 300)

    @property
    def window_now(self) -> int:
        return math.floor(self._clock.wall() / WINDOW_S)


def env(redis_url: str) -> dict[str, str]:
    return {"INTERCOM_ACCESS_TOKEN": TOKEN, "FORWARDER_QUEUE__TYPE": "disk",
            "FORWARDER_WORKERS__CONCURRENCY": str(WORKERS),
            "FORWARDER_RATE_LIMIT__REQUESTS": str(BUDGET),
            "FORWARDER_RATE_LIMIT__PER_SECONDS": str(WINDOW_S),
            "FORWARDER_FLEET__REDIS_URL": redis_url}


async def start(tmp_path: Path, fake: FakeIntercom, k: int, redis_url: str,
                name: str) -> Daemon:
    return await spawn_serving(tmp_path, upstream=fake.url, state_dir=tmp_path / f"state{k}",
                               name=name, **env(redis_url))


async def held_permits(daemon: Daemon) -> float:
    """Permits leased and not yet answered: unused, or on the wire."""
    samples = await daemon.metrics()
    leased = samples.get(("intercom_forwarder_fleet_permits_leased_total", ()), 0.0)
    answered = sum(v for (name, _), v in samples.items()
                   if name == "intercom_forwarder_upstream_requests_total")
    return leased - answered


@pytest.mark.timeout(60)
async def test_a_sidecar_killed_holding_permits_costs_the_fleet_nothing_past_the_window(
        tmp_path, redis_server):
    """Steps: 3 disk-mode daemons with Redis, each configured with the app's whole budget
    (20 per 1-s window) and a backlog of 40 events, against a fake that answers in 100 ms;
    SIGKILL one mid-window while it holds leased permits; watch the next window; restart
    the killed one on its state dir.
    Expect: the window after the kill's is spent to the budget by the other two (nothing
    waits for the dead one's permits past its window), at most a 429 or two at window
    edges, and every event answered 202 is delivered, none twice beyond the one on the
    wire per worker of the killed one."""
    fake = SlowWindowedFake(token=TOKEN, budget=BUDGET, window_seconds=WINDOW_S)
    await fake.start()
    daemons: list[Daemon] = []
    try:
        daemons = list(await asyncio.gather(*(
            start(tmp_path, fake, k, redis_server.url, f"sidecar{k}") for k in range(3))))
        accepted: set[str] = set()
        async with aiohttp.ClientSession() as http:
            for k, daemon in enumerate(daemons):
                names = [f"u{k}-{i}" for i in range(BACKLOG)]
                body = orjson.dumps([{"event_name": "order-placed", "created_at": 1_700_000_000,
                                      "user_id": name} for name in names])
                async with http.post(daemon.url + "/events/batch", data=body) as r:
                    assert r.status == 202 and (await r.json())["accepted"] == BACKLOG
                accepted.update(names)

        victim = daemons[0]
        # Mid-window, once the victim has leased more than it has had answered: it holds
        # permits the fleet counted as spent. A window is long enough (100 ms answers) for
        # leases of several permits to be held while they are used one by one.
        while True:
            await victim.wait_for(lambda: len(fake.answers) >= 1, "the first answers")
            window = fake.window_now
            if await held_permits(victim) >= 1 and fake.window_now == window:
                break
            await asyncio.sleep(0.01)
        await victim.kill()
        killed_in = fake.window_now

        # The next window, whole: the two left spend it to the budget.
        await daemons[1].wait_for(lambda: fake.window_now > killed_in + 1,
                                  "the window after the kill's to end", timeout=5)
        assert fake.ok_per_window()[killed_in + 1] == BUDGET, sorted(fake.ok_per_window().items())
        # This fake counts a request 100 ms after it arrives: one sent at a window's very
        # end, on a permit of that window, can land in the next one and be its 21st (Redis's
        # grid and the fake's agree only to the 20 ms the budget waits past a Reset). CI saw
        # one such 429 in ~125 requests; the bound is 1%.
        assert fake.rate_limited <= 2, fake.rate_limited

        daemons[0] = await start(tmp_path, fake, 0, redis_server.url, "sidecar0-again")
        delivered = lambda: {e["user_id"] for e in fake.delivered}  # noqa: E731
        await daemons[0].wait_for(lambda: accepted <= delivered(), "every event delivered",
                                  timeout=20)
        users = Counter(e["user_id"] for e in fake.delivered)
        assert set(users) == accepted and max(users.values()) == 1
        # An event on the wire at the kill was delivered and not yet deleted from the
        # victim's disk queue: sent again after the restart (Intercom drops it by its key).
        assert fake.duplicates <= WORKERS
        assert fake.rate_limited <= 2, fake.rate_limited
    finally:
        await asyncio.gather(*(d.kill() for d in daemons))
        await fake.stop()
