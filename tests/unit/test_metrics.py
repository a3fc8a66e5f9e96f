"""LoopCounter: the intake's lock-free counter reads like any prometheus Counter; the
registry carries the standard process_* and python_* collectors."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

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
    for outcome in ("accepted", "duplicate", "rejected", "queue_full", "shutting_down"):
        assert f'intercom_forwarder_events_received_total{{outcome="{outcome}"}} 0.0' in text


async def test_metrics_endpoint_shows_process_and_python_runtime_metrics(make_service, http):
    """docs/deploy-sidecar.md tells users to size the memory limit from
    process_resident_memory_bytes: /metrics must carry it, with CPU and open fds."""
    svc = await make_service()
    async with http.get(svc.url + "/metrics") as r:
        assert r.status == 200
        families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    assert families["process_resident_memory_bytes"].samples[0].value > 1_000_000
    assert families["process_cpu_seconds"].type == "counter"  # process_cpu_seconds_total
    assert families["process_cpu_seconds"].samples[0].value > 0
    assert families["process_open_fds"].samples[0].value >= 3  # at least the listeners
    (info,) = families["python_info"].samples
    assert info.labels["implementation"] == "CPython" and info.value == 1
    assert "python_gc_collections" in families
