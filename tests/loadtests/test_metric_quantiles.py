"""Quantiles of the gateway's own latency histogram, read from /metrics text between two phases."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from loadtests.deployment import bucket_quantile_ms, histogram_buckets

BUCKETS = (0.001, 0.005, 0.015, 0.05)


def test_quantiles_count_only_what_was_observed_between_the_readings() -> None:
    registry = CollectorRegistry()
    latency = Histogram("x_duration_seconds", "x", ["message_type"], buckets=BUCKETS, registry=registry)
    for _ in range(50):
        latency.labels("TopUpRequest").observe(0.040)  # before the phase: must not count
    latency.labels("LookupRequest").observe(0.0005)
    before = histogram_buckets(generate_latest(registry).decode(), "x_duration_seconds", message_type="TopUpRequest")
    for _ in range(98):
        latency.labels("TopUpRequest").observe(0.004)
    latency.labels("TopUpRequest").observe(0.012)
    latency.labels("TopUpRequest").observe(0.2)  # above every bucket: +Inf
    after = histogram_buckets(generate_latest(registry).decode(), "x_duration_seconds", message_type="TopUpRequest")
    assert after[0.005] - before[0.005] == 98 and after[float("inf")] == 150
    assert bucket_quantile_ms(before, after, 0.50) == 5.0
    assert bucket_quantile_ms(before, after, 0.99) == 15.0
    assert bucket_quantile_ms(before, after, 1.0) is None  # in +Inf: no bound to report
    assert bucket_quantile_ms(after, after, 0.5) is None  # nothing observed
    assert histogram_buckets(generate_latest(registry).decode(), "x_duration_seconds", message_type="Nope") == {}
