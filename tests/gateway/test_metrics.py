"""Request metrics: the labelled children kept per message type and outcome count like labels() would."""

from __future__ import annotations

from prometheus_client import generate_latest

from gateway.metrics import GatewayMetrics


def test_observe_request_counts_each_outcome_and_times_each_type() -> None:
    metrics = GatewayMetrics()
    for _ in range(3):
        metrics.observe_request("TopUpRequest", "APPROVED", 0.004)
    metrics.observe_request("TopUpRequest", "INSUFFICIENT_FLOAT", 0.02)
    metrics.observe_request("HeartbeatRequest", "APPROVED", 0.0005)
    text = generate_latest(metrics.registry).decode()
    assert 'vendgate_requests_total{message_type="TopUpRequest",response_code="APPROVED"} 3.0' in text
    assert 'vendgate_requests_total{message_type="TopUpRequest",response_code="INSUFFICIENT_FLOAT"} 1.0' in text
    assert 'vendgate_requests_total{message_type="HeartbeatRequest",response_code="APPROVED"} 1.0' in text
    assert 'vendgate_request_duration_seconds_count{message_type="TopUpRequest"} 4.0' in text
    assert 'vendgate_request_duration_seconds_bucket{le="0.005",message_type="TopUpRequest"} 3.0' in text


def test_batches_decided_ahead_are_counted_kept_or_dropped() -> None:
    metrics = GatewayMetrics()
    metrics.observe_decided_ahead(True)
    metrics.observe_decided_ahead(True)
    metrics.observe_decided_ahead(False)
    text = generate_latest(metrics.registry).decode()
    assert 'vendgate_commit_batches_decided_ahead_total{outcome="kept"} 2.0' in text
    assert 'vendgate_commit_batches_decided_ahead_total{outcome="dropped"} 1.0' in text
