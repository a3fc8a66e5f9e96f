"""The contract suite's verdict on what reached Prism: a 422 from Prism means the request
broke Intercom's OpenAPI description, and is reported with Prism's own messages.

Writes are judged where an operator would look: the daemon's metrics (delivered means
Prism answered 2xx) and its dead-letter file, which keeps each refused body with Prism's
answer. Reads come straight back through the GET /events proxy.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from tests.conftest import wait_until

PRISM_UNPROCESSABLE = 422
_MESSAGE = re.compile(r'"message"\s*:\s*"((?:[^"\\]|\\.)*)"')


class PrismRejected(AssertionError):
    """Prism answered 422: the request does not match Intercom's description."""

    def __init__(self, what: str, messages: list[str], request: object = None):
        self.messages = messages
        lines = [f"Prism rejected {what} (422):", *(f"  - {m}" for m in messages)]
        if request is not None:
            lines.append(f"  request: {request!r}")
        super().__init__("\n".join(lines))


def prism_messages(body: bytes | str) -> list[str]:
    """Prism's violation messages. Works on a body cut short (the dead-letter file keeps
    the first 2 KiB of an answer), where JSON parsing would fail."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return [orjson.loads(f'"{m}"') for m in _MESSAGE.findall(text)] or [text[:500]]


def _forwarded(svc) -> dict[str, float]:
    counts: dict[str, float] = {}
    for metric in svc.metrics.events_forwarded.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                result = sample.labels["result"]
                counts[result] = counts.get(result, 0.0) + sample.value
    return counts


def dead_letters(svc) -> list[dict]:
    path = Path(svc.config.storage.state_dir) / "dead-letter.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def assert_prism_accepted(svc, sent: int, timeout: float = 10.0) -> None:
    """Wait until `sent` writes are settled upstream, then fail on any refusal: a 422 raises
    PrismRejected with Prism's messages, anything else a plain AssertionError."""

    def settled() -> bool:
        if svc.workers.paused:
            return True
        counts = _forwarded(svc)
        return counts.get("delivered", 0) + counts.get("dead_lettered", 0) >= sent

    await wait_until(settled, timeout)
    for entry in dead_letters(svc):
        if entry.get("status") == PRISM_UNPROCESSABLE:
            raise PrismRejected(f"the daemon's {entry.get('route', 'request')}",
                                prism_messages(entry.get("response", "")), entry.get("event"))
    assert not svc.workers.paused, "Prism refused the daemon's token: forwarding paused"
    assert dead_letters(svc) == []
    assert _forwarded(svc).get("delivered", 0) == sent


def assert_read_accepted(status: int, body: bytes, query: str) -> None:
    if status == PRISM_UNPROCESSABLE:
        raise PrismRejected(f"GET /events?{query}", prism_messages(body))
    assert status == 200, (status, body[:500])
