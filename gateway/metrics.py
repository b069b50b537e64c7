"""The gateway's Prometheus metrics, created once at import."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter("detectflow_http_requests_total", "HTTP requests served", ["route", "method", "status"])
HTTP_SECONDS = Histogram("detectflow_http_request_seconds", "HTTP request latency", ["route"],
                         buckets=(.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 2.5, 5, 10, 30, 60))
SYNC_INFLIGHT = Gauge("detectflow_sync_inflight", "Sync detect calls awaiting their reply")
REFUSED = Counter("detectflow_http_refused_total", "Calls refused before any work",
                  ["reason"])  # rate_limited | quota | quota_contention | overloaded_inflight | overloaded_lag
#                                  | fair_share | overloaded_bytes | body_too_large
BODY_BYTES_RESERVED = Gauge("detectflow_gateway_body_bytes_reserved",
                            "Request-body bytes this instance has reserved (bodies being read or held)")
PAGE_BYTES = Histogram("detectflow_gateway_page_bytes", "Encoded size of results pages",
                       buckets=(1e4, 1e5, 1e6, 2e6, 4e6, 8e6, 16e6))
SYNC_OUTCOME = Counter("detectflow_sync_outcome_total", "Sync detect calls by outcome",
                       ["outcome"])  # replied | deadline (202) | idempotent_replay
ONLINE_LAG = Gauge("detectflow_gateway_online_lag", "Online-lane backlog seen by this gateway (records)")
AUDIT_FAILURES = Counter("detectflow_audit_failures_total", "Audit events that could not be written", ["sink"])
