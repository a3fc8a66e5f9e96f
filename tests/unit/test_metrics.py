"""LoopCounter: the intake's lock-free counter reads like any prometheus Counter."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from forwarder.metrics import LoopCounter, Metrics


def test_loop_counter_is_exported_as_a_counter_with_total_and_labels() -> None:
    registry = CollectorRegistry()
    c = LoopCounter("demo_things", "Things seen", ["kind"], registry=registry)
    c.labels("a").inc()
    c.labels("a").inc(2)
    c.labels("b")
    text = generate_latest(registry).decode()
    assert "# TYPE demo_things_total counter" in text  # as prometheus_client writes a Counter
    assert 'demo_things_total{kind="a"} 3.0' in text
    assert 'demo_things_total{kind="b"} 0.0' in text
    assert registry.get_sample_value("demo_things_total", {"kind": "a"}) == 3


def test_loop_counter_refuses_the_wrong_number_of_labels() -> None:
    c = LoopCounter("demo_other", "x", ["kind"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="kind"):
        c.labels("a", "b")


def test_events_received_series_exist_at_zero_from_the_start() -> None:
    text = Metrics().render()[0].decode()
    for outcome in ("accepted", "duplicate", "rejected", "queue_full"):
        assert f'intercom_forwarder_events_received_total{{outcome="{outcome}"}} 0.0' in text
