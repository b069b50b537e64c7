"""The gateway's Prometheus metrics, created once at import."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter("detectflow_http_requests_total", "HTTP requests served", ["route", "method", "status"])
HTTP_SECONDS = Histogram("detectflow_http_request_seconds", "HTTP request latency", ["route"],
                         buckets=(.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 2.5, 5, 10, 30, 60))
SYNC_INFLIGHT = Gauge("detectflow_sync_inflight", "Sync detect calls awaiting their reply")
REFUSED = Counter("detectflow_http_refused_total", "Calls refused before any work",
                  ["reason"])  # rate_limited | quota | overloaded_inflight | overloaded_lag
SYNC_OUTCOME = Counter("detectflow_sync_outcome_total", "Sync detect calls by outcome",
                       ["outcome"])  # replied | deadline (202) | idempotent_replay
ONLINE_LAG = Gauge("detectflow_gateway_online_lag", "Online-lane backlog seen by this gateway (records)")
AUDIT_FAILURES = Counter("detectflow_audit_failures_total", "Audit events that could not be written", ["sink"])
