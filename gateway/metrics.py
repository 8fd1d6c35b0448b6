"""Prometheus metrics of the gateway (names follow Prometheus conventions: unit suffix, _total).

One registry per server instance, so tests can run several servers in one process.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vendgate_requests_total", "Requests by message type and response code",
                                ["message_type", "response_code"], registry=self.registry)
        self.latency = Histogram("vendgate_request_duration_seconds", "Time from request decoded to reply sent",
                                 ["message_type"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.batch_size = Histogram("vendgate_commit_batch_size", "Requests per committed batch",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_duration = Histogram("vendgate_commit_batch_duration_seconds", "Duration of one batch commit",
                                        buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.decided_ahead = Counter(
            "vendgate_commit_batches_decided_ahead_total",
            "Batches read and decided while the batch before them committed: kept (that batch committed as "
            "decided) or dropped (decided afresh)", ["outcome"], registry=self.registry)
        self.sessions_open = Gauge("vendgate_sessions_open", "Open terminal sessions", ["channel"],
                                   registry=self.registry)
        self.connections_refused = Counter("vendgate_connections_refused_total", "Connections refused",
                                           ["reason"], registry=self.registry)
        self.protocol_errors = Counter("vendgate_protocol_errors_total", "Protocol errors by kind",
                                       ["kind"], registry=self.registry)
        self.floats_below_threshold = Gauge("vendgate_floats_below_threshold",
                                            "Agent floats below their low-float threshold", registry=self.registry)

        # labels() looks a child up under a lock on every call: each request's children, kept.
        self._latency_by_type: dict[str, Any] = {}
        self._requests_by_outcome: dict[tuple[str, str], Any] = {}

    def observe_request(self, message_type: str, response_code: str, duration_s: float) -> None:
        latency = self._latency_by_type.get(message_type)
        if latency is None:
            latency = self._latency_by_type[message_type] = self.latency.labels(message_type)
        latency.observe(duration_s)
        key = (message_type, response_code)
        counter = self._requests_by_outcome.get(key)
        if counter is None:
            counter = self._requests_by_outcome[key] = self.requests.labels(message_type, response_code)
        counter.inc()

    def observe_batch(self, size: int, duration_s: float) -> None:
        self.batch_size.observe(size)
        self.batch_duration.observe(duration_s)

    def observe_decided_ahead(self, kept: bool) -> None:
        self.decided_ahead.labels("kept" if kept else "dropped").inc()
